"""Step time (forward + backward) on gloo, tp = world size: single device, tpfx, hand-written, DTensor.

Every rank builds the same single-device GPT (same seed), then one program per variant. The variants
run interleaved, round after round in a rotating order, with a barrier before each step, so that a
slow spell of the shared machine hits all of them alike; the parent takes, per step, the slower of
the ranks, and reports the median. Each rank also checks its variant's loss against the
single-device loss (a benchmark of a wrong program would be meaningless) and counts tpfx's
collective traffic during one step.
"""

from __future__ import annotations

import contextlib
import inspect
import statistics
import time
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn as nn

import tpfx
from benchmarks.communication import analytic_calls, analytic_ring_bytes, counting_traffic
from benchmarks.dtensor_baseline import dtensor_gpt
from benchmarks.handwritten import handwritten_gpt
from examples.gpt import GPTConfig, GPTModel
from tpfx.passes.comm_table import comm_table
from tpfx.launch import launch

MODES = ("gather", "megatron")


@dataclass(frozen=True)
class ModelSize:
    """One example-GPT shape and the batch it is timed with."""

    name: str
    n_layers: int
    n_heads: int
    d_model: int
    d_ff: int
    vocab_size: int
    batch: int
    seq: int
    rounds_factor: int = 1  # short steps are the noisiest: time this many times more rounds of them

    def config(self) -> GPTConfig:
        """The example GPT's config, dropout off (every variant then computes the same numbers)."""
        return GPTConfig(vocab_size=self.vocab_size, max_position_embeddings=self.seq, n_layers=self.n_layers,
                         n_heads=self.n_heads, d_model=self.d_model, d_ff=self.d_ff, dropout=0.0)


SMALL = ModelSize("small", n_layers=2, n_heads=4, d_model=128, d_ff=512, vocab_size=10000, batch=2, seq=16,
                  rounds_factor=4)
MEDIUM = ModelSize("medium", n_layers=4, n_heads=8, d_model=256, d_ff=1024, vocab_size=10000, batch=4, seq=64)
LARGE = ModelSize("large", n_layers=4, n_heads=8, d_model=512, d_ff=2048, vocab_size=10000, batch=4, seq=64)


@dataclass(frozen=True)
class StepSpec:
    """What to time: sizes, warm-up steps and timed rounds per variant."""

    sizes: tuple[ModelSize, ...]
    warmup: int
    rounds: int

    def __post_init__(self) -> None:
        if self.warmup < 1 or self.rounds < 1 or not self.sizes:
            raise ValueError(f"need sizes, warmup >= 1 and rounds >= 1, got {self}")


def tpfx_has_mode(mode: str) -> bool:
    """Whether this tpfx offers ``mode``: gather always; megatron once ``parallelize`` takes ``mode=``."""
    return mode == "gather" or "mode" in inspect.signature(tpfx.parallelize).parameters


def _tpfx_program(reference: nn.Module, mode: str) -> nn.Module:
    return tpfx.parallelize(reference, mode=mode) if mode != "gather" else tpfx.parallelize(reference)


def build_variants(reference: GPTModel) -> dict[str, nn.Module]:
    """Every program to time, by label (``"tpfx gather"``, ``"dtensor megatron"``, ...), single device first."""
    tpfx_gather = tpfx.parallelize(reference)
    site_paths = tuple(site.module_path for site in tpfx_gather.tpfx_report.sites)
    variants: dict[str, nn.Module] = {"single": reference}
    for mode in MODES:
        if tpfx_has_mode(mode):
            variants[f"tpfx {mode}"] = tpfx_gather if mode == "gather" else _tpfx_program(reference, mode)
        variants[f"handwritten {mode}"] = handwritten_gpt(reference, mode=mode)
        variants[f"dtensor {mode}"] = dtensor_gpt(reference, mode=mode, site_paths=site_paths)
    return variants


def training_step(model: nn.Module, input_ids: torch.Tensor) -> float:
    """One forward + backward with labels; returns the loss. A model that carries a ``step_context`` (DTensor's
    ``loss_parallel``) runs the whole step inside it."""
    model.zero_grad(set_to_none=True)
    with getattr(model, "step_context", contextlib.nullcontext)():
        _, loss = model(input_ids, labels=input_ids)
        loss.backward()
    return loss.item()


def _time_rounds(variants: dict[str, nn.Module], input_ids: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:  # rotate so no variant always follows the same one
            dist.barrier()
            start = time.perf_counter()
            training_step(variants[name], input_ids)
            times[name].append(time.perf_counter() - start)
    return times


def _traffic(variants: dict[str, nn.Module], input_ids: torch.Tensor, config: GPTConfig) -> dict[str, dict]:
    tp = dist.get_world_size()
    traffic = {}
    for name, model in variants.items():
        if not name.startswith("tpfx "):
            continue
        mode = name.removeprefix("tpfx ")
        with counting_traffic(tp) as counter:
            training_step(model, input_ids)
        table = comm_table(model, {"input_ids": input_ids, "labels": input_ids}, tp=tp)
        closed_form = analytic_ring_bytes(config, tokens=input_ids.numel(), tp=tp, mode=mode)
        traffic[name] = {"measured_bytes": float(counter.ring_bytes), "table_bytes": table.total(),
                         "closed_form_bytes": float(closed_form),
                         "equal": counter.ring_bytes == closed_form == Fraction(table.total()),
                         "calls": dict(counter.calls), "closed_form_calls": analytic_calls(config, mode=mode)}
    return traffic


def measure_size(size: ModelSize, spec: StepSpec) -> dict:
    """Inside a rank: build every variant of ``size``, check its loss, count traffic, time it."""
    torch.manual_seed(0)
    reference = GPTModel(size.config()).train()
    variants = build_variants(reference)
    input_ids = torch.randint(0, size.vocab_size, (size.batch, size.seq), generator=torch.Generator().manual_seed(1))
    losses = {name: training_step(model, input_ids) for name, model in variants.items()}
    loss_diff = {name: abs(loss - losses["single"]) for name, loss in losses.items()}
    traffic = _traffic(variants, input_ids, size.config())
    for _ in range(spec.warmup - 1):  # the loss check above was the first warm-up step
        for model in variants.values():
            training_step(model, input_ids)
    times = _time_rounds(variants, input_ids, spec.rounds * size.rounds_factor)
    return {"loss_diff": loss_diff, "traffic": traffic, "times": times}


def rank_worker(rank: int, world_size: int, spec: StepSpec) -> dict[str, dict]:
    """What each rank runs (via :func:`tpfx.launch.launch`): every size of ``spec``."""
    return {size.name: measure_size(size, spec) for size in spec.sizes}


def slowest_rank_medians_ms(per_rank: list[dict]) -> dict[str, float]:
    """Per variant, in ms: the median over timed steps of the slowest rank's time for that step."""
    return {name: 1e3 * statistics.median(max(step) for step in zip(*(r["times"][name] for r in per_rank)))
            for name in per_rank[0]["times"]}


def summarize(rank_results: list[dict[str, dict]], spec: StepSpec) -> dict:
    """Combine the ranks: per step the slowest rank, then the median; ratios to tpfx of the same mode."""
    summary = {}
    for size in spec.sizes:
        per_rank = [result[size.name] for result in rank_results]
        medians = slowest_rank_medians_ms(per_rank)
        summary[size.name] = {
            "size": asdict(size), "median_ms": medians, "ratio_to_tpfx": _ratios_to_tpfx(medians),
            "max_loss_diff": {name: max(r["loss_diff"][name] for r in per_rank) for name in medians},
            "traffic": per_rank[0]["traffic"],
            "not_yet": [f"tpfx {mode}" for mode in MODES if not tpfx_has_mode(mode)],
        }
    return summary


def _ratios_to_tpfx(medians: dict[str, float]) -> dict[str, float | None]:
    """variant time / tpfx time of the same mode (gather for single device); None where tpfx lacks the mode."""
    ratios = {}
    for name, value in medians.items():
        mode = name.rsplit(" ", 1)[-1] if name != "single" else "gather"
        baseline = medians.get(f"tpfx {mode}")
        ratios[name] = value / baseline if baseline else None
    return ratios


def run(spec: StepSpec, *, world_size: int = 2) -> dict:
    """Time ``spec`` on ``world_size`` gloo ranks (tp = world size) and summarize."""
    return summarize(launch(rank_worker, world_size, spec, timeout_s=1800), spec)


def _call_check_rank(rank: int, world_size: int, size: ModelSize, rounds: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    reference = GPTModel(size.config())
    program = tpfx.parallelize(reference)
    key = program.tpfx_report.group
    input_ids = torch.randint(0, size.vocab_size, (size.batch, size.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"call check on": [], "call check off": []}
    for round_index in range(rounds + 2):  # two warm-up rounds
        for label in (("call check on", "call check off") if round_index % 2 else ("call check off", "call check on")):
            program.check_calls_in(key if label.endswith("on") else None)
            dist.barrier()
            start = time.perf_counter()
            training_step(program, input_ids)
            if round_index >= 2:
                times[label].append(time.perf_counter() - start)
    return times


def call_check_cost(size: ModelSize = SMALL, *, rounds: int = 40, world_size: int = 2) -> dict[str, float]:
    """Median training-step ms of the tpfx gather program with and without its per-call input check.

    The check is one asynchronous all-gather of 48 bytes on the group's control group per call (see
    :func:`tpfx.collectives.start_call_check`); ``overhead`` is (on - off) / off.
    """
    per_rank = [{"times": times} for times in launch(_call_check_rank, world_size, size, rounds)]
    medians = slowest_rank_medians_ms(per_rank)
    return medians | {"overhead": medians["call check on"] / medians["call check off"] - 1}
