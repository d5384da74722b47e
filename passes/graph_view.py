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

from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from tpfx.passes.ops import Kind, embedding_call, rule_of

# gm.meta key: how messages name the call form a graph was traced for (another form than the program's),
# e.g. "(eval, without labels)"; set by the program before the passes rewrite that trace
CALL_FORM = "tpfx_call_form"

# the kinds, as the finder names them (see tpfx.passes.ops.Kind)
LINEAR, SHAPE, MATMUL, SOFTMAX, ATTENTION, ACTIVATION, ELEMENTWISE, DROPOUT, NORM, REDUCTION, META, OTHER = (
    Kind.LINEAR, Kind.SHAPE, Kind.MATMUL, Kind.SOFTMAX, Kind.ATTENTION, Kind.ACTIVATION, Kind.ELEMENTWISE,
    Kind.DROPOUT, Kind.NORM, Kind.REDUCTION, Kind.META, Kind.OTHER)


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


def _is_transpose(node: fx.Node) -> bool:
    """Whether ``node`` swaps the two dims of a 2-D tensor: ``t``, ``transpose``, ``.T``, ``permute(1, 0)``."""
    rule = rule_of(node, {})
    if rule is None or rule.kind is not Kind.SHAPE:
        return False
    if rule.name == "permute":
        order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return [d % 2 for d in order] == [1, 0]
    return rule.name in ("transpose", "numpy_T", "mT")


def _parameter_of(node: object, parameters: dict[str, tuple[int, ...]]) -> tuple[str, bool] | None:
    """``(name, transposed)`` when ``node`` is a parameter get_attr, or a transpose of a 2-D one."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr" and node.target in parameters:
        return str(node.target), False
    if node.op in ("call_function", "call_method") and node.args and _is_transpose(node):
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
    rule = rule_of(node, {}) if node.op in ("call_function", "call_method") else None
    if rule is None or rule.linear is None:
        return None
    data_index, weight_index, bias_index, layout = (rule.linear.data, rule.linear.weight, rule.linear.bias,
                                                    rule.linear.layout)
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


def read_as_layer_operand(user: fx.Node, getter: fx.Node, parameters: dict[str, tuple[int, ...]],
                          modules: dict[str, nn.Module], *, bias_too: bool) -> bool:
    """Whether ``user`` reads the parameter of ``getter`` (its get_attr) as a rewrite gives it the shard:
    the table of an embedding lookup, or the weight (with ``bias_too``, also the bias) of a functional
    linear, directly or through a transpose every reader of which is such a linear (``x @ w.T``).
    The linear's data input is not such a read, even when its weight is the same parameter."""
    lookup = embedding_call(user, modules)
    if lookup is not None and lookup.weight is getter:
        return True
    if _linear_operand(user, getter, str(getter.target), parameters, bias_too):
        return True
    return bool(user.users) and _is_transpose(user) and all(
        _linear_operand(reader, user, str(getter.target), parameters, bias_too) for reader in user.users)


def _linear_operand(node: fx.Node, operand: fx.Node, name: str, parameters: dict[str, tuple[int, ...]],
                    bias_too: bool) -> bool:
    """Whether ``node`` is a functional linear that reads ``operand`` (parameter ``name``, or its transpose)
    as its weight (or bias), not as its data."""
    linear = functional_linear(node, parameters)
    if linear is None or node.args[linear.data_index] is operand:
        return False
    return name == linear.weight or (bias_too and name == linear.bias)


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
            parameters: dict[str, tuple[int, ...]] | None = None) -> Kind:
    """The :class:`~tpfx.passes.ops.Kind` of ``node``, from the op registry.

    An op that applies a weight is LINEAR only when it is a module linear or its weight is a parameter
    (given ``parameters``); ``x @ y`` on two activations is a MATMUL, ``F.linear`` on a computed
    weight is OTHER (tpfx cannot shard a computed weight).

    Args:
        node: the node to classify.
        modules: the graph module's ``named_modules()``.
        parameters: its :func:`parameter_shapes`; with them, ops on a parameter weight count as LINEAR.
    """
    if parameters is not None and functional_linear(node, parameters) is not None:
        return LINEAR
    rule = rule_of(node, modules)
    if rule is None:
        return OTHER
    if rule.kind is LINEAR and node.op != "call_module":
        return OTHER  # a linear op on a weight that is not a parameter
    return rule.kind


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
