"""Analysis: what every collective node of a rewritten graph sends, forward and backward, per step.

before (rewritten graph, rank r of tp=2, input (B=2, T=16), d=128)::

    copy_to_tp = copy_to_tp(ln1, 'tp:0-1')                 # identity fwd / all-reduce of the grad bwd
    h = self.qkv_proj(copy_to_tp)                          # (2, 16, 192): this rank's columns
    gather_from_tp = gather_from_tp(h, 'tp:0-1')           # all-gather fwd / own slice bwd

after (records)::

    CommRow(node="gather_from_tp", direction="forward", op="all_gather", shape=(2, 16, 192),
            tensor_bytes=24576, traffic_bytes=24576.0)     # ring: (tp-1)/tp of the gathered 49152 bytes
    CommRow(node="copy_to_tp", direction="backward", op="all_reduce", shape=(2, 16, 128),
            tensor_bytes=16384, traffic_bytes=16384.0)     # ring: 2(tp-1)/tp of the reduced tensor

Shapes come from running the graph on fake tensors (no memory, no computation), with every
collective node replaced by its shape rule; no process group is needed. ``tensor_bytes`` is the
tensor handed to the collective (the local part for an all-gather), exactly what
:func:`tpfx.collectives.add_observer` sees in a real run. ``traffic_bytes`` is what each rank sends in
a ring implementation. A backward collective appears only if its input needs a gradient.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from tpfx.collectives import COLLECTIVES
from tpfx.passes.ops import CollectiveRule, collective_rules
from tpfx.passes.plan import ParameterPlan
from tpfx.errors import TpfxError, one_line
from tpfx.rank_parts import (attention_rank_part, dropout_module_rank_part, dropout_rank_part, embedding_rank_part,
                             rank_part, take_part)


class CommTableError(TpfxError):
    """The communication of a graph cannot be worked out (unknown collective, shapes that cannot propagate)."""


# what each tpfx collective sends, by its name in the graph: read from the op registry (tpfx.passes.ops)
RULES: dict[str, CollectiveRule] = {rule.name: rule.collective for rule in collective_rules().values()}


def ring_traffic(op: str, tensor_bytes: int, tp: int) -> Fraction:
    """Bytes each rank sends for ``op`` on a ring of ``tp`` ranks, given the tensor handed to it.

    all-gather hands the local part and sends (tp-1)/tp of the gathered tensor; reduce-scatter
    hands the full tensor and sends (tp-1)/tp of it; all-reduce sends 2(tp-1)/tp of it.
    """
    if op == "all_gather":
        return Fraction((tp - 1) * tensor_bytes)
    if op == "reduce_scatter":
        return Fraction((tp - 1) * tensor_bytes, tp)
    if op == "all_reduce":
        return Fraction(2 * (tp - 1) * tensor_bytes, tp)
    raise ValueError(f"unknown collective op {op!r}")


@dataclass(frozen=True)
class CommRow:
    """One collective call of one training step."""

    node: str
    collective: str  # the function in the graph, e.g. gather_from_tp
    direction: str  # "forward" or "backward"
    op: str  # all_gather / all_reduce / reduce_scatter
    module: str  # the sharded module it serves ("" when none is adjacent)
    shape: tuple[int, ...]
    dtype: str
    tensor_bytes: int
    traffic_bytes: float


@dataclass(frozen=True)
class CommTable:
    """Every collective call of one forward and backward, in the order they run."""

    tp: int
    rows: tuple[CommRow, ...]

    def total(self, direction: str | None = None, *, field: str = "traffic_bytes") -> float:
        """Sum of ``field`` over the rows of ``direction`` (both when None)."""
        return sum(getattr(r, field) for r in self.rows if direction in (None, r.direction))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the rows and the totals per direction and per step."""
        totals = {d or "step": {"tensor_bytes": self.total(d, field="tensor_bytes"),
                                "traffic_bytes_per_rank": self.total(d)} for d in ("forward", "backward", None)}
        return {"tp": self.tp, "model": "ring", "rows": [_row_dict(r) for r in self.rows], "totals": totals}


def _row_dict(row: CommRow) -> dict[str, Any]:
    return {"node": row.node, "collective": row.collective, "direction": row.direction, "op": row.op,
            "module": row.module, "shape": list(row.shape), "dtype": row.dtype,
            "tensor_bytes": row.tensor_bytes, "traffic_bytes_per_rank": row.traffic_bytes}


def graph_module_for_call(program: fx.GraphModule, inputs: dict[str, object]) -> fx.GraphModule:
    """The GraphModule that ``program(**inputs)`` runs: for a TensorParallelModule, the graph of that call form."""
    # a TensorParallelModule traces and rewrites each call form on first use; ask it for that graph
    module_for_call = getattr(program, "module_for_call", None)
    return module_for_call(**inputs) if module_for_call is not None else program


def comm_table(program: fx.GraphModule, inputs: dict[str, object], *, tp: int) -> CommTable:
    """Work out every collective of one training step of ``program`` called as ``program(**inputs)``.

    Args:
        program: a rewritten rank program (collectives as ``call_function`` nodes); it is not run.
        inputs: keyword arguments of the call; only their shapes and dtypes matter.
        tp: the tensor-parallel degree (all-gather widths and ring traffic).

    Returns:
        The forward collectives in graph order, then the backward ones in reverse graph order.

    Raises:
        CommTableError: a collective has no rule in :data:`RULES`, or shapes cannot be propagated.
    """
    inputs = graph_inputs(program, inputs)
    gm = graph_module_for_call(program, inputs)
    unknown = {COLLECTIVES[n.target] for n in _collective_nodes(gm)} - RULES.keys()
    if unknown:
        raise CommTableError(f"collective(s) {sorted(unknown)} have no rule in the op registry (passes/ops.py); "
                             "register each with a CollectiveRule saying what it sends forward and backward")
    seen = FakeRun(gm, tp).seen(inputs)
    plan = getattr(program, "tpfx_plan", None)  # the linears tpfx shards or pairs, kept whole or not, by module
    sites = site_names(plan.parameters.values()) if plan is not None else {}
    forward, backward = [], []
    for node in _collective_nodes(gm):
        rule, (messages, needs_grad) = RULES[COLLECTIVES[node.target]], seen[node.name]
        if rule.forward:
            forward += [_row(gm, node, "forward", rule.forward, message, tp, sites) for message in messages]
        if rule.backward and needs_grad:
            # the gradient handed backward has the shape of this node's output
            backward.append(_row(gm, node, "backward", rule.backward, seen[node.name + ".out"][0][0], tp, sites))
    return CommTable(tp, tuple(forward + backward[::-1]))


def graph_inputs(program: fx.GraphModule, inputs: dict[str, object]) -> dict[str, object]:
    """The arguments ``program``'s graph gets for the call ``program(**inputs)``: an exported program hands
    its graph more than the call gives (its cache switches, set to off)."""
    return program.call_arguments(**inputs) if hasattr(program, "call_arguments") else inputs


def _collective_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in COLLECTIVES]


def _row(gm: fx.GraphModule, node: fx.Node, direction: str, op: str, tensor: torch.Tensor, tp: int,
         sites: Mapping[str, str]) -> CommRow:
    nbytes = tensor.numel() * tensor.element_size()
    return CommRow(node.name, COLLECTIVES[node.target], direction, op, served_module(gm, node, sites),
                   tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), nbytes,
                   float(ring_traffic(op, nbytes, tp)))


def site_names(entries: Iterable[ParameterPlan]) -> dict[str, str]:
    """How the communication table names each linear tpfx shards or pairs: by module path and, for its
    weight, by the module when the weight is that module's only one with a role (a Linear, a Conv1D),
    else by the weight itself (``w_out`` of the model, ``block.w2`` beside ``block.w1``)."""
    entries = [entry for entry in entries if entry.role]
    weights: dict[str, list[str]] = {}
    for entry in entries:
        if len(entry.full_shape) >= 2:
            weights.setdefault(entry.module_path, []).append(entry.name)
    names = {path: path for path in weights if path}
    for entry in entries:  # a bias is named like its module's weight
        alone = entry.module_path and len(weights.get(entry.module_path, ())) == 1
        names[entry.name] = entry.module_path if alone else entry.name
    return names


def served_module(gm: fx.GraphModule, node: fx.Node, sites: Mapping[str, str] | None = None) -> str:
    """The sharded linear next to a collective node, "" if none: a :mod:`tpfx.layers` module, or one of
    ``sites`` (:func:`site_names`: module paths and weight names, with the name to show).

    A loss over split logits serves the LM head its logits come from (through the views between them).
    """
    sites = sites or {}
    module = _next_to(gm, node, sites)
    rule = RULES.get(COLLECTIVES.get(node.target, ""))
    while not module and rule is not None and rule.row_statistics and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        module = _next_to(gm, node, sites)
    return module


def _next_to(gm: fx.GraphModule, node: fx.Node, sites: Mapping[str, str]) -> str:
    neighbours = [a for a in node.args if isinstance(a, fx.Node)] + list(node.users)
    for neighbour in neighbours:
        if neighbour.op == "call_module" and (str(neighbour.target) in sites
                                              or is_sharded_module(gm.get_submodule(neighbour.target))):
            return str(neighbour.target)  # a site kept whole (grouped-query k/v) is named too
        # an exported graph (or an op on a parameter) reads the weight with get_attr instead
        for weight in (str(a.target) for a in neighbour.all_input_nodes if a.op == "get_attr"):
            if weight in sites:
                return sites[weight]
            owner = weight.rpartition(".")[0]
            if owner and is_sharded_module(gm.get_submodule(owner)):
                return owner
    return ""


def is_sharded_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds a shard: tpfx's runtime layers live in :mod:`tpfx.layers`."""
    return type(module).__module__ == "tpfx.layers"


class FakeRun(fx.Interpreter):
    """Runs a graph on fake tensors; collectives produce their output shape without communicating.

    ``context`` (a callable returning a context manager) is entered around the run, inside the fake
    mode and with gradients on: :mod:`tpfx.passes.activation_memory` counts saved tensors with it.
    """

    def __init__(self, gm: fx.GraphModule, tp: int, context: Any = contextlib.nullcontext) -> None:
        super().__init__(gm)
        self.tp, self.context = tp, context
        self.observed: dict[str, tuple[list[torch.Tensor], bool]] = {}

    def seen(self, inputs: dict[str, object]) -> dict[str, tuple[list[torch.Tensor], bool]]:
        """node name -> (tensors handed to its collectives, whether its input needs a gradient); ``name.out``
        for outputs. A loss over split logits hands its row statistics, one tensor per all-reduce."""
        mode = FakeTensorMode(allow_non_fake_inputs=True)  # parameters stay real; the mode fakes them on use
        with mode, torch.enable_grad(), self.context():
            fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            names = [n.target for n in self.graph.nodes if n.op == "placeholder"]
            params = inspect.signature(self.module.forward).parameters
            args = [fake.get(name, _default(params, name)) for name in names]
            try:
                self.run(*args)
            except TpfxError:
                raise
            except Exception as error:  # any op's complaint about shapes; name the node it happened at
                raise CommTableError(f"cannot propagate shapes through node '{self._current}' of the graph: "
                                     f"{one_line(error)}; "
                                     "check that the inputs fit the model (batch, seq, dtype)") from error
        return self.observed

    def run_node(self, node: fx.Node) -> Any:
        self._current = node.name
        return super().run_node(node)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        # ops on a rank's part (tpfx.rank_parts): their shapes are the same on every rank, no group needed
        if target is rank_part:
            tensor, dim, _ = args
            return take_part(tensor, dim, 0, self.tp, **kwargs)
        if target in (dropout_rank_part, dropout_module_rank_part):
            # a new tensor of the input's shape, as a dropout returns; the mask it multiplies by is saved
            return args[0] * torch.ones_like(args[0])
        if target is attention_rank_part:
            query, key, value, attn_mask, _, is_causal, scale = args
            return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                                    is_causal=is_causal, scale=scale,
                                                                    enable_gqa=kwargs.get("enable_gqa", False))
        if target is embedding_rank_part:
            return torch.nn.functional.embedding(args[0], args[1])
        if target not in COLLECTIVES:
            return super().call_function(target, args, kwargs)
        local = args[0]
        rule = RULES[COLLECTIVES[target]]
        if rule.bucket:  # each tensor passed through; backward, their gradients as one flat tensor
            flat = torch.cat([tensor.reshape(-1) for tensor in local])
            needs_grad = any(tensor.requires_grad for tensor in local)
            self.observed[self._current] = ([flat], needs_grad)
            self.observed[self._current + ".out"] = ([flat], needs_grad)
            return tuple(tensor.view_as(tensor) for tensor in local)
        messages = [local]
        if rule.row_statistics:  # per row of the split logits: its statistics, the loss as the op computes it
            rows = local.numel() // local.shape[-1]
            messages = [local.new_empty((rows,) if width == 1 else (rows, width)) for width in rule.row_statistics]
            out = rule.local_equivalent(*args[:2], **kwargs)
        else:
            out = _output_like(local, rule, args, self.tp)
        self.observed[self._current] = (messages, local.requires_grad)
        self.observed[self._current + ".out"] = ([out], out.requires_grad)
        return out


def _output_like(local: torch.Tensor, rule: CollectiveRule, args: tuple, tp: int) -> torch.Tensor:
    """A (fake) tensor of the collective's forward output shape, from the tensor handed to it."""
    if rule.gathers_last_dim:
        return local.repeat(*([1] * (local.dim() - 1)), tp)
    if rule.resizes_dim:
        dim = args[1] % local.dim()
        if rule.resizes_dim > 0:
            return local.repeat(*[tp if d == dim else 1 for d in range(local.dim())])
        return local.narrow(dim, 0, local.shape[dim] // tp) * 1
    return local.view_as(local)


def _default(params: dict[str, inspect.Parameter], name: str) -> object:
    parameter = params.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
