"""A small GPT in the style of the seed blog's model, with no tensor-parallel code at all.

tpfx parallelizes this model unmodified: the fused ``qkv_proj`` of every attention and the
``fc1`` of every feed-forward are found by graph structure and column-sharded.

Factories for the CLI: ``tiny_gpt`` (a model), ``tiny_gpt_with_inputs`` (a model and example inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """The seed's configuration fields."""

    vocab_size: int = 32000
    max_position_embeddings: int = 1024
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_ff: int = 3072
    dropout: float = 0.1


class MultiHeadSelfAttention(nn.Module):
    """Causal self-attention with one fused QKV projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.d_head = config.d_model // config.n_heads
        self.qkv_proj = nn.Linear(config.d_model, 3 * config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        n = config.max_position_embeddings
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seq_len, d_model = x.size()
        qkv = self.qkv_proj(x)  # (B, T, 3*D)
        qkv = qkv.view(bsz, seq_len, 3, self.n_heads, self.d_head)  # (B, T, 3, H, Dh)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)  # (B, H, T, T)
        causal = self.causal_mask[:, :, :seq_len, :seq_len]
        scores = scores.masked_fill(~causal, float("-inf"))
        if attention_mask is not None:
            # padding mask on the key side; finite so that a fully padded row stays finite
            key_is_pad = attention_mask[:, None, None, :] == 0  # (B, 1, 1, T)
            scores = scores.masked_fill(key_is_pad, -1e4)
        probs = self.dropout(F.softmax(scores, dim=-1))
        out = probs @ v  # (B, H, T, Dh)
        out = out.transpose(1, 2).contiguous().view(bsz, seq_len, d_model)  # (B, T, D)
        return self.dropout(self.out_proj(out))


class FeedForward(nn.Module):
    """fc1 -> GELU -> fc2 -> dropout."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + ffn(ln2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = MultiHeadSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), attention_mask)
        return x + self.ffn(self.ln2(x))


class GPTModel(nn.Module):
    """Token + learned position embeddings, pre-norm blocks, final norm, lm_head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(logits, loss)``; loss is the shifted cross-entropy, None without labels."""
        seq_len = input_ids.size(1)
        positions = torch.arange(seq_len, device=input_ids.device)  # (T,)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, T, D)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, attention_mask)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1, :].contiguous()
            shift_labels = labels[:, 1:].contiguous()
            loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        return logits, loss


def small_config(**overrides: int | float) -> GPTConfig:
    """The seed's test configuration: 2 layers, 4 heads, d_model 128, d_ff 512."""
    fields = dict(vocab_size=10000, max_position_embeddings=128, n_layers=2, n_heads=4,
                  d_model=128, d_ff=512, dropout=0.1)
    fields.update(overrides)
    return GPTConfig(**fields)


def tiny_gpt() -> GPTModel:
    """CLI factory: the seed's small GPT in eval mode, seeded."""
    torch.manual_seed(0)
    return GPTModel(small_config()).eval()


def tiny_gpt_with_inputs() -> tuple[GPTModel, tuple[torch.Tensor, ...]]:
    """CLI factory: the small GPT and example ``(input_ids, attention_mask, labels)``."""
    model = tiny_gpt()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, (input_ids, torch.ones_like(input_ids), input_ids)
