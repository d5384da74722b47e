"""``tpfx verify`` checks every call form: the calls a factory declares, or with ``--forms all`` each
optional argument at a non-default value.

The model below differs under tpfx only when ``scale=`` is given: that branch reads fc1's weight
outside the linear, and a call form traced after fc1 was sharded would read this rank's rows only.
verify used to check the one default call and pass it; the program now refuses that form in one
line (tpfx.passes.check_sharded_reads), and verify reports the refusal as that form's failure.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch

import tests.multiprocess  # noqa: F401 - its fork server, with torch and tpfx imported once
import tpfx.verify
from tpfx.cli import main
from tpfx.launch import launch
from tpfx.targets import _non_default, load_target

SCALED = '''\
import torch
import torch.nn as nn
import torch.nn.functional as F


class ScaledFFN(nn.Module):
    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor, scale: float | None = None, bias: bool = True) -> torch.Tensor:
        h = F.gelu(self.fc1(x))
        if scale is not None:  # the weight itself, outside the linear
            h = h * (self.fc1.weight.sum() * scale)
        return self.fc2(h)


def build():
    torch.manual_seed(0)
    return ScaledFFN(), (torch.randn(2, 4, 16),)


def build_two_calls():
    model, (x,) = build()
    return model, [(x,), {"x": x, "scale": 0.5}]
'''


@pytest.fixture
def scaled(tmp_path) -> str:
    (tmp_path / "scaled.py").write_text(SCALED)
    return str(tmp_path / "scaled.py")


def test_declared_calls_and_every_optional_argument_become_call_forms(scaled):
    declared = load_target(f"{scaled}:build_two_calls").calls(seed=0)
    assert [label for label, _ in declared] == ["x", "x, scale=0.5"]
    every = load_target(f"{scaled}:build").calls(seed=0, every_form=True)
    assert [label for label, _ in every] == ["x", "scale=0.5", "bias=False"]
    assert every[1][1]["scale"] == 0.5 and every[1][1]["x"].shape == (2, 4, 16)


def test_non_default_values_are_made_only_where_the_annotation_allows():
    def f(a, b: int = 3, c: float = 0.0, d: bool = False, e: float | None = None, t: object = None,
          m: torch.Tensor | None = None):
        ...
    made = {name: _non_default(p) for name, p in inspect.signature(f).parameters.items()}
    assert (made["b"], made["c"], made["d"], made["e"]) == (6, 0.5, True, 0.5)
    assert all(made[name] is made["a"] for name in ("t", "m"))  # nothing tpfx could make


def test_verify_forms_all_fails_the_form_only_a_non_default_argument_takes(scaled, capsys, monkeypatch):
    # verify's ranks fork from the tests' fork server instead of importing torch anew (what the CLI does)
    monkeypatch.setattr(tpfx.verify, "launch", functools.partial(launch, start_method="forkserver"))
    code = main(["verify", f"{scaled}:build", "--tracer", "export", "--forms", "all", "--no-color"])
    table = capsys.readouterr().out
    assert code == 1, table
    rows = {line.split("  ")[0]: line.split()[-1] for line in table.splitlines() if line.startswith("[")}
    assert rows["[x] logits"] == "PASS" and rows["[bias=False] logits"] == "PASS", table
    # the scale form reads fc1's sharded weight outside its linear: its program is refused, not silently wrong
    assert "[scale=0.5] logits" not in rows, table
    refused = [line for line in table.splitlines() if line.startswith("FAIL [scale=0.5]: tpfx refuses this call form")]
    assert len(refused) == 1 and "reads the sharded parameter 'fc1.weight'" in refused[0], table
    assert table.rstrip().splitlines()[-1].endswith("; 1 call form(s) refused"), table
