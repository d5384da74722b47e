"""Attention-score patterns in both modes and both tracers: transposed-parameter linears, ``baddbmm``
scores, soft-capped scores and per-head ALiBi biases (issue 12, item 4).

Every model below is written here. Unit checks read the traced graphs (the sites and their roles, the
pairs and their layouts, the per-head tensors narrowed to a rank's heads); one spawn of 4 gloo ranks
builds tp=2 and tp=4 programs of every model in both modes and both tracers and compares logits, loss
and every gradient with the single-device model (fp32, 1e-5).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import tpfx
from tpfx.capture import capture
from tpfx.collectives import copy_to_tp, gather_from_tp, sum_gradients_over_tp
from tpfx.export_capture import export_capture
from tpfx.passes.find_sites import find_attentions, find_sites
from tpfx.passes.graph_view import to_networkx
from tpfx.passes.pair_megatron import Pairing, pair_sites
from tpfx.rank_parts import part_of_blocks, rank_part
from tests.multiprocess import run_ranks
from tests.parity import check_programs_of_every_mode_and_tp, grad_diffs, max_diff, square_mean_step

WIDTH, HEADS, FF, MAX_SEQ = 32, 4, 64, 16
HEAD = WIDTH // HEADS
TOL = 1e-5
TRACERS = ("fx", "export")


def _future() -> torch.Tensor:
    """(T_max, T_max) bool: True where a query may not see a key (the future); sliced to (T, T) in forward."""
    return torch.ones(MAX_SEQ, MAX_SEQ, dtype=torch.bool).triu(1)


def _alibi_slopes(heads: int) -> torch.Tensor:
    """A geometric slope per head, 2^(-8 h / H) for h = 1..H (the ALiBi paper's choice for a power of two)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


class TransposedLinears(nn.Module):
    """Every linear a matmul with a transposed parameter: ``x @ w.T``, ``x @ w.t()``, ``torch.matmul(x, w.T)``.

    q, k and v, the attention output projection (its bias added apart) and an FFN whose first bias is
    added to the first linear's output: no ``nn.Linear`` and no ``F.linear`` anywhere.
    """

    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Parameter(torch.randn(WIDTH, WIDTH) * 0.2) for _ in range(4))
        self.bo = nn.Parameter(torch.randn(WIDTH) * 0.1)
        self.w1, self.b1 = nn.Parameter(torch.randn(FF, WIDTH) * 0.2), nn.Parameter(torch.randn(FF) * 0.1)
        self.w2 = nn.Parameter(torch.randn(WIDTH, FF) * 0.2)
        self.register_buffer("future", _future(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.shape
        q = (x @ self.wq.T).view(bsz, seq, HEADS, HEAD).transpose(1, 2)
        k = (x @ self.wk.t()).view(bsz, seq, HEADS, HEAD).transpose(1, 2)
        v = torch.matmul(x, self.wv.T).view(bsz, seq, HEADS, HEAD).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(HEAD)
        scores = scores.masked_fill(self.future[:seq, :seq], float("-inf"))
        out = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(bsz, seq, width)
        x = x + out @ self.wo.T + self.bo
        return x + F.gelu(x @ self.w1.T + self.b1) @ self.w2.t()


class BaddbmmScores(nn.Module):
    """Scores by ``torch.baddbmm(bias, q, k^T, beta=1, alpha=scale)`` on (B*H, T, Dh), values by ``bmm``.

    With ``alibi`` the added bias is BLOOM's ALiBi, one row per batch and head (B*H, 1, T) made from a
    buffer of per-head slopes; without it, a causal additive mask that every head shares (1, T, T).
    """

    def __init__(self, *, alibi: bool) -> None:
        super().__init__()
        self.alibi = alibi
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)
        self.register_buffer("slopes", _alibi_slopes(HEADS))
        self.register_buffer("future", torch.zeros(MAX_SEQ, MAX_SEQ).masked_fill(_future(), float("-inf")),
                             persistent=False)  # additive causal mask

    def _bias(self, bsz: int, seq: int, device: torch.device) -> torch.Tensor:
        future = self.future[None, :seq, :seq]  # (1, T, T)
        if not self.alibi:
            return future
        distance = torch.arange(seq, device=device).float()  # ALiBi: slope * key position
        per_head = self.slopes[:, None] * distance[None, :]  # (H, T)
        return per_head.repeat(bsz, 1)[:, None, :] + future  # (B*H, 1, T) + (1, T, T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.shape
        qkv = self.qkv(x).view(bsz, seq, 3, HEADS, HEAD).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        q, k, v = qkv.unbind(0)
        q, k, v = (t.reshape(bsz * HEADS, seq, HEAD) for t in (q, k, v))
        scores = torch.baddbmm(self._bias(bsz, seq, x.device), q, k.transpose(1, 2), beta=1.0,
                               alpha=1 / math.sqrt(HEAD))
        out = torch.bmm(F.softmax(scores, dim=-1), v).view(bsz, HEADS, seq, HEAD)
        return self.out(out.transpose(1, 2).reshape(bsz, seq, width))


class SoftCapped(nn.Module):
    """Gemma-2's soft-capped scores ``tanh(s / cap) * cap`` before the softmax, and a tanh FFN after."""

    def __init__(self, cap: float = 5.0) -> None:
        super().__init__()
        self.cap = cap
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(WIDTH, FF), nn.Linear(FF, WIDTH)
        self.register_buffer("future", _future(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.shape
        q, k, v = (p(x).view(bsz, seq, HEADS, HEAD).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-2, -1) * HEAD ** -0.5
        scores = torch.tanh(scores / self.cap) * self.cap
        scores = scores.masked_fill(self.future[:seq, :seq], float("-inf"))
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(bsz, seq, width)
        x = x + self.o_proj(out)
        return x + self.fc2(torch.tanh(self.fc1(x)))


class AlibiSlopes(nn.Module):
    """Per-head slopes (H,) times a distance matrix (T, T), computed in forward, added to matmul scores."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.register_buffer("slopes", _alibi_slopes(HEADS))
        self.register_buffer("future", _future(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.shape
        q, k, v = (p(x).view(bsz, seq, HEADS, HEAD).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        position = torch.arange(seq, device=x.device)
        distance = (position[None, :] - position[:, None]).float()  # (T, T): key minus query position
        bias = self.slopes[:, None, None] * distance[None]  # (H, T, T)
        scores = q @ k.transpose(-2, -1) / math.sqrt(HEAD) + bias
        scores = scores.masked_fill(self.future[:seq, :seq], float("-inf"))
        return self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, seq, width))


class AlibiBuffer(nn.Module):
    """A precomputed ALiBi bias buffer holding every head, (1, H, T_max, T_max), passed as SDPA's ``attn_mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        position = torch.arange(MAX_SEQ)
        distance = (position[None, :] - position[:, None]).float()
        bias = (_alibi_slopes(HEADS)[:, None, None] * distance).masked_fill(_future(),
                                                                            float("-inf"))
        self.register_buffer("alibi", bias[None])  # (1, H, T_max, T_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.shape
        q, k, v = self.qkv(x).split(WIDTH, dim=-1)
        q, k, v = (t.view(bsz, seq, HEADS, HEAD).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.alibi[:, :, :seq, :seq])
        return self.proj(out.transpose(1, 2).reshape(bsz, seq, width))


class LearnedHeadBias(nn.Module):
    """A learned bias per head (H, 1, T_max) added to the scores, a learned temperature (a scalar, broadcast
    over every head) and a learned scale over d_ff in the FFN: parameters from outside the pairs, read by
    every rank for its own heads only, whose gradients every rank must get whole."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.head_bias = nn.Parameter(torch.randn(HEADS, 1, MAX_SEQ) * 0.3)
        self.temperature = nn.Parameter(torch.tensor(1.3))
        self.fc1, self.fc2 = nn.Linear(WIDTH, FF), nn.Linear(FF, WIDTH)
        self.gamma = nn.Parameter(1 + torch.randn(FF) * 0.1)
        self.register_buffer("future", _future(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.shape
        q, k, v = (p(x).view(bsz, seq, HEADS, HEAD).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-2, -1) * self.temperature / math.sqrt(HEAD) + self.head_bias[:, :, :seq]
        scores = scores.masked_fill(self.future[:seq, :seq], float("-inf"))
        x = x + self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(bsz, seq, width))
        return x + self.fc2(F.gelu(self.fc1(x)) * self.gamma)


# ------------------------------------------------------------------------------------------------
# unit checks on traced graphs
# ------------------------------------------------------------------------------------------------

def _example(batch: int = 2, seq: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, seq, WIDTH, generator=torch.Generator().manual_seed(seed))


def _traced(model: nn.Module, tracer: str) -> fx.GraphModule:
    """The single-device graph as torch.fx (modules and get_attr parameters) or torch.export (ATen) records it."""
    return capture(model) if tracer == "fx" else export_capture(model, (_example(),)).gm


def _pairing(model: nn.Module, tracer: str, tp: int = 2) -> tuple[fx.GraphModule, Pairing]:
    gm = _traced(model, tracer)
    return gm, pair_sites(gm, find_sites(gm, tp=tp), tp=tp)


def _reads(node: fx.Node, attribute: str) -> bool:
    """Whether ``node``'s value is computed from the model attribute ``attribute`` (a get_attr upstream)."""
    seen, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        if current.op == "get_attr" and current.target == attribute:
            return True
        fresh = [n for n in current.all_input_nodes if n not in seen]
        seen.update(fresh)
        frontier.extend(fresh)
    return False


def _narrowed(pairing: Pairing, gm: fx.GraphModule) -> list[tuple[str, int, int | None]]:
    """(the model attribute the narrowed tensor is read from, dim, block) of every full-size tensor narrowed."""
    nodes = {n.name: n for n in gm.graph.nodes}
    attributes = [name for name, _ in [*gm.named_parameters(), *gm.named_buffers()]]
    found = []
    for narrow in (n for pair in pairing.pairs for n in pair.narrows):
        source = sorted(a for a in attributes if _reads(nodes[narrow.producer], a))
        found.append((",".join(source), narrow.dim, narrow.block))
    return found


@pytest.mark.parametrize("tracer", TRACERS)
def test_transposed_parameter_linears_are_sites(tracer):
    """``x @ w.T`` (fx: getattr .T; export: aten.numpy_T or a permute), ``x @ w.t()`` and ``torch.matmul(x, w.T)``."""
    gm = _traced(TransposedLinears(), tracer)
    finding = find_sites(gm, tp=2)
    assert [(s.role, s.weight_name, s.layout, s.shard_shape) for s in finding.sites] == [
        ("q", "wq", "out_in", (16, 32)), ("k", "wk", "out_in", (16, 32)), ("v", "wv", "out_in", (16, 32)),
        ("fc1", "w1", "out_in", (32, 32))]
    nodes = {n.name: n for n in gm.graph.nodes}
    # the output projection and the FFN's second linear stay whole, each with its reason
    weights = [nodes[r.node_name].args[1].args[0].target for r in finding.replicated]  # matmul(x, T(weight))
    assert weights == ["wo", "w2"] and all(r.reason.startswith("feeds ") for r in finding.replicated)


@pytest.mark.parametrize("tracer", TRACERS)
def test_transposed_parameter_linears_pair_and_slice_their_parameters(tracer):
    torch.manual_seed(0)
    model = TransposedLinears().eval()
    gm, pairing = _pairing(model, tracer)
    assert not pairing.fallbacks
    assert [p.describe() for p in pairing.pairs] == ["wq [4*, 8], wk [4*, 8], wv [4*, 8] -> wo [4*, 8]",
                                                     "w1 [64*] -> w2 [64*]"]
    assert [(p.row_weight_name, p.row_weight_layout) for p in pairing.pairs] == [("wo", "out_in"), ("w2", "out_in")]
    # the first linear's bias is added apart from its matmul: the full-size b1 is narrowed to the rank's d_ff part
    assert ("b1", -1, FF) in _narrowed(pairing, gm)
    program = tpfx.parallelize(model, tp=2, rank=1, mode="megatron", tracer=tracer, example_inputs=(_example(),))
    held = dict(program.named_parameters())
    assert torch.equal(held["wq"], model.wq[16:]) and torch.equal(held["wo"], model.wo[:, 16:])
    assert torch.equal(held["w1"], model.w1[32:]) and torch.equal(held["w2"], model.w2[:, 32:])
    assert torch.equal(held["b1"], model.b1) and torch.equal(held["bo"], model.bo)  # whole on every rank
    specs = tpfx.parameter_shard_specs(program)
    assert {name: spec.dim for name, spec in specs.items()} == {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1}
    assert all(torch.equal(spec.take(getattr(model, name)), held[name]) for name, spec in specs.items())
    parts = [n for n in program.graph.nodes if n.target is rank_part and n.kwargs.get("block") == FF]
    assert [(n.args[0].target, n.args[0].args[0].target, n.args[1]) for n in parts] == [(copy_to_tp, "b1", -1)]


@pytest.mark.parametrize("tracer", TRACERS)
def test_transposed_parameter_linears_in_gather_mode(tracer):
    model = TransposedLinears().eval()
    program = tpfx.parallelize(model, tp=2, rank=0, tracer=tracer, example_inputs=(_example(),))
    specs = tpfx.parameter_shard_specs(program)
    assert {name: (spec.dim, spec.ranges) for name, spec in specs.items()} == {
        "wq": (0, ((0, 16),)), "wk": (0, ((0, 16),)), "wv": (0, ((0, 16),)), "w1": (0, ((0, 32),))}
    assert sum(n.target is gather_from_tp for n in program.graph.nodes) == 4


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("alibi", [False, True], ids=["causal", "alibi"])
def test_baddbmm_scores_are_attention(tracer, alibi):
    """The score matmul's factors are baddbmm's arguments 1 and 2 (the registry's operands), not its bias."""
    gm = _traced(BaddbmmScores(alibi=alibi), tracer)
    (attention,) = find_attentions(to_networkx(gm))
    nodes = {n.name: n for n in gm.graph.nodes}
    (scores,) = [n for n in gm.graph.nodes if "baddbmm" in str(n.target)]
    (values,) = [n for n in gm.graph.nodes if "bmm" in str(n.target) and n is not scores]
    assert (nodes[attention.query], nodes[attention.key]) == (scores.args[1], scores.args[2])
    assert nodes[attention.value] is values.args[1]
    assert [(s.role, s.module_path) for s in find_sites(gm, tp=2).sites] == [("qkv", "qkv")]


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("alibi", [False, True], ids=["causal", "alibi"])
def test_baddbmm_scores_pair_and_an_alibi_bias_is_narrowed(tracer, alibi):
    gm, pairing = _pairing(BaddbmmScores(alibi=alibi), tracer)
    assert not pairing.fallbacks and [p.describe() for p in pairing.pairs] == ["qkv [3, 4*, 8] -> out [4*, 8]"]
    narrowed = [n for n in _narrowed(pairing, gm) if n[0]]  # fx knows no shapes: the shared mask may be narrowed too
    # (B*H, 1, T): each rank's heads are one run of every batch's block of H rows
    assert [n for n in narrowed if "slopes" in n[0]] == ([("future,slopes", -3, HEADS)] if alibi else [])
    if tracer == "export":  # shapes are known: the shared (1, T, T) mask is broadcast over the heads, left alone
        assert narrowed == ([("future,slopes", -3, HEADS)] if alibi else [])


@pytest.mark.parametrize("tracer", TRACERS)
def test_soft_capped_scores_are_attention_and_a_tanh_ffn_stays_an_ffn(tracer):
    gm, pairing = _pairing(SoftCapped(), tracer)
    assert [(s.role, s.module_path) for s in find_sites(gm, tp=2).sites] == [
        ("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("fc1", "fc1")]
    assert [p.describe() for p in pairing.pairs] == ["q_proj [4*, 8], k_proj [4*, 8], v_proj [4*, 8] -> o_proj [4*, 8]",
                                                     "fc1 [64*] -> fc2 [64*]"]
    assert not pairing.fallbacks


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize(("make", "expected"), [
    (AlibiSlopes, [("slopes", -3, HEADS)]),
    (AlibiBuffer, [("alibi", -3, HEADS)]),
    (LearnedHeadBias, [("head_bias", -3, HEADS), ("gamma", -1, FF)]),
], ids=["slopes-times-distance", "buffer-as-sdpa-mask", "learned"])
def test_per_head_bias_is_narrowed_to_the_ranks_heads(tracer, make, expected):
    gm, pairing = _pairing(make(), tracer)
    assert not pairing.fallbacks and len(pairing.pairs) == len({dim for _, dim, _ in expected})
    narrowed = [n for n in _narrowed(pairing, gm) if n[0] != "future"]  # fx: the mask of unknown shape too
    assert narrowed == expected


@pytest.mark.parametrize("tracer", TRACERS)
def test_learned_tensors_read_between_a_pair_have_their_gradient_summed_over_the_group(tracer):
    """head_bias and gamma are narrowed, the temperature is broadcast: all three get a copy-to (all-reduce
    backward) that only the pair's ops read; the buffers and masks get none."""
    model = LearnedHeadBias().eval()
    program = tpfx.parallelize(model, tp=2, rank=0, mode="megatron", tracer=tracer, example_inputs=(_example(),))
    copies = {name: _copies_of(program.graph, name) for name in ("head_bias", "temperature", "gamma", "future")}
    assert {name: len(found) for name, found in copies.items()} == {
        "head_bias": 1, "temperature": 1, "gamma": 1, "future": 0}
    (temperature,) = copies["temperature"]  # broadcast over the heads: summed, not narrowed
    assert [u.target for u in temperature.users] in ([operator.mul], [torch.ops.aten.mul.Tensor])
    for name in ("head_bias", "gamma"):  # full size: summed, then narrowed to the rank's part
        assert [u.target for u in copies[name][0].users] == [rank_part]


def _copies_of(graph: fx.Graph, attribute: str) -> list[fx.Node]:
    """The nodes that pass on a model attribute, or a slice of it (``head_bias[:, :, :seq]``), with its
    gradient summed: its copy-to, or its item of a bucket of them (passes/bucket_gradient_sums.py)."""
    found = []
    for copy in graph.nodes:
        if copy.target is copy_to_tp:
            source = copy.args[0]
        elif copy.target is operator.getitem and getattr(copy.args[0], "target", None) is sum_gradients_over_tp:
            source = copy.args[0].args[0][copy.args[1]]
        else:
            continue
        while source.op == "call_function" and source.target in (operator.getitem, torch.ops.aten.slice.Tensor):
            source = source.args[0]
        if source.op == "get_attr" and source.target == attribute:
            found.append(copy)
    return found


class _HeadsMergedWithPositions(nn.Module):
    """Scores viewed as (B, H*T, T) and a per-head bias added there: a rank's rows are not a block of known size."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.register_buffer("slopes", _alibi_slopes(HEADS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.shape
        q, k, v = (p(x).view(bsz, seq, HEADS, HEAD).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        position = torch.arange(seq, device=x.device)
        distance = (position[None, :] - position[:, None]).float()
        bias = (self.slopes[:, None, None] * distance).reshape(1, HEADS * seq, seq)  # (1, H*T, T)
        scores = (q @ k.transpose(-2, -1)).reshape(bsz, HEADS * seq, seq) + bias
        out = scores.view(bsz, HEADS, seq, seq).softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, width))


@pytest.mark.parametrize("tracer", TRACERS)
def test_a_full_size_tensor_that_cannot_be_narrowed_falls_back_with_the_reason(tracer):
    _, pairing = _pairing(_HeadsMergedWithPositions(), tracer)
    assert not pairing.pairs
    (fallback,) = pairing.fallbacks
    assert fallback.reason.startswith("'add' combines the tensor ") and "from outside the pair" in fallback.reason
    assert "known while tracing; give the heads a dim of their own" in fallback.reason
    assert "\n" not in fallback.reason


def test_a_ranks_part_of_blocks_is_its_heads_of_every_block_and_broadcast_dims_stay_whole():
    full = torch.arange(3 * 4 * 2 * 5.0).view(3 * 4 * 2, 5)  # (B*H*inner, 5): B=3, H=4, inner=2
    for tp in (1, 2, 4):
        for rank in range(tp):
            kept = 4 // tp
            expected = full.view(3, 4, 2, 5)[:, rank * kept:(rank + 1) * kept].reshape(-1, 5)
            assert torch.equal(part_of_blocks(full, -2, 4 * 2, rank, tp), expected)
    broadcast = torch.randn(1, 7)
    assert part_of_blocks(broadcast, -2, 8, 1, 2) is broadcast  # size 1 along the dim
    assert part_of_blocks(broadcast, -3, 8, 1, 2) is broadcast  # no such dim: broadcast too
    with pytest.raises(ValueError, match="counted from the end"):
        part_of_blocks(full, 0, 8, 0, 2)


# ------------------------------------------------------------------------------------------------
# parity in real processes: world 4, tp=2 (two groups, each half of the cases) and tp=4
# ------------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[[], nn.Module]] = {
    "transposed": TransposedLinears, "baddbmm alibi": lambda: BaddbmmScores(alibi=True), "soft cap": SoftCapped,
    "alibi slopes": AlibiSlopes, "alibi buffer": AlibiBuffer, "learned head bias": LearnedHeadBias}
CALLS = {"example": (2, 6), "other shape": (3, 9)}  # (batch, seq): the export's dynamic dims at another size


def _parity(label: str, tp: int, mode: str, tracer: str, group: dist.ProcessGroup | None) -> dict:
    torch.manual_seed(0)
    reference = MODELS[label]().eval()
    gm = tpfx.parallelize(reference, tp=tp, group=group, mode=mode, tracer=tracer, example_inputs=(_example(),))
    diffs = {}
    # fx: train mode is another call form, traced and paired again on its first call (export: exported again)
    calls = [(call, size, False) for call, size in CALLS.items()]
    calls += [("train", (2, 6), True)] if tracer == "fx" else []
    for call, (batch, seq), training in calls:
        reference.train(training)
        gm.train(training)
        (ref_out, ref_loss), (out, loss) = (square_mean_step(m, _example(batch, seq, seed=5)) for m in (reference, gm))
        diffs |= {f"{call} output": max_diff(out, ref_out), f"{call} loss": max_diff(loss, ref_loss)}
        diffs |= {f"{call} grad {name}": value for name, value in grad_diffs(gm, reference).items()}
    pairing = gm.tpfx_pairing
    return {"diffs": diffs, "tracer": gm.tpfx_report.tracer, "sites": len(gm.tpfx_report.sites),
            "fallbacks": [f.reason for f in pairing.fallbacks] if pairing else [],
            "pairs": len(pairing.pairs) if pairing else 0}


def _world(rank: int, world_size: int) -> dict:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    half = rank // 2
    labels = list(MODELS)[half::2]  # the two tp=2 groups check different models at once
    results = {}
    for label in labels:
        for tracer in TRACERS:
            for mode in ("gather", "megatron"):
                results[(label, 2, mode, tracer)] = _parity(label, 2, mode, tracer, groups[half])
    for label in MODELS:  # tp=4: one head per rank (gather mode's column split is checked at tp=2: tp-blind)
        for mode, tracer in (("megatron", "fx"), ("megatron", "export")):
            results[(label, 4, mode, tracer)] = _parity(label, 4, mode, tracer, None)
    return results


@pytest.fixture(scope="module")
def world() -> list[dict]:
    return run_ranks(_world, 4)


def test_every_pattern_matches_single_device_in_both_modes_and_tracers(world):
    checked = set()
    for rank, results in enumerate(world):
        for (label, tp, mode, tracer), result in results.items():
            checked.add((label, tp, mode, tracer))
            where = f"{label} tp={tp} {mode} {tracer} rank {rank}"
            assert result["tracer"] == tracer, where
            bad = {k: v for k, v in result["diffs"].items() if not v <= TOL}
            assert not bad, f"{where}: {len(bad)} tensors differ by more than {TOL}: {bad}"
            assert len(result["diffs"]) >= 2 * (2 + 4), where  # output, loss and every gradient, per call
            assert result["sites"] >= 1, where
            if mode == "megatron":
                assert not result["fallbacks"] and result["pairs"] >= 1, (where, result["fallbacks"])
    assert len(checked) == len(MODELS) * (4 + 2)


_PLAN_MODELS = MODELS


@pytest.mark.parametrize("name", list(_PLAN_MODELS))
def test_every_model_holds_what_its_plan_and_report_say(name):
    """The report's shard shapes and the plan's specs are the parameters each rank holds (fx, both modes)."""
    check_programs_of_every_mode_and_tp(_PLAN_MODELS[name])
