"""Ops on this rank's part of a tensor that is split across the tensor-parallel group (Megatron mode).

Between a column- and a row-parallel linear each rank holds whole heads (or a block of d_ff). Two
things there must see the split: grouped-query keys and values that every rank keeps whole, and
randomness. A dropout mask drawn for the local part alone would be the same on every rank (they
share one random state), so the heads of different ranks would drop the same elements, and the
random stream would drift from the single-device model's. Here each rank draws the whole tensor's
mask, as one device would, and keeps its part: train-mode numbers equal the single-device model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tpfx.collectives import rank_and_size
from tpfx.layers import lookup_rows


def rank_part(x: torch.Tensor, dim: int, group: str, *, block: int | None = None) -> torch.Tensor:
    """This rank's contiguous 1/tp of ``x`` along ``dim`` (a view; backward puts zeros elsewhere).

    Megatron mode keeps grouped-query keys and values whole on every rank when tp does not divide
    their heads; once they are repeated to the query heads, this narrows them to the rank's own.
    With ``block`` (and ``dim`` counted from the end), see :func:`part_of_blocks`: a full-size
    tensor from outside a pair (an ALiBi bias holding every head) narrowed to this rank's heads.
    """
    rank, tp = rank_and_size(group)
    return take_part(x, dim, rank, tp, block=block)


def take_part(x: torch.Tensor, dim: int, rank: int, tp: int, *, block: int | None = None) -> torch.Tensor:
    """What :func:`rank_part` returns on rank ``rank`` of ``tp`` (no process group needed)."""
    if block is not None:
        return part_of_blocks(x, dim, block, rank, tp)
    length = x.shape[dim] // tp
    return x.narrow(dim, rank * length, length)


def part_of_blocks(x: torch.Tensor, dim: int, block: int, rank: int, tp: int) -> torch.Tensor:
    """Rank ``rank``'s 1/tp of every block of ``block`` elements along ``dim`` (< 0, counted from the end).

    ``dim`` holds (outer, heads, inner) in row-major order and ``block`` is heads x inner: the rank's
    heads are one contiguous run of each block. A dim that ``x`` broadcasts (size 1, or missing
    because ``x`` has fewer dims) is the same for every head: ``x`` is returned whole.
    """
    if dim >= 0:
        raise ValueError(f"part_of_blocks needs dim counted from the end (< 0), got {dim}")
    if x.dim() < -dim or x.shape[dim] == 1:
        return x
    length = block // tp
    blocks = x.unflatten(dim, (-1, block))  # (..., outer, block, <dims after>)
    return blocks.narrow(dim, rank * length, length).flatten(dim - 1, dim)


def call_with_parameters(module: torch.nn.Module, parameters: dict[str, torch.Tensor], args: tuple,
                         kwargs: dict) -> object:
    """``module(*args, **kwargs)`` with some of its parameters replaced by the given tensors.

    Megatron mode calls a replicated module that runs on this rank's heads (a qk-norm) with copies of
    its parameters whose backward sums the ranks' partial gradients (``copy_to_tp``).
    """
    return torch.func.functional_call(module, dict(parameters), tuple(args), dict(kwargs))


def _mask_part(like: torch.Tensor, p: float, dim: int, group: str) -> torch.Tensor:
    """This rank's part of the whole tensor's dropout mask, scaled by 1/(1-p) as dropout scales it."""
    rank, tp = rank_and_size(group)
    full_shape = list(like.shape)
    full_shape[dim] *= tp
    # dropout of ones is exactly the factor one device multiplies its input by (same shape, same draws)
    scale = F.dropout(torch.ones(full_shape, dtype=like.dtype, device=like.device), p, True)
    # a copy: a view would keep the whole mask alive until backward (tp times the rank's part)
    return scale.narrow(dim, rank * like.shape[dim], like.shape[dim]).clone(memory_format=torch.contiguous_format)


def dropout_rank_part(x: torch.Tensor, p: float, training: bool, dim: int, group: str) -> torch.Tensor:
    """``F.dropout(x, p, training)`` for this rank's part (along ``dim``) of a split tensor, with the whole mask."""
    if not training or p == 0:
        return x
    return x * _mask_part(x, p, dim, group)


def dropout_module_rank_part(x: torch.Tensor, module: torch.nn.Module, dim: int, group: str) -> torch.Tensor:
    """:func:`dropout_rank_part` with an ``nn.Dropout``'s probability and mode, read at call time."""
    return dropout_rank_part(x, module.p, module.training, dim, group)


def attention_rank_part(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                        scale: float | None = None, *, dim: int, group: str, enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` on this rank's heads (dim ``dim`` of the output) with attention dropout.

    The attention probabilities are dropped with this rank's part of the whole attention's mask; the
    math is the reference one (scores, mask, softmax, dropout, values), as PyTorch computes attention
    with dropout on the CPU. With ``enable_gqa`` each key/value head serves a group of consecutive query heads.
    """
    if dropout_p == 0:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.size(-3) != query.size(-3):  # query head h reads key/value head h // repeats
        repeats = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    root_scale = math.sqrt(scale if scale is not None else 1 / math.sqrt(query.size(-1)))
    scores = (query * root_scale) @ (key.transpose(-2, -1) * root_scale)
    if is_causal:
        causal = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probabilities = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with every key masked attends to none
    probabilities = probabilities * _mask_part(probabilities, dropout_p, dim, group)
    return probabilities @ value


def embedding_rank_part(ids: torch.Tensor, weight: torch.Tensor, group: str, padding_idx: int | None = None
                        ) -> torch.Tensor:
    """``F.embedding(ids, full_table)`` where this rank holds the ``weight`` rows of its 1/tp of the vocabulary.

    Returns this rank's part of the lookup (zeros for ids another rank holds); the graph sums the parts.
    """
    rank, _ = rank_and_size(group)
    return lookup_rows(ids, weight, rank * weight.shape[0], padding_idx)
