"""Rewrite: sequence parallelism, the residual stream between Megatron pairs split along the sequence.

before (a megatron program, one block; tp=2, x is (B, T, d))::

    copy_to_tp = copy_to_tp(ln1, 'tp:0-1')                     # identity fwd / all-reduce bwd
    qkv = self.qkv_proj(copy_to_tp) ...                        # the pair, on this rank's heads
    reduce_from_tp = reduce_from_tp(out_proj, 'tp:0-1')        # all-reduce fwd
    add = reduce_from_tp + out_proj_bias
    x_1 = x + self.dropout(add);  ln2 = self.ln2(x_1)

after (x is this rank's (B, T/2, d))::

    gather_from_sequence = gather_from_sequence(ln1, -2, 'tp:0-1')        # all-gather fwd / reduce-scatter bwd
    qkv = self.qkv_proj(gather_from_sequence) ...
    reduce_scatter = reduce_scatter_to_sequence(out_proj, -2, 'tp:0-1')    # reduce-scatter fwd / all-gather bwd
    copy_to_tp = copy_to_tp(out_proj_bias, 'tp:0-1')                      # its gradient: the sum over every rank's tokens
    add = reduce_scatter + copy_to_tp
    x_1 = x + dropout_module_rank_part(add, self.dropout, -2, 'tp:0-1')   # this rank's part of the whole mask
    ln2 = call_with_parameters(self.ln2, {'weight': copy_to_tp_1, 'bias': copy_to_tp_2}, (x_1,), {})

The region is found by structure, on a megatron program (its collectives are in the graph):

* **the sequence dim** of a value is the dim whose size is the symbol of dim 1 of a graph input (the
  symbolic shapes of :mod:`tpfx.passes.fake_shapes`, or torch.export's); a value with none, or two (the
  (T, T) scores), has no place in the region;
* **token-wise ops** keep each token's values apart (the op registry's unary, broadcast, norm over
  trailing dims, reduction over other dims with keepdim, dropout), with the sequence dim of every
  tensor operand at the same place (counted from the end) or absent (a bias, a norm weight: broadcast);
* **seeds**: a collective whose registry rule has ``into_sequence`` (``reduce_from_tp`` after a
  row-parallel linear, or any sum that can end in a reduce-scatter) and whose output a token-wise
  op reads. The region grows from them to every token-wise user, and back to a token-wise producer
  whose users all stay in the region and which brings at most one new entry (so the region starts
  after the embeddings' sum, not before each of them);
* **entries**: a tensor every rank holds whole, read in the region: ``split_to_sequence``;
* **exits**: a collective whose rule has ``from_sequence`` (``copy_to_tp`` before a pair's column
  linears) is replaced by it; any other reader (an op that mixes tokens: attention outside a pair,
  a cumsum, the LM head, the model output) reads ``gather_sequence_whole`` of the value;
* a tensor without the sequence dim that needs a gradient (a norm's weight, a row linear's bias)
  read in the region has its gradient summed over the ranks (``copy_to_tp``, as megatron mode does
  for whole tensors read on a rank's heads); a dropout in the region draws the whole tensor's mask
  and keeps the rank's part; a size read of a value in the region is made the whole sequence's again.

Sequence lengths that tp does not divide are refused by the collectives at run time, in one line,
before any of them communicates.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from tpfx.collectives import gather_sequence_whole, split_to_sequence
from tpfx.passes.localize_shapes import FullSize, restore_full_sizes
from tpfx.passes.ops import CollectiveRule, Flow, Kind, dropout_probability, rule_of
from tpfx.passes.pair_megatron import HeadDropout, ReplicatedRead
from tpfx.passes.row_shard import draw_dropouts_per_rank, sum_replicated_gradients

aten = torch.ops.aten


@dataclass(frozen=True)
class SequenceBoundary:
    """A value crossing the region's edge: ``producer`` (its sequence dim ``dim``, < 0) read by ``consumers``."""

    producer: str
    dim: int
    consumers: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.dim >= 0:
            raise ValueError(f"boundary at {self.producer}: dim {self.dim} must count from the end (< 0)")


@dataclass(frozen=True)
class SequenceRegion:
    """Where a program's values are split along the sequence, and what the rewrite does at its edges.

    ``nodes`` run on the rank's slice (graph order). ``seeds`` are collectives whose output enters it
    (replaced by their ``into_sequence`` form); ``entries`` whole tensors split where the region reads
    them; ``converted`` collectives reading the region (replaced by their ``from_sequence`` form);
    ``exits`` values gathered whole for readers outside it. ``reason`` says why the region is empty.
    """

    nodes: tuple[str, ...] = ()
    seeds: tuple[SequenceBoundary, ...] = ()
    entries: tuple[SequenceBoundary, ...] = ()
    converted: tuple[SequenceBoundary, ...] = ()
    exits: tuple[SequenceBoundary, ...] = ()
    dropouts: tuple[HeadDropout, ...] = ()
    reads: tuple[ReplicatedRead, ...] = ()
    full_sizes: tuple[FullSize, ...] = ()
    reason: str = ""

    def describe(self) -> str:
        """One line: how many ops run on the sequence slice and what crosses the edges."""
        if not self.nodes:
            return f"sequence parallel: no region ({self.reason})"
        return (f"sequence parallel: {len(self.nodes)} ops on 1/tp of the sequence; {len(self.seeds)} reduce-scatter(s) "
                f"in, {len(self.converted)} all-gather(s) before column-parallel linears, {len(self.entries)} split(s) "
                f"of whole tensors, {len(self.exits)} all-gather(s) to whole-sequence ops; {len(self.dropouts)} "
                f"dropout(s) and {len(self.reads)} parameter read(s) with summed gradients on the slice")


# ------------------------------------------------------------------------------------------------ shapes

class SequenceShapes:
    """Each value's rank (number of dims) and the dims (counted from the end) that hold the sequence.

    Read from ``node.meta["val"]``; a node the megatron rewrite inserted has none, and takes its
    operands' (a collective or a unary op: its input's; a broadcast op: its operands' broadcast).
    """

    def __init__(self, gm: fx.GraphModule, symbols: set[object], modules: dict[str, nn.Module]) -> None:
        self.gm, self.symbols, self.modules = gm, symbols, modules
        self.memo: dict[fx.Node, tuple[int, tuple[int, ...]] | None] = {}

    def of(self, node: object) -> tuple[int, tuple[int, ...]] | None:
        """(rank, sequence dims counted from the end) of a tensor value; None for anything else."""
        if not isinstance(node, fx.Node):
            return None
        if node not in self.memo:
            self.memo[node] = self._compute(node)
        return self.memo[node]

    def seq_dim(self, node: object) -> int | None:
        """The one sequence dim of a tensor value (< 0), or None (none, several, not a tensor)."""
        shape = self.of(node)
        return shape[1][0] if shape is not None and len(shape[1]) == 1 else None

    def _compute(self, node: fx.Node) -> tuple[int, tuple[int, ...]] | None:
        value = node.meta.get("val")
        if value is None and node.op == "get_attr":  # a parameter the megatron rewrite reads anew (a row bias)
            value = _attribute(self.gm, str(node.target))
        if hasattr(value, "shape") and hasattr(value, "dim"):
            rank = value.dim()
            dims = tuple(d - rank for d, size in enumerate(value.shape) if _symbol_of(size) in self.symbols)
            return rank, dims
        if value is not None or node.op != "call_function":
            return None
        rule = rule_of(node, self.modules)
        if rule is None or rule.flow not in (Flow.UNARY, Flow.BROADCAST):
            return None
        shapes = [self.of(arg) for arg in node.all_input_nodes]
        shapes = [shape for shape in shapes if shape is not None]
        if not shapes:
            return None
        rank = max(shape[0] for shape in shapes)
        return rank, tuple(sorted({d for shape in shapes for d in shape[1]}))


def _attribute(gm: fx.GraphModule, target: str) -> object:
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _symbol_of(size: object) -> object:
    node = getattr(size, "node", None)
    return getattr(node, "expr", None) if node is not None else None


def sequence_symbols(gm: fx.GraphModule) -> set[object]:
    """The symbols of dim 1 of the graph's tensor inputs (the sequence lengths the capture left symbolic)."""
    symbols = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if hasattr(value, "shape") and len(value.shape) >= 2 and _symbol_of(value.shape[1]) is not None:
            symbols.add(_symbol_of(value.shape[1]))
    return symbols


# ---------------------------------------------------------------------------------------------- analysis

def collective_rule(node: fx.Node) -> CollectiveRule | None:
    """The registry's collective rule of a call of a tpfx collective, else None."""
    rule = rule_of(node, {}) if node.op == "call_function" else None
    return rule.collective if rule is not None else None


def _tokenwise_dim(node: fx.Node, shapes: SequenceShapes, modules: dict[str, nn.Module]) -> int | None:
    """The sequence dim of ``node``'s output if the op keeps tokens apart (see the module docstring), else None."""
    rule = rule_of(node, modules)
    dim = shapes.seq_dim(node)
    if rule is None or dim is None or rule.kind in (Kind.COLLECTIVE, Kind.META, Kind.LINEAR):
        return None
    operands = [shapes.of(arg) for arg in node.all_input_nodes]
    # every tensor operand has the sequence at the output's place (from the end) or not at all (broadcast)
    if any(shape is not None and shape[1] not in ((), (dim,)) for shape in operands):
        return None
    if rule.flow is Flow.BROADCAST:
        return dim
    if rule.flow is Flow.UNARY:  # the data operand carries the sequence (other arguments are scalars)
        return dim if node.args and shapes.seq_dim(node.args[0]) == dim else None
    if rule.flow is Flow.NORM:
        normalized = (modules[str(node.target)].normalized_shape if rule.reduction.normalized_shape is None
                      else rule.reduction.normalized_shape.read(node))
        count = 1 if isinstance(normalized, int) else len(normalized)
        return dim if -dim > count and shapes.seq_dim(node.args[0]) == dim else None
    if rule.flow is Flow.REDUCE:
        dims, keepdim = rule.reduction.dims.read(node), rule.reduction.keepdim and rule.reduction.keepdim.read(node)
        rank = shapes.of(node)[0]
        listed = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else None
        if keepdim is not True or not listed or any(not isinstance(d, int) for d in listed):
            return None
        return dim if all((d % rank) - rank != dim for d in listed) else None
    return None


class _Growth:
    """The region as it grows: node -> its sequence dim, from the seeds to every token-wise neighbour."""

    def __init__(self, gm: fx.GraphModule, shapes: SequenceShapes, modules: dict[str, nn.Module]) -> None:
        self.gm, self.shapes, self.modules = gm, shapes, modules
        self.region: dict[fx.Node, int] = {}
        self.tokenwise: dict[fx.Node, int | None] = {}

    def dim(self, node: fx.Node) -> int | None:
        if node not in self.tokenwise:
            self.tokenwise[node] = _tokenwise_dim(node, self.shapes, self.modules)
        return self.tokenwise[node]

    def reader_allowed(self, user: fx.Node) -> bool:
        """A reader that may read a value of the region as it is: in it, token-wise, a size, a collective
        that has a sequence form, or a metadata assertion."""
        if user in self.region or self.dim(user) is not None:
            return True
        rule = rule_of(user, self.modules)
        collective = collective_rule(user)
        return (rule is not None and rule.kind is Kind.META) or (collective is not None and collective.from_sequence
                                                                 is not None)

    def grow(self, seeds: list[fx.Node]) -> None:
        work = list(seeds)
        for seed in seeds:
            self.region[seed] = self.shapes.seq_dim(seed)
        while work:
            node = work.pop()
            for user in node.users:
                if user not in self.region and self.dim(user) is not None:
                    self.region[user] = self.dim(user)
                    work.append(user)
            if node in seeds:
                continue  # a seed's input is a rank's partial sum: it stays outside
            for producer in node.all_input_nodes:
                if producer not in self.region and self._joins_backward(producer):
                    self.region[producer] = self.dim(producer)
                    work.append(producer)

    def _joins_backward(self, producer: fx.Node) -> bool:
        """A token-wise producer joins when every reader of it may read the slice and it brings at most one
        new entry: the region then starts after the last op that combines whole tensors."""
        if self.dim(producer) is None or not all(self.reader_allowed(user) for user in producer.users):
            return False
        outside = [arg for arg in producer.all_input_nodes
                   if arg not in self.region and self.shapes.seq_dim(arg) is not None]
        return len(outside) <= 1


def find_sequence_region(gm: fx.GraphModule) -> SequenceRegion:
    """Find where a megatron program's values can be split along the sequence (see the module docstring).

    Args:
        gm: a megatron program (collectives in the graph) whose nodes carry symbolic shapes.

    Returns:
        The region and its edges; empty, with the reason, when nothing can be split.
    """
    symbols = sequence_symbols(gm)
    if not symbols:
        return SequenceRegion(reason="no graph input has a symbolic sequence dim (dim 1): give example_inputs "
                                     "with a sequence longer than 1")
    modules = dict(gm.named_modules())
    shapes = SequenceShapes(gm, symbols, modules)
    growth = _Growth(gm, shapes, modules)
    seeds = [node for node in gm.graph.nodes if (rule := collective_rule(node)) is not None
             and rule.into_sequence is not None and shapes.seq_dim(node) is not None
             and any(growth.dim(user) is not None for user in node.users)]
    if not seeds:
        sums = [node for node in gm.graph.nodes if (rule := collective_rule(node)) is not None and rule.into_sequence]
        if sums and all(shapes.seq_dim(node) is None for node in sums):
            return SequenceRegion(reason=f"the row-parallel sums ('{sums[0].name}', ...) have no sequence dim: their "
                                         "tokens are flattened and no view restores (batch, seq, width) after them")
        return SequenceRegion(reason="no sum of a row-parallel linear (an all-reduce) has a sequence dim that a "
                                     "token-wise op reads")
    growth.grow(seeds)
    return _edges(gm, growth, shapes, modules, seeds)


def _edges(gm: fx.GraphModule, growth: _Growth, shapes: SequenceShapes, modules: dict[str, nn.Module],
           seeds: list[fx.Node]) -> SequenceRegion:
    region = growth.region
    order = {node: position for position, node in enumerate(gm.graph.nodes)}
    entries: defaultdict[fx.Node, list[str]] = defaultdict(list)
    converted, exits, sizes = [], defaultdict(list), []
    for node in sorted(region, key=order.__getitem__):
        for producer in node.all_input_nodes:
            if node not in seeds and producer not in region and shapes.seq_dim(producer) is not None:
                entries[producer].append(node.name)
        for user in node.users:
            if user in region:
                continue
            rule, collective = rule_of(user, modules), collective_rule(user)
            if rule is not None and rule.kind is Kind.META:
                sizes += _full_size(node, user, region[node], shapes)
            elif collective is not None and collective.from_sequence is not None:
                converted.append(SequenceBoundary(node.name, region[node], (user.name,)))
            elif rule is None or rule.flow is not Flow.IGNORE:
                exits[node].append(user.name)
    ordered = sorted(region, key=order.__getitem__)
    return SequenceRegion(
        nodes=tuple(node.name for node in ordered),
        seeds=tuple(SequenceBoundary(seed.name, region[seed], ()) for seed in seeds),
        entries=tuple(SequenceBoundary(p.name, shapes.seq_dim(p), tuple(c)) for p, c in entries.items()),
        converted=tuple(converted),
        exits=tuple(SequenceBoundary(p.name, region[p], tuple(c)) for p, c in exits.items()),
        dropouts=tuple(HeadDropout(node.name, region[node]) for node in ordered
                       if node not in seeds and dropout_probability(node, modules) is not None),
        reads=_gradient_reads(gm, ordered, region, shapes, modules),
        full_sizes=tuple(sizes))


def _size_read(read: fx.Node) -> tuple[str, object]:
    """What a size read asks: ("numel", None), ("size", dim), ("shape", None), or ("", None) for what
    does not scale with the sequence (dim(), ndim, strides)."""
    if read.op == "call_method":
        asked = read.args[1] if len(read.args) > 1 else read.kwargs.get("dim")
        if read.target == "size":
            return ("size", asked) if asked is not None else ("shape", None)
        return ("numel", None) if read.target == "numel" else ("", None)
    if read.op == "call_function" and read.target is getattr:
        return ("shape", None) if read.args[1] == "shape" else ("", None)
    packet = getattr(read.target, "overloadpacket", None)
    if packet is aten.sym_size:
        return "size", read.args[1]
    return ("numel", None) if packet is aten.sym_numel else ("", None)


def _full_size(node: fx.Node, read: fx.Node, dim: int, shapes: SequenceShapes) -> list[FullSize]:
    """A size read of a value of the region: its uses mean the whole sequence (``read * tp``)."""
    rank = shapes.of(node)[0]
    kind, asked = _size_read(read)
    if kind == "numel" or (kind == "size" and isinstance(asked, int) and asked % rank - rank == dim):
        uses = tuple((read.name, user.name) for user in read.users)
        return [FullSize(read.name, (), 0, (), uses)] if uses else []
    if kind != "shape":
        return []  # another dim's size, dim(), ndim: the same as on one device
    uses: list[tuple[str, str]] = []
    for item in read.users:  # size()[k]: only the sequence's item changes
        index = item.args[1] if item.op == "call_function" and len(item.args) > 1 else None
        if isinstance(index, int):
            if index % rank - rank == dim:
                uses += [(item.name, user.name) for user in item.users]
        else:
            uses.append((read.name, item.name))
    return [FullSize(read.name, (rank + dim,), rank, (), tuple(uses))] if uses else []


def _gradient_reads(gm: fx.GraphModule, ordered: list[fx.Node], region: dict[fx.Node, int], shapes: SequenceShapes,
                    modules: dict[str, nn.Module]) -> tuple[ReplicatedRead, ...]:
    """Tensors without the sequence dim that need a gradient, read in the region (each rank's gradient is
    its tokens' share): a module's own trainable parameters, or a producer computed from a trainable one."""
    trainable = {name for name, p in gm.named_parameters(remove_duplicate=False) if p.requires_grad}

    def trains(node: fx.Node) -> bool:
        return node.op == "call_module" and any(p.requires_grad for p in modules[str(node.target)].parameters())

    needs: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        rule = rule_of(node, modules)
        if rule is not None and rule.kind is Kind.META:
            needs[node] = False
        elif node.op == "get_attr":
            needs[node] = str(node.target) in trainable
        else:
            needs[node] = trains(node) or any(needs.get(p, False) for p in node.all_input_nodes)
    reads = []
    for node in ordered:
        if node.op == "call_module" and trains(node):
            reads.append(ReplicatedRead(node.name, ""))
        # a tensor with the sequence dim is split where the region reads it: its gradient comes back whole
        reads += [ReplicatedRead(node.name, p.name) for p in node.all_input_nodes
                  if p not in region and needs[p] and shapes.of(p) is not None and not shapes.of(p)[1]]
    return tuple(reads)


# ----------------------------------------------------------------------------------------------- rewrite

def shard_sequence(gm: fx.GraphModule, region: SequenceRegion, *, group: str, tp: int) -> tuple[str, ...]:
    """Apply ``region`` to ``gm.graph``: the seeds' and exits' collectives, the splits and gathers, the
    gradient sums, the dropouts and the size reads. Only the graph changes: the caller recompiles.

    Returns:
        The names of the collective nodes inserted or converted, in graph order.
    """
    restore_full_sizes(gm, region.full_sizes, tp=tp)
    nodes = {node.name: node for node in gm.graph.nodes}
    touched: list[fx.Node] = []
    for boundary in region.seeds:  # reduce_from_tp(x, g) -> reduce_scatter_to_sequence(x, dim, g)
        seed = nodes[boundary.producer]
        nodes[boundary.producer] = _convert(seed, collective_rule(seed).into_sequence, boundary.dim, group)
        touched.append(nodes[boundary.producer])
    for boundary in region.converted:  # copy_to_tp(x, g) -> gather_from_sequence(x, dim, g)
        consumer = nodes[boundary.consumers[0]]
        nodes[boundary.consumers[0]] = _convert(consumer, collective_rule(consumer).from_sequence, boundary.dim, group)
        touched.append(nodes[boundary.consumers[0]])
    for boundary in region.entries:
        touched.append(_insert(gm, nodes, boundary, split_to_sequence, group))
    for boundary in region.exits:
        touched.append(_insert(gm, nodes, boundary, gather_sequence_whole, group))
    copies = sum_replicated_gradients(gm, nodes, list(region.reads), group)
    draw_dropouts_per_rank(gm, nodes, list(region.dropouts), group)
    order = {node: position for position, node in enumerate(gm.graph.nodes)}
    return tuple(node.name for node in sorted([*touched, *copies.values()], key=order.__getitem__))


def _convert(node: fx.Node, target: object, dim: int, group: str) -> fx.Node:
    """Replace the collective ``node`` by ``target(its input, dim, group)`` (a node named for what it does)."""
    with node.graph.inserting_before(node):
        replacement = node.graph.call_function(target, (node.args[0], dim, group))
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)
    return replacement


def _insert(gm: fx.GraphModule, nodes: dict[str, fx.Node], boundary: SequenceBoundary, target: object,
            group: str) -> fx.Node:
    """One ``target(producer, dim, group)`` before the first consumer, read by every consumer instead."""
    producer = nodes[boundary.producer]
    consumers = [nodes[name] for name in boundary.consumers]
    first = min(consumers, key=lambda node: list(gm.graph.nodes).index(node)) if len(consumers) > 1 else consumers[0]
    with gm.graph.inserting_before(first):
        inserted = gm.graph.call_function(target, (producer, boundary.dim, group))
    for consumer in consumers:
        consumer.replace_input_with(producer, inserted)
    return inserted
