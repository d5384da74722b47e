"""Analysis: find the linears to shard by graph structure alone, never by module names.

before (graph)::

    qkv = self.qkv_proj(x); q, k, v = qkv.view(...).permute(...).unbind(0)
    h = self.fc1(x); a = gelu(h); y = self.fc2(a)

after (records)::

    Site(role="qkv", module_path="qkv_proj", ...)   # reaches q, k and v of one attention
    Site(role="fc1", module_path="fc1", ...)        # feeds an activation that reaches a linear
    Replicated(module_path="fc2", reason="...")     # everything else stays whole, with the reason

A linear is an ``nn.Linear`` module (fx graphs) or an op on a parameter weight (ATen graphs from
torch.export: ``aten.linear``, or ``aten.addmm``/``aten.mm`` with an (in, out) weight as in GPT-2's
Conv1D); see :func:`tpfx.passes.graph_view.functional_linear`. A functional site records its weight
``layout`` and parameter names, so the rewrite slices rows of an (out, in) weight and columns of an
(in, out) one.

Rules (each walk is along tensor dataflow in :func:`tpfx.passes.graph_view.to_networkx`):

* attention projection: the linear's output reaches the query and/or key operand of a score matmul
  and/or the value operand of the probability-times-value matmul (or the q/k/v of
  ``scaled_dot_product_attention``) through *head-local* ops only: shape and indexing ops (views,
  transposes, splits, slices, ``cat`` of its own pieces, casts, the ``expand``/``reshape`` that
  repeats key/value heads for grouped-query attention) and elementwise ops (the scale, rotary
  embeddings ``q * cos + rotate_half(q) * sin``, complex rotary through ``view_as_complex`` and
  ``view_as_real``, interleaved rotary through ``stack``), and norms (a per-head qk-norm; whether a norm
  keeps heads apart is the megatron pairing's question). Reductions, softmax and matmuls stop the
  walk: they mix positions of the feature dimension. Role ``qkv`` when it reaches all three,
  otherwise the letters it reaches (``q``, ``kv``, ...). A matmul's factors are where the op
  registry says (``baddbmm(bias, q, k^T)``: arguments 1 and 2), and between the scores and the
  softmax any pointwise op may stand, activations included (a soft cap ``tanh(s / c) * c``).
* FFN first linear: on the way from the linear's output to another linear's input (through shape,
  elementwise, activation and dropout ops) there is an activation: ``gelu``, ``relu``, ``silu``, or
  the written-out tanh/erf GELU (role ``fc1``). In a gated FFN ``act(gate(x)) * up(x) -> down`` the
  gate is ``fc1`` and the up projection, multiplied by an activation of another linear, is ``up``.
  A norm on the way (``mean``, ``layer_norm``) stops the walk, so a residual stream into the next
  block's projections never counts.
* hooks: a linear module whose hooks a column-parallel shard could not keep (a forward hook, a
  backward hook; see :mod:`tpfx.passes.module_hooks`) stays whole, and its reason names the hook.

A replicated linear's reason names the ops where the walks stopped (``op 'cumsum' (node cumsum)``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from tpfx.passes.graph_view import (ACTIVATION, ATTENTION, DROPOUT, ELEMENTWISE, LINEAR, MATMUL, NORM, OTHER, SHAPE,
                                    SOFTMAX, feeds_linear_input, flow_region, leading_to, reach_through, to_networkx)
from tpfx.passes.module_hooks import Placement, hooks_keep_whole
from tpfx.errors import ShardingError
from tpfx.passes.ops import op_label, rule_of

ROLES = ("qkv", "q", "k", "v", "qk", "qv", "kv", "fc1", "up")
LAYOUTS = ("out_in", "in_out")
# head-local ops that q, k and v may pass on their way into attention (see the module docstring); a norm
# (per-head qk-norm) too: on the FFN walk it would let a residual stream's norm make a site, here the walk
# ends at q, k or v. A norm over all heads is still a q/k site: megatron pairing blocks its heads
_TO_ATTENTION = {SHAPE, ELEMENTWISE, DROPOUT, NORM}
# ops between an FFN's first linear and the linear after its activation
_TO_NEXT_LINEAR = {SHAPE, ELEMENTWISE, ACTIVATION, DROPOUT}
# ops between attention scores and their softmax: pointwise ones (a scale, a mask, a soft cap's tanh)
_TO_SOFTMAX = {SHAPE, ELEMENTWISE, ACTIVATION}


@dataclass(frozen=True)
class Site:
    """A linear to column-shard: its role, where it lives, and the shapes before and after sharding.

    ``module_path`` is the linear module (fx) or the module owning the weight parameter (a
    functional linear, ``weight_name`` set). ``layout`` says how the weight is stored: ``out_in``
    (``nn.Linear``, shard rows, ``shard_dim`` 0) or ``in_out`` (Conv1D-style, shard columns, ``shard_dim`` 1).
    """

    role: str
    module_path: str
    node_name: str
    weight_shape: tuple[int, ...]
    shard_shape: tuple[int, ...]
    shard_dim: int = 0
    layout: str = "out_in"
    weight_name: str = ""  # qualified parameter name of a functional linear's weight ("" for a module)
    bias_name: str = ""  # ... and of its bias ("" when it has none, or for a module)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown site role {self.role!r}; expected one of {ROLES}")
        if len(self.weight_shape) != len(self.shard_shape):
            raise ValueError(f"site {self.module_path}: weight {self.weight_shape} vs shard {self.shard_shape}")
        if self.layout not in LAYOUTS or self.shard_dim != LAYOUTS.index(self.layout):
            raise ValueError(f"site {self.module_path}: layout {self.layout!r} with shard_dim {self.shard_dim}; "
                             "expected out_in with 0 or in_out with 1")

    @property
    def functional(self) -> bool:
        """Whether the site is an op on a parameter (export graphs) rather than a Linear module."""
        return bool(self.weight_name)


@dataclass(frozen=True)
class Replicated:
    """A linear that stays whole on every rank, and why."""

    module_path: str
    node_name: str
    weight_shape: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class SiteFinding:
    """What the finder read off one graph."""

    sites: tuple[Site, ...]
    replicated: tuple[Replicated, ...]


@dataclass(frozen=True)
class _Attention:
    """One attention's q, k and v operand nodes, by name."""

    query: str
    key: str
    value: str


@dataclass(frozen=True)
class _Linear:
    """What the finder needs to know of one linear node, module or functional."""

    key: str  # the module path, or the weight's parameter name: one record per key
    module_path: str
    weight_shape: tuple[int, ...]
    layout: str
    weight_name: str
    bias_name: str

    def site(self, role: str, node_name: str, tp: int) -> Site:
        dim = LAYOUTS.index(self.layout)
        shard = tuple(size // tp if axis == dim else size for axis, size in enumerate(self.weight_shape))
        return Site(role, self.module_path, node_name, self.weight_shape, shard, dim, self.layout,
                    self.weight_name, self.bias_name)


def find_attentions(view: nx.DiGraph) -> list[_Attention]:
    """Every attention in the graph: ``scaled_dot_product_attention`` or matmul -> softmax -> matmul."""
    found: list[_Attention] = []
    for name, data in view.nodes(data=True):
        node: fx.Node = data["fx"]
        if data["kind"] == ATTENTION and len(node.args) >= 3:
            found.append(_Attention(*(arg.name for arg in node.args[:3])))
        elif data["kind"] == MATMUL:
            found.extend(_matmul_softmax_matmul(view, name))
    return found


def _matmul_softmax_matmul(view: nx.DiGraph, scores: str) -> list[_Attention]:
    """scores = q @ k^T -> (scale, mask, soft cap) -> softmax -> (dropout) -> probs @ v: the attentions at ``scores``.

    The matmuls' factors are the registry's operands (``baddbmm(bias, q, k^T)`` has them at 1 and 2).
    Between the scores and the softmax any pointwise op may stand, activations included (Gemma-2's
    soft cap ``tanh(s / c) * c``): they act on each score alone.
    """
    query, key = _matmul_operands(view, scores)
    before_softmax = flow_region(view, scores, _TO_SOFTMAX)
    softmaxes = {c for p in before_softmax for c in view.successors(p) if view.nodes[c]["kind"] == SOFTMAX}
    probabilities = set().union(*(flow_region(view, s, _TO_ATTENTION) for s in softmaxes))
    found = []
    for producer in probabilities:
        for candidate in view.successors(producer):
            if view.nodes[candidate]["kind"] != MATMUL:
                continue
            probs, value = _matmul_operands(view, candidate)
            if probs is not None and probs.name == producer and value is not None:
                found.append(_Attention(query.name, key.name, value.name))
    return found if query is not None and key is not None else []


def _matmul_operands(view: nx.DiGraph, name: str) -> tuple[fx.Node | None, fx.Node | None]:
    """The two factors of a matmul node, where the op registry says they are (None where one is not a node)."""
    node: fx.Node = view.nodes[name]["fx"]
    rule = rule_of(node, {})
    positions = rule.operands if rule is not None and len(rule.operands) == 2 else (0, 1)
    factors = [node.args[i] if len(node.args) > i else None for i in positions]
    return tuple(f if isinstance(f, fx.Node) else None for f in factors)  # type: ignore[return-value]


def find_sites(gm: fx.GraphModule, *, tp: int) -> SiteFinding:
    """Classify every linear called in ``gm`` as a site to shard or a replicated linear with a reason.

    Args:
        gm: a captured graph: torch.fx (Linear modules as ``call_module`` leaves) or torch.export
            (ATen ops on ``get_attr`` parameters).
        tp: tensor-parallel degree; used for the shard shapes (divisibility is checked by the rewrite).

    Returns:
        The sites in graph order (one per module or weight parameter) and the replicated linears with reasons.
    """
    view = to_networkx(gm)
    attentions = find_attentions(view)
    # the nodes worth walking from a linear: those that lead to an attention operand, or to a linear's input
    operands = {letter: {getattr(a, field) for a in attentions} for letter, field in _OPERAND_FIELDS}
    every_operand = set().union(*operands.values())
    walks = _Walks(operands, leading_to(view, _TO_ATTENTION, every_operand.__contains__),
                   leading_to(view, _TO_NEXT_LINEAR, lambda name: _feeds_a_linear(view, name)),
                   {name: index for index, name in enumerate(view.nodes)})
    tied = _tied_parameters(gm)
    reads = _parameter_reads(view)
    sites: list[Site] = []
    replicated: list[Replicated] = []
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if view.nodes[node.name]["kind"] != LINEAR:
            continue
        linear = _describe_linear(gm, view, node)
        if linear.key in seen:
            continue
        seen.add(linear.key)
        role, reason = _classify_linear(view, node.name, walks)
        shared = tied.get(linear.weight_name or f"{linear.module_path}.weight")
        if role and shared:
            role, reason = None, f"its weight is shared with '{shared}' (tied); sharding would untie it"
        elif role and (elsewhere := _other_uses(view, linear, reads)):
            role, reason = None, (f"its weight or bias is also read by node {elsewhere}, which is not a linear; "
                                  "sharding would change what that node sees")
        role, reason = _hook_decision(gm, linear, role, reason)
        if role:
            sites.append(linear.site(role, node.name, tp))
        else:
            replicated.append(Replicated(linear.module_path, node.name, linear.weight_shape, reason))
    return SiteFinding(tuple(sites), tuple(replicated))


def _describe_linear(gm: fx.GraphModule, view: nx.DiGraph, node: fx.Node) -> _Linear:
    functional = view.nodes[node.name]["linear"]
    if functional is None:  # an nn.Linear module
        weight = tuple(gm.get_submodule(node.target).weight.shape)
        return _Linear(str(node.target), str(node.target), weight, "out_in", "", "")
    # reports name a functional linear by the module owning its weight; a weight of the model itself by its name
    owner = functional.weight.rpartition(".")[0] or functional.weight
    weight = tuple(gm.get_parameter(functional.weight).shape)
    return _Linear(functional.weight, owner, weight, functional.layout, functional.weight, functional.bias or "")


def _hook_decision(gm: fx.GraphModule, linear: _Linear, role: str | None, reason: str) -> tuple[str | None, str]:
    """A site whose module hooks a column shard cannot keep stays whole; a whole linear's reason says
    when its hooks would also keep it from being a row-parallel partner (megatron mode).

    Export graphs have no module hooks to check: torch.export traces them into the graph.
    """
    if linear.weight_name:
        return role, reason
    module = gm.get_submodule(linear.module_path)
    if role and (why := hooks_keep_whole(module, linear.module_path, Placement.COLUMN)):
        return None, f"kept whole: {why}"
    if not role and (why := hooks_keep_whole(module, linear.module_path, Placement.ROW)):
        return None, f"{reason}; nor a row-parallel partner in megatron mode: {why}"
    return role, reason


def _parameter_reads(view: nx.DiGraph) -> dict[str, list[fx.Node]]:
    """get_attr nodes by the parameter they read: built once, so each linear's look-up is not a graph scan."""
    reads: dict[str, list[fx.Node]] = {}
    for data in view.nodes.values():
        if data["op"] == "get_attr":
            reads.setdefault(str(data["fx"].target), []).append(data["fx"])
    return reads


def _other_uses(view: nx.DiGraph, linear: _Linear, reads: dict[str, list[fx.Node]]) -> str:
    """The first node that reads the linear's parameters other than as a linear's weight/bias ("" if none)."""
    path = linear.module_path
    names = {linear.weight_name, linear.bias_name} - {""} or {f"{path}.weight", f"{path}.bias"}
    for getter in (node for name in sorted(names) for node in reads.get(name, ())):
        for user in getter.users:
            kind = view.nodes[user.name]["kind"]
            readers = [user] if kind == LINEAR else list(user.users)  # a transpose's readers must be linears
            if kind not in (LINEAR, SHAPE) or any(view.nodes[r.name]["linear"] is None for r in readers):
                return user.name
    return ""


@dataclass(frozen=True)
class _Walks:
    """Where a walk from a linear can find what it looks for (see :func:`tpfx.passes.graph_view.leading_to`)."""

    operands: dict[str, set[str]]  # "q", "k", "v" -> the attentions' operand nodes of that letter
    to_attention: set[str]  # nodes of _TO_ATTENTION kinds that lead to a q, k or v operand
    to_next_linear: set[str]  # nodes of _TO_NEXT_LINEAR kinds that lead to a linear's data input
    order: dict[str, int]  # node name -> its position in the graph (for the walk that explains a stop)


def _feeds_a_linear(view: nx.DiGraph, name: str) -> bool:
    return any(feeds_linear_input(view, name, consumer) for consumer in view.successors(name))


_OPERAND_FIELDS = (("q", "query"), ("k", "key"), ("v", "value"))


def _classify_linear(view: nx.DiGraph, name: str, walks: _Walks) -> tuple[str | None, str]:
    toward_attention = flow_region(view, name, _TO_ATTENTION, within=walks.to_attention)
    letters = "".join(letter for letter, _ in _OPERAND_FIELDS if not toward_attention.isdisjoint(walks.operands[letter]))
    if letters:
        return ("qkv" if letters == "qkv" else letters), ""
    role = _ffn_role(view, name, walks)
    if role:
        return role, ""
    return None, _why_not(view, reach_through(view, name, {SHAPE}), _walk_stops(view, name, walks.order))


def _ffn_role(view: nx.DiGraph, name: str, walks: _Walks) -> str | None:
    """``fc1`` when an activation lies on the way to another linear's input, ``up`` when a gate's does.

    Only the part of the region that leads to a linear's input is walked: the exits, the nodes on
    the way and the operands of a product on the way all lie in it.
    """
    region = flow_region(view, name, _TO_NEXT_LINEAR, within=walks.to_next_linear)
    exits = {p for p in region for c in view.successors(p) if c != name and feeds_linear_input(view, p, c)}
    on_the_way = _backward_within(view, exits, region)  # the nodes of region that lead to a next linear
    if any(view.nodes[n]["kind"] == ACTIVATION for n in on_the_way):
        return "fc1"
    if any(_multiplies_activation(view, n, region) for n in on_the_way):
        return "up"
    return None


def _backward_within(view: nx.DiGraph, starts: set[str], region: set[str]) -> set[str]:
    seen, frontier = set(starts), list(starts)
    while frontier:
        fresh = [p for p in view.predecessors(frontier.pop()) if p in region and p not in seen]
        seen.update(fresh)
        frontier.extend(fresh)
    return seen


def _multiplies_activation(view: nx.DiGraph, product: str, own_region: set[str]) -> bool:
    """Whether ``product`` multiplies this linear's value by an activation of another linear (a gated FFN)."""
    if view.nodes[product]["kind"] != ELEMENTWISE or _rule_name(view, product) != "mul":
        return False
    frontier = [p for p in view.predecessors(product) if p not in own_region]
    seen = set(frontier)
    while frontier:  # back through shape, elementwise and dropout ops to an activation of a linear's output
        name = frontier.pop()
        kind = view.nodes[name]["kind"]
        if kind == ACTIVATION and any(view.nodes[p]["kind"] in (LINEAR, SHAPE) for p in view.predecessors(name)):
            return True
        if kind in _TO_NEXT_LINEAR:
            fresh = [p for p in view.predecessors(name) if p not in seen]
            seen.update(fresh)
            frontier.extend(fresh)
    return False


def _rule_name(view: nx.DiGraph, name: str) -> str:
    """The op registry's name of an elementwise node's op ("add", "mul", ...)."""
    rule = rule_of(view.nodes[name]["fx"], {})
    return rule.name if rule is not None else ""


def _why_not(view: nx.DiGraph, reached: set[str], stops: list[str]) -> str:
    """The reason of a linear that is no site: what its value feeds (``reached``: it and the shape ops
    after it) and the ops where the walks stopped (``stops``, from :func:`_walk_stops`)."""
    uses = sorted({_describe(view, c) for p in reached for c in view.successors(p) if c not in reached})
    feeds = ", ".join(uses) if uses else "nothing"
    only = " only" if len(uses) == 1 else ""
    shown = ", ".join(_stop_label(view, name) for name in stops[:_STOPS_SHOWN])
    more = f" and {len(stops) - _STOPS_SHOWN} more" if len(stops) > _STOPS_SHOWN else ""
    where = f"; matching stopped at {shown}{more}" if stops else ""
    return (f"feeds {feeds}{only}, not an attention q/k/v operand (through head-local ops) nor an activation "
            f"that reaches another linear{where}")


_STOPS_SHOWN = 4
# a norm ends the explanation's walk: the FFN walk stops there, and the attention walk passes only the
# norms of q and k, which an unmatched linear's value does not reach
_WALKED = (_TO_ATTENTION | _TO_NEXT_LINEAR) - {NORM}


def _walk_stops(view: nx.DiGraph, start: str, order: dict[str, int]) -> list[str]:
    """Where the site walks from ``start`` end, in graph order: the first node on each path of a kind
    neither walk passes (a norm, ``cumsum``, a matmul, another linear, the output), and each add that
    joins the value to one not computed from it (a residual add: past it, every op is the stream's).

    Nodes are visited in graph order, so all of a node's operands from the walk are known when it is.
    """
    region, stops, seen = {start}, set(), {start}
    heap = [(order[name], name) for name in view.successors(start)]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if name in seen:
            continue
        seen.add(name)
        if not _walk_passes(view, name, region):
            stops.add(name)
            continue
        region.add(name)
        for successor in view.successors(name):
            if successor not in seen:
                heapq.heappush(heap, (order[successor], successor))
    return sorted(stops, key=order.__getitem__)


def _walk_passes(view: nx.DiGraph, name: str, region: set[str]) -> bool:
    """Whether the value of ``region`` flows on through ``name`` (see :func:`_walk_stops`)."""
    data = view.nodes[name]
    if data["kind"] not in _WALKED:
        return False
    if data["kind"] == SHAPE and not any(0 in view.edges[p, name]["operands"] for p in view.predecessors(name)
                                         if p in region):
        return False  # the value is an index or a size argument here, not the data moved
    joins = [p for p in view.predecessors(name) if p not in region and view.nodes[p]["op"] != "get_attr"]
    return not (data["kind"] == ELEMENTWISE and _rule_name(view, name) == "add" and joins)


def _stop_label(view: nx.DiGraph, name: str) -> str:
    """``op 'cumsum' (node cumsum_1)``: the op a node runs, by its function, method or module class."""
    node: fx.Node = view.nodes[name]["fx"]
    return f"the model output (node {name})" if node.op == "output" else f"op '{op_label(node, {})}' (node {name})"


def _describe(view: nx.DiGraph, name: str) -> str:
    data = view.nodes[name]
    if data["op"] == "output":
        return "the model output"
    if data["kind"] == ELEMENTWISE and _rule_name(view, name) == "add":
        return "the residual add"
    if data["kind"] == LINEAR:
        return "another linear directly"
    if data["kind"] == DROPOUT:
        return "dropout -> " + ", ".join(sorted(_describe(view, c) for c in view.successors(name))) or "dropout"
    return f"{data['kind'] if data['kind'] is not OTHER else 'op'} '{op_label(data['fx'], {})}'"


def _tied_parameters(gm: fx.GraphModule) -> dict[str, str]:
    """parameter name -> the owner module of another name of the same parameter (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, parameter in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    tied = {}
    for aliases in names.values():
        for name in aliases:
            others = [other.rpartition(".")[0] or other for other in aliases if other != name]
            if others:
                tied[name] = others[0]
    return tied


def require_divisible(sites: tuple[Site, ...], tp: int) -> None:
    """Raise before any change if ``tp`` does not divide a site's sharded dimension."""
    for site in sites:
        size = site.weight_shape[site.shard_dim]
        if size % tp:
            divisors = [d for d in range(2, size + 1) if size % d == 0][:6]
            raise ShardingError(
                f"cannot shard '{site.module_path}' ({site.role}): out_features {size} is not divisible by tp={tp}; "
                f"use a tp that divides it (for example {', '.join(map(str, divisors))})"
            )
