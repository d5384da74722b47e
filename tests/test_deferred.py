"""Models torch.fx cannot trace, parallelized without example inputs: captured from their first call.

``NanoGPTStyle`` and ``LlamaStyle`` (tests/models.py) assert on a size, iterate over a shape and
build a tensor from a traced size. ``tpfx.parallelize(model, tp=2)`` checks the options and the group
at once and returns a program that captures itself with torch.export on its first call (or
``prepare``). One spawn of world 2 runs both models in both modes against the single-device model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tpfx
from examples.gpt import GPTModel, small_config
from tests.models import VOCAB, LlamaStyle, NanoGPTStyle
from tests.multiprocess import run_ranks
from tests.parity import check_plan_report_and_program_agree, grad_diffs, max_diff
from tpfx.deferred import DeferredProgram
from tpfx.errors import ConfigError
from tpfx.export_capture import ExportedTensorParallelModule

TOL = 1e-5
MODELS = {"nanogpt": NanoGPTStyle, "llama": LlamaStyle}  # the spawn builds them with one layer


def _ids(batch: int = 2, seq: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_parallelize_without_inputs_defers_capture_and_says_so_until_the_first_call():
    torch.manual_seed(0)
    model = NanoGPTStyle(n_layer=1)
    gm = tpfx.parallelize(model, tp=2, rank=0)
    assert isinstance(gm, DeferredProgram) and gm.call_forms == () and "no call form built yet" in repr(gm.call_forms)
    for read in (lambda: gm.tpfx_report, lambda: gm.graph, lambda: list(gm.parameters()), lambda: gm.state_dict(),
                 lambda: tpfx.load_state_dict(gm, model.state_dict()), lambda: gm.to(torch.float64)):
        with pytest.raises(ConfigError, match=r"needs the captured program, and this NanoGPTStyle program is captured "
                                              r"on its first call because torch.fx could not trace it \(.*TraceError"
                                              r".*\); call gm\(...\) or gm.prepare\(") as error:
            read()
        assert "\n" not in str(error.value)
    assert gm.prepare(_ids(), targets=_ids()) is gm  # the same object, now the program
    assert isinstance(gm, ExportedTensorParallelModule) and gm.prepare(_ids()) is gm  # prepared: nothing to do
    note = gm.tpfx_report.tracer_note
    assert note.startswith("torch.fx could not trace NanoGPTStyle (the top-level forward failed: TraceError: ")
    assert "so it was captured with torch.export from its first call (or gm.prepare). Dims left dynamic: " \
           "idx.shape[0], idx.shape[1], targets.shape[0], targets.shape[1]." in note
    assert repr(gm.call_forms) == "1 call form built: train, all arguments (the program's own graph)"
    check_plan_report_and_program_agree(model, gm)


def test_errors_that_need_no_inputs_still_come_at_parallelize():
    model = NanoGPTStyle()
    cases = {
        "no process group": (dict(tp=2), "no torch.distributed process group is initialized"),
        "rank outside tp": (dict(tp=2, rank=2), "rank=2 is outside the tensor-parallel group of size tp=2"),
        "bad mode": (dict(tp=2, rank=0, mode="ring"), "mode='ring' is not a parallelization mode"),
        "bad tracer": (dict(tp=2, rank=0, tracer="jit"), "tracer='jit' is not a tracer"),
    }
    for label, (options, expected) in cases.items():
        with pytest.raises(ConfigError, match=expected):
            tpfx.parallelize(model, **options)


def test_a_meta_built_model_is_captured_in_the_mode_of_its_first_call_and_loads_a_checkpoint():
    torch.manual_seed(0)
    reference = LlamaStyle(n_layer=1)
    with tpfx.parameters_on_meta():
        model = LlamaStyle(n_layer=1)
    model.layers[0].feed_forward.eval()  # a submodule in another mode than the model: kept exactly
    gm = tpfx.parallelize(model, tp=2, rank=1, mode="megatron")
    seen = []
    gm.register_forward_pre_hook(lambda module, args: seen.append(type(module)))  # moves onto the program
    gm.zero_grad()  # a training loop may do this first: nothing to zero yet
    gm.eval()
    assert gm.prepare(_ids(3, 5)) is gm and not gm.training and gm.call_forms[0].training is False
    assert [m for m in model.modules() if not m.training] == list(model.layers[0].feed_forward.modules())
    tpfx.load_state_dict(gm, reference.state_dict())  # each rank reads its part, as after an eager capture
    check_plan_report_and_program_agree(reference, gm)
    assert gm.tpfx_report.mode == "megatron" and len(gm.tpfx_report.pairs) == 2
    with pytest.raises(ConfigError, match="this program was built for inspection"):
        gm(_ids())  # an inspection program cannot run its collectives, but the hook ran first
    assert seen == [type(gm)]


def test_a_model_fx_traces_is_still_captured_at_parallelize():
    torch.manual_seed(0)
    gm = tpfx.parallelize(GPTModel(small_config(n_layers=1)), tp=2, rank=0)  # fx traces it: nothing deferred
    assert isinstance(gm, tpfx.TensorParallelModule) and gm.tpfx_report.tracer == "fx" and gm.graph is not None


# ---------------------------------------------------------------- parity in real processes


def _step(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(ids, targets) if targets is not None else model(ids)
    logits, loss = out if isinstance(out, tuple) else (out, None)  # nanoGPT: (logits, loss or None)
    loss = loss if loss is not None else logits.pow(2).mean()
    loss.backward()
    return logits, loss


def _parity_worker(rank: int, world_size: int) -> dict:
    results = {}
    for name, make in MODELS.items():
        for mode in ("gather", "megatron"):
            torch.manual_seed(0)
            reference = make(n_layer=1)
            gm = tpfx.parallelize(reference, tp=2, mode=mode)  # no example inputs
            deferred = isinstance(gm, DeferredProgram)
            diffs = {}
            # the first call captures; the same graph serves other batch sizes and lengths
            calls = [(_ids(2, 8, 1), _ids(2, 8, 2)), (_ids(3, 13, 3), _ids(3, 13, 4)), (_ids(1, 5, 5), _ids(1, 5, 6))]
            for index, (ids, targets) in enumerate(calls):
                targets = targets if name == "nanogpt" else None
                ref_logits, ref_loss = _step(reference, ids, targets)
                logits, loss = _step(gm, ids, targets)
                grads = grad_diffs(gm, reference)
                diffs[index] = {"logits": max_diff(logits, ref_logits), "loss": max_diff(loss, ref_loss),
                                "grads": max(grads.values()), "n grads": len(grads)}
            results[(name, mode)] = {"deferred": deferred, "tracer": gm.tpfx_report.tracer, "diffs": diffs,
                                     "sharded": len(tpfx.parameter_shard_specs(gm))}
    return results


def test_nanogpt_and_llama_style_models_match_one_device_at_tp2_without_example_inputs():
    ranks = run_ranks(_parity_worker, 2)
    for rank, results in enumerate(ranks):
        assert set(results) == {(name, mode) for name in MODELS for mode in ("gather", "megatron")}
        for key, result in results.items():
            assert result["deferred"] and result["tracer"] == "export", (rank, key)
            assert result["sharded"] >= 3, (rank, key)  # q/k/v or qkv, and fc1
            for index, diffs in result["diffs"].items():
                assert diffs["n grads"] >= 8, (rank, key, index)
                for what in ("logits", "loss", "grads"):
                    assert diffs[what] <= TOL, (rank, key, index, what, diffs[what])
