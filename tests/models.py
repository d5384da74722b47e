"""Small attention and FFN models shared by the tests (written here; each writes q, k and v another way).

Tests import models from this file only, never from another test file.
"""

from __future__ import annotations

import math

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


class GroupsFromShapes(nn.Module):
    """Grouped-query attention whose repeat count is computed from the split tensors' shapes at run time.

    ``spelling``: ``"literal"``: ``groups = self.heads // k.shape[1]``; ``"both"``: ``q.size(1) // k.size(1)``.
    Sharded, ``k.shape[1]`` is the rank's head count; the repeats are the same on every rank.
    """

    def __init__(self, spelling: str = "literal", *, heads: int = HEADS, kv_heads: int = 2) -> None:
        super().__init__()
        self.spelling, self.heads, self.width = spelling, heads, heads * HEAD
        self.q_proj, self.o_proj = nn.Linear(self.width, self.width), nn.Linear(self.width, self.width)
        self.k_proj, self.v_proj = (nn.Linear(self.width, kv_heads * HEAD) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, k, v = (proj(x).view(bsz, seq, -1, HEAD).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        groups = self.heads // k.shape[1] if self.spelling == "literal" else q.size(1) // k.size(1)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, self.width))


class ShortcutWithoutScale(nn.Module):
    """Attention with its scores scaled by ``scale``; without ``scale``, a shortcut that feeds v alone to the
    output projection. tpfx traces every argument given first: the form without it uses the first form's
    pair's linears differently."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None:
            return self.o_proj(self.v_proj(x))
        bsz, seq, _ = x.shape
        q, k, v = (proj(x).view(bsz, seq, HEADS, HEAD).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(_attend(q * scale, k, v).transpose(1, 2).reshape(bsz, seq, WIDTH))
