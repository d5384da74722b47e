"""What a parallelization did, as data: sites, replicated linears, collectives and parameter memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from passes.find_sites import Replicated, Site
from tpfx.capture import CallForm
from tpfx.collectives import COLLECTIVES


@dataclass(frozen=True)
class Report:
    """The record of one rank's program, computed from the rewritten graph and the site records."""

    model_name: str
    tp: int
    rank: int
    group: str
    call_form: CallForm
    sites: tuple[Site, ...]
    replicated: tuple[Replicated, ...]
    collective_nodes: tuple[tuple[str, str], ...]  # (node name, collective) in graph order
    param_bytes_single: int  # the whole single-device model
    param_bytes_rank: int  # what this rank holds
    site_bytes_single: int  # the sharded linears, unsharded
    site_bytes_rank: int  # the sharded linears, this rank's shards

    def sites_table(self) -> list[dict[str, object]]:
        """One row per site: module path, role, full weight shape, shard shape, collectives around it."""
        return [{"module": s.module_path, "role": s.role, "weight": list(s.weight_shape),
                 "shard": list(s.shard_shape), "collectives": ["copy_to_tp", "gather_from_tp"]} for s in self.sites]


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the parameters of ``module`` (each shared parameter once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def build_report(gm: fx.GraphModule, model: nn.Module, *, tp: int, rank: int, group: str, call_form: CallForm,
                 sites: tuple[Site, ...], replicated: tuple[Replicated, ...]) -> Report:
    """Compute the report of ``gm`` (the rewritten program) against ``model`` (the original)."""
    collectives = tuple((n.name, COLLECTIVES[n.target]) for n in gm.graph.nodes
                        if n.op == "call_function" and n.target in COLLECTIVES)
    return Report(
        model_name=type(model).__name__, tp=tp, rank=rank, group=group, call_form=call_form,
        sites=sites, replicated=replicated, collective_nodes=collectives,
        param_bytes_single=parameter_bytes(model), param_bytes_rank=parameter_bytes(gm),
        site_bytes_single=sum(parameter_bytes(model.get_submodule(s.module_path)) for s in sites),
        site_bytes_rank=sum(parameter_bytes(gm.get_submodule(s.module_path)) for s in sites),
    )
