"""What a parallelization did, as data: sites, replicated linears, collectives and parameter memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from tpfx.passes.find_sites import Replicated, Site
from tpfx.passes.graph_view import functional_linear, parameter_shapes
from tpfx.passes.plan import Plan, site_weight_name
from tpfx.capture import CallForm
from tpfx.collectives import COLLECTIVES


@dataclass(frozen=True)
class Report:
    """The record of one rank's program, computed from the rewritten graph and its plan (shard shapes, bytes)."""

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
    plan: Plan  # what every parameter holds: the shard shapes shown are read from it
    linear_order: tuple[str, ...] = ()  # module paths of the graph's call_module nodes, in graph order
    collectives_by_module: tuple[tuple[str, tuple[str, ...]], ...] = ()  # sharded module -> collectives next to it
    tracer: str = "fx"  # how the model was captured: "fx" or "export"
    tracer_note: str = ""  # why tracer="auto" chose export, which dims stayed dynamic; fx: where shapes came from
    mode: str = "gather"  # the parallelization mode; MegatronReport says "megatron"
    vocab_bytes_single: int = 0  # the vocab-parallel embedding tables and LM heads, unsharded
    vocab_bytes_rank: int = 0  # ... and this rank's parts of them

    def sites_table(self) -> list[dict[str, object]]:
        """One row per site: module path, role, full weight shape, shard shape (the plan's), collectives around it."""
        around = dict(self.collectives_by_module)
        rows = []
        for site in self.sites:
            weight = self.plan.entry(site_weight_name(site))
            rows.append({"module": site.module_path, "role": site.role, "weight": list(weight.full_shape),
                         "shard": list(weight.local_shape),
                         "collectives": list(around.get(site.module_path, ("copy_to_tp", "gather_from_tp")))})
        return rows + self._vocab_rows()

    def _vocab_rows(self) -> list[dict[str, object]]:
        """The vocab-parallel tables and heads (``vocab_parallel=True``): weight and shard from the plan."""
        vocab = self.plan.vocab
        if vocab is None:
            return []
        rows = [{"module": t.module_path, "role": "embedding", "weight": list(t.shape),
                 "shard": list(self.plan.entry(t.weight_name).local_shape), "collectives": ["reduce_from_tp"]}
                for t in vocab.tables]
        for head in vocab.heads:
            collectives = ["copy_to_tp"] + ["vocab_parallel_cross_entropy"] * head.feeds_loss
            collectives += ["gather_from_tp"] * (head.outputs and self.plan.logits == "gathered")
            rows.append({"module": head.module_path, "role": "lm_head", "weight": list(head.weight_shape),
                         "shard": list(self.plan.entry(head.weight_name).local_shape), "collectives": collectives})
        return rows

    def linear_decisions(self) -> list[dict[str, object]]:
        """Every linear, sharded or replicated, with the reason in words, in graph order."""
        rows = [{"module": s.module_path, "weight": list(s.weight_shape), "sharded": True, "role": s.role,
                 "reason": role_reason(s.role)} for s in self.sites]
        rows += [{"module": r.module_path, "weight": list(r.weight_shape), "sharded": False, "role": "",
                  "reason": r.reason} for r in self.replicated]
        order = {path: index for index, path in enumerate(self.linear_order)}
        rows = sorted(rows, key=lambda row: order.get(row["module"], len(order)))
        return self._vocab_decisions(rows) if self.plan.vocab is not None else rows

    def _vocab_decisions(self, rows: list[dict[str, object]]) -> list[dict[str, object]]:
        """The LM heads' rows say how the vocabulary is split (or why not); the embedding tables come first."""
        vocab, tp = self.plan.vocab, self.tp
        heads = {head.module_path: head for head in vocab.heads}
        whole = {record.module_path: record for record in vocab.whole if record.role == "lm_head"}
        decided = []
        for row in rows:
            head = heads.get(row["module"])
            if head is not None:
                size = head.weight_shape[head.vocab_dim]
                loss = "; cross-entropy over its logits replaced by the vocabulary-parallel one" * head.feeds_loss
                output = {"gathered": "; the output's logits all-gathered", "sharded": "; the output holds this "
                          "rank's vocabulary columns"}[self.plan.logits] if head.outputs else ""
                row = row | {"sharded": True, "role": "lm_head", "reason": (
                    f"LM head: its {size} output features are the vocabulary, column-split ({size // tp} per rank, "
                    f"no gather){loss}{output}")}
            elif row["module"] in whole:
                row = row | {"reason": f"LM head kept whole: {whole[row['module']].reason}"}
            decided.append(row)
        tables = [{"module": t.module_path, "weight": list(t.shape), "sharded": True, "role": "embedding",
                   "reason": f"embedding of token ids: {t.shape[0]} rows split by vocabulary ({t.shape[0] // tp} "
                             "per rank, other ids looked up as zeros), one all-reduce of the lookup"}
                  for t in vocab.tables]
        tables += [{"module": w.module_path, "weight": list(w.weight_shape), "sharded": False, "role": "",
                    "reason": f"embedding kept whole: {w.reason}"} for w in vocab.whole if w.role == "embedding"]
        return tables + decided

    def memory(self) -> dict[str, int]:
        """Parameter bytes: the whole single-device model, this rank, and the sharded linears of each (and,
        with vocab parallelism, the embedding tables and LM heads split by vocabulary)."""
        memory = {"single_device_bytes": self.param_bytes_single, "rank_bytes": self.param_bytes_rank,
                  "sharded_linears_single_device_bytes": self.site_bytes_single,
                  "sharded_linears_rank_bytes": self.site_bytes_rank}
        if self.plan.vocab is not None:
            memory |= {"vocab_parallel_single_device_bytes": self.vocab_bytes_single,
                       "vocab_parallel_rank_bytes": self.vocab_bytes_rank}
        return memory


_OPERANDS = {"q": "query", "k": "key", "v": "value"}


def role_reason(role: str) -> str:
    """Why a site of ``role`` is sharded, in words."""
    if role == "fc1":
        return "feeds an elementwise activation whose output reaches another linear (FFN first linear)"
    if role == "up":
        return "is multiplied by an activation of another linear and feeds a linear (gated FFN up projection)"
    if role and set(role) <= _OPERANDS.keys():
        names = [_OPERANDS[letter] for letter in role]
        operands = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        plural = "s" if len(names) > 1 else ""
        return (f"its output reaches the {operands} operand{plural} of an attention through head-local ops only "
                "(shape, indexing, rotary and other per-head elementwise ops)")
    return f"sharded as role '{role}'"


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the parameters of ``module`` (each shared parameter once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def build_report(gm: fx.GraphModule, model: nn.Module, *, plan: Plan, group: str, call_form: CallForm,
                 tracer: str = "fx", tracer_note: str = "") -> Report:
    """Compute the report of ``gm`` (the rewritten program) against ``model`` (the original).

    Args:
        gm: the rewritten program.
        model: the single-device model it was compiled from.
        plan: ``gm``'s plan: the sites, the replicated linears, and each parameter's shard.
        group: the group key the collectives carry.
        call_form: the call form ``gm``'s graph was captured for.
        tracer, tracer_note: how the model was captured, and why.

    Returns:
        The report; shard shapes and the sharded linears' bytes come from ``plan``.
    """
    collectives = tuple((n.name, COLLECTIVES[n.target]) for n in gm.graph.nodes
                        if n.op == "call_function" and n.target in COLLECTIVES)
    parameters, sizes = {}, {}  # one walk of the module tree: it is long at 96 layers
    for name, parameter in gm.named_parameters(remove_duplicate=False):
        parameters[name], sizes[name] = tuple(parameter.shape), parameter.element_size()
    linears_single, linears_rank = plan.linear_bytes(sizes)
    vocab_single, vocab_rank = plan.vocab_bytes(sizes)
    return Report(
        model_name=type(model).__name__, tp=plan.tp, rank=plan.rank, group=group, call_form=call_form,
        sites=plan.sites, replicated=plan.replicated, collective_nodes=collectives,
        param_bytes_single=parameter_bytes(model), param_bytes_rank=parameter_bytes(gm),
        site_bytes_single=linears_single, site_bytes_rank=linears_rank, plan=plan,
        linear_order=tuple(dict.fromkeys(path for n in gm.graph.nodes if (path := _linear_path(n, parameters)))),
        collectives_by_module=_collectives_by_module(gm, {s.module_path for s in plan.sites}, parameters),
        tracer=tracer, tracer_note=tracer_note, mode=plan.mode.value,
        vocab_bytes_single=vocab_single, vocab_bytes_rank=vocab_rank,
    )


def _collectives_by_module(gm: fx.GraphModule, paths: set[str], parameters: dict[str, tuple[int, ...]] | None = None,
                           ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """For each sharded module: the collectives feeding it or fed by it, in graph order.

    ``parameters`` is ``parameter_shapes(gm)`` when the caller already has it.
    """
    around: dict[str, list[str]] = {path: [] for path in paths}
    parameters = parameter_shapes(gm) if parameters is None else parameters
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in COLLECTIVES:
            continue
        for neighbour in [*node.all_input_nodes, *node.users]:
            path = _linear_path(neighbour, parameters)
            if path in around:
                around[path].append(COLLECTIVES[node.target])
    return tuple((path, tuple(names)) for path, names in around.items())


def _linear_path(node: fx.Node, parameters: dict[str, tuple[int, ...]]) -> str | None:
    """The module path of a call_module node, or of the module owning a functional linear's weight (export graphs)."""
    if node.op == "call_module":
        return str(node.target)
    linear = functional_linear(node, parameters)
    return (linear.weight.rpartition(".")[0] or linear.weight) if linear is not None else None
