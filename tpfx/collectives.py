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

Every one of them, forward and backward, runs its torch.distributed call through :func:`_communicate`:
it first settles the program's open call check (:func:`start_call_check`), and a call that fails (a
rank that never joined within the group timeout) raises one :class:`tpfx.errors.CollectiveError` line
naming the collective and its *site*, the program line that called it. Under torch.compile both are
left out (dynamo traces the bare collective into the graph).
"""

from __future__ import annotations

import datetime
import hashlib
import linecache
import re
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tpfx.errors import CollectiveError, ConfigError, ShardingError, first_line

# Process groups are held by weak reference: torch's registry owns them, and destroy_process_group must
# free them. A group kept alive here keeps its gloo threads running into interpreter exit, where their
# teardown can abort the process (SIGABRT, "terminate called without an active exception").
# group key -> the process group (None stands for the default world group)
_GROUPS: dict[str, weakref.ref[dist.ProcessGroup] | None] = {}
# group key -> a second group of the same ranks for tpfx's own checks (the call check): its collectives
# never pair with the program's, so a rank that is one collective ahead times out instead of aborting gloo
_CONTROL: dict[str, weakref.ref[dist.ProcessGroup]] = {}

# Observers see every collective call: (name, tensor handed to it). Used by tests and benchmarks to
# count the bytes that really cross the wire; empty in normal runs so the cost is one truth test.
_OBSERVERS: list[Callable[[str, torch.Tensor], None]] = []


def group_key(ranks: list[int]) -> str:
    """The key naming the group of these global ranks, e.g. ``tp:0-1`` or ``tp:0,2``."""
    consecutive = ranks == list(range(ranks[0], ranks[0] + len(ranks)))
    return f"tp:{ranks[0]}-{ranks[-1]}" if consecutive else "tp:" + ",".join(map(str, ranks))


def bind_group(key: str, group: dist.ProcessGroup | None, *, control: dist.ProcessGroup | None = None) -> None:
    """Bind a group key to a process group (None = the default group) for this process.

    ``control``: a second group of the same ranks on which :func:`start_call_check` runs (without one,
    the call check is off).
    """
    _GROUPS[key] = None if group is None else weakref.ref(group)
    if control is not None:
        _CONTROL[key] = weakref.ref(control)
    else:
        _CONTROL.pop(key, None)


def _control(key: str) -> dist.ProcessGroup | None:
    """The live control group bound with ``key``, or None (none bound, or destroyed with the process group)."""
    reference = _CONTROL.get(key)
    return None if reference is None else reference()


def control_group(key: str) -> dist.ProcessGroup | None:
    """The control group bound with ``key`` (see :func:`bind_group`); the group itself when there is none."""
    control = _control(key)
    return control if control is not None else _group(key)


def group_timeout(group: dist.ProcessGroup | None) -> datetime.timedelta | None:
    """How long a collective of ``group`` (None: the world) waits for the other ranks, where torch tells."""
    process_group = group if group is not None else dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return process_group._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError, ValueError):  # no backend for that device, or another torch
            continue
    return None


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
    reference = _GROUPS[key]
    group = None if reference is None else reference()
    if reference is not None and group is None:
        raise ConfigError(f"the process group of tensor-parallel group {key!r} was destroyed "
                          "(dist.destroy_process_group); call tpfx.parallelize again in the new process group")
    return group


def _notify(name: str, tensor: torch.Tensor) -> None:
    for observer in _OBSERVERS:
        observer(name, tensor)


# ------------------------------------------------------------------------------ where a collective runs

_GENERATED = "<eval_with_key>"  # the file name torch.fx gives the code it generates for a graph
# where a collective runs: (file, line) of the program's code, a description, or None (unknown, compiled)
Site = tuple[str, int] | str | None


def _program_site() -> Site:
    """(file, line) of the nearest frame of a program's generated code: the graph node calling us.

    None under torch.compile: dynamo cannot trace frame inspection, and a compiled graph's failure
    is reported by the compiled code's own traceback.
    """
    if torch.compiler.is_compiling():
        return None
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_GENERATED):
            return frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back
    return None


def _site_text(site: Site) -> str:
    """The program's line for a site: ``gather_from_tp_1 = tpfx_collectives_gather_from_tp(fc1, 'tp:0-1')``."""
    if isinstance(site, str):
        return site
    if site is None:
        return "outside a tpfx program"
    line = linecache.getline(*site).strip().split(";")[0]
    return f"program line {line!r}" if line else f"{site[0]} line {site[1]}"


def _run(collective: Callable[[], object], name: str, key: str, site: Site) -> None:
    """Run one torch.distributed call; a failure (a rank that never joined) becomes one CollectiveError line.

    Under torch.compile the call is made as it is: dynamo traces it into the graph (a try block around
    it would not trace), and a compiled collective fails with the compiled code's error.
    """
    if torch.compiler.is_compiling():
        collective()
        return
    try:
        collective()
    except RuntimeError as error:  # gloo and NCCL raise RuntimeError (DistBackendError) on timeouts and lost peers
        reference = _GROUPS.get(key)
        timeout = group_timeout(None if reference is None else reference())
        # gloo's message starts with its source location and ends with advice for its own developers
        reason = re.sub(r"^\[[^\]]*:\d+\] ", "", first_line(error)).split(". ")[0]
        raise CollectiveError(
            f"{name} of group {key} at {_site_text(site)} failed: {reason}; another rank did not "
            f"join it within the group timeout ({timeout or 'unknown'}): it raised, skipped a forward or "
            "backward, or was called with other inputs; fix that rank (its own error says why)") from error


def _communicate(collective: Callable[[], object], name: str, key: str, site: Site, *, backward: bool = False) -> None:
    """Run one of a program's collectives: first the open call check (see :func:`settle_call_check`), then
    ``collective`` through :func:`_run`; ``backward`` says so in a failure's message."""
    settle_call_check(key)
    _run(collective, f"{name} (backward)" if backward else name, key, site)


def _all_reduce(tensor: torch.Tensor, key: str, name: str, site: Site, *, backward: bool = False,
                op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """``op`` (sum unless told) of ``tensor`` over the group, in a new tensor."""
    out = tensor.contiguous().clone()
    _notify(name, out)
    group = _group(key)
    _communicate(lambda: dist.all_reduce(out, op=op, group=group), name, key, site, backward=backward)
    return out


def _all_gather(tensor: torch.Tensor, dim: int, key: str, site: Site, *, backward: bool = False) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along ``dim``, in rank order."""
    group = _group(key)
    local = tensor.contiguous()
    _notify("all_gather", local)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    _communicate(lambda: dist.all_gather(parts, local, group=group), "all_gather", key, site, backward=backward)
    return torch.cat(parts, dim=dim)


def _check_divisible(tensor: torch.Tensor, dim: int, tp: int) -> None:
    # every rank sees the same sequence length: all raise here, before any collective runs
    if tensor.shape[dim] % tp:
        raise ShardingError(
            f"sequence length {tensor.shape[dim]} (dim {dim} of a {tuple(tensor.shape)} tensor) is not divisible by "
            f"tp={tp}: sequence_parallel=True splits the sequence across the ranks; pad the sequence to a multiple "
            f"of {tp} or parallelize without sequence_parallel")


def _slice_of(tensor: torch.Tensor, dim: int, key: str, site: Site, *, backward: bool = False) -> torch.Tensor:
    """This rank's contiguous 1/tp of ``tensor`` along ``dim`` (a copy: a view would keep the whole alive).

    No communication: ``site`` and ``backward`` are taken only to fit :func:`_along_sequence`.
    """
    group = _group(key)
    tp = dist.get_world_size(group)
    _check_divisible(tensor, dim, tp)
    length = tensor.shape[dim] // tp
    return tensor.narrow(dim, dist.get_rank(group) * length, length).clone(memory_format=torch.contiguous_format)


def _reduce_scatter(tensor: torch.Tensor, dim: int, key: str, site: Site, *, backward: bool = False) -> torch.Tensor:
    """The sum over the group of ``tensor``, this rank's 1/tp of it along ``dim``."""
    group = _group(key)
    tp = dist.get_world_size(group)
    _check_divisible(tensor, dim, tp)
    whole = tensor.contiguous()
    _notify("reduce_scatter", whole)
    # the tensor form along dim 0 (one flat buffer, not a list of parts): torch.compile traces it
    front = whole.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // tp, *front.shape[1:]))
    _communicate(lambda: dist.reduce_scatter_tensor(out, front, group=group), "reduce_scatter", key, site,
                 backward=backward)
    return out.movedim(0, dim).contiguous()


_SequenceStep = Callable[..., torch.Tensor]  # (tensor, dim, group key, site, *, backward) -> tensor


def _along_sequence(name: str, forward: _SequenceStep, backward: _SequenceStep) -> type[torch.autograd.Function]:
    """An autograd function ``(x, dim, group key)``: ``forward`` on the tensor, ``backward`` on its gradient.

    Both are told the program line that called the function (backward runs outside the program's code).
    """

    def run_forward(ctx, x: torch.Tensor, dim: int, key: str) -> torch.Tensor:
        ctx.dim, ctx.key, ctx.site = dim, key, _program_site()
        return forward(x, dim, key, ctx.site)

    def run_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return backward(grad, ctx.dim, ctx.key, ctx.site, backward=True), None, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run_forward),
                                                   "backward": staticmethod(run_backward)})


_SplitToSequence = _along_sequence("_SplitToSequence", _slice_of, _all_gather)
_ReduceScatterToSequence = _along_sequence("_ReduceScatterToSequence", _reduce_scatter, _all_gather)
_GatherFromSequence = _along_sequence("_GatherFromSequence", _all_gather, _reduce_scatter)
# every rank computed the same whole-sequence result from it: the gradient is the same, keep this rank's slice
_GatherSequenceWhole = _along_sequence("_GatherSequenceWhole", _all_gather, _slice_of)


@dataclass
class _PendingCheck:
    """A call check on its way: the all-gather's handle, its buffers, and what to say if it fails."""

    work: dist.Work
    everyone: list[torch.Tensor]
    form: str
    first: tuple[int, ...]


_PENDING: dict[str, _PendingCheck] = {}  # group key -> the call check the next collective waits for


def start_call_check(key: str, shapes: Sequence[tuple[int, ...] | None], form: str) -> None:
    """Start checking, in one tiny collective on the group's control group, that every rank makes the same call.

    Ranks called with other batch or sequence sizes would hand gloo collectives of different sizes,
    which it cannot report (it aborts the process); ranks called for another call form would run
    other collectives; a rank that skipped a backward would pair its next forward's collectives with
    the others' backward ones. Each rank sends the first tensor's shape and a digest of every
    argument's shape and of the call form (48 bytes), always the same size, so the check itself
    cannot abort. It runs asynchronously, while the program computes up to its first collective,
    which waits for it (:func:`settle_call_check`): a rank out of step fails there, on the control
    group, before any of the program's collectives can pair with the wrong one.

    Args:
        key: the program's group key.
        shapes: every argument's shape (None for a non-tensor), in signature order.
        form: the call form's description.
    """
    control = _control(key)
    if control is None:
        return
    settle_call_check(key)  # the previous call ran no collective: its check is still open
    first = next((shape for shape in shapes if shape is not None), ())
    digest = _stable_digest(repr((tuple(shapes), form)))  # not hash(): str hashes differ between processes
    mine = torch.tensor([digest, len(first), *(list(first[:4]) + [-1] * (4 - len(first[:4])))], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(control))]
    work = dist.all_gather(everyone, mine, group=control, async_op=True)
    _PENDING[key] = _PendingCheck(work, everyone, form, tuple(first))


def settle_call_check(key: str) -> None:
    """Wait for the open call check of group ``key`` (if any) and compare the ranks' calls.

    Raises:
        CollectiveError: the ranks' calls differ (naming the first tensor's shapes per rank), or a
            rank did not come to this call within the group timeout (it raised, skipped a backward
            or is still in another collective).
    """
    pending = _PENDING.pop(key, None)
    if pending is None:
        return
    _run(pending.work.wait, "the call check", key,
         f"the start of a call of the program ({pending.form}, first tensor {list(pending.first)})")
    rows = pending.everyone
    if all(torch.equal(row, rows[0]) for row in rows):
        return
    described = "; ".join(f"rank {rank}: {_shape_of(row)}" for rank, row in enumerate(rows))
    raise CollectiveError(f"the ranks of group {key} called the program with different inputs ({described}, "
                          f"this rank: {pending.form}); fix: call it with the same batch and sequence sizes and "
                          "the same optional arguments on every rank of a tensor-parallel group")


def _stable_digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _shape_of(row: torch.Tensor) -> str:
    digest, ndim, *dims = row.tolist()
    return f"first tensor {[d for d in dims[:ndim]]}, call digest {digest:x}"


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:
        ctx.key, ctx.site = key, _program_site()  # backward runs outside the program's code
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.key, "all_reduce", ctx.site, backward=True), None


class _SumGradientsOverTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.key, ctx.site = key, _program_site()
        # a tensor whose read no loss reaches gets no gradient (None), as without the bucket: a zero
        # gradient instead would still be stepped by an optimizer (weight decay, momentum)
        ctx.set_materialize_grads(False)
        return tuple(tensor.view_as(tensor) for tensor in tensors)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        # every rank runs the same graph: the same slots have gradients, the flat tensor has one size
        present = [grad for grad in grads if grad is not None]
        if not present:
            return (None,) * (len(grads) + 1)
        flat = torch.cat([grad.reshape(-1) for grad in present])
        summed = iter(_all_reduce(flat, ctx.key, "all_reduce", ctx.site, backward=True).split(
            [grad.numel() for grad in present]))
        return (None, *(None if grad is None else next(summed).view(grad.shape) for grad in grads))


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:
        ctx.key = key
        ctx.local_width = x.shape[-1]
        return _all_gather(x, -1, key, _program_site())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # every rank holds the same full gradient; this rank's columns are its share (no communication)
        rank = dist.get_rank(_group(ctx.key))
        start = rank * ctx.local_width
        return grad[..., start:start + ctx.local_width].contiguous(), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:
        return _all_reduce(x, key, "all_reduce", _program_site())

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
        site = _program_site()
        width = logits.shape[-1]
        start = dist.get_rank(_group(key)) * width
        rows, labels = logits.detach().reshape(-1, width), target.reshape(-1)
        # any common shift keeps the softmax; the largest keeps exp() finite
        top = _all_reduce(rows.amax(dim=-1), key, "all_reduce", site, op=dist.ReduceOp.MAX)
        exp = (rows - top.unsqueeze(-1)).exp()
        local = labels - start
        held = (local >= 0) & (local < width)
        index = local.masked_fill(~held, 0).unsqueeze(-1)
        picked = (rows.gather(-1, index).squeeze(-1) - top).masked_fill(~held, 0.0)
        statistics = torch.stack([exp.sum(dim=-1), picked], dim=-1)  # (rows, 2): one all-reduce for both
        total, target_logit = _all_reduce(statistics, key, "all_reduce", site).unbind(-1)
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


def sum_gradients_over_tp(tensors: Sequence[torch.Tensor], group: str) -> tuple[torch.Tensor, ...]:
    """Identity forward on each tensor; backward, one all-reduce (sum) of all their gradients, flattened
    together: what a :func:`copy_to_tp` of each does, in one collective instead of one per tensor.

    For whole parameters that every rank reads on its own part of the work (a norm's weight under
    sequence parallelism): their small gradients cost a collective's latency each. All the tensors
    have one dtype. The sum runs once every gradient is in, when backward has passed all their reads.
    """
    return _SumGradientsOverTP.apply(group, *tensors)


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
    sum_gradients_over_tp: "sum_gradients_over_tp",
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
