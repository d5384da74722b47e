"""The column-shard pass: node list after the rewrite, lint, module contents and local numerics."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from examples.gpt import GPTModel, small_config
from tests.models import ReluFFN
from tpfx.passes.column_shard import column_shard
from tpfx.passes.find_sites import find_sites
from tpfx.capture import capture
from tpfx.collectives import copy_to_tp, gather_from_tp
from tpfx.errors import ShardingError
from tpfx.layers import ColumnParallelLinear


def _shard(model: nn.Module, tp: int, rank: int) -> fx.GraphModule:
    gm = capture(model)
    return column_shard(gm, find_sites(gm, tp=tp).sites, tp=tp, rank=rank, group="tp:0-1").gm


def test_node_list_after_rewrite():
    gm = _shard(ReluFFN(), tp=2, rank=1)
    assert [(n.op, n.target) for n in gm.graph.nodes] == [
        ("placeholder", "x"), ("call_function", copy_to_tp), ("call_module", "fc1"),
        ("call_function", gather_from_tp), ("call_function", torch.relu), ("call_module", "fc2"), ("output", "output")]
    gm.graph.lint()
    assert "tpfx_collectives_gather_from_tp(fc1, 'tp:0-1')" in gm.code


def test_shard_holds_this_ranks_rows_only():
    model = ReluFFN()
    gm = _shard(model, tp=4, rank=2)
    shard = gm.get_submodule("fc1")
    assert isinstance(shard, ColumnParallelLinear)
    assert torch.equal(shard.weight, model.fc1.weight[32:48]) and torch.equal(shard.bias, model.fc1.bias[32:48])
    assert shard.weight.data_ptr() != model.fc1.weight.data_ptr()  # owns its storage, never aliases the caller's
    assert isinstance(gm.get_submodule("fc2"), nn.Linear)


def test_gpt_rewrite_has_two_collective_pairs_per_block():
    gm = _shard(GPTModel(small_config(n_layers=2)), tp=2, rank=0)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(copy_to_tp) == 4 and targets.count(gather_from_tp) == 4
    gm.graph.lint()


def test_local_outputs_of_all_ranks_concatenate_to_the_full_linear():
    torch.manual_seed(0)
    linear, x = nn.Linear(8, 12), torch.randn(3, 5, 8)
    parts = [ColumnParallelLinear(linear, tp=3, rank=r)(x) for r in range(3)]
    torch.testing.assert_close(torch.cat(parts, dim=-1), linear(x), rtol=0, atol=1e-6)


def test_tp_not_dividing_out_features_is_one_clear_line_and_changes_nothing():
    model = ReluFFN(d_ff=30)
    gm = capture(model)
    sites = find_sites(gm, tp=4).sites
    with pytest.raises(ShardingError, match=r"^cannot shard 'fc1' \(fc1\): out_features 30 is not divisible by tp=4;"):
        column_shard(gm, sites, tp=4, rank=0, group="tp:0-3")
    assert isinstance(gm.get_submodule("fc1"), nn.Linear)
    assert not any(n.target in (copy_to_tp, gather_from_tp) for n in gm.graph.nodes)
