"""The site finder and the column-shard pass on ATen graphs from torch.export: structure decides, names never do."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tpfx.passes.column_shard import column_shard
from tpfx.passes.find_sites import Site, find_sites
from tpfx.passes.graph_view import LINEAR, MATMUL, to_networkx
from tpfx.collectives import copy_to_tp, gather_from_tp
from tpfx.export_capture import export_capture

D, HEADS = 32, 4


def _export(model: nn.Module, *shape: int) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return export_capture(model.eval(), (torch.randn(*shape),)).gm


def _roles(finding) -> list[tuple[str, str]]:
    return [(s.role, s.module_path) for s in finding.sites]


class _Conv1D(nn.Module):
    """GPT-2's Conv1D: the weight is stored (in, out) and applied with addmm."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.2)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


class _Gpt2Block(nn.Module):
    """Fused [Q | K | V] split on the last dim into sdpa; tanh GELU written out with pow/tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = _Conv1D(D, 3 * D), _Conv1D(D, D)
        self.c_fc, self.c_out = _Conv1D(D, 4 * D), _Conv1D(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (part.view(b, t, HEADS, -1).transpose(1, 2) for part in self.c_attn(x).split(D, dim=2))
        x = x + self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D))
        h = self.c_fc(x)
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return x + self.c_out(h)


def test_conv1d_weights_are_in_out_sites_and_the_written_out_gelu_counts():
    finding = find_sites(_export(_Gpt2Block(), 2, 5, D), tp=2)
    assert _roles(finding) == [("qkv", "c_attn"), ("fc1", "c_fc")]
    qkv = finding.sites[0]
    assert (qkv.layout, qkv.shard_dim, qkv.weight_shape, qkv.shard_shape) == ("in_out", 1, (D, 3 * D), (D, 3 * D // 2))
    assert (qkv.weight_name, qkv.bias_name) == ("c_attn.weight", "c_attn.bias")
    assert sorted(r.module_path for r in finding.replicated) == ["c_out", "c_proj"]


def test_in_out_shard_holds_columns_and_bias_with_collectives_around_the_op():
    block = _Gpt2Block()
    gm = _export(block, 2, 5, D)
    sites = find_sites(gm, tp=2).sites
    gm = column_shard(gm, sites, tp=2, rank=1, group="tp:0-1", source=block).gm
    assert torch.equal(gm.get_parameter("c_attn.weight"), block.c_attn.weight[:, 48:])
    assert torch.equal(gm.get_parameter("c_attn.bias"), block.c_attn.bias[48:])
    assert torch.equal(gm.get_parameter("c_proj.weight"), block.c_proj.weight)  # replicated: whole
    addmm = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.addmm.default)
    assert addmm.args[1].target is copy_to_tp  # the data operand of addmm(bias, x, W) is argument 1
    assert [u.target for u in addmm.users] == [gather_from_tp]
    assert sum(n.target is gather_from_tp for n in gm.graph.nodes) == 2
    gm.graph.lint()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _LlamaBlock(nn.Module):
    """Separate q/k/v, rotary embeddings, grouped-query (2 kv heads repeated), eager attention, SiLU gate."""

    def __init__(self, kv_heads: int = 2) -> None:
        super().__init__()
        self.kv_heads, self.dh = kv_heads, D // HEADS
        self.q_proj, self.o_proj = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(D, kv_heads * self.dh, bias=False) for _ in range(2))
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(D, 64), nn.Linear(D, 64), nn.Linear(64, D)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.dh, 2).float() / self.dh))

    def _heads(self, y: torch.Tensor, n: int) -> torch.Tensor:
        return y.view(y.shape[0], y.shape[1], n, self.dh).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        angles = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        q = self._heads(self.q_proj(x), HEADS)
        k = self._heads(self.k_proj(x), self.kv_heads)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        repeat = HEADS // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, repeat, t, self.dh).reshape(b, HEADS, t, self.dh)
        v = self._heads(self.v_proj(x), self.kv_heads)[:, :, None].expand(b, self.kv_heads, repeat, t, self.dh)
        v = v.reshape(b, HEADS, t, self.dh)
        probs = torch.softmax(q @ k.transpose(2, 3) / math.sqrt(self.dh), dim=-1)
        x = x + self.o_proj((probs @ v).transpose(1, 2).reshape(b, t, D))
        return x + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def test_rotary_gqa_eager_attention_and_gated_ffn():
    gm = _export(_LlamaBlock(), 2, 6, D)
    view = to_networkx(gm)
    assert sum(view.nodes[n]["kind"] == MATMUL for n in view.nodes) == 2  # q @ k^T and probs @ v
    assert sum(view.nodes[n]["kind"] == LINEAR for n in view.nodes) == 7
    finding = find_sites(gm, tp=2)
    assert _roles(finding) == [("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("fc1", "gate_proj"),
                               ("up", "up_proj")]
    assert all(s.layout == "out_in" and s.shard_dim == 0 for s in finding.sites)
    assert finding.sites[1].shard_shape == (D // HEADS, D)  # 2 kv heads of 8: 8 rows per rank
    assert sorted(r.module_path for r in finding.replicated) == ["down_proj", "o_proj"]


class _TransposedAndErf(nn.Module):
    """``x @ W.t()`` on an (out, in) parameter, and exact GELU written with erf."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(64, D) * 0.2)
        self.w_out = nn.Parameter(torch.randn(D, 64) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w_in.t()
        h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        return x + h @ self.w_out.t()


def test_transposed_parameter_is_an_out_in_site_and_erf_gelu_counts():
    finding = find_sites(_export(_TransposedAndErf(), 2, 3, D), tp=4)
    # weights of the model itself: the records name them by the weight's own name (no module owns them)
    assert finding.sites == (Site("fc1", "w_in", finding.sites[0].node_name, (64, D), (16, D), 0, "out_in", "w_in", ""),)
    assert [r.module_path for r in finding.replicated] == ["w_out"]


class _NormBetweenBlocks(nn.Module):
    """An RMS norm (pow, mean, rsqrt) between an output projection and the next linears: no activation on the path."""

    def __init__(self) -> None:
        super().__init__()
        self.out_proj, self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, 64), nn.Linear(64, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.out_proj(x)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.fc2(F.relu(self.fc1(normed)))


def test_a_norm_on_the_residual_stream_does_not_make_an_fc1():
    finding = find_sites(_export(_NormBetweenBlocks(), 2, 3, D), tp=2)
    assert _roles(finding) == [("fc1", "fc1")]
    reason = {r.module_path: r.reason for r in finding.replicated}["out_proj"]
    assert reason.startswith("feeds the residual add only")


class _Unreadable(nn.Module):
    """q passes a cumulative sum (mixes positions) before attention: the finder cannot call it head-local."""

    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Linear(D, D) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).cumsum(dim=-1)
        q, k, v = (y.view(b, t, HEADS, -1).transpose(1, 2) for y in (q, self.wk(x), self.wv(x)))
        return F.scaled_dot_product_attention(q, k, v)


def test_a_linear_the_finder_cannot_read_is_explained_with_the_node_where_matching_stopped():
    gm = _export(_Unreadable(), 2, 3, D)
    finding = find_sites(gm, tp=2)
    assert _roles(finding) == [("k", "wk"), ("v", "wv")]
    (wq,) = finding.replicated
    cumsum = next(n.name for n in gm.graph.nodes if n.target == torch.ops.aten.cumsum.default)
    assert wq.module_path == "wq" and wq.reason.startswith("feeds op 'cumsum")
    assert wq.reason.endswith(f"matching stopped at op 'cumsum' (node {cumsum})") and "\n" not in wq.reason


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_hugging_face_eager_attention_is_matmul_softmax_matmul_at_aten_level(name):
    hf_models = pytest.importorskip("examples.hf_models")
    model = hf_models.build(name, attn_implementation="eager", num_hidden_layers=1)
    gm = export_capture(model, hf_models.example_inputs()).gm
    assert not any("scaled_dot_product" in str(n.target) for n in gm.graph.nodes)
    roles = [s.role for s in find_sites(gm, tp=2).sites]
    assert roles == (["q", "k", "v", "fc1", "up"] if name == "llama" else ["q", "k", "v", "fc1"])


class _WeightReadElsewhere(nn.Module):
    """fc1's weight is also read by a penalty term: slicing it would change that term."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(64, D)), nn.Parameter(torch.randn(D, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(x, self.w1)), self.w2) + self.w1.pow(2).sum()


def test_a_weight_read_by_another_op_stays_whole():
    gm = _export(_WeightReadElsewhere(), 2, 3, D)
    finding = find_sites(gm, tp=2)
    assert finding.sites == ()
    reader = next(n.name for n in gm.graph.nodes if n.target == torch.ops.aten.pow.Tensor_Scalar)
    assert f"also read by node {reader}, which is not a linear" in finding.replicated[0].reason
