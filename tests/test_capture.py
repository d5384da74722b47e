"""Capture and call forms: buffer slicing by traced sizes, one graph per form, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tpfx
from examples.gpt import GPTModel, small_config
from tpfx.capture import CallForm, call_form_of, capture, forward_signature


def test_buffer_sliced_by_traced_length_is_captured():
    gm = capture(GPTModel(small_config(n_layers=1)))
    slices = [n for n in gm.graph.nodes if n.op == "call_function" and "getitem" in str(n.target)
              and any(isinstance(a, tuple) for a in n.args)]
    assert any(n.args[0].op == "get_attr" and n.args[0].target.endswith("causal_mask") for n in slices)


def test_traced_graph_equals_eager_for_its_form():
    torch.manual_seed(0)
    model = GPTModel(small_config(n_layers=1)).eval()
    ids = torch.randint(0, 100, (2, 9))
    gm = capture(model, CallForm(frozenset({"attention_mask", "labels"}), training=False))
    torch.testing.assert_close(gm(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_call_form_of_binds_positional_and_keyword_arguments():
    signature = forward_signature(GPTModel(small_config(n_layers=1)))
    ids = torch.zeros(1, 2, dtype=torch.long)
    assert call_form_of(signature, (ids,), {}, training=False).absent == {"attention_mask", "labels"}
    assert call_form_of(signature, (ids, ids), {}, training=True) == CallForm(frozenset({"labels"}), True)
    assert call_form_of(signature, (ids,), {"labels": ids, "attention_mask": None}, training=False).absent == {
        "attention_mask"}
    with pytest.raises(tpfx.ConfigError, match="call does not match forward"):
        call_form_of(signature, (), {"nonsense": 1}, training=False)


def test_program_builds_each_call_form_once_and_shares_parameters():
    torch.manual_seed(0)
    model = GPTModel(small_config(n_layers=1)).eval()
    gm = tpfx.parallelize(model, tp=2, rank=0)
    ids = torch.zeros(1, 4, dtype=torch.long)
    built = gm.module_for_call(ids, ids)
    assert built is not gm and built is gm.module_for_call(ids, attention_mask=ids, labels=None)
    assert gm.module_for_call(ids, ids, ids) is gm
    assert {id(p) for p in built.parameters()} <= {id(p) for p in gm.parameters()}
    assert "labels has been specialized to have value None" in built.code
    assert "attention_mask has been specialized" not in built.code
    with pytest.raises(tpfx.ConfigError, match="not bound in this process"):
        gm(torch.zeros(1, 4, dtype=torch.long))  # an inspection program never runs a collective


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a Python branch on a tensor value cannot be traced
            return x
        return -x


def test_untraceable_model_gets_one_line_naming_the_module():
    with pytest.raises(tpfx.CaptureError) as info:
        capture(_DataDependent())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot capture _DataDependent with torch.fx (train, all arguments): "
                              "module 'inner' (_Branchy) failed: TraceError")
