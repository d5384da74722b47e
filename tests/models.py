"""Small attention and FFN models shared by the tests (written here; each writes q, k and v another way).

Tests import models from this file only, never from another test file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class ReluFFN(nn.Module):
    """fc1 -> relu -> fc2 on 16 features: the smallest FFN site and its row partner."""

    def __init__(self, d_ff: int = 64) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, d_ff), nn.Linear(d_ff, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@dataclass(frozen=True)
class GPTShape:
    """A small GPT-like configuration, as the randomised parity test draws it."""

    heads: int = 4
    kv_heads: int = 4  # fewer than heads: grouped-query attention (k and v repeated to the query heads)
    head_dim: int = 8
    ffn: int = 64
    bias: bool = True
    gated: bool = False  # SwiGLU (gate * up -> down) instead of GELU (fc1 -> fc2)
    rotary: bool = False  # rotary embeddings on q and k instead of learned positions
    fused_qkv: bool = True
    tied: bool = False  # the output head shares the token embedding's weight
    layers: int = 1
    vocab: int = 64
    positions: int = 16

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class ShapedBlock(nn.Module):
    """Pre-norm attention (fused or separate q/k/v, grouped or not, rotary or not) and FFN (gated or not)."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.shape = shape
        width, kv_width = shape.width, shape.kv_heads * shape.head_dim
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        if shape.fused_qkv:
            self.qkv = nn.Linear(width, width + 2 * kv_width, bias=shape.bias)
        else:
            self.q = nn.Linear(width, width, bias=shape.bias)
            self.k, self.v = (nn.Linear(width, kv_width, bias=shape.bias) for _ in range(2))
        self.o = nn.Linear(width, width, bias=shape.bias)
        if shape.gated:
            self.gate, self.up = (nn.Linear(width, shape.ffn, bias=shape.bias) for _ in range(2))
        else:
            self.up = nn.Linear(width, shape.ffn, bias=shape.bias)
        self.down = nn.Linear(shape.ffn, width, bias=shape.bias)
        if shape.rotary:
            inverse = 1.0 / (10000 ** (torch.arange(0, shape.head_dim, 2).float() / shape.head_dim))
            angles = torch.outer(torch.arange(shape.positions).float(), inverse)
            angles = torch.cat((angles, angles), dim=-1)  # (T, Dh)
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        bsz, seq, _ = x.shape
        return x.view(bsz, seq, count, self.shape.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        shape, (bsz, seq, width) = self.shape, x.shape
        if shape.fused_qkv:
            kv_width = shape.kv_heads * shape.head_dim
            q, k, v = self.qkv(x).split([width, kv_width, kv_width], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = self._heads(q, shape.heads), self._heads(k, shape.kv_heads), self._heads(v, shape.kv_heads)
        if shape.rotary:
            cos, sin = self.cos[:seq], self.sin[:seq]
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if shape.kv_heads != shape.heads:
            repeat = shape.heads // shape.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(bsz, seq, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln1(x))
        h = self.ln2(x)
        h = F.silu(self.gate(h)) * self.up(h) if self.shape.gated else F.gelu(self.up(h))
        return x + self.down(h)


class ShapedGPT(nn.Module):
    """A GPT built from a :class:`GPTShape`: embeddings, blocks, final norm, output head (tied or not)."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab, shape.width)
        self.position = None if shape.rotary else nn.Embedding(shape.positions, shape.width)
        self.blocks = nn.ModuleList(ShapedBlock(shape) for _ in range(shape.layers))
        self.norm = nn.LayerNorm(shape.width)
        self.head = nn.Linear(shape.width, shape.vocab, bias=False)
        if shape.tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.position is not None:
            x = x + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
