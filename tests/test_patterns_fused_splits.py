"""A fused multi-query / grouped-query projection cut into unequal pieces: ``[q | k | v]`` of H query heads
and KV key/value heads, by ``split([H*Dh, KV*Dh, KV*Dh])`` (``split_with_sizes`` in exported graphs) or by
slices of the fused output, then the key/value heads repeated to the query heads.

Gather mode: the fused linear is one ``qkv`` site. Megatron mode: each piece is factorized on its own
(q's ``[H, Dh]``, k's and v's ``[KV, Dh]``); the layout is a list of pieces, each split or kept whole, and
a rank's rows are the union of each piece's blocks. When tp divides KV every piece is split by key/value
head groups; when it does not (multi-query KV=1, or KV < tp) the k and v pieces are kept whole on every
rank and their weight rows' gradient is all-reduced. The split sizes and slice bounds become the rank's.

The models are written here. The in-process checks run every rank's program with the collectives left
out (identity) and sum the row-parallel partial sums; the spawn checks logits, loss and every gradient
in real gloo processes (world 4: tp=2 in two groups, each checking half the cases, and tp=4), both modes, both tracers.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import tpfx
from tpfx.capture import capture
from tpfx.checkpoint import parameter_shard_specs
from tpfx.collectives import copy_to_tp, reduce_from_tp
from tpfx.passes.factors import FeatureLayout
from tpfx.passes.find_sites import find_sites
from tpfx.passes.factors import ShapeEdit
from tpfx.passes.localize_shapes import localize_shapes
from tpfx.passes.pair_megatron import Pairing, pair_sites
from tpfx.passes.row_shard import megatron_shard
from tpfx.rank_parts import rank_part, take_part
from tests.multiprocess import merged, rank_cases, run_ranks
from tests.parity import check_programs_of_every_mode_and_tp, grad_diffs, max_diff, square_mean_step

HEAD_DIM = 8
TOL = 1e-5


class FusedSplit(nn.Module):
    """One fused projection of ``heads`` query heads and ``kv_heads`` key/value heads, cut into q, k and v.

    ``cut``: ``"split"`` (``qkv.split(sizes, dim=-1)``), ``"torch.split"`` (``torch.split(qkv, sizes,
    dim=split_dim)``), ``"slices"`` (``qkv[..., :q]``, ``qkv[..., q:q + kv]``, ``qkv[..., q + kv:]``) or
    ``"slices from the end"`` (``qkv[..., :-2 * kv]``, ``qkv[..., -2 * kv:-kv]``, ``qkv[..., -kv:]``).
    ``repeat``: the key/value heads repeated to the query heads by ``expand`` + ``reshape`` or by
    ``repeat_interleave``. ``attention``: ``"sdpa"`` or ``"written"`` (matmul, softmax, matmul).
    ``rotary``: rotate q and k by position (halves of each head swapped, as LLaMA's ``rotate_half``).
    """

    def __init__(self, kv_heads: int, *, heads: int = 4, cut: str = "split", repeat: str = "expand",
                 attention: str = "sdpa", split_dim: int = -1, rotary: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.width = heads, kv_heads, heads * HEAD_DIM
        self.cut, self.repeat, self.attention, self.split_dim = cut, repeat, attention, split_dim
        self.rotary = rotary
        angles = torch.arange(16.0)[:, None] * torch.linspace(0.1, 1.0, HEAD_DIM // 2)[None, :]  # (max T, Dh / 2)
        self.register_buffer("cos", angles.cos().repeat(1, 2), persistent=False)
        self.register_buffer("sin", angles.sin().repeat(1, 2), persistent=False)
        self.q_size, self.kv_size = heads * HEAD_DIM, kv_heads * HEAD_DIM
        self.qkv = nn.Linear(self.width, self.q_size + 2 * self.kv_size)
        self.proj = nn.Linear(self.width, self.width)

    def _pieces(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sizes = [self.q_size, self.kv_size, self.kv_size]
        if self.cut == "split":
            return qkv.split(sizes, dim=-1)
        if self.cut == "torch.split":
            return torch.split(qkv, sizes, dim=self.split_dim)
        if self.cut == "slices from the end":
            return qkv[..., :-2 * self.kv_size], qkv[..., -2 * self.kv_size:-self.kv_size], qkv[..., -self.kv_size:]
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        return qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]

    def _to_query_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, KV, T, Dh) -> (B, H, T, Dh): each key/value head serves heads // kv_heads query heads."""
        groups = self.heads // self.kv_heads
        if self.repeat == "interleave":
            return t.repeat_interleave(groups, dim=1)
        bsz, kv, seq, dh = t.shape
        return t[:, :, None].expand(bsz, kv, groups, seq, dh).reshape(bsz, kv * groups, seq, dh)

    def _rotate(self, t: torch.Tensor, seq: int) -> torch.Tensor:
        """(B, heads, T, Dh) rotated by position: the two halves of each head swapped (one negated)."""
        if not self.rotary:
            return t
        half = HEAD_DIM // 2
        swapped = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        return t * self.cos[:seq] + swapped * self.sin[:seq]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, k, v = self._pieces(self.qkv(x))  # (B, T, H*Dh), (B, T, KV*Dh), (B, T, KV*Dh)
        q = self._rotate(q.view(bsz, seq, self.heads, HEAD_DIM).transpose(1, 2), seq)
        k = self._rotate(k.view(bsz, seq, self.kv_heads, HEAD_DIM).transpose(1, 2), seq)
        k = self._to_query_heads(k)
        v = self._to_query_heads(v.view(bsz, seq, self.kv_heads, HEAD_DIM).transpose(1, 2))
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM), dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bsz, seq, self.width))


class HeadsThenSplit(nn.Module):
    """Falcon-like: the fused output viewed as ``H + 2*KV`` heads first, then split into q, k and v heads."""

    def __init__(self, kv_heads: int, *, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.width = heads, kv_heads, heads * HEAD_DIM
        self.qkv = nn.Linear(self.width, (heads + 2 * kv_heads) * HEAD_DIM, bias=False)
        self.proj = nn.Linear(self.width, self.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        heads = self.qkv(x).view(bsz, seq, self.heads + 2 * self.kv_heads, HEAD_DIM)
        q, k, v = heads.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM), dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(bsz, seq, self.width))


class InOutLinear(nn.Module):
    """A linear whose weight is stored (in, out) and applied by ``addmm``, as GPT-2's Conv1D."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / math.sqrt(n_in))
        self.bias = nn.Parameter(torch.randn(n_out) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.size()[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(shape)


class InOutFused(nn.Module):
    """A multi-query attention whose fused projection is an (in, out) weight: its pieces are weight columns."""

    def __init__(self, kv_heads: int, *, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.width = heads, kv_heads, heads * HEAD_DIM
        self.c_attn = InOutLinear(self.width, (heads + 2 * kv_heads) * HEAD_DIM)
        self.c_proj = InOutLinear(self.width, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, k, v = self.c_attn(x).split([self.heads * HEAD_DIM, self.kv_heads * HEAD_DIM, self.kv_heads * HEAD_DIM], 2)
        q = q.view(bsz, seq, self.heads, HEAD_DIM).transpose(1, 2)
        groups = self.heads // self.kv_heads
        k, v = (t.view(bsz, seq, self.kv_heads, HEAD_DIM).transpose(1, 2).repeat_interleave(groups, dim=1)
                for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(out.transpose(1, 2).reshape(bsz, seq, self.width))


def _inputs(width: int) -> torch.Tensor:
    return torch.randn(2, 5, width, generator=torch.Generator().manual_seed(3))


def _pairing(model: nn.Module, tp: int) -> tuple[fx.GraphModule, Pairing]:
    gm = capture(model)
    return gm, pair_sites(gm, find_sites(gm, tp=tp), tp=tp)


# ------------------------------------------------------------------------------------------ layouts


def _layout(*pieces: tuple[tuple[int, ...], int | None]) -> FeatureLayout:
    return FeatureLayout.of_segments(tuple(FeatureLayout(sizes, axis) for sizes, axis in pieces))


def test_a_layout_of_pieces_holds_each_pieces_blocks_of_this_rank():
    mqa = _layout(((4, 8), 0), ((8,), None), ((8,), None))  # 4 query heads split, one key/value head whole
    assert mqa.size == 48 and not mqa.whole and mqa.describe() == "[4*, 8 | 8 | 8]"
    assert [mqa.ranges(2, r) for r in range(2)] == [((0, 16), (32, 48)), ((16, 48),)]
    assert mqa.local_size(2) == 32 and mqa.whole_local_ranges(2) == ((16, 32),)
    gqa = _layout(((2, 2, 8), 0), ((2, 8), 0), ((2, 8), 0))  # split by key/value head groups
    assert [gqa.ranges(2, r) for r in range(2)] == [((0, 16), (32, 40), (48, 56)), ((16, 32), (40, 48), (56, 64))]
    assert gqa.local_size(2) == 32 and gqa.whole_local_ranges(2) == ()
    whole = _layout(((2, 8), None), ((8,), None))
    assert whole.whole and whole.ranges(4, 3) == ((0, 24),)


def test_a_layout_of_pieces_is_validated():
    with pytest.raises(ValueError, match="two or more flat pieces"):
        FeatureLayout((48,), None, (FeatureLayout((48,), 0),))
    with pytest.raises(ValueError, match="two or more flat pieces"):
        FeatureLayout((40,), None, (FeatureLayout((32,), 0), FeatureLayout((16,), None)))


# ------------------------------------------------------------------------------------- gather mode


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("cut", ["split", "slices"])
def test_the_fused_projection_is_one_qkv_site(tracer, cut):
    model = FusedSplit(kv_heads=1, cut=cut, repeat="interleave")
    gm = tpfx.parallelize(model, tp=2, rank=0, tracer=tracer, example_inputs=(_inputs(model.width),))
    assert [(s.role, s.module_path, s.weight_shape, s.shard_shape) for s in gm.tpfx_report.sites] == [
        ("qkv", "qkv", (48, 32), (24, 32))]
    assert [r.module_path for r in gm.tpfx_report.replicated] == ["proj"]


# ---------------------------------------------------------------------------------- megatron: pairs

MQA = _layout(((4, 8), 0), ((8,), None), ((8,), None))
GQA_SPLIT = _layout(((2, 2, 8), 0), ((2, 8), 0), ((2, 8), 0))
GQA_WHOLE = _layout(((4, 8), 0), ((2, 8), None), ((2, 8), None))  # 2 kv heads at tp=4: their product is split


@pytest.mark.parametrize("cut", ["split", "slices"])
@pytest.mark.parametrize("repeat", ["expand", "interleave"])
@pytest.mark.parametrize(("kv_heads", "tp", "layout", "split"), [
    (1, 2, MQA, 4), (1, 4, MQA, 4), (2, 2, GQA_SPLIT, 2), (2, 4, GQA_WHOLE, 4)])
def test_each_piece_gets_its_own_factorization(cut, repeat, kv_heads, tp, layout, split):
    _, pairing = _pairing(FusedSplit(kv_heads, cut=cut, repeat=repeat), tp)
    assert not pairing.fallbacks
    (pair,) = pairing.pairs
    assert [s.role for s in pair.columns] == ["qkv"] and pair.row_module_path == "proj"
    assert pair.column_layouts == (layout,) and pair.shard_size == split  # heads, or kv head groups
    assert pair.row_layout.describe() == ("[2*, 2, 8]" if layout is GQA_SPLIT else "[4*, 8]")
    assert len(pair.narrows) == (2 if layout is GQA_WHOLE else 0)  # k and v, repeated, meet the local query heads


def test_kv_heads_fewer_than_tp_whose_repeats_divide_split_the_repeats():
    """8 query heads over 2 key/value heads at tp=4: each rank holds one query head of each group."""
    _, pairing = _pairing(FusedSplit(2, heads=8), 4)
    (pair,) = pairing.pairs
    assert pair.describe() == "qkv [2, 4*, 8 | 2, 8 | 2, 8] -> proj [2, 4*, 8]"
    assert pair.column_layouts[0].ranges(4, 1) == ((8, 16), (40, 48), (64, 96))
    assert pair.narrows == ()  # the repeat count is divided instead: 4 repeats -> 1


def test_heads_viewed_first_then_split_keep_the_pieces_outermost():
    _, pairing = _pairing(HeadsThenSplit(kv_heads=1), 2)
    (pair,) = pairing.pairs
    assert pair.describe() == "qkv [1, 4*, 8 | 1, 8 | 1, 8] -> proj [4*, 8]"
    views = [e for e in pair.shape_edits if e.kept]  # view(b, s, H + 2, Dh): (6 - 2) / tp + 2
    assert [(e.value, e.kept) for e in views] == [(6, 2)]


def test_fx_split_counted_from_the_front_needs_the_rank_and_export_pairs_it():
    model = FusedSplit(kv_heads=2, cut="torch.split", split_dim=2)
    _, pairing = _pairing(model, 2)
    (fallback,) = pairing.fallbacks
    assert fallback.reason.startswith("dim 2 counted from the front needs the rank (pass example inputs)")
    gm = tpfx.parallelize(model, tp=2, rank=0, mode="megatron", tracer="export", example_inputs=(_inputs(32),))
    assert [p.column_layouts for p in gm.tpfx_pairing.pairs] == [(GQA_SPLIT,)]


def test_fx_split_counted_from_the_front_pairs_with_the_shapes_parallelize_captures():
    """Through ``parallelize`` an fx capture carries shapes: the fused output's rank is known, the split pairs."""
    model = FusedSplit(kv_heads=2, cut="torch.split", split_dim=2)
    gm = tpfx.parallelize(model, tp=2, rank=0, mode="megatron", tracer="fx", example_inputs=(_inputs(32),))
    assert gm.tpfx_report.tracer == "fx"
    assert [p.column_layouts for p in gm.tpfx_pairing.pairs] == [(GQA_SPLIT,)]


# ------------------------------------------------------------------------ megatron: rewritten graphs


def _calls(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if getattr(n.target, "__name__", n.target) == name
            or n.op == "call_method" and n.target == name]


@pytest.mark.parametrize(("kv_heads", "tp", "sizes", "slices"), [
    (1, 2, [16, 8, 8], [(None, 16), (16, 24), (24, None)]),
    (1, 4, [8, 8, 8], [(None, 8), (8, 16), (16, None)]),
    (2, 2, [16, 8, 8], [(None, 16), (16, 24), (24, None)]),
    (2, 4, [8, 16, 16], [(None, 8), (8, 24), (24, None)]),
])
def test_split_sizes_and_slice_bounds_become_the_ranks(kv_heads, tp, sizes, slices):
    for cut in ("split", "slices"):
        gm, pairing = _pairing(FusedSplit(kv_heads, cut=cut), tp)
        megatron_shard(gm, pairing, tp=tp, rank=tp - 1, group=f"tp:0-{tp - 1}")
        if cut == "split":
            assert [n.args[1] for n in _calls(gm, "split")] == [sizes]
        else:
            bounds = [n.args[1][1] for n in _calls(gm, "getitem") if isinstance(n.args[1], tuple)
                      and n.args[1][0] is Ellipsis]
            assert [(b.start, b.stop) for b in bounds] == slices


def test_export_split_with_sizes_and_slices_become_the_ranks():
    x = _inputs(32)
    split = tpfx.parallelize(FusedSplit(1), tp=2, rank=1, mode="megatron", tracer="export", example_inputs=(x,))
    assert [n.args[1] for n in split.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default] == [[16, 8, 8]]
    sliced = tpfx.parallelize(FusedSplit(1, cut="slices"), tp=2, rank=1, mode="megatron", tracer="export",
                              example_inputs=(x,))
    bounds = [n.args[2:4] for n in sliced.graph.nodes if n.target is torch.ops.aten.slice.Tensor and n.args[1] == 2]
    assert [(start, min(stop, 32)) for start, stop in bounds] == [(0, 16), (16, 24), (24, 32)]


def test_whole_pieces_weight_rows_pass_through_copy_to_tp():
    """k and v kept whole: the linear reads its local weight as [q rows | copy_to_tp(k and v rows)]."""
    model = FusedSplit(kv_heads=1)
    gm, pairing = _pairing(model, 2)
    megatron_shard(gm, pairing, tp=2, rank=1, group="tp:0-1", source=model)
    (linear,) = [n for n in gm.graph.nodes if n.target is F.linear]
    data, weight, bias = linear.args
    assert data.target is copy_to_tp  # the input's gradient is all-reduced: every row's share, once
    for operand, dim in ((weight, 0), (bias, 0)):
        assert operand.target is torch.cat and operand.args[1] == dim
        first, second = operand.args[0]
        assert first.target is torch.narrow and first.args[1:] == (dim, 0, 16)  # this rank's 2 query heads
        assert second.target is copy_to_tp and second.args[0].args[1:] == (dim, 16, 16)  # k and v, whole
    assert not any(u.target is copy_to_tp for u in linear.users)  # no all-reduce of the output's gradient
    specs = parameter_shard_specs(gm)
    assert specs["qkv.weight"].ranges == ((16, 48),)
    assert torch.equal(specs["qkv.weight"].take(model.qkv.weight), gm.get_parameter("qkv.weight"))


def test_export_whole_pieces_of_an_in_out_weight_are_its_columns():
    model = InOutFused(kv_heads=1)
    gm = tpfx.parallelize(model, tp=2, rank=1, mode="megatron", tracer="export", example_inputs=(_inputs(32),))
    assert [p.describe() for p in gm.tpfx_pairing.pairs] == ["c_attn [4*, 8 | 8 | 8] -> c_proj [4*, 8]"]
    (addmm,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.addmm.default]
    bias, _, weight = addmm.args
    assert weight.target is torch.cat and weight.args[1] == 1  # the (in, out) weight's columns are the features
    assert [(n.target, n.args[1:]) for n in weight.args[0]] == [(torch.narrow, (1, 0, 16)), (copy_to_tp, ("tp:0-1",))]
    assert weight.args[0][1].args[0].args[1:] == (1, 16, 16) and bias.target is torch.cat and bias.args[1] == 0
    assert gm.get_parameter("c_attn.weight").shape == (32, 32)
    views = [n.args[1] for n in gm.graph.nodes if n.target is torch.ops.aten.view.default and n.args[0] is addmm]
    assert [size[-1] for size in views] == [32]  # (B, T, 48) -> this rank's 16 + 8 + 8


def _clip(module: nn.Module, args: tuple) -> tuple:
    return (args[0].clamp(-3, 3),)


def test_a_hook_on_a_fused_linear_with_whole_pieces_falls_back_and_is_carried_when_every_piece_splits():
    """Whole pieces apply the weight as F.linear in the graph (not the module): its hooks would not run."""
    mqa = FusedSplit(kv_heads=1)
    mqa.qkv.register_forward_pre_hook(_clip)
    (fallback,) = _pairing(mqa, 2)[1].fallbacks
    assert fallback.reason == ("'qkv' has a forward pre-hook '_clip', and its pieces [4*, 8 | 8 | 8] kept whole at "
                               "this tp are applied as F.linear in the graph, which would skip it; remove the hook or "
                               "use a tp that divides the key/value heads")
    gqa = FusedSplit(kv_heads=2)
    gqa.qkv.register_forward_pre_hook(_clip)
    gm = tpfx.parallelize(gqa, tp=2, rank=0, mode="megatron")
    assert not gm.tpfx_pairing.fallbacks
    assert [h.__name__ for h in gm.get_submodule("qkv")._forward_pre_hooks.values()] == ["_clip"]  # carried


def test_split_pieces_keep_the_module_call():
    """Every piece split (tp divides the key/value heads): one block-column linear, no gradient fix-up."""
    model = FusedSplit(kv_heads=2)
    gm, pairing = _pairing(model, 2)
    megatron_shard(gm, pairing, tp=2, rank=0, group="tp:0-1", source=model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["qkv", "proj"]
    assert gm.get_submodule("qkv").shard_spec("weight").ranges == ((0, 16), (32, 40), (48, 56))


def test_report_shard_shapes_are_the_held_ones():
    for model in (FusedSplit(kv_heads=1), FusedSplit(kv_heads=2), HeadsThenSplit(kv_heads=1)):
        for tp in (2, 4):
            gm = tpfx.parallelize(model, tp=tp, rank=0, mode="megatron")
            held = {path: list(gm.get_submodule(path).weight.shape) for path in ("qkv", "proj")}
            assert {row["module"]: row["shard"] for row in gm.tpfx_report.sites_table()} == held


def test_a_slice_bound_that_keeps_whole_pieces_is_localized_with_them():
    """``qkv[..., 40:]`` measures 32 split and 8 whole positions: (40 - 8) / tp + 8."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    size = graph.call_function(operator.getitem, (graph.call_method("size", (x,)), 0))
    part = graph.call_function(operator.getitem, (x, (Ellipsis, slice(40, size))))
    graph.output(part)
    gm = fx.GraphModule(nn.Module(), graph)
    localize_shapes(gm, (ShapeEdit(part.name, (1, 1, "start"), 40, kept=8),
                         ShapeEdit(part.name, (1, 1, "stop"), size.name, kept=8)), tp=4)
    gm.recompile()
    assert part.args[1][1].start == 16
    assert gm(torch.arange(4 * 100).view(4, 100)).shape == (4, 0)  # stop: (4 - 8) // 4 + 8 = 7 < 16


# ---------------------------------------------------------------------------- numbers: sum of ranks


def _sum_of_ranks(model: nn.Module, x: torch.Tensor, tp: int) -> torch.Tensor:
    """Every rank's megatron program with the collectives as identities, summed (the row bias once)."""
    total = 0
    for rank in range(tp):
        gm, pairing = _pairing(model, tp)
        assert len(pairing.pairs) == 1 and not pairing.fallbacks, pairing.fallbacks
        megatron_shard(gm, pairing, tp=tp, rank=rank, group=f"tp:0-{tp - 1}", source=model)
        for node in list(gm.graph.nodes):
            if node.target in (copy_to_tp, reduce_from_tp):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            elif node.target is rank_part:  # this rank's part, as the rank would take it (tpfx.rank_parts)
                tensor, dim, _ = node.args
                node.target, node.args = take_part, (tensor, dim, rank, tp)
        gm.recompile()
        total = total + gm(x)
    return total - (tp - 1) * model.proj.bias if model.proj.bias is not None else total


@pytest.mark.parametrize(("make", "tps"), [
    (lambda: FusedSplit(1, cut="split", repeat="expand", attention="written"), (2, 4)),
    (lambda: FusedSplit(1, cut="slices", repeat="interleave"), (2, 4)),
    (lambda: FusedSplit(2, cut="split", repeat="interleave"), (2, 4)),
    (lambda: FusedSplit(2, cut="slices", repeat="expand", attention="written", rotary=True), (2, 4)),
    (lambda: FusedSplit(2, heads=8, cut="slices"), (4,)),
    (lambda: FusedSplit(1, cut="slices from the end"), (2, 4)),
    (lambda: FusedSplit(2, cut="slices from the end", repeat="interleave"), (2, 4)),
    (lambda: HeadsThenSplit(1), (2, 4)),
], ids=["mqa-split", "mqa-slices", "gqa-split", "gqa-slices", "gqa-8-heads", "mqa-from-end", "gqa-from-end",
        "heads-then-split"])
def test_ranks_sum_to_the_single_device_output(make, tps):
    torch.manual_seed(0)
    model = make().eval()
    x = _inputs(model.width)
    for tp in tps:
        torch.testing.assert_close(_sum_of_ranks(model, x, tp), model(x), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ numbers: real processes

# (label, model factory, tracer, tp values, modes): megatron everywhere; gather mode (column + all-gather,
# which needs nothing of the pieces) once per tracer
_BOTH, _MEGATRON = ("gather", "megatron"), ("megatron",)
_PARITY = [
    ("mqa split sdpa", lambda: FusedSplit(1, cut="split"), "fx", (2, 4), _BOTH),
    ("gqa slices written rotary", lambda: FusedSplit(2, cut="slices", repeat="interleave", attention="written",
                                                     rotary=True), "fx", (2, 4), _MEGATRON),
    ("gqa 8 heads split", lambda: FusedSplit(2, heads=8, repeat="interleave"), "fx", (4,), _MEGATRON),
    ("heads then split", lambda: HeadsThenSplit(2), "fx", (2, 4), _MEGATRON),
    ("mqa slices written", lambda: FusedSplit(1, cut="slices", repeat="interleave", attention="written"), "export",
     (2, 4), _BOTH),
    ("gqa torch.split dim 2 rotary", lambda: FusedSplit(2, cut="torch.split", split_dim=2, rotary=True), "export",
     (2, 4), _MEGATRON),
    ("(in, out) weight mqa", lambda: InOutFused(1), "export", (2, 4), _MEGATRON),
]


def _check(make, tracer: str, tp: int, mode: str, group: dist.ProcessGroup | None) -> dict:
    torch.manual_seed(0)
    reference = make()
    x = _inputs(reference.width)
    gm = tpfx.parallelize(reference, tp=tp, mode=mode, tracer=tracer,
                          example_inputs=(x,) if tracer == "export" else None, group=group)
    (ref_out, ref_loss), (out, loss) = square_mean_step(reference, x), square_mean_step(gm, x)
    diffs = {"logits": max_diff(out, ref_out), "loss": max_diff(loss, ref_loss)} | grad_diffs(gm, reference)
    specs, full = parameter_shard_specs(gm), dict(reference.named_parameters())
    held = {name: torch.equal(specs[name].take(full[name].detach()) if name in specs else full[name].detach(),
                              parameter.detach()) for name, parameter in gm.named_parameters()}
    pairing = gm.tpfx_pairing
    return {"diffs": diffs, "held": held, "tracer": gm.tpfx_report.tracer,
            "pairs": [p.describe() for p in pairing.pairs] if pairing else [],
            "fallbacks": [f.reason for f in pairing.fallbacks] if pairing else []}


def _world(rank: int, world_size: int) -> dict:
    cases = [(label, make, tracer, tp, mode) for label, make, tracer, tps, modes in _PARITY for tp in tps for mode in modes]
    return {(label, tp, mode): _check(make, tracer, tp, mode, group)
            for (label, make, tracer, tp, mode), group in rank_cases(cases, lambda case: case[3])}


@pytest.fixture(scope="module")
def world() -> list[dict]:
    return run_ranks(_world, 4)


def test_logits_loss_and_every_gradient_match_single_device(world):
    assert len(merged(world)) == sum(len(tps) * len(modes) for *_, tps, modes in _PARITY) == 17
    for rank, results in enumerate(world):
        for (label, tp, mode), checked in results.items():
            where = f"{label} tp={tp} {mode} rank {rank}"
            bad = {k: v for k, v in checked["diffs"].items() if not v <= TOL}
            assert not bad and len(checked["diffs"]) >= 4, f"{where}: {bad}"
            assert all(checked["held"].values()) and checked["held"], f"{where}: {checked['held']}"


def test_every_fused_projection_pairs_in_megatron_mode_with_both_tracers(world):
    tracers = {label: tracer for label, _, tracer, *_ in _PARITY}
    for (label, tp, mode), checked in merged(world).items():
        assert checked["tracer"] == tracers[label]
        if mode == "megatron":
            assert len(checked["pairs"]) == 1 and not checked["fallbacks"], (label, tp, checked["fallbacks"])
            assert " | " in checked["pairs"][0]  # a layout of pieces


_PLAN_MODELS = {label: make for label, make, tracer, _, _ in _PARITY if tracer == "fx"}


@pytest.mark.parametrize("name", list(_PLAN_MODELS))
def test_every_model_holds_what_its_plan_and_report_say(name):
    """The report's shard shapes and the plan's specs are the parameters each rank holds (fx, both modes)."""
    check_programs_of_every_mode_and_tp(_PLAN_MODELS[name])
