"""Process teardown: after destroy_process_group no gloo thread of tpfx's programs keeps running.

A gloo backend left alive past destroy_process_group keeps its C++ worker threads running into
interpreter exit, where their teardown races Python's finalization and now and then aborts the rank
(SIGABRT, "terminate called without an active exception"): the flake seen in megatron parity runs and
``tpfx verify``. Each round here builds programs through the paths that pulled the leak in (megatron
with fx shape propagation, torch.export of a Hugging Face model), runs a training step, tears the
group down and reads the process's thread list; then it starts a fresh group for the next round. The
first round also runs a program at tp below the world size: tpfx creates its groups (and every
program's control group), and holds them only weakly, so that destroy_process_group frees them.
"""

from __future__ import annotations

import os
import time
import weakref

import pytest
import torch
import torch.distributed as dist

import tpfx
from examples.gpt import GPTConfig, GPTModel
from tests.multiprocess import run_ranks
from tpfx.collectives import control_group
from tpfx.launch import GROUP_TIMEOUT

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def _gloo_threads() -> list[str]:
    names = (open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))
    return sorted(name for name in names if name.startswith(GLOO_THREADS))


def _gloo_threads_after_teardown(grace_s: float = 10.0) -> list[str]:
    """The gloo threads still running ``grace_s`` after destroy_process_group.

    gloo's TCP loop closes its last connection asynchronously, so a thread may outlive the call by a
    few milliseconds (seen once on CI); a leaked backend keeps its threads for the process's life.
    """
    deadline = time.monotonic() + grace_s
    while (left := _gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _one_training_step(gm: torch.nn.Module, ids: torch.Tensor) -> None:
    out = gm(ids)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    logits.float().square().mean().backward()


def _teardown_rounds(rank: int, world_size: int, store_dir: str, rounds: int,
                     with_hf: bool) -> tuple[list[list[str]], list[tuple[bool, bool]]]:
    left: list[list[str]] = []
    reused: list[tuple[bool, bool]] = []  # (the second program reused the control group, last round's is alive)
    previous: weakref.ref | None = None
    for round_index in range(rounds):
        if round_index:  # the launcher made the first group; later rounds make their own
            dist.init_process_group("gloo", init_method=f"file://{store_dir}/store{round_index}", rank=rank,
                                    world_size=world_size, timeout=GROUP_TIMEOUT)
        torch.manual_seed(round_index)
        ids = torch.randint(0, 64, (2, 8))
        model = GPTModel(GPTConfig(vocab_size=64, max_position_embeddings=16, n_layers=2, n_heads=4, d_model=32,
                                   d_ff=64, dropout=0.0))
        _one_training_step(tpfx.parallelize(model, tp=world_size, mode="megatron"), ids)
        # a second program of the same ranks reuses the control group the first one made (made anew after
        # the previous round destroyed the process group: that one is gone)
        control = weakref.ref(control_group(f"tp:0-{world_size - 1}"))  # weak: a strong one would keep it alive
        _one_training_step(tpfx.parallelize(model, tp=world_size, mode="gather"), ids)
        reused.append((control_group(f"tp:0-{world_size - 1}") is control(),
                       previous is not None and previous() is not None))
        previous = control
        if round_index == 0:  # groups tpfx creates (tp below the world size, the control groups) are freed too
            _one_training_step(tpfx.parallelize(model, tp=1, check_replicas=False), ids)
        if with_hf and round_index == rounds - 1:
            from examples.hf_models import tiny_gpt2
            hf_model, inputs = tiny_gpt2()
            gm = tpfx.parallelize(hf_model, tp=world_size, mode="megatron", tracer="export", example_inputs=inputs)
            _one_training_step(gm, inputs["input_ids"])
        dist.destroy_process_group()
        left.append(_gloo_threads_after_teardown())
    return left, reused


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the thread list from /proc")
def test_destroy_process_group_stops_every_gloo_thread_after_megatron_and_export_programs(tmp_path):
    pytest.importorskip("transformers")
    for rank, (left, reused) in enumerate(run_ranks(_teardown_rounds, 2, str(tmp_path), 3, True)):
        assert left == [[]] * 3, f"rank {rank}: gloo threads still running after destroy_process_group: {left}"
        assert reused == [(True, False)] * 3, f"rank {rank}: (control group reused, last round's still alive): {reused}"
