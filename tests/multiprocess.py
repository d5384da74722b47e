"""The one helper that runs a function in real processes on gloo, for every multi-process test.

Each rank runs ``worker(rank, world_size, *args)`` inside an initialized gloo group (with a timeout,
so a hang fails instead of stalling CI) and returns a picklable result; the parent gets the list of
results, rank order. A rank that raises makes the whole run raise with that rank's traceback.
Process start-up costs seconds of torch import, so callers group many checks into one run.

A thin wrapper over :func:`tpfx.launch.launch`, the launcher ``tpfx verify`` uses too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch.distributed as dist
import torch.multiprocessing as mp

from tpfx.launch import GROUP_TIMEOUT, LaunchTimeout, RankFailure, launch

# Ranks are forked from one server process that imported these once, instead of each importing torch,
# tpfx and (for the Hugging Face tests) transformers anew: seconds per rank, over a hundred runs a suite.
# The server holds no process group and no thread of torch's pools; a missing optional package is skipped.
# torch._dynamo is imported by the first FakeTensorMode (every parallelize makes one): about 0.7 s a rank.
mp.set_forkserver_preload(["torch", "torch._dynamo", "torch._functorch.aot_autograd", "tpfx", "examples.gpt",
                           "tests.models", "tests.parity", "transformers", "examples.hf_models"])

__all__ = ["GROUP_TIMEOUT", "merged", "rank_cases", "run_ranks"]

Case = TypeVar("Case")


def run_ranks(worker: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300) -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results.

    Raises:
        AssertionError: a rank raised; the message holds every failed rank's traceback.
        TimeoutError: the ranks did not finish within ``timeout_s``.
    """
    try:
        return launch(worker, world_size, *args, timeout_s=timeout_s, start_method="forkserver")
    except RankFailure as failure:
        raise AssertionError("\n".join(f"rank {e.rank}:\n{e.traceback}" for e in failure.errors)) from None
    except LaunchTimeout as timeout:
        raise TimeoutError(str(timeout)) from None


def rank_cases(cases: Sequence[Case], tp_of: Callable[[Case], int]) -> list[tuple[Case, dist.ProcessGroup | None]]:
    """The cases this rank checks, in order, each with the group to pass to ``parallelize(group=...)``.

    A case whose tp equals the world size runs on every rank (group None: the world). A world of 4
    holds two groups of tp=2: each checks every other tp=2 case, at the same time, where both
    checking all of them would do the same work twice. Every rank calls this with the same cases
    (the groups are made collectively, here, before any case runs); :func:`merged` puts the ranks'
    results back together.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    groups: dict[int, dist.ProcessGroup] = {}
    for tp in dict.fromkeys(tp_of(case) for case in cases):  # every rank makes every group, in the same order
        if tp < world:
            for first in range(0, world, tp):
                group = dist.new_group(list(range(first, first + tp)), timeout=GROUP_TIMEOUT)
                if first <= rank < first + tp:
                    groups[tp] = group
    mine, seen = [], dict.fromkeys(groups, 0)
    for case in cases:
        tp = tp_of(case)
        if tp not in groups:
            mine.append((case, None))
            continue
        if seen[tp] % (world // tp) == rank // tp:
            mine.append((case, groups[tp]))
        seen[tp] += 1
    return mine


def merged(per_rank: Sequence[dict]) -> dict:
    """Every case's result from the ranks' results (see :func:`rank_cases`), the lowest rank's where several ran it."""
    results: dict = {}
    for ranks_results in reversed(per_rank):
        results |= ranks_results
    return results
