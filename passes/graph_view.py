"""Analysis: a torch.fx graph as a networkx DiGraph whose nodes carry an *op kind*.

before (fx)::

    qkv = self.qkv_proj(x)            # call_module
    q = qkv.view(b, t, 3, h, d)       # call_method

after (networkx)::

    qkv_proj --operand 0--> view      # nodes: {"kind": "linear"} and {"kind": "shape"}

Only tensor dataflow becomes an edge: ``x.size()`` feeding ``view``'s shape arguments does not, so
a walk along edges follows the values, not the bookkeeping. The op kinds are data (tables below),
so a new spelling of an op is one line, never a new branch in a finder.
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tpfx.layers import ColumnParallelLinear

LINEAR, SHAPE, MATMUL, SOFTMAX, ATTENTION, ACTIVATION, ELEMENTWISE, DROPOUT, META, OTHER = (
    "linear", "shape", "matmul", "softmax", "attention", "activation", "elementwise", "dropout", "meta", "other")

# ops that move or index data without computing on it: q, k and v reach attention through these
_SHAPE_METHODS = {"view", "reshape", "permute", "transpose", "t", "contiguous", "split", "chunk", "unbind",
                  "squeeze", "unsqueeze", "flatten", "unflatten", "expand", "narrow", "select", "movedim",
                  "swapaxes", "view_as", "reshape_as"}
_SHAPE_FUNCTIONS = {operator.getitem, torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.split,
                    torch.chunk, torch.unbind, torch.squeeze, torch.unsqueeze, torch.narrow, torch.select,
                    torch.movedim, torch.swapaxes, torch.t}
_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__"}
_SOFTMAXES = {F.softmax, torch.softmax, "softmax"}
_ATTENTIONS = {F.scaled_dot_product_attention}
_ACTIVATION_FUNCTIONS = {F.gelu, F.relu, F.silu, F.mish, torch.relu, torch.tanh, "relu", "gelu", "tanh"}
_ACTIVATION_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Mish, nn.Tanh)
_ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul,
                "add", "mul", "sub", "div", "__add__", "__mul__"}
_DROPOUT_FUNCTIONS = {F.dropout}
_META_METHODS = {"size", "dim"}  # return Python values, not tensors


def op_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The kind of ``node``: one of the module-level constants (LINEAR, SHAPE, ...)."""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, (nn.Linear, ColumnParallelLinear)):
            return LINEAR
        if isinstance(module, _ACTIVATION_MODULES):
            return ACTIVATION
        if isinstance(module, nn.Dropout):
            return DROPOUT
        return OTHER
    if node.op not in ("call_function", "call_method"):
        return OTHER
    target = node.target
    for kind, table in ((SHAPE, _SHAPE_METHODS if node.op == "call_method" else _SHAPE_FUNCTIONS),
                        (MATMUL, _MATMULS), (SOFTMAX, _SOFTMAXES), (ATTENTION, _ATTENTIONS),
                        (ACTIVATION, _ACTIVATION_FUNCTIONS), (ELEMENTWISE, _ELEMENTWISE),
                        (DROPOUT, _DROPOUT_FUNCTIONS), (META, _META_METHODS)):
        if target in table:
            return kind
    if node.op == "call_function" and target is getattr:
        return META
    return OTHER


def tensor_operands(node: fx.Node) -> list[tuple[int | str, fx.Node]]:
    """The (position, producer) pairs of ``node``'s inputs, nested lists flattened under their position.

    Keyword inputs use their name as position: ``cat([a, b])`` gives ``[(0, a), (0, b)]``.
    """
    pairs: list[tuple[int | str, fx.Node]] = []
    for position, value in [*enumerate(node.args), *node.kwargs.items()]:
        fx.node.map_arg(value, lambda producer, position=position: pairs.append((position, producer)))
    return pairs


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The dataflow of ``gm`` as a DiGraph: node name -> {kind, op, target, fx}; edge -> {operands}."""
    modules = dict(gm.named_modules())
    view = nx.DiGraph()
    for node in gm.graph.nodes:
        view.add_node(node.name, kind=op_kind(node, modules), op=node.op, target=str(node.target), fx=node)
    for node in gm.graph.nodes:
        if view.nodes[node.name]["kind"] == META:
            continue  # sizes and dims are bookkeeping, not dataflow
        for position, producer in tensor_operands(node):
            if view.nodes[producer.name]["kind"] == META:
                continue
            edge = view.get_edge_data(producer.name, node.name)
            operands = (edge["operands"] if edge else ()) + (position,)
            view.add_edge(producer.name, node.name, operands=operands)
    return view


def reach_through(view: nx.DiGraph, start: str, kinds: set[str], *, data_operand_only: bool = True) -> set[str]:
    """``start`` and every node reached from it through nodes of ``kinds``.

    With ``data_operand_only`` only operand 0 / self is followed: in ``qkv.view(b, t, ...)`` the data
    is operand 0, and a value entering as a shape or index argument is not data. Elementwise walks
    (``act(gate) * up``) pass ``False`` since either operand of a product carries data.
    """
    seen, frontier = {start}, [start]
    while frontier:
        current = frontier.pop()
        for successor in view.successors(current):
            if successor in seen or view.nodes[successor]["kind"] not in kinds:
                continue
            if not data_operand_only or 0 in view.edges[current, successor]["operands"]:
                seen.add(successor)
                frontier.append(successor)
    return seen


def consumers(view: nx.DiGraph, nodes: set[str]) -> list[tuple[str, str, tuple]]:
    """(producer, consumer, operand positions) for every edge leaving ``nodes``."""
    return [(p, c, view.edges[p, c]["operands"]) for p in nodes for c in view.successors(p) if c not in nodes]
