"""Rewrite: a graph traced from a meta-device model computes on the real device.

torch.export records the device of the tensors a model creates or checks as constants
(``arange``, ``full``, ``to``, ``_assert_tensor_metadata``). A model built with its parameters on
meta (:func:`tpfx.parameters_on_meta`) is traced on meta, so those constants say ``meta``; once
:func:`tpfx.load_state_dict` has put the weights on the real device, they must say that device.

before (exported from a meta-built GPT-2, inputs on the CPU)::

    arange = torch.ops.aten.arange.default(sym_size_int, device=device(type='meta'), pin_memory=False)

after::

    arange = torch.ops.aten.arange.default(sym_size_int, device=device(type='cpu'), pin_memory=False)

torch.fx graphs mostly read devices from tensors at run time (``x.device`` is a node). A device read
off a weight while tracing (``next(self.parameters()).device``, Hugging Face's ``self.device``) is a
constant, though, and it says ``meta`` in a call form traced from the program's weightless copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx



def _is_meta(value: object) -> bool:
    return isinstance(value, torch.device) and value.type == "meta"


@dataclass(frozen=True)
class MetaDeviceConstant:
    """A ``device='meta'`` constant in a node's arguments: the node and where (an index or a keyword)."""

    node_name: str
    argument: int | str


def find_meta_device_constants(gm: fx.GraphModule) -> tuple[MetaDeviceConstant, ...]:
    """Every meta device constant among the nodes' positional and keyword arguments, in graph order."""
    found = []
    for node in gm.graph.nodes:
        found += [MetaDeviceConstant(node.name, index) for index, value in enumerate(node.args) if _is_meta(value)]
        found += [MetaDeviceConstant(node.name, key) for key, value in node.kwargs.items() if _is_meta(value)]
    return tuple(found)


def retarget_meta_device(gm: fx.GraphModule, *, device: torch.device | str) -> tuple[MetaDeviceConstant, ...]:
    """Replace the meta device constants of ``gm``'s graph, and of the graphs nested in it, by ``device``.

    Nested graphs are the submodules of torch.export's higher-order ops (``wrap_with_autocast``,
    ``wrap_with_set_grad_enabled``); they are compiled modules of their own, so they are recompiled
    here. ``gm``'s own graph only changes: the caller recompiles it.

    Args:
        gm: a captured graph, changed in place.
        device: where the program will run: the device of the example inputs.

    Returns:
        The constants that were replaced, ``gm``'s first (empty for a graph traced from real weights).
    """
    target = torch.device(device)
    replaced = list(_retarget_graph(gm, target))
    for name, nested in gm.named_modules():
        if nested is not gm and isinstance(nested, fx.GraphModule):
            found = _retarget_graph(nested, target)
            if found:
                nested.recompile()
                replaced += [MetaDeviceConstant(f"{name}.{c.node_name}", c.argument) for c in found]
    return tuple(replaced)


def _retarget_graph(gm: fx.GraphModule, target: torch.device) -> tuple[MetaDeviceConstant, ...]:
    constants = find_meta_device_constants(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    for constant in constants:
        node = nodes[constant.node_name]
        if isinstance(constant.argument, int):
            node.update_arg(constant.argument, target)
        else:
            node.update_kwarg(constant.argument, target)
    return constants


def device_of_inputs(example_inputs: object) -> torch.device:
    """The device of the first tensor in example inputs (a tensor, tuple, list or dict); the CPU if none."""
    if isinstance(example_inputs, dict):
        return device_of_call(example_inputs.values())
    return device_of_call(example_inputs if isinstance(example_inputs, (tuple, list)) else [example_inputs])


def device_of_call(values: Iterable[object]) -> torch.device:
    """The device of the first tensor among a call's arguments; the CPU if there is none."""
    return next((value.device for value in values if isinstance(value, torch.Tensor)), torch.device("cpu"))
