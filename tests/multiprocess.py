"""The one helper that runs a function in real processes on gloo, for every multi-process test.

Each rank runs ``worker(rank, world_size, *args)`` inside an initialized gloo group (with a timeout,
so a hang fails instead of stalling CI) and returns a picklable result; the parent gets the list of
results, rank order. A rank that raises makes the whole run raise with that rank's traceback.
Process start-up costs seconds of torch import, so callers group many checks into one run.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GROUP_TIMEOUT = datetime.timedelta(seconds=120)


def _entry(rank: int, world_size: int, store_path: str, out_dir: str, worker: Callable[..., Any],
           args: tuple) -> None:
    torch.set_num_threads(1)  # ranks share 2 cores; more threads only thrash
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=GROUP_TIMEOUT)
        result = ("ok", worker(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank's traceback
        result = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(worker: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300) -> list[Any]:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results."""
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        context = mp.start_processes(_entry, args=(world_size, store, tmp, worker, args), nprocs=world_size,
                                     join=False, start_method="spawn")
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        while not context.join(timeout=1):
            if datetime.datetime.now() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world_size} ranks did not finish in {timeout_s}s")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    errors = [f"rank {r}:\n{payload}" for r, (status, payload) in enumerate(results) if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [payload for _, payload in results]
