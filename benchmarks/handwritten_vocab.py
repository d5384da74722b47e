"""The hand-written baseline of megatron mode with the vocabulary split, with or without sequence parallelism.

What a person writes into the example GPT (:mod:`examples.gpt`) by hand, Megatron-style, to compare
tpfx's ``parallelize(model, mode="megatron", vocab_parallel=True, logits="sharded"[,
sequence_parallel=True])`` with:

* **vocab-parallel embedding**: rows ``rank * V/tp ...`` of the token table; ids outside them look up
  zeros; one all-reduce sums the parts (under sequence parallelism a reduce-scatter along the
  sequence, which also splits the stream);
* **blocks**: the pairs of :mod:`benchmarks.handwritten` (column QKV / fc1, attention on this rank's
  heads, row out_proj / fc2). Without sequence parallelism a copy (identity forward, all-reduce
  backward) feeds each pair and an all-reduce sums it. With it, the residual stream holds this rank's
  T/tp tokens: an all-gather along the sequence feeds each pair (reduce-scatter of the gradient), a
  reduce-scatter ends it (all-gather of the gradient), and the norms, the row biases and the adds run
  on the slice. A parameter read on the slice (norm weights, row biases) gets only its tokens' share
  of the gradient, so a copy sums it over the ranks in backward (Megatron-LM sums these after backward
  in one call; tpfx and this baseline sum each where it is read);
* **LM head**: this rank's V/tp rows of the head, fed like a column linear (the sequence gathered
  under sequence parallelism); it returns this rank's logits (B, T, V/tp), never the full ones;
* **parallel cross-entropy** (:class:`_VocabParallelCrossEntropy`): the row maxima all-reduced (max),
  then the sums of exponentials and the target logits (taken on the rank that owns the target) in
  one all-reduce; backward is local: softmax minus one-hot of this rank's columns.

Dropout is not split by rank here (the benchmark runs with dropout 0, where every variant computes the
single-device numbers); the default process group is the tensor-parallel group.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.handwritten import (LocalHeadAttention, _CopyIntoParallelRegion, _owned_parameter,
                                    _ReduceFromParallelRegion, contiguous_block, local_head_rows)
from examples.gpt import GPTConfig, GPTModel, TransformerBlock

SEQUENCE_DIM = 1  # (batch, seq, width) activations


def _gather_along(local: torch.Tensor, dim: int) -> torch.Tensor:
    pieces = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, local.contiguous())
    return torch.cat(pieces, dim=dim)


def _reduce_scatter_along(full: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's block along ``dim`` of the sum over the ranks of ``full``."""
    front = full.movedim(dim, 0).contiguous()  # the collective splits dim 0
    out = front.new_empty((front.shape[0] // dist.get_world_size(), *front.shape[1:]))
    dist.reduce_scatter_tensor(out, front)
    return out.movedim(0, dim)


def _own_block(full: torch.Tensor, dim: int) -> torch.Tensor:
    length = full.shape[dim] // dist.get_world_size()
    return full.narrow(dim, dist.get_rank() * length, length).contiguous()


def _sequence_collective(forward: Callable[[torch.Tensor, int], torch.Tensor],
                         backward: Callable[[torch.Tensor, int], torch.Tensor], doc: str) -> type:
    """An autograd function ``apply(tensor, dim)``: ``forward(tensor, dim)``, and ``backward(grad, dim)`` for it."""

    class SequenceCollective(torch.autograd.Function):
        @staticmethod
        def forward(ctx, tensor: torch.Tensor, dim: int) -> torch.Tensor:
            ctx.dim = dim
            return forward(tensor, dim)

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return backward(grad, ctx.dim), None

    SequenceCollective.__doc__ = doc
    return SequenceCollective


_GatherSequence = _sequence_collective(
    _gather_along, _reduce_scatter_along,
    "Forward: all-gather the slices along ``dim``. Backward: reduce-scatter (each rank's tokens' gradient, summed).")
_ReduceScatterSequence = _sequence_collective(
    _reduce_scatter_along, _gather_along,
    "Forward: sum the ranks' partial outputs, keep this rank's slice along ``dim``. Backward: all-gather.")
_SplitSequence = _sequence_collective(
    _own_block, _gather_along,
    "Forward: this rank's slice along ``dim`` of a tensor every rank holds whole. Backward: all-gather.")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, V/tp) logits split by vocabulary over the ranks, targets (N,) in [0, V).

    No rank holds the (N, V) logits: the row maximum is all-reduced (max), then the sum of exponentials
    and the target's shifted logit (zero on the ranks that do not own it) are summed in one all-reduce.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        width = logits.shape[-1]
        start = dist.get_rank() * width
        row_max = logits.detach().amax(dim=-1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        shifted = logits - row_max.unsqueeze(-1)
        owned = (target >= start) & (target < start + width)
        columns = (target - start).clamp(0, width - 1)
        exponentials = shifted.exp()
        target_logit = shifted.gather(-1, columns.unsqueeze(-1)).squeeze(-1) * owned
        sums = torch.stack([exponentials.sum(dim=-1), target_logit], dim=-1)
        dist.all_reduce(sums)
        sum_exp, target_logit = sums.unbind(-1)
        ctx.save_for_backward(exponentials.div_(sum_exp.unsqueeze(-1)), owned, columns)
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        softmax, owned, columns = ctx.saved_tensors
        grad_logits = softmax.clone()
        rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
        grad_logits[rows, columns] -= owned.to(grad_logits.dtype)
        return grad_logits * (grad / grad_logits.shape[0]), None


class _LocalLinear(nn.Module):
    """Rows ``rows`` of a Linear's weight (and bias): this rank's output features, no collective."""

    def __init__(self, full: nn.Linear, rows: torch.Tensor) -> None:
        super().__init__()
        self.weight = _owned_parameter(full.weight[rows])
        self.bias = None if full.bias is None else _owned_parameter(full.bias[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _SummedRowLinear(nn.Module):
    """Columns ``columns`` of a Linear whose input is split; the partial outputs are summed (all-reduce, or
    reduce-scatter along the sequence), then the bias is added once."""

    def __init__(self, full: nn.Linear, columns: torch.Tensor, *, sequence_parallel: bool) -> None:
        super().__init__()
        self.weight = _owned_parameter(full.weight[:, columns])
        self.bias = None if full.bias is None else _owned_parameter(full.bias)
        self.sequence_parallel = sequence_parallel

    def forward(self, x_local: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x_local, self.weight)
        if not self.sequence_parallel:
            summed = _ReduceFromParallelRegion.apply(partial)
            return summed if self.bias is None else summed + self.bias
        summed = _ReduceScatterSequence.apply(partial, SEQUENCE_DIM)
        # the bias is read on this rank's tokens: its gradient is summed over the ranks
        return summed if self.bias is None else summed + _CopyIntoParallelRegion.apply(self.bias)


class _SliceLayerNorm(nn.Module):
    """A LayerNorm run on this rank's tokens; its weight and bias gradients are summed over the ranks."""

    def __init__(self, full: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape, self.eps = full.normalized_shape, full.eps
        self.weight, self.bias = _owned_parameter(full.weight), _owned_parameter(full.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, _CopyIntoParallelRegion.apply(self.weight),
                            _CopyIntoParallelRegion.apply(self.bias), self.eps)


class _Block(nn.Module):
    """One pre-norm block on this rank's heads and FFN columns (and, under sequence parallelism, tokens)."""

    def __init__(self, full: TransformerBlock, config: GPTConfig, *, tp: int, rank: int,
                 sequence_parallel: bool) -> None:
        super().__init__()
        self.sequence_parallel = sequence_parallel
        norm = _SliceLayerNorm if sequence_parallel else copy.deepcopy
        self.ln1, self.ln2 = norm(full.ln1), norm(full.ln2)
        head_columns = contiguous_block(config.d_model, tp=tp, rank=rank)
        self.attn = LocalHeadAttention(
            full.attn, tp=tp, qkv_proj=_LocalLinear(full.attn.qkv_proj, local_head_rows(
                config.d_model, config.n_heads, tp=tp, rank=rank)),
            out_proj=_SummedRowLinear(full.attn.out_proj, head_columns, sequence_parallel=sequence_parallel))
        ffn_rows = contiguous_block(config.d_ff, tp=tp, rank=rank)
        self.fc1 = _LocalLinear(full.ffn.fc1, ffn_rows)
        self.fc2 = _SummedRowLinear(full.ffn.fc2, ffn_rows, sequence_parallel=sequence_parallel)
        self.ffn_dropout = copy.deepcopy(full.ffn.dropout)

    def pair_input(self, x: torch.Tensor) -> torch.Tensor:
        """What a pair's column linears read: the whole sequence (gathered) or the stream (copied)."""
        if self.sequence_parallel:
            return _GatherSequence.apply(x, SEQUENCE_DIM)
        return _CopyIntoParallelRegion.apply(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.pair_input(self.ln1(x)))
        return x + self.ffn_dropout(self.fc2(F.gelu(self.fc1(self.pair_input(self.ln2(x))))))


class HandwrittenVocabGPT(nn.Module):
    """This rank's hand-written megatron + vocab-parallel copy of an example GPT (see the module docstring).

    ``forward(input_ids, labels=None)`` returns ``(this rank's logits (B, T, V/tp), loss or None)``.
    """

    def __init__(self, reference: GPTModel, *, sequence_parallel: bool) -> None:
        super().__init__()
        tp, rank = dist.get_world_size(), dist.get_rank()
        config = self.config = reference.config
        if config.n_heads % tp or config.d_ff % tp or config.vocab_size % tp:
            raise ValueError(f"world size {tp} must divide n_heads={config.n_heads}, d_ff={config.d_ff} and "
                             f"vocab_size={config.vocab_size}")
        self.sequence_parallel = sequence_parallel
        self.vocab_rows = contiguous_block(config.vocab_size, tp=tp, rank=rank)
        self.token_rows = _owned_parameter(reference.token_embedding.weight[self.vocab_rows])
        self.position_embedding = copy.deepcopy(reference.position_embedding)
        self.dropout = copy.deepcopy(reference.dropout)
        self.blocks = nn.ModuleList(_Block(block, config, tp=tp, rank=rank, sequence_parallel=sequence_parallel)
                                    for block in reference.blocks)
        self.ln_f = _SliceLayerNorm(reference.ln_f) if sequence_parallel else copy.deepcopy(reference.ln_f)
        self.head_rows = _owned_parameter(reference.lm_head.weight[self.vocab_rows])

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        start, count = int(self.vocab_rows[0]), self.token_rows.shape[0]
        outside = (input_ids < start) | (input_ids >= start + count)
        part = F.embedding((input_ids - start).masked_fill(outside, 0), self.token_rows)
        part = part.masked_fill(outside.unsqueeze(-1), 0.0)  # ids another rank owns: zeros here
        positions = self.position_embedding(torch.arange(input_ids.shape[1], device=input_ids.device))  # (T, d)
        if not self.sequence_parallel:
            return _ReduceFromParallelRegion.apply(part) + positions
        # the sum of the parts ends split along the sequence; the positions (whole on every rank) are split too
        return _ReduceScatterSequence.apply(part, SEQUENCE_DIM) + _SplitSequence.apply(positions, 0)

    def forward(self, input_ids: torch.Tensor,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.sequence_parallel and input_ids.shape[1] % dist.get_world_size():
            raise ValueError(f"sequence length {input_ids.shape[1]} is not divisible by tp={dist.get_world_size()}")
        x = self.dropout(self._embed(input_ids))
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        h = _GatherSequence.apply(h, SEQUENCE_DIM) if self.sequence_parallel else _CopyIntoParallelRegion.apply(h)
        logits = F.linear(h, self.head_rows)  # (B, T, V/tp)
        if labels is None:
            return logits, None
        shifted = logits[:, :-1, :].reshape(-1, logits.shape[-1])
        return logits, _VocabParallelCrossEntropy.apply(shifted, labels[:, 1:].reshape(-1))

    def local_part_of_grad(self, name: str, full_grad: torch.Tensor) -> torch.Tensor:
        """The part of the single-device gradient of ``name`` (a parameter of this model) that it holds."""
        config, tp, rank = self.config, dist.get_world_size(), dist.get_rank()
        if name in ("token_rows", "head_rows"):
            return full_grad[self.vocab_rows]
        leaf = name.rsplit(".", 2)[-2:]
        ffn_rows = contiguous_block(config.d_ff, tp=tp, rank=rank)
        parts = {("qkv_proj", "weight"): lambda g: g[local_head_rows(config.d_model, config.n_heads, tp=tp,
                                                                     rank=rank)],
                 ("qkv_proj", "bias"): lambda g: g[local_head_rows(config.d_model, config.n_heads, tp=tp,
                                                                   rank=rank)],
                 ("out_proj", "weight"): lambda g: g[:, contiguous_block(config.d_model, tp=tp, rank=rank)],
                 ("fc1", "weight"): lambda g: g[ffn_rows], ("fc1", "bias"): lambda g: g[ffn_rows],
                 ("fc2", "weight"): lambda g: g[:, ffn_rows]}
        return parts.get(tuple(leaf), lambda g: g)(full_grad)

    @staticmethod
    def single_device_name(name: str) -> str:
        """The single-device GPT's parameter that ``name`` holds a part of."""
        renamed = {"token_rows": "token_embedding.weight", "head_rows": "lm_head.weight"}.get(name, name)
        return renamed.replace(".fc1.", ".ffn.fc1.").replace(".fc2.", ".ffn.fc2.")
