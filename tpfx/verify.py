"""``tpfx verify``: run a TARGET tensor-parallel in local gloo processes and compare it with one device.

Every rank builds the model from the factory (then takes rank 0's weights, so a factory that is not
seeded still gives one model), parallelizes it, runs forward and backward on the same seeded random
inputs as the single-device model, and measures the largest differences of the outputs, the loss
and every gradient (a shard against the matching part of the full gradient). The parent merges the
ranks' figures into one row per tensor group.

Relative error is norm-wise: max |tp - single| / max |single| over the group, so that values near
zero do not blow it up. A group passes when ``max_abs <= atol + rtol * max |single|``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from tpfx.arguments import require_choice, require_count
from tpfx.checkpoint import parameter_shard_specs
from tpfx.errors import ConfigError, ShardingError
from tpfx.launch import launch
from tpfx.targets import load_target, parallelize_target


FORMS = ("declared", "all")


@dataclass(frozen=True)
class VerifyOptions:
    """What ``verify`` runs and how strictly it judges (fp32 defaults)."""

    tp: int = 2
    batch: int | None = None
    seq: int | None = None
    seed: int = 0
    atol: float = 1e-5
    rtol: float = 1e-4
    timeout_s: float = 300
    parallelize_options: dict[str, Any] = field(default_factory=dict)  # e.g. mode= where parallelize has it
    forms: str = "declared"  # "declared": every call the factory declares; "all": also each optional argument

    def __post_init__(self) -> None:
        where = "tpfx.verify.VerifyOptions"
        require_count(self.tp, "tp", where)
        require_count(self.batch, "batch", where, optional=True)
        require_count(self.seq, "seq", where, optional=True)
        require_count(self.seed, "seed", where, minimum=0)
        require_choice(self.forms, "forms", where, FORMS, kind="a choice of call forms")
        if self.atol < 0 or self.rtol < 0:
            raise ConfigError(f"tolerances must be >= 0, got atol={self.atol} rtol={self.rtol}")
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout {self.timeout_s} must be positive (seconds)")


@dataclass(frozen=True)
class ErrorRow:
    """The largest error of one tensor group over every rank."""

    group: str
    tensors: int
    max_abs: float
    max_rel: float
    passed: bool


@dataclass(frozen=True)
class VerifyResult:
    """The table ``tpfx verify`` prints; ``passed`` when every group is within tolerance."""

    target: str
    options: VerifyOptions
    inputs: str
    rows: tuple[ErrorRow, ...]
    refused: tuple[tuple[str, str], ...] = ()  # (call form, tpfx's one-line reason): forms the program refuses

    @property
    def passed(self) -> bool:
        """Whether every group is within tolerance and the program ran every call form."""
        return all(row.passed for row in self.rows) and not self.refused


def verify(spec: str, options: VerifyOptions) -> VerifyResult:
    """Compare the tensor-parallel program of ``spec`` with the single-device model in real processes.

    Args:
        spec: TARGET, ``path/to/file.py:factory`` or ``package.module:factory``.
        options: degree, sizes, seed, tolerances, timeout and parallelize options.

    Returns:
        One row per tensor group (outputs, loss, gradients by module kind) and the verdict.

    Raises:
        TargetError, CaptureError, ShardingError, ConfigError: found in this process before any rank
            starts.
        RankFailure: a rank raised; LaunchTimeout: the ranks did not finish within the timeout.
    """
    target = load_target(spec)  # bad input is reported here, before processes start
    parallelize_target(target, tp=options.tp, rank=0, batch=options.batch, seq=options.seq,
                       options=options.parallelize_options)
    per_rank = launch(_verify_rank, options.tp, spec, options, timeout_s=options.timeout_s)
    merged: dict[str, list[float]] = {}
    refused = dict(per_rank[0]["refused"])  # the same on every rank: the passes decide alike
    for result in per_rank:
        for group, (count, max_abs, scale) in result["figures"].items():
            previous = merged.setdefault(group, [0, 0.0, 0.0])
            merged[group] = [previous[0] + count, max(previous[1], max_abs), max(previous[2], scale)]
    rows = tuple(ErrorRow(group, int(count), max_abs, _relative(max_abs, scale),
                          max_abs <= options.atol + options.rtol * scale)
                 for group, (count, max_abs, scale) in merged.items())
    return VerifyResult(spec, options, target.describe_inputs(batch=options.batch, seq=options.seq), rows,
                        tuple(refused.items()))


def _relative(max_abs: float, scale: float) -> float:
    if scale > 0:
        return max_abs / scale
    return float("inf") if max_abs > 0 else 0.0


def _verify_rank(rank: int, world_size: int, spec: str, options: VerifyOptions) -> dict[str, Any]:
    """One rank: ``figures``: group -> (tensor count, max |tp - single|, max |single|); ``refused``: call
    form -> the one-line error of a form the program refuses (tpfx's own error, before any collective)."""
    torch.manual_seed(options.seed)
    target = load_target(spec)
    reference = target.model
    for tensor in [*reference.parameters(), *reference.buffers()]:
        dist.broadcast(tensor.data, src=0)  # every rank holds rank 0's model, seeded factory or not
    program = parallelize_target(target, tp=world_size, batch=options.batch, seq=options.seq,
                                 options=options.parallelize_options)
    calls = target.calls(batch=options.batch, seq=options.seq, seed=options.seed, every_form=options.forms == "all")
    figures: dict[str, list[float]] = {}
    refused: dict[str, str] = {}
    for label, inputs in calls:  # every call form runs a graph of its own: check each
        prefix = f"[{label}] " if len(calls) > 1 else ""
        try:
            _compare_call(figures, prefix, reference, program, inputs, options.seed)
        except (ShardingError, ConfigError) as error:  # the form's program is refused: a failure of that form
            refused[label] = str(error)
    return {"figures": {group: tuple(values) for group, values in figures.items()}, "refused": refused}


def _compare_call(figures: dict[str, list[float]], prefix: str, reference: nn.Module, program: nn.Module,
                  inputs: dict[str, object], seed: int) -> None:
    """Forward and backward of one call in both models; the outputs' and gradients' errors into ``figures``."""
    single_outputs, parallel_outputs = (_forward_backward(model, inputs, seed) for model in (reference, program))
    for name, single in single_outputs.items():
        _accumulate(figures, prefix + name, parallel_outputs.get(name), single)
    sites = {site.module_path: site.role for site in program.tpfx_report.sites}
    full = dict(reference.named_parameters())
    specs = parameter_shard_specs(program)
    for name, parameter in program.named_parameters():
        owner_path = name.rpartition(".")[0]
        owner = program.get_submodule(owner_path)
        expected = full[name].grad
        if name in specs and expected is not None:
            expected = specs[name].take(expected)  # this rank's part of the full gradient
        group = (f"grad sharded {sites.get(owner_path, type(owner).__name__)}" if owner_path in sites
                 else f"grad {type(owner).__name__}")
        _accumulate(figures, prefix + group, parameter.grad, expected)


def _forward_backward(model: nn.Module, inputs: dict[str, object], seed: int) -> dict[str, torch.Tensor]:
    """Outputs by name (``logits``, ``loss``, ``output[i]``) after backward of the loss."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both models
    produced = model(**inputs)
    flat = [produced] if isinstance(produced, torch.Tensor) else [
        t for t in (produced.values() if isinstance(produced, dict) else produced) if isinstance(t, torch.Tensor)]
    named: dict[str, torch.Tensor] = {}
    for index, tensor in enumerate(flat):
        if tensor.dim() == 0 and tensor.is_floating_point() and "loss" not in named:
            named["loss"] = tensor
        elif tensor.dim() > 0 and "logits" not in named:
            named["logits"] = tensor
        else:
            named[f"output[{index}]"] = tensor
    loss = named.get("loss")
    if loss is None:  # no loss returned for these inputs: a probe that every floating output reaches
        loss = sum(t.float().square().mean() for t in flat if t.is_floating_point())
        named["loss (mean square of outputs)"] = loss
    loss.backward()
    return named


def _accumulate(figures: dict[str, list[float]], group: str, got: torch.Tensor | None,
                expected: torch.Tensor | None) -> None:
    count, max_abs, scale = figures.get(group, [0, 0.0, 0.0])
    if got is None or expected is None or got.shape != expected.shape:
        # a missing gradient on one side, or a shard that does not match: an infinite error
        difference = 0.0 if got is None and expected is None else float("inf")
        magnitude = 0.0
    else:
        difference = (got.detach().double() - expected.detach().double()).abs().max().item() if got.numel() else 0.0
        magnitude = expected.detach().double().abs().max().item() if expected.numel() else 0.0
    figures[group] = [count + 1, max(max_abs, difference), max(scale, magnitude)]
