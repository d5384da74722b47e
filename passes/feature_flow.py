"""Analysis: which feature factors stay local from a column-parallel linear to the linear its values reach.

before (tp=2, H=4 heads of Dh=32, d_model=128)::

    qkv = self.qkv_proj(x)                                   # (B, T, 384)
    qkv = qkv.view(bsz, seq_len, 3, 4, 32)                   # (B, T, 3, H, Dh)
    ...                                                      # q @ k^T, softmax, @ v: per head
    out = out.transpose(1, 2).contiguous().view(bsz, seq_len, d_model)
    y = self.out_proj(out)

after (rank r)::

    qkv = self.qkv_proj(x)                                   # (B, T, 192): heads 2r, 2r+1 of q, k and v
    qkv = qkv.view(bsz, seq_len, 3, 2, 32)                   # head count 4 -> 2
    ...
    floordiv = d_model // 2                                  # width 128 -> 64
    out = out.transpose(1, 2).contiguous().view(bsz, seq_len, floordiv)
    y = self.out_proj(out)                                   # RowParallelLinear (see passes/row_shard.py)

How the analysis works (:func:`analyze_feature_flow`): every column linear's output feature dim
starts as one *factor*. Walking the graph in order, each tensor downstream carries, per dim, the
factors it is made of; a view that splits ``384`` into ``(3, 4, 32)`` splits the factor into three,
and ops that combine tensors (``q @ k^T``, ``a * b``) unify the factors they line up. A factor is
*blocked* when an op is not local along it: it is contracted by a matmul (``Dh``), indexed or split
(the ``3`` that picks q, k or v) or reduced by a softmax. A tensor from outside the region that an
op combines element by element with a region value (an ALiBi bias, a mask, a learned scale) blocks
nothing: it is recorded (:class:`~tpfx.passes.factors.OutsideOperand`) with the feature dims where it
is not known to be broadcast, and pairing narrows it to the rank's part of the factor it splits.
What remains, the factor that reaches the next linear's input and is batch-like everywhere between,
is the head count (or ``d_ff`` in an FFN): it is what each rank holds 1/tp of. So the QKV layout is
read from the graph: fused ``[3, H, Dh]``, ``[Q | K | V]`` split on the last dim, per-head
interleaved ``[H, 3, Dh]`` and separate q/k/v projections all come out as a factorization of the
weight rows and the index of the head factor in it (:class:`FeatureLayout`). Each shape argument
whose dim holds the head factor is recorded, so :func:`localize_shapes` divides it by tp, unless
it was read at run time from a tensor that is already local. Every size read off a tensor of the
region is recorded too (:class:`SizeRead`, with the factors it covers): once the pairing knows the
split factor, it decides which uses of a local read need the single-device size instead
(:func:`tpfx.passes.localize_shapes.restore_full_sizes`). Sizes are the nodes' fake values where the
graph has them (:mod:`tpfx.passes.fake_shapes`, torch.export); without them, they are worked out from
the graph.

A fused projection cut into unequal contiguous pieces (``split([H*Dh, KV*Dh, KV*Dh])`` or slices
``qkv[..., :H*Dh]`` of a multi-/grouped-query attention) has its factor *cut*: each piece is a
factor of its own, factorized by its own views (q's ``[H, Dh]``, k's ``[KV, Dh]``), and the split
sizes and slice bounds are recorded (:class:`~tpfx.passes.factors.CutUse`) so the pairing can make
them this rank's once it knows which pieces are split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
import torch.nn as nn

from tpfx.passes.factors import (ONE, CutItem, CutUse, Dim, Factors, OutsideOperand, Part, Pieces, ShapeUse, Size,
                                 SizeItem, SizeRead, Unsupported, Value)
from tpfx.passes.flow_rules import RULES
from tpfx.passes.ops import Flow, op_label, rule_of


@dataclass(frozen=True)
class LinearCall:
    """A node that applies a linear: which operand is its input, what identifies it, its sizes."""

    data_index: int
    key: str  # the module path, or the weight's parameter name for an op on a parameter
    in_features: int
    out_features: int
    functional: bool = False  # an op on a parameter (export graphs), not a module call
    bias: str = ""  # a functional linear's bias parameter, if it adds one
    layout: str = "out_in"  # how a functional linear's weight is stored: (out, in) or (in, out)


LinearOf = Callable[[fx.Node], "LinearCall | None"]


def module_linears(gm: fx.GraphModule) -> LinearOf:
    """Recognize ``call_module`` nodes of ``nn.Linear`` (and of tpfx's sharded linears) in ``gm``."""
    modules = dict(gm.named_modules())

    def linear_of(node: fx.Node) -> LinearCall | None:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, nn.Linear):
            return None
        return LinearCall(0, str(node.target), module.in_features, module.out_features)

    return linear_of


@dataclass
class FeatureFlow:
    """What :func:`analyze_feature_flow` read off a graph."""

    factors: Factors
    roots: dict[str, int]  # column linear node -> its feature factor
    root_groups: dict[str, int]  # column linear node -> group id (after unions: use ``group_of``)
    rows: dict[int, list[tuple[str, str, Dim]]] = field(default_factory=dict)  # group -> (node, key, input last dim)
    poisoned: dict[int, str] = field(default_factory=dict)  # group -> why no pair can be formed
    shape_uses: list[ShapeUse] = field(default_factory=list)
    size_reads: list[SizeRead] = field(default_factory=list)  # sizes read off the region's tensors
    values: dict[str, Value] = field(default_factory=dict)  # node -> its abstract value, for the nodes that have one
    region: set[str] = field(default_factory=set)  # every node downstream of a column linear that was followed
    outside: list[OutsideOperand] = field(default_factory=list)  # tensors from outside the region that ops read
    cut_uses: list[CutUse] = field(default_factory=list)  # split sizes and slice bounds of pieces of a factor
    entries: dict[str, int] = field(default_factory=dict)  # node -> the piece of a cut factor its value starts
    _groups: dict[int, int] = field(default_factory=dict)

    def group_of(self, group: int) -> int:
        while self._groups.get(group, group) != group:
            group = self._groups[group]
        return group

    def join(self, *groups: int) -> int:
        roots = sorted({self.group_of(g) for g in groups})
        for other in roots[1:]:
            self._groups[other] = roots[0]
        return roots[0]


def analyze_feature_flow(gm: fx.GraphModule, column_nodes: list[str], *,
                         linear_of: LinearOf | None = None) -> FeatureFlow:
    """Walk ``gm`` in order from the given column linears, tracking feature factors through every op.

    Args:
        gm: a captured graph whose linears are full size.
        column_nodes: names of the call nodes of the column-parallel candidates.
        linear_of: recognizes a linear node; default :func:`module_linears` (``nn.Linear`` modules).

    Returns:
        The factors, the linears each group reaches (row candidates), the shape arguments met, and
        per group the first op that is not head-local (``poisoned``).
    """
    return FlowInterpreter(gm, column_nodes, linear_of or module_linears(gm)).run()


class FlowInterpreter:
    def __init__(self, gm: fx.GraphModule, column_nodes: list[str], linear_of: LinearOf) -> None:
        self.gm = gm
        self.linear_of = linear_of
        self.modules = dict(gm.named_modules())
        self.flow = FeatureFlow(Factors(), {}, {})
        self.env: dict[str, Value | Pieces | int] = {}  # int: a poisoned value of that group
        self.ranks: dict[str, int] = {}  # outside node -> its rank, once known
        self.columns = set(column_nodes)

    def run(self) -> FeatureFlow:
        for node in self.gm.graph.nodes:
            if node.name in self.columns:
                self._read_by_column(node)
                self._start(node)
                continue
            joined = self._joined_inputs(node)
            rule = rule_of(node, self.modules)
            if joined is not None and rule is not None and rule.flow is Flow.SIZE:
                self._record_size_read(node)
            if joined is None or (rule is not None and rule.flow in (Flow.SIZE, Flow.IGNORE)):
                continue  # sizes are read lazily by the shape ops; export's metadata checks compute nothing
            group, poisoned = joined
            result = group if poisoned else self._poisoning(group, node, self._step)
            if result is not None:
                self.env[node.name] = result
        self.flow.values = {name: value for name, value in self.env.items() if isinstance(value, Value)}
        self.flow.region = set(self.env)
        return self.flow

    def _record_size_read(self, node: fx.Node) -> None:
        """Note which feature factors a size read covers (a rank reads its local size where they are split)."""
        value = self.env.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
        label = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        if not isinstance(value, Value) or node.args[1:2] == ("ndim",) or label == "dim":
            return  # a poisoned value's group falls back anyway; the rank of a tensor is not split
        factors = [tuple(p.factor for p in dim if p.factor is not None) for dim in value.dims]
        index = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else node.kwargs.get("dim")
        stride = "stride" in label
        if "numel" in label:
            elements = (tuple(f for dim in factors for f in dim),)
        elif index is None:  # x.size(), x.shape: one number per dim
            elements = None if value.prefix else tuple(factors)
        else:
            try:
                position = self.axis(value, index)
                inside = factors[position + 1:] if stride else factors[position:position + 1]  # a stride: inner dims
                elements = (tuple(f for dim in inside for f in dim),)
            except Unsupported:  # a dim counted from the front of a tensor of unknown rank
                elements = None
        self.flow.size_reads.append(SizeRead(node.name, value.group, elements, index is None and "numel" not in label,
                                             stride))

    def _read_by_column(self, node: fx.Node) -> None:
        """A column linear that reads a region value is a linear that value reaches, as a row would be:
        the group then reaches more than one linear, or has this one as its partner; never ignored."""
        joined = self._joined_inputs(node)
        if joined is not None and not joined[1]:  # a poisoned group falls back anyway
            self._poisoning(joined[0], node, lambda n: self._row(n, self.linear_of(n)))

    def _joined_inputs(self, node: fx.Node) -> tuple[int, bool] | None:
        """The group of ``node``'s region inputs (joined into one), and whether one of them is poisoned
        (held as its bare group); None when it reads no region value."""
        inputs = [self.env[p.name] for p in node.all_input_nodes if p.name in self.env]
        if not inputs:
            return None
        group = self.flow.join(*(value if isinstance(value, int) else value.group for value in inputs))
        return group, any(isinstance(value, int) for value in inputs)

    def _poisoning(self, group: int, node: fx.Node, step: Callable[[fx.Node], Value | Pieces | None]
                   ) -> Value | Pieces | int | None:
        """``step(node)``; where it is unsupported, the group is poisoned with the reason and its bare group returned."""
        try:
            return step(node)
        except Unsupported as error:
            self.flow.poisoned.setdefault(group, f"{error} (at node '{node.name}': {node.format_node()})")
            return group

    def _start(self, node: fx.Node) -> None:
        linear = self.linear_of(node)
        if linear is None:
            raise ValueError(f"column node {node.name} is not a linear")
        fid = self.flow.factors.new(linear.out_features)
        group = len(self.flow.roots)
        self.flow.roots[node.name], self.flow.root_groups[node.name] = fid, group
        shape = _meta_shape(node)
        data = node.args[linear.data_index]
        source = data.name if isinstance(data, fx.Node) else ""
        if shape is None:
            self.env[node.name] = Value(((Part(fid),),), group, prefix=True, source=source)
        else:
            leading = tuple((Part(size=s),) for s in shape[:-1])
            self.env[node.name] = Value(leading + ((Part(fid),),), group, source=source)

    def _step(self, node: fx.Node) -> Value | Pieces | None:
        linear = self.linear_of(node)
        if linear is not None:
            return self._row(node, linear)
        if node.op == "output":
            raise Unsupported("the value leaves the model as an output before it reaches a row-parallel linear; "
                              "each rank holds only its part of it")
        rule = rule_of(node, self.modules)
        if rule is None or rule.flow is None:
            what = "has no rule in the op registry" if rule is None else "has no flow rule in the op registry"
            raise Unsupported(f"op '{op_label(node, self.modules)}' {what}; tpfx cannot tell that it keeps heads apart")
        return self._carry_complex(node, rule.flow, RULES[rule.flow](self, node))

    def _carry_complex(self, node: fx.Node, flow: Flow, result: Value | Pieces | None) -> Value | Pieces | None:
        """A complex input makes a complex result: the rules see the elements' dims only, so the hidden
        (real, imaginary) pair of :class:`Value` is carried here (view_as_complex/view_as_real set it themselves)."""
        if flow in (Flow.COMPLEX, Flow.REAL) or result is None:
            return result
        found = [self.env.get(p.name) for p in node.all_input_nodes]
        pairs = [v.complex_pair for v in found if isinstance(v, Value) and v.complex_pair is not None]
        if not pairs:
            return result
        pair = pairs[0]
        for other in pairs[1:]:
            pair = self.align(pair, other)
        if isinstance(result, Pieces):
            return Pieces(tuple(replace(item, complex_pair=pair) for item in result.items), result.group)
        return replace(result, complex_pair=pair)

    def _row(self, node: fx.Node, linear: LinearCall) -> None:
        value = self.value(node.args[linear.data_index])
        others = [a for i, a in enumerate(node.args) if i != linear.data_index]
        if value is None or any(isinstance(a, fx.Node) and a.name in self.env for a in others):
            raise Unsupported("a linear reads this value other than as its input")
        if value.prefix and not value.dims:
            raise Unsupported("the input of the next linear has no known feature dim")
        self.flow.rows.setdefault(value.group, []).append((node.name, linear.key, self.expand(value.dims[-1])))
        return None

    # -- helpers the handlers share -------------------------------------------------------------

    def value(self, arg: object) -> Value | None:
        if isinstance(arg, fx.Node):
            found = self.env.get(arg.name)
            if isinstance(found, Pieces):
                raise Unsupported("a split result is used as a whole")
            return found if isinstance(found, Value) else None
        return None

    def expand(self, dim: Dim) -> Dim:
        """The dim with every feature factor replaced by its leaves."""
        out: list[Part] = []
        for part in dim:
            out += [Part(leaf) for leaf in self.flow.factors.leaves(part.factor)] if part.factor is not None else [part]
        return tuple(out)

    def size_of(self, part: Part) -> Size:
        return Size(self.flow.factors.sizes[part.factor]) if part.factor is not None else part.size

    def dim_size(self, dim: Dim) -> Size:
        return math.prod((self.size_of(p) for p in dim), start=ONE)

    def block(self, dim: Dim, reason: str) -> None:
        for part in dim:
            if part.factor is not None:
                self.flow.factors.block(part.factor, reason)

    def axis(self, value: Value, index: int) -> int:
        """A dim index of ``value`` as a position in ``value.dims``."""
        if index < 0:
            position = len(value.dims) + index
        elif value.prefix:
            raise Unsupported(f"dim {index} counted from the front needs the rank (pass example inputs)")
        else:
            position = index
        if not 0 <= position < len(value.dims):
            raise Unsupported(f"dim {index} is outside the {len(value.dims)} known dims")
        return position

    def align(self, a: Dim, b: Dim, reason: str = "") -> Dim:
        """Line up two dims that an op pairs element by element; refine and unify their factors."""
        a, b = list(self.expand(a)), list(self.expand(b))
        if not a or not b:
            return tuple(a or b)
        out: list[Part] = []
        factors = self.flow.factors
        while a and b:
            pa, pb = a.pop(0), b.pop(0)
            sa, sb = self.size_of(pa), self.size_of(pb)
            if pa.factor is None or pb.factor is None:
                if pa.factor is not None or pb.factor is not None or sa != sb:
                    raise Unsupported("a feature dim meets a batch dim")
                out.append(pa)
                continue
            if sa.coeff != sb.coeff:
                small, big, rest = (pa, pb, b) if sa.coeff < sb.coeff else (pb, pa, a)
                if self.size_of(big).coeff % self.size_of(small).coeff:
                    raise Unsupported("feature dims of incompatible factorizations meet")
                head, tail = factors.split(big.factor, (self.size_of(small).coeff,
                                                        self.size_of(big).coeff // self.size_of(small).coeff))
                rest.insert(0, Part(tail))
                pa, pb = (small, Part(head)) if small is pa else (Part(head), small)
            factors.union(pa.factor, pb.factor)
            if reason:
                factors.block(pa.factor, reason)
            out.append(pa)
        if a or b:
            raise Unsupported("dims of different sizes meet")
        return tuple(out)

    def broadcast(self, values: list[Value]) -> tuple[tuple[Dim, ...], bool]:
        """The dims of an elementwise result: operands aligned from the right, factors unified."""
        width = max(len(v.dims) for v in values)
        dims: list[Dim] = []
        for offset in range(width, 0, -1):
            present = [v.dims[-offset] for v in values if len(v.dims) >= offset]
            dim = present[0]
            for other in present[1:]:
                dim = self.align(dim, other)
            dims.append(dim)
        return tuple(dims), any(v.prefix for v in values)

    def size_items(self, consumer: fx.Node, start: int) -> list[SizeItem]:
        """The shape arguments of ``consumer`` from position ``start`` (ints, sizes, or one list of them)."""
        args, key = list(consumer.args[start:]), start
        if not args:
            key = "size" if "size" in consumer.kwargs else "shape"
            args = [consumer.kwargs.get(key)]
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            return [self.size_item(a, (consumer.name, (key, i))) for i, a in enumerate(args[0])]
        if len(args) == 1 and isinstance(args[0], fx.Node) and self._is_shape_tuple(args[0]):
            return self.shape_tuple(args[0])
        return [self.size_item(a, (consumer.name, (start + i,))) for i, a in enumerate(args)]

    def size_item(self, arg: object, location: tuple[str, tuple[int | str, ...]] | None) -> SizeItem:
        if isinstance(arg, int):
            return SizeItem(None if arg == -1 else Size(arg), (), location, arg)
        if not isinstance(arg, fx.Node):
            raise Unsupported(f"shape argument {arg!r} is not an int or a traced size")
        size, local = self._evaluate(arg)
        return SizeItem(size, local, location, arg.name)

    def _is_shape_tuple(self, node: fx.Node) -> bool:
        return (op_label(node, self.modules) in ("size", "add", "getitem") and not _is_scalar_size(node)
                or _is_shape_attribute(node))

    def shape_tuple(self, node: fx.Node) -> list[SizeItem]:
        """A traced tuple of sizes: ``x.size()``, ``x.size()[:-1]``, ``x.size()[:-1] + (4, 32)``."""
        name = op_label(node, self.modules)
        if name == "size" and len(node.args) == 1 or _is_shape_attribute(node):
            return [SizeItem(size, local) for size, local in self._sizes_of(node.args[0])]
        if name == "getitem" and isinstance(node.args[1], slice) and isinstance(node.args[0], fx.Node):
            return self.shape_tuple(node.args[0])[node.args[1]]
        if name == "add" and isinstance(node.args[0], fx.Node):
            tail = node.args[1]
            extra = (self.shape_tuple(tail) if isinstance(tail, fx.Node)
                     else [self.size_item(a, (node.name, (1, i))) for i, a in enumerate(tail)])
            return self.shape_tuple(node.args[0]) + extra
        raise Unsupported(f"shape '{node.name}' is not a traced tuple of sizes")

    def _sizes_of(self, tensor: object) -> list[tuple[Size, tuple[int, ...]]]:
        value = self.value(tensor)
        if value is not None:
            if value.prefix:
                raise Unsupported("the size of a tensor of unknown rank is read")
            return [(self.dim_size(dim), tuple(p.factor for p in dim if p.factor is not None)) for dim in value.dims]
        shape = _meta_shape(tensor) if isinstance(tensor, fx.Node) else None
        if shape is None:
            raise Unsupported(f"the rank of '{getattr(tensor, 'name', tensor)}' is unknown")
        return [(s, ()) for s in shape]

    def _evaluate(self, node: fx.Node) -> tuple[Size, tuple[int, ...]]:
        """A scalar size node's value and the region factors it was read from.

        The value is the node's fake value where the graph has shapes (:mod:`tpfx.passes.fake_shapes`,
        torch.export); it is the single-device size. A size read off a tensor of the region is local at
        run time: the factors it was read from say so, whatever gave its value.
        """
        known = _meta_int(node)
        if known is not None:
            return known, self._read_factors(node)
        read = self._size_source(node)
        if read is not None:
            return self._size_at(*read)
        if op_label(node, self.modules) in ("getitem", "size") and _is_scalar_size(node):
            return _symbol(node), ()
        name = op_label(node, self.modules)
        if name in ("mul", "floordiv") and len(node.args) == 2:
            (a, la), (b, lb) = (self._operand(x) for x in node.args)
            if name == "mul":
                return a * b, la + lb
            quotient = a.divide(b)
            return (quotient, la + lb) if quotient is not None else (_symbol(node), ())
        return _symbol(node), ()

    def _size_source(self, node: fx.Node) -> tuple[fx.Node, int] | None:
        """The tensor and dim a scalar size node reads (``x.size(i)``, ``x.shape[i]``, ``sym_size(x, i)``)."""
        name = op_label(node, self.modules)
        if name not in ("getitem", "size") or not _is_scalar_size(node):
            return None
        source = node.args[0]
        if name == "getitem":
            if not (isinstance(source, fx.Node) and (op_label(source, self.modules) == "size"
                                                     or _is_shape_attribute(source))):
                return None
            source = source.args[0]
        return (source, node.args[1]) if isinstance(source, fx.Node) else None

    def _read_factors(self, node: fx.Node) -> tuple[int, ...]:
        """The region factors a size node was read from, through products and quotients of sizes."""
        read = self._size_source(node)
        if read is not None:
            value = self.value(read[0])
            if value is None:
                return ()
            return tuple(p.factor for p in value.dims[self.axis(value, read[1])] if p.factor is not None)
        if op_label(node, self.modules) in ("mul", "floordiv") and len(node.args) == 2:
            return tuple(f for arg in node.args if isinstance(arg, fx.Node) for f in self._read_factors(arg))
        return ()

    def _operand(self, arg: object) -> tuple[Size, tuple[int, ...]]:
        if isinstance(arg, int):
            return Size(arg), ()
        if isinstance(arg, fx.Node):
            return self._evaluate(arg)
        raise Unsupported(f"size arithmetic with {arg!r}")

    def _size_at(self, tensor: fx.Node, index: int) -> tuple[Size, tuple[int, ...]]:
        value = self.value(tensor)
        if value is not None:
            dim = value.dims[self.axis(value, index)]
            return self.dim_size(dim), tuple(p.factor for p in dim if p.factor is not None)
        shape = _meta_shape(tensor)
        rank = len(shape) if shape is not None else self.ranks.get(tensor.name)
        if shape is not None:
            return shape[index], ()
        if rank is not None:
            index = index % rank
            width = self._known_width(tensor)
            if index == rank - 1 and width is not None:
                return Size(width), ()
        return Size(1, (f"{tensor.name}.size({index})",)), ()

    def _known_width(self, tensor: fx.Node) -> int | None:
        """The last dim of a column linear's input: the linear's in_features."""
        for user in tensor.users:
            linear = self.linear_of(user) if user.name in self.columns else None
            if linear is not None and user.args[linear.data_index] is tensor:
                return linear.in_features
        return None

    def sliced(self, dim: Dim, part: slice, node: fx.Node) -> Dim:
        """The dim ``dim[part]``: a new, blocked factor (or an opaque size when it is not known)."""
        self.block(dim, f"'{node.name}' slices it")
        size = self.dim_size(dim)
        bounds = (part.start, part.stop, part.step)
        if not size.is_int or not all(b is None or isinstance(b, int) for b in bounds):
            return self.fresh(None, node, "slices it")
        return self.fresh(Size(len(range(size.coeff)[part])), node, "slices it")

    def cut(self, value: Value, axis: int, bounds: tuple[object, object], node: fx.Node,
            locations: tuple[tuple[int | str, ...], tuple[int | str, ...]]) -> Dim | None:
        """``start:stop`` of dim ``axis`` of ``value`` when that dim is one feature factor: that piece of the
        factor (cut out of it and factorized on its own, as q, k and v of a fused projection are), or
        None when the dim is not one factor or a bound is not a known int (the caller blocks the dim).

        ``locations`` are where ``node`` holds the start and the stop, for the pairing to make them local.
        """
        parts = self.expand(value.dims[axis])
        if len(parts) != 1 or parts[0].factor is None:
            return None
        factor = parts[0].factor
        size = self.flow.factors.sizes[factor]
        ends, items = [0, size], []
        for end, (arg, location) in enumerate(zip(bounds, locations)):
            if arg is None:
                continue
            item = self.size_item(arg, (node.name, location))
            if item.size is None or not item.size.is_int:
                return None
            written = item.size.coeff
            ends[end] = min(max(written + size if written < 0 else written, 0), size)
            if written >= size:
                continue  # to the end, on every rank
            span = (ends[end], size, -1) if written < 0 else (0, ends[end], 1)
            items.append(CutItem(item, factor, *span))
        if ends[0] >= ends[1]:
            return None
        if ends == [0, size]:
            return value.dims[axis]
        piece = self.flow.factors.segment(factor, ends[0], ends[1])
        self.flow.cut_uses.append(CutUse(node.name, value.group, items))
        self.flow.entries[node.name] = piece
        return (Part(piece),)

    def fresh(self, size: Size | None, node: fx.Node, what: str) -> Dim:
        """A dim made by ``node`` (a slice, a cat): a new factor that is never split, or an opaque size."""
        if size is None:
            return (Part(size=_symbol(node)),)
        if size == ONE:
            return ()
        factor = self.flow.factors.new(size.coeff)
        self.flow.factors.block(factor, f"'{node.name}' {what}")
        return (Part(factor),)

    def outside_shape(self, node: fx.Node) -> list[Size] | None:
        """The shape of a tensor from outside the region: from meta, or a parameter/buffer's own shape."""
        shape = _meta_shape(node)
        if shape is None and node.op == "get_attr":
            held = _fetch_attr(self.gm, str(node.target))
            shape = [Size(int(s)) for s in held.shape] if isinstance(held, torch.Tensor) else None
        return shape

    def learn_rank(self, value: Value, leading: list[SizeItem]) -> None:
        """A view that spells out a column input's leading dims as ``x.size(0), x.size(1)`` gives x's rank."""
        if not value.source:
            return
        expected = [f"{value.source}.size({i})" for i in range(len(leading))]
        if [item.size.symbols[0] if item.size and item.size.symbols else None for item in leading] == expected:
            self.ranks[value.source] = len(leading) + 1


def _fetch_attr(gm: fx.GraphModule, target: str) -> object:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


def _symbol(node: fx.Node) -> Size:
    return Size(1, (node.name,))


def _is_scalar_size(node: fx.Node) -> bool:
    return len(node.args) == 2 and isinstance(node.args[1], int)


def _is_shape_attribute(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


def _meta_shape(node: object) -> list[Size] | None:
    """Sizes from ``node.meta`` (export or shape propagation), symbolic ones as symbols; else None."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    return None if shape is None else [_size_of_meta(s) for s in shape]


def _size_of_meta(value: object) -> Size:
    """An int, or a SymInt such as ``s0*s1`` as a product of symbols (anything else: one opaque symbol)."""
    if isinstance(value, int):
        return Size(value)
    expr = getattr(getattr(value, "node", None), "expr", None)
    if expr is None:
        return Size(1, (str(value),))
    if expr.is_Integer:
        return Size(int(expr))
    coeff, terms = expr.as_coeff_mul()
    symbols: list[str] = []
    for term in terms:
        base, power = term.as_base_exp()
        if not (base.is_Symbol and power.is_Integer and power > 0):
            return Size(1, (str(expr),))
        symbols += [str(base)] * int(power)
    return Size(int(coeff), tuple(sorted(symbols))) if coeff.is_Integer else Size(1, (str(expr),))


def _meta_int(node: fx.Node) -> Size | None:
    val = node.meta.get("val")
    return _size_of_meta(val) if isinstance(val, (int, torch.SymInt)) else None
