"""passes/bucket_gradient_sums.py: the copy-tos of whole parameters become one collective.

On traced graphs: which copy-tos are put together (parameters, per group key and dtype; not computed
tensors, not a lone one) and where the bucket goes. Numerics in this process with the all-reduce
replaced by a stand-in that doubles (two ranks holding the same gradient): the bucketed program's
gradients equal those of one copy-to per parameter, in one all-reduce instead of several, and a
parameter whose read no loss reaches gets no gradient, as without the bucket. Parity in real processes is in
tests/test_sequence_parallel.py (every gradient and 20 AdamW steps, with the bucket).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import tpfx.collectives as collectives
from tpfx.collectives import copy_to_tp, sum_gradients_over_tp
from tpfx.passes.bucket_gradient_sums import bucket_gradient_sums


class Norms(nn.Module):
    """Two float32 parameters and one float64 one read through copy-tos, and an activation's copy-to."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.shift = nn.Parameter(torch.linspace(-1.0, 1.0, 6))
        self.unused = nn.Parameter(torch.ones(6))  # read, but nothing of it reaches the output
        self.wide = nn.Parameter(torch.ones(6, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tp(x, "tp:test")
        y = x * copy_to_tp(self.scale, "tp:test") + copy_to_tp(self.shift, "tp:test")
        copy_to_tp(self.unused, "tp:test") * 0
        return y * copy_to_tp(self.wide, "tp:test").float()


def _trace(module: nn.Module) -> fx.GraphModule:
    """The module's graph with each copy-to one node, as tpfx's rewrites insert them."""
    return fx.GraphModule(module, fx.Tracer(autowrap_functions=(copy_to_tp,)).trace(module))


def _traced() -> fx.GraphModule:
    torch.manual_seed(0)
    return _trace(Norms())


def _calls(gm: fx.GraphModule, target: object) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_the_parameters_of_one_dtype_share_one_bucket_and_the_rest_stay():
    gm = _traced()
    (bucket,) = bucket_gradient_sums(gm)
    gm.graph.lint()
    assert bucket.target is sum_gradients_over_tp and bucket.args[1] == "tp:test"
    assert [str(read.target) for read in bucket.args[0]] == ["scale", "shift", "unused"]
    # the activation's copy-to and the lone float64 parameter's stay copy-tos
    assert sorted(n.args[0].name for n in _calls(gm, copy_to_tp)) == ["wide", "x"]
    items = _calls(gm, operator.getitem)
    assert [item.args for item in items] == [(bucket, 0), (bucket, 1), (bucket, 2)]
    # the bucket comes before every read of its items: where the first copy-to was
    order = list(gm.graph.nodes)
    assert all(order.index(bucket) < order.index(user) for item in items for user in item.users)


def test_a_lone_parameter_copy_is_left_alone():
    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * copy_to_tp(self.w, "tp:test")

    gm = _trace(One())
    assert bucket_gradient_sums(gm) == [] and len(_calls(gm, copy_to_tp)) == 1


@pytest.fixture
def doubling_all_reduce(monkeypatch) -> list[tuple[int, ...]]:
    """The all-reduce of two ranks holding the same tensor: it doubles. Returns the shapes it was handed."""
    handed: list[tuple[int, ...]] = []

    def doubled(tensor, key, name, site, *, backward=False, op=None):
        handed.append(tuple(tensor.shape))
        return tensor * 2

    monkeypatch.setattr(collectives, "_all_reduce", doubled)
    return handed


def test_bucketed_gradients_equal_one_copy_per_parameter_in_one_all_reduce(doubling_all_reduce):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    grads = {}
    for bucketed in (False, True):
        gm = _traced()
        if bucketed:
            bucket_gradient_sums(gm)
            gm.recompile()
        doubling_all_reduce.clear()
        gm(x).square().sum().backward()
        grads[bucketed] = {name: p.grad for name, p in gm.named_parameters()}
        calls = list(doubling_all_reduce)
    # backward order: the float64 one alone (read last), then scale and shift flattened together; unused
    # gets no gradient, as without the bucket (a zero one would still be stepped by weight decay)
    assert calls == [(6,), (12,)]
    assert grads[False]["unused"] is None and grads[True]["unused"] is None
    for name, grad in grads[False].items():
        if grad is not None:
            assert torch.equal(grads[True][name], grad), name
    model = Norms()  # by hand: d(sum y^2)/d scale = sum over rows of 2 y x, doubled by the sum over ranks
    with torch.no_grad():
        y = x * model.scale + model.shift
    assert torch.allclose(grads[True]["scale"], 2 * (2 * y * x).sum(0))
