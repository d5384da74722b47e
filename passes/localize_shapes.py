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
    """One shape argument to divide by tp: ``path`` leads into ``node_name``'s args (position or kwarg).

    ``kept`` is the part of the value every rank keeps whole: a slice bound of a fused ``[q | k | v]``
    whose keys are kept whole measures ``q + k``, and becomes ``q / tp + k``: ``(value - kept) / tp + kept``.
    A step ``"start"``/``"stop"``/``"step"`` of ``path`` reads that field of a slice.
    """

    node_name: str
    path: tuple[int | str, ...]
    value: int | str  # the literal, or the name of the node that computes it
    kept: int = 0

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(f"shape edit of {self.node_name} needs a path into its arguments")


def localize_shapes(gm: fx.GraphModule, edits: tuple[ShapeEdit, ...], *, tp: int) -> tuple[str, ...]:
    """Divide each edited shape argument by ``tp`` (keeping its ``kept`` part whole): a literal in place, a
    traced size by new ``//`` (and ``-``, ``+``) nodes.

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
                new = _traced_local(gm.graph, current, edit.kept, tp)
        elif isinstance(current, int) and (current - edit.kept) % tp == 0:
            new = (current - edit.kept) // tp + edit.kept
        else:
            raise ShardingError(f"shape argument {current!r} of node '{consumer.name}' ({consumer.format_node()}) "
                                f"is not divisible by tp={tp}; use a tp that divides the head count")
        _write_at(consumer, edit.path, new)
    return tuple(dict.fromkeys(edit.node_name for edit in edits))


def _traced_local(graph: fx.Graph, current: fx.Node, kept: int, tp: int) -> fx.Node:
    """Nodes computing ``(current - kept) // tp + kept`` (just ``current // tp`` when nothing is kept)."""
    if not kept:
        return graph.call_function(operator.floordiv, (current, tp))
    split = graph.call_function(operator.floordiv, (graph.call_function(operator.sub, (current, kept)), tp))
    return graph.call_function(operator.add, (split, kept))


_SLICE_FIELDS = ("start", "stop", "step")


def _read_at(node: fx.Node, path: tuple[int | str, ...]) -> object:
    head, *rest = path
    current = node.kwargs[head] if isinstance(head, str) else node.args[head]
    for step in rest:
        current = getattr(current, step) if step in _SLICE_FIELDS else current[step]
    return current


def _write_at(node: fx.Node, path: tuple[int | str, ...], new: object) -> None:
    head, *rest = path

    def replaced(container: object, steps: list[int | str]) -> object:
        if not steps:
            return new
        if steps[0] in _SLICE_FIELDS:  # a slice's bound: a new slice with that field replaced
            fields = {name: getattr(container, name) for name in _SLICE_FIELDS}
            return slice(*(fields | {steps[0]: replaced(fields[steps[0]], steps[1:])}).values())
        items = list(container)
        items[steps[0]] = replaced(items[steps[0]], steps[1:])
        return type(container)(items)

    if isinstance(head, str):
        node.update_kwarg(head, replaced(node.kwargs[head], rest))
    else:
        node.update_arg(head, replaced(node.args[head], rest))
