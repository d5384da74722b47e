"""Fault injection in real processes: a rank that fails never leaves the others hanging.

Three 2-rank jobs run at once, each a training loop of a tiny GPT in plain processes (an uncaught
exception exits non-zero, as in a user's script), with a 5 s group timeout:

* ``raise``: rank 1 raises before its second step;
* ``skip``: rank 1 skips its second backward and goes on to the next step;
* ``batch``: rank 1 feeds a batch of 3 where rank 0 feeds 2.

The first needs nothing but the group timeout (tpfx's collectives name themselves when it expires);
the other two run with the call check on (the documented debug mode: ``check_calls=True`` for
``skip``, ``TPFX_CHECK_CALLS=1`` in the environment for ``batch``).

Every rank must exit non-zero within the group timeout + 30 s (they used to wait 30 minutes, or
abort inside gloo), and at least one rank of each job must end with a one-line tpfx error.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import re
import sys
import time

import torch
import torch.distributed as dist

import tests.multiprocess  # noqa: F401 - the fork server's preloaded modules

GROUP_TIMEOUT_S = 5
SCENARIOS = ("raise", "skip", "batch")


def rank_main(scenario: str, rank: int, store: str, log: str) -> None:
    """One rank of one job: three training steps, one of them faulty on rank 1; stderr goes to ``log``."""
    import tpfx
    from tpfx.examples.gpt import GPTModel, small_config

    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(descriptor, 2)  # this rank's own stderr, as a terminal would show it
    sys.stderr = os.fdopen(2, "w", buffering=1)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    torch.manual_seed(0)
    model = GPTModel(small_config(vocab_size=64, max_position_embeddings=16, n_layers=1, d_model=32, d_ff=64,
                                  dropout=0.0))
    # the skipped backward and the odd batch are caught by the call check, a debug mode (see parallelize),
    # turned on by the argument or by the environment
    if scenario == "batch":
        os.environ["TPFX_CHECK_CALLS"] = "1"
    gm = tpfx.parallelize(model, tp=2, tracer="fx", check_calls=scenario == "skip")
    for step in range(3):
        faulty = rank == 1 and step == 1
        if faulty and scenario == "raise":
            raise RuntimeError("injected failure on rank 1")
        batch = 3 if faulty and scenario == "batch" else 2
        ids = torch.randint(0, 64, (batch, 8), generator=torch.Generator().manual_seed(step))
        _, loss = gm(ids, labels=ids)
        if faulty and scenario == "skip":
            continue
        loss.backward()
    dist.destroy_process_group()


def test_a_failing_rank_makes_every_rank_exit_non_zero_within_the_group_timeout(tmp_path):
    # the tests' fork server (tests.multiprocess) imported torch and tpfx once; the six ranks are forks of
    # it (six imports would take longer than the whole test on a shared machine), each a fresh process
    # with its own gloo group and stderr
    context = multiprocessing.get_context("forkserver")
    jobs = {scenario: [context.Process(target=rank_main, args=(scenario, rank, str(tmp_path / f"{scenario}.store"),
                                                               str(tmp_path / f"{scenario}{rank}.log")))
                       for rank in range(2)] for scenario in SCENARIOS}
    for process in (p for processes in jobs.values() for p in processes):
        process.start()
    limit = time.monotonic() + 30 + GROUP_TIMEOUT_S + 30  # start-up on a busy machine + timeout + 30 s
    try:
        for process in (p for processes in jobs.values() for p in processes):
            process.join(timeout=max(1.0, limit - time.monotonic()))
    finally:
        hung = [p for processes in jobs.values() for p in processes if p.is_alive()]
        for process in hung:
            process.kill()
    assert not hung, f"{len(hung)} ranks still running after the group timeout + 30 s"
    for scenario, processes in jobs.items():
        codes = [process.exitcode for process in processes]
        assert all(code != 0 for code in codes), f"{scenario}: exit codes {codes}"
        logs = [(tmp_path / f"{scenario}{rank}.log").read_text().strip() for rank in range(2)]
        # torch prefixes an uncaught exception's lines with "[rankN]: " in a process group
        last_lines = [re.sub(r"^\[rank\d+\]: ", "", log.splitlines()[-1]) if log else "" for log in logs]
        tpfx_lines = [line for line in last_lines if line.startswith("tpfx.errors.")]
        assert tpfx_lines, f"{scenario}: no rank ended with a tpfx error: {last_lines}"
        if scenario == "batch":
            assert all("called the program with different inputs" in line for line in last_lines), last_lines
        else:  # the collective, and where in the program it waited
            assert any(" of group tp:0-1 at " in line and "timeout" in line for line in tpfx_lines), tpfx_lines
