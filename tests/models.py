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


class FlatTokens(nn.Module):
    """GPT-2 Conv1D style, two residual FFN blocks: norm, then the FFN on tokens flattened to
    (batch*seq, width), viewed back before the residual add. The pairs' collectives sit on flattened tokens."""

    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in range(blocks))
        self.fc1s = nn.ModuleList(nn.Linear(WIDTH, 4 * WIDTH) for _ in range(blocks))
        self.fc2s = nn.ModuleList(nn.Linear(4 * WIDTH, WIDTH) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, width = x.size()
        for norm, fc1, fc2 in zip(self.norms, self.fc1s, self.fc2s):
            h = norm(x).view(-1, width)  # (B*T, W)
            x = x + fc2(F.gelu(fc1(h))).view(bsz, seq, width)
        return x


class TokenMixing(nn.Module):
    """Two residual FFN blocks with ops that mix tokens around them: a running sum over the sequence
    between the blocks, a mean over the sequence subtracted at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1s = nn.ModuleList(nn.Linear(WIDTH, 2 * WIDTH) for _ in range(2))
        self.fc2s = nn.ModuleList(nn.Linear(2 * WIDTH, WIDTH) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2s[0](torch.relu(self.fc1s[0](x)))
        x = x + x.cumsum(dim=1) / x.size(1)  # every token sees the ones before it
        x = x + self.fc2s[1](torch.relu(self.fc1s[1](x)))
        return x - x.mean(dim=1, keepdim=True)


# ---------------------------------------------------------------- whole models torch.fx cannot trace
# Each asserts on a size, iterates over a shape and builds a tensor from a traced size, as model code
# in the wild does (nanoGPT, LLaMA reference code): tpfx captures them from their first call.

VOCAB, BLOCK = 64, 16


class _NanoAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = [size for size in x.shape]  # iterates over the shape (fx: a Proxy is not iterable)
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        causal = torch.ones(T, T, device=x.device).tril()  # a tensor built from a traced size
        att = F.softmax(att.masked_fill(causal == 0, float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(B, T, C))


class _NanoBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(WIDTH), _NanoAttention(), nn.LayerNorm(WIDTH)
        self.c_fc, self.c_proj = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPTStyle(nn.Module):
    """nanoGPT's GPT in small: ``assert t <= block_size``, ``torch.ones(T, T)`` mask, weight-tied head."""

    def __init__(self, n_layer: int = 2) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(BLOCK, WIDTH)
        self.h = nn.ModuleList(_NanoBlock() for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t = idx.size()
        assert t <= BLOCK, f"Cannot forward sequence of length {t}, block size is only {BLOCK}"
        x = self.wte(idx) + self.wpe(torch.arange(0, t, dtype=torch.long, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


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


class _LlamaAttention(nn.Module):
    def __init__(self, kv_heads: int = 2) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        self.wq = nn.Linear(WIDTH, WIDTH, bias=False)
        self.wk, self.wv = nn.Linear(WIDTH, kv_heads * HEAD, bias=False), nn.Linear(WIDTH, kv_heads * HEAD, bias=False)
        self.wo = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, HEADS, HEAD).transpose(1, 2)
        k = self.wk(x).view(bsz, seqlen, self.kv_heads, HEAD).transpose(1, 2)
        v = self.wv(x).view(bsz, seqlen, self.kv_heads, HEAD).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(HEADS // self.kv_heads, dim=1)
        v = v.repeat_interleave(HEADS // self.kv_heads, dim=1)
        mask = torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device).tril()  # from a traced size
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class _LlamaFeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(WIDTH, 3 * WIDTH, bias=False), nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.w2 = nn.Linear(3 * WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = 1
        for size in x.shape[:-1]:  # iterates over the shape: the FFN runs on (tokens, width)
            tokens = tokens * size
        flat = x.reshape(tokens, x.shape[-1])
        return self.w2(F.silu(self.w1(flat)) * self.w3(flat)).view_as(x)


class _LlamaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm, self.attention = nn.RMSNorm(WIDTH), _LlamaAttention()
        self.ffn_norm, self.feed_forward = nn.RMSNorm(WIDTH), _LlamaFeedForward()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaStyle(nn.Module):
    """LLaMA reference code in small: grouped-query attention, rotary, RMSNorm, SwiGLU, a length assertion."""

    def __init__(self, n_layer: int = 2, max_seq_len: int = BLOCK) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.tok_embeddings = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(_LlamaBlock() for _ in range(n_layer))
        self.norm, self.output = nn.RMSNorm(WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _bsz, seqlen = tokens.shape
        assert seqlen <= self.max_seq_len, "sequence longer than max_seq_len"
        position = torch.arange(seqlen, device=tokens.device, dtype=torch.float32)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD, 2, device=tokens.device).float() / HEAD))
        angles = torch.outer(position, inv_freq).repeat(1, 2)  # (T, Dh)
        cos, sin = angles.cos(), angles.sin()
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


class CachingLM(nn.Module):
    """A decoder that returns its keys and values for generation unless told not to, as Hugging Face
    models do: ``use_cache`` defaults to the model's own setting, which is on."""

    def __init__(self, vocab: int = 64) -> None:
        super().__init__()
        self.use_cache = True  # what every pretrained config says
        self.embed = nn.Embedding(vocab, WIDTH)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.o_proj = nn.Linear(WIDTH, WIDTH)
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, vocab, bias=False)

    def forward(self, ids: torch.Tensor, use_cache: bool | None = None):  # noqa: ANN201 - logits, or (logits, cache)
        use_cache = self.use_cache if use_cache is None else use_cache
        bsz, seq = ids.shape
        x = self.embed(ids)
        q, k, v = (proj(x).view(bsz, seq, HEADS, HEAD).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        h = x + self.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(bsz, seq, -1))
        logits = self.head(h + self.fc2(F.gelu(self.fc1(h))))
        return (logits, [(k, v)]) if use_cache else logits


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
