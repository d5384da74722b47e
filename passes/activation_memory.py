"""Analysis: the bytes one training step keeps for backward on a rank (its activations), from fake tensors.

before (a rewritten rank program and one call's inputs)::

    gm(input_ids=int64[2, 16], labels=int64[2, 16])

after::

    activation_bytes(gm, inputs, tp=2)  ->  1_183_744    # every tensor autograd saves, each storage once

The graph runs once on fake tensors (no memory, no communication: collectives take their output
shapes from the op registry, as in :mod:`tpfx.passes.comm_table`) with gradients on, and every tensor
autograd saves for backward is counted once per storage. Parameters are not activations: autograd
saves the real parameter tensors, which are left out. This is what the forward pass leaves alive at
its end, the usual peak of a training step's activations; ``benchmarks/activation_memory.py``
measures the real peak beside it.
"""

from __future__ import annotations

from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef

import torch.fx as fx

from tpfx.passes.comm_table import FakeRun, graph_inputs, graph_module_for_call


def activation_bytes(program: fx.GraphModule, inputs: dict[str, object], *, tp: int) -> int:
    """Bytes of the tensors one forward of ``program(**inputs)`` saves for backward on this rank.

    Args:
        program: a rank's program (or any GraphModule); it is not run for real.
        inputs: keyword arguments of the call; only their shapes and dtypes matter.
        tp: the tensor-parallel degree (the collectives' output shapes).

    Raises:
        CommTableError: shapes cannot be propagated through the graph.
    """
    storages: dict[object, int] = {}

    def pack(tensor: object) -> object:
        if isinstance(tensor, FakeTensor):  # real tensors saved here are parameters and buffers
            storage = tensor.untyped_storage()
            storages.setdefault(StorageWeakRef(storage).cdata, storage.nbytes())
        return tensor

    inputs = graph_inputs(program, inputs)
    FakeRun(graph_module_for_call(program, inputs), tp,
            context=lambda: saved_tensors_hooks(pack, lambda tensor: tensor)).seen(inputs)
    return sum(storages.values())
