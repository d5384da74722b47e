"""Comparisons of a tensor-parallel program with the single-device model (used inside ranks)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

import tpfx
from tpfx.checkpoint import parameter_shard_specs
from tpfx.collectives import add_observer


def max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Largest absolute difference; inf when only one side exists or the shapes differ."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    return (a.detach().float() - b.detach().float()).abs().max().item()


def assert_close(diffs: dict[str, float], label: str, tol: float = 1e-5) -> None:
    """Assert that every difference (tensor name -> max |difference|) is at most ``tol``, naming those that are not."""
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    assert not bad, f"{label}: {len(bad)} tensors differ by more than {tol}: {bad}"


def grad_diffs(program: nn.Module, reference: nn.Module) -> dict[str, float]:
    """For every parameter of ``program``: max |grad - matching part of the single-device grad|."""
    full = dict(reference.named_parameters())
    specs = parameter_shard_specs(program)
    diffs = {}
    for name, parameter in program.named_parameters():
        expected = full[name].grad
        if name in specs and expected is not None:
            expected = specs[name].take(expected)
        diffs[name] = max_diff(parameter.grad, expected)
    return diffs


def observed_collectives(gm: nn.Module, kwargs: dict) -> list[tuple[str, str, int]]:
    """(phase, collective op, bytes handed to it) of every collective of one ``gm(**kwargs)`` (returning
    ``(logits, loss)``) and the loss's backward, in the order they ran."""
    seen: list[tuple[str, str, int]] = []
    phase = ["forward"]
    remove = add_observer(lambda name, t: seen.append((phase[0], name, t.numel() * t.element_size())))
    try:
        _, loss = gm(**kwargs)
        phase[0] = "backward"
        loss.backward()
    finally:
        remove()
    return seen


def square_mean_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and backward of ``model(x)`` with the loss ``mean(out ** 2)``: (output, loss)."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = out.pow(2).mean()
    loss.backward()
    return out, loss


def check_plan_report_and_program_agree(model: nn.Module, gm: nn.Module) -> None:
    """Assert that the plan, the report's shard shapes and the parameters ``gm`` holds agree with ``model``'s."""
    plan, full = gm.tpfx_plan, dict(model.named_parameters(remove_duplicate=False))
    held = dict(gm.named_parameters(remove_duplicate=False))
    assert set(plan.parameters) == set(held) == set(full)
    for name, entry in plan.parameters.items():
        part = full[name].detach() if entry.spec is None else entry.spec.take(full[name].detach())
        assert tuple(part.shape) == entry.local_shape == tuple(held[name].shape), name
        assert torch.equal(part, held[name]), name
    table = gm.tpfx_report.sites_table()
    assert table
    for row in table:
        weight = f"{row['module']}.weight" if f"{row['module']}.weight" in held else row["module"]  # a root's own
        assert row["shard"] == list(held[weight].shape), row


def check_programs_of_every_mode_and_tp(make: Callable[[], nn.Module]) -> None:
    """:func:`check_plan_report_and_program_agree` for the last rank's fx program in both modes at tp=2 and 4."""
    for mode in ("gather", "megatron"):
        for tp in (2, 4):
            torch.manual_seed(0)
            model = make()
            check_plan_report_and_program_agree(model, tpfx.parallelize(model, tp=tp, rank=tp - 1, mode=mode,
                                                                        tracer="fx"))
