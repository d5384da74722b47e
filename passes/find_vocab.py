"""Analysis: find the token embedding and the LM head by graph structure, and what reads the logits.

before (graph)::

    x = self.token_embedding(input_ids)                  # ids from a graph input into a parameter table
    ...
    logits = self.lm_head(self.ln_f(h))                  # out_features = the table's rows (or tied, or -> loss)
    loss = F.cross_entropy(logits[:, :-1].contiguous().view(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
    return logits, loss

after (records)::

    VocabTable(key="token_embedding", weight_name="token_embedding.weight", shape=(10000, 128), ...)
    VocabHead(key="lm_head", weight_name="lm_head.weight", weight_shape=(10000, 128), ...)
    LogitsRegion(losses=(VocabLoss(node="cross_entropy", logits="view_2", ...),),
                 outputs=("lm_head",), boundaries=(), shape_edits=())

A *table* is an embedding lookup (the op registry's ``Kind.EMBEDDING``: ``nn.Embedding``,
``F.embedding``, ``aten.embedding``) of integer ids that come from a graph input through shape ops
only, into a parameter. An *LM head* is a linear that no mode shards, whose output (the logits) is
the model output or feeds a cross-entropy over its last dim, and whose output features are a
table's rows, or whose weight is a table's (tied), or which feeds such a loss.

The *logits region* (:func:`logits_region`) is what the logits flow through while every op keeps
the vocabulary as the last dim and acts on each vocabulary entry alone: casts, copies, slices and
indexing of other dims, views that keep the last dim, elementwise ops with scalars, metadata checks.
It ends at a cross-entropy (or ``nll_loss`` of a ``log_softmax`` over the last dim), which the rewrite
replaces by the vocabulary-parallel one, at the model output, and at any other op: a *boundary*,
where the rewrite all-gathers the logits first (so whatever tpfx does not understand sees the full
logits, as on one device). A view's literal vocabulary size is recorded as a
:class:`~tpfx.passes.localize_shapes.ShapeEdit` (divided by tp).

A table or head stays whole (a :class:`VocabWhole` with the reason) when tp does not divide the
vocabulary, when its lookup uses options a split table cannot keep (``max_norm``, ``sparse``,
``scale_grad_by_freq``), when its module has hooks, when its weight is read elsewhere, or when the
tensor it shares (tied) stays whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from tpfx.passes.graph_view import linear_applications, parameter_shapes, read_as_layer_operand
from tpfx.passes.localize_shapes import ShapeEdit
from tpfx.passes.module_hooks import Placement, hooks_keep_whole, module_hooks
from tpfx.passes.ops import Flow, Kind, embedding_call, loss_call, rule_of

TABLE, HEAD = "embedding", "lm_head"  # the plan roles of a vocab-parallel table and head


@dataclass(frozen=True)
class VocabTable:
    """An embedding table split by vocabulary rows: each rank holds rows / tp of them."""

    key: str  # the module path (a module call) or the table's parameter name (an op on it)
    module_path: str
    weight_name: str
    node_name: str
    shape: tuple[int, ...]
    functional: bool
    padding_idx: int | None = None


@dataclass(frozen=True)
class VocabHead:
    """An LM head column-split by vocabulary: each rank computes the logits of its rows / tp of the vocabulary."""

    key: str
    module_path: str
    weight_name: str
    bias_name: str  # "" when it has none
    node_name: str
    weight_shape: tuple[int, ...]
    layout: str  # "out_in" (rows are the vocabulary) or "in_out" (columns are)
    functional: bool
    feeds_loss: bool  # a cross-entropy over its logits is replaced by the vocabulary-parallel one
    outputs: bool = False  # the model output holds its logits (gathered, unless the caller asks for them sharded)

    @property
    def vocab_dim(self) -> int:
        """The dimension of the stored weight that holds the vocabulary."""
        return 0 if self.layout == "out_in" else 1


@dataclass(frozen=True)
class VocabWhole:
    """A table or LM head that stays whole on every rank, and why."""

    role: str  # TABLE or HEAD
    module_path: str
    weight_name: str
    node_name: str
    weight_shape: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class VocabFinding:
    """The tables and heads to split, those kept whole with reasons, and what the logits feed."""

    tables: tuple[VocabTable, ...] = ()
    heads: tuple[VocabHead, ...] = ()
    whole: tuple[VocabWhole, ...] = ()

    def keys(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The keys of the tables and of the heads: what another call form's graph is searched for."""
        return tuple(t.key for t in self.tables), tuple(h.key for h in self.heads)


@dataclass(frozen=True)
class VocabLoss:
    """A cross-entropy over split logits: ``node`` (and the ``log_softmax`` it reads, for an nll) is replaced."""

    node: str
    logits: str  # the region node whose values it reads
    log_softmax: str  # "" for a cross-entropy
    target: object  # a node or a constant
    ignore_index: object
    reduction: str


@dataclass(frozen=True)
class LogitsRegion:
    """What split logits flow through in one graph, and where they stop."""

    nodes: tuple[str, ...]
    losses: tuple[VocabLoss, ...]
    shape_edits: tuple[ShapeEdit, ...]
    boundaries: tuple[tuple[str, str], ...]  # (region node, consumer): the consumer reads gathered logits
    outputs: tuple[str, ...]  # region nodes the graph returns


# ------------------------------------------------------------------------------------------ finding


def find_vocab(gm: fx.GraphModule, *, tp: int, taken: frozenset[str] = frozenset()) -> VocabFinding:
    """Find the token tables and LM heads of ``gm`` and decide which are split by vocabulary.

    Args:
        gm: a captured graph (fx or export) with full-size parameters; fake values on its nodes
            (``node.meta["val"]``) let the logits region pass views and slices.
        tp: the tensor-parallel degree (a vocabulary it does not divide stays whole).
        taken: parameter names the mode's plan already shards (its sites and row linears).

    Returns:
        The tables and heads to split, and those kept whole with the reason.
    """
    parameters = parameter_shapes(gm)
    modules = dict(gm.named_modules())
    tables = _tables(gm, modules, parameters)
    vocabularies = {table.shape[0] for table in tables}
    table_names = {other for table in tables for other in _names_of(gm, table.weight_name)}
    heads: list[VocabHead] = []
    for key, applications in linear_applications(gm).items():
        node, _, functional = applications[0][1]
        head = _head(gm, modules, parameters, node, functional, key, (vocabularies, table_names), taken)
        if head is not None:
            heads.append(head)
    return _decide(gm, modules, parameters, tables, heads, tp)


def _tables(gm: fx.GraphModule, modules: dict[str, nn.Module], parameters: dict[str, tuple[int, ...]]
            ) -> list[VocabTable]:
    """Every lookup of graph-input ids into a parameter table, one per table (the first lookup)."""
    found: dict[str, VocabTable] = {}
    for node in gm.graph.nodes:
        call = embedding_call(node, modules)
        if call is None or not _from_input(call.ids, modules):
            continue
        if node.op == "call_module":
            path = str(node.target)
            weight = f"{path}.weight"
            found.setdefault(path, VocabTable(path, path, weight, node.name, parameters[weight], False,
                                              call.padding_idx))
        elif isinstance(call.weight, fx.Node) and call.weight.op == "get_attr" and call.weight.target in parameters:
            weight = str(call.weight.target)
            # reports name it by its first name (export reads a tied table under the head's name)
            first = _names_of(gm, weight)[0]
            found.setdefault(weight, VocabTable(weight, first.rpartition(".")[0] or first, weight, node.name,
                                                parameters[weight], True, call.padding_idx))
    return list(found.values())


def _from_input(ids: object, modules: dict[str, nn.Module]) -> bool:
    """Whether ``ids`` is a graph input, or one reached through shape ops (views, casts) only."""
    while isinstance(ids, fx.Node):
        if ids.op == "placeholder":
            return True
        rule = rule_of(ids, modules)
        if rule is None or rule.kind is not Kind.SHAPE or not ids.args:
            return False
        ids = ids.args[0]
    return False


def _head(gm: fx.GraphModule, modules: dict[str, nn.Module], parameters: dict[str, tuple[int, ...]],
          node: fx.Node, functional: object, key: str, tables: tuple[set[int], set[str]], taken: frozenset[str]
          ) -> VocabHead | None:
    """The head record of a linear whose logits reach a loss or the output (None when it is not a head).

    ``tables``: the tables' row counts (vocabularies) and every name of their weights (a tied head's is one).
    """
    if functional is None:
        module = modules[key]
        if (rule := rule_of(node, modules)) is None or rule.kind is not Kind.LINEAR:
            return None  # linear_applications lists every module call
        weight, bias = f"{key}.weight", f"{key}.bias" if getattr(module, "bias", None) is not None else ""
        layout, path = "out_in", key
    else:
        weight, bias, layout = functional.weight, functional.bias or "", functional.layout
        path = weight.rpartition(".")[0] or weight
    if weight in taken or weight not in parameters or len(parameters[weight]) != 2:
        return None
    out_features = parameters[weight][0 if layout == "out_in" else 1]
    region = logits_region(gm, node, width=out_features, gather_outputs=True)
    vocabularies, table_names = tables
    if not (region.losses or (region.outputs and (out_features in vocabularies or weight in table_names))):
        return None
    return VocabHead(key, path, weight, bias, node.name, parameters[weight], layout, functional is not None,
                     bool(region.losses), bool(region.outputs))


def _names_of(gm: fx.GraphModule, name: str) -> list[str]:
    """Every qualified name of the parameter ``name`` (several when it is tied)."""
    target = gm.get_parameter(name)
    return [other for other, parameter in gm.named_parameters(remove_duplicate=False) if parameter is target]


def _decide(gm: fx.GraphModule, modules: dict[str, nn.Module], parameters: dict[str, tuple[int, ...]],
            tables: list[VocabTable], heads: list[VocabHead], tp: int) -> VocabFinding:
    """Split each table and head that can be, keep the others whole with the reason (tied ones together)."""
    reasons: dict[str, str] = {}
    for table in tables:
        reasons[table.weight_name] = _table_reason(gm, modules, table, tp)
    for head in heads:
        reasons[head.weight_name] = _head_reason(gm, modules, head, tp)
    for name in list(reasons):
        if not reasons[name] and (elsewhere := _other_reads(gm, modules, parameters, name)):
            reasons[name] = (f"its weight is also read by node '{elsewhere}', which is not a lookup or LM head; "
                             "splitting it would change what that node sees")
    read = _read_names(gm, modules)
    aliases = {name: [other for other in _names_of(gm, name) if other in read and other != name] for name in reasons}
    changed = True
    while changed:  # a tied tensor splits under all its names the graph reads, or none (until nothing changes)
        changed = False
        for name in (name for name in reasons if not reasons[name]):
            for other in aliases[name]:
                if other not in reasons:
                    reasons[name] = (f"it is one tensor with '{other}' (tied), which is not an embedding lookup "
                                     "or LM head tpfx splits")
                elif reasons[other]:
                    reasons[name] = f"it is one tensor with '{other}' (tied), which stays whole: {reasons[other]}"
                changed = changed or bool(reasons[name])
                if reasons[name]:
                    break
    whole = [VocabWhole(role, r.module_path, r.weight_name, r.node_name,
                        r.shape if role == TABLE else r.weight_shape, reasons[r.weight_name])
             for role, records in ((TABLE, tables), (HEAD, heads)) for r in records if reasons[r.weight_name]]
    return VocabFinding(tuple(t for t in tables if not reasons[t.weight_name]),
                        tuple(h for h in heads if not reasons[h.weight_name]), tuple(whole))


def _table_reason(gm: fx.GraphModule, modules: dict[str, nn.Module], table: VocabTable, tp: int) -> str:
    rows = table.shape[0]
    if rows % tp:
        return (f"its vocabulary of {rows} rows is not divisible by tp={tp}; the embedding and LM head stay whole "
                f"(use a tp that divides {rows}, or pad the vocabulary to a multiple of tp)")
    node = next(n for n in gm.graph.nodes if n.name == table.node_name)
    call = embedding_call(node, modules)
    for option, value in (("max_norm", call.max_norm), ("sparse", call.sparse),
                          ("scale_grad_by_freq", call.scale_grad_by_freq)):
        if value not in (None, False):
            return f"its lookup uses {option}={value!r}, which a table split by rows cannot keep"
    if not table.functional and module_hooks(modules[table.key]):
        return "its module has hooks, which would see this rank's part of the lookup instead of the whole"
    return ""


def _head_reason(gm: fx.GraphModule, modules: dict[str, nn.Module], head: VocabHead, tp: int) -> str:
    vocab = head.weight_shape[head.vocab_dim]
    if vocab % tp:
        return (f"its {vocab} output features (the vocabulary) are not divisible by tp={tp}; the LM head and "
                f"embedding stay whole (use a tp that divides {vocab}, or pad the vocabulary to a multiple of tp)")
    if not head.functional:
        return hooks_keep_whole(modules[head.key], head.module_path, Placement.COLUMN)
    return ""


def _read_names(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> set[str]:
    """The parameter names the graph reads: get_attr targets, and the parameters of the modules it calls."""
    read = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:  # export may leave an unused read of a tied name
            read.add(str(node.target))
        elif node.op == "call_module":
            read |= {f"{node.target}.{leaf}" for leaf, _ in modules[str(node.target)].named_parameters()}
    return read


def _other_reads(gm: fx.GraphModule, modules: dict[str, nn.Module], parameters: dict[str, tuple[int, ...]],
                 weight: str) -> str:
    """The first node that reads ``weight`` (any of its names) but is not a table lookup or head; "" if none."""
    names = set(_names_of(gm, weight))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in names:
            for user in node.users:
                if not read_as_layer_operand(user, node, parameters, modules, bias_too=False):
                    return user.name
    return ""


# ------------------------------------------------------------------------------------------ the logits region


def logits_region(gm: fx.GraphModule, head: fx.Node, *, width: int, gather_outputs: bool) -> LogitsRegion:
    """Follow the logits of ``head`` (last dim ``width``, the full vocabulary) while each op keeps them split.

    Args:
        gm: the graph; fake values on its nodes let views and slices pass (without them they are boundaries).
        head: the LM head's node.
        width: the full vocabulary (a view's literal of that size is divided by tp).
        gather_outputs: whether the model output is a boundary (logits gathered) or returns them split.

    Returns:
        The region's nodes, its losses, shape edits, boundaries and outputs.
    """
    modules = dict(gm.named_modules())
    region: dict[str, fx.Node] = {head.name: head}
    frontier = [head]
    losses: dict[str, VocabLoss] = {}
    edits: list[ShapeEdit] = []
    boundaries: list[tuple[str, str]] = []
    outputs: list[str] = []
    while frontier:
        producer = frontier.pop(0)
        for user in list(producer.users):
            if user.op == "output":
                outputs.append(producer.name)
                if gather_outputs:
                    boundaries.append((producer.name, user.name))
                continue
            verdict = _follow(user, producer, region, width, modules)
            if isinstance(verdict, VocabLoss):
                losses[verdict.node] = verdict
            elif verdict is _LEAF:
                continue
            elif verdict is None:
                boundaries.append((producer.name, user.name))
            elif user.name not in region:
                edits += verdict
                region[user.name] = user
                frontier.append(user)
    return LogitsRegion(tuple(region), tuple(losses.values()), tuple(edits), tuple(dict.fromkeys(boundaries)),
                        tuple(dict.fromkeys(outputs)))


_LEAF = object()  # a node that reads split logits and yields nothing to follow (a metadata check)


def _follow(node: fx.Node, producer: fx.Node, region: dict[str, fx.Node], width: int,
            modules: dict[str, nn.Module]) -> object:
    """What ``node`` does with the split logits ``producer``: a list of shape edits (it keeps them split),
    a :class:`VocabLoss`, ``_LEAF``, or None (a boundary: it needs the full logits)."""
    rule = rule_of(node, modules)
    if rule is None:
        return None
    data = node.args[0] if node.args else None
    if rule.flow is Flow.IGNORE:
        return _LEAF if not {"size", "stride"} & node.kwargs.keys() else None
    if rule.flow is Flow.SIZE:
        return _LEAF if _size_read_stays_local(node, producer, region) else None
    if rule.kind is Kind.LOSS or rule.kind is Kind.SOFTMAX:
        return _loss(node, producer, modules)
    if data is not producer or any(isinstance(a, fx.Node) and a is producer for a in node.args[1:]):
        return None  # the logits enter as something else than the data operand
    if rule.flow is Flow.UNARY and rule.kind in (Kind.SHAPE, Kind.ELEMENTWISE, Kind.ACTIVATION):
        return [] if _scalars_only(node) else None
    if rule.flow is Flow.BROADCAST and rule.kind in (Kind.ELEMENTWISE, Kind.ACTIVATION):
        return [] if _scalars_only(node) else None
    rank = _rank(producer)
    if rank is None:
        return None
    if rule.flow is Flow.SLICE or rule.flow is Flow.SELECT:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return [] if isinstance(dim, int) and dim % rank != rank - 1 else None
    if rule.flow is Flow.GETITEM:
        return [] if _index_keeps_last(node.args[1] if len(node.args) > 1 else None, rank) else None
    if rule.flow is Flow.FLATTEN:
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return [] if isinstance(end, int) and end % rank != rank - 1 else None
    if rule.flow is Flow.VIEW:
        return _view_edits(node, producer, region, width)
    return None


def _scalars_only(node: fx.Node) -> bool:
    """Whether every operand but the data one is a constant (``logits / temperature``, ``tanh(logits)``)."""
    return not any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]
                   if not isinstance(a, (torch.dtype, torch.device)))


def _rank(node: fx.Node) -> int | None:
    value = node.meta.get("val")
    return value.dim() if isinstance(value, torch.Tensor) else None


def _last_size(node: fx.Node) -> object:
    value = node.meta.get("val")
    return value.shape[-1] if isinstance(value, torch.Tensor) and value.dim() else None


def _index_keeps_last(index: object, rank: int) -> bool:
    """Whether ``x[index]`` leaves the last dim of a rank-``rank`` tensor whole and last (basic indexing only)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(not (item is None or item is Ellipsis or isinstance(item, (int, slice))) for item in items):
        return False  # a tensor index, or a size computed in the graph
    if Ellipsis in items:
        after = items[items.index(Ellipsis) + 1:]
        consumed = [item for item in after if item is not None]
        return not consumed or consumed[-1] == slice(None)
    consumed = [item for item in items if item is not None]
    return len(consumed) < rank or consumed[-1] == slice(None)


def _view_edits(node: fx.Node, producer: fx.Node, region: dict[str, fx.Node], width: int) -> list[ShapeEdit] | None:
    """A view that keeps the last dim (row-major: same last size, so leading dims only are reshaped)."""
    before, after = _last_size(producer), _last_size(node)
    if before is None or after is None or before != after:
        return None
    sizes = node.args[1:]
    path: tuple[int, ...] = (len(node.args) - 1,)
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes, path = sizes[0], (1, len(sizes[0]) - 1)
    last = sizes[-1] if sizes else None
    if last == -1:
        return []
    if isinstance(last, int):
        return [ShapeEdit(node.name, path, last)] if last == width else None
    if isinstance(last, fx.Node) and _reads_last_size(last, region):
        return []  # the rank's own size, read off split logits at run time
    return None


def _reads_last_size(node: fx.Node, region: dict[str, fx.Node]) -> bool:
    """Whether ``node`` reads the last size of a region tensor (``x.size(-1)``, ``aten.sym_size(x, d)``)."""
    rule = rule_of(node, {})
    if rule is None or rule.flow is not Flow.SIZE or not node.args or node.args[0] not in region.values():
        return False
    dim = node.args[1] if len(node.args) > 1 else None
    rank = _rank(node.args[0])
    return isinstance(dim, int) and rank is not None and dim % rank == rank - 1 and len(node.users) == 1


def _size_read_stays_local(node: fx.Node, producer: fx.Node, region: dict[str, fx.Node]) -> bool:
    """A size read of split logits: of another dim, or of the vocabulary by a view of the region (the local
    size is what that view needs). Any other read needs the full size: the logits are gathered for it."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    rank = _rank(producer)
    if not isinstance(dim, int) or rank is None or node.args[0] is not producer:
        return False
    if dim % rank != rank - 1:
        return True
    return all(rule_of(user, {}) is not None and rule_of(user, {}).flow is Flow.VIEW and user.args[0] in region.values()
               for user in node.users) and bool(node.users)


def _loss(node: fx.Node, producer: fx.Node, modules: dict[str, nn.Module]) -> VocabLoss | None:
    """The cross-entropy that ``node`` computes over the split logits, if the parallel one can replace it."""
    rank = _rank(producer)
    if rank not in (1, 2):  # the classes are dim 1 (dim 0 unbatched): the last dim only for these ranks
        return None
    call = loss_call(node)
    if call is not None:
        return _supported(node, call, producer, "") if call.input is producer and not call.log_probabilities else None
    # log_softmax over the last dim whose every user is an nll loss
    rule = rule_of(node, modules)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    extra = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype", node.kwargs.get("half_to_float"))
    if rule is None or rule.name != "log_softmax" or node.args[0] is not producer or not isinstance(dim, int):
        return None
    if dim % rank != rank - 1 or extra not in (None, False) or len(node.users) != 1:
        return None
    (user,) = node.users
    call = loss_call(user)
    if call is None or not call.log_probabilities or call.input is not node:
        return None
    return _supported(user, call, producer, node.name)


def _supported(node: fx.Node, call: object, producer: fx.Node, log_softmax: str) -> VocabLoss | None:
    if call.unsupported or call.target is producer:
        return None
    return VocabLoss(node.name, producer.name, log_softmax, call.target, call.ignore_index, call.reduction)
