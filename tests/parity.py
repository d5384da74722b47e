"""Comparisons of a tensor-parallel program with the single-device model (used inside ranks)."""

from __future__ import annotations

import torch
import torch.nn as nn

from tpfx.checkpoint import parameter_shard_specs


def max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Largest absolute difference; inf when only one side exists or the shapes differ."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.shape != b.shape:
        return float("inf")
    return (a.detach().float() - b.detach().float()).abs().max().item()


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


def square_mean_step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and backward of ``model(x)`` with the loss ``mean(out ** 2)``: (output, loss)."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = out.pow(2).mean()
    loss.backward()
    return out, loss
