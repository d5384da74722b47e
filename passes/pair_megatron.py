"""Analysis: pair each column site with the row-parallel linear after it (Megatron's pairing).

before (records from :mod:`tpfx.passes.find_sites`)::

    Site(role="qkv", module_path="attn.qkv_proj", ...)        # column + all-gather
    Site(role="fc1", module_path="ffn.fc1", ...)

after (records)::

    Pair(kind="attention", columns=(qkv site,), column_layouts=([3, 4*, 32],),
         row_module_path="attn.out_proj", row_layout=([4*, 32]), shape_edits=(view arg 4, view_1 arg 3))
    Pair(kind="ffn", columns=(fc1 site,), column_layouts=([512*],), row_module_path="ffn.fc2", ...)
    Fallback(sites=(...), reason="op 'foo' has no rule in the op registry; ... (at node ...)")

The sites whose outputs meet (q, k and v at the attention; gate and up at the product) form one
group; the group's pair partner is the one linear its values reach, found by walking the dataflow
with :func:`tpfx.passes.feature_flow.analyze_feature_flow`. Every op on the way must be elementwise or
head-local; otherwise, or when no factor of the partner's input can be split across tp, the group
falls back to column-plus-gather, and the record says why.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from tpfx.passes.find_sites import Site, SiteFinding
from tpfx.passes.graph_view import functional_linear, parameter_shapes
from tpfx.passes.factors import Dim, FeatureLayout, ShapeUse, Value
from tpfx.passes.feature_flow import FeatureFlow, LinearCall, LinearOf, analyze_feature_flow, module_linears
from tpfx.passes.localize_shapes import ShapeEdit
from tpfx.passes.ops import SDPA_GQA, Flow, Kind, dropout_probability, kind_of, rule_of

_FFN_ROLES = ("fc1", "up")


@dataclass(frozen=True)
class HeadNarrow:
    """Where whole (replicated) grouped-query keys or values, repeated to every query head, meet the
    queries' local heads: ``producer``'s dim ``dim`` (counted from the end) is narrowed to this
    rank's heads before ``consumer`` reads it."""

    consumer: str
    producer: str
    dim: int
    repeats: int = 1  # > 1: the consumer (SDPA with enable_gqa) repeats each head; repeat it first, then narrow


@dataclass(frozen=True)
class ReplicatedRead:
    """A whole tensor that needs a gradient, read by an op on this rank's heads (a qk-norm's weight).

    Each rank's gradient of it is the sum over its own heads only; a copy-to (identity forward,
    all-reduce backward) where ``consumer`` reads ``producer`` sums the ranks' parts. ``producer`` ""
    means the consumer is a module call (``nn.RMSNorm``) reading its own parameters.
    """

    consumer: str
    producer: str


@dataclass(frozen=True)
class HeadDropout:
    """A dropout on this rank's heads (or d_ff part): it draws the whole tensor's mask and keeps its part.

    ``dim`` (counted from the end) is where the split factor is, outermost in that dim."""

    node_name: str
    dim: int


@dataclass(frozen=True)
class Pair:
    """Column sites and the row-parallel linear they feed, with the layouts that keep heads whole."""

    kind: str  # "attention" or "ffn"
    columns: tuple[Site, ...]
    column_layouts: tuple[FeatureLayout, ...]
    row_module_path: str
    row_node_name: str
    row_weight_shape: tuple[int, int]
    row_layout: FeatureLayout
    shape_edits: tuple[ShapeEdit, ...]
    shard_size: int  # the size of the factor split across ranks: the head count or d_ff
    row_weight_name: str = ""  # a functional row linear (export graphs): its weight parameter
    row_bias_name: str = ""  # ... and its bias, if the op adds one
    row_weight_layout: str = "out_in"  # ... stored (out, in) as nn.Linear, or (in, out) as GPT-2's Conv1D
    narrows: tuple[HeadNarrow, ...] = ()  # grouped-query k/v with fewer heads than tp (see _narrows)
    dropouts: tuple[HeadDropout, ...] = ()  # dropouts between the pair (see _dropouts)
    replicated_reads: tuple[ReplicatedRead, ...] = ()  # whole tensors with gradients read on local heads

    def __post_init__(self) -> None:
        if self.kind not in ("attention", "ffn"):
            raise ValueError(f"pair kind must be 'attention' or 'ffn', got {self.kind!r}")
        if not self.columns or len(self.columns) != len(self.column_layouts):
            raise ValueError(f"pair of {self.row_module_path}: one layout per column site is needed")
        if self.row_weight_layout not in ("out_in", "in_out"):
            raise ValueError(f"row weight layout must be 'out_in' or 'in_out', got {self.row_weight_layout!r}")
        if self.row_layout.size != self.row_in_features:
            raise ValueError(f"row layout {self.row_layout} does not cover in_features of {self.row_module_path}")

    @property
    def row_in_features(self) -> int:
        return self.row_weight_shape[1 if self.row_weight_layout == "out_in" else 0]

    def signature(self) -> tuple:
        """What must agree between call forms: modules and layouts, not node names."""
        return (tuple(s.module_path for s in self.columns), self.column_layouts, self.row_module_path,
                self.row_layout)

    def describe(self) -> str:
        """One line, e.g. ``attn.qkv_proj [3, 4*, 32] -> attn.out_proj [4*, 32]``."""
        columns = ", ".join(f"{s.module_path} {l.describe()}" for s, l in zip(self.columns, self.column_layouts))
        return f"{columns} -> {self.row_module_path} {self.row_layout.describe()}"


@dataclass(frozen=True)
class Fallback:
    """Column sites that stay column-plus-gather in megatron mode, and why they could not be paired."""

    sites: tuple[Site, ...]
    reason: str


@dataclass(frozen=True)
class Pairing:
    """The pairs and the fallbacks of one graph; every column site is in exactly one of them."""

    pairs: tuple[Pair, ...]
    fallbacks: tuple[Fallback, ...]

    @property
    def fallback_sites(self) -> tuple[Site, ...]:
        return tuple(site for fallback in self.fallbacks for site in fallback.sites)

    def signature(self) -> tuple:
        """What must agree between two call forms of one program."""
        return (tuple(p.signature() for p in self.pairs),
                tuple(s.module_path for s in self.fallback_sites))


class _NoPair(Exception):
    """Why a group of sites cannot be paired (one line)."""


def graph_linears(gm: fx.GraphModule) -> LinearOf:
    """Recognize the linears of ``gm``: ``nn.Linear`` calls, and ops on a parameter weight (export graphs)."""
    by_module, parameters = module_linears(gm), parameter_shapes(gm)

    def linear_of(node: fx.Node) -> LinearCall | None:
        found = by_module(node)
        functional = functional_linear(node, parameters) if found is None else None
        if functional is None:
            return found
        shape = parameters[functional.weight]
        return LinearCall(functional.data_index, functional.weight, shape[1 - functional.shard_dim],
                          shape[functional.shard_dim], functional=True, bias=functional.bias or "",
                          layout=functional.layout)

    return linear_of


def pair_sites(gm: fx.GraphModule, finding: SiteFinding, *, tp: int) -> Pairing:
    """Pair the finder's column sites with their row-parallel partners, or say why not.

    Args:
        gm: the captured single-device graph (full-size ``nn.Linear`` modules).
        finding: the finder's records for ``gm``.
        tp: the tensor-parallel degree (the sharded factor must be divisible by it).

    Returns:
        The pairs and the fallbacks, in graph order of their first site.
    """
    linear_of = graph_linears(gm)
    flow = analyze_feature_flow(gm, [site.node_name for site in finding.sites], linear_of=linear_of)
    index = _GraphIndex.of(gm, linear_of)
    records = _records_by_group(flow, index)
    for group, reads in _replicated_reads(gm, flow).items():
        records[group].reads = reads
    groups: dict[int, list[Site]] = {}
    for site in finding.sites:
        groups.setdefault(flow.group_of(flow.root_groups[site.node_name]), []).append(site)
    pairs, fallbacks = [], []
    for group, sites in groups.items():
        try:
            pairs.append(_pair_group(flow, records[group], sites, tp, index))
        except _NoPair as why:
            fallbacks.append(Fallback(tuple(sites), str(why)))
    return Pairing(tuple(pairs), tuple(fallbacks))


@dataclass(frozen=True)
class _GraphIndex:
    """What pairing looks up for every group, read off the graph once (a scan per group is quadratic)."""

    calls: dict[str, list[tuple[fx.Node, LinearCall]]]  # linear key -> its applications, in graph order
    weights: dict[str, object]  # linear key -> its weight parameter
    names_per_parameter: dict[int, int]  # id(parameter) -> how many qualified names reach it
    nodes: dict[str, fx.Node]  # node name -> node, in graph order
    order: dict[str, int]  # node name -> its position in the graph
    dropouts: set[str]  # the dropout nodes (an nn.Dropout module, F.dropout or aten.dropout)

    @classmethod
    def of(cls, gm: fx.GraphModule, linear_of: LinearOf) -> _GraphIndex:
        calls: dict[str, list[tuple[fx.Node, LinearCall]]] = {}
        for node in gm.graph.nodes:
            if (found := linear_of(node)) is not None:
                calls.setdefault(found.key, []).append((node, found))
        weights = {key: gm.get_parameter(found.key) if found.functional else gm.get_submodule(found.key).weight
                   for key, ((_, found), *_) in calls.items()}
        names: dict[int, int] = {}
        for _, parameter in gm.named_parameters(remove_duplicate=False):
            names[id(parameter)] = names.get(id(parameter), 0) + 1
        modules = dict(gm.named_modules())
        dropouts = {node.name for node in gm.graph.nodes if _is_dropout(node, modules)}
        nodes = {node.name: node for node in gm.graph.nodes}
        return cls(calls, weights, names, nodes, {name: i for i, name in enumerate(nodes)}, dropouts)


@dataclass
class _GroupRecords:
    """What the feature flow recorded for one group: sorted out once, since a scan of every group's
    records for each group is quadratic in depth."""

    poisoned: list[str] = field(default_factory=list)  # why no pair can be formed, first first
    rows: list[tuple[str, str, Dim]] = field(default_factory=list)  # the linears the group's values reach
    shape_uses: list[ShapeUse] = field(default_factory=list)
    dropouts: list[str] = field(default_factory=list)  # the dropout nodes on the group's values, in graph order
    reads: list[ReplicatedRead] = field(default_factory=list)  # see _replicated_reads


def _records_by_group(flow: FeatureFlow, index: _GraphIndex) -> defaultdict[int, _GroupRecords]:
    records: defaultdict[int, _GroupRecords] = defaultdict(_GroupRecords)
    for group, why in flow.poisoned.items():
        records[flow.group_of(group)].poisoned.append(why)
    for group, rows in flow.rows.items():
        records[flow.group_of(group)].rows.extend(rows)
    for use in flow.shape_uses:
        records[flow.group_of(use.group)].shape_uses.append(use)
    for name in sorted(index.dropouts & flow.values.keys(), key=index.order.__getitem__):
        records[flow.group_of(flow.values[name].group)].dropouts.append(name)
    return records


def _replicated_reads(gm: fx.GraphModule, flow: FeatureFlow) -> dict[int, list[ReplicatedRead]]:
    """Per group, where its ops read a whole tensor that needs a gradient (see :class:`ReplicatedRead`).

    A tensor needs a gradient when it is computed from a trainable parameter (a get_attr, a module's
    own); the column linears (sharded, their inputs copied already) and sizes are left out. One pass
    over the graph in order.
    """
    modules = dict(gm.named_modules())
    trainable = {name for name, p in gm.named_parameters(remove_duplicate=False) if p.requires_grad}

    def trains(node: fx.Node) -> bool:  # a module call with parameters of its own that need gradients
        return node.op == "call_module" and any(p.requires_grad for p in modules[str(node.target)].parameters())

    needs: dict[str, bool] = {}
    found: defaultdict[int, list[ReplicatedRead]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.name not in flow.region:
            if kind_of(node, modules) is Kind.META:
                needs[node.name] = False  # a size: no gradient
            elif node.op == "get_attr":
                needs[node.name] = str(node.target) in trainable
            else:
                needs[node.name] = trains(node) or any(needs.get(p.name, False) for p in node.all_input_nodes)
            continue
        inside = [p.name for p in node.all_input_nodes if p.name in flow.values]
        if node.name in flow.roots or not inside:
            continue
        group = flow.group_of(flow.values[inside[0]].group)
        if trains(node):
            found[group].append(ReplicatedRead(node.name, ""))
        found[group] += [ReplicatedRead(node.name, p.name) for p in node.all_input_nodes if needs.get(p.name, False)]
    return found


def _is_dropout(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A dropout (module, function or ATen op), or an attention that drops its probabilities (dropout_p > 0)."""
    return dropout_probability(node, modules) is not None


def is_attention_op(node: fx.Node) -> bool:
    """Whether ``node`` is an attention op the rewrite can draw a rank's dropout for (the op registry's SDPA)."""
    rule = rule_of(node, {}) if node.op == "call_function" else None
    return rule is not None and rule.kind is Kind.ATTENTION and rule.dropout is not None


def _pair_group(flow: FeatureFlow, records: _GroupRecords, sites: list[Site], tp: int, index: _GraphIndex) -> Pair:
    if records.poisoned:
        raise _NoPair(records.poisoned[0])
    row_node, row, row_dim = _partner(records, sites, index)
    leaves = _leaf_factors(flow, row_dim, row.key)
    if _product(flow, leaves) != row.in_features:
        raise _NoPair(f"the input of '{row.key}' is not exactly the features of {_paths(sites)}")
    chosen = _choose_heads(flow, leaves, row.key, tp)
    layouts = tuple(_layout(flow, flow.roots[site.node_name], chosen, site) for site in sites)
    if all(layout.shard_axis is None for layout in layouts):
        raise _NoPair(f"no factor of {_paths(sites)} lines up with the split input of '{row.key}'")
    whole_only, narrows = _narrows(flow, chosen, sites, layouts, index) if len(chosen) > 1 else (set(), ())
    weight_shape = (row.out_features, row.in_features) if row.layout == "out_in" else (row.in_features, row.out_features)
    return Pair(
        kind="ffn" if all(site.role in _FFN_ROLES for site in sites) else "attention",
        columns=tuple(sites), column_layouts=layouts,
        row_module_path=row.key.rpartition(".")[0] if row.functional else row.key,
        row_node_name=row_node.name, row_weight_shape=weight_shape,
        row_layout=_layout_of(flow, leaves, chosen, row.key), shape_edits=_shape_edits(flow, records.shape_uses, chosen, whole_only),
        shard_size=_product(flow, list(chosen)), row_weight_name=row.key if row.functional else "",
        row_bias_name=row.bias, row_weight_layout=row.layout, narrows=narrows,
        dropouts=_dropouts(flow, records.dropouts, chosen, whole_only), replicated_reads=tuple(records.reads))


def _partner(records: _GroupRecords, sites: list[Site], index: _GraphIndex) -> tuple[fx.Node, LinearCall, Dim]:
    """The one linear the group's values reach, and the parts of its input's feature dim."""
    reached = [(key, dim) for _, key, dim in records.rows]
    keys = sorted({key for key, _ in reached})
    if not keys:
        raise _NoPair(f"the output of {_paths(sites)} reaches no other linear as its input")
    if len(keys) > 1:
        raise _NoPair(f"the output of {_paths(sites)} reaches several linears ({', '.join(keys)}), not one")
    calls = index.calls.get(keys[0], [])
    if len(calls) != 1:
        raise _NoPair(f"'{keys[0]}' is applied {len(calls)} times; a row-parallel partner must be applied once")
    if index.names_per_parameter.get(id(index.weights[keys[0]]), 0) > 1:
        raise _NoPair(f"the weight of '{keys[0]}' is shared with another module (tied)")
    return calls[0][0], calls[0][1], reached[0][1]


def _leaf_factors(flow: FeatureFlow, dim: Dim, row: str) -> list[int]:
    if any(part.factor is None for part in dim):
        raise _NoPair(f"the input of '{row}' mixes batch dims into its feature dim")
    return [leaf for part in dim for leaf in flow.factors.leaves(part.factor)]


def _product(flow: FeatureFlow, leaves: list[int]) -> int:
    total = 1
    for leaf in leaves:
        total *= flow.factors.sizes[leaf]
    return total


def _choose_heads(flow: FeatureFlow, leaves: list[int], row: str, tp: int) -> tuple[int, ...]:
    """The factor of the row input to split across ranks: the outermost leaf that every op keeps local
    and that tp divides, else the outermost run of such leaves whose product tp divides.

    A run is grouped-query attention's heads when tp divides neither the key/value heads nor their
    repeats (2 kv heads, each repeated to 2 query heads, at tp=4): the query heads are split as one
    factor and the keys and values stay whole on every rank (see :func:`_narrows`).
    """
    why = []
    for leaf in leaves:
        size, blocked = flow.factors.sizes[leaf], flow.factors.why_blocked(leaf)
        if blocked:
            why.append(f"{size}: {blocked}")
        elif size % tp:
            why.append(f"{size}: not divisible by tp={tp}")
        else:
            return (leaf,)
    for first in range(len(leaves)):
        run: list[int] = []
        for leaf in leaves[first:]:
            if flow.factors.why_blocked(leaf):
                break
            run.append(leaf)
            if len(run) > 1 and _product(flow, run) % tp == 0:
                return tuple(run)
    free = sorted({flow.factors.sizes[leaf] for leaf in leaves if not flow.factors.why_blocked(leaf)})
    fix = f"; a tp that divides {' or '.join(map(str, free))} pairs it" if free else ""
    raise _NoPair(f"no factor of the input of '{row}' can be split across tp={tp} ({'; '.join(why)}){fix}")


def _dim_classes(flow: FeatureFlow, value: Value) -> list[list[int]]:
    """Per dim of ``value``: the classes of its feature leaves, outermost first (batch parts left out)."""
    return [[flow.factors.find(leaf) for part in dim if part.factor is not None for leaf in flow.factors.leaves(part.factor)]
            for dim in value.dims]


def _run_positions(flow: FeatureFlow, leaves: list[int], chosen: tuple[int, ...]) -> list[int]:
    """Where the classes of ``chosen`` appear in ``leaves``, in order and next to each other."""
    classes = [flow.factors.find(leaf) for leaf in leaves]
    targets = [flow.factors.find(leaf) for leaf in chosen]
    return [i for i in range(len(classes) - len(targets) + 1) if classes[i:i + len(targets)] == targets]


def _merged(flow: FeatureFlow, leaves: list[int], position: int, length: int) -> FeatureLayout:
    sizes = [flow.factors.sizes[leaf] for leaf in leaves]
    merged = sizes[:position] + [_product(flow, leaves[position:position + length])] + sizes[position + length:]
    return FeatureLayout(tuple(merged), position)


def _layout(flow: FeatureFlow, root: int, chosen: tuple[int, ...], site: Site) -> FeatureLayout:
    leaves = flow.factors.leaves(root)
    positions = _run_positions(flow, leaves, chosen)
    if len(positions) > 1:
        sizes = [flow.factors.sizes[leaf] for leaf in leaves]
        raise _NoPair(f"'{site.module_path}' holds the sharded factor {len(positions)} times in its layout {sizes}; "
                      "its heads do not line up with the next linear's input")
    if positions:
        return _merged(flow, leaves, positions[0], len(chosen))
    # not held whole: the heads are made by an expand after this linear (grouped-query k/v repeated to
    # the query heads). Every rank keeps all of it; what is split is the repeated heads (see _narrows)
    return FeatureLayout(tuple(flow.factors.sizes[leaf] for leaf in leaves), None)


def _layout_of(flow: FeatureFlow, leaves: list[int], chosen: tuple[int, ...], row: str) -> FeatureLayout:
    positions = _run_positions(flow, leaves, chosen)
    if len(positions) != 1:
        raise _NoPair(f"the heads split across ranks are not one block of the input of '{row}'")
    return _merged(flow, leaves, positions[0], len(chosen))


def _narrows(flow: FeatureFlow, chosen: tuple[int, ...], sites: list[Site], layouts: tuple[FeatureLayout, ...],
             index: _GraphIndex) -> tuple[set[str], tuple[HeadNarrow, ...]]:
    """Where the whole (replicated) columns' values meet the sharded ones, and the nodes only they reach.

    With a run of factors split (query heads = kv heads x repeats), the keys and values hold only
    part of it: every rank computes all their heads and repeats them to every query head, unchanged;
    where they meet the queries' local heads (``q @ k^T``, ``probs @ v``, an SDPA) they are narrowed
    to this rank's block of heads. Returns the nodes on the whole columns' side, whose shapes stay
    full size, and the narrows.
    """
    def reached(columns: list[str]) -> set[str]:
        seen, frontier = set(columns), list(columns)
        while frontier:
            for user in index.nodes[frontier.pop()].users:
                if user.name not in seen and user.name in flow.region:
                    seen.add(user.name)
                    frontier.append(user.name)
        return seen

    sharded = reached([s.node_name for s, layout in zip(sites, layouts) if layout.shard_axis is not None])
    whole_only = reached([s.node_name for s, layout in zip(sites, layouts) if layout.shard_axis is None]) - sharded
    targets = [flow.factors.find(leaf) for leaf in chosen]
    narrows = []
    for consumer in sorted(sharded, key=index.order.__getitem__):
        for producer in index.nodes[consumer].all_input_nodes:
            if producer.name not in whole_only:
                continue
            value = flow.values.get(producer.name)
            dims = [] if value is None else _dim_classes(flow, value)
            at = [i for i, classes in enumerate(dims) if classes == targets]
            repeats = 1
            if not at and _groups_heads(index.nodes[consumer]):  # SDPA(enable_gqa): it repeats k/v to the query heads
                at = [i for i, classes in enumerate(dims) if classes and classes == targets[:len(classes)]]
                repeats = _product(flow, list(chosen[len(dims[at[0]]):])) if len(at) == 1 else 1
            if len(at) != 1:
                raise _NoPair(f"the whole keys or values '{producer.name}' meet the local heads at '{consumer}' "
                              "before they are repeated to the query heads")
            narrows.append(HeadNarrow(consumer, producer.name, at[0] - len(dims), repeats))
    return whole_only, tuple(narrows)


def _groups_heads(node: fx.Node) -> bool:
    """Whether ``node`` is an attention that shares each key/value head among a group of query heads (enable_gqa)."""
    rule = rule_of(node, {}) if node.op == "call_function" else None
    return rule is not None and rule.flow is Flow.SDPA and bool(SDPA_GQA.read(node))


def _dropouts(flow: FeatureFlow, names: list[str], chosen: tuple[int, ...],
              whole_only: set[str]) -> tuple[HeadDropout, ...]:
    """The group's dropouts (``names``) on split values, and the dim of each where the split factor is outermost."""
    targets = [flow.factors.find(leaf) for leaf in chosen]
    found = []
    for name in (name for name in names if name not in whole_only):
        dims = _dim_classes(flow, flow.values[name])
        at = [i for i, classes in enumerate(dims) if classes[:len(targets)] == targets]
        if len(at) != 1:
            raise _NoPair(f"dropout '{name}' is applied where the split heads are not the outer part of one dim; "
                          "each rank could not draw its part of the single-device mask")
        found.append(HeadDropout(name, at[0] - len(dims)))
    return tuple(found)


def _shape_edits(flow: FeatureFlow, uses: list[ShapeUse], chosen: tuple[int, ...],
                 whole_only: set[str] = frozenset()) -> tuple[ShapeEdit, ...]:
    """Each argument of the group's shape ``uses`` whose dim holds the chosen heads, unless it is read at run
    time (already local) or shapes a value that stays whole on every rank (``whole_only``)."""
    factors = flow.factors
    targets = {factors.find(leaf) for leaf in chosen}

    def held(factor_ids) -> set[int]:
        return {factors.find(leaf) for f in factor_ids for leaf in factors.leaves(f)} & targets

    edits = []
    for use in (u for u in uses if u.node_name not in whole_only):
        for dim, item in zip(use.dims, use.items):
            holds = held(p.factor for p in dim if p.factor is not None)
            if not holds or item.size is None or held(item.local):
                continue
            if holds != targets:
                raise _NoPair(f"'{use.node_name}' splits the heads that are divided across ranks")
            if item.location is None:
                raise _NoPair(f"the size of a head dim in '{use.node_name}' is computed where tpfx cannot change it")
            edits.append(ShapeEdit(item.location[0], item.location[1], item.literal))
    return tuple(edits)


def _paths(sites: list[Site]) -> str:
    return ", ".join(f"'{site.module_path}'" for site in sites)
