"""Hugging Face GPT-2, LLaMA (grouped-query), GPT-NeoX and OPT through torch.export, tp=2 on gloo (fp32).

One spawn of world 2 covers all four models: each is parallelized from its example call (batch 2,
length 8) and run at that shape and at two others (batch 3 x length 13, batch 1 x length 5).
Logits, loss and every gradient are compared with the single-device model built from the same
weights, and the all-gathers seen at the collectives are compared with the sites table.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import tpfx  # noqa: E402
from examples import hf_models  # noqa: E402
from tests.multiprocess import run_ranks  # noqa: E402
from tests.parity import max_diff  # noqa: E402
from tpfx.collectives import add_observer  # noqa: E402
from tpfx.layers import shard_range  # noqa: E402

TOL = 1e-5
SHAPES = ((2, 8), (3, 13), (1, 5))  # the example's first, then other batch sizes and lengths
OTHER_FORM_MODELS = ("gpt2", "llama")  # also called with an attention mask, which their example has not


def _expected_grad(name: str, full: torch.Tensor, sites, *, tp: int, rank: int) -> torch.Tensor:
    """The part of the single-device gradient that this rank's parameter ``name`` holds."""
    for site in sites:
        dim = site.shard_dim if name == site.weight_name else 0 if name == site.bias_name else None
        if dim is not None:
            start, stop = shard_range(full.shape[dim], tp, rank)
            return full.narrow(dim, start, stop - start)
    return full


def _compare(gm, reference, inputs: dict, *, rank: int) -> tuple[dict[str, float], list[int]]:
    """One forward and backward of both; the differences, and the widths handed to each all-gather."""
    gathered: list[int] = []
    results = []
    for model in (reference, gm):
        model.zero_grad(set_to_none=True)
        remove = add_observer(lambda name, t: gathered.append(t.shape[-1]) if name == "all_gather" else None) \
            if model is gm else (lambda: None)
        out = model(**inputs)
        remove()
        out.loss.backward()
        results.append(out)
    ref, par = results
    diffs = {"logits": max_diff(par.logits, ref.logits), "loss": max_diff(par.loss, ref.loss)}
    full = dict(reference.named_parameters())
    sites = gm.tpfx_report.sites
    for name, parameter in gm.named_parameters():
        expected = _expected_grad(name, full[name].grad, sites, tp=2, rank=rank)
        diffs[f"grad {name}"] = max_diff(parameter.grad, expected)
    return diffs, gathered


def _one_model(name: str, rank: int) -> dict:
    reference = hf_models.build(name)
    gm = tpfx.parallelize(reference, example_inputs=hf_models.example_inputs(*SHAPES[0]))
    report = gm.tpfx_report
    shared = {p.data_ptr() for p in reference.parameters()} & {p.data_ptr() for p in gm.parameters()}
    result = {"tracer": report.tracer, "shared storages": len(shared), "n params": len(list(gm.parameters())),
              "sites": [(s.role, s.module_path, s.layout, s.shard_shape[s.shard_dim]) for s in report.sites],
              "table gathers": sum(row["collectives"].count("gather_from_tp") for row in report.sites_table()),
              "shapes": {}}
    for batch, seq in SHAPES:
        diffs, gathered = _compare(gm, reference, hf_models.example_inputs(batch, seq, seed=batch * seq),
                                   rank=rank)
        result["shapes"][(batch, seq)] = {"diffs": diffs, "gathered widths": gathered}
    if name in OTHER_FORM_MODELS:  # a padding mask: a call form the example did not have, exported on first use
        inputs = hf_models.example_inputs(3, 7, seed=11)
        mask = torch.ones_like(inputs["input_ids"])
        mask[0, -3:] = 0
        diffs, _ = _compare(gm, reference, inputs | {"attention_mask": mask}, rank=rank)
        result["other form"] = {"diffs": diffs, "forms": [form.describe() for form in gm.call_forms]}
    return result


def _world2(rank: int, world_size: int) -> dict:
    return {name: _one_model(name, rank) for name in hf_models.BUILDERS}


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(_world2, 2, timeout_s=600)


@pytest.mark.parametrize("name", list(hf_models.BUILDERS))
def test_logits_loss_and_every_gradient_match_single_device_at_several_shapes(world2, name):
    for rank, results in enumerate(world2):
        result = results[name]
        assert result["tracer"] == "export" and result["shared storages"] == 0
        for shape, checked in result["shapes"].items():
            diffs = checked["diffs"]
            assert len(diffs) == 2 + result["n params"]  # logits, loss and every parameter's gradient
            bad = {k: v for k, v in diffs.items() if not v <= TOL}
            assert not bad, f"{name} rank {rank} at (batch, seq)={shape}: {bad}"


@pytest.mark.parametrize("name", OTHER_FORM_MODELS)
def test_another_call_form_is_exported_on_first_use_and_matches_single_device(world2, name):
    for rank, results in enumerate(world2):
        other = results[name]["other form"]
        # the example's form (no mask), then the one exported on first use
        first, second = (set(form.partition("without ")[2].split(", ")) for form in other["forms"])
        assert first - second == {"attention_mask"}, other["forms"]
        bad = {k: v for k, v in other["diffs"].items() if not v <= TOL}
        assert len(other["diffs"]) == 2 + results[name]["n params"] and not bad, f"{name} rank {rank}: {bad}"


@pytest.mark.parametrize("name", list(hf_models.BUILDERS))
def test_all_gathers_in_a_real_run_are_what_the_sites_table_says(world2, name):
    result = world2[0][name]
    assert result["table gathers"] == len(result["sites"]) > 0
    local_widths = [shard for _, _, _, shard in result["sites"]]  # the sites are in graph order
    for shape, checked in result["shapes"].items():
        assert checked["gathered widths"] == local_widths, f"{name} at {shape}"


def test_each_model_is_sharded_where_its_structure_says(world2):
    roles = {name: [(role, path.rsplit(".", 1)[-1], layout) for role, path, layout, _ in world2[0][name]["sites"]]
             for name in hf_models.BUILDERS}
    assert roles["gpt2"] == [("qkv", "c_attn", "in_out"), ("fc1", "c_fc", "in_out")] * 2  # Conv1D: columns
    assert roles["llama"] == [("q", "q_proj", "out_in"), ("k", "k_proj", "out_in"), ("v", "v_proj", "out_in"),
                              ("fc1", "gate_proj", "out_in"), ("up", "up_proj", "out_in")] * 2
    assert roles["neox"] == [("qkv", "query_key_value", "out_in"), ("fc1", "dense_h_to_4h", "out_in")] * 2
    assert roles["opt"] == [("q", "q_proj", "out_in"), ("k", "k_proj", "out_in"), ("v", "v_proj", "out_in"),
                            ("fc1", "fc1", "out_in")] * 2
