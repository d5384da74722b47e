"""The other baseline: PyTorch's own DTensor ``parallelize_module`` with the plan equivalent to each tpfx mode.

gather mode::

    {"blocks.0.attn.qkv_proj": ColwiseParallel(output_layouts=Replicate()), "blocks.0.ffn.fc1": ..., ...}

The keys are the sites tpfx found, so both run exactly the same sharding. Megatron mode pairs
``ColwiseParallel()`` on qkv_proj/fc1 with ``RowwiseParallel()`` on out_proj/fc2; DTensor cannot
change the attention's head count, so (as a DTensor user must) the attention is swapped for one
running n_heads / tp heads, and the fused QKV rows are reordered so that DTensor's contiguous row
split hands every rank whole heads of q, k and v.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from benchmarks.handwritten import LocalHeadAttention, local_head_rows
from examples.gpt import GPTModel


def dtensor_gpt(reference: GPTModel, *, mode: str, site_paths: tuple[str, ...]) -> nn.Module:
    """This rank's DTensor-parallel copy of ``reference`` (left unchanged), on the default group.

    Args:
        reference: the single-device example GPT, same weights on every rank.
        mode: ``"gather"`` or ``"megatron"``.
        site_paths: the module paths tpfx column-shards (the gather-mode plan's keys).

    Returns:
        The parallelized copy.

    Raises:
        ValueError: an unknown mode.
    """
    tp = dist.get_world_size()
    mesh = init_device_mesh("cpu", (tp,))
    model = copy.deepcopy(reference)
    if mode == "gather":
        plan = {path: ColwiseParallel(output_layouts=Replicate()) for path in site_paths}
    elif mode == "megatron":
        plan = {}
        for index, block in enumerate(model.blocks):
            block.attn = _attention_for_rowwise_split(block.attn, tp=tp)
            prefix = f"blocks.{index}"
            plan |= {f"{prefix}.attn.qkv_proj": ColwiseParallel(), f"{prefix}.attn.out_proj": RowwiseParallel(),
                     f"{prefix}.ffn.fc1": ColwiseParallel(), f"{prefix}.ffn.fc2": RowwiseParallel()}
    else:
        raise ValueError(f"mode={mode!r}; use 'gather' or 'megatron'")
    # every rank already holds the full weights: slice locally instead of scattering from rank 0
    return parallelize_module(model, mesh, plan, src_data_rank=None)


def _attention_for_rowwise_split(attention: nn.Module, *, tp: int) -> LocalHeadAttention:
    """A local-head attention whose full QKV rows are ordered rank by rank: [q0 k0 v0 | q1 k1 v1 | ...]."""
    d_model = attention.qkv_proj.in_features
    order = torch.cat([local_head_rows(d_model, attention.n_heads, tp=tp, rank=r) for r in range(tp)])
    qkv = copy.deepcopy(attention.qkv_proj)
    with torch.no_grad():
        qkv.weight.copy_(attention.qkv_proj.weight[order])
        if qkv.bias is not None:
            qkv.bias.copy_(attention.qkv_proj.bias[order])
    return LocalHeadAttention(attention, tp=tp, qkv_proj=qkv, out_proj=attention.out_proj)
