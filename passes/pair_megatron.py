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
falls back to column-plus-gather, and the record says why. A tensor from outside the pair that holds
the split factor in full (an ALiBi bias of every head added to the scores) is narrowed to the
rank's part where the pair reads it (:class:`HeadNarrow` with a ``block``), and one computed from
learned parameters has its gradient summed over the group (:class:`ReplicatedRead`).

A fused projection cut into unequal pieces gets a layout of pieces, each split or kept whole::

    Pair(columns=(qkv site,), column_layouts=([4*, 8 | 8 | 8],), ...)   # multi-query: k and v kept whole
    Pair(columns=(qkv site,), column_layouts=([2*, 2, 8 | 2*, 8 | 2*, 8],), ...)  # 2 kv heads, tp=2
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch.fx as fx
import torch.nn as nn

from tpfx.passes.find_sites import Site, SiteFinding
from tpfx.passes.graph_view import functional_linear, parameter_shapes
from tpfx.passes.factors import (CutItem, CutUse, Dim, FeatureLayout, FullSize, OutsideOperand, ShapeEdit, ShapeUse, Size,
                                 SizeRead, Value)
from tpfx.errors import ShardingError
from tpfx.passes.feature_flow import FeatureFlow, LinearCall, LinearOf, analyze_feature_flow, module_linears
from tpfx.passes.module_hooks import hooks_keep_pair_whole, module_hooks
from tpfx.passes.ops import SDPA_GQA, Flow, Kind, dropout_probability, is_python_value, kind_of, rule_of

_FFN_ROLES = ("fc1", "up")


@dataclass(frozen=True)
class HeadNarrow:
    """Where whole (replicated) grouped-query keys or values, repeated to every query head, meet the
    queries' local heads: ``producer``'s dim ``dim`` (counted from the end) is narrowed to this
    rank's heads before ``consumer`` reads it.

    With ``block``, ``producer`` is a full-size tensor from outside the pair (an ALiBi bias holding
    every head, a learned scale over all of d_ff) that ``consumer`` combines element by element with
    the rank's part: every block of ``block`` elements along ``dim`` (the split factor and what is
    inner to it in that dim) is narrowed to the rank's part, and a broadcast dim is kept whole."""

    consumer: str
    producer: str
    dim: int
    block: int | None = None  # narrow each block of this many elements (a full-size tensor from outside the pair)
    repeats: int = 1  # > 1: the consumer (SDPA with enable_gqa) repeats each head; repeat it first, then narrow

    def __post_init__(self) -> None:
        if self.dim >= 0 or (self.block is not None and self.block < 1):
            raise ValueError(f"narrow of {self.producer} for {self.consumer}: dim {self.dim} must count from the "
                             f"end (< 0) and block {self.block} be positive")


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
    full_sizes: tuple[FullSize, ...] = ()  # size reads of the split dims used where the full size is meant
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
        # a parameter of the model itself has no owner path: its own name says which it is
        columns = ", ".join(f"{s.module_path or s.weight_name} {layout.describe()}"
                            for s, layout in zip(self.columns, self.column_layouts))
        return f"{columns} -> {self.row_module_path or self.row_weight_name} {self.row_layout.describe()}"


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
    column_keys = {site.weight_name or site.module_path for site in finding.sites}
    pairs, fallbacks = [], []
    for group, sites in groups.items():
        try:
            pair = _pair_group(flow, records[group], sites, tp, index)
            if (row := pair.row_weight_name or pair.row_module_path) in column_keys:
                raise _NoPair(f"the linear {_paths(sites)} reaches, '{row}', is itself a column site; "
                              "it cannot also be row-parallel")
            pairs.append(pair)
        except _NoPair as why:
            fallbacks.append(Fallback(tuple(sites), str(why)))
    return Pairing(tuple(pairs), tuple(fallbacks))


def map_pairing(gm: fx.GraphModule, pairing: Pairing, *, tp: int, form: str = "") -> Pairing:
    """Map a program's pairing onto another trace of it (another call form) by its linears' names.

    Nothing is decided again: each pair's column and row linears are found in ``gm`` by module path or
    weight name, and the factor the program split is read off the pair's row layout. What is this
    trace's own is derived for that choice: the shape arguments, size reads, narrows and dropouts
    between the pair's linears (node names differ between traces). The fallbacks are kept as they are.

    Args:
        gm: the other trace (full-size linears, like the program's own before it was sharded).
        pairing: the program's pairing (its plan's).
        tp: the tensor-parallel degree.
        form: names the call form in messages.

    Returns:
        The pairing of ``gm``: the same pairs (keys and layouts), with ``gm``'s node names and facts.

    Raises:
        ShardingError: ``gm`` uses a linear of a pair differently from the program's trace (one line, naming
            the pair and why).
    """
    linear_of = graph_linears(gm)
    index = _GraphIndex.of(gm, linear_of)
    traced = [(pair, _traced_columns(pair, index, form)) for pair in pairing.pairs]
    traced = [(pair, columns) for pair, columns in traced if columns]  # a form that does not call a pair leaves it
    flow = analyze_feature_flow(gm, [site.node_name for _, columns in traced for site in columns], linear_of=linear_of)
    records = _records_by_group(flow, index)
    for group, reads in _replicated_reads(gm, flow).items():
        records[group].reads = reads
    pairs = []
    for pair, columns in traced:
        try:
            pairs.append(_mapped_pair(flow, records, pair, columns, tp, index))
        except _NoPair as why:
            raise ShardingError(f"call form {form} uses the linears of pair {pair.describe()} differently from the "
                                f"form the program was built with: {why}; build the program with this call form") from None
    return Pairing(tuple(pairs), pairing.fallbacks)


def _traced_columns(pair: Pair, index: _GraphIndex, form: str) -> list[Site]:
    """The pair's column sites, each at its one application in this trace ([] when the trace calls none)."""
    found = []
    for site in pair.columns:
        calls = index.calls.get(site.weight_name or site.module_path, [])
        if len(calls) > 1:
            raise ShardingError(f"call form {form} applies '{site.module_path or site.weight_name}' {len(calls)} times, "
                                "the program's once; build the program with this call form")
        found += [replace(site, node_name=calls[0][0].name)] if calls else []
    if found and len(found) != len(pair.columns):
        raise ShardingError(f"call form {form} applies only some of the column linears of pair {pair.describe()}; "
                            "build the program with this call form")
    return found


def _mapped_pair(flow: FeatureFlow, records: defaultdict[int, _GroupRecords], pair: Pair, columns: list[Site],
                 tp: int, index: _GraphIndex) -> Pair:
    """``pair`` in this trace: its columns' one group, which reaches the pair's row linear, with the split the
    program chose (from the row layout); its layouts must come out as the program's."""
    groups = {flow.group_of(flow.root_groups[site.node_name]) for site in columns}
    if len(groups) != 1:
        raise _NoPair("its column linears' outputs no longer meet")
    group = records[groups.pop()]
    if group.poisoned:
        raise _NoPair(group.poisoned[0])
    row_node, row, row_dim = _partner(group, columns, index)
    if row.key != (pair.row_weight_name or pair.row_module_path):
        raise _NoPair(f"their values reach '{row.key}', not '{pair.row_weight_name or pair.row_module_path}'")
    leaves = _row_leaves(flow, row_dim, row, columns)
    chosen = _chosen_by_layout(flow, leaves, pair.row_layout, row.key)
    mapped = _pair_facts(flow, group, columns, tp, index, row_node, row, leaves, chosen)
    if mapped.column_layouts != pair.column_layouts:
        raise _NoPair(f"their layouts here are {[layout.describe() for layout in mapped.column_layouts]}")
    return mapped


def _chosen_by_layout(flow: FeatureFlow, leaves: list[int], layout: FeatureLayout, row: str) -> tuple[int, ...]:
    """The run of ``leaves`` that the program split: the one whose merge gives the row ``layout``, and that no
    op of this trace keeps from being split."""
    runs = [tuple(leaves[start:start + length]) for start in range(len(leaves))
            for length in range(1, len(leaves) - start + 1) if _merged(flow, leaves, start, length) == layout]
    if not runs:
        raise _NoPair(f"the input of '{row}' is laid out {[flow.factors.sizes[leaf] for leaf in leaves]}, not "
                      f"{layout.describe()}")
    for run in runs:
        blocked = [flow.factors.why_blocked(leaf) for leaf in run if flow.factors.why_blocked(leaf)]
        if not blocked:
            return run
    raise _NoPair(f"the split factor {layout.describe()} of '{row}' cannot be split here: {blocked[0]}")


@dataclass(frozen=True)
class _GraphIndex:
    """What pairing looks up for every group, read off the graph once (a scan per group is quadratic)."""

    calls: dict[str, list[tuple[fx.Node, LinearCall]]]  # linear key -> its applications, in graph order
    weights: dict[str, object]  # linear key -> its weight parameter
    names_per_parameter: dict[int, int]  # id(parameter) -> how many qualified names reach it
    nodes: dict[str, fx.Node]  # node name -> node, in graph order
    order: dict[str, int]  # node name -> its position in the graph
    dropouts: set[str]  # the dropout nodes (an nn.Dropout module, F.dropout or aten.dropout)
    modules: dict[str, nn.Module]  # the graph module's named_modules(), for their hooks

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
        return cls(calls, weights, names, nodes, {name: i for i, name in enumerate(nodes)}, dropouts, modules)


@dataclass
class _GroupRecords:
    """What the feature flow recorded for one group: sorted out once, since a scan of every group's
    records for each group is quadratic in depth."""

    poisoned: list[str] = field(default_factory=list)  # why no pair can be formed, first first
    rows: list[tuple[str, str, Dim]] = field(default_factory=list)  # the linears the group's values reach
    shape_uses: list[ShapeUse] = field(default_factory=list)
    dropouts: list[str] = field(default_factory=list)  # the dropout nodes on the group's values, in graph order
    modules: list[str] = field(default_factory=list)  # the modules called on the group's values (their hooks matter)
    size_reads: list[SizeRead] = field(default_factory=list)
    outside: list[OutsideOperand] = field(default_factory=list)  # tensors from outside the group's values meet
    reads: list[ReplicatedRead] = field(default_factory=list)  # see _replicated_reads
    cut_uses: list[CutUse] = field(default_factory=list)  # split sizes and slice bounds of fused projections


def _records_by_group(flow: FeatureFlow, index: _GraphIndex) -> defaultdict[int, _GroupRecords]:
    records: defaultdict[int, _GroupRecords] = defaultdict(_GroupRecords)
    for group, why in flow.poisoned.items():
        records[flow.group_of(group)].poisoned.append(why)
    for group, rows in flow.rows.items():
        records[flow.group_of(group)].rows.extend(rows)
    for use in flow.shape_uses:
        records[flow.group_of(use.group)].shape_uses.append(use)
    for read in flow.size_reads:
        records[flow.group_of(read.group)].size_reads.append(read)
    for name in sorted(index.dropouts & flow.values.keys(), key=index.order.__getitem__):
        records[flow.group_of(flow.values[name].group)].dropouts.append(name)
    for name, value in flow.values.items():
        if index.nodes[name].op == "call_module":
            records[flow.group_of(value.group)].modules.append(str(index.nodes[name].target))
    for met in flow.outside:
        records[flow.group_of(met.group)].outside.append(met)
    for use in flow.cut_uses:
        records[flow.group_of(use.group)].cut_uses.append(use)
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
    if why := hooks_keep_pair_whole(index.modules, "" if row.functional else row.key, records.modules):
        raise _NoPair(why)
    leaves = _row_leaves(flow, row_dim, row, sites)
    return _pair_facts(flow, records, sites, tp, index, row_node, row, leaves, _choose_heads(flow, leaves, row.key, tp))


def _row_leaves(flow: FeatureFlow, row_dim: Dim, row: LinearCall, sites: list[Site]) -> list[int]:
    """The leaf factors of the partner's input features, which must be exactly the group's features."""
    leaves = _leaf_factors(flow, row_dim, row.key)
    if _product(flow, leaves) != row.in_features:
        raise _NoPair(f"the input of '{row.key}' is not exactly the features of {_paths(sites)}")
    return leaves


def _pair_facts(flow: FeatureFlow, records: _GroupRecords, sites: list[Site], tp: int, index: _GraphIndex,
                row_node: fx.Node, row: LinearCall, leaves: list[int], chosen: tuple[int, ...]) -> Pair:
    """The pair of ``sites`` and its partner ``row`` with the factor ``chosen`` split: the layouts that follow
    from the choice, and this trace's facts between the linears (shape edits, narrows, dropouts, size reads)."""
    layouts = tuple(_layout(flow, flow.roots[site.node_name], chosen, site) for site in sites)
    if all(layout.whole for layout in layouts):
        raise _NoPair(f"no factor of {_paths(sites)} lines up with the split input of '{row.key}'")
    if why := _hooks_skipped_by_whole_pieces(sites, layouts, index, tp):
        raise _NoPair(why)
    whole_only, narrows = _narrows(flow, chosen, sites, layouts, index) if len(chosen) > 1 else (set(), ())
    narrows += _outside_narrows(flow, records.outside, chosen, whole_only)
    edits = _shape_edits(flow, records.shape_uses, chosen, whole_only, tp=tp) + _cut_edits(flow, records.cut_uses, chosen, tp)
    weight_shape = (row.out_features, row.in_features) if row.layout == "out_in" else (row.in_features, row.out_features)
    return Pair(
        kind="ffn" if all(site.role in _FFN_ROLES for site in sites) else "attention",
        columns=tuple(sites), column_layouts=layouts,
        row_module_path=(row.key.rpartition(".")[0] or row.key) if row.functional else row.key,
        row_node_name=row_node.name, row_weight_shape=weight_shape,
        row_layout=_layout_of(flow, leaves, chosen, row.key), shape_edits=edits,
        shard_size=_product(flow, list(chosen)), row_weight_name=row.key if row.functional else "",
        row_bias_name=row.bias, row_weight_layout=row.layout, narrows=narrows,
        dropouts=_dropouts(flow, records.dropouts, chosen, whole_only),
        full_sizes=_full_sizes(flow, records, chosen, whole_only, index), replicated_reads=tuple(records.reads))


def _hooks_skipped_by_whole_pieces(sites: list[Site], layouts: tuple[FeatureLayout, ...], index: _GraphIndex,
                                   tp: int) -> str:
    """Why a fused module linear with pieces kept whole cannot pair: the rewrite applies its weight in the graph
    (``F.linear``, the whole pieces' rows passed through an all-reduce of their gradient), not by calling
    the module, so the module's hooks would not run; "" when no such module has hooks."""
    for site, layout in zip(sites, layouts):
        module = index.modules.get(site.module_path) if not site.functional else None
        hooks = module_hooks(module) if module is not None and layout.whole_local_ranges(tp) else []
        if hooks:
            return (f"'{site.module_path}' has a {hooks[0].describe()}, and its pieces {layout.describe()} kept whole "
                    "at this tp are applied as F.linear in the graph, which would skip it; remove the hook or use a "
                    "tp that divides the key/value heads")
    return ""


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
    pieces = _pieces(flow, root, chosen, site.module_path)
    if len(pieces) == 1 or all(piece.whole for piece in pieces):
        # not held whole: the heads are made by an expand after this linear (grouped-query k/v repeated to
        # the query heads). Every rank keeps all of it; what is split is the repeated heads (see _narrows)
        return pieces[0] if len(pieces) == 1 else FeatureLayout(_leaf_sizes(flow, root), None)
    return FeatureLayout.of_segments(tuple(pieces))


def _pieces(flow: FeatureFlow, fid: int, chosen: tuple[int, ...], where: str) -> list[FeatureLayout]:
    """The layout of factor ``fid`` as contiguous pieces, in order: one when it is not cut (``[3, 4*, 32]``),
    else one per piece it is cut into (a fused ``[q | k | v]``: ``[4*, 8]``, ``[8]``, ``[8]``), each with its
    own split factor or kept whole. A cut factor is a piece of the rows when it is outermost: its pieces
    times the factors inside it are contiguous blocks. ``where`` names the linear or node in messages."""
    leaves = flow.factors.leaves(fid)
    positions = _run_positions(flow, leaves, chosen)
    if len(positions) > 1:
        raise _NoPair(f"'{where}' holds the sharded factor {len(positions)} times in its layout "
                      f"{list(_leaf_sizes(flow, fid))}; its heads do not line up with the next linear's input")
    if positions:
        return [_merged(flow, leaves, positions[0], len(chosen))]
    cut = [leaf for leaf in leaves if leaf in flow.factors.segments]
    split_inside = [leaf for leaf in cut if any(not p.whole for piece in flow.factors.segments[leaf]
                                                for p in _pieces(flow, piece, chosen, where))]
    if not split_inside:
        return [FeatureLayout(_leaf_sizes(flow, fid), None)]
    if split_inside != [leaves[0]]:
        raise _NoPair(f"'{where}' is cut into pieces inside its layout {list(_leaf_sizes(flow, fid))}, not "
                      "along its outermost factor; a rank's rows of each piece are not blocks of the weight")
    inner = tuple(_leaf_sizes(flow, fid)[1:])
    return [FeatureLayout(layout.factor_sizes + inner, layout.shard_axis)
            for piece in flow.factors.segment_leaves(leaves[0]) for layout in _pieces(flow, piece, chosen, where)]


def _row_pieces(flow: FeatureFlow, fid: int) -> set[int]:
    """The pieces :func:`_pieces` lays out for factor ``fid``: those of its outermost factor's cut, nested."""
    found: set[int] = set()
    for piece in flow.factors.segments.get(flow.factors.leaves(fid)[0], ()):
        found |= {piece} | _row_pieces(flow, piece)
    return found


def _leaf_sizes(flow: FeatureFlow, fid: int) -> tuple[int, ...]:
    return tuple(flow.factors.sizes[leaf] for leaf in flow.factors.leaves(fid))


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
    # the pieces of a fused projection kept whole start where the split or the slice hands them out (a piece
    # of a head, such as rotary's halves, is no piece of the rows: its value still holds the split heads)
    rows = set().union(*(_row_pieces(flow, flow.roots[site.node_name]) for site in sites))
    whole_pieces = {name for name, piece in flow.entries.items()
                    if piece in rows and all(p.whole for p in _pieces(flow, piece, chosen, name))}

    def reached(columns: list[str]) -> set[str]:
        seen, frontier = set(columns), list(columns)
        while frontier:
            for user in index.nodes[frontier.pop()].users:
                if user.name not in seen and user.name in flow.region and user.name not in whole_pieces:
                    seen.add(user.name)
                    frontier.append(user.name)
        return seen

    sharded = reached([s.node_name for s, layout in zip(sites, layouts) if not layout.whole])
    whole_only = reached([s.node_name for s, layout in zip(sites, layouts) if layout.whole] + sorted(whole_pieces))
    whole_only -= sharded
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
            narrows.append(HeadNarrow(consumer, producer.name, at[0] - len(dims), repeats=repeats))
    return whole_only, tuple(narrows)


def _outside_narrows(flow: FeatureFlow, met: list[OutsideOperand], chosen: tuple[int, ...],
                     whole_only: set[str]) -> tuple[HeadNarrow, ...]:
    """The full-size tensors from outside the pair that meet the split factor, each narrowed to the rank's part.

    Where a dim an outside tensor meets holds the split factor (a run of leaves), each rank reads
    its part of every block of that factor and what is inner to it in the dim; the sizes inner to it
    must be known while tracing. A dim without the split factor is the same on every rank, and so
    is every value on the whole keys' and values' side (``whole_only``).
    """
    targets = [flow.factors.find(leaf) for leaf in chosen]
    narrows: dict[tuple[str, str], HeadNarrow] = {}
    for use, dim, parts in ((m, d, p) for m in met if m.consumer not in whole_only for d, p in m.meets):
        leaves = _leaf_parts(flow, parts)  # (class or None for a batch size, size), outermost first
        classes = [cls for cls, _ in leaves]
        at = [i for i in range(len(classes) - len(targets) + 1) if classes[i:i + len(targets)] == targets]
        if not at and set(targets).isdisjoint(classes):
            continue  # the split factor is not in this dim: the tensor is the same on every rank there
        inner = [size for _, size in leaves[at[0]:]] if len(at) == 1 else []
        if not inner or not all(size.is_int for size in inner):
            raise _NoPair(f"'{use.consumer}' combines the tensor '{use.producer}' from outside the pair (full size, or "
                          f"of a shape not known while tracing) with the split factor along dim {dim}, where a rank's "
                          "part is not one run of each block of a size known while tracing; give the heads a dim "
                          "of their own there")
        narrow = HeadNarrow(use.consumer, use.producer, dim, block=math.prod(size.coeff for size in inner))
        if narrows.setdefault((use.consumer, use.producer), narrow) != narrow:
            raise _NoPair(f"'{use.consumer}' meets the split factor in two dims of the tensor '{use.producer}' "
                          "from outside the pair; give the heads a dim of their own there")
    return tuple(narrows.values())


def _leaf_parts(flow: FeatureFlow, dim: Dim) -> list[tuple[int | None, Size]]:
    """A dim's parts, feature factors expanded to their leaves: (leaf class, size), or (None, size) for a batch part."""
    parts: list[tuple[int | None, Size]] = []
    for part in dim:
        if part.factor is None:
            parts.append((None, part.size))
        else:
            leaves = flow.factors.leaves(part.factor)
            parts += [(flow.factors.find(leaf), Size(flow.factors.sizes[leaf])) for leaf in leaves]
    return parts


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
                 whole_only: set[str] = frozenset(), *, tp: int = 1) -> tuple[ShapeEdit, ...]:
    """Each argument of the group's shape ``uses`` whose dim holds the chosen heads, unless it is read at run
    time (already local) or shapes a value that stays whole on every rank (``whole_only``); and each whose
    dim holds a fused projection cut into pieces some of which are split (``view(b, s, H + 2 * KV, Dh)``)."""
    factors = flow.factors
    targets = {factors.find(leaf) for leaf in chosen}

    def held(factor_ids) -> set[int]:
        return {factors.find(leaf) for f in factor_ids for leaf in factors.leaves(f)} & targets

    edits = []
    for use in (u for u in uses if u.node_name not in whole_only):
        for dim, item in zip(use.dims, use.items):
            holds = held(p.factor for p in dim if p.factor is not None)
            kept = None if holds else _kept_of_pieces(flow, dim, chosen, use.node_name)
            if (not holds and kept is None) or item.size is None or held(item.local):
                continue
            if kept is not None:
                if item.location is None or item.local:
                    raise _NoPair(f"the size of a fused projection's pieces in '{use.node_name}' is computed where "
                                  "tpfx cannot change it")
                edits.append(ShapeEdit(item.location[0], item.location[1], item.literal, kept=kept))
                continue
            if holds != targets:
                raise _NoPair(f"'{use.node_name}' splits the heads that are divided across ranks")
            if item.location is None:
                raise _NoPair(f"the size of a head dim in '{use.node_name}' is computed where tpfx cannot change it")
            edits.append(ShapeEdit(item.location[0], item.location[1], item.literal))
    return tuple(edits)


def _full_sizes(flow: FeatureFlow, records: _GroupRecords, chosen: tuple[int, ...], whole_only: set[str],
                index: _GraphIndex) -> tuple[FullSize, ...]:
    """The group's size reads of a split dim, and the uses of each that need the single-device size.

    A rank reads its local size of a split dim. A shape argument of this pair's region (a view of a
    local tensor) needs exactly that; every other use (arithmetic with a tensor, a tensor made to that
    size, an output, a shape argument outside the region) needs the single-device size.

    Raises:
        _NoPair: a read covers part of the split factors, is a stride, or is of a dim tpfx cannot place.
    """
    targets = {flow.factors.find(leaf) for leaf in chosen}
    local_consumers = _local_shape_consumers(flow, records.shape_uses, targets, whole_only)
    found = []
    for read in records.size_reads:
        node = index.nodes[read.node_name]
        if node.args[0].name in whole_only:  # whole (replicated) keys or values: full size on every rank
            continue
        split = _split_items(flow, read, targets, node)
        if split is None or split:
            rank = len(read.elements) if read.tuple_read and read.elements is not None else 0
            chain, uses = _size_uses(node, split, rank, local_consumers, index.modules)
            if uses and split is None:
                raise _NoPair(f"size read '{node.name}' ({node.format_node()}) is of a dim of '{node.args[0].name}' "
                              "that tpfx cannot place (unknown rank); pass example_inputs= so that it has shapes")
            if uses:
                found.append(FullSize(node.name, tuple(split) if rank else (), rank, chain, uses))
    return tuple(found)


def _local_shape_consumers(flow: FeatureFlow, uses: list[ShapeUse], targets: set[int], whole_only: set[str]) -> set[str]:
    """The shape uses of the region that need the rank-local size of what they read.

    A shape argument read off a split dim is local at run time. Where it shapes a dim that holds the
    split factor too (``view(b, t, k.size(1), dh)``) that is what the rank needs; where it shapes a dim
    without it (the repeats of ``k.repeat_interleave(heads // k.size(1), 1)``, the same on every
    rank) it needs the single-device size, so its consumer is left to :class:`FullSize`.

    Raises:
        _NoPair: one op reads a split size for both kinds of dim (it cannot be given both values).
    """
    def held(factor_ids) -> bool:
        return bool({flow.factors.find(leaf) for f in factor_ids for leaf in flow.factors.leaves(f)} & targets)

    local = set()
    for use in (u for u in uses if u.node_name not in whole_only):
        kinds = {held(p.factor for p in dim if p.factor is not None)
                 for dim, item in zip(use.dims, use.items) if held(item.local)}
        if kinds == {True, False}:
            raise _NoPair(f"'{use.node_name}' uses a size read off the split heads both as a head count and as "
                          "a count that is the same on every rank; compute the two from separate reads")
        if kinds != {False}:
            local.add(use.node_name)
    return local


def _split_items(flow: FeatureFlow, read: SizeRead, targets: set[int], node: fx.Node) -> list[int] | None:
    """Which numbers of a size read cover the split factors (all of them); None when the read is not placed."""
    if read.elements is None:
        return None
    split = []
    for position, factors in enumerate(read.elements):
        held = {flow.factors.find(leaf) for f in factors for leaf in flow.factors.leaves(f)} & targets
        if held and (held != targets or read.stride):
            what = "a stride across" if read.stride else "part of"
            raise _NoPair(f"size read '{node.name}' ({node.format_node()}) is {what} the split heads of "
                          f"'{node.args[0].name}'; its rank-local value cannot stand for the single-device one")
        if held:
            split.append(position)
    return split


def _size_uses(read: fx.Node, split: list[int] | None, rank: int, local_consumers: set[str],
               modules: dict[str, nn.Module]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Follow a read (of a whole shape of ``rank`` items) through size arithmetic: (the chain of
    arithmetic, the uses that need the full size)."""
    chain: list[str] = []
    uses: list[tuple[str, str]] = []
    frontier = [read]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if node is read and rank and _item_of(user, rank) not in (None, *split):
                continue  # an item of the shape that is not split: the same on every rank
            if user.name in local_consumers:
                continue
            if is_python_value(user, modules):
                if user.name not in chain:
                    chain.append(user.name)
                    frontier.append(user)
            else:
                uses.append((node.name, user.name))
    return tuple(chain), tuple(uses)


def _item_of(node: fx.Node, rank: int) -> int | None:
    """The item (counted from the front) that a ``shape[i]`` node picks from a shape of ``rank`` items, else None."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)):
        return None
    return node.args[1] % rank


def _kept_of_pieces(flow: FeatureFlow, dim: Dim, chosen: tuple[int, ...], where: str) -> int | None:
    """For a dim holding a factor cut into pieces some of which are split: how much of the dim every rank
    keeps whole (the whole pieces times the factors beside them); None when the dim holds no such factor."""
    leaves = [leaf for part in dim if part.factor is not None for leaf in flow.factors.leaves(part.factor)]
    cut = [leaf for leaf in leaves if leaf in flow.factors.segments
           and not all(layout.whole for layout in _pieces(flow, leaf, chosen, where))]
    if not cut:
        return None
    if len(cut) > 1 or any(part.factor is None for part in dim):
        raise _NoPair(f"'{where}' shapes a fused projection's pieces together with batch dims or other pieces; "
                      "tpfx cannot make that size this rank's")
    beside = _product(flow, [leaf for leaf in leaves if leaf != cut[0]])
    return beside * sum(layout.size for layout in _pieces(flow, cut[0], chosen, where) if layout.whole)


def _cut_edits(flow: FeatureFlow, uses: list[CutUse], chosen: tuple[int, ...], tp: int) -> tuple[ShapeEdit, ...]:
    """The split sizes and slice bounds of fused projections cut into pieces, made this rank's: a bound that
    measures split pieces (and pieces kept whole) becomes ``split / tp + whole``."""
    edits = []
    for use in uses:
        for cut in use.items:
            local, kept = _span(flow, cut, chosen, tp, use.node_name)
            if local == cut.stop - cut.start:
                continue
            item = cut.item
            if item.location is None or item.local:
                raise _NoPair(f"the size of a piece of a fused projection in '{use.node_name}' is computed where "
                              "tpfx cannot change it")
            edits.append(ShapeEdit(item.location[0], item.location[1], item.literal, kept=cut.sign * kept))
    return tuple(edits)


def _span(flow: FeatureFlow, cut: CutItem, chosen: tuple[int, ...], tp: int, where: str) -> tuple[int, int]:
    """How many of the positions ``cut`` measures a rank holds, and how many of them are in pieces every rank
    keeps whole."""
    offset, local, kept = 0, 0, 0
    for piece in flow.factors.segment_leaves(cut.factor):
        size = flow.factors.sizes[piece]
        if cut.start <= offset and offset + size <= cut.stop:
            layouts = _pieces(flow, piece, chosen, where)
            local += sum(layout.local_size(tp) for layout in layouts)
            kept += sum(layout.size for layout in layouts if layout.whole)
        offset += size
    return local, kept


def _paths(sites: list[Site]) -> str:
    return ", ".join(f"'{site.module_path}'" for site in sites)
