"""Output a person reads: dump's signature, explain's width, the communication table's names, sentences,
and no torch-internal deprecation warning from tpfx's export calls."""

from __future__ import annotations

import json
import typing
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpfx
from examples.gpt import tiny_gpt
from tpfx.cli import main
from tpfx.export_capture import quiet_export
from tpfx.passes.comm_table import comm_table
from tpfx.readable_code import readable_code, type_text

GPT = "examples/gpt.py:tiny_gpt"


class _RootWeights(nn.Module):
    """An FFN written with the model's own weights (no Linear modules): the pair is two parameters of the root."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(torch.randn(d, 4 * d)), nn.Parameter(torch.randn(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(x @ self.w_in) @ self.w_out


class _Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(4 * d, d)), nn.Parameter(torch.randn(d, 4 * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.linear(F.relu(F.linear(x, self.w1)), self.w2)


class _BlockWeights(nn.Module):
    """Both weights of the pair belong to one module: the table names each weight, not the module twice."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _run(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_dump_writes_argument_types_as_python_does(capsys):
    out = _run(capsys, "dump", GPT, "--tp", "2")
    signature = next(line for line in out.splitlines() if line.startswith("def forward("))
    assert signature == ("def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, "
                         "labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:")
    assert "_torch_Tensor_" not in out
    document = json.loads(_run(capsys, "dump", GPT, "--format", "json", "--diff"))
    assert document["graph"]["code"].splitlines()[0] == signature and "_torch_" not in document["graph"]["diff"]
    assert [type_text(t) for t in (typing.Optional[torch.Tensor], dict[str, list[int]], tuple[int, ...], None)] == [
        "Tensor | None", "dict[str, list[int]]", "tuple[int, ...]", "None"]
    traced = torch.fx.symbolic_trace(_RootWeights())  # real annotations (no PEP 563): the same spelling
    assert readable_code(traced).strip().splitlines()[0] == "def forward(self, x: Tensor) -> Tensor:"


def test_explain_fits_100_columns_and_json_keeps_every_reason_whole(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # not a terminal: 100 columns
    text = _run(capsys, "explain", GPT, "--mode", "megatron")
    assert max(len(line) for line in text.splitlines()) <= 100
    linears = json.loads(_run(capsys, "explain", GPT, "--mode", "megatron", "--format", "json"))["linears"]
    assert max(len(row["reason"]) for row in linears) > 100  # the wrapped text is all there
    flat = " ".join(" ".join(text.split()).split())
    for row in linears:
        assert " ".join(row["reason"].split()) in flat, row["module"]


def test_every_reduce_row_of_the_megatron_table_names_its_linear():
    x = torch.randn(2, 8, 16, requires_grad=True)
    # the weights are get_attr nodes, as in every exported graph: the names come from the plan either way
    for model, expected in ((_RootWeights(), ["w_in", "w_out"]), (_BlockWeights(), ["block.w1", "block.w2"])):
        gm = tpfx.parallelize(model, tp=2, rank=0, mode="megatron", tracer="fx", example_inputs=(x,))
        rows = comm_table(gm, {"x": x}, tp=2).rows
        assert sorted(row.module for row in rows) == expected, (type(model).__name__, rows)
    gpt = tpfx.parallelize(tiny_gpt(), tp=2, rank=0, mode="megatron")
    rows = comm_table(gpt, {"input_ids": torch.zeros(2, 8, dtype=torch.long)}, tp=2).rows
    assert all(row.module for row in rows) and {row.module.rsplit(".", 1)[-1] for row in rows
                                                if row.collective == "reduce_from_tp"} == {"out_proj", "fc2"}


def test_call_forms_read_as_a_sentence():
    torch.manual_seed(0)
    gm = tpfx.parallelize(tiny_gpt().eval(), tp=2, rank=0)
    assert repr(gm.call_forms) == "1 call form built: eval, all arguments (the program's own graph)"
    gm.module_for_call(torch.zeros(2, 8, dtype=torch.long))
    assert str(gm.call_forms) == ("2 call forms built: eval, all arguments (the program's own graph); "
                                  "eval, without attention_mask, labels")


def test_tpfx_export_calls_show_no_leafspec_deprecation_and_hide_nothing_else():
    model = _RootWeights()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tpfx.parallelize(model, tp=2, rank=0, tracer="export", example_inputs=(torch.randn(2, 3, 16),))
        with quiet_export():
            warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen if issubclass(w.category, FutureWarning)] == ["another deprecation"]
