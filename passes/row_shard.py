"""Rewrite: Megatron's pairing, a column-parallel linear with no gather and a row-parallel linear.

before::

    qkv = self.qkv_proj(x)                                     # Linear(d, 3d)
    ...                                                        # attention over H heads
    y = self.out_proj(out)                                     # Linear(d, d)

after (rank r of tp)::

    copy_to_tp = tpfx.collectives.copy_to_tp(x, 'tp:0-1')      # identity fwd / all-reduce bwd
    qkv = self.qkv_proj(copy_to_tp)                            # whole heads of q, k and v: 3d/tp rows
    ...                                                        # attention over H/tp heads (passes/feature_flow.py, passes/localize_shapes.py)
    out_proj = self.out_proj(out)                              # RowParallelLinear: d/tp input columns, no bias
    reduce_from_tp = tpfx.collectives.reduce_from_tp(out_proj, 'tp:0-1')   # all-reduce fwd / identity bwd
    out_proj_bias = self.out_proj.bias
    y = reduce_from_tp + out_proj_bias                         # the bias once, after the sum

In an exported (ATen) graph a linear is an op on a parameter: the op stays and its parameters are
replaced by this rank's parts (rows or columns as the weight is stored), and a row linear's bias is
taken out of its op (``addmm(b, x, w)`` becomes ``mm(x, w)``) and added after the reduce.

A tensor from outside the pair that holds every head (an ALiBi bias added to the scores) is narrowed
to the rank's heads where the pair reads it; a learned one first passes a copy-to, so that its
gradient, each rank's part of it, is summed over the group::

    scores = matmul + head_bias                                # (B, H, T, T) + (H, 1, T)
    # after: copy_to_tp = copy_to_tp(head_bias, 'tp:0-1')
    #        rank_part = rank_part(copy_to_tp, -3, 'tp:0-1', block=4); scores = matmul + rank_part

A fused projection whose pieces are partly kept whole (multi-query keys and values) holds this rank's
rows of the split pieces and all rows of the whole ones; the whole rows' weight gradient is
all-reduced (see :func:`_reduce_whole_rows`).

Sites that could not be paired keep the column-plus-gather rewrite of :mod:`tpfx.passes.column_shard`.
As there, parameters and graphs are separate steps, so that further call forms reuse the shards: the
parameters are sharded once from the plan (:func:`tpfx.passes.plan.megatron_plan`,
:func:`tpfx.passes.shard_parameters.shard_parameters`), :func:`rewrite_pair_graph` rewrites one graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tpfx.passes.column_shard import insert_collectives
from tpfx.passes.find_sites import SiteFinding
from tpfx.passes.graph_view import CALL_FORM, FunctionalLinear, LinearApplication
from tpfx.passes.factors import FeatureLayout
from tpfx.passes.localize_shapes import localize_shapes, restore_full_sizes
from tpfx.passes.ops import SDPA_GQA, function_rule, rule_of
from tpfx.passes.node_placements import Collective, NodePlacement, Output, annotate_linears, placed_linears
from tpfx.passes.pair_megatron import HeadDropout, HeadNarrow, Pairing, ReplicatedRead, is_attention_op, map_pairing
from tpfx.passes.plan import Plan, megatron_plan
from tpfx.passes.shard_parameters import shard_parameters
from tpfx.collectives import copy_to_tp, reduce_from_tp
from tpfx.errors import ShardingError
from tpfx.rank_parts import (attention_rank_part, call_with_parameters, dropout_module_rank_part, dropout_rank_part,
                             rank_part)


@dataclass(frozen=True)
class PairShardResult:
    """The rewritten module, the collective nodes inserted and the nodes whose shapes became local."""

    gm: fx.GraphModule
    collective_nodes: tuple[str, ...]
    localized_nodes: tuple[str, ...]


def rewrite_pair_graph(gm: fx.GraphModule, pairing: Pairing, *, tp: int, group: str) -> PairShardResult:
    """Insert the collectives of every pair (and fallback) into ``gm.graph`` and localize its shapes.

    The collectives at the linears are where their annotations (``node.meta["tpfx"]``, written from the
    plan by :func:`tpfx.passes.node_placements.annotate_linears`) put them; ``pairing`` holds this
    trace's own facts between them (shape edits, narrows, dropouts, size reads). Only the graph
    changes: the caller recompiles.
    """
    inserted: list[str] = []
    by_pair: dict[str, list[tuple[LinearApplication, NodePlacement]]] = {}
    for application, placement in placed_linears(gm):  # once: rewrites keep node identities
        by_pair.setdefault(placement.pair, []).append((application, placement))
    for pair in pairing.pairs:
        placed = by_pair.get(pair.row_weight_name or pair.row_module_path, [])
        inserted += _copy_inputs(gm, [a for a, p in placed if p.before is Collective.COPY_TO], group)
        inserted += _copy_outputs(gm, [a for a, p in placed if p.output is Output.REPLICATED], group)
        inserted += _reduce_output(gm, [a for a, p in placed if p.after is Collective.REDUCE], group)
        for application, placement in placed:
            if placement.whole_rows is not None:
                inserted += _reduce_whole_rows(gm, [application], placement.whole_rows, tp, group)
    # full sizes first: a use that is another pair's shape argument is then divided from the full size
    localized = restore_full_sizes(gm, tuple(f for p in pairing.pairs for f in p.full_sizes), tp=tp)
    localized += localize_shapes(gm, tuple(e for p in pairing.pairs for e in p.shape_edits), tp=tp)
    nodes = {node.name: node for node in gm.graph.nodes}
    narrows = [n for p in pairing.pairs for n in p.narrows]
    localized += _narrow_to_rank_heads(gm, nodes, [n for n in narrows if n.block is None], group)
    # before the dropouts: an attention drawn per rank is rebuilt from its arguments, copies included
    copies = sum_replicated_gradients(gm, nodes, [r for p in pairing.pairs for r in p.replicated_reads], group)
    inserted += [copy.name for copy in copies.values()]
    localized += _narrow_outside_tensors(gm, nodes, [n for n in narrows if n.block is not None], copies, group)
    localized += draw_dropouts_per_rank(gm, nodes, [d for p in pairing.pairs for d in p.dropouts], group)
    gathered = insert_collectives(gm, group=group)
    ordered = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    names = sorted(inserted + list(gathered.collective_nodes), key=ordered.__getitem__)
    return PairShardResult(gm, tuple(names), localized)


def _narrow_to_rank_heads(gm: fx.GraphModule, nodes: dict[str, fx.Node], narrows: list[HeadNarrow],
                          group: str) -> tuple[str, ...]:
    """Narrow whole, repeated keys and values to this rank's heads where the local queries read them."""
    inserted = []
    for narrow in narrows:
        consumer, producer = nodes[narrow.consumer], nodes[narrow.producer]
        with gm.graph.inserting_before(consumer):
            whole = producer
            if narrow.repeats > 1:  # kv head h // repeats for query head h, as the grouped attention reads it
                whole = gm.graph.call_function(torch.repeat_interleave, (producer, narrow.repeats), {"dim": narrow.dim})
            part = gm.graph.call_function(rank_part, (whole, narrow.dim, group))
        consumer.replace_input_with(producer, part)
        inserted.append(part.name)
    return tuple(inserted)


def sum_replicated_gradients(gm: fx.GraphModule, nodes: dict[str, fx.Node], reads: list[ReplicatedRead],
                              group: str) -> dict[str, fx.Node]:
    """A copy-to (all-reduce backward) where an op on local heads (or, with sequence parallelism, on the
    rank's sequence slice) reads a whole tensor that needs a gradient.

    One copy per tensor, before its first reader; a module call reading its own parameters (``nn.RMSNorm``
    on q) becomes :func:`tpfx.rank_parts.call_with_parameters` of the module with copies of them.
    Returns the copies by what they copy (a producer's name, or ``module.parameter``).
    """
    copies: dict[str, fx.Node] = {}
    for read in reads:
        consumer = nodes[read.consumer]
        if read.producer and read.producer not in copies:
            with gm.graph.inserting_before(consumer):
                copies[read.producer] = gm.graph.call_function(copy_to_tp, (nodes[read.producer], group))
        if read.producer:
            consumer.replace_input_with(nodes[read.producer], copies[read.producer])
            continue
        path = str(consumer.target)
        with gm.graph.inserting_before(consumer):
            own = {name: gm.graph.call_function(copy_to_tp, (gm.graph.get_attr(f"{path}.{name}"), group))
                   for name, parameter in gm.get_submodule(path).named_parameters() if parameter.requires_grad}
            call = gm.graph.call_function(call_with_parameters, (gm.graph.get_attr(path), own, consumer.args,
                                                                 dict(consumer.kwargs)))
        consumer.replace_all_uses_with(call)
        gm.graph.erase_node(consumer)
        nodes[read.consumer] = call  # a later read of another tensor by the same op finds it
        copies.update({f"{path}.{name}": copy for name, copy in own.items()})
    return copies


def _narrow_outside_tensors(gm: fx.GraphModule, nodes: dict[str, fx.Node], narrows: list[HeadNarrow],
                            copies: dict[str, fx.Node], group: str) -> tuple[str, ...]:
    """Narrow full-size tensors from outside a pair (an ALiBi bias of every head) to this rank's part of them."""
    parts = []
    for narrow in narrows:
        consumer = nodes[narrow.consumer]
        source = copies.get(narrow.producer, nodes[narrow.producer])  # what the consumer reads now
        with gm.graph.inserting_before(consumer):
            part = gm.graph.call_function(rank_part, (source, narrow.dim, group), {"block": narrow.block})
        consumer.replace_input_with(source, part)
        parts.append(part.name)
    return tuple(parts)


def draw_dropouts_per_rank(gm: fx.GraphModule, nodes: dict[str, fx.Node], dropouts: list[HeadDropout],
                            group: str) -> tuple[str, ...]:
    """Each dropout on local heads (or on the rank's sequence slice) draws the whole tensor's mask and keeps
    this rank's part (tpfx.rank_parts)."""
    inserted = []
    for dropout in dropouts:
        node = nodes[dropout.node_name]
        with gm.graph.inserting_before(node):
            if node.op == "call_module":  # nn.Dropout: its p and mode are read when the program runs
                module = gm.graph.get_attr(str(node.target))
                drawn = gm.graph.call_function(dropout_module_rank_part, (node.args[0], module, dropout.dim, group))
            elif is_attention_op(node):  # an attention with dropout_p > 0
                query, key, value, *rest = node.args
                mask = rest[0] if rest else node.kwargs.get("attn_mask")
                causal = rest[2] if len(rest) > 2 else node.kwargs.get("is_causal", False)
                scale = rest[3] if len(rest) > 3 else node.kwargs.get("scale")
                p = rule_of(node, {}).dropout.p.read(node)
                drawn = gm.graph.call_function(attention_rank_part, (query, key, value, mask, p, causal, scale),
                                               {"dim": dropout.dim, "group": group, "enable_gqa": SDPA_GQA.read(node)})
            else:  # F.dropout(x, p, training) / aten.dropout(x, p, train): decided when it was traced
                arguments = rule_of(node, {}).dropout
                drawn = gm.graph.call_function(dropout_rank_part, (node.args[0], arguments.p.read(node),
                                                                   arguments.training.read(node), dropout.dim, group))
        node.replace_all_uses_with(drawn)
        gm.graph.erase_node(node)
        inserted.append(drawn.name)
    return tuple(inserted)


def _copy_inputs(gm: fx.GraphModule, calls: list[LinearApplication], group: str) -> list[str]:
    """One copy-to per distinct input of the pair's column linears (q, k, v of one x share one)."""
    copies: dict[fx.Node, fx.Node] = {}
    for node, data_index, _ in calls:
        source = node.args[data_index]
        if source not in copies:
            with gm.graph.inserting_before(node):
                copies[source] = gm.graph.call_function(copy_to_tp, (source, group))
        node.update_arg(data_index, copies[source])
    return [node.name for node in copies.values()]


def _copy_outputs(gm: fx.GraphModule, calls: list[LinearApplication], group: str) -> list[str]:
    """Copy-to after each whole (replicated) linear of a pair: its output gradient is a partial sum.

    Each rank uses the replicated k/v only for its own query heads; backward all-reduces the sum.
    """
    inserted = []
    for node, _, _ in calls:
        with gm.graph.inserting_after(node):
            copied = gm.graph.call_function(copy_to_tp, (node, group))
        node.replace_all_uses_with(copied, delete_user_cb=lambda user: user is not copied)
        inserted.append(copied.name)
    return inserted


def _reduce_whole_rows(gm: fx.GraphModule, calls: list[LinearApplication], layout: FeatureLayout, tp: int,
                       group: str) -> list[str]:
    """The rows of a fused projection's pieces that every rank keeps whole get their gradient all-reduced.

    before / after (``[q | k | v]`` with k and v whole; ``qkv`` holds q's local rows, then k's and v's)::

        qkv = self.qkv(copy_to_tp)
        w = torch.cat([narrow(self.qkv.weight, 0, 0, 16), copy_to_tp(narrow(self.qkv.weight, 0, 16, 16))])
        qkv = F.linear(copy_to_tp, w, <the bias alike>)

    Each rank's keys serve only its query heads, so their output gradient is a rank's share: the input's
    all-reduce (copy_to_tp before the linear) sums their part of the input gradient exactly once, and the
    weight rows' gradient is summed here. (An all-reduce after the pieces' output, as for a separate whole
    k/v linear, would count their part of the input gradient tp times: the input is all-reduced too.)
    """
    inserted: list[str] = []
    for node, data_index, functional in calls:
        if functional is None:  # a module: its weight and bias become operands of F.linear
            with gm.graph.inserting_before(node):
                weight = gm.graph.get_attr(f"{node.target}.weight")
                bias = gm.graph.get_attr(f"{node.target}.bias") if gm.get_submodule(str(node.target)).bias is not None else None
                linear = gm.graph.call_function(F.linear, (node.args[0], weight, bias))
            node.replace_all_uses_with(linear)
            gm.graph.erase_node(node)
            node, operands = linear, ((1, 0), (2, 0))
        else:
            rule = function_rule(node.target).linear
            operands = ((rule.weight, 0 if functional.layout == "out_in" else 1), (rule.bias, 0))
        for position, dim in operands:
            inserted += _reduce_rows_of(gm, node, position, dim, layout, tp, group)
    return inserted


def _reduce_rows_of(gm: fx.GraphModule, node: fx.Node, position: int | None, dim: int, layout: FeatureLayout, tp: int,
                    group: str) -> list[str]:
    """Replace the parameter that argument ``position`` of ``node`` reads (directly or through a transpose)
    with itself, the whole pieces' rows (along ``dim`` of the stored parameter) passed through copy_to_tp."""
    reader = node
    parameter = node.args[position] if position is not None and len(node.args) > position else None
    if isinstance(parameter, fx.Node) and parameter.op != "get_attr":  # a transposed weight: t(get_attr)
        reader, parameter = parameter, parameter.args[0]
    if not isinstance(parameter, fx.Node):
        return []
    blocks, start, inserted = [], 0, []
    with gm.graph.inserting_before(reader):
        for whole_start, whole_stop in (*layout.whole_local_ranges(tp), (layout.local_size(tp),) * 2):
            if whole_start > start:
                blocks.append(gm.graph.call_function(torch.narrow, (parameter, dim, start, whole_start - start)))
            if whole_stop > whole_start:
                part = gm.graph.call_function(torch.narrow, (parameter, dim, whole_start, whole_stop - whole_start))
                blocks.append(gm.graph.call_function(copy_to_tp, (part, group)))
                inserted.append(blocks[-1].name)
            start = whole_stop
        reduced = gm.graph.call_function(torch.cat, (blocks, dim))
    reader.replace_input_with(parameter, reduced)
    return inserted


def _reduce_output(gm: fx.GraphModule, calls: list[LinearApplication], group: str) -> list[str]:
    """All-reduce the row linear's partial sums (``calls``: its applications), then add its bias once."""
    inserted = []
    for node, _, functional in calls:
        bias = _take_bias(gm, node, functional)
        with gm.graph.inserting_after(node):
            reduced = gm.graph.call_function(reduce_from_tp, (node, group))
        result = reduced
        if bias is not None:
            with gm.graph.inserting_after(reduced):
                result = gm.graph.call_function(operator.add, (reduced, bias))
        node.replace_all_uses_with(result, delete_user_cb=lambda user: user is not reduced)
        inserted.append(reduced.name)
    return inserted


def _take_bias(gm: fx.GraphModule, node: fx.Node, functional: FunctionalLinear | None) -> fx.Node | None:
    """Take the bias out of a row linear's op (it is added after the reduce); the bias node, or None."""
    if functional is None:
        if gm.get_submodule(str(node.target)).bias is None:
            return None
        with gm.graph.inserting_before(node):
            return gm.graph.get_attr(f"{node.target}.bias")
    if functional.bias is None:
        return None
    rule = function_rule(node.target)
    position = rule.linear.bias if rule is not None and rule.linear is not None else None
    if position is None or node.kwargs:
        raise ShardingError(f"cannot take the bias out of row-parallel node '{node.name}' ({node.format_node()}); "
                            "only linear and addmm without keyword options are supported")
    bias = node.args[position]
    if position == 0:  # addmm(bias, x, w) -> mm(x, w)
        node.target, node.args = torch.ops.aten.mm.default, node.args[1:3]
    else:  # linear(x, w, bias) -> linear(x, w)
        node.args = node.args[:position]
    return bias


def megatron_shard(gm: fx.GraphModule, pairing: Pairing, *, tp: int, rank: int, group: str,
                   source: nn.Module | None = None) -> PairShardResult:
    """The whole pass: plan the pairs' and fallbacks' shards, shard the parameters, annotate the linears,
    then rewrite the graph.

    Raises:
        ShardingError: tp does not divide a fallback site's out_features (nothing is changed then).
    """
    sites = tuple(site for pair in pairing.pairs for site in pair.columns) + pairing.fallback_sites
    plan = megatron_plan(gm, SiteFinding(sites, ()), pairing, tp=tp, rank=rank)
    shard_parameters(gm, plan, source=source)
    annotate_linears(gm, plan)
    result = rewrite_pair_graph(gm, pairing, tp=tp, group=group)
    gm.graph.lint()
    gm.recompile()
    return result


def rewrite_other_form(traced: fx.GraphModule, plan: Plan, *, group: str) -> PairShardResult:
    """Rewrite another call form's graph (traced from the weightless copy) for the program's plan.

    Nothing is analysed again: the plan is mapped onto the trace by parameter name (the annotations of
    its linears), and this trace's own facts between each pair's linears (its shape arguments, size
    reads, narrows) are derived for the pair and split the plan chose
    (:func:`tpfx.passes.pair_megatron.map_pairing`).

    Raises:
        ShardingError: the trace uses a parameter of a pair differently from the plan (one line, naming it).
    """
    pairing = map_pairing(traced, plan.pairing, tp=plan.tp, form=traced.meta.get(CALL_FORM, type(traced).__name__))
    annotate_linears(traced, plan)
    return rewrite_pair_graph(traced, pairing, tp=plan.tp, group=group)
