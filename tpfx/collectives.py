"""Autograd-aware collectives that appear as ``call_function`` nodes in a rewritten graph.

Each takes the tensor and a *group key*: a short string such as ``"tp:0-1"`` that names the
tensor-parallel group and reads well in ``gm.code``. The key is bound to a real
``torch.distributed`` process group by :func:`bind_group`; a program built for inspection
(``parallelize(..., rank=r)`` without a process group) carries the key but no binding, and calling
it raises a clear error instead of hanging.

Forward / backward pairs (Megatron's f/g operators):

* ``copy_to_tp``:     identity      / all-reduce (sum) of the input gradient
* ``gather_from_tp``: all-gather on the last dim / this rank's slice of the gradient
* ``reduce_from_tp``: all-reduce (sum) / identity

Sequence parallelism (Megatron's sequence-parallel region: between the pairs every rank holds its
1/tp of the sequence, along dim ``dim`` of the tensor):

* ``split_to_sequence``:          this rank's slice         / all-gather of the gradient slices
* ``reduce_scatter_to_sequence``: reduce-scatter (sum)      / all-gather of the gradient slices
* ``gather_from_sequence``:       all-gather                / reduce-scatter (sum) of the gradient
* ``gather_sequence_whole``:      all-gather                / this rank's slice of the gradient

``reduce_scatter_to_sequence`` replaces ``reduce_from_tp`` where the sum enters the sequence-sharded
region, ``gather_from_sequence`` replaces ``copy_to_tp`` where a column-parallel linear reads it;
``split_to_sequence`` and ``gather_sequence_whole`` enter and leave it from and to computation every
rank does whole (the embedding before it, the LM head after it).

and the loss over logits whose vocabulary is split across the group:

* ``vocab_parallel_cross_entropy``: all-reduce (max) of each row's largest logit, then one all-reduce (sum)
  of each row's sum of exponentials and target logit (from the rank that holds the target) / no communication
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from tpfx.errors import ConfigError, ShardingError

# group key -> process group (None stands for the default world group)
_GROUPS: dict[str, dist.ProcessGroup | None] = {}

# Observers see every collective call: (name, tensor handed to it). Used by tests and benchmarks to
# count the bytes that really cross the wire; empty in normal runs so the cost is one truth test.
_OBSERVERS: list[Callable[[str, torch.Tensor], None]] = []


def group_key(ranks: list[int]) -> str:
    """The key naming the group of these global ranks, e.g. ``tp:0-1`` or ``tp:0,2``."""
    consecutive = ranks == list(range(ranks[0], ranks[0] + len(ranks)))
    return f"tp:{ranks[0]}-{ranks[-1]}" if consecutive else "tp:" + ",".join(map(str, ranks))


def bind_group(key: str, group: dist.ProcessGroup | None) -> None:
    """Bind a group key to a process group (None = the default group) for this process."""
    _GROUPS[key] = group


def add_observer(observer: Callable[[str, torch.Tensor], None]) -> Callable[[], None]:
    """Call ``observer(collective_name, tensor)`` at every collective; returns a function that removes it."""
    _OBSERVERS.append(observer)
    return lambda: _OBSERVERS.remove(observer)


def _group(key: str) -> dist.ProcessGroup | None:
    if key not in _GROUPS or not dist.is_initialized():
        raise ConfigError(
            f"tensor-parallel group {key!r} is not bound in this process: this program was built for "
            "inspection (rank= without a process group); call tpfx.parallelize inside an initialized "
            "torch.distributed process group to run it"
        )
    return _GROUPS[key]


def _notify(name: str, tensor: torch.Tensor) -> None:
    for observer in _OBSERVERS:
        observer(name, tensor)


def _all_reduce(tensor: torch.Tensor, key: str, name: str) -> torch.Tensor:
    out = tensor.contiguous().clone()
    _notify(name, out)
    dist.all_reduce(out, group=_group(key))
    return out


def _all_gather_last_dim(tensor: torch.Tensor, key: str, name: str) -> torch.Tensor:
    group = _group(key)
    local = tensor.contiguous()
    _notify(name, local)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=-1)


def _check_divisible(tensor: torch.Tensor, dim: int, tp: int) -> None:
    # every rank sees the same sequence length: all raise here, before any collective runs
    if tensor.shape[dim] % tp:
        raise ShardingError(
            f"sequence length {tensor.shape[dim]} (dim {dim} of a {tuple(tensor.shape)} tensor) is not divisible by "
            f"tp={tp}: sequence_parallel=True splits the sequence across the ranks; pad the sequence to a multiple "
            f"of {tp} or parallelize without sequence_parallel")


def _slice_of(tensor: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    """This rank's contiguous 1/tp of ``tensor`` along ``dim`` (a copy: a view would keep the whole alive)."""
    group = _group(key)
    tp = dist.get_world_size(group)
    _check_divisible(tensor, dim, tp)
    length = tensor.shape[dim] // tp
    return tensor.narrow(dim, dist.get_rank(group) * length, length).clone(memory_format=torch.contiguous_format)


def _all_gather_dim(tensor: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    group = _group(key)
    local = tensor.contiguous()
    _notify("all_gather", local)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter_dim(tensor: torch.Tensor, dim: int, key: str) -> torch.Tensor:
    group = _group(key)
    tp = dist.get_world_size(group)
    _check_divisible(tensor, dim, tp)
    whole = tensor.contiguous()
    _notify("reduce_scatter", whole)
    # the tensor form along dim 0 (one flat buffer, not a list of parts): torch.compile traces it
    front = whole.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // tp, *front.shape[1:]))
    dist.reduce_scatter_tensor(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _along_sequence(name: str, forward: Callable[[torch.Tensor, int, str], torch.Tensor],
                    backward: Callable[[torch.Tensor, int, str], torch.Tensor]) -> type[torch.autograd.Function]:
    """An autograd function ``(x, dim, group key)``: ``forward`` on the tensor, ``backward`` on its gradient."""

    def run_forward(ctx, x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
        ctx.dim, ctx.key = dim, key
        return forward(x, dim, key)

    def run_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return backward(grad, ctx.dim, ctx.key), None, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run_forward),
                                                   "backward": staticmethod(run_backward)})


_SplitToSequence = _along_sequence("_SplitToSequence", _slice_of, _all_gather_dim)
_ReduceScatterToSequence = _along_sequence("_ReduceScatterToSequence", _reduce_scatter_dim, _all_gather_dim)
_GatherFromSequence = _along_sequence("_GatherFromSequence", _all_gather_dim, _reduce_scatter_dim)
# every rank computed the same whole-sequence result from it: the gradient is the same, keep this rank's slice
_GatherSequenceWhole = _along_sequence("_GatherSequenceWhole", _all_gather_dim, _slice_of)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:
        ctx.key = key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.key, "all_reduce"), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:
        ctx.key = key
        ctx.local_width = x.shape[-1]
        return _all_gather_last_dim(x, key, "all_gather")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # every rank holds the same full gradient; this rank's columns are its share (no communication)
        rank = dist.get_rank(_group(ctx.key))
        start = rank * ctx.local_width
        return grad[..., start:start + ctx.local_width].contiguous(), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:
        return _all_reduce(x, key, "all_reduce")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits whose last dim holds this rank's contiguous 1/tp of the vocabulary.

    Forward: the row maximum and the row's sum of exponentials are all-reduced, and the target logit
    comes from the rank that holds it (the others add zero), so the loss equals the single-device one
    and no rank holds the full logits. Backward is local: softmax minus the one-hot target, of this
    rank's columns, times the loss gradient (every rank has the whole loss, so the same gradient).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, key: str, ignore_index: int,
                reduction: str) -> torch.Tensor:
        group = _group(key)
        width = logits.shape[-1]
        start = dist.get_rank(group) * width
        rows, labels = logits.detach().reshape(-1, width), target.reshape(-1)
        top = rows.amax(dim=-1)  # any common shift keeps the softmax; the largest keeps exp() finite
        _notify("all_reduce", top)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        exp = (rows - top.unsqueeze(-1)).exp()
        local = labels - start
        held = (local >= 0) & (local < width)
        index = local.masked_fill(~held, 0).unsqueeze(-1)
        picked = (rows.gather(-1, index).squeeze(-1) - top).masked_fill(~held, 0.0)
        statistics = torch.stack([exp.sum(dim=-1), picked], dim=-1)  # (rows, 2): one all-reduce for both
        _notify("all_reduce", statistics)
        dist.all_reduce(statistics, group=group)
        total, target_logit = statistics.unbind(-1)
        valid = labels != ignore_index
        losses = (total.log() - target_logit).masked_fill(~valid, 0.0)
        ctx.save_for_backward(exp / total.unsqueeze(-1), index, held & valid, valid)
        ctx.reduction, ctx.shape = reduction, logits.shape
        if reduction == "none":
            return losses.view(target.shape)
        count = valid.sum()
        ctx.count = count
        return losses.sum() if reduction == "sum" else losses.sum() / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, index, hit, valid = ctx.saved_tensors
        scale = grad.reshape(-1) if ctx.reduction == "none" else grad.expand(valid.shape)
        if ctx.reduction == "mean":
            scale = scale / ctx.count
        scale = scale * valid
        grad_logits = softmax * scale.unsqueeze(-1)
        grad_logits.scatter_add_(-1, index, -(scale * hit).unsqueeze(-1).to(grad_logits.dtype))
        return grad_logits.view(ctx.shape), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: str, *, ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(full_logits, target)`` from this rank's contiguous 1/tp of the vocabulary (last dim).

    ``logits`` is (..., vocab / tp), ``target`` the class indices (...) of the full vocabulary; the
    result (every rank the same) and the logits' gradient equal the single-device ones.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ConfigError(f"vocab_parallel_cross_entropy: reduction={reduction!r}; use 'none', 'mean' or 'sum'")
    return _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index, reduction)


def copy_to_tp(x: torch.Tensor, group: str) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward. Precedes a column-parallel linear."""
    return _CopyToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: str) -> torch.Tensor:
    """All-gather along the last dim forward; this rank's slice of the gradient backward."""
    return _GatherFromTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: str) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward. Follows a row-parallel linear."""
    return _ReduceFromTP.apply(x, group)


def split_to_sequence(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """This rank's 1/tp of the sequence (dim ``dim``) forward; all-gather of the gradient backward.

    Enters the sequence-sharded region from a tensor every rank holds whole (the embeddings' sum).

    Raises:
        ShardingError: tp does not divide the sequence length.
    """
    return _SplitToSequence.apply(x, dim, group)


def reduce_scatter_to_sequence(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Reduce-scatter (sum) along ``dim`` forward; all-gather of the gradient backward. Follows a
    row-parallel linear whose sum enters the sequence-sharded region (instead of ``reduce_from_tp``).

    Raises:
        ShardingError: tp does not divide the sequence length.
    """
    return _ReduceScatterToSequence.apply(x, dim, group)


def gather_from_sequence(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """All-gather along ``dim`` forward; reduce-scatter (sum) of the gradient backward. Precedes the
    column-parallel linears of a pair (instead of ``copy_to_tp``)."""
    return _GatherFromSequence.apply(x, dim, group)


def gather_sequence_whole(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """All-gather along ``dim`` forward; this rank's slice of the gradient backward. Leaves the
    sequence-sharded region into computation every rank does whole (the LM head, the model output)."""
    return _GatherSequenceWhole.apply(x, dim, group)


# Graph rewriting marks nodes that call these as collectives, e.g. for reports and drawing.
COLLECTIVES: dict[Callable[..., torch.Tensor], str] = {
    copy_to_tp: "copy_to_tp",
    gather_from_tp: "gather_from_tp",
    reduce_from_tp: "reduce_from_tp",
    split_to_sequence: "split_to_sequence",
    reduce_scatter_to_sequence: "reduce_scatter_to_sequence",
    gather_from_sequence: "gather_from_sequence",
    gather_sequence_whole: "gather_sequence_whole",
    vocab_parallel_cross_entropy: "vocab_parallel_cross_entropy",
}


def rank_and_size(group: str) -> tuple[int, int]:
    """This process's rank in the tensor-parallel group ``group`` and the group's size (tp)."""
    process_group = _group(group)
    return dist.get_rank(process_group), dist.get_world_size(process_group)
