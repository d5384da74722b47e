"""The torch.export capture path: tracer choice, dynamic shapes, the fixed call form, one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tpfx
from examples.gpt import GPTModel, small_config
from tpfx.collectives import copy_to_tp, gather_from_tp
from tpfx.errors import CaptureError, ConfigError
from tpfx.export_capture import ExportedTensorParallelModule, export_capture

D = 16


class _ShapeBranch(nn.Module):
    """An FFN with a Python branch on a size: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 64), nn.Linear(64, D)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] > 8:  # fx: a Proxy cannot be a bool; export: the last dim is static
            x = x * 2
        y = x + self.fc2(F.gelu(self.fc1(x)))
        return y if scale is None else y * scale


class _ValueBranch(nn.Module):
    """A branch on tensor values: neither tracer can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(a) * 2 + b


def _x(batch: int = 2, seq: int = 5) -> torch.Tensor:
    return torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(batch * 100 + seq))


def test_exported_graph_serves_other_batch_sizes_and_lengths():
    torch.manual_seed(0)
    model = _ShapeBranch().eval()
    exported = export_capture(model, (_x(),))  # the unlifted graph takes the arguments by name
    assert exported.dynamic_dims == ("x.shape[0]", "x.shape[1]") and exported.fixed_dims == ()
    assert any(n.target == torch.ops.aten.linear.default for n in exported.gm.graph.nodes)
    for batch, seq in ((2, 5), (3, 11), (1, 1)):
        torch.testing.assert_close(exported.gm(x=_x(batch, seq)), model(_x(batch, seq)), rtol=0, atol=0)


def test_one_tensor_passed_as_two_arguments_stays_two_graph_inputs():
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    x = _x()
    gm = export_capture(model, (x, x)).gm  # like input_ids passed as labels too
    other = _x(2, 5) + 1
    torch.testing.assert_close(gm(a=x, b=other), model(x, other), rtol=0, atol=0)


def test_auto_falls_back_to_export_and_the_report_says_so():
    torch.manual_seed(0)
    model = _ShapeBranch().eval()
    gm = tpfx.parallelize(model, tp=2, rank=0, example_inputs=(_x(),))
    report = gm.tpfx_report
    assert isinstance(gm, ExportedTensorParallelModule)
    assert report.tracer == "export" and report.tracer_note.startswith("torch.fx could not trace _ShapeBranch (")
    assert report.tracer_note.endswith("so it was captured with torch.export from example_inputs. "
                                       "Dims left dynamic: x.shape[0], x.shape[1].")
    assert [(s.role, s.module_path, s.weight_name, s.bias_name) for s in report.sites] == [
        ("fc1", "fc1", "fc1.weight", "fc1.bias")]
    assert report.sites_table()[0]["collectives"] == ["copy_to_tp", "gather_from_tp"]
    assert report.site_bytes_rank * 2 == report.site_bytes_single  # this rank holds half of fc1, no more
    assert gm.get_parameter("fc1.weight").shape == (32, D) and gm.get_parameter("fc2.weight").shape == (D, 64)


def test_auto_uses_fx_where_it_traces():
    torch.manual_seed(0)
    model = GPTModel(small_config(n_layers=1)).eval()
    ids = torch.randint(0, 100, (2, 8))
    gm = tpfx.parallelize(model, tp=2, rank=0, example_inputs=(ids,))
    assert gm.tpfx_report.tracer == "fx" and not isinstance(gm, ExportedTensorParallelModule)


def test_other_call_forms_and_modes_are_exported_on_first_use_with_the_same_parameters():
    torch.manual_seed(0)
    model = _ShapeBranch().eval()
    gm = tpfx.parallelize(model, tp=2, rank=0, tracer="export", example_inputs={"x": _x()})
    assert [f.describe() for f in gm.call_forms] == ["eval, without scale"]
    scaled = gm.module_for_call(_x(), scale=torch.tensor(2.0))
    assert scaled is not gm and scaled is gm.module_for_call(_x(3, 4), scale=torch.tensor(3.0))  # built once
    assert {id(p) for p in scaled.parameters()} == {id(p) for p in gm.parameters()}
    ops = [n.target for n in scaled.graph.nodes if n.op == "call_function"]
    assert ops.count(copy_to_tp) == ops.count(gather_from_tp) == 1 and "meta" not in scaled.code
    gm.train()
    assert gm.module_for_call(_x()).training and [f.describe() for f in gm.call_forms] == [
        "eval, without scale", "eval, all arguments", "train, without scale"]
    assert model.training is False and list(model.parameters())[0].device.type == "cpu"  # the caller's model
    with pytest.raises(ConfigError, match=r"captured with torch.export for \(eval, x=tensor float32 3-d, "
                                          r"scale=tensor float32 0-d\) and cannot run \(eval, x=tensor float32 3-d\)"):
        scaled(_x())  # a form's own graph, called directly in another form: one line, nothing run


def test_capture_errors_are_one_line_and_say_what_to_do():
    torch.manual_seed(0)
    cases = {
        "bad tracer": (lambda: tpfx.parallelize(_ShapeBranch(), tp=2, rank=0, tracer="jit"), ConfigError,
                       "tracer='jit' is not a tracer; use one of 'auto', 'fx', 'export'"),
        "export without inputs, run": (lambda: tpfx.parallelize(_ShapeBranch(), tp=2, rank=0, tracer="export")(_x()),
                                       ConfigError, "this program was built for inspection"),  # captured, then ran
        "fx only": (lambda: tpfx.parallelize(_ShapeBranch(), tp=2, rank=0, tracer="fx"), CaptureError,
                    "cannot capture _ShapeBranch with torch.fx"),
        "auto without inputs, its report": (lambda: tpfx.parallelize(_ShapeBranch(), tp=2, rank=0).tpfx_report,
                                            ConfigError, "call gm(...) or gm.prepare(<the arguments of one call>) "
                                                         "first, or pass example_inputs= to tpfx.parallelize"),
        "neither": (lambda: tpfx.parallelize(_ValueBranch().eval(), tp=2, rank=0, example_inputs=(_x(),)), CaptureError,
                    "cannot capture _ValueBranch with torch.export (eval, x=tensor float32 3-d)"),
    }
    for label, (call, error_type, expected) in cases.items():
        with pytest.raises(error_type) as raised:
            call()
        assert expected in str(raised.value) and "\n" not in str(raised.value), label


def test_tpfx_explain_and_dump_read_a_hugging_face_model(capsys):
    pytest.importorskip("transformers")
    import json

    from tpfx.cli import main

    assert main(["explain", "examples/hf_models.py:tiny_gpt2", "--format", "json"]) == 0
    linears = json.loads(capsys.readouterr().out)["linears"]
    assert [(row["module"].rsplit(".", 1)[-1], row["role"]) for row in linears if row["sharded"]] == [
        ("c_attn", "qkv"), ("c_fc", "fc1")] * 2
    assert main(["dump", "examples/hf_models.py:tiny_gpt2", "--format", "json", "--batch", "3", "--seq", "5"]) == 0
    dump = json.loads(capsys.readouterr().out)
    assert [row["shard"] for row in dump["sites"]] == [[64, 96], [64, 128]] * 2  # Conv1D: columns of (in, out)
    gathers = [row for row in dump["communication"]["rows"] if row["op"] == "all_gather"]
    assert [row["shape"] for row in gathers] == [[15, 96], [15, 128]] * 2  # 3 x 5 tokens, this rank's columns


def test_a_size_one_example_dim_is_fixed_and_other_sizes_fail_in_one_line():
    torch.manual_seed(0)
    gm = tpfx.parallelize(_ShapeBranch().eval(), tp=2, rank=0, tracer="export", example_inputs=(_x(1, 5),))
    assert gm.tpfx_report.tracer_note.endswith("Dims left dynamic: x.shape[1].")
    with pytest.raises(ConfigError, match=r"^argument x has size 2 in dim 0, but this program was exported from an "
                                          r"example with size 1 there"):
        gm(_x(2, 7))
