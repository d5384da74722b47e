"""The baseline tpfx competes with: tensor parallelism written by hand into the model, in the seed's style.

The seed blog edits the model's own code: ``qkv_proj`` and ``fc1`` become a ColumnParallelLinear
that gathers its output (gather mode); Megatron's layout additionally turns ``out_proj`` and ``fc2``
into RowParallelLinear layers and runs attention on this rank's heads only. Everything here is written
for the example GPT (:mod:`examples.gpt`) and knows its attribute names and its fused QKV layout
``[3, n_heads, d_head]``: that is what "hand-written" means, and what tpfx avoids.

Each rank holds only its slices, copied from a single-device model so that the numbers can be
compared with it. The collectives use the default process group (tp = world size) and carry their
own autograd rules:

* copy:   forward identity,          backward all-reduce (sum)
* gather: forward all-gather (last), backward this rank's slice
* reduce: forward all-reduce (sum),  backward identity
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from examples.gpt import GPTConfig, GPTModel, MultiHeadSelfAttention


class _CopyIntoParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.contiguous().clone()
        dist.all_reduce(summed)
        return summed


class _GatherFromParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        ctx.width = local.shape[-1]
        local = local.contiguous()
        pieces = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, local)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start = dist.get_rank() * ctx.width
        return grad[..., start:start + ctx.width].contiguous()


class _ReduceFromParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: torch.Tensor) -> torch.Tensor:
        summed = partial.contiguous().clone()
        dist.all_reduce(summed)
        return summed

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _owned_parameter(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone())


class ColumnParallelLinear(nn.Module):
    """The weight rows ``rows`` of a Linear; gathers the full output when ``gather_output``."""

    def __init__(self, full: nn.Linear, rows: torch.Tensor, *, gather_output: bool) -> None:
        super().__init__()
        self.weight = _owned_parameter(full.weight[rows])
        self.bias = None if full.bias is None else _owned_parameter(full.bias[rows])
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(_CopyIntoParallelRegion.apply(x), self.weight, self.bias)
        return _GatherFromParallelRegion.apply(local) if self.gather_output else local


class RowParallelLinear(nn.Module):
    """The weight columns ``columns`` of a Linear whose input is already split; sums the partial outputs."""

    def __init__(self, full: nn.Linear, columns: torch.Tensor) -> None:
        super().__init__()
        self.weight = _owned_parameter(full.weight[:, columns])
        self.bias = None if full.bias is None else _owned_parameter(full.bias)

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        summed = _ReduceFromParallelRegion.apply(F.linear(x_local, self.weight))
        return summed if self.bias is None else summed + self.bias  # the bias once, after the sum


def contiguous_block(size: int, *, tp: int, rank: int) -> torch.Tensor:
    """Indices of rank ``rank``'s contiguous 1/tp of ``range(size)``."""
    step = size // tp
    return torch.arange(rank * step, (rank + 1) * step)


def local_head_rows(d_model: int, n_heads: int, *, tp: int, rank: int) -> torch.Tensor:
    """Rows of a fused ``[3, n_heads, d_head]`` QKV weight that hold this rank's heads of q, k and v."""
    block = contiguous_block(d_model, tp=tp, rank=rank)  # heads are contiguous inside each of q, k, v
    return torch.cat([part * d_model + block for part in range(3)])


class LocalHeadAttention(nn.Module):
    """The example GPT's attention on n_heads / tp heads: its QKV yields local heads, out_proj sums them.

    ``qkv_proj`` must output this rank's ``[3, n_heads / tp, d_head]`` and ``out_proj`` must take the
    local heads and return the summed full width (row-parallel, or a DTensor Rowwise linear).
    """

    def __init__(self, full: MultiHeadSelfAttention, *, tp: int, qkv_proj: nn.Module, out_proj: nn.Module) -> None:
        super().__init__()
        self.n_heads = full.n_heads // tp
        self.d_head = full.d_head
        self.qkv_proj, self.out_proj = qkv_proj, out_proj
        self.dropout = copy.deepcopy(full.dropout)
        self.register_buffer("causal_mask", full.causal_mask, persistent=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        bsz, seq_len, _ = x.size()
        qkv = self.qkv_proj(x).view(bsz, seq_len, 3, self.n_heads, self.d_head)  # (B, T, 3, H/tp, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H/tp, T, Dh)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
        scores = scores.masked_fill(~self.causal_mask[:, :, :seq_len, :seq_len], float("-inf"))
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, -1e4)
        out = self.dropout(F.softmax(scores, dim=-1)) @ v  # (B, H/tp, T, Dh)
        out = out.transpose(1, 2).reshape(bsz, seq_len, self.n_heads * self.d_head)  # (B, T, D/tp)
        return self.dropout(self.out_proj(out))


def handwritten_gpt(reference: GPTModel, *, mode: str) -> GPTModel:
    """This rank's hand-written tensor-parallel copy of ``reference`` (which is left unchanged).

    Args:
        reference: the single-device example GPT, with the same weights on every rank.
        mode: ``"gather"`` (column-parallel QKV and fc1, all-gather after each) or ``"megatron"``
            (column QKV/fc1 without gather, row-parallel out_proj/fc2, attention on local heads).

    Returns:
        A GPTModel whose blocks hold this rank's shards; run it on every rank of the default group.

    Raises:
        ValueError: an unknown mode, or a width the world size does not divide.
    """
    if mode not in ("gather", "megatron"):
        raise ValueError(f"mode={mode!r}; use 'gather' or 'megatron'")
    tp, rank = dist.get_world_size(), dist.get_rank()
    config = reference.config
    if config.n_heads % tp or config.d_ff % tp:
        raise ValueError(f"world size {tp} must divide n_heads={config.n_heads} and d_ff={config.d_ff}")
    model = copy.deepcopy(reference)
    shard_block = _shard_block_gather if mode == "gather" else _shard_block_megatron
    for block in model.blocks:
        shard_block(block, config, tp=tp, rank=rank)
    return model


def _shard_block_gather(block: nn.Module, config: GPTConfig, *, tp: int, rank: int) -> None:
    attn, ffn = block.attn, block.ffn
    attn.qkv_proj = ColumnParallelLinear(attn.qkv_proj, contiguous_block(3 * config.d_model, tp=tp, rank=rank),
                                         gather_output=True)
    ffn.fc1 = ColumnParallelLinear(ffn.fc1, contiguous_block(config.d_ff, tp=tp, rank=rank), gather_output=True)


def _shard_block_megatron(block: nn.Module, config: GPTConfig, *, tp: int, rank: int) -> None:
    qkv_rows = local_head_rows(config.d_model, config.n_heads, tp=tp, rank=rank)
    head_columns = contiguous_block(config.d_model, tp=tp, rank=rank)
    block.attn = LocalHeadAttention(
        block.attn, tp=tp, qkv_proj=ColumnParallelLinear(block.attn.qkv_proj, qkv_rows, gather_output=False),
        out_proj=RowParallelLinear(block.attn.out_proj, head_columns))
    ffn_rows = contiguous_block(config.d_ff, tp=tp, rank=rank)
    block.ffn.fc2 = RowParallelLinear(block.ffn.fc2, ffn_rows)
    block.ffn.fc1 = ColumnParallelLinear(block.ffn.fc1, ffn_rows, gather_output=False)


def local_part_of_grad(name: str, full_grad: torch.Tensor, *, config: GPTConfig, mode: str, tp: int,
                       rank: int) -> torch.Tensor:
    """The part of a single-device gradient that parameter ``name`` of the hand-written model holds."""
    leaf = name.rsplit(".", 2)[-2:]  # e.g. ["qkv_proj", "weight"]
    ffn_rows = contiguous_block(config.d_ff, tp=tp, rank=rank)
    if leaf[0] == "qkv_proj":
        rows = (local_head_rows(config.d_model, config.n_heads, tp=tp, rank=rank) if mode == "megatron"
                else contiguous_block(3 * config.d_model, tp=tp, rank=rank))
        return full_grad[rows]
    if leaf[0] == "fc1":
        return full_grad[ffn_rows]
    if mode == "megatron" and leaf == ["out_proj", "weight"]:
        return full_grad[:, contiguous_block(config.d_model, tp=tp, rank=rank)]
    if mode == "megatron" and leaf == ["fc2", "weight"]:
        return full_grad[:, ffn_rows]
    return full_grad
