"""Rewrite: column-shard each site's Linear and surround it with the two collectives.

before::

    h = self.fc1(x)                                   # Linear(d, 4d), full weight on every rank

after (rank r of tp)::

    copy_to_tp = tpfx.collectives.copy_to_tp(x, 'tp:0-1')      # identity fwd / all-reduce bwd
    h_local = self.fc1(copy_to_tp)                             # ColumnParallelLinear: rows r*4d/tp ... of W
    h = tpfx.collectives.gather_from_tp(h_local, 'tp:0-1')     # all-gather last dim fwd / own slice bwd

The pass has two steps so that further call forms of the same program reuse the shards:
:func:`shard_site_modules` replaces the modules (weights), :func:`insert_collectives` rewrites a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from passes.find_sites import Site, require_divisible
from tpfx.collectives import copy_to_tp, gather_from_tp
from tpfx.errors import ShardingError
from tpfx.layers import ColumnParallelLinear


@dataclass(frozen=True)
class ColumnShardResult:
    """The rewritten module and the names of the collective nodes the pass inserted, in graph order."""

    gm: fx.GraphModule
    collective_nodes: tuple[str, ...]


def shard_site_modules(gm: fx.GraphModule, sites: tuple[Site, ...], *, tp: int, rank: int,
                       source: nn.Module | None = None) -> None:
    """Replace each site's Linear in ``gm`` by this rank's ColumnParallelLinear.

    Args:
        gm: the module tree to change in place.
        sites: the sites to shard.
        tp, rank: the tensor-parallel degree and this rank's index in its group.
        source: where the full weights are read (default ``gm`` itself); the caller's model, so that
            ``gm`` may hold meta placeholders for the site weights.

    Raises:
        ShardingError: tp does not divide a site's out_features, or a site is not a Linear; raised
            before anything is replaced.
    """
    require_divisible(sites, tp)
    source = source if source is not None else gm
    linears = {site.module_path: source.get_submodule(site.module_path) for site in sites}
    for path, module in linears.items():
        if not isinstance(module, nn.Linear):
            raise ShardingError(f"site '{path}' is a {type(module).__name__}, not an nn.Linear; "
                                "only Linear modules can be column-sharded")
    for path, linear in linears.items():
        gm.set_submodule(path, ColumnParallelLinear(linear, tp=tp, rank=rank))


def insert_collectives(gm: fx.GraphModule, sites: tuple[Site, ...], *, group: str) -> ColumnShardResult:
    """Insert copy-to before and gather-from after every call of a site module in ``gm.graph``."""
    paths = {site.module_path for site in sites}
    inserted: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.target not in paths:
            continue
        with gm.graph.inserting_before(node):
            copied = gm.graph.call_function(copy_to_tp, (node.args[0], group))
        node.replace_input_with(node.args[0], copied)
        with gm.graph.inserting_after(node):
            gathered = gm.graph.call_function(gather_from_tp, (node, group))
        node.replace_all_uses_with(gathered, delete_user_cb=lambda user: user is not gathered)
        inserted += [copied.name, gathered.name]
    gm.graph.lint()
    gm.recompile()
    return ColumnShardResult(gm, tuple(inserted))


def column_shard(gm: fx.GraphModule, sites: tuple[Site, ...], *, tp: int, rank: int, group: str,
                 source: nn.Module | None = None) -> ColumnShardResult:
    """The whole pass: shard the site modules, then rewrite the graph around them.

    Raises:
        ShardingError: tp does not divide a site's out_features (nothing is changed then).
    """
    shard_site_modules(gm, sites, tp=tp, rank=rank, source=source)
    return insert_collectives(gm, sites, group=group)
