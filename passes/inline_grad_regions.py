"""Inline torch.export's ``wrap_with_set_grad_enabled`` regions into the graph that calls them.

torch.export records a ``with torch.no_grad():`` block (Hugging Face's rotary embeddings have one) as
the higher-order op ``wrap_with_set_grad_enabled(enabled, submodule, *operands)`` over a nested graph
module. torch.compile cannot trace that op once shapes become dynamic ("expects no freevars"), and the
analysis would see the region as one opaque call. Inlined, the region is the same ops between two
``torch._C._set_grad_enabled`` calls (the second restores the mode read on entry), which fx keeps
through dead-code elimination and dynamo traces as grad-mode changes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx


def _is_grad_region(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "wrap_with_set_grad_enabled"


def inline_grad_regions(gm: fx.GraphModule) -> int:
    """Replace every ``wrap_with_set_grad_enabled`` call in ``gm``'s graph by its region's ops.

    The nested graph module is removed once no node refers to it. ``gm`` is changed in place and
    recompiled when anything changed.

    Returns:
        How many regions were inlined.
    """
    graph, inlined = gm.graph, 0
    for node in [n for n in graph.nodes if _is_grad_region(n)]:
        enabled, holder, *operands = node.args
        region: fx.GraphModule = getattr(gm, str(holder.target))
        values: dict[fx.Node, object] = {}
        outputs: object = None
        with graph.inserting_before(node):
            entry_mode = graph.call_function(torch.is_grad_enabled)
            graph.call_function(torch._C._set_grad_enabled, (enabled,))
            placeholders = iter(operands)
            for inner in region.graph.nodes:
                if inner.op == "placeholder":
                    values[inner] = next(placeholders)
                elif inner.op == "output":
                    outputs = fx.map_arg(inner.args[0], lambda n: values[n])
                elif inner.op == "get_attr":  # a constant of the region: give it a name in gm
                    name = f"{holder.target}_{inner.target}".replace(".", "_")
                    setattr(gm, name, getattr(region, str(inner.target)))
                    values[inner] = graph.get_attr(name)
                else:
                    values[inner] = graph.node_copy(inner, lambda n: values[n])
            graph.call_function(torch._C._set_grad_enabled, (entry_mode,))
        for user in list(node.users):
            if isinstance(outputs, (tuple, list)) and user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
        if node.users:  # used whole
            node.replace_all_uses_with(outputs)
        graph.erase_node(node)
        if not holder.users:
            graph.erase_node(holder)
            delattr(gm, str(holder.target))
        inlined += 1
    if inlined:
        graph.lint()
        gm.recompile()
    return inlined
