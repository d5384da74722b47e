"""The examples run as a user runs them: under torchrun, 2 CPU processes on gloo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(script: str, *args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
               str(ROOT / "examples" / script), *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_parallelize_gpt_prints_the_seeds_figures_and_matches_single_device():
    out = _torchrun("parallelize_gpt.py")
    assert "world_size: 2" in out and "logits shape: (2, 16, 10000)" in out
    diffs = [float(x) for x in re.findall(r"max diff vs (?:rank0|single device): ([-+.\deE]+)", out)]
    assert len(diffs) == 4 and max(diffs) <= 1e-5
    tp_loss, single_loss = map(float, re.search(r"loss: ([\d.]+) \(single device: ([\d.]+)\)", out).groups())
    assert abs(tp_loss - single_loss) <= 1e-5


def test_train_tp_follows_the_single_device_curve():
    out = _torchrun("train_tp.py", "--steps", "8")
    rows = re.findall(r"loss tp=2: ([\d.]+)  single device: ([\d.]+)", out)
    assert len(rows) == 8
    assert all(abs(float(a) - float(b)) <= 1e-4 for a, b in rows)
    assert float(rows[-1][0]) < float(rows[0][0])  # it learns
