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
"""

from __future__ import annotations

import datetime
import hashlib
import linecache
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tpfx.errors import CollectiveError, ConfigError, first_line

# group key -> process group (None stands for the default world group)
_GROUPS: dict[str, dist.ProcessGroup | None] = {}
# group key -> a second group of the same ranks for tpfx's own checks (the call check): its collectives
# never pair with the program's, so a rank that is one collective ahead times out instead of aborting gloo
_CONTROL: dict[str, dist.ProcessGroup | None] = {}

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
    _GROUPS[key] = group
    if control is not None:
        _CONTROL[key] = control
    else:
        _CONTROL.pop(key, None)


def control_group(key: str) -> dist.ProcessGroup | None:
    """The control group bound with ``key`` (see :func:`bind_group`); the group itself when there is none."""
    return _CONTROL.get(key, _group(key))


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
    return _GROUPS[key]


def _notify(name: str, tensor: torch.Tensor) -> None:
    for observer in _OBSERVERS:
        observer(name, tensor)


# ------------------------------------------------------------------------------ where a collective runs

_GENERATED = "<eval_with_key>"  # the file name torch.fx gives the code it generates for a graph


def _program_site() -> tuple[str, int] | None:
    """(file, line) of the nearest frame of a program's generated code: the graph node calling us."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_GENERATED):
            return frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back
    return None


def _site_text(site: tuple[str, int] | str | None) -> str:
    """The program's line for a site: ``gather_from_tp_1 = tpfx_collectives_gather_from_tp(fc1, 'tp:0-1')``."""
    if isinstance(site, str):
        return site
    if site is None:
        return "outside a tpfx program"
    line = linecache.getline(*site).strip().split(";")[0]
    return f"program line {line!r}" if line else f"{site[0]} line {site[1]}"


def _run(collective: Callable[[], object], name: str, key: str, site: tuple[str, int] | str | None) -> None:
    """Run one torch.distributed call; a failure (a rank that never joined) becomes one CollectiveError line."""
    try:
        collective()
    except RuntimeError as error:  # gloo and NCCL raise RuntimeError (DistBackendError) on timeouts and lost peers
        timeout = group_timeout(_GROUPS.get(key))
        # gloo's message starts with its source location and ends with advice for its own developers
        reason = re.sub(r"^\[[^\]]*:\d+\] ", "", first_line(error)).split(". ")[0]
        raise CollectiveError(
            f"{name} of group {key} at {_site_text(site)} failed: {reason}; another rank did not "
            f"join it within the group timeout ({timeout or 'unknown'}): it raised, skipped a forward or "
            "backward, or was called with other inputs; fix that rank (its own error says why)") from error


def _all_reduce(tensor: torch.Tensor, key: str, name: str, site: tuple[str, int] | None,
                *, backward: bool = False) -> torch.Tensor:
    settle_call_check(key)
    out = tensor.contiguous().clone()
    _notify(name, out)
    group = _group(key)
    _run(lambda: dist.all_reduce(out, group=group), f"{name} (backward)" if backward else name, key, site)
    return out


def _all_gather_last_dim(tensor: torch.Tensor, key: str, name: str, site: tuple[str, int] | None) -> torch.Tensor:
    settle_call_check(key)
    group = _group(key)
    local = tensor.contiguous()
    _notify(name, local)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    _run(lambda: dist.all_gather(parts, local, group=group), name, key, site)
    return torch.cat(parts, dim=-1)


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
    control = _CONTROL.get(key)
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


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:
        ctx.key = key
        ctx.local_width = x.shape[-1]
        return _all_gather_last_dim(x, key, "all_gather", _program_site())

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


def copy_to_tp(x: torch.Tensor, group: str) -> torch.Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward. Precedes a column-parallel linear."""
    return _CopyToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group: str) -> torch.Tensor:
    """All-gather along the last dim forward; this rank's slice of the gradient backward."""
    return _GatherFromTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: str) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward. Follows a row-parallel linear."""
    return _ReduceFromTP.apply(x, group)


# Graph rewriting marks nodes that call these as collectives, e.g. for reports and drawing.
COLLECTIVES: dict[Callable[..., torch.Tensor], str] = {
    copy_to_tp: "copy_to_tp",
    gather_from_tp: "gather_from_tp",
    reduce_from_tp: "reduce_from_tp",
}


def rank_and_size(group: str) -> tuple[int, int]:
    """This process's rank in the tensor-parallel group ``group`` and the group's size (tp)."""
    process_group = _group(group)
    return dist.get_rank(process_group), dist.get_world_size(process_group)
