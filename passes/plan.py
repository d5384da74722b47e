"""The plan: what every parameter of one rank's program holds, as data, and the strategies that make it.

before (analysis records of one captured graph, rank 1 of tp=2)::

    Site(role="fc1", module_path="ffn.fc1", ...)                          # find_sites
    Replicated(module_path="lm_head", reason="feeds the model output only, ...")

after (``gather_plan``)::

    plan.parameters["ffn.fc1.weight"]    column, ShardSpec(dim=0, full_size=512, ranges=((256, 512),)), role "fc1"
    plan.parameters["ffn.fc1.bias"]      column, ShardSpec(dim=0, full_size=512, ranges=((256, 512),)), role "fc1"
    plan.parameters["lm_head.weight"]    replicated, because feeds the model output only, ...
    plan.parameters["ln_f.weight"]       replicated, because no sharded linear reads it (first read by module 'ln_f' (LayerNorm))

A *strategy* (:func:`gather_plan`, :func:`megatron_plan`) turns the analysis into a :class:`Plan`: every
parameter of the program by fully qualified name, with its :class:`tpfx.layers.ShardSpec` for this rank
or the reason it stays whole. The rewrite (:mod:`tpfx.passes.shard_parameters`) shards the program from
the plan alone; the report, ``parameter_shard_specs`` and checkpoints read it and derive nothing.
"""

from __future__ import annotations

import dataclasses

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

import torch.fx as fx

from tpfx.errors import ShardingError
from tpfx.layers import Placement, ShardSpec, shard_range
from tpfx.passes.find_sites import ROLES, Replicated, Site, SiteFinding, require_divisible
from tpfx.passes.find_vocab import HEAD, TABLE, VocabFinding
from tpfx.passes.graph_view import functional_linear
from tpfx.passes.ops import op_label
from tpfx.passes.pair_megatron import Pair, Pairing

ROW = "row"  # the role of a row-parallel partner's parameters (megatron mode)
PLAN_ROLES = (*ROLES, ROW, TABLE, HEAD)  # TABLE, HEAD: a vocab-parallel embedding table and LM head


LOGITS = ("gathered", "sharded")  # what the model output holds of vocab-parallel logits


class Mode(Enum):
    """How a program is parallelized: the strategy that made its plan."""

    GATHER = "gather"  # column-shard the sites, all-gather after each
    MEGATRON = "megatron"  # pair column sites with a row-parallel linear, one all-reduce per pair


@dataclass(frozen=True)
class ParameterPlan:
    """One parameter of the program (by fully qualified name): its full shape and what this rank holds.

    ``spec`` is this rank's part (None exactly when ``placement`` is REPLICATED); ``reason`` says why a
    replicated parameter stays whole. ``role`` is the site role (``qkv``, ``fc1``, ...) or ``row`` for
    a linear tpfx shards or pairs, ``""`` for a plain parameter. ``held_by_layer``: the owning module
    is a Linear that the rewrite replaces by a tpfx parallel layer holding this parameter; otherwise
    a sharded parameter is sliced in place (an op on a parameter, export graphs).
    """

    name: str
    full_shape: tuple[int, ...]
    placement: Placement
    spec: ShardSpec | None = None
    role: str = ""
    module_path: str = ""
    reason: str = ""
    held_by_layer: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.placement, Placement):
            raise TypeError(f"parameter '{self.name}': placement {self.placement!r} is not a Placement")
        if self.name != ".".join(filter(None, (self.module_path, self.name.rpartition(".")[2]))):
            raise ValueError(f"parameter '{self.name}' is not a parameter of module '{self.module_path}'")
        if (self.spec is None) != (self.placement is Placement.REPLICATED):
            raise ValueError(f"parameter '{self.name}': a {self.placement.value} placement needs a shard spec "
                             "and only a replicated one has none")
        if self.placement is Placement.REPLICATED and not self.reason:
            raise ValueError(f"replicated parameter '{self.name}' needs the reason it stays whole")
        if self.role not in (*PLAN_ROLES, ""):
            raise ValueError(f"parameter '{self.name}': unknown role {self.role!r}; expected one of {PLAN_ROLES} or ''")
        if self.spec is not None and (self.spec.dim >= len(self.full_shape)
                                      or self.spec.full_size != self.full_shape[self.spec.dim]):
            raise ValueError(f"parameter '{self.name}': shard spec {self.spec} does not fit its shape {self.full_shape}")

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The shape of this rank's tensor."""
        if self.spec is None:
            return self.full_shape
        dim = self.spec.dim
        return self.full_shape[:dim] + (self.spec.local_size,) + self.full_shape[dim + 1:]

    def describe(self) -> str:
        """One line: ``column: dim 0 blocks [(256, 512)] of 512`` or ``replicated, because ...``."""
        if self.spec is None:
            return f"replicated, because {self.reason}"
        return f"{self.placement.value}: dim {self.spec.dim} blocks {list(self.spec.ranges)} of {self.spec.full_size}"


@dataclass(frozen=True)
class Plan:
    """Every parameter of one rank's program and what it holds, plus the analysis records it came from.

    ``parameters`` lists each name of the program's parameters (a tied tensor under each of its
    names, ``tied`` groups them) in the program's order. ``sites``, ``replicated``, (megatron)
    ``pairing`` and (vocab parallelism) ``vocab`` are the analysis records, kept for reports and for
    rewriting another call form; ``logits`` says whether the model output holds the logits gathered
    (``"gathered"``) or this rank's vocabulary columns (``"sharded"``).
    """

    mode: Mode
    tp: int
    rank: int
    parameters: Mapping[str, ParameterPlan]
    sites: tuple[Site, ...]
    replicated: tuple[Replicated, ...]
    pairing: Pairing | None = None
    tied: tuple[tuple[str, ...], ...] = ()
    sequence_parallel: bool = False  # megatron mode: the residual stream between the pairs split along the sequence
    vocab: VocabFinding | None = None
    logits: str = "gathered"

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Mode):
            raise TypeError(f"plan mode {self.mode!r} is not a Mode")
        if self.tp < 1 or not 0 <= self.rank < self.tp:
            raise ValueError(f"plan for rank {self.rank} of tp={self.tp}: need tp >= 1 and 0 <= rank < tp")
        if (self.pairing is None) != (self.mode is Mode.GATHER):
            raise ValueError(f"a {self.mode.value} plan {'takes no' if self.pairing else 'needs a'} pairing")
        if self.sequence_parallel and self.mode is not Mode.MEGATRON:
            raise ValueError(f"a {self.mode.value} plan cannot be sequence-parallel (megatron mode only)")
        misnamed = [key for key, entry in self.parameters.items() if key != entry.name]
        if misnamed:
            raise ValueError(f"plan entry under '{misnamed[0]}' is named '{self.parameters[misnamed[0]].name}'")
        for names in self.tied:
            specs = {self.parameters[name].spec for name in names}
            if len(specs) != 1:
                raise ValueError(f"tied parameters {list(names)} are one tensor but have different specs")
        if self.logits not in LOGITS:
            raise ValueError(f"plan logits={self.logits!r}; expected one of {LOGITS}")
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))

    def __reduce__(self) -> tuple:
        # a mappingproxy neither pickles nor deep-copies: rebuild the plan from a plain dict
        return type(self), (self.mode, self.tp, self.rank, dict(self.parameters), self.sites, self.replicated,
                            self.pairing, self.tied, self.sequence_parallel, self.vocab, self.logits)

    @property
    def gathered(self) -> tuple[Site, ...]:
        """The column sites followed by an all-gather: every site (gather), the fallbacks (megatron)."""
        return self.sites if self.pairing is None else self.pairing.fallback_sites

    def entry(self, name: str) -> ParameterPlan:
        """The plan of parameter ``name``.

        Raises:
            KeyError: the program has no parameter of that name.
        """
        try:
            return self.parameters[name]
        except KeyError:
            raise KeyError(f"the plan has no parameter '{name}'; it lists the program's parameters by "
                           "fully qualified name (model.named_parameters())") from None

    def shard_specs(self) -> dict[str, ShardSpec]:
        """Every sharded parameter by name, with this rank's spec (replicated ones left out)."""
        return {name: entry.spec for name, entry in self.parameters.items() if entry.spec is not None}

    def layers(self) -> dict[str, ParameterPlan]:
        """Module path -> its weight's plan, for each Linear the rewrite replaces by a parallel layer."""
        return {entry.module_path: entry for entry in self.parameters.values()
                if entry.held_by_layer and entry.spec is not None and entry.name.endswith(".weight")}

    def linear_bytes(self, element_size: Mapping[str, int]) -> tuple[int, int]:
        """Bytes of the parameters of the linears tpfx shards or pairs (role set): whole, and this rank's.

        Args:
            element_size: bytes per element of each parameter, by name; a tied tensor counts once.
        """
        return self._bytes(element_size, lambda role: role not in ("", TABLE, HEAD))

    def vocab_bytes(self, element_size: Mapping[str, int]) -> tuple[int, int]:
        """Bytes of the vocab-parallel embedding tables and LM heads (a tied one once): whole, and this rank's."""
        return self._bytes(element_size, lambda role: role in (TABLE, HEAD))

    def _bytes(self, element_size: Mapping[str, int], counts: Callable[[str], bool]) -> tuple[int, int]:
        single = local = 0
        counted = {name for names in self.tied for name in names[1:]}
        for name, entry in self.parameters.items():
            if counts(entry.role) and name not in counted:
                single += math.prod(entry.full_shape) * element_size[name]
                local += math.prod(entry.local_shape) * element_size[name]
        return single, local


def site_weight_name(site: Site) -> str:
    """The qualified name of a site's weight: a functional site's parameter, else the Linear's ``weight``."""
    return site.weight_name if site.functional else f"{site.module_path}.weight"


def row_weight_name(pair: Pair) -> str:
    """The qualified name of a pair's row-parallel weight."""
    return pair.row_weight_name or f"{pair.row_module_path}.weight"


def row_bias_name(pair: Pair) -> str:
    """The qualified name the bias of a pair's row-parallel linear has, if it has one ("" for a functional one without)."""
    return pair.row_bias_name if pair.row_weight_name else f"{pair.row_module_path}.bias"


# ------------------------------------------------------------------------------------------ strategies

def gather_plan(gm: fx.GraphModule, finding: SiteFinding, *, tp: int, rank: int) -> Plan:
    """Column-shard every site (this rank's block of its output features); everything else stays whole.

    Args:
        gm: the captured single-device program (full-size parameters, real or meta).
        finding: :func:`tpfx.passes.find_sites.find_sites` of ``gm``.
        tp, rank: the tensor-parallel degree and this rank's index in its group.

    Returns:
        The plan: every parameter of ``gm`` by qualified name.

    Raises:
        ShardingError: tp does not divide a site's out_features.
    """
    require_divisible(finding.sites, tp)
    parameters = _Parameters.of(gm)
    decided = {name: entry for site in finding.sites
               for name, entry in _column_entries(site, parameters.shapes, tp, rank).items()}
    return _complete(gm, parameters, Mode.GATHER, decided, finding, None, tp=tp, rank=rank)


def megatron_plan(gm: fx.GraphModule, finding: SiteFinding, pairing: Pairing, *, tp: int, rank: int) -> Plan:
    """Pair column and row-parallel linears as ``pairing`` says; unpaired sites are column-sharded.

    Args:
        gm: the captured single-device program (full-size parameters, real or meta).
        finding: :func:`tpfx.passes.find_sites.find_sites` of ``gm``.
        pairing: :func:`tpfx.passes.pair_megatron.pair_sites` of ``gm`` and ``finding``.
        tp, rank: the tensor-parallel degree and this rank's index in its group.

    Returns:
        The plan: every parameter of ``gm`` by qualified name, the pairing kept on it.

    Raises:
        ShardingError: tp does not divide the out_features of a site that falls back to column + gather.
    """
    require_divisible(pairing.fallback_sites, tp)
    parameters = _Parameters.of(gm)
    decided: dict[str, ParameterPlan] = {}
    for site in pairing.fallback_sites:
        decided |= _column_entries(site, parameters.shapes, tp, rank)
    for pair in pairing.pairs:
        decided |= _pair_entries(pair, parameters.shapes, tp, rank)
    return _complete(gm, parameters, Mode.MEGATRON, decided, finding, pairing, tp=tp, rank=rank)


def _linear_entries(names: tuple[str, str], shapes: dict[str, tuple[int, ...]], *, role: str, layer: bool,
                    placements: tuple[tuple[Placement, ShardSpec | None, str], ...]) -> dict[str, ParameterPlan]:
    """The entries of a linear's weight and bias (``names``, the bias "" or absent: left out)."""
    if names[0] not in shapes:  # the finder named it from this graph: a missing weight is a bug, never skipped
        raise ValueError(f"linear weight '{names[0]}' is not a parameter of the program")
    entries = {}
    for name, (placement, spec, reason) in zip(names, placements):
        if name and name in shapes:
            entries[name] = ParameterPlan(name, shapes[name], placement, spec, role, name.rpartition(".")[0],
                                          reason, held_by_layer=layer)
    return entries


def _linear_names(site: Site, shapes: dict[str, tuple[int, ...]]) -> tuple[str, str]:
    """(weight, bias) names of a site; the bias "" when it has none."""
    if site.functional:
        return site.weight_name, site.bias_name
    bias = f"{site.module_path}.bias"
    return f"{site.module_path}.weight", bias if bias in shapes else ""


def _column_entries(site: Site, shapes: dict[str, tuple[int, ...]], tp: int, rank: int) -> dict[str, ParameterPlan]:
    """A gathered column site: this rank's contiguous block of the output features, in weight and bias."""
    size = site.weight_shape[site.shard_dim]
    start, stop = shard_range(size, tp, rank)
    weight = ShardSpec.contiguous(site.shard_dim, start, stop, size)
    bias = ShardSpec.contiguous(0, start, stop, size)
    return _linear_entries(_linear_names(site, shapes), shapes, role=site.role, layer=not site.functional,
                           placements=((Placement.COLUMN, weight, ""), (Placement.COLUMN, bias, "")))


def _pair_entries(pair: Pair, shapes: dict[str, tuple[int, ...]], tp: int, rank: int) -> dict[str, ParameterPlan]:
    """A pair's column linears (whole heads of this rank, or whole when they hold fewer heads than tp) and row linear."""
    entries: dict[str, ParameterPlan] = {}
    for site, layout in zip(pair.columns, pair.column_layouts):
        if layout.whole:
            why = (f"its {layout.describe()} rows hold fewer heads than tp={tp}: every rank keeps them whole and "
                   f"repeats them to its own query heads (paired with '{pair.row_module_path}')")
            whole = (Placement.REPLICATED, None, why)
            entries |= _linear_entries(_linear_names(site, shapes), shapes, role=site.role, layer=False,
                                       placements=(whole, whole))
            continue
        ranges = layout.ranges(tp, rank)
        placements = ((Placement.COLUMN, ShardSpec(site.shard_dim, layout.size, ranges), ""),
                      (Placement.COLUMN, ShardSpec(0, layout.size, ranges), ""))
        entries |= _linear_entries(_linear_names(site, shapes), shapes, role=site.role, layer=not site.functional,
                                   placements=placements)
    weight = row_weight_name(pair)
    bias = row_bias_name(pair)
    # the input features are dim 1 of an (out, in) weight, dim 0 of an (in, out) one (GPT-2's Conv1D)
    dim = 1 if pair.row_weight_layout == "out_in" else 0
    spec = ShardSpec(dim, pair.row_layout.size, pair.row_layout.ranges(tp, rank))
    once = f"it is the bias of row-parallel '{pair.row_module_path}': added once, after the all-reduce"
    return entries | _linear_entries((weight, bias), shapes, role=ROW, layer=not pair.row_weight_name,
                                     placements=((Placement.ROW, spec, ""), (Placement.REPLICATED, None, once)))


def vocab_plan(plan: Plan, finding: VocabFinding, *, logits: str = "gathered") -> Plan:
    """``plan`` with the vocabulary split too: each table's rows and each LM head's vocabulary (its output
    features) in this rank's contiguous 1/tp, tied names alike; tables and heads kept whole say why.

    Args:
        plan: a mode's plan (gather or megatron) of the program.
        finding: :func:`tpfx.passes.find_vocab.find_vocab` of the program, with ``plan``'s shards as taken.
        logits: ``"gathered"`` (the output holds the full logits) or ``"sharded"`` (this rank's columns).

    Returns:
        A new plan; the entries of the split parameters (under every name of a tied tensor) replaced.
    """
    entries = dict(plan.parameters)
    tied = {name: names for names in plan.tied for name in names}
    decided: dict[str, ParameterPlan] = {}
    for table in finding.tables:
        rows = table.shape[0]
        spec = ShardSpec.contiguous(0, *shard_range(rows, plan.tp, plan.rank), rows)
        decided[table.weight_name] = ParameterPlan(table.weight_name, table.shape, Placement.VOCAB, spec, TABLE,
                                                   table.weight_name.rpartition(".")[0], "",
                                                   held_by_layer=not table.functional)
    for head in finding.heads:
        vocab = head.weight_shape[head.vocab_dim]
        start, stop = shard_range(vocab, plan.tp, plan.rank)
        names = (head.weight_name, head.bias_name)
        specs = (ShardSpec.contiguous(head.vocab_dim, start, stop, vocab), ShardSpec.contiguous(0, start, stop, vocab))
        for name, spec in zip(names, specs):
            if name:
                decided[name] = ParameterPlan(name, entries[name].full_shape, Placement.COLUMN, spec, HEAD,
                                              name.rpartition(".")[0], "", held_by_layer=not head.functional)
    for name, entry in decided.items():
        for alias in tied.get(name, (name,)):  # a name the graph does not read is sliced with the tensor
            entries[alias] = decided.get(alias) or ParameterPlan(
                alias, entry.full_shape, entry.placement, entry.spec, entry.role, alias.rpartition(".")[0])
    own = {whole.weight_name for whole in finding.whole}  # a record's own reason, before a tied name's
    for whole in finding.whole:
        for alias in tied.get(whole.weight_name, (whole.weight_name,)):
            if entries[alias].spec is None and (alias == whole.weight_name or alias not in own):
                entries[alias] = ParameterPlan(alias, entries[alias].full_shape, Placement.REPLICATED, None, "",
                                               alias.rpartition(".")[0], f"{whole.role} kept whole: {whole.reason}")
    return dataclasses.replace(plan, parameters=entries, vocab=finding, logits=logits)


# ------------------------------------------------------------------------------- every other parameter

@dataclass(frozen=True)
class _Parameters:
    """The program's parameters, read once: every qualified name's shape, and each tensor's names."""

    shapes: dict[str, tuple[int, ...]]  # every name, a tied tensor under each, in the program's order
    names_of: dict[int, list[str]]  # id(tensor) -> its names
    ident: dict[str, int]  # name -> id(tensor)

    @classmethod
    def of(cls, gm: fx.GraphModule) -> _Parameters:
        shapes, names_of, ident = {}, {}, {}
        for name, parameter in gm.named_parameters(remove_duplicate=False):
            shapes[name] = tuple(parameter.shape)
            names_of.setdefault(id(parameter), []).append(name)
            ident[name] = id(parameter)
        return cls(shapes, names_of, ident)


def _complete(gm: fx.GraphModule, parameters: _Parameters, mode: Mode, decided: dict[str, ParameterPlan],
              finding: SiteFinding, pairing: Pairing | None, *, tp: int, rank: int) -> Plan:
    """The plan of every parameter of ``gm``: ``decided`` ones as they are, the others replicated with
    the fact that decided it (the finder's reason for a linear left whole, else what reads it)."""
    whole = _replicated_linear_reasons(gm, finding.replicated, parameters.shapes)
    readers = _first_readers(gm, parameters)
    entries: dict[str, ParameterPlan] = {}
    for ident, names in parameters.names_of.items():
        entries |= _tensor_entries(names, parameters.shapes, decided, whole, readers.get(ident, ""))
    tied = tuple(tuple(names) for names in parameters.names_of.values() if len(names) > 1)
    return Plan(mode, tp, rank, {name: entries[name] for name in parameters.shapes}, finding.sites,
                finding.replicated, pairing, tied)


def _tensor_entries(names: list[str], shapes: dict[str, tuple[int, ...]], decided: dict[str, ParameterPlan],
                    whole: dict[str, str], reader: str) -> dict[str, ParameterPlan]:
    """The entries of one tensor under each of its names (several when tied)."""
    sharded = [name for name in names if name in decided and decided[name].spec is not None]
    if sharded and len(names) > 1:
        other = next(name for name in names if name != sharded[0])
        raise ShardingError(f"cannot shard '{sharded[0]}': it is one tensor with '{other}' (tied), and a shard "
                            "would untie them; give each name its own parameter, or keep the linear whole")
    entries = {}
    for name in names:
        others = ", ".join(f"'{other}'" for other in names if other != name)
        tied = f"it is one tensor with {others} (tied); " if others else ""
        if name in decided:
            entry = decided[name]
            entries[name] = ParameterPlan(name, entry.full_shape, entry.placement, entry.spec, entry.role,
                                          entry.module_path, tied + entry.reason if entry.reason else "",
                                          entry.held_by_layer)
            continue
        if name in whole:
            reason = whole[name]
        elif reader:
            reason = f"no sharded linear reads it (first read by {reader})"
        else:
            reason = "the graph of this call form does not read it"
        entries[name] = ParameterPlan(name, shapes[name], Placement.REPLICATED, None, "", name.rpartition(".")[0],
                                      tied + reason)
    return entries


def _replicated_linear_reasons(gm: fx.GraphModule, replicated: tuple[Replicated, ...],
                               shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Parameter name -> why its linear stays whole (the finder's reason), for each linear left whole."""
    nodes = {node.name: node for node in gm.graph.nodes}
    reasons: dict[str, str] = {}
    for record in replicated:
        node = nodes.get(record.node_name)
        if node is None:
            continue
        if node.op == "call_module":
            read = [f"{node.target}.{leaf}" for leaf, _ in gm.get_submodule(str(node.target)).named_parameters(recurse=False)]
        else:
            functional = functional_linear(node, shapes)
            read = [] if functional is None else [functional.weight, functional.bias or ""]
        for name in filter(None, read):
            reasons.setdefault(name, f"its linear '{record.module_path}' stays whole: {record.reason}")
    return reasons


def _first_readers(gm: fx.GraphModule, parameters: _Parameters) -> dict[int, str]:
    """id(parameter) -> what reads it first in graph order: a module call, or the op using a get_attr."""
    readers: dict[int, str] = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = modules[str(node.target)]
            for parameter in module.parameters():
                readers.setdefault(id(parameter), f"module '{node.target}' ({op_label(node, modules)})")
        elif node.op == "get_attr" and node.target in parameters.ident and node.users:  # export may leave an unused read
            user = next(iter(node.users))
            readers.setdefault(parameters.ident[str(node.target)], f"node '{user.name}' ({op_label(user, modules)})")
    return readers
