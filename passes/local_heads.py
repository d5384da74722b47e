"""Analysis and rewrite: the ops between a column- and a row-parallel linear run on this rank's heads.

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
(the ``3`` that picks q, k or v), reduced by a softmax, or spans a full-size tensor from outside.
What remains, the factor that reaches the next linear's input and is batch-like everywhere between,
is the head count (or ``d_ff`` in an FFN): it is what each rank holds 1/tp of. So the QKV layout is
read from the graph: fused ``[3, H, Dh]``, ``[Q | K | V]`` split on the last dim, per-head
interleaved ``[H, 3, Dh]`` and separate q/k/v projections all come out as a factorization of the
weight rows and the index of the head factor in it (:class:`FeatureLayout`). Each shape argument
whose dim holds the head factor is recorded, so :func:`localize_shapes` divides it by tp, unless
it was read at run time from a tensor that is already local.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from tpfx.errors import ShardingError

# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureLayout:
    """A linear's feature dim as a mixed-radix factorization (outermost first) and its sharded factor.

    ``(3, 4, 32)`` with ``shard_axis=1`` is a fused ``[3, H, Dh]`` QKV weight whose heads are split;
    ``(512,)`` with axis 0 is an FFN's ``d_ff``; ``shard_axis=None`` keeps the feature dim whole.
    """

    factor_sizes: tuple[int, ...]
    shard_axis: int | None

    def __post_init__(self) -> None:
        if not self.factor_sizes or any(size < 1 for size in self.factor_sizes):
            raise ValueError(f"feature layout needs positive factor sizes, got {self.factor_sizes}")
        if self.shard_axis is not None and not 0 <= self.shard_axis < len(self.factor_sizes):
            raise ValueError(f"shard axis {self.shard_axis} is outside factors {self.factor_sizes}")

    @property
    def size(self) -> int:
        """The full feature size."""
        return math.prod(self.factor_sizes)

    def ranges(self, tp: int, rank: int) -> tuple[tuple[int, int], ...]:
        """This rank's ``[start, stop)`` blocks of the feature dim, merged where they touch."""
        if self.shard_axis is None:
            return ((0, self.size),)
        # row-major: each combination of the outer factors holds one block of this rank's slice of the
        # sharded factor times everything inner to it; arithmetic, since d_ff-sized index lists are slow
        axis = self.factor_sizes[self.shard_axis]
        outer = math.prod(self.factor_sizes[:self.shard_axis])
        inner = math.prod(self.factor_sizes[self.shard_axis + 1:])
        length = axis // tp * inner
        blocks: list[list[int]] = []
        for start in (o * axis * inner + rank * length for o in range(outer)):
            if blocks and blocks[-1][1] == start:
                blocks[-1][1] = start + length
            else:
                blocks.append([start, start + length])
        return tuple((start, stop) for start, stop in blocks)

    def describe(self) -> str:
        """E.g. ``[3, 4*, 32]``: the factors with the sharded one starred."""
        marked = [f"{s}*" if i == self.shard_axis else str(s) for i, s in enumerate(self.factor_sizes)]
        return "[" + ", ".join(marked) + "]"


@dataclass(frozen=True)
class ShapeEdit:
    """One shape argument to divide by tp: ``path`` leads into ``node_name``'s args (position or kwarg)."""

    node_name: str
    path: tuple[int | str, ...]
    value: int | str  # the literal, or the name of the node that computes it

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(f"shape edit of {self.node_name} needs a path into its arguments")


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


# ------------------------------------------------------------------------------------------------
# sizes and factors
# ------------------------------------------------------------------------------------------------


class Unsupported(Exception):
    """An op the analysis cannot prove head-local; the message says which and why (one line)."""


@dataclass(frozen=True)
class Size:
    """A size as ``coeff * product(symbols)``: symbols stand for sizes unknown while tracing (batch, seq)."""

    coeff: int
    symbols: tuple[str, ...] = ()

    def __mul__(self, other: Size) -> Size:
        return Size(self.coeff * other.coeff, tuple(sorted(self.symbols + other.symbols)))

    def divide(self, other: Size) -> Size | None:
        """``self / other`` when it is exact, else None."""
        rest = list(self.symbols)
        for symbol in other.symbols:
            if symbol not in rest:
                return None
            rest.remove(symbol)
        if other.coeff == 0 or self.coeff % other.coeff:
            return None
        return Size(self.coeff // other.coeff, tuple(rest))

    @property
    def is_int(self) -> bool:
        return not self.symbols


ONE = Size(1)


@dataclass(frozen=True)
class Part:
    """One factor of a dim: a feature factor (an id in :class:`Factors`) or an opaque batch size."""

    factor: int | None = None
    size: Size = ONE


class Factors:
    """Feature factors: sizes, refinements (a factor split into sub-factors), classes and blocks.

    Two factors are in one class when an op lines them up (q's heads and k's heads); a class is
    blocked when some op is not local along it. Splitting a factor splits its whole class alike.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.children: dict[int, tuple[int, ...]] = {}
        self.parent: dict[int, int] = {}  # split child -> factor it came from
        self._class: list[int] = []  # union-find parent
        self.members: dict[int, list[int]] = {}
        self.blocked: dict[int, str] = {}  # class root -> why

    def new(self, size: int) -> int:
        fid = len(self.sizes)
        self.sizes.append(size)
        self._class.append(fid)
        self.members[fid] = [fid]
        return fid

    def find(self, fid: int) -> int:
        while self._class[fid] != fid:
            self._class[fid] = self._class[self._class[fid]]
            fid = self._class[fid]
        return fid

    def leaves(self, fid: int) -> list[int]:
        if fid not in self.children:
            return [fid]
        return [leaf for child in self.children[fid] for leaf in self.leaves(child)]

    def split(self, fid: int, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """Split leaf ``fid`` (and its class) into factors of ``sizes``, outermost first."""
        if fid in self.children:
            raise Unsupported(f"factor of size {self.sizes[fid]} is already split otherwise")
        assert math.prod(sizes) == self.sizes[fid]
        self._refine_class(self.find(fid), sizes)
        return self.children[fid]

    def _refine_class(self, root: int, sizes: tuple[int, ...]) -> None:
        reference: tuple[int, ...] | None = None
        for member in list(self.members[root]):
            if member in self.children:
                if tuple(self.sizes[c] for c in self.children[member]) != sizes:
                    raise Unsupported(f"factor of size {self.sizes[member]} is split two different ways")
            else:
                self.children[member] = tuple(self.new(size) for size in sizes)
                for child in self.children[member]:
                    self.parent[child] = member
            reference = reference or self.children[member]
            for mine, theirs in zip(self.children[member], reference):
                self.union(mine, theirs)

    def union(self, a: int, b: int) -> None:
        """Put ``a`` and ``b`` (equal sizes) in one class, refining both alike."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.sizes[ra] != self.sizes[rb]:
            raise Unsupported(f"factors of sizes {self.sizes[ra]} and {self.sizes[rb]} meet")
        self._class[rb] = ra
        self.members[ra] += self.members.pop(rb)
        if rb in self.blocked:
            self.blocked.setdefault(ra, self.blocked.pop(rb))
        split = next((self.children[m] for m in self.members[ra] if m in self.children), None)
        if split is not None:
            self._refine_class(ra, tuple(self.sizes[c] for c in split))

    def block(self, fid: int, reason: str) -> None:
        self.blocked.setdefault(self.find(fid), reason)

    def why_blocked(self, fid: int) -> str | None:
        """The reason ``fid`` (or a factor it was split from) cannot be sharded, or None."""
        current: int | None = fid
        while current is not None:
            reason = self.blocked.get(self.find(current))
            if reason:
                return reason
            current = self.parent.get(current)
        return None


# ------------------------------------------------------------------------------------------------
# abstract values
# ------------------------------------------------------------------------------------------------

Dim = tuple[Part, ...]  # the parts of one dim, outermost first; () is a dim of size 1


@dataclass(frozen=True)
class Value:
    """A tensor downstream of a column linear: its dims (``prefix``: unknown leading batch dims first)."""

    dims: tuple[Dim, ...]
    group: int
    prefix: bool = False
    source: str = ""  # for a column linear's output: the node of its input (whose sizes may be read)


@dataclass(frozen=True)
class Pieces:
    """The result of split/chunk/unbind: a tuple of values."""

    items: tuple[Value, ...]
    group: int


@dataclass(frozen=True)
class SizeItem:
    """One shape argument: its size, the feature factors it was read from at run time, where to edit it."""

    size: Size | None  # None for -1
    local: tuple[int, ...] = ()  # factor ids of the region dim it was read from (already local at run time)
    location: tuple[str, tuple[int | str, ...]] | None = None
    literal: int | str = ""


@dataclass
class ShapeUse:
    """A shape-taking op in a region: its output dims and the argument that gave each."""

    node_name: str
    group: int
    dims: list[Dim]
    items: list[SizeItem]


@dataclass
class FeatureFlow:
    """What :func:`analyze_feature_flow` read off a graph."""

    factors: Factors
    roots: dict[str, int]  # column linear node -> its feature factor
    root_groups: dict[str, int]  # column linear node -> group id (after unions: use ``group_of``)
    rows: dict[int, list[tuple[str, str, Dim]]] = field(default_factory=dict)  # group -> (node, key, input last dim)
    poisoned: dict[int, str] = field(default_factory=dict)  # group -> why no pair can be formed
    shape_uses: list[ShapeUse] = field(default_factory=list)
    values: dict[str, Value] = field(default_factory=dict)  # node -> its abstract value, for the nodes that have one
    region: set[str] = field(default_factory=set)  # every node downstream of a column linear that was followed
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


# ------------------------------------------------------------------------------------------------
# the analysis
# ------------------------------------------------------------------------------------------------


def op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A canonical op name: ``view``, ``matmul``, ``softmax``, ``linear`` (module), ``gelu``, ..."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, (nn.Dropout, nn.Identity)):
            return "identity"
        if isinstance(module, (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish)):
            return "unary"
        return f"module {type(module).__name__}"
    if node.op == "call_method":
        return _ALIASES.get(str(node.target), str(node.target))
    target = node.target
    packet = getattr(target, "overloadpacket", None)  # an ATen OpOverload
    name = getattr(packet if packet is not None else target, "__name__", str(target))
    name = name.lstrip("_") if packet is not None else name  # aten._softmax, aten._unsafe_view
    return _ALIASES.get(name, name)


_ALIASES = {"to_copy": "to", "safe_softmax": "softmax", "__matmul__": "matmul", "bmm": "matmul", "__add__": "add", "__mul__": "mul", "__sub__": "sub",
            "__truediv__": "truediv", "div": "truediv", "unsafe_view": "view", "reshape": "view",
            "swapaxes": "transpose", "scaled_dot_product_attention": "sdpa", "split_with_sizes": "split"}
_UNARY = {"gelu", "relu", "silu", "tanh", "sigmoid", "mish", "neg", "exp", "erf", "contiguous", "clone", "float",
          "to", "type_as", "half", "bfloat16", "dropout", "identity", "unary", "invert", "pow", "sqrt", "rsqrt",
          "abs", "softplus", "alias", "detach"}
_BROADCAST = {"add", "sub", "mul", "truediv", "masked_fill", "where", "rsub"}
_SIZE_QUERIES = {"size", "dim", "sym_size", "numel"}


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
    return _Interpreter(gm, column_nodes, linear_of or module_linears(gm)).run()


class _Interpreter:
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
                self._start(node)
                continue
            inputs = [self.env[p.name] for p in node.all_input_nodes if p.name in self.env]
            name = op_name(node, self.modules)
            if not inputs or name in _SIZE_QUERIES or name.startswith("assert") or _is_attribute_query(node):
                continue  # sizes are read lazily by the shape ops; export's metadata checks compute nothing
            groups = [value if isinstance(value, int) else value.group for value in inputs]
            group = self.flow.join(*groups)
            if any(isinstance(value, int) for value in inputs):
                self.env[node.name] = group
                continue
            try:
                result = self._step(node)
            except Unsupported as error:
                self.flow.poisoned.setdefault(group, f"{error} (at node '{node.name}': {node.format_node()})")
                result = group
            if result is not None:
                self.env[node.name] = result
        self.flow.values = {name: value for name, value in self.env.items() if isinstance(value, Value)}
        self.flow.region = set(self.env)
        return self.flow

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
        name = op_name(node, self.modules)
        handler = _HANDLERS.get(name)
        if handler is None and name in _UNARY:
            handler = _unary
        if handler is None and name in _BROADCAST:
            handler = _broadcast
        if handler is None:
            raise Unsupported(f"op '{name}' is neither elementwise nor head-local")
        return handler(self, node)

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
        return (op_name(node, self.modules) in ("size", "add", "getitem") and not _is_scalar_size(node)
                or _is_shape_attribute(node))

    def shape_tuple(self, node: fx.Node) -> list[SizeItem]:
        """A traced tuple of sizes: ``x.size()``, ``x.size()[:-1]``, ``x.size()[:-1] + (4, 32)``."""
        name = op_name(node, self.modules)
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
        """A scalar size node's value and the region factors it was read from."""
        name = op_name(node, self.modules)
        if name in ("getitem", "size", "sym_size") and len(node.args) == 2 and isinstance(node.args[1], int):
            source = node.args[0]
            if name == "getitem":
                if not (isinstance(source, fx.Node) and (op_name(source, self.modules) == "size"
                                                         or _is_shape_attribute(source))):
                    return _symbol(node), ()
                source = source.args[0]
            return self._size_at(source, node.args[1])
        if name in ("mul", "floordiv") and len(node.args) == 2:
            (a, la), (b, lb) = (self._operand(x) for x in node.args)
            if name == "mul":
                return a * b, la + lb
            quotient = a.divide(b)
            return (quotient, la + lb) if quotient is not None else (_symbol(node), ())
        meta = _meta_int(node)
        return (meta, ()) if meta is not None else (_symbol(node), ())

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


def _is_attribute_query(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and node.args[1] in (
        "shape", "device", "dtype", "ndim", "is_cuda")


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


# ------------------------------------------------------------------------------------------------
# op handlers: each returns the abstract result of one op (or raises Unsupported)
# ------------------------------------------------------------------------------------------------


def _unary(interp: _Interpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    if value is None:
        raise Unsupported("only a side operand of this op comes from the region")
    return value


def _broadcast(interp: _Interpreter, node: fx.Node) -> Value:
    operands = [a for a in [*node.args, *node.kwargs.values()] if isinstance(a, fx.Node)]
    values = [interp.value(a) for a in operands if interp.value(a) is not None]
    dims, prefix = interp.broadcast(values)
    for outside in (a for a in operands if interp.value(a) is None):
        shape = interp.outside_shape(outside)
        for offset in range(1, min(len(shape or []), len(dims)) + 1):
            if shape[-offset] != ONE:
                interp.block(dims[-offset], f"'{node.name}' combines it with the full-size tensor '{outside.name}'")
    return Value(dims, interp.flow.join(*(v.group for v in values)), prefix)


def _view(interp: _Interpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    items = interp.size_items(node, 1)
    dims = _reshape(interp, value, items)
    interp.flow.shape_uses.append(ShapeUse(node.name, value.group, list(dims), items))
    return Value(tuple(dims), value.group)


def _reshape(interp: _Interpreter, value: Value, items: list[SizeItem]) -> list[Dim]:
    """Match the output sizes against the input's parts (splitting factors where needed)."""
    parts = [p for dim in value.dims for p in interp.expand(dim) if interp.size_of(p) != ONE]
    if value.prefix:
        tail = _take_from_right(interp, parts, [i.size for i in items])
        leading = items[:len(items) - len(tail)]
        interp.learn_rank(value, leading)
        return [(Part(size=item.size or Size(1, (f"-1 of {item.location}",))),) if item.size != ONE else ()
                for item in leading] + tail
    total = math.prod((interp.size_of(p) for p in parts), start=ONE)
    known = math.prod((i.size for i in items if i.size is not None), start=ONE)
    sizes = [i.size if i.size is not None else total.divide(known) for i in items]
    if any(size is None for size in sizes):
        raise Unsupported("-1 in a view does not divide the element count")
    dims = _take_from_left(interp, parts, sizes)
    if parts:
        raise Unsupported("a view does not cover its input")
    return dims


def _take_from_left(interp: _Interpreter, parts: list[Part], sizes: list[Size]) -> list[Dim]:
    dims = []
    for size in sizes:
        dim: list[Part] = []
        need = size
        while need != ONE:
            if not parts:
                raise Unsupported("a view's sizes do not match its input")
            part = parts.pop(0)
            rest = need.divide(interp.size_of(part))
            if rest is not None:
                dim.append(part)
                need = rest
                continue
            head, tail = _split_part(interp, part, need, outer=True)
            dim.append(head)
            parts.insert(0, tail)
            need = ONE
        dims.append(tuple(dim))
    return dims


def _split_part(interp: _Interpreter, part: Part, need: Size, *, outer: bool) -> tuple[Part, Part]:
    """Split ``part`` so that one piece has size ``need``: (that piece, the rest); outer or inner piece."""
    whole = interp.size_of(part)
    rest = whole.divide(need)
    if rest is None:
        raise Unsupported(f"a view splits a dim of size {whole} by {need}")
    if part.factor is None:  # batch sizes, e.g. the B*T rows of a flattened input: split the product
        return Part(size=need), Part(size=rest)
    if not need.is_int:
        raise Unsupported(f"a view splits a feature dim of size {whole} by {need}")
    sizes = (need.coeff, rest.coeff) if outer else (rest.coeff, need.coeff)
    first, second = interp.flow.factors.split(part.factor, sizes)
    return (Part(first), Part(second)) if outer else (Part(second), Part(first))


def _take_from_right(interp: _Interpreter, parts: list[Part], sizes: list[Size | None]) -> list[Dim]:
    """Match trailing output sizes against the feature parts; stop at the first batch-like size."""
    dims: list[Dim] = []
    for position in range(len(sizes) - 1, -1, -1):
        size = sizes[position]
        if size is None and position > 0:  # -1 between spelled-out sizes: the features that are left
            dims.insert(0, tuple(parts))
            parts.clear()
            continue
        if not parts or size is None:
            break
        dim: list[Part] = []
        need = size
        while need != ONE:
            if not parts:
                raise Unsupported("a view's sizes do not match its input")
            part = parts.pop()
            whole = interp.size_of(part)
            rest = need.divide(whole)
            if rest is not None:
                dim.insert(0, part)
                need = rest
                continue
            inner, outer = _split_part(interp, part, need, outer=False)
            dim.insert(0, inner)
            parts.append(outer)
            need = ONE
        dims.insert(0, tuple(dim))
    if parts:
        raise Unsupported("a view of a tensor of unknown rank does not cover its feature dim")
    return dims


def _permute(interp: _Interpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    order = [interp.axis(value, i) for i in order]
    if value.prefix or sorted(order) != list(range(len(value.dims))):
        raise Unsupported("a permute of a tensor of unknown rank")
    return Value(tuple(value.dims[i] for i in order), value.group)


def _transpose(interp: _Interpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    a, b = (interp.axis(value, i) for i in (node.args[1:3] if len(node.args) >= 3 else (-2, -1)))
    dims = list(value.dims)
    dims[a], dims[b] = dims[b], dims[a]
    return Value(tuple(dims), value.group, value.prefix, value.source)


def _matmul(interp: _Interpreter, node: fx.Node) -> Value:
    a, b = (interp.value(arg) for arg in node.args[:2])
    if a is None or b is None or len(a.dims) < 2 or len(b.dims) < 2:
        raise Unsupported("a matmul with a tensor from outside the region or of rank < 2")
    interp.align(a.dims[-1], b.dims[-2], reason=f"'{node.name}' contracts it")
    # heads are batch dims of both operands; a factor of the rows or columns alone is not a head
    interp.block(a.dims[-2], f"'{node.name}' keeps it out of its batch dims")
    interp.block(b.dims[-1], f"'{node.name}' keeps it out of its batch dims")
    batch, prefix = interp.broadcast([Value(a.dims[:-2], a.group, a.prefix), Value(b.dims[:-2], b.group, b.prefix)])
    return Value(batch + (a.dims[-2], b.dims[-1]), interp.flow.join(a.group, b.group), prefix)


def _softmax(interp: _Interpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(dim, int):
        raise Unsupported("a softmax without an int dim")
    interp.block(value.dims[interp.axis(value, dim)], f"'{node.name}' normalizes along it")
    return value


def _getitem(interp: _Interpreter, node: fx.Node) -> Value:
    source, index = node.args
    found = interp.env.get(source.name)
    if isinstance(found, Pieces):
        return found.items[index]
    value = interp.value(source)
    index = index if isinstance(index, tuple) else (index,)
    if value.prefix and (Ellipsis not in index or index[0] is not Ellipsis):
        raise Unsupported("indexing a tensor of unknown rank from the front")
    dims, out = list(value.dims), []
    position = len(dims) - sum(1 for i in index if i is not None and i is not Ellipsis) if index[0] is Ellipsis else 0
    out = dims[:position]
    for item in (i for i in index if i is not Ellipsis):
        if item is None:
            out.append(())
            continue
        dim = dims[position]
        position += 1
        if isinstance(item, slice) and item == slice(None):
            out.append(dim)
        elif isinstance(item, slice):
            out.append(interp.sliced(dim, item, node))
        elif isinstance(item, int):
            interp.block(dim, f"'{node.name}' indexes it")
        else:
            raise Unsupported("indexing by a tensor")
    return Value(tuple(out + dims[position:]), value.group, value.prefix)


def _pieces(interp: _Interpreter, node: fx.Node) -> Pieces:
    """split / chunk / unbind along one dim: the outer factor picks the piece, the rest is kept."""
    name = op_name(node, interp.modules)
    value = interp.value(node.args[0])
    dim_position = 1 if name == "unbind" else 2
    dim_arg = node.kwargs.get("dim", node.args[dim_position] if len(node.args) > dim_position else 0)
    axis = interp.axis(value, dim_arg)
    dim = value.dims[axis]
    total = interp.dim_size(dim)
    if not total.is_int:
        raise Unsupported(f"'{name}' along a dim of unknown size")
    if name == "unbind":
        count, piece_dim = total.coeff, None
    else:
        spec = node.kwargs.get("split_size", node.kwargs.get("chunks", node.args[1]))
        if isinstance(spec, (list, tuple)):
            if len(set(spec)) != 1:
                raise Unsupported("a split into unequal pieces")
            spec = spec[0]
        if not isinstance(spec, int) or total.coeff % spec:
            raise Unsupported(f"'{name}' by {spec!r} along a dim of size {total.coeff}")
        count = spec if name == "chunk" else total.coeff // spec
    outer, *inner = _take_from_left(interp, list(interp.expand(dim)), [Size(count), Size(total.coeff // count)])
    interp.block(outer, f"'{node.name}' picks pieces along it")
    piece_dim = inner[0] if name != "unbind" else None
    if name == "split":
        key = 1 if len(node.args) > 1 else "split_size"
        spec = node.args[1] if key == 1 else node.kwargs[key]
        listed = isinstance(spec, (list, tuple))
        items = [interp.size_item(a, (node.name, (key, i) if listed else (key,)))
                 for i, a in enumerate(spec if listed else [spec])]
        interp.flow.shape_uses.append(ShapeUse(node.name, value.group, [piece_dim] * len(items), items))
    dims = [d for i, d in enumerate(value.dims) if i != axis or piece_dim is not None]
    if piece_dim is not None:
        dims[axis] = piece_dim
    item = Value(tuple(dims), value.group, value.prefix, value.source)
    return Pieces(tuple(item for _ in range(count)), value.group)


def _sdpa(interp: _Interpreter, node: fx.Node) -> Value:
    q, k, v = (interp.value(arg) for arg in node.args[:3])
    if q is None or k is None or v is None or node.kwargs.get("enable_gqa"):
        raise Unsupported("attention whose q, k or v is not from the region, or grouped by enable_gqa")
    interp.align(q.dims[-1], k.dims[-1], reason=f"'{node.name}' contracts it")
    interp.align(k.dims[-2], v.dims[-2])
    interp.block(v.dims[-1], f"'{node.name}' keeps it out of its batch dims")
    parts = [Value(x.dims[:-2], x.group, x.prefix) for x in (q, k, v)]
    batch, prefix = interp.broadcast(parts)
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    if interp.value(mask) is not None:
        raise Unsupported("an attention mask computed from the region")
    shape = interp.outside_shape(mask) if isinstance(mask, fx.Node) else None
    for offset in range(3, min(len(shape or []), len(batch) + 2) + 1):
        if shape[-offset] != ONE:
            interp.block(batch[-(offset - 2)], f"'{node.name}' uses the full-size mask '{mask.name}'")
    return Value(batch + (q.dims[-2], v.dims[-1]), interp.flow.join(q.group, k.group, v.group), prefix)


def _cat(interp: _Interpreter, node: fx.Node) -> Value:
    tensors = node.args[0]
    values = [interp.value(t) for t in tensors]
    if any(v is None for v in values):
        raise Unsupported("a cat with a tensor from outside the region")
    axis = interp.axis(values[0], node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0))
    sizes = [interp.dim_size(v.dims[axis]) for v in values]
    for v in values:
        interp.block(v.dims[axis], f"'{node.name}' concatenates along it")
    others = [Value(v.dims[:axis] + ((),) + v.dims[axis + 1:], v.group, v.prefix) for v in values]
    dims, prefix = interp.broadcast(others)
    total = Size(sum(s.coeff for s in sizes)) if all(s.is_int for s in sizes) else None
    dims = dims[:axis] + (interp.fresh(total, node, "concatenates along it"),) + dims[axis + 1:]
    return Value(dims, interp.flow.join(*(v.group for v in values)), prefix)


def _expand(interp: _Interpreter, node: fx.Node) -> Value:
    """``k[:, :, None].expand(b, kv, n_rep, t, d)``: a size-1 dim grows into a new (broadcast) factor."""
    value = interp.value(node.args[0])
    items = interp.size_items(node, 1)
    if value.prefix or len(items) != len(value.dims):
        raise Unsupported("an expand that adds dims or of unknown rank")
    dims = []
    for dim, item in zip(value.dims, items):
        if item.size is None or interp.dim_size(dim) == item.size:
            dims.append(dim)
        elif not dim and item.size.is_int:
            dims.append((Part(interp.flow.factors.new(item.size.coeff)),))
        else:
            raise Unsupported(f"an expand of a dim to {item.size}")
    interp.flow.shape_uses.append(ShapeUse(node.name, value.group, dims, items))
    return Value(tuple(dims), value.group)


def _slice(interp: _Interpreter, node: fx.Node) -> Value:
    """``aten.slice(x, dim, start, end)``: the whole range is a no-op; a part of a dim keeps it whole."""
    value = interp.value(node.args[0])
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    axis = interp.axis(value, dim)
    if start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2**62)) and step == 1:
        return value
    dims = list(value.dims)
    dims[axis] = interp.sliced(dims[axis], slice(start, end, step), node)
    return Value(tuple(dims), value.group, value.prefix, value.source)


def _select(interp: _Interpreter, node: fx.Node) -> Value:
    """``aten.select(x, dim, index)``: one index of a dim, which goes away."""
    value = interp.value(node.args[0])
    axis = interp.axis(value, node.args[1])
    interp.block(value.dims[axis], f"'{node.name}' indexes it")
    return Value(value.dims[:axis] + value.dims[axis + 1:], value.group, value.prefix, value.source)


def _unsqueeze(interp: _Interpreter, node: fx.Node) -> Value:
    value = interp.value(node.args[0])
    index = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    position = len(value.dims) + index + 1 if index < 0 else interp.axis(Value(value.dims + ((),), 0), index)
    return Value(value.dims[:position] + ((),) + value.dims[position:], value.group, value.prefix, value.source)


_HANDLERS = {"view": _view, "permute": _permute, "transpose": _transpose, "matmul": _matmul, "softmax": _softmax,
             "log_softmax": _softmax, "getitem": _getitem, "split": _pieces, "chunk": _pieces, "unbind": _pieces,
             "sdpa": _sdpa, "cat": _cat, "expand": _expand, "t": _transpose, "slice": _slice, "select": _select,
             "unsqueeze": _unsqueeze}


# ------------------------------------------------------------------------------------------------
# the rewrite
# ------------------------------------------------------------------------------------------------


def localize_shapes(gm: fx.GraphModule, edits: tuple[ShapeEdit, ...], *, tp: int) -> tuple[str, ...]:
    """Divide each edited shape argument by ``tp``: a literal in place, a traced size by a new ``//`` node.

    Args:
        gm: the graph to change in place (only the graph: the caller recompiles).
        edits: the arguments to divide, as found by the pairing.
        tp: the tensor-parallel degree.

    Returns:
        The names of the nodes changed.

    Raises:
        ShardingError: a literal is not divisible by tp.
    """
    nodes = {node.name: node for node in gm.graph.nodes}
    for edit in edits:
        consumer = nodes[edit.node_name]
        current = _read_at(consumer, edit.path)
        if isinstance(current, fx.Node):
            with gm.graph.inserting_before(consumer):
                new = gm.graph.call_function(operator.floordiv, (current, tp))
        elif isinstance(current, int) and current % tp == 0:
            new = current // tp
        else:
            raise ShardingError(f"shape argument {current!r} of node '{consumer.name}' ({consumer.format_node()}) "
                                f"is not divisible by tp={tp}; use a tp that divides the head count")
        _write_at(consumer, edit.path, new)
    return tuple(dict.fromkeys(edit.node_name for edit in edits))


def _read_at(node: fx.Node, path: tuple[int | str, ...]) -> object:
    head, *rest = path
    current = node.kwargs[head] if isinstance(head, str) else node.args[head]
    for step in rest:
        current = current[step]
    return current


def _write_at(node: fx.Node, path: tuple[int | str, ...], new: object) -> None:
    head, *rest = path

    def replaced(container: object, steps: list[int]) -> object:
        if not steps:
            return new
        items = list(container)
        items[steps[0]] = replaced(items[steps[0]], steps[1:])
        return type(container)(items)

    if isinstance(head, str):
        node.update_kwarg(head, replaced(node.kwargs[head], rest))
    else:
        node.update_arg(head, replaced(node.args[head], rest))
