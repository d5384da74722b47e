"""Rewrite: split the vocabulary: the embedding lookup, the LM head and the cross-entropy over its logits.

before::

    x = self.token_embedding(input_ids)                        # (B, T, D), table (V, D)
    ...
    logits = self.lm_head(h)                                   # (B, T, V)
    loss = F.cross_entropy(logits.view(-1, 50304), labels.view(-1))
    return logits, loss

after (rank r of tp)::

    token_embedding = self.token_embedding(input_ids)          # VocabParallelEmbedding: rows r*V/tp ..., zeros elsewhere
    x = tpfx.collectives.reduce_from_tp(token_embedding, 'tp:0-1')   # all-reduce fwd / identity bwd
    ...
    copy_to_tp = tpfx.collectives.copy_to_tp(h, 'tp:0-1')      # identity fwd / all-reduce bwd
    logits = self.lm_head(copy_to_tp)                          # ColumnParallelLinear: (B, T, V/tp)
    loss = tpfx.collectives.vocab_parallel_cross_entropy(logits.view(-1, 25152), labels.view(-1), 'tp:0-1', ...)
    gather_from_tp = tpfx.collectives.gather_from_tp(logits, 'tp:0-1')   # only for the output ("gathered")
    return gather_from_tp, loss

In an exported graph the lookup is ``aten.embedding(weight, ids)`` on the table's parameter: it becomes
:func:`tpfx.rank_parts.embedding_rank_part` on this rank's rows. The output collective of each lookup is
one ``reduce_from_tp`` node (:func:`_sum_lookups`), the one place a sequence-parallel layout turns into
a reduce-scatter. A tied table and head (one parameter) hold one part of it.

What the logits flow through, where a loss replaces and where they are gathered is the analysis of
:func:`tpfx.passes.find_vocab.logits_region`; this pass applies it. The parameters are sliced once from
the plan (:func:`tpfx.passes.plan.vocab_plan`, :func:`tpfx.passes.shard_parameters.shard_parameters`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx

from tpfx.collectives import copy_to_tp, gather_from_tp, reduce_from_tp, vocab_parallel_cross_entropy
from tpfx.passes.find_vocab import LogitsRegion, VocabFinding, logits_region
from tpfx.passes.graph_view import applications_of, linear_applications
from tpfx.passes.localize_shapes import localize_shapes
from tpfx.passes.ops import embedding_call
from tpfx.rank_parts import embedding_rank_part


@dataclass(frozen=True)
class VocabShardResult:
    """The collective nodes the pass inserted (graph order) and the logits regions it rewrote."""

    collective_nodes: tuple[str, ...]
    regions: tuple[LogitsRegion, ...]


def rewrite_vocab_graph(gm: fx.GraphModule, finding: VocabFinding, *, tp: int, group: str,
                        logits: str = "gathered", lookup_collective: Callable = reduce_from_tp,
                        head_input_collective: Callable = copy_to_tp) -> VocabShardResult:
    """Split ``finding``'s lookups, heads and losses in ``gm.graph`` (any call form: found by key).

    ``lookup_collective`` sums the parts of each lookup (an all-reduce; a sequence-parallel layout
    would pass a reduce-scatter), ``head_input_collective`` feeds each head (identity forward,
    all-reduce of the gradient; an all-gather of the sequence under sequence parallelism). Both
    take ``(tensor, group)`` and are each inserted in one place.

    Only the graph changes: the caller recompiles. The heads' logits regions are worked out on this
    graph (:func:`tpfx.passes.find_vocab.logits_region`), so another call form gets its own.
    """
    table_keys, head_keys = finding.keys()
    inserted = _sum_lookups(gm, set(table_keys), group, lookup_collective)
    index = linear_applications(gm)
    widths = {head.key: head.weight_shape[head.vocab_dim] for head in finding.heads}
    regions = []
    for node, data_index, functional in applications_of(index, set(head_keys)):
        key = functional.weight if functional is not None else str(node.target)
        region = logits_region(gm, node, width=widths[key], gather_outputs=logits == "gathered")
        with gm.graph.inserting_before(node):
            copied = gm.graph.call_function(head_input_collective, (node.args[data_index], group))
        node.update_arg(data_index, copied)
        inserted.append(copied.name)
        localize_shapes(gm, region.shape_edits, tp=tp)
        inserted += _parallel_losses(gm, region, group)
        inserted += _gather_at_boundaries(gm, region, group)
        regions.append(region)
    ordered = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return VocabShardResult(tuple(sorted(inserted, key=ordered.__getitem__)), tuple(regions))


def _sum_lookups(gm: fx.GraphModule, keys: set[str], group: str, collective: Callable) -> list[str]:
    """Each lookup into a split table gives this rank's part; one ``collective`` after it sums the parts.

    A module lookup's module is already the vocab-parallel layer; an op on the table's parameter
    becomes :func:`tpfx.rank_parts.embedding_rank_part` (the rank's rows, its start read from the group).
    """
    modules = dict(gm.named_modules())
    inserted = []
    for node in list(gm.graph.nodes):
        call = embedding_call(node, modules)
        if call is None:
            continue
        if node.op == "call_module":
            if str(node.target) not in keys:
                continue
            lookup = node
        else:
            if not (isinstance(call.weight, fx.Node) and str(call.weight.target) in keys):
                continue
            with gm.graph.inserting_before(node):
                lookup = gm.graph.call_function(embedding_rank_part, (call.ids, call.weight, group, call.padding_idx))
            if "val" in node.meta:  # the rank's part has the whole lookup's shape: the sequence pass reads it
                lookup.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(lookup)
            gm.graph.erase_node(node)
        with gm.graph.inserting_after(lookup):
            summed = gm.graph.call_function(collective, (lookup, group))
        lookup.replace_all_uses_with(summed, delete_user_cb=lambda user: user is not summed)
        inserted.append(summed.name)
    return inserted


def _parallel_losses(gm: fx.GraphModule, region: LogitsRegion, group: str) -> list[str]:
    """Replace each cross-entropy (or nll of a log_softmax) over the split logits by the vocabulary-parallel one."""
    nodes = {node.name: node for node in gm.graph.nodes}
    inserted = []
    for loss in region.losses:
        node = nodes[loss.node]
        with gm.graph.inserting_before(node):
            parallel = gm.graph.call_function(vocab_parallel_cross_entropy, (nodes[loss.logits], loss.target, group),
                                              {"ignore_index": loss.ignore_index, "reduction": loss.reduction})
        node.replace_all_uses_with(parallel)
        gm.graph.erase_node(node)
        if loss.log_softmax and not nodes[loss.log_softmax].users:
            gm.graph.erase_node(nodes[loss.log_softmax])
        inserted.append(parallel.name)
    return inserted


def _gather_at_boundaries(gm: fx.GraphModule, region: LogitsRegion, group: str) -> list[str]:
    """One all-gather of a region value for every op that needs the full logits (and the output, if gathered)."""
    nodes = {node.name: node for node in gm.graph.nodes}
    consumers: dict[str, list[str]] = {}
    for producer, consumer in region.boundaries:
        consumers.setdefault(producer, []).append(consumer)
    inserted = []
    for producer, users in consumers.items():
        source = nodes[producer]
        with gm.graph.inserting_after(source):
            gathered = gm.graph.call_function(gather_from_tp, (source, group))
        for user in users:
            nodes[user].replace_input_with(source, gathered)
        inserted.append(gathered.name)
    return inserted
