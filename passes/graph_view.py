"""Analysis: a torch.fx graph as a networkx DiGraph whose nodes carry an *op kind*.

before (fx)::

    qkv = self.qkv_proj(x)            # call_module
    q = qkv.view(b, t, 3, h, d)       # call_method

after (networkx)::

    qkv_proj --operand 0--> view      # nodes: {"kind": "linear"} and {"kind": "shape"}

Only tensor dataflow becomes an edge: ``x.size()`` feeding ``view``'s shape arguments does not, so
a walk along edges follows the values, not the bookkeeping. The op kinds are data (tables below),
so a new spelling of an op is one line, never a new branch in a finder.

The same kinds cover ATen-level graphs from ``torch.export`` (``aten.view``, ``aten.linear``,
``aten.scaled_dot_product_attention``, ...), where weights are ``get_attr`` parameters instead of
modules. There a *functional linear* is an op whose weight operand is a 2-D parameter, directly or
through a transpose::

    addmm = aten.addmm(bias, x2d, c_attn_weight)     # weight stored (in, out): layout "in_out"
    linear = aten.linear(x, q_proj_weight)           # weight stored (out, in): layout "out_in"
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

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

# The ATen spelling of the same kinds (export graphs), keyed by overload packet: aten.view, not aten.view.default.
aten = torch.ops.aten
_SHAPE_FUNCTIONS |= {aten.view, aten.reshape, aten._unsafe_view, aten.permute, aten.transpose, aten.t,
                     aten.contiguous, aten.clone, aten.alias, aten.split, aten.split_with_sizes, aten.chunk,
                     aten.unbind, aten.squeeze, aten.unsqueeze, aten.flatten, aten.unflatten, aten.expand,
                     aten.narrow, aten.select, aten.slice, aten.movedim, aten.cat, aten.to, aten._to_copy,
                     aten.type_as, torch.cat}  # casts keep values; cat joins pieces of one tensor (rotary halves)
_MATMULS |= {aten.matmul, aten.bmm, aten.mm}
_SOFTMAXES |= {aten.softmax, aten._softmax, aten._safe_softmax}
_ATTENTIONS |= {aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu,
                aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_flash_attention}
# pow, tanh and erf let the written-out GELUs (0.5*x*(1+tanh(c*(x+0.044715*x**3))), x*(1+erf(x/√2))/2) count
_ACTIVATION_FUNCTIONS |= {aten.gelu, aten.relu, aten.silu, aten.mish, aten.tanh, aten.sigmoid, aten.erf,
                          aten.pow, torch.sigmoid, F.sigmoid, torch.erf, torch.pow, "sigmoid", "pow"}
_ELEMENTWISE |= {aten.add, aten.mul, aten.sub, aten.div, aten.neg, aten.rsub, aten.where, aten.masked_fill,
                 torch.neg, torch.where, torch.masked_fill, operator.neg, "neg", "masked_fill", "__truediv__"}
_DROPOUT_FUNCTIONS |= {aten.dropout, aten.native_dropout}
_META_FUNCTIONS = {aten.sym_size, aten._assert_tensor_metadata, aten.sym_numel, aten.sym_stride}

# One look-up per node instead of a scan of every table. Method names are strings and function targets
# are not, so one dict serves both ops; where a target is in two tables the first kind listed wins.
_KIND_OF_TARGET: dict[object, str] = {}
for _kind, _table in ((SHAPE, _SHAPE_METHODS | _SHAPE_FUNCTIONS), (MATMUL, _MATMULS), (SOFTMAX, _SOFTMAXES),
                      (ATTENTION, _ATTENTIONS), (ACTIVATION, _ACTIVATION_FUNCTIONS), (ELEMENTWISE, _ELEMENTWISE),
                      (DROPOUT, _DROPOUT_FUNCTIONS), (META, _META_METHODS | _META_FUNCTIONS)):
    for _target in _table:
        _KIND_OF_TARGET.setdefault(_target, _kind)


@dataclass(frozen=True)
class FunctionalLinear:
    """A linear written as an op on a parameter: where its input, weight and bias are, and the weight layout.

    ``layout`` is ``"out_in"`` when the op uses the stored weight as (out, in) (``F.linear``), and
    ``"in_out"`` when it multiplies by it as (in, out) (``addmm``/``mm``/``matmul``, GPT-2's Conv1D).
    """

    data_index: int  # the argument position of the input activations
    weight: str  # the parameter's qualified name (a get_attr target)
    bias: str | None  # the bias parameter's qualified name, if the op adds one
    layout: str

    @property
    def shard_dim(self) -> int:
        """The dimension of the stored weight that holds the output features."""
        return 0 if self.layout == "out_in" else 1


# op -> (data operand, weight operand, bias operand or None, layout of the weight as the op uses it)
_LINEAR_OPERANDS: dict[object, tuple[int, int, int | None, str]] = {
    F.linear: (0, 1, 2, "out_in"), aten.linear: (0, 1, 2, "out_in"),
    torch.addmm: (1, 2, 0, "in_out"), aten.addmm: (1, 2, 0, "in_out"),
    torch.mm: (0, 1, None, "in_out"), aten.mm: (0, 1, None, "in_out"),
    torch.matmul: (0, 1, None, "in_out"), aten.matmul: (0, 1, None, "in_out"), operator.matmul: (0, 1, None, "in_out"),
}
_TRANSPOSES = {aten.t, aten.transpose, aten.permute, torch.t, torch.transpose, "t", "transpose", "permute"}


def _table_key(target: object) -> object:
    """ATen overloads are looked up by their packet (``aten.view.default`` -> ``aten.view``)."""
    return getattr(target, "overloadpacket", target)


def _parameter_of(node: object, parameters: dict[str, tuple[int, ...]]) -> tuple[str, bool] | None:
    """``(name, transposed)`` when ``node`` is a parameter get_attr, or a transpose of a 2-D one."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr" and node.target in parameters:
        return str(node.target), False
    if node.op in ("call_function", "call_method") and _table_key(node.target) in _TRANSPOSES and node.args:
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.op == "get_attr" and len(parameters.get(inner.target, ())) == 2:
            return str(inner.target), True
    return None


def functional_linear(node: fx.Node, parameters: dict[str, tuple[int, ...]]) -> FunctionalLinear | None:
    """The :class:`FunctionalLinear` that ``node`` computes, or None when it is not a linear on a parameter.

    Args:
        node: any graph node.
        parameters: qualified name -> shape of the module's parameters (see :func:`parameter_shapes`).
    """
    operands = _LINEAR_OPERANDS.get(_table_key(node.target)) if node.op == "call_function" else None
    if operands is None:
        return None
    data_index, weight_index, bias_index, layout = operands
    weight = _parameter_of(node.args[weight_index] if len(node.args) > weight_index else None, parameters)
    if weight is None or len(parameters[weight[0]]) != 2:
        return None
    bias_arg = node.args[bias_index] if bias_index is not None and len(node.args) > bias_index else None
    bias = _parameter_of(bias_arg, parameters)
    if bias_arg is not None and (bias is None or bias[1] or len(parameters[bias[0]]) != 1):
        return None  # a computed bias would need the same slice as the weight: leave such an op whole
    if weight[1]:  # the op sees the transpose of the stored weight
        layout = "in_out" if layout == "out_in" else "out_in"
    return FunctionalLinear(data_index, weight[0], bias[0] if bias else None, layout)


LinearApplication = tuple[fx.Node, int, FunctionalLinear | None]  # (node, data input position, functional op)


def linear_applications(gm: fx.GraphModule) -> dict[str, list[tuple[int, LinearApplication]]]:
    """Every ``call_module`` and functional linear of ``gm`` by key (module path or weight name).

    Each entry carries the node's graph position, so :func:`applications_of` can merge keys in graph
    order even after nodes were inserted. Rewrites that change a node's arguments keep it valid.
    """
    parameters = parameter_shapes(gm)
    index: dict[str, list[tuple[int, LinearApplication]]] = {}
    for position, node in enumerate(gm.graph.nodes):
        if node.op == "call_module":
            index.setdefault(str(node.target), []).append((position, (node, 0, None)))
        elif (functional := functional_linear(node, parameters)) is not None:
            index.setdefault(functional.weight, []).append((position, (node, functional.data_index, functional)))
    return index


def applications_of(index: dict[str, list[tuple[int, LinearApplication]]], keys: set[str]) -> list[LinearApplication]:
    """The applications of the linears of ``keys``, in graph order."""
    return [application for _, application in sorted(entry for key in keys for entry in index.get(key, ()))]


def parameter_shapes(gm: nn.Module) -> dict[str, tuple[int, ...]]:
    """Qualified name -> shape of every parameter of ``gm``, a shared one under each of its names."""
    return {name: tuple(p.shape) for name, p in gm.named_parameters(remove_duplicate=False)}


def op_kind(node: fx.Node, modules: dict[str, nn.Module], *,
            parameters: dict[str, tuple[int, ...]] | None = None) -> str:
    """The kind of ``node``: one of the module-level constants (LINEAR, SHAPE, ...).

    Args:
        node: the node to classify.
        modules: the graph module's ``named_modules()``.
        parameters: its :func:`parameter_shapes`; with them, ops on a parameter weight count as LINEAR.
    """
    if parameters is not None and functional_linear(node, parameters) is not None:
        return LINEAR
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
    target = _table_key(node.target)
    if node.op == "call_function" and target is getattr:
        return META
    return _KIND_OF_TARGET.get(target, OTHER)


def tensor_operands(node: fx.Node) -> list[tuple[int | str, fx.Node]]:
    """The (position, producer) pairs of ``node``'s inputs, nested lists flattened under their position.

    Keyword inputs use their name as position: ``cat([a, b])`` gives ``[(0, a), (0, b)]``.
    """
    pairs: list[tuple[int | str, fx.Node]] = []
    for position, value in [*enumerate(node.args), *node.kwargs.items()]:
        if isinstance(value, fx.Node):  # the common case, without map_arg's walk
            pairs.append((position, value))
        elif isinstance(value, (tuple, list, dict, slice)):
            fx.node.map_arg(value, lambda producer, position=position: pairs.append((position, producer)))
    return pairs


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The dataflow of ``gm`` as a DiGraph: node name -> {kind, op, target, fx, linear}; edge -> {operands}.

    ``linear`` is the node's :class:`FunctionalLinear` (None for modules and non-linears).
    """
    modules = dict(gm.named_modules())
    parameters = parameter_shapes(gm)
    nodes = list(gm.graph.nodes)
    kinds: dict[str, str] = {}
    attributes = []
    for node in nodes:
        linear = functional_linear(node, parameters)
        kind = kinds[node.name] = LINEAR if linear is not None else op_kind(node, modules)
        attributes.append((node.name, {"kind": kind, "op": node.op, "target": str(node.target), "fx": node,
                                       "linear": linear}))
    edges: dict[tuple[str, str], tuple] = {}  # (producer, consumer) -> operand positions, in order
    for node in nodes:
        if kinds[node.name] == META:
            continue  # sizes and dims are bookkeeping, not dataflow
        for position, producer in tensor_operands(node):
            if kinds[producer.name] != META:
                key = (producer.name, node.name)
                edges[key] = edges.get(key, ()) + (position,)
    view = nx.DiGraph()
    view.add_nodes_from(attributes)
    view.add_edges_from((producer, consumer, {"operands": operands}) for (producer, consumer), operands in edges.items())
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


def _flows(view: nx.DiGraph, current: str, successor: str, kinds: set[str]) -> bool:
    """Whether ``current``'s value flows on into ``successor`` through an op of ``kinds``.

    A shape op carries data in operand 0 only (``aten.view(x, sizes)``); any other op carries it in
    every tensor operand (``q * cos + rotate_half(q) * sin``, ``act(gate) * up``).
    """
    kind = view.nodes[successor]["kind"]
    return kind in kinds and (kind != SHAPE or 0 in view.edges[current, successor]["operands"])


def flow_region(view: nx.DiGraph, start: str, kinds: set[str], *, within: set[str] | None = None) -> set[str]:
    """``start`` and every node its value flows into through nodes of ``kinds`` (and of ``within``, if given)."""
    seen, frontier = {start}, [start]
    while frontier:
        current = frontier.pop()
        for successor in view.successors(current):
            if successor in seen or (within is not None and successor not in within):
                continue
            if _flows(view, current, successor, kinds):
                seen.add(successor)
                frontier.append(successor)
    return seen


def leading_to(view: nx.DiGraph, kinds: set[str], is_end: Callable[[str], bool]) -> set[str]:
    """The nodes of ``kinds`` whose value flows (as :func:`flow_region` walks) into a node ``is_end`` accepts.

    One pass over the graph, last node first (a view's nodes are in graph order, a topological
    order). Passed as ``within`` to :func:`flow_region`, it keeps a walk to the part that can matter:
    a residual stream flows through every later layer, and walking it from every linear would cost
    the square of the depth.
    """
    leading: set[str] = set()
    for name in reversed(list(view.nodes)):
        if view.nodes[name]["kind"] in kinds and (is_end(name) or any(
                successor in leading and _flows(view, name, successor, kinds) for successor in view.successors(name))):
            leading.add(name)
    return leading


def feeds_linear_input(view: nx.DiGraph, producer: str, consumer: str) -> bool:
    """Whether the edge ``producer -> consumer`` is the data input of a linear (not its weight or bias)."""
    data = view.nodes[consumer]
    if data["kind"] != LINEAR:
        return False
    data_index = data["linear"].data_index if data["linear"] is not None else 0
    return data_index in view.edges[producer, consumer]["operands"]
