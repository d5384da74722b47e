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
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel,
                                               loss_parallel, parallelize_module)

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


def dtensor_vocab_gpt(reference: GPTModel, *, sequence_parallel: bool) -> nn.Module:
    """This rank's DTensor copy of ``reference`` in megatron mode with the vocabulary split: the plan of
    Megatron-style training with DTensor (``loss_parallel``), with ``SequenceParallel`` norms when asked.

    The token embedding is ``RowwiseParallel`` (vocabulary rows; its sum all-reduced, or reduce-scattered
    along the sequence), the LM head ``ColwiseParallel`` returning its logits sharded by vocabulary as a
    DTensor, which ``F.cross_entropy`` reads inside ``loss_parallel()``: the returned module carries that
    context as ``step_context``, for the forward and the backward of a step. Under sequence parallelism
    the stream between the pairs holds this rank's tokens: norms ``SequenceParallel``, each pair's input
    all-gathered (``PrepareModuleInput``), each row linear reduce-scattering, and the position rows (whole
    on every rank) split by a ``SequenceParallel`` embedding that returns its local slice.
    """
    tp = dist.get_world_size()
    mesh = init_device_mesh("cpu", (tp,))
    model = copy.deepcopy(reference)
    stream = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout between the pairs
    plan = {"token_embedding": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
            "lm_head": ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)}
    for index, block in enumerate(model.blocks):
        block.attn = _attention_for_rowwise_split(block.attn, tp=tp)
        prefix = f"blocks.{index}"
        plan |= {f"{prefix}.attn.qkv_proj": ColwiseParallel(), f"{prefix}.ffn.fc1": ColwiseParallel(),
                 f"{prefix}.attn.out_proj": RowwiseParallel(output_layouts=stream),
                 f"{prefix}.ffn.fc2": RowwiseParallel(output_layouts=stream)}
        if sequence_parallel:
            plan |= {f"{prefix}.ln1": SequenceParallel(), f"{prefix}.ln2": SequenceParallel(),
                     f"{prefix}.attn": PrepareModuleInput(input_layouts=(Shard(1), None),
                                                          desired_input_layouts=(Replicate(), None),
                                                          use_local_output=True),
                     f"{prefix}.ffn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                         use_local_output=True)}
    if sequence_parallel:
        plan["ln_f"] = SequenceParallel()
        # the positions (T,) every rank computes whole are split along dim 0 and looked up in the replicated
        # table, (T/tp, d) per rank (SequenceParallel would take the whole (T,) for this rank's part)
        distribute_module(model.position_embedding, mesh, input_fn=_split_positions,
                          output_fn=lambda module, output, mesh: output.to_local())
    parallel = parallelize_module(model, mesh, plan, src_data_rank=None)
    parallel.step_context = loss_parallel
    return parallel


def _split_positions(module: nn.Module, inputs: tuple[torch.Tensor, ...], mesh: object) -> tuple[DTensor, ...]:
    return (DTensor.from_local(inputs[0], mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(0)]),)
