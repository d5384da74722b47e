"""Process-group set-up shared by the examples: NCCL on GPUs, gloo on CPU, always with a timeout.

Why a timeout: if one rank raises, skips a backward or is fed other inputs, the others wait in their
next collective. With a timeout they fail after it with a one-line ``tpfx.CollectiveError`` naming
the collective and the program line; without one torch waits 30 minutes (tpfx warns about that).
Choose it longer than your slowest step (and checkpoint save), e.g. 5 minutes.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed() -> torch.device:
    """Join the torchrun group (backend from the device) and return this rank's device."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    return torch.device("cpu")
