"""Local heads: the QKV layout is read from the graph and the shapes between a pair become local.

Each attention below writes its q, k and v another way. The numerical check runs every rank's
program in this one process with the collectives left out: the row-parallel linear's partial sums
over the ranks, plus its bias, must equal the single-device block, which holds only if every rank
got whole heads of q, k and v and every shape between the pair was made local.
"""

from __future__ import annotations

import itertools
import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from examples.gpt import GPTModel, small_config
from tpfx.passes.find_sites import find_sites
from tpfx.passes.local_heads import FeatureLayout, ShapeEdit, localize_shapes
from tpfx.passes.pair_megatron import Pairing, pair_sites
from tpfx.passes.plan import megatron_plan
from tpfx.passes.shard_parameters import shard_parameters
from tpfx.capture import capture
from tpfx.errors import ShardingError

WIDTH, HEADS = 32, 4
HEAD = WIDTH // HEADS


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, T, Dh) -> (B, H, T, Dh) causal attention written out as matmul-softmax-matmul."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return F.softmax(scores, dim=-1) @ v


class FusedLastDim(nn.Module):
    """GPT-2 style: one [Q | K | V] projection split on the last dim, then heads by view."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(WIDTH, 3 * WIDTH)
        self.c_proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.size()
        q, k, v = self.c_attn(x).split(WIDTH, dim=-1)
        q, k, v = (t.view(bsz, seq, HEADS, HEAD).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(out.transpose(1, 2).reshape(bsz, seq, width))


class Interleaved(nn.Module):
    """GPT-NeoX style: per head [q | k | v] ([H, 3, Dh]), chunked on the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.query_key_value = nn.Linear(WIDTH, 3 * WIDTH)
        self.dense = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.size()
        qkv = self.query_key_value(x).view(bsz, seq, HEADS, 3 * HEAD).transpose(1, 2)  # (B, H, T, 3*Dh)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.dense(_attend(q, k, v).transpose(1, 2).reshape(bsz, seq, -1))


class Grouped(nn.Module):
    """LLaMA style: separate q/k/v, ``kv_heads`` key/value heads repeated to the query heads, SwiGLU after."""

    def __init__(self, kv_heads: int, heads: int = HEADS) -> None:
        super().__init__()
        self.kv_heads, self.heads, self.width = kv_heads, heads, heads * HEAD
        self.q_proj = nn.Linear(self.width, self.width, bias=False)
        self.k_proj = nn.Linear(self.width, kv_heads * HEAD, bias=False)
        self.v_proj = nn.Linear(self.width, kv_heads * HEAD, bias=False)
        self.o_proj = nn.Linear(self.width, self.width, bias=False)
        self.gate = nn.Linear(self.width, 2 * self.width, bias=False)
        self.up = nn.Linear(self.width, 2 * self.width, bias=False)
        self.down = nn.Linear(2 * self.width, self.width, bias=False)

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        bsz, kv, seq, dh = t.shape
        repeats = self.heads // self.kv_heads
        return t[:, :, None, :, :].expand(bsz, kv, repeats, seq, dh).reshape(bsz, kv * repeats, seq, dh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.size()
        q = self.q_proj(x).view(bsz, seq, -1, HEAD).transpose(1, 2)
        k = self._repeat(self.k_proj(x).view(bsz, seq, -1, HEAD).transpose(1, 2))
        v = self._repeat(self.v_proj(x).view(bsz, seq, -1, HEAD).transpose(1, 2))
        h = x + self.o_proj(_attend(q, k, v).transpose(1, 2).reshape(bsz, seq, -1))
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


class DropoutInside(nn.Module):
    """Dropout between each pair: attention probabilities dropped by SDPA (dropout_p), and the FFN's
    hidden units by F.dropout (T5 style). Train mode needs every rank to draw its part of one mask."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.p, self.width = p, WIDTH
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.size()
        q, k, v = self.qkv(x).view(bsz, seq, 3, HEADS, HEAD).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        h = x + self.out(attended.transpose(1, 2).reshape(bsz, seq, width))
        return h + self.fc2(F.dropout(F.gelu(self.fc1(h)), self.p, self.training))


class HeadMixing(nn.Module):
    """Mixes information across heads between the pair (a mean over heads): cannot run on local heads."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.size()
        q, k, v = self.qkv(x).view(bsz, seq, 3, HEADS, HEAD).permute(2, 0, 3, 1, 4)
        probs = F.softmax(q @ k.transpose(-2, -1), dim=-1)
        probs = probs + probs.mean(dim=1, keepdim=True)  # every head sees every other head
        return self.out((probs @ v).transpose(1, 2).reshape(bsz, seq, width))


def _pairing(model: nn.Module, tp: int) -> tuple[fx.GraphModule, Pairing]:
    gm = capture(model)
    return gm, pair_sites(gm, find_sites(gm, tp=tp), tp=tp)


def _sum_of_ranks(model: nn.Module, x: torch.Tensor, tp: int) -> torch.Tensor:
    """Every rank's local program (no collectives) summed; each row linear's bias added once.

    Valid for a model with one pair whose row linear's output is the model output.
    """
    total = 0
    for rank in range(tp):
        gm, pairing = _pairing(model, tp)
        assert len(pairing.pairs) == 1 and not pairing.fallbacks
        shard_parameters(gm, megatron_plan(gm, find_sites(gm, tp=tp), pairing, tp=tp, rank=rank), source=model)
        localize_shapes(gm, pairing.pairs[0].shape_edits, tp=tp)
        gm.recompile()  # the pass changes the graph only
        total = total + gm(x)
    bias = model.get_submodule(pairing.pairs[0].row_module_path).bias
    return total + (bias if bias is not None else 0)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("make", [FusedLastDim, Interleaved], ids=["qkv-last-dim", "interleaved"])
def test_ranks_of_one_attention_sum_to_single_device(make, tp):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 5, WIDTH)
    torch.testing.assert_close(_sum_of_ranks(model, x, tp), model(x), atol=1e-5, rtol=0)


def test_layouts_are_read_from_the_graph():
    gpt_pairs = _pairing(GPTModel(small_config(n_layers=1)), 2)[1].pairs
    assert [(p.column_layouts, p.row_layout) for p in gpt_pairs] == [
        ((FeatureLayout((3, 4, 32), 1),), FeatureLayout((4, 32), 0)),  # fused [3, H, Dh]
        ((FeatureLayout((512,), 0),), FeatureLayout((512,), 0))]
    last_dim = _pairing(FusedLastDim(), 2)[1].pairs[0]
    assert last_dim.column_layouts == (FeatureLayout((3, HEADS, HEAD), 1),)
    interleaved = _pairing(Interleaved(), 2)[1].pairs[0]
    assert interleaved.column_layouts == (FeatureLayout((HEADS, 3, HEAD), 0),)
    grouped = _pairing(Grouped(kv_heads=2), 2)[1].pairs[0]
    assert grouped.column_layouts == (FeatureLayout((2, 2, HEAD), 0), FeatureLayout((2, HEAD), 0),
                                      FeatureLayout((2, HEAD), 0))


def test_fused_rows_of_a_rank_are_whole_heads_of_q_k_and_v():
    layout = FeatureLayout((3, 4, 32), 1)
    assert layout.ranges(2, 0) == ((0, 64), (128, 192), (256, 320))
    assert layout.ranges(2, 1) == ((64, 128), (192, 256), (320, 384))
    assert FeatureLayout((4, 3, 8), 0).ranges(2, 1) == ((48, 96),)  # interleaved: one contiguous block
    assert FeatureLayout((6,), None).ranges(3, 2) == ((0, 6),)


def test_shape_edits_divide_literals_and_wrap_traced_sizes():
    gm, pairing = _pairing(GPTModel(small_config(n_layers=1)), 2)
    attention = pairing.pairs[0]
    assert attention.shape_edits == (ShapeEdit("view", (4,), 4), ShapeEdit("view_1", (3,), "getitem_2"))
    localize_shapes(gm, attention.shape_edits, tp=2)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["view"].args[3:] == (3, 2, 32)  # head count 4 -> 2; the 3 of q/k/v and Dh stay
    width = nodes["view_1"].args[3]
    assert width.target is operator.floordiv and width.args == (nodes["getitem_2"], 2)
    gm.graph.lint()


def test_sizes_read_from_local_tensors_are_not_divided_again():
    grouped = _pairing(Grouped(kv_heads=2), 2)[1].pairs[0]
    assert grouped.shape_edits == ()  # -1 in the views; kv from k.shape is already local at run time


def test_a_literal_that_tp_does_not_divide_is_a_one_line_error():
    gm, pairing = _pairing(GPTModel(small_config(n_layers=1)), 2)
    with pytest.raises(ShardingError, match=r"shape argument 4 of node 'view' .* not divisible by tp=3") as error:
        localize_shapes(gm, pairing.pairs[0].shape_edits, tp=3)
    assert "\n" not in str(error.value)


def test_head_mixing_op_is_not_head_local():
    _, pairing = _pairing(HeadMixing(), 2)
    assert not pairing.pairs
    (fallback,) = pairing.fallbacks
    assert [s.module_path for s in fallback.sites] == ["qkv"]
    assert "op 'mean' is neither elementwise nor head-local" in fallback.reason and "at node 'mean'" in fallback.reason


@pytest.mark.parametrize("factors", [(3, 4, 32), (512,), (4, 3, 8), (6, 2, 2, 3), (1, 4, 5)])
def test_layout_ranges_are_the_ranks_slice_of_the_sharded_factor(factors):
    """The blocks equal the brute-force answer: indices whose sharded-factor coordinate is this rank's."""
    for axis, tp in itertools.product(range(len(factors)), (1, 2, 4)):
        if factors[axis] % tp:
            continue
        for rank in range(tp):
            kept = factors[axis] // tp
            index = torch.arange(math.prod(factors)).view(factors).narrow(axis, rank * kept, kept).reshape(-1)
            blocks = FeatureLayout(factors, axis).ranges(tp, rank)
            assert torch.cat([torch.arange(start, stop) for start, stop in blocks]).tolist() == index.tolist()
            assert all(stop < start for (_, stop), (start, _) in zip(blocks, blocks[1:]))  # merged where touching
