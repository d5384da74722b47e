"""torch.compile(program, fullgraph=True) on tpfx programs: no graph break, the collectives in the graph, parity.

One spawn of world 2 compiles, with ``backend="aot_eager"`` and ``fullgraph=True``, the megatron
programs of the example GPT (torch.fx), of a Hugging Face LLaMA (torch.export) and of a nanoGPT-style
model captured on its first call, each called in two call forms (the first traced when called, before
dynamo traces the frame; the second on its first call), the GPT with sequence parallelism, and every
model of tests/models.py (megatron; the first in gather mode too). Logits, loss and every gradient
are compared with the single-device model, and dynamo's graphs are read: one graph per form, holding
the tensor-parallel collectives. A second spawn checks one program under Inductor on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import tpfx
from examples.gpt import GPTConfig, GPTModel
from tests.multiprocess import run_ranks
from tests.parity import grad_diffs, max_diff

TOL = 1e-5


def _gpt() -> nn.Module:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=64, max_position_embeddings=16, n_layers=2, n_heads=4, d_model=32, d_ff=64,
                              dropout=0.0))


def _gpt_calls() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": ids, "labels": ids}, {"input_ids": ids[:, :5]}]


def _llama() -> nn.Module:
    from examples import hf_models
    return hf_models.build("llama")


def _llama_calls() -> list[dict[str, torch.Tensor]]:
    from examples import hf_models
    inputs = hf_models.example_inputs(3, 7, seed=5)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, -2:] = 0
    return [inputs | {"attention_mask": mask}, hf_models.example_inputs(2, 6, seed=6)]


def _loss(out: object) -> torch.Tensor:
    """The model's own loss when it computed one, else a loss on its logits (or its output)."""
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 else out.float().square().mean()
    logits, loss = (out.logits, out.loss) if hasattr(out, "logits") else out
    return loss if loss is not None else logits.float().square().mean()


def _logits(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


class _GraphRecorder:
    """``backend="aot_eager"`` that also keeps the call targets of every graph dynamo hands it."""

    def __init__(self) -> None:
        self.graphs: list[list[str]] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append([str(node.target) for node in graph.graph.nodes if node.op == "call_function"])
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(graph, example_inputs)


def _compiled_parity(reference: nn.Module, calls: list[dict], *, mode: str, tracer: str, example: dict | None,
                     backend: object, sequence_parallel: bool = False) -> dict:
    """Compile the program of ``reference``; for each call: differences of logits, loss and gradients."""
    gm = tpfx.parallelize(reference, mode=mode, tracer=tracer, example_inputs=example,
                          sequence_parallel=sequence_parallel)
    compiled = torch.compile(gm, fullgraph=True, backend=backend)
    diffs = {}
    for index, call in enumerate(calls):
        outputs = []
        for model in (reference, compiled):
            model.zero_grad(set_to_none=True)
            out = model(**call)
            _loss(out).backward()
            outputs.append(out)
        ref, par = outputs
        diffs[f"call {index} logits"] = max_diff(_logits(par), _logits(ref))
        diffs[f"call {index} loss"] = max_diff(_loss(par), _loss(ref))
        diffs |= {f"call {index} grad {name}": d for name, d in grad_diffs(gm, reference).items()}
    return {"diffs": diffs, "distinct calls": len({tuple(sorted(call)) for call in calls})}


def _test_model_cases() -> dict[str, tuple[Callable[[], nn.Module], list[dict]]]:
    """Every model of tests/models.py with one call: (a factory, the calls)."""
    from tests import models
    x = torch.randn(2, 8, models.WIDTH, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, models.VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    return {
        "FusedLastDim": (models.FusedLastDim, [{"x": x}]),
        "Interleaved": (models.Interleaved, [{"x": x}]),
        "Grouped kv=2": (lambda: models.Grouped(kv_heads=2), [{"x": x}]),
        "DropoutInside (eval)": (lambda: models.DropoutInside().eval(), [{"x": x}]),
        "HeadMixing": (models.HeadMixing, [{"x": x}]),
        "ReluFFN": (models.ReluFFN, [{"x": x[..., :16]}]),
        "FlatTokens": (models.FlatTokens, [{"x": x}]),
        "TokenMixing": (models.TokenMixing, [{"x": x}]),
        "GroupsFromShapes": (models.GroupsFromShapes, [{"x": x}]),
        "ShortcutWithoutScale": (models.ShortcutWithoutScale, [{"x": x, "scale": torch.tensor(0.5)}]),
        "CachingLM": (models.CachingLM, [{"ids": ids, "use_cache": False}]),
        "GroupedLM": (models.GroupedLM, [{"ids": ids, "labels": ids}]),
        "LlamaStyle (first call)": (lambda: models.LlamaStyle(n_layer=1), [{"tokens": ids}]),
    }


def _aot_eager_worker(rank: int, world_size: int) -> dict:
    # no torch._dynamo.reset() between programs: each has a cache and recompile limit of its own, and
    # the 18 programs compiled here would pass dynamo's limit of 8 if they shared one
    results = {}
    # fx and export captures, and a program captured on its first call, each called in two forms:
    # the first is traced when called (before dynamo traces the frame), the second on its first call
    cases = [("gpt", _gpt, _gpt_calls, "fx", None), ("nanogpt-style, first call", _nano, _nano_calls, "auto", None)]
    try:
        from examples import hf_models  # needs transformers
        cases.append(("llama", _llama, _llama_calls, "export", hf_models.example_inputs(2, 8)))
    except ImportError:
        pass
    for name, make, calls, tracer, example in cases:  # megatron mode: its rewrite is the larger
        results[(name, "megatron")] = _recorded(make(), calls(), mode="megatron", tracer=tracer, example=example)
    # sequence parallelism's collectives
    results[("gpt", "megatron, sequence parallel")] = _recorded(_gpt(), _gpt_calls()[:1], mode="megatron",
                                                                 tracer="fx", example=None, sequence_parallel=True)
    # every test model, in megatron mode, and the first in gather mode too (its collectives are a subset)
    for index, (name, (make, calls)) in enumerate(_test_model_cases().items()):
        for mode in ("megatron", "gather") if index == 0 else ("megatron",):
            torch.manual_seed(0)  # the same weights on both ranks
            results[(name, mode)] = _recorded(make(), calls, mode=mode, tracer="auto", example=None)
    return results


def _recorded(model: nn.Module, calls: list[dict], **options: object) -> dict:
    recorder = _GraphRecorder()
    result = _compiled_parity(model, calls, backend=recorder, **options)
    result["graphs"] = recorder.graphs
    return result


def _nano() -> nn.Module:
    from tests.models import NanoGPTStyle
    torch.manual_seed(0)
    return NanoGPTStyle()


def _nano_calls() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    return [{"idx": ids, "targets": ids}, {"idx": ids[:, :6]}]


def test_fullgraph_compile_of_every_mode_and_tracer_matches_one_device():
    results = run_ranks(_aot_eager_worker, 2, timeout_s=900)
    for rank, per_case in enumerate(results):
        for case, result in per_case.items():
            worst = max(result["diffs"].items(), key=lambda item: item[1])
            assert worst[1] <= TOL, f"rank {rank} {case}: {worst}"
            # one graph per call form: nothing broke the frame, and each graph holds the collectives
            assert len(result["graphs"]) == result["distinct calls"], f"rank {rank} {case}: {len(result['graphs'])} graphs"
            for targets in result["graphs"]:
                assert "autograd_function_apply" in targets, f"rank {rank} {case}: no collective in {targets}"


def _inductor_worker(rank: int, world_size: int) -> dict:
    import torch._inductor.config
    torch._inductor.config.compile_threads = 1  # the ranks share the machine's cores
    torch.manual_seed(0)  # the same weights on both ranks
    model = GPTModel(GPTConfig(vocab_size=64, max_position_embeddings=16, n_layers=1, n_heads=4, d_model=32,
                               d_ff=64, dropout=0.0))
    return _compiled_parity(model, _gpt_calls()[:1], mode="megatron", tracer="fx", example=None,
                            backend="inductor")["diffs"]


def test_inductor_compile_of_a_megatron_program_matches_one_device():
    pytest.importorskip("torch._inductor")
    for rank, diffs in enumerate(run_ranks(_inductor_worker, 2, timeout_s=900)):
        worst = max(diffs.items(), key=lambda item: item[1])
        assert worst[1] <= TOL, f"rank {rank}: {worst}"
