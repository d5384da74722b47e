"""Runtime modules that hold one rank's shard of a layer.

The collectives around them are separate graph nodes (see :mod:`tpfx.collectives`), so that
``gm.code`` shows every communication and a module's forward is purely local.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def shard_range(size: int, tp: int, rank: int) -> tuple[int, int]:
    """The ``[start, stop)`` range of rank ``rank`` when ``size`` is split evenly in ``tp`` parts."""
    step = size // tp
    return rank * step, (rank + 1) * step


class ColumnParallelLinear(nn.Module):
    """This rank's rows of a Linear's weight (out_features / tp of them) and the matching bias.

    ``forward(x)`` returns this rank's slice of the output columns; the graph gathers them.
    """

    def __init__(self, linear: nn.Linear, *, tp: int, rank: int) -> None:
        super().__init__()
        start, stop = shard_range(linear.out_features, tp, rank)
        self.in_features = linear.in_features
        self.full_out_features = linear.out_features
        self.out_features = stop - start
        self.tp, self.rank = tp, rank
        # clone so the shard owns compact storage and the caller's tensor is never aliased
        self.weight = nn.Parameter(linear.weight.detach()[start:stop].clone(),
                                   requires_grad=linear.weight.requires_grad)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach()[start:stop].clone(), requires_grad=linear.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def local_part(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full-size weight or bias (or of its gradient): the same rows."""
        start, stop = shard_range(self.full_out_features, self.tp, self.rank)
        return full[start:stop]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(rows {shard_range(self.full_out_features, self.tp, self.rank)} of {self.full_out_features}), "
                f"bias={self.bias is not None}")
