"""Rewrite: the shape arguments between a Megatron pair become this rank's (divided by tp).

before (tp=2, 4 heads)::

    qkv = qkv.view(bsz, seq_len, 3, 4, 32)
    out = out.transpose(1, 2).contiguous().view(bsz, seq_len, d_model)

after::

    qkv = qkv.view(bsz, seq_len, 3, 2, 32)                  # a literal: divided in place
    floordiv = d_model // 2                                  # a traced size: a new node
    out = out.transpose(1, 2).contiguous().view(bsz, seq_len, floordiv)

Which arguments to divide is the pairing's finding (:class:`ShapeEdit` records, from the feature flow
of :mod:`tpfx.passes.feature_flow`); this pass only applies them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from tpfx.errors import ShardingError


@dataclass(frozen=True)
class ShapeEdit:
    """One shape argument to divide by tp: ``path`` leads into ``node_name``'s args (position or kwarg)."""

    node_name: str
    path: tuple[int | str, ...]
    value: int | str  # the literal, or the name of the node that computes it

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(f"shape edit of {self.node_name} needs a path into its arguments")


def localize_shapes(gm: fx.GraphModule, edits: tuple[ShapeEdit, ...], *, tp: int) -> tuple[str, ...]:
    """Divide each edited shape argument by ``tp``: a literal in place, a traced size by a new ``//`` node.

    Args:
        gm: the graph to change in place (only the graph: the caller recompiles).
        edits: the arguments to divide, as found by the pairing.
        tp: the tensor-parallel degree.

    Returns:
        The names of the nodes changed.

    Raises:
        ShardingError: a literal is not divisible by tp.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    for edit in edits:
        consumer = nodes[edit.node_name]
        current = _read_at(consumer, edit.path)
        if isinstance(current, fx.Node):
            with gm.graph.inserting_before(consumer):
                new = gm.graph.call_function(operator.floordiv, (current, tp))
        elif isinstance(current, int) and current % tp == 0:
            new = current // tp
        else:
            raise ShardingError(f"shape argument {current!r} of node '{consumer.name}' ({consumer.format_node()}) "
                                f"is not divisible by tp={tp}; use a tp that divides the head count")
        _write_at(consumer, edit.path, new)
    return tuple(dict.fromkeys(edit.node_name for edit in edits))


def _read_at(node: fx.Node, path: tuple[int | str, ...]) -> object:
    head, *rest = path
    current = node.kwargs[head] if isinstance(head, str) else node.args[head]
    for step in rest:
        current = current[step]
    return current


def _write_at(node: fx.Node, path: tuple[int | str, ...], new: object) -> None:
    head, *rest = path

    def replaced(container: object, steps: list[int]) -> object:
        if not steps:
            return new
        items = list(container)
        items[steps[0]] = replaced(items[steps[0]], steps[1:])
        return type(container)(items)

    if isinstance(head, str):
        node.update_kwarg(head, replaced(node.kwargs[head], rest))
    else:
        node.update_arg(head, replaced(node.args[head], rest))
