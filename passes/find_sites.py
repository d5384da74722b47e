"""Analysis: find the linears to shard by graph structure alone, never by module names.

before (graph)::

    qkv = self.qkv_proj(x); q, k, v = qkv.view(...).permute(...).unbind(0)
    h = self.fc1(x); a = gelu(h); y = self.fc2(a)

after (records)::

    Site(role="qkv", module_path="qkv_proj", ...)   # reaches q, k and v of one attention
    Site(role="fc1", module_path="fc1", ...)        # feeds an activation that reaches a linear
    Replicated(module_path="fc2", reason="...")     # everything else stays whole, with the reason

Rules (each walk is along tensor dataflow in :func:`passes.graph_view.to_networkx`):

* attention projection: the linear's output reaches the query and/or key operand of a score matmul
  and/or the value operand of the probability-times-value matmul (or the q/k/v of
  ``scaled_dot_product_attention``) through shape and indexing ops only. Role ``qkv`` when it
  reaches all three, otherwise the letters it reaches (``q``, ``kv``, ...).
* FFN first linear: the output goes (through shape ops) into an elementwise activation, and the
  activation reaches another linear through elementwise ops only (role ``fc1``); in a gated FFN
  ``act(gate(x)) * up(x) -> down`` the gate is ``fc1`` and the up projection is ``up``.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from passes.graph_view import (ACTIVATION, ATTENTION, DROPOUT, ELEMENTWISE, LINEAR, MATMUL, SHAPE, SOFTMAX,
                               reach_through, to_networkx)
from tpfx.errors import ShardingError

ROLES = ("qkv", "q", "k", "v", "qk", "qv", "kv", "fc1", "up")
_PASS_THROUGH_ELEMENTWISE = {SHAPE, ELEMENTWISE, DROPOUT}


@dataclass(frozen=True)
class Site:
    """A linear to column-shard: its role, where it lives, and the shapes before and after sharding."""

    role: str
    module_path: str
    node_name: str
    weight_shape: tuple[int, ...]
    shard_shape: tuple[int, ...]
    shard_dim: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown site role {self.role!r}; expected one of {ROLES}")
        if len(self.weight_shape) != len(self.shard_shape):
            raise ValueError(f"site {self.module_path}: weight {self.weight_shape} vs shard {self.shard_shape}")


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
    node: fx.Node = view.nodes[scores]["fx"]
    downstream = nx.descendants(view, scores)
    softmaxes = [n for n in downstream if view.nodes[n]["kind"] == SOFTMAX]
    after_softmax = set().union(*(nx.descendants(view, s) | {s} for s in softmaxes)) if softmaxes else set()
    found = []
    for candidate in downstream:
        if view.nodes[candidate]["kind"] != MATMUL:
            continue
        probs, value = view.nodes[candidate]["fx"].args[:2]
        if probs.name in after_softmax:
            found.append(_Attention(node.args[0].name, node.args[1].name, value.name))
    return found


def find_sites(gm: fx.GraphModule, *, tp: int) -> SiteFinding:
    """Classify every Linear called in ``gm`` as a site to shard or a replicated linear with a reason.

    Args:
        gm: a captured graph (torch.fx, Linear modules as ``call_module`` leaves).
        tp: tensor-parallel degree; used for the shard shapes (divisibility is checked by the rewrite).

    Returns:
        The sites in graph order (one per module) and the replicated linears with reasons.
    """
    view = to_networkx(gm)
    attentions = find_attentions(view)
    tied = _tied_modules(gm)
    sites: list[Site] = []
    replicated: list[Replicated] = []
    seen_paths: set[str] = set()
    for node in gm.graph.nodes:
        if view.nodes[node.name]["kind"] != LINEAR or node.target in seen_paths:
            continue
        seen_paths.add(node.target)
        weight = tuple(gm.get_submodule(node.target).weight.shape)
        role, reason = _classify_linear(view, node.name, attentions)
        if role and node.target in tied:
            role, reason = None, f"its weight is shared with '{tied[node.target]}' (tied); sharding would untie it"
        if role:
            shard = (weight[0] // tp,) + weight[1:]
            sites.append(Site(role, node.target, node.name, weight, shard, shard_dim=0))
        else:
            replicated.append(Replicated(node.target, node.name, weight, reason))
    return SiteFinding(tuple(sites), tuple(replicated))


def _classify_linear(view: nx.DiGraph, name: str, attentions: list[_Attention]) -> tuple[str | None, str]:
    reached = reach_through(view, name, {SHAPE})
    letters = "".join(letter for letter, field in (("q", "query"), ("k", "key"), ("v", "value"))
                      if any(getattr(a, field) in reached for a in attentions))
    if letters:
        return ("qkv" if letters == "qkv" else letters), ""
    role = _ffn_role(view, reached)
    if role:
        return role, ""
    return None, _why_not(view, reached)


def _ffn_role(view: nx.DiGraph, reached: set[str]) -> str | None:
    for producer in reached:
        for consumer in view.successors(producer):
            kind = view.nodes[consumer]["kind"]
            if kind == ACTIVATION and _reaches_linear(view, consumer):
                return "fc1"
            if kind == ELEMENTWISE and _multiplies_activation(view, consumer, producer) and _reaches_linear(view, consumer):
                return "up"
    return None


def _reaches_linear(view: nx.DiGraph, start: str) -> bool:
    region = reach_through(view, start, _PASS_THROUGH_ELEMENTWISE, data_operand_only=False)
    return any(view.nodes[c]["kind"] == LINEAR and 0 in view.edges[p, c]["operands"]
               for p in region for c in view.successors(p))


def _multiplies_activation(view: nx.DiGraph, product: str, own_input: str) -> bool:
    """Whether ``product`` multiplies ``own_input`` by an activation of another linear (a gated FFN)."""
    if "mul" not in view.nodes[product]["target"]:
        return False
    frontier = [p for p in view.predecessors(product) if p != own_input]
    seen = set(frontier)
    while frontier:  # back through shape ops and dropout to the activation
        name = frontier.pop()
        kind = view.nodes[name]["kind"]
        if kind == ACTIVATION:
            return any(view.nodes[p]["kind"] in (LINEAR, SHAPE) for p in view.predecessors(name))
        if kind in (SHAPE, DROPOUT):
            fresh = [p for p in view.predecessors(name) if p not in seen]
            seen.update(fresh)
            frontier.extend(fresh)
    return False


def _why_not(view: nx.DiGraph, reached: set[str]) -> str:
    uses = sorted({_describe(view, c) for p in reached for c in view.successors(p) if c not in reached})
    feeds = ", ".join(uses) if uses else "nothing"
    only = " only" if len(uses) == 1 else ""
    return (f"feeds {feeds}{only}, not an attention q/k/v operand (through shape ops) nor an activation "
            "that reaches another linear")


def _describe(view: nx.DiGraph, name: str) -> str:
    data = view.nodes[name]
    if data["op"] == "output":
        return "the model output"
    if data["kind"] == ELEMENTWISE and "add" in data["target"]:
        return "the residual add"
    if data["kind"] == LINEAR:
        return "another linear directly"
    if data["kind"] == DROPOUT:
        return "dropout -> " + ", ".join(sorted(_describe(view, c) for c in view.successors(name))) or "dropout"
    target = data["fx"].target
    label = getattr(target, "__name__", str(target))
    return f"{data['kind'] if data['kind'] != 'other' else 'op'} '{label}'"


def _tied_modules(gm: fx.GraphModule) -> dict[str, str]:
    """module path -> another module path sharing one of its parameters."""
    owners: dict[int, str] = {}
    tied: dict[str, str] = {}
    for path, module in gm.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            other = owners.setdefault(id(parameter), path)
            if other != path:
                tied[path], tied[other] = other, path
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
