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
import torch.nn as nn

from tpfx.passes.pair_megatron import Fallback, Pair, Pairing
from tpfx.report import Report, _collectives_by_module, parameter_bytes, role_reason


@dataclass(frozen=True)
class MegatronReport(Report):
    """A :class:`Report` with the pairing; ``mode`` is ``"megatron"``."""

    pairs: tuple[Pair, ...] = ()
    fallbacks: tuple[Fallback, ...] = ()
    row_collectives: tuple[tuple[str, tuple[str, ...]], ...] = ()
    rows_with_bias: tuple[str, ...] = ()

    def sites_table(self) -> list[dict[str, object]]:
        """The column sites (as in gather mode), then each pair's row-parallel linear."""
        around = dict(self.row_collectives)
        rows = [{"module": p.row_module_path, "role": "row", "weight": list(p.row_weight_shape),
                 "shard": [p.row_weight_shape[0], p.row_weight_shape[1] // self.tp],
                 "collectives": list(around.get(p.row_module_path, ()))} for p in self.pairs]
        whole = self._whole_columns()
        local = {site.module_path: (layout.local_size(self.tp), site.shard_dim) for pair in self.pairs
                 for site, layout in zip(pair.columns, pair.column_layouts) if layout.segments}
        columns = [row | {"shard": row["weight"]} if row["module"] in whole else row for row in super().sites_table()]
        for row in columns:  # a fused projection cut into pieces: each piece split or kept whole
            if row["module"] in local:
                size, dim = local[row["module"]]
                row["shard"] = [size if axis == dim else n for axis, n in enumerate(row["weight"])]
        return columns + rows

    def _whole_columns(self) -> dict[str, Pair]:
        """Column sites every rank keeps whole (grouped-query k/v with fewer heads than tp), with their pair."""
        return {site.module_path: pair for pair in self.pairs
                for site, layout in zip(pair.columns, pair.column_layouts) if layout.whole}

    def linear_decisions(self) -> list[dict[str, object]]:
        """Every linear with its reason; paired sites name their partner, fallbacks say why not paired."""
        why = {}
        for pair in self.pairs:
            for site, layout in zip(pair.columns, pair.column_layouts):
                why[site.module_path] = (f"{role_reason(site.role)}; column-parallel without a gather, rows "
                                         f"{layout.describe()} (* split), paired with '{pair.row_module_path}'")
                if layout.whole_local_ranges(self.tp):
                    why[site.module_path] += ("; its pieces kept whole (fewer key/value heads than tp) are on every "
                                              "rank, their weight gradient all-reduced")
                if layout.whole:
                    why[site.module_path] = (
                        f"{role_reason(site.role)}; kept whole on every rank: its {layout.describe()} rows hold fewer "
                        f"heads than tp={self.tp}, so each rank repeats them to the query heads and keeps its own "
                        f"(gradient all-reduced), paired with '{pair.row_module_path}'")
        for fallback in self.fallbacks:
            for site in fallback.sites:
                why[site.module_path] = f"{role_reason(site.role)}; not paired, column + all-gather: {fallback.reason}"
        rows = {p.row_module_path: p for p in self.pairs}
        whole = self._whole_columns()
        decisions = []
        for row in super().linear_decisions():
            pair = rows.get(row["module"])
            if pair is not None:
                columns = ", ".join(f"'{s.module_path}'" for s in pair.columns)
                bias = ", bias added once after the sum" if pair.row_module_path in self.rows_with_bias else ""
                row = row | {"sharded": True, "role": "row", "reason": (
                    f"row-parallel partner of {columns}: input columns {pair.row_layout.describe()} (* split), "
                    f"all-reduce after{bias}")}
            elif row["module"] in why:
                row = row | {"reason": why[row["module"]], "sharded": row["module"] not in whole}
            decisions.append(row)
        return decisions


def megatron_report(report: Report, gm: fx.GraphModule, model: nn.Module, pairing: Pairing) -> MegatronReport:
    """Extend the gather-mode ``report`` of ``gm`` with ``pairing``; row linears count as sharded bytes."""
    rows = [p.row_module_path for p in pairing.pairs]
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(Report)} | {"mode": "megatron"}
    fields["site_bytes_single"] += sum(parameter_bytes(model.get_submodule(path)) for path in rows)
    fields["site_bytes_rank"] += sum(parameter_bytes(gm.get_submodule(path)) for path in rows)
    with_bias = tuple(p.row_module_path for p in pairing.pairs
                      if p.row_bias_name or (not p.row_weight_name and gm.get_submodule(p.row_module_path).bias is not None))
    return MegatronReport(**fields, pairs=pairing.pairs, fallbacks=pairing.fallbacks,
                          row_collectives=_collectives_by_module(gm, set(rows)), rows_with_bias=with_bias)
