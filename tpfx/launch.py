"""Run a function in real local processes on a gloo group: what ``tpfx verify`` and the tests use.

Each rank runs ``worker(rank, world_size, *args)`` inside an initialized gloo group (with a timeout,
so a hang fails instead of stalling) and returns a picklable result; the caller gets the results in
rank order. ``worker`` must be importable by name (a module-level function): ranks are spawned.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tpfx.errors import TpfxError, first_line, one_line

GROUP_TIMEOUT = datetime.timedelta(seconds=120)


@dataclass(frozen=True)
class RankError:
    """How one rank failed: its traceback, a one-line summary, and whether it was a tpfx user error."""

    rank: int
    traceback: str
    summary: str
    user_error: bool


class RankFailure(TpfxError):
    """At least one rank raised; ``errors`` holds each failed rank's traceback."""

    def __init__(self, errors: list[RankError]) -> None:
        first = errors[0]
        fix = "" if first.user_error else " (rerun with --debug for the traceback)"
        super().__init__(f"rank {first.rank} failed: {first.summary}{fix}")
        self.errors = errors


class LaunchTimeout(TpfxError):
    """The ranks did not finish in time (they were killed)."""


def _entry(rank: int, world_size: int, store_path: str, out_dir: str, worker: Callable[..., Any],
           args: tuple, group_timeout_s: float) -> None:
    torch.set_num_threads(1)  # local ranks share the cores; more threads only thrash
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=group_timeout_s))
        result = ("ok", worker(rank, world_size, *args))
    except BaseException as error:  # noqa: BLE001 - the parent re-raises it with the rank's traceback
        summary = first_line(error) if isinstance(error, TpfxError) else one_line(error)
        result = ("error", RankError(rank, traceback.format_exc(), summary, isinstance(error, TpfxError)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def launch(worker: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300,
           group_timeout_s: float = GROUP_TIMEOUT.total_seconds(), start_method: str = "spawn") -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` local gloo ranks; return their results.

    Args:
        worker: a module-level function (it is pickled by name into spawned processes).
        world_size: how many processes.
        args: further picklable arguments of ``worker``.
        timeout_s: wall-clock limit for the whole run; the ranks are killed after it.
        group_timeout_s: limit for one collective to wait on the others.
        start_method: ``"spawn"`` (default: each rank a fresh interpreter) or ``"forkserver"`` (ranks
            forked from one server process that imported the modules set with
            ``multiprocessing.set_forkserver_preload`` once: what a test suite with many runs wants).

    Returns:
        The workers' return values in rank order.

    Raises:
        RankFailure: a rank raised (its one-line summary is the message; tracebacks in ``errors``).
        LaunchTimeout: the ranks did not finish within ``timeout_s``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        context = mp.start_processes(_entry, args=(world_size, store, tmp, worker, args, group_timeout_s),
                                     nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout_s
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise LaunchTimeout(f"{world_size} ranks did not finish in {timeout_s:g}s; they were stopped "
                                    "(raise the timeout, or look for a rank that waits on a collective alone)")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    errors = [payload for status, payload in results if status == "error"]
    if errors:
        raise RankFailure(errors)
    return [payload for _, payload in results]
