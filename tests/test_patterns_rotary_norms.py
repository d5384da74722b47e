"""Rotary embeddings, qk-norms and grouped-query SDPA: found by the finder, paired in megatron mode, exact.

Each pattern has its own small model below (written here):

* complex rotary (LLaMA-1 style): ``view_as_complex(q.reshape(..., -1, 2)) * freqs_cis`` then
  ``view_as_real(...).flatten(3)``: the (real, imaginary) pair rides hidden on the complex value;
* interleaved rotary built with ``torch.stack((-x2, x1), dim=-1).flatten(-2)`` on strided slices;
* a per-head norm on q and k (``nn.RMSNorm(head_dim)``, ``nn.LayerNorm``, ``F.rms_norm``,
  ``F.layer_norm``, and by hand with a mean over Dh) in a pre-norm block with a SwiGLU FFN; a norm
  over the full width (all heads at once) stays column + gather, with the op named;
* SDPA with ``enable_gqa=True`` (k/v with fewer heads, not repeated by the model).

The unit checks read the traced graphs; one spawn of 4 gloo ranks compares tp=2 and tp=4 programs of
both modes and both tracers with the single-device model: output, loss and every gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import tpfx
from tpfx.capture import CallForm, capture
from tpfx.collectives import add_observer, copy_to_tp
from tpfx.export_capture import export_capture
from tpfx.passes.comm_table import comm_table
from tpfx.passes.find_sites import find_sites
from tpfx.passes.ops import rule_of
from tpfx.passes.pair_megatron import Pairing, pair_sites
from tpfx.passes.row_shard import megatron_shard
from tpfx.rank_parts import rank_part
from tests.multiprocess import merged, rank_cases, run_ranks
from tests.parity import check_programs_of_every_mode_and_tp, grad_diffs, max_diff

HEADS, HEAD = 4, 8
WIDTH = HEADS * HEAD
MAX_SEQ = 16
TOL = 1e-5


def _angles(dim: int) -> torch.Tensor:
    """(MAX_SEQ, dim / 2) rotation angles: position times one frequency per pair of features."""
    inverse = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    return torch.outer(torch.arange(MAX_SEQ).float(), inverse)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(T, Dh/2) -> (1, T, 1, Dh/2) for a (B, T, H, Dh/2) ``x``: Meta's helper, reading x's rank and shape."""
    ndim = x.ndim
    assert freqs_cis.shape == (x.shape[1], x.shape[-1])
    shape = [d if i == 1 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


class ComplexRotary(nn.Module):
    """LLaMA-1 (Meta) rotary: q and k as complex numbers times ``freqs_cis``, then back to real.

    ``spelling``: ``"meta"`` as Meta's code (``reshape(*x.shape[:-1], -1, 2)`` and
    :func:`reshape_for_broadcast`: torch.fx cannot iterate a traced shape, so export only);
    ``"sizes"`` spells the sizes out; ``"unflatten"`` makes heads and pairs with ``unflatten`` (and
    flattens the last two dims back, counted from the end).
    """

    def __init__(self, spelling: str = "sizes") -> None:
        super().__init__()
        self.spelling = spelling
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(4))
        self.register_buffer("freqs_cis", torch.polar(torch.ones(MAX_SEQ, HEAD // 2), _angles(HEAD)))

    def _rotate(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        if self.spelling == "meta":
            x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            freqs_cis = reshape_for_broadcast(freqs_cis, x_)
        elif self.spelling == "unflatten":
            x_ = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
            freqs_cis = freqs_cis[:, None, :]
        else:
            bsz, seq, heads, _ = x.shape
            x_ = torch.view_as_complex(x.float().reshape(bsz, seq, heads, -1, 2))  # (B, T, H, Dh/2) complex
            freqs_cis = freqs_cis.view(1, seq, 1, HEAD // 2)
        # (B, T, H, Dh); flatten(3) needs x's rank, which an fx graph knows only after a view spells it out
        flat = (-2, -1) if self.spelling == "unflatten" else (3,)
        return torch.view_as_real(x_ * freqs_cis).flatten(*flat).type_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        if self.spelling == "unflatten":
            q, k, v = (proj(x).unflatten(-1, (HEADS, HEAD)) for proj in (self.wq, self.wk, self.wv))
        else:
            q, k, v = (proj(x).view(bsz, seq, HEADS, HEAD) for proj in (self.wq, self.wk, self.wv))
        q, k = self._rotate(q, self.freqs_cis[:seq]), self._rotate(k, self.freqs_cis[:seq])
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, WIDTH))


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Each feature pair (x1, x2) -> (-x2, x1), pairs interleaved along the last dim (GPT-J style)."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each feature pair rotated by its own angle (cos, sin of Dh/2 angles), stacked back and interleaved."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


class StackRotary(nn.Module):
    """A fused [3, H, Dh] projection, interleaved rotary on q and k, attention written out.

    ``pairs``: rotate the strided halves by Dh/2 angles and stack them (:func:`rotate_pairs`) instead
    of ``q * cos + rotate_interleaved(q) * sin`` with Dh angles.
    """

    def __init__(self, *, pairs: bool = False) -> None:
        super().__init__()
        self.pairs = pairs
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        angles = _angles(HEAD) if pairs else _angles(HEAD).repeat_interleave(2, dim=-1)  # one per pair or feature
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())
        self.register_buffer("causal", torch.ones(MAX_SEQ, MAX_SEQ, dtype=torch.bool).tril())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, k, v = self.qkv(x).view(bsz, seq, 3, HEADS, HEAD).permute(2, 0, 3, 1, 4)  # each (B, H, T, Dh)
        cos, sin = self.cos[:seq], self.sin[:seq]
        if self.pairs:
            q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        else:
            q = q * cos + rotate_interleaved(q) * sin
            k = k * cos + rotate_interleaved(k) * sin
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(HEAD)
        probs = scores.masked_fill(~self.causal[:seq, :seq], float("-inf")).softmax(dim=-1)
        return self.proj((probs @ v).transpose(1, 2).reshape(bsz, seq, WIDTH))


NORMS = ("RMSNorm", "LayerNorm", "F.rms_norm", "F.layer_norm", "by hand")


class QKNorm(nn.Module):
    """A pre-norm block (Qwen3 / OLMo-2 style) with a norm on q and k, written ``norm`` way, and a SwiGLU FFN.

    ``full_width``: the q/k norm spans all heads (over H*Dh, before the head view), not each head's Dh.
    """

    def __init__(self, norm: str = "RMSNorm", *, full_width: bool = False) -> None:
        super().__init__()
        self.norm, self.full_width = norm, full_width
        self.input_norm, self.post_norm = nn.RMSNorm(WIDTH), nn.RMSNorm(WIDTH)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.down = nn.Linear(2 * WIDTH, WIDTH, bias=False)
        size = WIDTH if full_width else HEAD
        if norm == "RMSNorm":
            self.q_norm, self.k_norm = nn.RMSNorm(size, eps=1e-6), nn.RMSNorm(size, eps=1e-6)
        elif norm == "LayerNorm":
            self.q_norm, self.k_norm = nn.LayerNorm(size), nn.LayerNorm(size)
        else:
            self.q_weight, self.k_weight = (nn.Parameter(torch.ones(size)) for _ in range(2))
        if norm == "F.layer_norm":
            self.q_bias, self.k_bias = (nn.Parameter(torch.zeros(size)) for _ in range(2))

    def _normed(self, x: torch.Tensor, which: str) -> torch.Tensor:
        if self.norm in ("RMSNorm", "LayerNorm"):
            return getattr(self, f"{which}_norm")(x)
        weight = getattr(self, f"{which}_weight")
        if self.norm == "F.rms_norm":
            return F.rms_norm(x, (x.size(-1),), weight, eps=1e-6)
        if self.norm == "F.layer_norm":
            return F.layer_norm(x, (x.size(-1),), weight, getattr(self, f"{which}_bias"))
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight  # by hand, over the last dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        h = self.input_norm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if self.full_width:  # (B, T, H*Dh): statistics over every head
            q, k = self._normed(q, "q"), self._normed(k, "k")
        q, k, v = (t.view(bsz, seq, HEADS, HEAD) for t in (q, k, v))
        if not self.full_width:  # (B, T, H, Dh): statistics per head
            q, k = self._normed(q, "q"), self._normed(k, "k")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.o_proj(out.transpose(1, 2).reshape(bsz, seq, WIDTH))
        h = self.post_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class GroupedSdpa(nn.Module):
    """Grouped-query attention left to SDPA (``enable_gqa=True``): k and v keep their ``kv_heads`` heads."""

    def __init__(self, heads: int = 8, kv_heads: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.dropout, self.width = heads, kv_heads, dropout, heads * HEAD
        self.q_proj, self.o_proj = nn.Linear(self.width, self.width), nn.Linear(self.width, self.width)
        self.k_proj, self.v_proj = nn.Linear(self.width, kv_heads * HEAD), nn.Linear(self.width, kv_heads * HEAD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.heads, HEAD).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.kv_heads, HEAD).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.kv_heads, HEAD).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, self.width))


def _input(model: nn.Module, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 5, getattr(model, "width", WIDTH), generator=torch.Generator().manual_seed(seed))


def _trace(model: nn.Module, tracer: str) -> torch.fx.GraphModule:
    if tracer == "fx":
        return capture(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's own deprecation notices
        return export_capture(model, (_input(model),)).gm


def _pairing(model: nn.Module, tracer: str, tp: int = 2) -> tuple[torch.fx.GraphModule, Pairing]:
    gm = _trace(model.eval(), tracer)
    return gm, pair_sites(gm, find_sites(gm, tp=tp), tp=tp)


def _roles(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    return [(s.role, s.module_path) for s in find_sites(gm, tp=2).sites]


TRACERS = ("fx", "export")

# ------------------------------------------------------------------------------------------------
# unit checks on traced graphs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tracer", TRACERS)
def test_complex_rotary_q_and_k_are_sites_and_pair_through_the_complex_view(tracer):
    gm, pairing = _pairing(ComplexRotary(), tracer)
    assert _roles(gm) == [("q", "wq"), ("k", "wk"), ("v", "wv")]
    (pair,) = pairing.pairs
    assert not pairing.fallbacks
    # Dh of q and k splits into (Dh/2, 2): the pairs that become complex numbers; the heads are split
    assert pair.describe() == "wq [4*, 4, 2], wk [4*, 4, 2], wv [4*, 8] -> wo [4*, 8]"
    # q, k and v's head views (4 heads) and the width after attention (32) become local; fx's complex
    # reshape reads its sizes from q and k at run time (local), export's spells the 4 heads out (divided)
    complex_reshapes = [HEADS, HEADS] if tracer == "export" else []
    assert [e.value for e in pair.shape_edits] == [HEADS] * 3 + complex_reshapes + [WIDTH]
    nodes = {n.name: n for n in gm.graph.nodes}
    assert [rule_of(nodes[e.node_name], {}).name for e in pair.shape_edits] == ["view"] * len(pair.shape_edits)


def test_meta_spelling_of_complex_rotary_pairs_through_export():
    gm, pairing = _pairing(ComplexRotary("meta"), "export")
    (pair,) = pairing.pairs
    assert pair.describe() == "wq [4*, 4, 2], wk [4*, 4, 2], wv [4*, 8] -> wo [4*, 8]"
    ops = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count("aten.view_as_complex.default") == ops.count("aten.view_as_real.default") == 2
    # reshape(*q.shape[:-1], -1, 2) holds the head count 4 (export spells q.shape out): divided too
    nodes = {n.name: n for n in gm.graph.nodes}
    complex_reshapes = [e for e in pair.shape_edits if "view_as_complex" in str(next(iter(nodes[e.node_name].users)).target)]
    assert [(e.path, e.value) for e in complex_reshapes] == [((1, 2), HEADS)] * 2


def test_complex_rotary_cannot_be_captured_by_fx_in_meta_spelling():
    with pytest.raises(tpfx.CaptureError, match="cannot be iterated"):
        capture(ComplexRotary("meta"))


def test_complex_rotary_spelled_with_unflatten_divides_the_head_count_it_names():
    gm, pairing = _pairing(ComplexRotary("unflatten"), "export")
    (pair,) = pairing.pairs
    assert pair.describe() == "wq [4*, 4, 2], wk [4*, 4, 2], wv [4*, 8] -> wo [4*, 8]"
    nodes = {n.name: n for n in gm.graph.nodes}
    # unflatten(-1, (4, 8)) on q, k and v: the 4 heads are divided; unflatten(-1, (-1, 2)) splits Dh only
    heads = [(rule_of(nodes[e.node_name], {}).name, e.path, e.value) for e in pair.shape_edits if e.value == HEADS]
    assert heads == [("unflatten", (2, 0), HEADS)] * 3
    # an fx graph has no shapes: after unflatten alone q's rank is unknown, and transpose(1, 2) counts from the front
    (fallback,) = _pairing(ComplexRotary("unflatten"), "fx")[1].fallbacks
    assert fallback.reason.startswith("dim 1 counted from the front needs the rank (pass example inputs)")


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("pairs", [False, True], ids=["rotate-interleaved", "rotate-pairs"])
def test_interleaved_rotary_with_stack_pairs_and_blocks_only_head_dims_parts(pairs, tracer):
    gm, pairing = _pairing(StackRotary(pairs=pairs), tracer)
    assert _roles(gm) == [("qkv", "qkv")]
    (pair,) = pairing.pairs
    # the 4 heads are split, the q/k/v 3 is not; adding q to its rotated halves stacked back lines Dh up
    # with (Dh/2 halves, 2 stacked), so Dh splits; rotating the halves alone leaves Dh whole
    dh = "8" if pairs else "4, 2"
    assert pair.describe() == f"qkv [3, 4*, {dh}] -> proj [4*, {dh}]"
    assert [e.value for e in pair.shape_edits] == [HEADS, WIDTH]  # the head view and the width after attention


def test_q_and_k_stacked_into_one_tensor_keep_their_heads():
    class _StacksQK(StackRotary):
        """Rotates q and k at once: stacked along a new leading dim (blocked: it picks q or k), then unbound."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bsz, seq, _ = x.shape
            q, k, v = self.qkv(x).view(bsz, seq, 3, HEADS, HEAD).permute(2, 0, 3, 1, 4)
            qk = torch.stack((q, k))  # (2, B, H, T, Dh)
            q, k = (qk * self.cos[:seq] + rotate_interleaved(qk) * self.sin[:seq]).unbind(0)
            return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(
                bsz, seq, WIDTH))

    (pair,) = _pairing(_StacksQK(), "fx")[1].pairs
    assert pair.describe() == "qkv [3, 4*, 4, 2] -> proj [4*, 4, 2]"


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("norm", NORMS)
def test_per_head_qk_norm_pairs_and_sums_its_weight_gradients(norm, tracer):
    model = QKNorm(norm)
    gm, pairing = _pairing(model, tracer)
    assert _roles(gm) == [("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("fc1", "gate"), ("up", "up")]
    assert [p.describe() for p in pairing.pairs] == [
        "q_proj [4*, 8], k_proj [4*, 8], v_proj [4*, 8] -> o_proj [4*, 8]", "gate [64*], up [64*] -> down [64*]"]
    # the norms' weights (and biases) are read whole by ops on local heads; fx calls the norm modules
    reads = pairing.pairs[0].replicated_reads
    module_calls = tracer == "fx" and norm in ("RMSNorm", "LayerNorm")
    assert {read.producer == "" for read in reads} == {module_calls} and not pairing.pairs[1].replicated_reads
    megatron_shard(gm, pairing, tp=2, rank=1, group="tp:0-1", source=model)
    copied = sorted(str(n.args[0].target) for n in gm.graph.nodes if n.target is copy_to_tp and n.args[0].op == "get_attr")
    norm_parameters = sorted(name for name, _ in model.named_parameters() if name.startswith(("q_", "k_"))
                             and "proj" not in name)
    assert copied == norm_parameters  # each norm parameter once: its gradient is summed over the ranks' heads


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("norm", ["RMSNorm", "F.layer_norm", "by hand"])
def test_full_width_qk_norm_stays_column_plus_gather_and_names_the_op(norm, tracer):
    gm, pairing = _pairing(QKNorm(norm, full_width=True), tracer)
    assert _roles(gm)[:3] == [("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")]  # gather mode shards them
    assert [p.kind for p in pairing.pairs] == ["ffn"]
    (fallback,) = pairing.fallbacks
    assert [s.module_path for s in fallback.sites] == ["q_proj", "k_proj", "v_proj"]
    op = {"RMSNorm": "(rms_norm) normalizes over it", "F.layer_norm": "(layer_norm) normalizes over it",
          "by hand": "(mean) reduces over it"}[norm]
    assert fallback.reason.startswith("no factor of the input of 'o_proj") and op in fallback.reason
    assert "\n" not in fallback.reason


@pytest.mark.parametrize("tracer", TRACERS)
def test_grouped_sdpa_splits_q_k_and_v_when_tp_divides_the_key_value_heads(tracer):
    gm, pairing = _pairing(GroupedSdpa(heads=8, kv_heads=2), tracer, tp=2)
    (pair,) = pairing.pairs
    # query head h reads kv head h // 4: q's 8 heads are (2 kv heads, 4 repeats), the kv heads split
    assert pair.describe() == "q_proj [2*, 4, 8], k_proj [2*, 8], v_proj [2*, 8] -> o_proj [2*, 4, 8]"
    assert not pair.narrows and [e.value for e in pair.shape_edits] == [8, 2, 2, 8 * HEAD]


def test_grouped_sdpa_splits_the_repeats_when_tp_divides_them_only():
    _, pairing = _pairing(GroupedSdpa(heads=8, kv_heads=2), "fx", tp=4)
    (pair,) = pairing.pairs
    # each rank holds one query head of each of the 2 kv heads; k and v stay whole, SDPA groups them as before
    assert pair.describe() == "q_proj [2, 4*, 8], k_proj [2, 8], v_proj [2, 8] -> o_proj [2, 4*, 8]"
    assert not pair.narrows and [e.value for e in pair.shape_edits] == [8, 8 * HEAD]  # q's heads, o_proj's width


@pytest.mark.parametrize("tracer", TRACERS)
def test_grouped_sdpa_narrows_repeated_keys_when_tp_divides_only_the_query_heads(tracer):
    model = GroupedSdpa(heads=4, kv_heads=2)
    gm, pairing = _pairing(model, tracer, tp=4)
    (pair,) = pairing.pairs
    assert pair.describe() == "q_proj [4*, 8], k_proj [2, 8], v_proj [2, 8] -> o_proj [4*, 8]"
    assert [(n.dim, n.repeats) for n in pair.narrows] == [(-3, 2), (-3, 2)]
    megatron_shard(gm, pairing, tp=4, rank=1, group="tp:0-3", source=model)
    parts = [n for n in gm.graph.nodes if n.target is rank_part]
    assert [(n.args[0].target, n.args[0].args[1:], n.args[0].kwargs) for n in parts] == [
        (torch.repeat_interleave, (2,), {"dim": -3})] * 2
    assert all(len(n.users) == 1 and "scaled_dot_product_attention" in str(next(iter(n.users)).target) for n in parts)


def test_dropout_on_grouped_heads_split_by_their_repeats_falls_back_with_the_reason():
    """8 query heads over 2 kv heads at tp=4: a rank's heads are one of each kv head's 4, not a block of the
    attention's heads, so it could not draw its part of the single-device dropout mask."""
    model = GroupedSdpa(8, 2, dropout=0.3).train()
    gm = capture(model, CallForm(training=True))
    (fallback,) = pair_sites(gm, find_sites(gm, tp=4), tp=4).fallbacks
    assert "dropout 'scaled_dot_product_attention'" in fallback.reason and "not the outer part" in fallback.reason


def test_grouped_sdpa_that_no_split_fits_falls_back_with_the_reason():
    _, pairing = _pairing(GroupedSdpa(heads=6, kv_heads=3), "fx", tp=4)
    (fallback,) = pairing.fallbacks
    assert fallback.reason.startswith("no factor of the input of 'o_proj' can be split across tp=4 (3: not divisible")


def test_a_mean_over_head_dim_blocks_heads_but_over_head_size_does_not():
    class _Centered(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.dim = dim
            self.qkv, self.out = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bsz, seq, _ = x.shape
            q, k, v = self.qkv(x).view(bsz, seq, 3, HEADS, HEAD).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
            q = q - q.mean(dim=self.dim, keepdim=True)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(out.transpose(1, 2).reshape(bsz, seq, WIDTH))

    over_dh = _pairing(_Centered(-1), "fx")[1]
    assert [p.describe() for p in over_dh.pairs] == ["qkv [3, 4*, 8] -> out [4*, 8]"]
    (fallback,) = _pairing(_Centered(1), "fx")[1].fallbacks  # over the heads
    assert "(4: 'mean' (mean) reduces over it" in fallback.reason


# ------------------------------------------------------------------------------------------------
# parity: one spawn, 4 gloo ranks, tp=2 (two groups) and tp=4 programs
# ------------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[[], nn.Module]] = {
    "complex rotary": ComplexRotary, "complex rotary, Meta spelling": lambda: ComplexRotary("meta"),
    "complex rotary, unflatten": lambda: ComplexRotary("unflatten"),
    "stack rotary": StackRotary, "stack rotary, pairs": lambda: StackRotary(pairs=True),
    "full-width norm": lambda: QKNorm("RMSNorm", full_width=True),
    "gqa 8/2": lambda: GroupedSdpa(8, 2), "gqa 4/2": lambda: GroupedSdpa(4, 2), "gqa 4/1": lambda: GroupedSdpa(4, 1),
    "gqa 4/2, dropout": lambda: GroupedSdpa(4, 2, dropout=0.3),
    **{f"qk {norm}": (lambda norm=norm: QKNorm(norm)) for norm in NORMS}}


def _cases() -> list[tuple[str, int, str, str]]:
    """(model, tp, tracer, mode) of the spawn: torch.export costs about a second a program per rank, so it
    checks every pattern in megatron mode at tp=2 (every per-head norm spelling among them) and a few in
    gather mode (both export-only rotary spellings among them) and at tp=4; fx checks all in megatron mode
    at tp=2 and 4 and in gather mode at tp=2 (gather's column split does not depend on tp)."""
    export_only = ("complex rotary, Meta spelling", "complex rotary, unflatten")  # fx: no trace; no rank
    cases = [(label, tp, "fx", mode) for label in MODELS if label not in (*export_only, "gqa 4/2, dropout")
             for tp, mode in ((2, "gather"), (2, "megatron"), (4, "megatron"))]  # gather's split is tp-blind
    exported = ["complex rotary", *export_only, "stack rotary", "full-width norm", "gqa 8/2",
                *(f"qk {norm}" for norm in NORMS)]  # every per-head norm: module, function, by hand
    cases += [(label, 2, "export", "megatron") for label in exported]
    cases += [(label, 2, "export", "gather") for label in export_only]  # the others: fx's gather rewrite is the same
    cases += [(label, 4, "export", "megatron") for label in ("complex rotary, unflatten", "gqa 4/2", "qk LayerNorm")]
    return cases + [("gqa 4/2, dropout", tp, "fx", "megatron") for tp in (2, 4)]  # train mode


def _step(model: nn.Module, x: torch.Tensor, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    out = model(x)
    loss = out.pow(2).mean()
    loss.backward()
    return out, loss


def _compare(reference: nn.Module, tp: int, mode: str, tracer: str, *, train: bool = False,
             group: dist.ProcessGroup | None = None) -> dict:
    x = _input(reference)
    gm = tpfx.parallelize(reference.train(train), tp=tp, mode=mode, tracer=tracer, example_inputs=(x,), group=group)
    seed = 11 if train else None
    ref_out, ref_loss = _step(reference, x, seed)
    sent: list[int] = []
    remove = add_observer(lambda name, tensor: sent.append(tensor.numel() * tensor.element_size()))
    try:
        out, loss = _step(gm, x, seed)
    finally:
        remove()
    diffs = {"output": max_diff(out, ref_out), "loss": max_diff(loss, ref_loss)}
    diffs |= {f"grad {name}": diff for name, diff in grad_diffs(gm, reference).items()}
    pairing = gm.tpfx_pairing
    table = comm_table(gm, {"x": x}, tp=tp)  # the copies of whole norm weights are collectives it counts too
    return {"diffs": diffs, "tracer": gm.tpfx_report.tracer, "sites": len(gm.tpfx_report.sites),
            "bytes": (sum(sent), sum(row.tensor_bytes for row in table.rows)),
            "pairs": [p.describe() for p in pairing.pairs] if pairing else None,
            "fallbacks": [f.reason for f in pairing.fallbacks] if pairing else None}


def _world(rank: int, world_size: int) -> dict:
    warnings.simplefilter("ignore")  # torch.export's own deprecation notices
    result = {}
    for (label, tp, tracer, mode), group in rank_cases(_cases(), lambda case: case[1]):
        torch.manual_seed(0)
        # train mode: SDPA's dropout on grouped heads, each rank drawing its part of one device's mask
        result[(label, tp, tracer, mode)] = _compare(MODELS[label](), tp, mode, tracer, train="dropout" in label,
                                                     group=group)
    return result


@pytest.fixture(scope="module")
def world() -> list[dict]:
    return run_ranks(_world, 4)


def test_every_pattern_matches_single_device_in_both_modes_and_tracers(world):
    for rank, result in enumerate(world):
        for key, checked in result.items():
            bad = {k: v for k, v in checked["diffs"].items() if not v <= TOL}
            assert not bad, f"{key} rank {rank}: {bad}"
            assert len(checked["diffs"]) >= 6 and checked["tracer"] == key[2], key
            measured, table = checked["bytes"]
            assert measured == table > 0, (key, measured, table)
    assert sorted(merged(world)) == sorted(_cases())  # each case checked by its ranks


def test_every_pattern_pairs_in_megatron_mode_except_the_full_width_norm(world):
    result = merged(world)
    assert sorted(result) == sorted(_cases())
    for (label, tp, tracer, mode), checked in result.items():
        if mode == "gather":
            sites = 1 if "stack" in label else 3 if "gqa" in label or "complex" in label else 5
            assert checked["pairs"] is None and checked["sites"] == sites, (label, tp, tracer)
        elif label == "full-width norm":  # the FFN pairs; the attention stays column + gather
            (reason,) = checked["fallbacks"]
            assert "(rms_norm) normalizes over it" in reason and len(checked["pairs"]) == 1
        else:
            assert checked["pairs"] and not checked["fallbacks"], (label, tp, tracer, checked["fallbacks"])


_PLAN_MODELS = {name: make for name, make in MODELS.items() if "Meta spelling" not in name}  # export only


@pytest.mark.parametrize("name", list(_PLAN_MODELS))
def test_every_model_holds_what_its_plan_and_report_say(name):
    """The report's shard shapes and the plan's specs are the parameters each rank holds (fx, both modes)."""
    check_programs_of_every_mode_and_tp(_PLAN_MODELS[name])
