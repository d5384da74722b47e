"""The site finder on traced graphs: structure decides, names never do."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.gpt import GPTModel, small_config
from tpfx.passes.find_sites import Site, find_sites
from tpfx.capture import capture


def _gpt_finding(n_layers: int = 3, tp: int = 2):
    return find_sites(capture(GPTModel(small_config(n_layers=n_layers))), tp=tp)


def test_gpt_has_exactly_qkv_and_fc1_per_block():
    finding = _gpt_finding(n_layers=3)
    assert [(s.role, s.module_path) for s in finding.sites] == [
        (role, f"blocks.{i}.{path}") for i in range(3) for role, path in (("qkv", "attn.qkv_proj"), ("fc1", "ffn.fc1"))]
    assert sorted(r.module_path for r in finding.replicated) == sorted(
        [f"blocks.{i}.{p}" for i in range(3) for p in ("attn.out_proj", "ffn.fc2")] + ["lm_head"])


def test_site_records_carry_full_and_shard_shapes():
    qkv, fc1 = _gpt_finding(n_layers=1, tp=4).sites
    assert qkv == Site("qkv", "blocks.0.attn.qkv_proj", "blocks_0_attn_qkv_proj", (384, 128), (96, 128), 0)
    assert (fc1.weight_shape, fc1.shard_shape) == ((512, 128), (128, 128))


def test_residual_only_linears_say_why():
    reasons = {r.module_path: r.reason for r in _gpt_finding(n_layers=1).replicated}
    assert reasons["blocks.0.ffn.fc2"].startswith("feeds dropout -> the residual add only")
    assert reasons["blocks.0.attn.out_proj"].startswith("feeds dropout -> the residual add only")
    assert "the model output" in reasons["lm_head"]


class _RenamedFFN(nn.Module):
    """An FFN whose linears have unhelpful names: found by structure all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Linear(16, 64)
        self.beta = nn.Linear(64, 16)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.beta(self.act(self.alpha(x)))


def test_ffn_with_other_names_is_found():
    finding = find_sites(capture(_RenamedFFN()), tp=2)
    assert [(s.role, s.module_path) for s in finding.sites] == [("fc1", "alpha")]
    assert [r.module_path for r in finding.replicated] == ["beta"]


class _Fc1WithoutActivation(nn.Module):
    """A linear *named* fc1 that feeds the next linear directly: no activation, no site."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


def test_linear_named_fc1_without_activation_is_not_sharded():
    finding = find_sites(capture(_Fc1WithoutActivation()), tp=2)
    assert finding.sites == ()
    reason = {r.module_path: r.reason for r in finding.replicated}["fc1"]
    assert reason.startswith("feeds another linear directly only")


class _ResidualOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.proj(x))  # the activation comes after the residual add, not after the linear


def test_linear_feeding_only_a_residual_add_is_not_sharded():
    finding = find_sites(capture(_ResidualOnly()), tp=2)
    assert finding.sites == ()
    assert finding.replicated[0].reason.startswith("feeds the residual add only")


class _SdpaSeparateProjections(nn.Module):
    """Separate q, k, v linears into scaled_dot_product_attention, and a gated FFN."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, 64), nn.Linear(d, 64), nn.Linear(64, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (w(x).view(b, t, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.wo(a)
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


def test_separate_qkv_and_gated_ffn_roles():
    finding = find_sites(capture(_SdpaSeparateProjections()), tp=2)
    assert [(s.role, s.module_path) for s in finding.sites] == [
        ("q", "wq"), ("k", "wk"), ("v", "wv"), ("fc1", "gate"), ("up", "up")]
    assert sorted(r.module_path for r in finding.replicated) == ["down", "wo"]


class _TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.fc = nn.Linear(16, 10, bias=False)
        self.fc.weight = self.embed.weight  # tied: looks like an fc1 but must stay whole
        self.out = nn.Linear(10, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.embed(ids))))


def test_tied_weight_is_not_sharded():
    finding = find_sites(capture(_TiedHead()), tp=2)
    assert finding.sites == ()
    assert "tied" in {r.module_path: r.reason for r in finding.replicated}["fc"]
