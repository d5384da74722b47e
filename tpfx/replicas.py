"""The replica check: every rank of a tensor-parallel group must start from the same model.

Each rank slices its shards out of its own full copy of the model and computes the replicated layers
with its own copy, so ranks holding different weights, buffers, configurations or dropout random
state run to completion with outputs that differ across ranks. :func:`check_replicas` finds that
before the first step, in one small collective (``all_gather_object`` of a summary of a few bytes per
tensor and per graph node), the one collective :func:`tpfx.parallelize` runs::

    rank 0: {"blocks.0.attn.qkv.weight": (row hash, sum, |sum|), ...}, graph nodes, RNG state
    rank 1: {"blocks.0.attn.qkv.weight": (other row hash, ...), ...}
        -> ReplicaError: 'blocks.0.attn.qkv.weight' differs between rank 0 and rank(s) 1 ...

A tensor's fingerprint is the xor-hash of the bits of each row (exact, cheap: ``torch.hash_tensor``)
combined with odd weights by row position, plus its sum, so that equal values that cancel in a xor
(a row filled with one constant) still differ by their sum. Sums are compared with a tolerance
relative to the largest magnitude times the count (reduction order may differ between devices); the
hash must match exactly.
Meta tensors (a model built under :func:`tpfx.parameters_on_meta`) have no values yet: only their
names, shapes and dtypes are compared; a checkpoint loaded on every rank fills them alike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import fx, nn

from tpfx.errors import ReplicaError
from tpfx.passes.ops import dropout_probability

RNG_STATE = "<torch random state>"  # the entry of the dropout random state among the tensors
_SUM_TOLERANCE = 1e-5  # relative to largest magnitude x count; bit-level differences are the hash's job


@dataclass(frozen=True)
class Fingerprint:
    """What a rank holds under one name: shape, dtype and (real tensors) a digest of the values."""

    shape: tuple[int, ...]
    dtype: str
    row_hash: int | None  # None: a meta tensor (no values)
    total: float = 0.0
    magnitude: float = 0.0  # the largest magnitude times the count: what bounds the sum's rounding

    def differs_from(self, other: Fingerprint) -> str | None:
        """How ``other`` differs from this one (shape, dtype or values), or None when they agree."""
        if (self.shape, self.dtype) != (other.shape, other.dtype):
            return f"is {other.dtype}{list(other.shape)} there but {self.dtype}{list(self.shape)} here"
        if self.row_hash is None or other.row_hash is None:
            return None if self.row_hash is other.row_hash else "is on meta on one rank only"
        if self.row_hash != other.row_hash:
            return "holds different values"
        scale = max(self.magnitude, other.magnitude, 1e-30)
        return "holds different values" if abs(self.total - other.total) > _SUM_TOLERANCE * scale else None


def fingerprint(tensor: torch.Tensor) -> Fingerprint:
    """The :class:`Fingerprint` of one tensor: a xor-hash per row, a sum and the largest magnitude.

    About 1 GB/s on one CPU core (the hash reads every byte once; the sum and the extremes run in the
    tensor's own dtype, without a widened copy).
    """
    dtype = str(tensor.dtype).removeprefix("torch.")
    shape = tuple(tensor.shape)
    if tensor.is_meta:
        return Fingerprint(shape, dtype, None)
    values = tensor.detach()
    if values.is_complex():
        values = torch.view_as_real(values)
    if values.dtype == torch.bool:
        values = values.to(torch.uint8)
    if values.numel() == 0:
        return Fingerprint(shape, dtype, 0)
    rows = torch.cat([torch.hash_tensor(block, dim=1) for block in _row_blocks(values)])
    weights = torch.arange(rows.numel(), dtype=torch.int64, device=rows.device) * 2 + 1
    row_hash = int((rows.view(torch.int64) * weights).sum())  # wraps around in int64: still deterministic
    low, high = torch.aminmax(values)
    largest = max(abs(float(low)), abs(float(high)))
    total = float(values.sum(dtype=torch.int64) if not values.is_floating_point() else values.sum())
    return Fingerprint(shape, dtype, row_hash, total, largest * values.numel())


def _row_blocks(values: torch.Tensor) -> list[torch.Tensor]:
    """The tensor as 2-D blocks whose rows are hashed: its own rows (dim 0), or for a vector rows of 64."""
    if values.dim() >= 2:
        return [values.reshape(values.shape[0], -1)]
    flat = values.reshape(-1)
    bulk = flat.numel() - flat.numel() % 64
    blocks = [flat[:bulk].view(-1, 64)] if bulk else []
    return blocks + ([flat[bulk:].view(1, -1)] if bulk < flat.numel() else [])


def model_fingerprints(model: nn.Module, *, with_random_state: bool) -> dict[str, Fingerprint]:
    """Every parameter and buffer of ``model`` by name (tied ones once), and the random state if asked."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    prints = {name: fingerprint(tensor) for name, tensor in tensors.items()}
    if with_random_state:
        prints[RNG_STATE] = fingerprint(torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            prints[RNG_STATE + " (cuda)"] = fingerprint(torch.cuda.get_rng_state())
    return prints


def _literal(value: object) -> str:
    """A process-independent spelling of a node argument (no object addresses)."""
    if isinstance(value, fx.Node):
        return f"%{value.name}"
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_literal(item) for item in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_literal(item)}" for key, item in value.items()) + "}"
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, slice)):
        return repr(value)
    return type(value).__name__


def graph_signature(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(node name, short digest of what it computes) for every node of a captured graph, in order.

    Two ranks whose models differ in configuration (a head count, an eps, a dropout probability) or
    that were captured for different call forms have graphs that differ at the first such node.
    """
    signature = []
    for node in gm.graph.nodes:
        target = node.target
        if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            target = str(target)  # aten.linear.default
        elif not isinstance(target, str):
            target = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', type(target).__name__)}"
        text = f"{node.op} {target} {_literal(node.args)} {_literal(node.kwargs)}"
        signature.append((node.name, hashlib.blake2b(text.encode(), digest_size=8).hexdigest()))
    return signature


def uses_dropout(gm: fx.GraphModule) -> bool:
    """Whether the captured graph drops anything (then ranks must draw the same dropout masks)."""
    modules = dict(gm.named_modules())
    return any(dropout_probability(node, modules) is not None for node in gm.graph.nodes)


@dataclass(frozen=True)
class Summary:
    """What one rank sends: how it was built (mode, tracer, call form), its graph and its tensors."""

    build: tuple[tuple[str, str], ...]
    graph: list[tuple[str, str]]
    tensors: dict[str, Fingerprint]


def check_replicas(summary: Summary, *, group: dist.ProcessGroup | None, key: str) -> None:
    """Compare this rank's summary with every rank of ``group`` (one collective); raise on a difference.

    Raises:
        ReplicaError: one line naming the first difference (build option, graph node or tensor) and
            the ranks that differ from group rank 0, with the fix.
    """
    everyone: list[Summary | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, summary, group=group)
    first, others = everyone[0], list(enumerate(everyone))[1:]
    problem = (_build_difference(first, others) or _graph_difference(first, others)
               or _tensor_difference(first, others))
    if problem is not None:
        raise ReplicaError(f"tpfx.parallelize: the ranks of group {key} do not hold the same model: {problem}; "
                           "pass check_replicas=False only if you guarantee identical replicas yourself")


def _build_difference(first: Summary, others: list[tuple[int, Summary]]) -> str | None:
    for index, (name, value) in enumerate(first.build):
        ranks = [rank for rank, summary in others if summary.build[index] != (name, value)]
        if ranks:
            theirs = dict(others[ranks[0] - 1][1].build).get(name)
            return (f"{name} is {value!r} on rank 0 but {theirs!r} on rank(s) {_listed(ranks)}; fix: call "
                    "parallelize with the same options and the same kind of example inputs on every rank")
    return None


def _graph_difference(first: Summary, others: list[tuple[int, Summary]]) -> str | None:
    for rank, summary in others:
        if summary.graph == first.graph:
            continue
        index = next((i for i, (a, b) in enumerate(zip(first.graph, summary.graph)) if a != b),
                     min(len(first.graph), len(summary.graph)))
        where = (f"node {first.graph[index][0]!r}" if index < len(first.graph)
                 else f"node {summary.graph[index][0]!r} (rank {rank} only)")
        return (f"rank {rank} captured a different graph from rank 0's, first at {where}; fix: build the "
                "model with the same configuration (and call form) on every rank")
    return None


def _tensor_difference(first: Summary, others: list[tuple[int, Summary]]) -> str | None:
    for name, mine in first.tensors.items():
        how = {rank: mine.differs_from(summary.tensors[name]) if name in summary.tensors else "is missing there"
               for rank, summary in others}
        ranks = [rank for rank, text in how.items() if text is not None]
        if not ranks:
            continue
        if name.startswith(RNG_STATE):
            return (f"the dropout random state differs between rank 0 and rank(s) {_listed(ranks)}; fix: "
                    "call torch.manual_seed(same seed) on every rank before parallelize, so that dropout "
                    "draws the same masks on every rank")
        return (f"{name!r} {how[ranks[0]]} on rank(s) {_listed(ranks)} (compared with rank 0); fix: build the "
                "model with the same seed on every rank, or load the same checkpoint on every rank")
    extra = [(rank, name) for rank, summary in others for name in summary.tensors if name not in first.tensors]
    if extra:
        rank, name = extra[0]
        return f"rank {rank} holds {name!r}, which rank 0 does not; fix: build the same model on every rank"
    return None


def _listed(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (f" (+{len(ranks) - 8} more)" if len(ranks) > 8 else "")
