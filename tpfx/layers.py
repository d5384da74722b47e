"""Runtime modules that hold one rank's shard of a layer.

The collectives around them are separate graph nodes (see :mod:`tpfx.collectives`), so that
``gm.code`` shows every communication and a module's forward is purely local.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn as nn
import torch.nn.functional as F

from tpfx.arguments import require_count
from tpfx.errors import ConfigError


class Placement(Enum):
    """Where a parameter's rank-local part lies: split with a column- or a row-parallel linear, split by
    vocabulary rows (an embedding table), or whole."""

    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"  # an embedding table's rows: each rank holds its 1/tp of the vocabulary
    REPLICATED = "replicated"


def shard_range(size: int, tp: int, rank: int) -> tuple[int, int]:
    """The ``[start, stop)`` range of rank ``rank`` when ``size`` is split evenly in ``tp`` parts."""
    step = size // tp
    return rank * step, (rank + 1) * step


@dataclass(frozen=True)
class ShardSpec:
    """Where a rank's local parameter lies in the full (single-device) tensor.

    The contract every sharded layer keeps, so that checkpoints work for any layer: the layer's
    ``shard_spec(param_name)`` returns this record for a sharded parameter and None for a replicated
    one. The local tensor is ``full[ranges[0]]``, ``full[ranges[1]]``, ... concatenated along ``dim``:
    one range for a contiguous shard, several when a rank holds separate blocks (for example whole
    heads of q, k and v out of a fused QKV weight).
    """

    dim: int
    full_size: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if self.dim < 0 or not self.ranges:
            raise ValueError(f"shard spec needs a non-negative dim and at least one range, got {self}")
        for start, stop in self.ranges:
            if not 0 <= start < stop <= self.full_size:
                raise ValueError(f"shard range [{start}, {stop}) is outside 0..{self.full_size}")

    @classmethod
    def contiguous(cls, dim: int, start: int, stop: int, full_size: int) -> ShardSpec:
        """The spec of one contiguous block ``[start, stop)`` along ``dim``."""
        return cls(dim, full_size, ((start, stop),))

    @property
    def local_size(self) -> int:
        """The length of the local tensor along ``dim``."""
        return sum(stop - start for start, stop in self.ranges)

    def pieces(self) -> Iterator[tuple[int, int, int]]:
        """``(local_start, full_start, length)`` of each block, in local order."""
        local = 0
        for start, stop in self.ranges:
            yield local, start, stop - start
            local += stop - start

    def full_shape(self, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The full tensor's shape, given the local tensor's shape."""
        return local_shape[:self.dim] + (self.full_size,) + local_shape[self.dim + 1:]

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full-size tensor (a view when there is one range)."""
        parts = [full.narrow(self.dim, start, length) for _, start, length in self.pieces()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


class ColumnParallelLinear(nn.Module):
    """This rank's rows of a Linear's weight (out_features / tp of them) and the matching bias.

    ``forward(x)`` returns this rank's slice of the output columns; the graph gathers them.
    """

    def __init__(self, linear: nn.Linear, *, tp: int, rank: int) -> None:
        super().__init__()
        where = "tpfx.ColumnParallelLinear"
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{where}: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        require_count(tp, "tp", where)
        if require_count(rank, "rank", where, minimum=0) >= tp:
            raise ConfigError(f"{where}: rank={rank} is outside 0..{tp - 1} (tp={tp})")
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


    def shard_spec(self, param_name: str) -> ShardSpec | None:
        """How ``weight`` or ``bias`` maps to the full Linear's tensor: the same rows of dim 0 for both."""
        if param_name not in ("weight", "bias"):
            raise KeyError(f"ColumnParallelLinear has no parameter {param_name!r}")
        return ShardSpec.contiguous(0, *shard_range(self.full_out_features, self.tp, self.rank),
                                    self.full_out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(rows {shard_range(self.full_out_features, self.tp, self.rank)} of {self.full_out_features}), "
                f"bias={self.bias is not None}")


def _owned_part(full: nn.Parameter, spec: ShardSpec | None) -> nn.Parameter:
    """This rank's part of ``full`` (all of it when ``spec`` is None) in storage of its own, never aliased."""
    part = full.detach() if spec is None else spec.take(full.detach())
    return nn.Parameter(part.clone(), requires_grad=full.requires_grad)


class BlockColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel with this rank's rows in several blocks: whole heads of q, k and v of a fused QKV.

    A fused ``[3, H, Dh]`` (or ``[Q | K | V]``) weight keeps the heads of q, k and v apart, so a rank's
    heads are three separate row ranges, not one; ``spec`` (along dim 0) lists them.
    """

    def __init__(self, linear: nn.Linear, *, spec: ShardSpec, tp: int, rank: int) -> None:
        nn.Module.__init__(self)
        if spec.dim != 0 or spec.full_size != linear.out_features:
            raise ValueError(f"row blocks {spec} do not fit a Linear with out_features={linear.out_features}")
        self.in_features = linear.in_features
        self.full_out_features = linear.out_features
        self.out_features = spec.local_size
        self.tp, self.rank, self.spec = tp, rank, spec
        self.weight = _owned_part(linear.weight, spec)
        self.bias = None if linear.bias is None else _owned_part(linear.bias, spec)


    def shard_spec(self, param_name: str) -> ShardSpec | None:
        """``weight`` and ``bias`` both hold the row blocks of ``spec`` (dim 0)."""
        if param_name not in ("weight", "bias"):
            raise KeyError(f"BlockColumnParallelLinear has no parameter {param_name!r}")
        return self.spec

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(rows {list(self.spec.ranges)} of {self.full_out_features}), bias={self.bias is not None}")


class RowParallelLinear(nn.Module):
    """This rank's columns of a Linear's weight (in_features / tp of them); the bias stays whole.

    ``forward(x)`` takes this rank's slice of the input features and returns a partial sum without
    the bias; the graph all-reduces it (``reduce_from_tp``) and then adds ``bias`` once.
    """

    def __init__(self, linear: nn.Linear, *, spec: ShardSpec, tp: int, rank: int) -> None:
        super().__init__()
        if spec.dim != 1 or spec.full_size != linear.in_features:
            raise ValueError(f"column blocks {spec} do not fit a Linear with in_features={linear.in_features}")
        self.in_features = spec.local_size
        self.full_in_features = linear.in_features
        self.out_features = linear.out_features
        self.tp, self.rank, self.spec = tp, rank, spec
        self.weight = _owned_part(linear.weight, spec)
        # whole on every rank and added after the reduce, so it is counted once
        self.bias = None if linear.bias is None else _owned_part(linear.bias, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


    def shard_spec(self, param_name: str) -> ShardSpec | None:
        """``weight``: the column blocks of ``spec`` (dim 1); ``bias``: None (replicated)."""
        if param_name not in ("weight", "bias"):
            raise KeyError(f"RowParallelLinear has no parameter {param_name!r}")
        return self.spec if param_name == "weight" else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (columns {list(self.spec.ranges)} of {self.full_in_features}), "
                f"out_features={self.out_features}, bias={self.bias is not None} (added after the all-reduce)")


def lookup_rows(ids: torch.Tensor, weight: torch.Tensor, start: int, padding_idx: int | None = None) -> torch.Tensor:
    """This rank's part of ``F.embedding(ids, full_table)``: rows ``[start, start + len(weight))`` looked up, zeros
    for ids outside them (another rank holds those rows). Summed over the group, the parts are the full lookup.

    ``padding_idx`` is the full table's; it applies here when this rank holds that row. Backward gives
    each held row the gradient of its ids only: the ids outside the range reach no row of this rank.
    """
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    held_padding = padding_idx - start if padding_idx is not None and 0 <= padding_idx - start < weight.shape[0] else None
    rows = F.embedding(local.masked_fill(outside, 0), weight, held_padding)
    return rows.masked_fill(outside.unsqueeze(-1), 0.0)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of an Embedding's table (num_embeddings / tp of them, the vocabulary split in order).

    ``forward(ids)`` returns this rank's part of the lookup (zeros for ids another rank holds); the graph
    sums the parts over the group (``reduce_from_tp``).
    """

    def __init__(self, embedding: nn.Embedding, *, spec: ShardSpec, tp: int, rank: int) -> None:
        super().__init__()
        if spec.dim != 0 or len(spec.ranges) != 1 or spec.full_size != embedding.num_embeddings:
            raise ValueError(f"vocabulary rows {spec} do not fit an Embedding of {embedding.num_embeddings} rows")
        self.full_num_embeddings = embedding.num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.padding_idx = embedding.padding_idx  # of the full table
        self.max_norm, self.scale_grad_by_freq, self.sparse = None, False, False  # what a split table supports
        self.tp, self.rank, self.spec = tp, rank, spec
        self.start = spec.ranges[0][0]
        self.num_embeddings = spec.local_size
        self.weight = _owned_part(embedding.weight, spec)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup_rows(ids, self.weight, self.start, self.padding_idx)

    def shard_spec(self, param_name: str) -> ShardSpec | None:
        """``weight``: the rows of ``spec`` (dim 0)."""
        if param_name != "weight":
            raise KeyError(f"VocabParallelEmbedding has no parameter {param_name!r}")
        return self.spec

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} of {self.full_num_embeddings} rows {list(self.spec.ranges)}, "
                f"embedding_dim={self.embedding_dim}, padding_idx={self.padding_idx}")
