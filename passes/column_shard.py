"""Rewrite: column-shard each site's Linear and surround it with the two collectives.

before::

    h = self.fc1(x)                                   # Linear(d, 4d), full weight on every rank

after (rank r of tp)::

    copy_to_tp = tpfx.collectives.copy_to_tp(x, 'tp:0-1')      # identity fwd / all-reduce bwd
    h_local = self.fc1(copy_to_tp)                             # ColumnParallelLinear: rows r*4d/tp ... of W
    h = tpfx.collectives.gather_from_tp(h_local, 'tp:0-1')     # all-gather last dim fwd / own slice bwd

A functional linear (ATen graphs from torch.export: the weight is a ``get_attr`` parameter) keeps its
op; the parameters are replaced by this rank's slice: rows of an (out, in) weight, columns of an
(in, out) one (GPT-2's Conv1D), and the bias with them::

    addmm = aten.addmm(c_attn_bias, x2d, c_attn_weight)             # (d, 3d) weight, (3d,) bias
    # after: weight (d, 3d/tp) = columns r*3d/tp ..., bias (3d/tp,); copy_to_tp on x2d, gather_from_tp after

The pass has two steps so that further call forms of the same program reuse the shards: the
parameters are sharded once, from the plan (:func:`tpfx.passes.shard_parameters.shard_parameters`),
and :func:`insert_collectives` rewrites each graph (before the program is built from it: its code is
generated once) where the plan's annotations (:mod:`tpfx.passes.node_placements`) put a gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from tpfx.passes.find_sites import Site, SiteFinding
from tpfx.passes.node_placements import Collective, annotate_linears, placed_linears
from tpfx.passes.plan import gather_plan
from tpfx.passes.shard_parameters import shard_parameters
from tpfx.collectives import copy_to_tp, gather_from_tp


@dataclass(frozen=True)
class ColumnShardResult:
    """The rewritten module and the names of the collective nodes the pass inserted, in graph order."""

    gm: fx.GraphModule
    collective_nodes: tuple[str, ...]


def insert_collectives(gm: fx.GraphModule, *, group: str) -> ColumnShardResult:
    """Insert copy-to before and gather-from after every linear that ``node.meta["tpfx"]`` says is gathered
    (:func:`tpfx.passes.node_placements.annotate_linears` wrote it from the plan).

    Only the graph changes: the caller recompiles (tpfx generates a program's code once, after every rewrite).
    """
    inserted: list[str] = []
    for (node, data_index, _), placement in placed_linears(gm):
        if placement.after is not Collective.GATHER:
            continue
        with gm.graph.inserting_before(node):
            copied = gm.graph.call_function(copy_to_tp, (node.args[data_index], group))
        node.update_arg(data_index, copied)
        with gm.graph.inserting_after(node):
            gathered = gm.graph.call_function(gather_from_tp, (node, group))
        node.replace_all_uses_with(gathered, delete_user_cb=lambda user, made=gathered: user is not made)
        inserted += [copied.name, gathered.name]
    return ColumnShardResult(gm, tuple(inserted))


def column_shard(gm: fx.GraphModule, sites: tuple[Site, ...], *, tp: int, rank: int, group: str,
                 source: nn.Module | None = None) -> ColumnShardResult:
    """The whole pass: plan the sites' shards, shard the parameters, annotate the linears, then rewrite
    the graph around them.

    Raises:
        ShardingError: tp does not divide a site's out_features (nothing is changed then).
    """
    plan = gather_plan(gm, SiteFinding(sites, ()), tp=tp, rank=rank)
    shard_parameters(gm, plan, source=source)
    annotate_linears(gm, plan)
    result = insert_collectives(gm, group=group)
    gm.graph.lint()
    gm.recompile()
    return result
