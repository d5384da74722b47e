"""Pairing: each column site finds its row-parallel partner by dataflow, or falls back with a reason."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tpfx
from examples.gpt import GPTModel, small_config
from tpfx.passes.find_sites import find_sites
from tpfx.passes.pair_megatron import HeadDropout, Pair, pair_sites
from tpfx.passes.row_shard import megatron_shard
from tpfx.capture import CallForm, capture
from tpfx.collectives import copy_to_tp, gather_from_tp, reduce_from_tp
from tpfx.rank_parts import rank_part
from tpfx.layers import BlockColumnParallelLinear, ColumnParallelLinear, RowParallelLinear

from tests.models import DropoutInside, Grouped


def _pairing(model: nn.Module, tp: int = 2, form: CallForm | None = None):
    gm = capture(model, form)
    return gm, pair_sites(gm, find_sites(gm, tp=tp), tp=tp)


def test_gpt_pairs_qkv_with_out_proj_and_fc1_with_fc2():
    _, pairing = _pairing(GPTModel(small_config(n_layers=2)))
    assert not pairing.fallbacks
    assert [(p.kind, [s.module_path for s in p.columns], p.row_module_path, p.shard_size) for p in pairing.pairs] == [
        (kind, [f"blocks.{i}.{column}"], f"blocks.{i}.{row}", size) for i in range(2)
        for kind, column, row, size in (("attention", "attn.qkv_proj", "attn.out_proj", 4),
                                        ("ffn", "ffn.fc1", "ffn.fc2", 512))]
    assert pairing.pairs[0].row_weight_shape == (128, 128)


def test_gated_ffn_and_separate_qkv_each_form_one_pair():
    _, pairing = _pairing(Grouped(kv_heads=2))
    assert [([s.module_path for s in p.columns], p.row_module_path) for p in pairing.pairs] == [
        (["q_proj", "k_proj", "v_proj"], "o_proj"), (["gate", "up"], "down")]
    assert [s.role for s in pairing.pairs[1].columns] == ["fc1", "up"]


def test_too_few_heads_for_tp_falls_back_with_the_reason():
    _, pairing = _pairing(GPTModel(small_config(n_layers=1)), tp=8)
    assert [p.kind for p in pairing.pairs] == ["ffn"]  # d_ff 512 still splits 8 ways
    (fallback,) = pairing.fallbacks
    assert [s.module_path for s in fallback.sites] == ["blocks.0.attn.qkv_proj"]
    assert fallback.reason == ("no factor of the input of 'blocks.0.attn.out_proj' can be split across tp=8 "
                               "(4: not divisible by tp=8; 32: 'matmul' contracts it); a tp that divides 4 pairs it")


def test_grouped_query_heads_fewer_than_tp_stay_whole_and_are_narrowed_after_the_repeat():
    """2 kv heads at tp=4: neither the kv heads nor their 2 repeats divide by 4, their product (the query heads) does."""
    model = Grouped(kv_heads=2)
    gm, pairing = _pairing(model, tp=4)
    attention = pairing.pairs[0]
    assert attention.describe() == "q_proj [4*, 8], k_proj [2, 8], v_proj [2, 8] -> o_proj [4*, 8]"
    assert not pairing.fallbacks and attention.shard_size == 4
    # the keys' and values' repeats stay full size: only the queries' shapes could hold the heads (they say -1)
    assert attention.shape_edits == ()
    nodes = {n.name: n for n in gm.graph.nodes}
    narrowed = [(nodes[n.consumer].format_node(), n.producer, n.dim) for n in attention.narrows]
    assert [(producer, dim) for _, producer, dim in narrowed] == [("transpose_3", -3), ("reshape_1", -3)]
    megatron_shard(gm, pairing, tp=4, rank=1, group="tp:0-3")
    parts = [n for n in gm.graph.nodes if n.target is rank_part]
    assert [(n.args[0].name, n.args[1], [u.name for u in n.users]) for n in parts] == [
        ("transpose_3", -3, ["matmul"]), ("reshape_1", -3, ["matmul_1"])]
    expands = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand"]
    assert [n.args[3] for n in expands] == [2, 2]  # 2 repeats of each kv head, as on one device
    k_proj, q_proj = gm.get_submodule("k_proj"), gm.get_submodule("q_proj")
    assert torch.equal(k_proj.weight, model.k_proj.weight) and q_proj.weight.shape == (8, 32)
    assert torch.equal(q_proj.weight, model.q_proj.weight[8:16])  # rank 1's one query head


def test_grouped_query_heads_that_no_tp_split_fits_fall_back_with_the_reason():
    _, pairing = _pairing(Grouped(kv_heads=2), tp=8)  # 4 query heads for 8 ranks
    assert [[s.module_path for s in f.sites] for f in pairing.fallbacks] == [["q_proj", "k_proj", "v_proj"]]
    assert "can be split across tp=8" in pairing.fallbacks[0].reason


class _TwoReaders(nn.Module):
    """fc1's activation feeds two linears: there is no single row partner."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc2(h) + self.fc3(h)


class _Escapes(nn.Module):
    """fc1's activation is also returned: the full activation leaves the pair."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x))
        return self.fc2(h), h


class _ScaledFFN(nn.Module):
    """A learned scale over the whole d_ff between the pair: elementwise, but with a full-size tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)) * self.gamma)


@pytest.mark.parametrize(("model", "reason"), [
    (_TwoReaders(), "the output of 'fc1' reaches several linears (fc2, fc3), not one"),
    (_Escapes(), "the value leaves the model as an output before it reaches a row-parallel linear"),
], ids=["two-readers", "escapes"])
def test_unsafe_pairs_fall_back_to_column_plus_gather(model, reason):
    _, pairing = _pairing(model)
    assert not pairing.pairs
    assert [s.module_path for f in pairing.fallbacks for s in f.sites] == ["fc1"]
    assert pairing.fallbacks[0].reason.startswith(reason)
    assert "\n" not in pairing.fallbacks[0].reason


def test_a_full_size_operand_between_the_pair_is_narrowed_to_the_ranks_part():
    """gamma holds all of d_ff: each rank multiplies its part of the activation by its part of gamma."""
    _, pairing = _pairing(_ScaledFFN())
    (pair,) = pairing.pairs
    assert pair.describe() == "fc1 [16*] -> fc2 [16*]" and not pairing.fallbacks
    assert [(n.consumer, n.producer, n.dim, n.block) for n in pair.narrows] == [("mul", "gamma", -1, 16)]


def test_rewrite_inserts_one_copy_per_input_and_a_reduce_then_bias_per_row():
    model = GPTModel(small_config(n_layers=1))
    gm, pairing = _pairing(model)
    result = megatron_shard(gm, pairing, tp=2, rank=1, group="tp:0-1", source=model)
    gm.graph.lint()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(copy_to_tp) == 2 and targets.count(reduce_from_tp) == 2
    assert gather_from_tp not in targets
    assert len(result.collective_nodes) == 4
    # the head count and width become local; the attention dropout draws the whole mask, keeps its heads;
    # the causal and padding masks, of a shape this graph does not record, are narrowed where they are full size
    assert result.localized_nodes == ("view", "view_1", "rank_part", "rank_part_1", "dropout_module_rank_part")
    masks = [n.args[0] for n in gm.graph.nodes if n.target is rank_part]
    assert [m.target for m in masks] == [operator.invert, operator.eq]  # ~causal, attention_mask == 0
    reduce = next(n for n in gm.graph.nodes if n.target is reduce_from_tp)
    (add,) = reduce.users
    assert add.args[1].op == "get_attr" and add.args[1].target == "blocks.0.attn.out_proj.bias"
    qkv, out_proj = gm.get_submodule("blocks.0.attn.qkv_proj"), gm.get_submodule("blocks.0.attn.out_proj")
    assert isinstance(qkv, BlockColumnParallelLinear) and isinstance(out_proj, RowParallelLinear)
    assert type(gm.get_submodule("blocks.0.ffn.fc1")) is ColumnParallelLinear  # d_ff: one contiguous block
    full = model.blocks[0].attn
    assert torch.equal(qkv.weight, torch.cat([full.qkv_proj.weight[s:s + 64] for s in (64, 192, 320)]))
    assert torch.equal(out_proj.weight, full.out_proj.weight[:, 64:]) and torch.equal(out_proj.bias, full.out_proj.bias)
    assert out_proj.shard_spec("weight").ranges == ((64, 128),) and out_proj.shard_spec("bias") is None


def test_call_forms_pair_alike():
    model = GPTModel(small_config(n_layers=1))
    forms = [CallForm(), CallForm(frozenset({"attention_mask", "labels"})), CallForm(training=True)]
    signatures = {_pairing(model, form=form)[1].signature() for form in forms}
    assert len(signatures) == 1


def test_megatron_program_for_inspection_and_bad_mode():
    model = GPTModel(small_config(n_layers=1))
    gm = tpfx.parallelize(model, tp=2, rank=0, mode="megatron")
    report = gm.tpfx_report
    assert report.mode == "megatron" and [r["role"] for r in report.sites_table()] == ["qkv", "fc1", "row", "row"]
    decisions = {row["module"]: row for row in report.linear_decisions()}
    assert decisions["blocks.0.ffn.fc2"]["sharded"] and "row-parallel partner of 'blocks.0.ffn.fc1'" in decisions[
        "blocks.0.ffn.fc2"]["reason"]
    assert isinstance(gm.tpfx_pairing.pairs[0], Pair)
    with pytest.raises(tpfx.ConfigError, match=r"mode='rows' is not a parallelization mode; use one of 'gather'"):
        tpfx.parallelize(model, tp=2, rank=0, mode="rows")


class _Conv1DAttention(nn.Module):
    """GPT-2's Conv1D written out: weights stored (in, out), ``addmm`` on flattened tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv_weight = nn.Parameter(torch.randn(16, 48) * 0.2)
        self.qkv_bias = nn.Parameter(torch.randn(48) * 0.2)
        self.out_weight = nn.Parameter(torch.randn(16, 16) * 0.2)
        self.out_bias = nn.Parameter(torch.randn(16) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.shape
        qkv = torch.addmm(self.qkv_bias, x.view(-1, width), self.qkv_weight).view(bsz, seq, 3 * width)
        q, k, v = (t.view(bsz, seq, 4, 4).transpose(1, 2) for t in qkv.split(width, dim=2))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(bsz, seq, width)
        return torch.addmm(self.out_bias, out.view(-1, width), self.out_weight).view(bsz, seq, width)


def test_export_graph_pairs_functional_linears_in_either_weight_layout():
    torch.manual_seed(0)
    model = _Conv1DAttention().eval()
    gm = tpfx.parallelize(model, tp=2, rank=1, mode="megatron", tracer="export",
                          example_inputs=(torch.randn(2, 5, 16),))
    (pair,) = gm.tpfx_pairing.pairs
    assert [(s.weight_name, s.layout) for s in pair.columns] == [("qkv_weight", "in_out")]
    assert (pair.column_layouts[0].describe(), pair.row_weight_name, pair.row_bias_name) == (
        "[3, 4*, 4]", "out_weight", "out_bias")
    # (in, out) storage: the column linear keeps whole heads of q, k and v in its columns, the row
    # linear its rows of the split input; the row bias stays whole and is added after the reduce
    assert torch.equal(gm.get_parameter("qkv_weight"),
                       torch.cat([model.qkv_weight[:, s:s + 8] for s in (8, 24, 40)], dim=1))
    assert torch.equal(gm.get_parameter("out_weight"), model.out_weight[8:])
    assert torch.equal(gm.get_parameter("out_bias"), model.out_bias)
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.mm.default in ops and ops.count(reduce_from_tp) == 1 and gather_from_tp not in ops


def test_dropouts_between_a_pair_are_recorded_with_their_head_dim():
    gpt = _pairing(GPTModel(small_config(n_layers=1)))[1]
    assert [p.dropouts for p in gpt.pairs] == [(HeadDropout("blocks_0_attn_dropout", -3),), ()]
    model = DropoutInside().train()
    trained = _pairing(model, form=CallForm(training=True))[1]
    assert [[(d.node_name, d.dim) for d in p.dropouts] for p in trained.pairs] == [
        [("scaled_dot_product_attention", -3)], [("dropout", -1)]]
    evaluated = _pairing(model, form=CallForm(training=False))[1]  # dropout_p=0.0 traced: nothing to draw
    assert [[d.node_name for d in p.dropouts] for p in evaluated.pairs] == [[], ["dropout"]]
    assert trained.signature() == evaluated.signature()  # the forms pair alike


def test_a_dropout_whose_heads_are_not_outermost_in_a_dim_falls_back_with_the_reason():
    class _DropsFusedQkv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bsz, seq, width = x.size()
            qkv = F.dropout(self.qkv(x), 0.1, self.training)  # [3, H, Dh] in one dim: heads are not outermost
            q, k, v = qkv.view(bsz, seq, 3, 4, 8).permute(2, 0, 3, 1, 4)
            return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bsz, seq, width))

    (fallback,) = _pairing(_DropsFusedQkv().train(), form=CallForm(training=True))[1].fallbacks
    assert "dropout 'dropout'" in fallback.reason and "not the outer part of one dim" in fallback.reason


def test_report_says_grouped_keys_and_values_are_kept_whole_not_split():
    gm = tpfx.parallelize(Grouped(kv_heads=2), tp=4, rank=0, mode="megatron")
    shards = {row["module"]: row["shard"] for row in gm.tpfx_report.sites_table()}
    assert shards["q_proj"] == [8, 32] and shards["k_proj"] == shards["v_proj"] == [16, 32]
    assert all(list(gm.get_submodule(path).weight.shape) == shard for path, shard in shards.items())
    decisions = {row["module"]: row for row in gm.tpfx_report.linear_decisions()}
    assert not decisions["k_proj"]["sharded"] and decisions["q_proj"]["sharded"]
    assert "kept whole on every rank" in decisions["k_proj"]["reason"] and "tp=4" in decisions["k_proj"]["reason"]
