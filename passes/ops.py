"""The op registry: the one place that knows what an op does, for every pass, report and table of tpfx.

before (three spellings of one op in three graphs)::

    h = self.fc1(x)                          # fx: call_module of an nn.Linear
    h = torch.ops.aten.linear.default(x, w)  # torch.export: an ATen overload on a parameter
    s = q @ k.transpose(-2, -1)              # fx: call_function operator.matmul

after (one rule each, looked up by :func:`rule_of`)::

    OpRule("linear", Kind.LINEAR, linear=LinearOperands(data=0, weight=1, bias=2, layout="out_in"))
    OpRule("matmul", Kind.MATMUL, Flow.MATMUL, operands=(0, 1), linear=LinearOperands(0, 1, None, "in_out"))

A rule says what tpfx needs to know and nothing else:

* ``kind``: what the site finder's walks see (a shape op, an elementwise op, a matmul, a norm, ...);
* ``flow``: how a dimension split on the input maps to the output (the rule family the feature-flow
  analysis of :mod:`tpfx.passes.feature_flow` applies: elementwise, view, reduction over given
  dims, ...); ``None`` means the op is not known to keep heads apart, and a walk through it stops
  with a reason that names it;
* ``operands``: which arguments carry data (a matmul's two factors; ``baddbmm``'s are 1 and 2);
* ``linear``: for an op that applies a weight (or does when its weight operand is a 2-D parameter:
  ``x @ w``), where its input, weight and bias are and how the weight is laid out as the op uses it;
* ``dropout``: where a dropout's probability and training flag are;
* ``collective``: what a tpfx collective sends forward and backward;
* ``reduction``: where a reduction has its dims and keepdim flag, or a norm its normalized shape;
* ``numbers``: given Python numbers for operands the op computes a Python number (size arithmetic:
  ``C // n_head``); :func:`is_python_value` tells such a node from one on tensors.

Targets are looked up by what a graph node holds: a torch function or ``operator`` function, an
ATen overload (by its packet: ``aten.view``, not ``aten.view.default``), a tensor method name, an
attribute read (``x.T``, ``x.shape``) or a module type (through its base classes, so a subclass of
``nn.Linear`` is a linear). An op that is not registered has no rule: every pass treats it as
unknown, and says so.
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from tpfx import rank_parts
from tpfx.collectives import (copy_to_tp, gather_from_sequence, gather_from_tp, gather_sequence_whole,
                              reduce_from_tp, reduce_scatter_to_sequence, split_to_sequence, sum_gradients_over_tp,
                              vocab_parallel_cross_entropy)
from tpfx.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

aten = torch.ops.aten


class Kind(enum.Enum):
    """What an op is, as the site finder's walks see it."""

    LINEAR = "linear"
    SHAPE = "shape"  # moves or indexes data without computing on it (view, transpose, split, cat, casts)
    MATMUL = "matmul"
    SOFTMAX = "softmax"
    ATTENTION = "attention"  # scaled_dot_product_attention
    ACTIVATION = "activation"  # an elementwise non-linearity (gelu, silu, tanh, ...)
    ELEMENTWISE = "elementwise"  # arithmetic on tensors of broadcastable shapes
    DROPOUT = "dropout"
    NORM = "norm"  # layer_norm, rms_norm: a normalization over trailing dims with a per-element affine
    REDUCTION = "reduction"  # mean, sum, ... over given dims
    META = "meta"  # returns Python values (sizes, dtypes), not tensors
    COLLECTIVE = "collective"  # tpfx's own collectives in a rewritten graph
    EMBEDDING = "embedding"  # a lookup of integer ids into the rows of a table
    LOSS = "loss"  # a classification loss over the last dim of its input (cross-entropy, nll)
    OTHER = "other"  # no rule: an op tpfx knows nothing about

    def __str__(self) -> str:
        return self.value


class Flow(enum.Enum):
    """How an op maps a dimension split on its input to its output (the feature-flow rule family)."""

    UNARY = "unary"  # elementwise on operand 0, other arguments are scalars
    BROADCAST = "broadcast"  # elementwise over every tensor operand, broadcast from the right
    VIEW = "view"  # view / reshape: sizes given as arguments
    PERMUTE = "permute"
    TRANSPOSE = "transpose"  # two dims swapped (default the last two)
    MATMUL = "matmul"  # contracts operand 0's last dim with operand 1's second to last
    BADDBMM = "baddbmm"  # a matmul of the rule's two operands, plus argument 0 broadcast to the product
    SOFTMAX = "softmax"  # normalizes along one dim
    GETITEM = "getitem"  # indexing (or picking one of several pieces)
    PIECES = "pieces"  # split / chunk / unbind: several values along one dim
    SDPA = "sdpa"  # scaled_dot_product_attention
    CAT = "cat"
    EXPAND = "expand"
    SLICE = "slice"
    SELECT = "select"
    UNSQUEEZE = "unsqueeze"
    COMPLEX = "complex"  # view_as_complex: the trailing dim of 2 becomes the (hidden) real/imaginary pair
    REAL = "real"  # view_as_real: the hidden pair comes back as a trailing dim of 2
    FLATTEN = "flatten"  # dims start..end merged into one
    UNFLATTEN = "unflatten"  # one dim split into given sizes
    STACK = "stack"  # a new dim, one index per tensor; the tensors' dims line up
    NORM = "norm"  # normalizes over the trailing dims of its normalized shape (layer_norm, rms_norm)
    REDUCE = "reduce"  # reduces over the given dims (all when none are given), keeping them as 1 with keepdim
    REPEAT_INTERLEAVE = "repeat_interleave"  # each position of one dim repeated n times in a row
    SIZE = "size"  # a size query: read lazily by the shape ops that use it
    IGNORE = "ignore"  # computes nothing the analysis needs (export's metadata assertions)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LinearOperands:
    """Where an op that applies a weight has its input, weight and bias, and the weight's layout.

    ``layout`` is ``"out_in"`` when the op uses the stored weight as (out, in) (``F.linear``) and
    ``"in_out"`` when it multiplies by it as (in, out) (``addmm``/``mm``/``matmul``, GPT-2's Conv1D).
    """

    data: int
    weight: int
    bias: int | None
    layout: str

    def __post_init__(self) -> None:
        if self.layout not in ("out_in", "in_out"):
            raise ValueError(f"linear layout must be 'out_in' or 'in_out', got {self.layout!r}")


@dataclass(frozen=True)
class Argument:
    """Where an argument is: its position, its keyword, and the value when it is left out."""

    position: int
    keyword: str
    default: object = None

    def read(self, node: fx.Node) -> object:
        """The argument's value in ``node`` (a constant or a node)."""
        if len(node.args) > self.position:
            return node.args[self.position]
        return node.kwargs.get(self.keyword, self.default)


@dataclass(frozen=True)
class DropoutArguments:
    """Where a dropout op has its probability and its training flag (None: decided by the module's mode)."""

    p: Argument | None  # None: a module's own ``p``
    training: Argument | None  # None: the module's mode, or always on (an attention's dropout_p)


@dataclass(frozen=True)
class ReductionArguments:
    """Where a reduction has its dims and keepdim flag, or a norm its normalized shape.

    ``dims`` read as None, an empty list or a bool (``x.var(True)``: unbiased) reduces every dim.
    ``normalized_shape`` None on a norm: the module's own ``normalized_shape``. ``statistics``: how
    many extra outputs (mean, rstd of ``native_layer_norm``) hold the normalized dims kept as 1.
    """

    dims: Argument | None = None
    keepdim: Argument | None = None
    normalized_shape: Argument | None = None
    statistics: int = 0


@dataclass(frozen=True)
class EmbeddingArguments:
    """Where an embedding lookup has its ids, its table and its options (None: the module's attribute).

    ``padding_idx`` is None or, for ATen's ``embedding``, -1 when there is none. ``max_norm`` renormalizes
    looked-up rows in place, ``scale_grad_by_freq`` and ``sparse`` change the table's gradient: None
    where the spelling cannot have them.
    """

    ids: int
    weight: int | None  # None: a module's own ``weight``
    padding_idx: Argument | None = None
    max_norm: Argument | None = None
    scale_grad_by_freq: Argument | None = None
    sparse: Argument | None = None


@dataclass(frozen=True)
class LossArguments:
    """Where a classification loss has its target and options.

    ``reduction`` is a string (``F.cross_entropy``) or ATen's enum (0 none, 1 mean, 2 sum).
    ``legacy``: ``size_average``/``reduce``, which must be None. ``label_smoothing`` None where the
    op has none (nll). ``log_probabilities``: the input is already log-softmaxed (``nll_loss``).
    """

    target: Argument
    weight: Argument
    ignore_index: Argument
    reduction: Argument
    label_smoothing: Argument | None = None
    legacy: tuple[Argument, ...] = ()
    log_probabilities: bool = False


@dataclass(frozen=True)
class CollectiveRule:
    """What one tpfx collective communicates: the op in each direction, and its output width."""

    forward: str | None  # "all_gather", "all_reduce", "reduce_scatter" or None (no communication)
    backward: str | None
    gathers_last_dim: bool = False  # the forward output is tp times wider on the last dim
    # a loss over a last dim split across ranks: its forward all-reduces per row of the input (all dims
    # but the last) one tensor of each of these widths (1: the row shape itself), and the output has the
    # shape of ``local_equivalent`` (the single-device op) on the same arguments
    row_statistics: tuple[int, ...] = ()
    local_equivalent: object = None
    # +1: the forward output is tp times longer along the dim given as argument 1; -1: tp times shorter
    resizes_dim: int = 0
    # sequence parallelism (tpfx.passes.sequence_parallel): the collective that takes this one's place where
    # its output enters the sequence-sharded region (a sum that can be reduce-scattered instead of all-reduced),
    # or where its input comes out of it (a copy-to before a column-parallel linear becomes an all-gather)
    into_sequence: Callable[..., torch.Tensor] | None = None
    from_sequence: Callable[..., torch.Tensor] | None = None
    # several tensors (a list, argument 0), each passed through; backward, all their gradients flattened
    # into one tensor for the one collective
    bucket: bool = False

    def __post_init__(self) -> None:
        if self.resizes_dim not in (-1, 0, 1):
            raise ValueError(f"a collective resizes a dim by tp (+1), 1/tp (-1) or not (0), got {self.resizes_dim}")


@dataclass(frozen=True)
class OpRule:
    """What tpfx knows of one op; see the module docstring."""

    name: str
    kind: Kind
    flow: Flow | None = None
    operands: tuple[int, ...] = (0,)
    linear: LinearOperands | None = None
    dropout: DropoutArguments | None = None
    collective: CollectiveRule | None = None
    reduction: ReductionArguments | None = None  # a REDUCE or NORM flow: where its dims are
    numbers: bool = False  # on Python numbers it computes a Python number (operator.floordiv on sizes)
    embedding: EmbeddingArguments | None = None
    loss: LossArguments | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an op rule needs a name")
        if self.linear is not None and self.kind not in (Kind.LINEAR, Kind.MATMUL):
            raise ValueError(f"op rule {self.name}: only a linear or matmul rule carries linear operands")
        if (self.collective is not None) != (self.kind is Kind.COLLECTIVE):
            raise ValueError(f"op rule {self.name}: a collective rule needs its communication, and only it")
        if self.flow is Flow.REDUCE and (self.reduction is None or self.reduction.dims is None):
            raise ValueError(f"op rule {self.name}: a reduction needs the position of its dims")
        if (self.embedding is not None) != (self.kind is Kind.EMBEDDING):
            raise ValueError(f"op rule {self.name}: an embedding rule needs where its ids and table are, and only it")
        if self.loss is not None and self.kind is not Kind.LOSS:
            raise ValueError(f"op rule {self.name}: only a loss rule carries loss arguments")

    @property
    def is_pointwise(self) -> bool:
        """Whether the op computes each output element from the same position of its inputs."""
        return self.kind in (Kind.ELEMENTWISE, Kind.ACTIVATION)


# ------------------------------------------------------------------------------------------------
# the tables: one registration per op, every spelling of it (torch function, ATen packet, method name)
# ------------------------------------------------------------------------------------------------

_BY_FUNCTION: dict[object, OpRule] = {}
_BY_METHOD: dict[str, OpRule] = {}
_BY_ATTRIBUTE: dict[str, OpRule] = {}  # getattr(x, name) in fx graphs: x.T, x.shape, x.dtype
_BY_MODULE: dict[type, OpRule] = {}


def register(rule: OpRule, *, functions: Iterable[object] = (), methods: Iterable[str] = (),
             attributes: Iterable[str] = (), modules: Iterable[type] = ()) -> OpRule:
    """Register ``rule`` for each spelling of its op; a spelling registered twice is a mistake.

    Raises:
        ValueError: a spelling already has a rule.
    """
    for table, keys in ((_BY_FUNCTION, [getattr(f, "overloadpacket", f) for f in functions]),
                        (_BY_METHOD, methods), (_BY_ATTRIBUTE, attributes), (_BY_MODULE, modules)):
        for key in keys:
            if key in table:
                raise ValueError(f"op {key!r} is registered twice ({table[key].name} and {rule.name})")
            table[key] = rule
    return rule


def _spellings(*names: str) -> list[object]:
    """The torch function, ``torch.nn.functional`` function and ATen packet of each name that exists."""
    found: list[object] = []
    for name in names:
        for namespace in (torch, F):
            target = getattr(namespace, name, None)
            if callable(target) and target not in found:
                found.append(target)
        packet = getattr(aten, name, None)
        if packet is not None and packet not in found:
            found.append(packet)
    return found


def _unary(name: str, kind: Kind = Kind.ELEMENTWISE, *extra_names: str, method: bool = True,
           modules: Iterable[type] = ()) -> None:
    names = (name, *extra_names)
    register(OpRule(name, kind, Flow.UNARY), functions=_spellings(*names),
             methods=[n for n in names if method and hasattr(torch.Tensor, n)], modules=modules)


# activations: elementwise non-linearities (a written-out GELU uses tanh/erf/pow, so they count too)
for _name, _modules in (("gelu", (nn.GELU,)), ("relu", (nn.ReLU,)), ("silu", (nn.SiLU,)), ("mish", (nn.Mish,)),
                        ("tanh", (nn.Tanh,)), ("sigmoid", (nn.Sigmoid,)), ("erf", ()), ("softplus", (nn.Softplus,)),
                        ("relu6", (nn.ReLU6,)), ("leaky_relu", (nn.LeakyReLU,)), ("elu", (nn.ELU,)),
                        ("hardswish", (nn.Hardswish,)), ("hardsigmoid", (nn.Hardsigmoid,))):
    _unary(_name, Kind.ACTIVATION, modules=_modules)
register(OpRule("pow", Kind.ACTIVATION, Flow.BROADCAST, operands=(0, 1), numbers=True), functions=[operator.pow])
register(OpRule("pow", Kind.ACTIVATION, Flow.BROADCAST, operands=(0, 1)), functions=_spellings("pow"),
         methods=["pow", "__pow__"])
# elementwise ops of one tensor
for _name in ("neg", "exp", "log", "sqrt", "rsqrt", "abs", "reciprocal", "square", "cos", "sin", "sign",
              "clamp", "clip", "nan_to_num", "logical_not", "bitwise_not"):
    _unary(_name)
register(OpRule("neg", Kind.ELEMENTWISE, Flow.UNARY, numbers=True), functions=[operator.neg], methods=["__neg__"])
register(OpRule("invert", Kind.ELEMENTWISE, Flow.UNARY), functions=[operator.invert], methods=["__invert__"])
register(OpRule("identity", Kind.SHAPE, Flow.UNARY), modules=[nn.Identity])
# casts and copies keep values: shape ops for the walks, unary for the flow
for _name in ("contiguous", "clone", "float", "half", "bfloat16", "double", "type_as", "detach", "to", "alias",
              "lift_fresh_copy"):
    register(OpRule(_name, Kind.SHAPE, Flow.UNARY), functions=_spellings(_name),
             methods=[_name] if hasattr(torch.Tensor, _name) else [])
register(OpRule("to", Kind.SHAPE, Flow.UNARY), functions=[aten._to_copy])
# arithmetic over broadcastable tensors; Python's operators compute sizes too (``C // n_head``)
for _name, _functions, _methods in (
        ("add", [operator.add, operator.iadd], ["add", "add_", "__add__", "__radd__", "__iadd__"]),
        ("sub", [operator.sub, operator.isub], ["sub", "__sub__", "__rsub__", "__isub__"]),
        ("mul", [operator.mul, operator.imul], ["mul", "mul_", "__mul__", "__rmul__", "__imul__"]),
        ("div", [operator.truediv, operator.itruediv], ["div", "div_", "__truediv__", "__rtruediv__", "__itruediv__"]),
        ("floordiv", [operator.floordiv, operator.ifloordiv], ["__floordiv__", "__rfloordiv__"]),
        ("mod", [operator.mod, operator.imod], ["__mod__", "__rmod__"]),
        ("rsub", [], []), ("where", [], ["where"]), ("masked_fill", [], ["masked_fill", "masked_fill_"]),
        ("maximum", [], ["maximum"]), ("minimum", [], ["minimum"]), ("addcmul", [], ["addcmul"])):
    if _functions:
        register(OpRule(_name, Kind.ELEMENTWISE, Flow.BROADCAST, operands=(0, 1), numbers=True), functions=_functions)
    register(OpRule(_name, Kind.ELEMENTWISE, Flow.BROADCAST, operands=(0, 1)), functions=_spellings(_name),
             methods=_methods)

# shape ops
register(OpRule("view", Kind.SHAPE, Flow.VIEW), functions=_spellings("reshape", "view", "_unsafe_view"),
         methods=["view", "reshape"])
register(OpRule("view_as", Kind.SHAPE, None), methods=["view_as", "reshape_as"])  # sizes from another tensor
register(OpRule("flatten", Kind.SHAPE, Flow.FLATTEN), functions=_spellings("flatten"), methods=["flatten"])
register(OpRule("unflatten", Kind.SHAPE, Flow.UNFLATTEN), functions=_spellings("unflatten"), methods=["unflatten"])
register(OpRule("permute", Kind.SHAPE, Flow.PERMUTE), functions=_spellings("permute"), methods=["permute"])
register(OpRule("transpose", Kind.SHAPE, Flow.TRANSPOSE), functions=_spellings("transpose", "swapaxes", "t"),
         methods=["transpose", "swapaxes", "t"])
register(OpRule("movedim", Kind.SHAPE, None), functions=_spellings("movedim"), methods=["movedim"])
register(OpRule("numpy_T", Kind.SHAPE, None), functions=[aten.numpy_T], attributes=["T"])
register(OpRule("mT", Kind.SHAPE, Flow.TRANSPOSE), attributes=["mT"])
register(OpRule("getitem", Kind.SHAPE, Flow.GETITEM, numbers=True), functions=[operator.getitem], methods=["__getitem__"])
register(OpRule("split", Kind.SHAPE, Flow.PIECES), functions=_spellings("split", "split_with_sizes"),
         methods=["split", "split_with_sizes"])
register(OpRule("chunk", Kind.SHAPE, Flow.PIECES), functions=_spellings("chunk"), methods=["chunk"])
register(OpRule("unbind", Kind.SHAPE, Flow.PIECES), functions=_spellings("unbind"), methods=["unbind"])
register(OpRule("cat", Kind.SHAPE, Flow.CAT), functions=_spellings("cat", "concat", "concatenate"))
register(OpRule("stack", Kind.SHAPE, Flow.STACK), functions=_spellings("stack"))
register(OpRule("expand", Kind.SHAPE, Flow.EXPAND), functions=_spellings("expand"), methods=["expand"])
register(OpRule("expand_as", Kind.SHAPE, None), methods=["expand_as"])
register(OpRule("repeat_interleave", Kind.SHAPE, Flow.REPEAT_INTERLEAVE), functions=_spellings("repeat_interleave"),
         methods=["repeat_interleave"])
register(OpRule("slice", Kind.SHAPE, Flow.SLICE), functions=_spellings("slice"))
register(OpRule("narrow", Kind.SHAPE, None), functions=_spellings("narrow"), methods=["narrow"])
register(OpRule("select", Kind.SHAPE, Flow.SELECT), functions=_spellings("select"), methods=["select"])
register(OpRule("unsqueeze", Kind.SHAPE, Flow.UNSQUEEZE), functions=_spellings("unsqueeze"), methods=["unsqueeze"])
register(OpRule("squeeze", Kind.SHAPE, None), functions=_spellings("squeeze"), methods=["squeeze"])
register(OpRule("view_as_complex", Kind.SHAPE, Flow.COMPLEX), functions=_spellings("view_as_complex"))
register(OpRule("view_as_real", Kind.SHAPE, Flow.REAL), functions=_spellings("view_as_real"))

# matmuls, softmax, attention
# a matmul or mm whose second operand is a 2-D parameter applies a linear (an (in, out) weight)
_IN_OUT = LinearOperands(data=0, weight=1, bias=None, layout="in_out")
register(OpRule("matmul", Kind.MATMUL, Flow.MATMUL, operands=(0, 1), linear=_IN_OUT),
         functions=[operator.matmul, *_spellings("matmul")], methods=["matmul", "__matmul__"])
register(OpRule("bmm", Kind.MATMUL, Flow.MATMUL, operands=(0, 1)), functions=_spellings("bmm"), methods=["bmm"])
register(OpRule("mm", Kind.MATMUL, Flow.MATMUL, operands=(0, 1), linear=_IN_OUT), functions=_spellings("mm"),
         methods=["mm"])
register(OpRule("baddbmm", Kind.MATMUL, Flow.BADDBMM, operands=(1, 2)), functions=_spellings("baddbmm"),
         methods=["baddbmm"])
register(OpRule("softmax", Kind.SOFTMAX, Flow.SOFTMAX), functions=_spellings("softmax", "_softmax", "_safe_softmax"),
         methods=["softmax"])
register(OpRule("log_softmax", Kind.SOFTMAX, Flow.SOFTMAX), functions=_spellings("log_softmax", "_log_softmax"),
         methods=["log_softmax"])
SDPA_DROPOUT = DropoutArguments(Argument(4, "dropout_p", 0.0), None)
SDPA_GQA = Argument(7, "enable_gqa", False)  # key/value heads shared by groups of query heads
register(OpRule("sdpa", Kind.ATTENTION, Flow.SDPA, operands=(0, 1, 2), dropout=SDPA_DROPOUT),
         functions=[F.scaled_dot_product_attention, aten.scaled_dot_product_attention])
# the fused kernels return (output, logsumexp, ...): attention to the finder, but no flow rule
register(OpRule("fused_sdpa", Kind.ATTENTION, None, operands=(0, 1, 2)),
         functions=[aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_efficient_attention,
                    aten._scaled_dot_product_flash_attention])

# norms and reductions: a norm over its normalized shape (the trailing dims), a reduction over its dims
_NORMALIZED = ReductionArguments(normalized_shape=Argument(1, "normalized_shape"))
_MODULE_NORMALIZED = ReductionArguments()  # the module's own normalized_shape
register(OpRule("layer_norm", Kind.NORM, Flow.NORM, reduction=_NORMALIZED), functions=_spellings("layer_norm"))
register(OpRule("layer_norm", Kind.NORM, Flow.NORM, reduction=_MODULE_NORMALIZED), modules=[nn.LayerNorm])
register(OpRule("rms_norm", Kind.NORM, Flow.NORM, reduction=_NORMALIZED), functions=_spellings("rms_norm"))
register(OpRule("rms_norm", Kind.NORM, Flow.NORM, reduction=_MODULE_NORMALIZED), modules=[nn.RMSNorm])
register(OpRule("native_layer_norm", Kind.NORM, Flow.NORM,  # returns (output, mean, rstd)
                reduction=ReductionArguments(normalized_shape=Argument(1, "normalized_shape"), statistics=2)),
         functions=[aten.native_layer_norm])
_DIM_KEEPDIM = ReductionArguments(dims=Argument(1, "dim"), keepdim=Argument(2, "keepdim", False))
for _name, _arguments in (
        ("mean", _DIM_KEEPDIM), ("sum", _DIM_KEEPDIM), ("nansum", _DIM_KEEPDIM), ("amax", _DIM_KEEPDIM),
        ("amin", _DIM_KEEPDIM), ("prod", _DIM_KEEPDIM), ("logsumexp", _DIM_KEEPDIM),
        # var(x, dim, unbiased, keepdim) and std alike; norm(x, p, dim, keepdim)
        ("var", ReductionArguments(dims=Argument(1, "dim"), keepdim=Argument(3, "keepdim", False))),
        ("std", ReductionArguments(dims=Argument(1, "dim"), keepdim=Argument(3, "keepdim", False))),
        ("norm", ReductionArguments(dims=Argument(2, "dim"), keepdim=Argument(3, "keepdim", False)))):
    register(OpRule(_name, Kind.REDUCTION, Flow.REDUCE, reduction=_arguments), functions=_spellings(_name),
             methods=[_name] if hasattr(torch.Tensor, _name) else [])
register(OpRule("vector_norm", Kind.REDUCTION, Flow.REDUCE,  # what torch.norm becomes in an exported graph
                reduction=ReductionArguments(dims=Argument(2, "dim"), keepdim=Argument(3, "keepdim", False))),
         functions=[torch.linalg.vector_norm, aten.linalg_vector_norm])

# dropouts: the probability and the training flag, where each spelling has them
DROPOUT_FUNCTION = DropoutArguments(Argument(1, "p", 0.5), Argument(2, "training", True))
register(OpRule("dropout", Kind.DROPOUT, Flow.UNARY, dropout=DROPOUT_FUNCTION), functions=[F.dropout])
register(OpRule("dropout", Kind.DROPOUT, Flow.UNARY, dropout=DropoutArguments(Argument(1, "p", 0.5),
                                                                              Argument(2, "train", True))),
         functions=[torch.dropout, aten.dropout])
register(OpRule("dropout", Kind.DROPOUT, Flow.UNARY, dropout=DropoutArguments(None, None)),  # p: the module's
         modules=[nn.Dropout])
register(OpRule("native_dropout", Kind.DROPOUT, None), functions=[aten.native_dropout])  # returns (output, mask)

# linears: the module, and ops on a parameter weight (export graphs); the flow analysis recognizes
# them before it looks for a flow rule (a linear ends a region: its input is a row-parallel candidate)
_OUT_IN = LinearOperands(data=0, weight=1, bias=2, layout="out_in")
register(OpRule("linear", Kind.LINEAR, linear=_OUT_IN), functions=[F.linear, aten.linear])
register(OpRule("addmm", Kind.LINEAR, linear=LinearOperands(data=1, weight=2, bias=0, layout="in_out")),
         functions=[torch.addmm, aten.addmm])
register(OpRule("linear", Kind.LINEAR, linear=_OUT_IN), modules=[nn.Linear, ColumnParallelLinear, RowParallelLinear])

# embeddings: a lookup of ids into a table (the module's options are its attributes)
register(OpRule("embedding", Kind.EMBEDDING, embedding=EmbeddingArguments(
    ids=0, weight=1, padding_idx=Argument(2, "padding_idx"), max_norm=Argument(3, "max_norm"),
    scale_grad_by_freq=Argument(5, "scale_grad_by_freq", False), sparse=Argument(6, "sparse", False))),
    functions=[F.embedding])
register(OpRule("embedding", Kind.EMBEDDING, embedding=EmbeddingArguments(  # embedding(weight, indices, ...)
    ids=1, weight=0, padding_idx=Argument(2, "padding_idx", -1),
    scale_grad_by_freq=Argument(3, "scale_grad_by_freq", False), sparse=Argument(4, "sparse", False))),
    functions=[aten.embedding])
register(OpRule("embedding", Kind.EMBEDDING, embedding=EmbeddingArguments(ids=0, weight=None)),
         modules=[nn.Embedding, VocabParallelEmbedding])
register(OpRule("embedding_rank_part", Kind.EMBEDDING, embedding=EmbeddingArguments(
    ids=0, weight=1, padding_idx=Argument(3, "padding_idx"))), functions=[rank_parts.embedding_rank_part])

# classification losses over the last dim: F's spellings (reduction a string, legacy options), ATen's (an enum)
_F_LEGACY = (Argument(3, "size_average"), Argument(5, "reduce"))
register(OpRule("cross_entropy", Kind.LOSS, loss=LossArguments(
    Argument(1, "target"), Argument(2, "weight"), Argument(4, "ignore_index", -100), Argument(6, "reduction", "mean"),
    Argument(7, "label_smoothing", 0.0), _F_LEGACY)), functions=[F.cross_entropy])
register(OpRule("cross_entropy", Kind.LOSS, loss=LossArguments(
    Argument(1, "target"), Argument(2, "weight"), Argument(4, "ignore_index", -100), Argument(3, "reduction", 1),
    Argument(5, "label_smoothing", 0.0))), functions=[aten.cross_entropy_loss])
register(OpRule("nll_loss", Kind.LOSS, loss=LossArguments(
    Argument(1, "target"), Argument(2, "weight"), Argument(4, "ignore_index", -100), Argument(6, "reduction", "mean"),
    legacy=_F_LEGACY, log_probabilities=True)), functions=[F.nll_loss])
register(OpRule("nll_loss", Kind.LOSS, loss=LossArguments(
    Argument(1, "target"), Argument(2, "weight"), Argument(4, "ignore_index", -100), Argument(3, "reduction", 1),
    log_probabilities=True)), functions=[aten.nll_loss, aten.nll_loss_nd])

# Python values: sizes and other metadata
register(OpRule("size", Kind.META, Flow.SIZE), functions=[aten.sym_size, aten.sym_numel, aten.sym_stride],
         methods=["size", "dim", "numel"], attributes=["shape", "ndim"])
# Python's math on sizes (``math.sqrt(q.size(-1))``): numbers, never tensors
register(OpRule("math", Kind.META, Flow.IGNORE),
         functions=[math.sqrt, math.isqrt, math.ceil, math.floor, math.trunc, math.log, math.log2, math.exp, math.pow,
                    math.prod, math.gcd, math.lcm])
register(OpRule("metadata", Kind.META, Flow.IGNORE),
         functions=[aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size],
         attributes=["device", "dtype", "is_cuda", "requires_grad"])

# tpfx's collectives and rank-part ops (rewritten graphs)
register(OpRule("copy_to_tp", Kind.COLLECTIVE, Flow.UNARY,
                collective=CollectiveRule(None, "all_reduce", from_sequence=gather_from_sequence)),
         functions=[copy_to_tp])
register(OpRule("sum_gradients_over_tp", Kind.COLLECTIVE, None,
                collective=CollectiveRule(None, "all_reduce", bucket=True)), functions=[sum_gradients_over_tp])
register(OpRule("gather_from_tp", Kind.COLLECTIVE, None,
                collective=CollectiveRule("all_gather", None, gathers_last_dim=True)), functions=[gather_from_tp])
register(OpRule("reduce_from_tp", Kind.COLLECTIVE, Flow.UNARY,
                collective=CollectiveRule("all_reduce", None, into_sequence=reduce_scatter_to_sequence)),
         functions=[reduce_from_tp])
# sequence parallelism: (x, dim, group); the dim is the sequence's, so no flow rule (the walks stop there)
register(OpRule("split_to_sequence", Kind.COLLECTIVE, None, collective=CollectiveRule(None, "all_gather", resizes_dim=-1)),
         functions=[split_to_sequence])
register(OpRule("reduce_scatter_to_sequence", Kind.COLLECTIVE, None,
                collective=CollectiveRule("reduce_scatter", "all_gather", resizes_dim=-1)),
         functions=[reduce_scatter_to_sequence])
register(OpRule("gather_from_sequence", Kind.COLLECTIVE, None,
                collective=CollectiveRule("all_gather", "reduce_scatter", resizes_dim=1)),
         functions=[gather_from_sequence])
register(OpRule("gather_sequence_whole", Kind.COLLECTIVE, None,
                collective=CollectiveRule("all_gather", None, resizes_dim=1)),
         functions=[gather_sequence_whole])
register(OpRule("vocab_parallel_cross_entropy", Kind.COLLECTIVE, None, collective=CollectiveRule(
    "all_reduce", None, row_statistics=(1, 2), local_equivalent=F.cross_entropy)),
    functions=[vocab_parallel_cross_entropy])
register(OpRule("rank_part", Kind.SHAPE, None), functions=[rank_parts.rank_part])
register(OpRule("dropout_rank_part", Kind.DROPOUT, None), functions=[rank_parts.dropout_rank_part,
                                                                    rank_parts.dropout_module_rank_part])
register(OpRule("attention_rank_part", Kind.ATTENTION, None, operands=(0, 1, 2)),
         functions=[rank_parts.attention_rank_part])


# ------------------------------------------------------------------------------------------------
# look-ups
# ------------------------------------------------------------------------------------------------


def rule_of(node: fx.Node, modules: dict[str, nn.Module]) -> OpRule | None:
    """The rule of the op ``node`` calls, or None when the registry has none (or it calls nothing).

    Args:
        node: any graph node.
        modules: the graph module's ``named_modules()`` (for ``call_module`` nodes).
    """
    if node.op == "call_function":
        if node.target is getattr:
            return _BY_ATTRIBUTE.get(node.args[1]) if len(node.args) > 1 else None
        return _BY_FUNCTION.get(getattr(node.target, "overloadpacket", node.target))
    if node.op == "call_method":
        return _BY_METHOD.get(str(node.target))
    if node.op == "call_module":
        return module_rule(modules.get(str(node.target)))
    return None


def module_rule(module: nn.Module | None) -> OpRule | None:
    """The rule of a module's call, found through its base classes (a subclass of nn.Linear is a linear)."""
    for cls in type(module).__mro__ if module is not None else ():
        if cls in _BY_MODULE:
            return _BY_MODULE[cls]
    return None


def function_rule(target: object) -> OpRule | None:
    """The rule of a ``call_function`` target (a function or an ATen overload), or None."""
    return _BY_FUNCTION.get(getattr(target, "overloadpacket", target))


def op_label(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """How every message names the op of ``node``: a module call by its class (``LayerNorm``), a function
    or method by its rule's name, else by its own name (an ATen op without its overload: ``cumsum``).

    Args:
        node: any graph node.
        modules: the graph module's ``named_modules()``; without the module there, its owner is asked.
    """
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if module is None and node.graph.owning_module is not None:
            module = node.graph.owning_module.get_submodule(str(node.target))
        return type(module).__name__
    rule = rule_of(node, modules)
    if rule is not None:
        return rule.name
    if node.op == "call_function" and node.target is getattr:
        return f"getattr .{node.args[1]}"
    target = getattr(node.target, "overloadpacket", node.target)
    return getattr(target, "__name__", str(target)).lstrip("_") if node.op != "call_method" else str(target)


def kind_of(node: fx.Node, modules: dict[str, nn.Module]) -> Kind:
    """The :class:`Kind` of ``node`` (``Kind.OTHER`` without a rule)."""
    rule = rule_of(node, modules)
    return rule.kind if rule is not None else Kind.OTHER


def is_python_value(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` yields a Python number or tuple of them (a size, arithmetic on sizes), not a tensor.

    A node with a fake value (torch.export, or fx after shape propagation) says it by that value;
    otherwise by its op: a META op (a size read, ``math``), or a ``numbers`` op whose inputs all are.
    """
    known: dict[fx.Node, bool] = {}
    stack = [(node, False)]
    while stack:  # post-order over the arithmetic only: a chain of tensor adds is walked once, not recursed
        current, inputs_known = stack.pop()
        if current in known:
            continue
        decided = _python_value_by_itself(current, modules)
        inputs = current.all_input_nodes
        if decided is not None or not inputs:
            known[current] = bool(decided)
        elif inputs_known:
            known[current] = all(known[i] for i in inputs)
        else:
            stack.append((current, True))
            stack.extend((i, False) for i in inputs if i not in known)
    return known[node]


def _python_value_by_itself(node: fx.Node, modules: dict[str, nn.Module]) -> bool | None:
    """True or False when ``node`` alone says whether it is a Python value; None when its inputs decide."""
    if "val" in node.meta:
        return _is_number(node.meta["val"])
    rule = rule_of(node, modules)
    if rule is None:
        return False
    return True if rule.kind is Kind.META else None if rule.numbers else False


def _is_number(value: object) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_number(item) for item in value)
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat, torch.SymBool))


def dropout_probability(node: fx.Node, modules: dict[str, nn.Module]) -> float | None:
    """The drop probability of a dropout node (an attention's ``dropout_p``), or None when it drops nothing.

    A module's probability is its ``p``; a function's is its argument when it is a constant.
    """
    rule = rule_of(node, modules)
    if rule is None or rule.dropout is None:
        return None
    p = modules[str(node.target)].p if rule.dropout.p is None else rule.dropout.p.read(node)
    return None if isinstance(p, (int, float)) and p == 0 else p


@dataclass(frozen=True)
class EmbeddingCall:
    """An embedding lookup's operands and options, as one node spells them (a module's from its attributes)."""

    ids: object
    weight: object  # a node (the table's get_attr), or None for a module call (its ``weight``)
    padding_idx: int | None
    max_norm: object
    scale_grad_by_freq: object
    sparse: object


def embedding_call(node: fx.Node, modules: dict[str, nn.Module]) -> EmbeddingCall | None:
    """The operands and options of an embedding lookup ``node`` (None when it is not one)."""
    rule = rule_of(node, modules)
    if rule is None or rule.embedding is None:
        return None
    arguments = rule.embedding
    if node.op == "call_module":
        module = modules[str(node.target)]
        return EmbeddingCall(Argument(0, "input").read(node), None, module.padding_idx, module.max_norm,
                             module.scale_grad_by_freq, module.sparse)

    def read(argument: Argument | None, default: object = None) -> object:
        return default if argument is None else argument.read(node)

    padding = read(arguments.padding_idx)
    padding = None if padding is None or (isinstance(padding, int) and padding < 0) else padding
    return EmbeddingCall(node.args[arguments.ids] if len(node.args) > arguments.ids else None,
                         node.args[arguments.weight] if len(node.args) > arguments.weight else None, padding,
                         read(arguments.max_norm), read(arguments.scale_grad_by_freq, False), read(arguments.sparse, False))


_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # ATen's enum


@dataclass(frozen=True)
class LossCall:
    """A classification loss's operands and options; ``unsupported`` names an option tpfx cannot split ("" if none)."""

    input: object
    target: object
    ignore_index: object
    reduction: str
    log_probabilities: bool
    unsupported: str


def loss_call(node: fx.Node) -> LossCall | None:
    """The operands and options of a cross-entropy or nll loss ``node`` (None when it is not one)."""
    rule = rule_of(node, {})
    if rule is None or rule.loss is None:
        return None
    arguments = rule.loss
    reduction = arguments.reduction.read(node)
    reduction = _REDUCTIONS.get(reduction, reduction) if isinstance(reduction, int) else reduction
    unsupported = ""
    if arguments.weight.read(node) is not None:
        unsupported = "class weights"
    elif any(legacy.read(node) is not None for legacy in arguments.legacy):
        unsupported = "size_average/reduce"
    elif arguments.label_smoothing is not None and arguments.label_smoothing.read(node) not in (0, 0.0):
        unsupported = "label smoothing"
    elif reduction not in ("none", "mean", "sum"):
        unsupported = f"reduction {reduction!r}"
    return LossCall(node.args[0] if node.args else node.kwargs.get("input"), arguments.target.read(node),
                    arguments.ignore_index.read(node), str(reduction), arguments.log_probabilities, unsupported)


def collective_rules() -> dict[object, OpRule]:
    """Every registered collective function and its rule."""
    return {target: rule for target, rule in _BY_FUNCTION.items() if rule.kind is Kind.COLLECTIVE}
