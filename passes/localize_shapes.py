"""Rewrite: the shape arguments between a Megatron pair become this rank's (divided by tp).

before (tp=2, 4 heads)::

    qkv = qkv.view(bsz, seq_len, 3, 4, 32)
    out = out.transpose(1, 2).contiguous().view(bsz, seq_len, d_model)

after::

    qkv = qkv.view(bsz, seq_len, 3, 2, 32)                  # a literal: divided in place
    floordiv = d_model // 2                                  # a traced size: a new node
    out = out.transpose(1, 2).contiguous().view(bsz, seq_len, floordiv)

Which arguments to divide is the pairing's finding (:class:`tpfx.passes.factors.ShapeEdit` records, from the
feature flow of :mod:`tpfx.passes.feature_flow`); this pass only applies them.

A size read off a tensor whose dim is split is the rank's local size at run time. Where the code uses it
as a shape argument between the pair, that is what it needs; any other use needs the single-device
size, and :func:`restore_full_sizes` gives it (:class:`FullSize` records, from the pairing):

before (tp=2, d_ff=32)::

    getattr_1 = fc1.shape;  getitem = getattr_1[-1]          # 16 on each rank
    mul = gelu * getitem

after::

    getattr_1 = fc1.shape;  getitem = getattr_1[-1]
    mul_1 = getitem * 2                                      # 32, as on one device
    mul = gelu * mul_1
"""

from __future__ import annotations

import operator

import torch.fx as fx

from tpfx.errors import ShardingError
from tpfx.passes.factors import FullSize, ShapeEdit


def restore_full_sizes(gm: fx.GraphModule, fixes: tuple[FullSize, ...], *, tp: int) -> tuple[str, ...]:
    """Give each use in ``fixes`` the single-device size: the read times ``tp``, its arithmetic recomputed.

    Apply before :func:`localize_shapes` (a shape argument that another pair divides is then divided
    from the full size). Only the graph changes: the caller recompiles.

    Returns:
        The names of the nodes inserted.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    order = {name: position for position, name in enumerate(nodes)}
    inserted: list[str] = []
    for fixes_together in _sharing_arithmetic(fixes):
        full = _FullValues(gm.graph, fixes_together, tp)
        uses = {use for fix in fixes_together for use in fix.uses}
        for producer, user in sorted(uses, key=lambda use: order[use[1]]):
            consumer = nodes[user]
            with gm.graph.inserting_before(consumer):  # the first user: every later one comes after it
                replacement = full.of(nodes[producer])
            consumer.args = fx.node.map_arg(consumer.args, lambda n: replacement if n.name == producer else n)
            consumer.kwargs = fx.node.map_arg(consumer.kwargs, lambda n: replacement if n.name == producer else n)
        inserted += full.inserted
    return tuple(inserted)


def _sharing_arithmetic(fixes: tuple[FullSize, ...]) -> list[tuple[FullSize, ...]]:
    """The fixes in groups whose arithmetic meets (``q.size(1) // k.size(1)`` reads two split sizes): one
    group's chain is recomputed once, from every read of it at full size."""
    groups: list[tuple[set[str], list[FullSize]]] = []
    for fix in fixes:
        names = {fix.read, *fix.chain}
        meeting = [group for group in groups if group[0] & names]
        for group in meeting:
            names |= group[0]
            groups.remove(group)
        groups.append((names, [f for group in meeting for f in group[1]] + [fix]))
    return [tuple(group) for _, group in groups]


class _FullValues:
    """The single-device values of some reads and of their chain of size arithmetic, made once each."""

    def __init__(self, graph: fx.Graph, fixes: tuple[FullSize, ...], tp: int) -> None:
        self.graph, self.tp = graph, tp
        self.reads = {fix.read: fix for fix in fixes}
        self.chain = {name for fix in fixes for name in fix.chain}
        self.values: dict[str, object] = {}
        self.inserted: list[str] = []

    def of(self, node: fx.Node) -> object:
        """The full value of ``node`` (a read or a node of its chain): a new node, or a tuple of them."""
        if node.name not in self.values:
            self.values[node.name] = self._make(node)
        return self.values[node.name]

    def _make(self, node: fx.Node) -> object:
        graph = self.graph
        source = node.args[0] if node.target is operator.getitem and isinstance(node.args[1], int) else None
        fix = self.reads.get(node.name) or (self.reads.get(source.name) if isinstance(source, fx.Node) else None)
        if fix is not None and (node.name == fix.read and not fix.rank or node.name != fix.read):
            return self._new(operator.mul, (node, self.tp))  # a split size (a chain holds split items only)
        if fix is not None:  # a whole shape: its split items times tp
            items = [self._new(operator.getitem, (node, i)) for i in range(fix.rank)]
            return tuple(self._new(operator.mul, (item, self.tp)) if i in fix.elements else item
                         for i, item in enumerate(items))
        copy = graph.node_copy(node, lambda arg: self.of(arg) if arg.name in self.reads or arg.name in self.chain
                               else arg)
        self.inserted.append(copy.name)
        return copy

    def _new(self, target: object, args: tuple) -> fx.Node:
        created = self.graph.call_function(target, args)
        self.inserted.append(created.name)
        return created


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
