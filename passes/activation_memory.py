"""Analysis: the activation bytes one training step of a rank's program keeps for backward.

before (a rewritten program and one call's inputs)::

    gm = tpfx.parallelize(model, tp=2, rank=0, mode="megatron", vocab_parallel=True)
    inputs = {"input_ids": int64[2, 16], "labels": int64[2, 16]}

after::

    activation_bytes(gm, inputs, tp=2)  # -> 1_234_567: the tensors autograd saves in the forward, this rank

The program runs on fake tensors (no memory, no computation; the collectives by their shape rules, as
for the communication table, :class:`tpfx.passes.comm_table.FakeRun`) with a saved-tensors hook that
adds up every tensor autograd keeps for backward, each storage once (views of one tensor share it).
Parameters (leaves that need a gradient) are not activations and are left out; the model's inputs
that an op saves (token ids of a lookup) count. It is the size of what backward needs, not a peak:
the allocator, temporaries and gradients come on top.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from tpfx.passes.comm_table import FakeRun, graph_module_for_call


def activation_bytes(program: fx.GraphModule, inputs: dict[str, object], *, tp: int) -> int:
    """Bytes of the tensors that one forward of ``program(**inputs)`` saves for backward, on this rank.

    Args:
        program: a rewritten rank program (or any GraphModule); it is not run.
        inputs: keyword arguments of the call; only their shapes and dtypes matter.
        tp: the tensor-parallel degree (the shapes of the collectives' outputs).

    Raises:
        CommTableError: shapes cannot be propagated through the graph.
    """
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not (tensor.is_leaf and tensor.requires_grad):  # a parameter is held anyway, not saved by the step
            storage = tensor.untyped_storage()
            storages[id(storage)] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        FakeRun(graph_module_for_call(program, inputs), tp).seen(inputs)
    return sum(storages.values())
