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


class GroupedLM(nn.Module):
    """A token embedding, two grouped-query blocks with gated FFNs (:class:`Grouped`), an RMSNorm and an LM head.

    With labels it returns only the loss, spelled ``nll_loss(log_softmax(logits))``; without, the logits.
    """

    def __init__(self, vocab: int = 64, kv_heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, WIDTH)
        self.blocks = nn.ModuleList(Grouped(kv_heads) for _ in range(2))
        self.norm = nn.RMSNorm(WIDTH)
        self.head = nn.Linear(WIDTH, vocab, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.norm(h))  # (B, T, V)
        if labels is None:
            return logits
        log_probs = F.log_softmax(logits.flatten(0, 1), dim=-1)  # (B*T, V)
        return F.nll_loss(log_probs, labels.flatten())


def tie_embedding_and_head(model: nn.Module, embedding: str, head: str) -> nn.Module:
    """``model`` with its LM head's weight made the embedding's table (GPT-2 and nanoGPT tie them)."""
    model.get_submodule(head).weight = model.get_submodule(embedding).weight
    return model
