"""The report of a megatron-mode program: the pairs, the row-parallel linears and why a site was not paired.

It extends :class:`tpfx.report.Report` (same fields, same methods), so ``tpfx dump`` and ``tpfx
explain`` show megatron mode without knowing about it: the sites table gains the row-parallel
partners, the decisions say which column linear pairs with which row linear (and for a site that
fell back to column-plus-gather, why), and the sharded-linear bytes include the row linears.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.fx as fx

from tpfx.passes.pair_megatron import Fallback, Pair
from tpfx.passes.sequence_parallel import SequenceRegion
from tpfx.passes.plan import Plan, row_bias_name, row_weight_name, site_weight_name
from tpfx.report import Report, _collectives_by_module, role_reason


@dataclass(frozen=True)
class MegatronReport(Report):
    """A :class:`Report` with the pairing; ``mode`` is ``"megatron"``."""

    pairs: tuple[Pair, ...] = ()
    fallbacks: tuple[Fallback, ...] = ()
    row_collectives: tuple[tuple[str, tuple[str, ...]], ...] = ()
    rows_with_bias: tuple[str, ...] = ()
    sequence: SequenceRegion | None = None  # sequence parallelism: the region of the program's own graph

    def sites_table(self) -> list[dict[str, object]]:
        """The column sites (as in gather mode), then each pair's row-parallel linear; shards from the plan."""
        around = dict(self.row_collectives)
        rows = []
        for pair in self.pairs:
            weight = self.plan.entry(row_weight_name(pair))
            rows.append({"module": pair.row_module_path, "role": "row", "weight": list(weight.full_shape),
                         "shard": list(weight.local_shape), "collectives": list(around.get(pair.row_module_path, ()))})
        return super().sites_table() + rows

    def sequence_split(self) -> bool:
        """Whether the program splits its residual stream along the sequence (sequence parallelism)."""
        return self.sequence is not None and bool(self.sequence.nodes)

    def sequence_summary(self) -> str:
        """One line on sequence parallelism ("" when it was not asked for)."""
        return self.sequence.describe() if self.sequence is not None else ""

    def _whole_columns(self) -> set[str]:
        """Column sites the plan keeps whole on every rank (grouped-query k/v with fewer heads than tp)."""
        return {site.module_path for pair in self.pairs for site in pair.columns
                if self.plan.entry(site_weight_name(site)).spec is None}

    def linear_decisions(self) -> list[dict[str, object]]:
        """Every linear with its reason; paired sites name their partner, fallbacks say why not paired."""
        why = {}
        whole = self._whole_columns()
        for pair in self.pairs:
            for site, layout in zip(pair.columns, pair.column_layouts):
                why[site.module_path] = (f"{role_reason(site.role)}; column-parallel without a gather, rows "
                                         f"{layout.describe()} (* split), paired with '{pair.row_module_path}'")
                if layout.whole_local_ranges(self.tp):
                    why[site.module_path] += ("; its pieces kept whole (fewer key/value heads than tp) are on every "
                                              "rank, their weight gradient all-reduced")
                if site.module_path in whole:
                    why[site.module_path] = (
                        f"{role_reason(site.role)}; kept whole on every rank: its {layout.describe()} rows hold fewer "
                        f"heads than tp={self.tp}, so each rank repeats them to the query heads and keeps its own "
                        f"(gradient all-reduced), paired with '{pair.row_module_path}'")
        for fallback in self.fallbacks:
            for site in fallback.sites:
                why[site.module_path] = f"{role_reason(site.role)}; not paired, column + all-gather: {fallback.reason}"
        rows = {p.row_module_path: p for p in self.pairs}
        decisions = []
        for row in super().linear_decisions():
            pair = rows.get(row["module"])
            if pair is not None:
                columns = ", ".join(f"'{s.module_path}'" for s in pair.columns)
                bias = ", bias added once after the sum" if pair.row_module_path in self.rows_with_bias else ""
                after = ("reduce-scatter along the sequence after (sequence parallel)" if self.sequence_split()
                         else "all-reduce after")
                row = row | {"sharded": True, "role": "row", "reason": (
                    f"row-parallel partner of {columns}: input columns {pair.row_layout.describe()} (* split), "
                    f"{after}{bias}")}
            elif row["module"] in why:
                row = row | {"reason": why[row["module"]], "sharded": row["module"] not in whole}
            decisions.append(row)
        return decisions


def megatron_report(report: Report, gm: fx.GraphModule, plan: Plan) -> MegatronReport:
    """Extend the gather-mode ``report`` of ``gm`` with its plan's pairing (the row linears' bytes are in it).

    Args:
        report: :func:`tpfx.report.build_report` of ``gm``.
        gm: the rewritten program.
        plan: ``gm``'s megatron plan.

    Returns:
        The report with the pairs, the fallbacks and the row-parallel linears.
    """
    pairing = plan.pairing
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(Report)} | {"mode": "megatron"}
    # a row linear's bias is whole on every rank, added once after the all-reduce: the plan lists it
    with_bias = tuple(p.row_module_path for p in pairing.pairs if row_bias_name(p) in plan.parameters)
    return MegatronReport(**fields, pairs=pairing.pairs, fallbacks=pairing.fallbacks,
                          row_collectives=_collectives_by_module(gm, {p.row_module_path for p in pairing.pairs}),
                          rows_with_bias=with_bias)
