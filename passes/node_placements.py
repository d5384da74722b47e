"""Plan: the placement annotations of a trace's linears, mapped from the plan by parameter name.

before (a trace of the program, rank 1 of tp=2, megatron plan)::

    qkv_proj = self.qkv_proj(x)
    out_proj = self.out_proj(view_3)
    fc1 = self.fc1(ln_2)                                       # the plan: gathered (no pair)

after (``node.meta["tpfx"]``; the graph is unchanged)::

    qkv_proj.meta["tpfx"] = NodePlacement("attn.qkv_proj.weight", SHARDED, before=COPY_TO, pair="attn.out_proj")  # dim -1
    out_proj.meta["tpfx"] = NodePlacement("attn.out_proj.weight", PARTIAL, after=REDUCE, pair="attn.out_proj")
    fc1.meta["tpfx"]      = NodePlacement("ffn.fc1.weight", SHARDED, before=COPY_TO, after=GATHER)

Every application of a linear the plan shards gets one: where its output is (replicated, sharded on
its last dim, or a partial sum the ranks add up) and which collective goes before its input and
after its output. The rewrites (:mod:`tpfx.passes.column_shard`, :mod:`tpfx.passes.row_shard`) read
these and decide nothing themselves. Any call form's trace is annotated alike: a linear is found by
its weight's fully qualified name, so a new trace needs no analysis to know what its linears hold.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch.fx as fx

from tpfx.layers import Placement
from tpfx.passes.factors import FeatureLayout
from tpfx.passes.graph_view import LinearApplication, functional_linear, linear_applications, parameter_shapes
from tpfx.passes.plan import Plan, row_weight_name, site_weight_name

META_KEY = "tpfx"  # node.meta[META_KEY]: the node's NodePlacement


class Output(enum.Enum):
    """Where a linear's output is, across the ranks of the group."""

    REPLICATED = "replicated"  # every rank holds all of it
    SHARDED = "sharded"  # each rank holds its part of the last dim
    PARTIAL = "partial"  # each rank holds a partial sum; the full value is their sum

    def __str__(self) -> str:
        return self.value


class Collective(enum.Enum):
    """A tpfx collective the rewrite puts at a linear (:mod:`tpfx.collectives`)."""

    COPY_TO = "copy_to_tp"  # identity forward, all-reduce backward
    GATHER = "gather_from_tp"  # all-gather of the last dim forward, own part backward
    REDUCE = "reduce_from_tp"  # all-reduce forward, identity backward

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class NodePlacement:
    """What the rewrite does at one application of a linear.

    ``before`` goes on its data input, ``after`` on its output. ``pair`` names the pair's row linear
    (its key: module path, or weight name of an op on a parameter) for the linears of one Megatron
    pair, "" for a gathered site: the columns of one pair share the copy of an input. ``whole_rows``:
    a fused projection some of whose pieces every rank keeps whole (their rows' gradient is summed).
    """

    parameter: str  # the weight's fully qualified name
    output: Output
    before: Collective | None = None
    after: Collective | None = None
    pair: str = ""
    whole_rows: FeatureLayout | None = None

    def __post_init__(self) -> None:
        if self.output is Output.PARTIAL and self.after is not Collective.REDUCE:
            raise ValueError(f"'{self.parameter}': a partial sum needs the all-reduce after it")
        if self.after is Collective.GATHER and (self.output is not Output.SHARDED or self.pair):
            raise ValueError(f"'{self.parameter}': only a sharded output of a gathered site is all-gathered")

    @property
    def dim(self) -> int | None:
        """The dim a sharded output is split along: the linear's output features, last (None unless sharded)."""
        return -1 if self.output is Output.SHARDED else None

    def describe(self) -> str:
        """One line: ``sharded on dim -1, copy_to_tp before, gather_from_tp after``."""
        output = f"{self.output} on dim {self.dim}" if self.dim is not None else str(self.output)
        return ", ".join([output] + [f"{c} {at}" for c, at in ((self.before, "before"), (self.after, "after")) if c])


def placements_of(plan: Plan) -> dict[str, NodePlacement]:
    """The placement of each linear the plan shards or pairs, by its weight's fully qualified name."""
    placed = {site_weight_name(site): NodePlacement(site_weight_name(site), Output.SHARDED, Collective.COPY_TO,
                                                    Collective.GATHER) for site in plan.gathered}
    for pair in plan.pairing.pairs if plan.pairing is not None else ():
        row = pair.row_weight_name or pair.row_module_path
        for site, layout in zip(pair.columns, pair.column_layouts):
            name = site_weight_name(site)
            if layout.whole:  # every rank computes all of it; its output gradient is each rank's share
                placed[name] = NodePlacement(name, Output.REPLICATED, after=Collective.COPY_TO, pair=row)
            else:
                whole_rows = layout if layout.whole_local_ranges(plan.tp) else None
                placed[name] = NodePlacement(name, Output.SHARDED, before=Collective.COPY_TO, pair=row,
                                             whole_rows=whole_rows)
        weight = row_weight_name(pair)
        placed[weight] = NodePlacement(weight, Output.PARTIAL, after=Collective.REDUCE, pair=row)
    _check_against(plan, placed)
    return placed


def _check_against(plan: Plan, placed: dict[str, NodePlacement]) -> None:
    """Each annotation agrees with its weight's plan entry (one source: the plan's parameters)."""
    expected = {Output.SHARDED: Placement.COLUMN, Output.PARTIAL: Placement.ROW, Output.REPLICATED: Placement.REPLICATED}
    for name, placement in placed.items():
        if plan.entry(name).placement is not expected[placement.output]:
            raise ValueError(f"linear weight '{name}' is {plan.entry(name).placement.value} in the plan but its "
                             f"output is placed {placement.output}")


def annotate_linears(gm: fx.GraphModule, plan: Plan) -> dict[str, NodePlacement]:
    """Write ``node.meta["tpfx"]`` on every application in ``gm`` of a linear the plan shards or pairs.

    The linears are found by weight name (a module linear's weight is ``<path>.weight``), so this maps
    the plan onto any trace of the program; only ``node.meta`` changes.

    Returns:
        The placements written, by node name.
    """
    by_weight = placements_of(plan)
    written: dict[str, NodePlacement] = {}
    for key, applications in linear_applications(gm).items():
        for _, (node, _, functional) in applications:
            placement = by_weight.get(key if functional is not None else f"{key}.weight")
            if placement is not None:
                node.meta[META_KEY] = written[node.name] = placement
    return written


def placed_linears(gm: fx.GraphModule) -> list[tuple[LinearApplication, NodePlacement]]:
    """The annotated linear applications of ``gm`` with their placements, in graph order."""
    parameters = parameter_shapes(gm)
    found = []
    for node in gm.graph.nodes:
        if META_KEY not in node.meta:
            continue
        functional = functional_linear(node, parameters) if node.op != "call_module" else None
        found.append(((node, functional.data_index if functional is not None else 0, functional), node.meta[META_KEY]))
    return found
