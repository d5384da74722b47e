"""The one helper that runs a function in real processes on gloo, for every multi-process test.

Each rank runs ``worker(rank, world_size, *args)`` inside an initialized gloo group (with a timeout,
so a hang fails instead of stalling CI) and returns a picklable result; the parent gets the list of
results, rank order. A rank that raises makes the whole run raise with that rank's traceback.
Process start-up costs seconds of torch import, so callers group many checks into one run.

A thin wrapper over :func:`tpfx.launch.launch`, the launcher ``tpfx verify`` uses too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from tpfx.launch import GROUP_TIMEOUT, LaunchTimeout, RankFailure, launch

# Ranks are forked from one server process that imported these once, instead of each importing torch,
# tpfx and (for the Hugging Face tests) transformers anew: seconds per rank, over a hundred runs a suite.
# The server holds no process group and no thread of torch's pools; a missing optional package is skipped.
# torch._dynamo is imported by the first FakeTensorMode (every parallelize makes one): about 0.7 s a rank.
mp.set_forkserver_preload(["torch", "torch._dynamo", "torch._functorch.aot_autograd", "tpfx", "examples.gpt",
                           "tests.models", "tests.parity", "transformers", "examples.hf_models"])

__all__ = ["GROUP_TIMEOUT", "run_ranks"]


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
