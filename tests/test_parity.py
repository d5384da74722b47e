"""Multi-process parity: tpfx programs against the single-device GPT, in real gloo processes (fp32).

Two spawns keep the suite fast: world 2 (tp=2: all call forms, train-mode dropout, 50 AdamW steps,
bad input) and world 4 (tp=4, and tp=2 groups of consecutive ranks inside a world of 4).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import tpfx
from examples.gpt import GPTModel, small_config
from tests.multiprocess import run_ranks
from tests.parity import grad_diffs, max_diff

TOL = 1e-5
STEPS = 50


def _inputs(config, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some right padding, so the mask changes the numbers
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def _compare_call(gm, reference, kwargs: dict, *, seed: int | None = None) -> dict[str, float]:
    """One forward+backward of both models with the same arguments (and dropout seed)."""
    out = {}
    results = []
    for model in (reference, gm):
        model.zero_grad(set_to_none=True)
        if seed is not None:
            torch.manual_seed(seed)
        logits, loss = model(**kwargs)
        (loss if loss is not None else logits.float().pow(2).mean()).backward()
        results.append((logits, loss))
    (ref_logits, ref_loss), (tp_logits, tp_loss) = results
    out["logits"] = max_diff(tp_logits, ref_logits)
    out["loss"] = max_diff(tp_loss, ref_loss)
    out.update({f"grad {k}": v for k, v in grad_diffs(gm, reference).items()})
    return out


def _forms_and_modes(tp: int | None) -> dict[str, float]:
    """Eval mode, every call form; then train mode with dropout 0.1 and the same seed."""
    torch.manual_seed(0)
    reference = GPTModel(small_config(dropout=0.1)).eval()
    gm = tpfx.parallelize(reference, tp=tp)
    data = _inputs(reference.config)
    forms = {
        "ids+mask+labels": data,
        "ids": {"input_ids": data["input_ids"]},
        "ids+labels": {"input_ids": data["input_ids"], "labels": data["labels"]},
        "ids+mask": {"input_ids": data["input_ids"], "attention_mask": data["attention_mask"]},
    }
    diffs = {}
    for form, kwargs in forms.items():
        diffs.update({f"eval {form}: {k}": v for k, v in _compare_call(gm, reference, kwargs).items()})
    reference.train()
    gm.train()
    for form in ("ids+mask+labels", "ids+labels"):
        diffs.update({f"train {form}: {k}": v
                      for k, v in _compare_call(gm, reference, forms[form], seed=123).items()})
    return diffs


def _adamw_curves(steps: int) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    reference = GPTModel(small_config(dropout=0.1)).train()
    gm = tpfx.parallelize(reference, tp=2)
    data = _inputs(reference.config)
    curves = []
    for model in (reference, gm):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for step in range(steps):
            torch.manual_seed(1000 + step)
            _, loss = model(**data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves.append(losses)
    return curves[0], curves[1]


def _bad_inputs() -> dict[str, str]:
    torch.manual_seed(0)
    model = GPTModel(small_config(dropout=0.0, d_ff=511))
    before = copy.deepcopy(model.state_dict())
    errors = {}
    for label, call in (("tp3", lambda: tpfx.parallelize(GPTModel(small_config()), tp=3)),
                        ("d_ff511", lambda: tpfx.parallelize(model, tp=2))):
        try:
            call()
            errors[label] = "no error"
        except tpfx.TpfxError as error:
            errors[label] = f"{type(error).__name__}: {error}"
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    unchanged &= all(type(m).__name__ != "ColumnParallelLinear" for m in model.modules())
    errors["model unchanged"] = str(unchanged)
    dist.barrier()  # every rank raised before any collective: the group is still healthy
    return errors


def _world2(rank: int, world_size: int) -> dict:
    return {"forms": _forms_and_modes(None), "curves": _adamw_curves(STEPS), "errors": _bad_inputs()}


def _world4(rank: int, world_size: int) -> dict:
    return {"tp4": _forms_and_modes(4), "tp2 of 4": _forms_and_modes(2)}


def _assert_close(diffs: dict[str, float], label: str) -> None:
    bad = {k: v for k, v in diffs.items() if not v <= TOL}
    assert not bad, f"{label}: {len(bad)} tensors differ by more than {TOL}: {bad}"


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(_world2, 2)


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return run_ranks(_world4, 4)


def test_tp2_every_call_form_and_train_mode_match_single_device(world2):
    for rank, result in enumerate(world2):
        assert len(result["forms"]) > 100  # logits, loss and every gradient, per form
        _assert_close(result["forms"], f"tp=2 rank {rank}")


def test_tp2_adamw_curve_follows_single_device(world2):
    reference, parallel = world2[0]["curves"]
    assert len(parallel) == STEPS and reference[-1] < reference[0]  # it trains
    worst = max(abs(a - b) for a, b in zip(reference, parallel))
    assert worst <= 1e-4, f"loss curves drift by {worst}"
    assert world2[1]["curves"][1] == parallel  # both ranks see the same loss


def test_bad_input_raises_one_line_before_any_collective(world2):
    errors = world2[0]["errors"]
    assert errors["tp3"].startswith("ConfigError: tp=3 does not divide the world size 2")
    assert errors["d_ff511"].startswith("ShardingError: cannot shard 'blocks.0.ffn.fc1' (fc1): out_features 511")
    assert "\n" not in errors["tp3"] + errors["d_ff511"]
    assert errors["model unchanged"] == "True"


def test_tp4_matches_single_device(world4):
    for rank, result in enumerate(world4):
        _assert_close(result["tp4"], f"tp=4 rank {rank}")


def test_tp2_groups_inside_world4_match_single_device(world4):
    for rank, result in enumerate(world4):
        _assert_close(result["tp2 of 4"], f"tp=2 of world 4, rank {rank}")
