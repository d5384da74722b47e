"""Analysis: symbolic shapes on an fx capture (``node.meta["val"]``), as torch.export graphs have them.

before (an fx capture: nodes carry no values)::

    size = x.size();  getitem_2 = size[2]                    # meta: {}
    c_attn = self.c_attn(x);  floordiv = getitem_2 // 4      # meta: {}

after (``propagate_fake_shapes``)::

    size = x.size()             # meta["val"]: torch.Size([s0, s1, 32])
    getitem_2 = size[2]         # meta["val"]: 32
    c_attn = self.c_attn(x)     # meta["val"]: FakeTensor(size=(s0, s1, 96))
    floordiv = getitem_2 // 4   # meta["val"]: 8

The graph runs once on fake tensors (torch's ``FakeTensorMode`` with a ``ShapeEnv``): no data, and
the batch and sequence sizes (dims 0 and 1 of every tensor input) are symbols, so a size read from a
tensor is a number where the model fixes it (``C``, ``C // n_head``) and a symbol where it does not.
Everything runs as on the CPU, whatever device the graph's tensors are on: tpfx's program is built over
a weightless copy of the model, whose parameters and buffers are meta placeholders; each is faked from
its sizes and dtype, device constants read ``cpu``, and torch picks its CPU kernels (on the meta device
an attention op would be decomposed into a dozen symbolic ops). Only shapes and dtypes are meant; a
value's device and aliasing are not.

Where the inputs come from:

* ``example_inputs`` given to :func:`tpfx.parallelize`: their dtypes and sizes, dims 0 and 1 symbolic;
* otherwise assumed: an input that an ``nn.Linear`` or a norm module reads first is
  ``(batch, seq, width)`` of that module's dtype; any other tensor input is ``(batch, seq)`` token ids
  (int64). The symbols' example values are those of the example inputs' dims 0 and 1 where some are
  given (an input they leave out then meets them alike), else 5 and 7.

Propagation never fails the caller: if any node cannot run (an assumption was wrong, an op has no
fake implementation, a size depends on data), no node keeps a value and the analysis reads sizes
from the graph alone, as before; :attr:`FakeShapes.note` says so in one line.

Cost: layers of a model repeat the same computation on the same shapes, so each distinct
computation (the op, its module's configuration, its arguments' shapes) runs once and repeats reuse
its result: a 96-layer GPT costs little more than one layer. Equal shapes share one fake tensor.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from tpfx.errors import one_line

BATCH_HINT, SEQ_HINT = 5, 7  # example values of the batch and sequence symbols when inputs are assumed
_CPU = torch.device("cpu")
_MISSING = object()


@dataclass(frozen=True)
class InputSpec:
    """A tensor input to fake: example sizes, dtype, and the dims that get a symbol (batch, sequence)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    dynamic: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if any(size < 0 for size in self.shape):
            raise ValueError(f"input sizes must be non-negative, got {self.shape}")
        if any(not 0 <= dim < len(self.shape) for dim in self.dynamic):
            raise ValueError(f"dynamic dims {self.dynamic} are outside a {len(self.shape)}-d input")

    @classmethod
    def of(cls, tensor: torch.Tensor) -> InputSpec:
        """The spec of an example tensor: its sizes and dtype, dims 0 and 1 symbolic."""
        return cls(tuple(tensor.shape), tensor.dtype, tuple(range(min(tensor.dim(), 2))))

    def describe(self) -> str:
        """E.g. ``(batch, seq, 32) float32``: symbolic dims by role, the others by size."""
        roles = {0: "batch", 1: "seq"}
        sizes = [roles.get(dim, str(size)) if dim in self.dynamic else str(size) for dim, size in enumerate(self.shape)]
        return f"({', '.join(sizes)}) {str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class FakeShapes:
    """What :func:`propagate_fake_shapes` did: whether every node has a value, the inputs, and a note."""

    propagated: bool
    inputs: dict[str, InputSpec | object] = field(default_factory=dict)  # by forward parameter name
    note: str = ""  # one line for the report's tracer note


def propagate_fake_shapes(gm: fx.GraphModule, parameters: Sequence[str], *,
                          given: Mapping[str, object] | None = None) -> FakeShapes:
    """Write ``node.meta["val"]`` (fake tensors, SymInts, tuples) on every node of an fx capture.

    Args:
        gm: an fx capture, changed in place (only node metadata).
        parameters: the names of the forward's parameters, in order: one per placeholder.
        given: values by parameter name: example tensors (dims 0 and 1 become symbols),
            :class:`InputSpec` (as returned in :attr:`FakeShapes.inputs`, for another call form),
            or constants. Tensor inputs not given are assumed (see the module docstring).

    Returns:
        Whether it propagated, the inputs used, and a one-line note. Nothing is raised: on any
        failure no node keeps a value.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(parameters):
        return FakeShapes(False, note=f"The analysis has no symbolic shapes ({len(placeholders)} graph inputs for "
                                      f"{len(parameters)} forward parameters).")
    given, modules = dict(given or {}), dict(gm.named_modules())
    hints = _hints(given)
    inputs = {name: _input_of(node, given.get(name, _MISSING), modules, hints)
              for node, name in zip(placeholders, parameters)}
    try:
        _run(gm, [inputs[name] for name in parameters])
    except Exception as error:  # any op may fail on an assumed input; the analysis then works without shapes
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
        return FakeShapes(False, inputs, f"The analysis has no symbolic shapes ({one_line(error)}); "
                                         "pass example_inputs= to give it some.")
    return FakeShapes(True, inputs, _note(inputs, given))


def _hints(given: dict[str, object]) -> tuple[int, int]:
    """Example batch and sequence sizes: the first given input's of two or more dims, else (5, 7)."""
    for value in given.values():
        shape = value.shape if isinstance(value, (torch.Tensor, InputSpec)) else ()
        if len(shape) >= 2:
            return shape[0], shape[1]
    return BATCH_HINT, SEQ_HINT


def _input_of(node: fx.Node, value: object, modules: dict[str, nn.Module],
              hints: tuple[int, int]) -> InputSpec | object:
    """A placeholder's input: its default if this call form leaves it out (or nothing reads it), else the
    given value (a tensor as its spec), else assumed from its users."""
    if all(_is_none_check(user) for user in node.users):
        return node.args[0] if node.args else None
    if isinstance(value, torch.Tensor):
        return InputSpec.of(value)
    if value is not _MISSING and value is not None:
        return value
    return _assumed(node, modules, hints)


def _is_none_check(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none"


def _assumed(node: fx.Node, modules: dict[str, nn.Module], hints: tuple[int, int]) -> InputSpec:
    """(batch, seq, width) for an input a module of known input width reads first; else (batch, seq) ids."""
    for user in node.users:
        module = modules.get(str(user.target)) if user.op == "call_module" and user.args[:1] == (node,) else None
        width = _input_width(module)
        if width is not None:
            weight = next(module.parameters(), None)
            dtype = weight.dtype if weight is not None else torch.get_default_dtype()
            return InputSpec((*hints, *width), dtype, (0, 1))
    return InputSpec(hints, torch.int64, (0, 1))


def _input_width(module: nn.Module | None) -> tuple[int, ...] | None:
    """The trailing sizes a module reads (an embedding reads ids: none)."""
    if isinstance(module, nn.Linear):
        return (module.in_features,)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return tuple(module.normalized_shape)
    return None


def _note(inputs: dict[str, InputSpec | object], given: dict[str, object]) -> str:
    """E.g. ``Symbolic shapes assume x (batch, seq, 32) float32, as no example input was given for it; ...``."""
    specs = {name: spec for name, spec in inputs.items() if isinstance(spec, InputSpec)}
    assumed = {name: spec for name, spec in specs.items() if not isinstance(given.get(name), (torch.Tensor, InputSpec))}
    if not assumed:
        return "Symbolic shapes come from the example inputs, their batch and sequence dims symbolic."
    listed = [f"{name} {spec.describe()}" for name, spec in assumed.items()]
    them = "them" if len(listed) > 1 else "it"
    listed_text = ", ".join(listed[:-1]) + f" and {listed[-1]}" if len(listed) > 1 else listed[0]
    return (f"Symbolic shapes assume {listed_text}, as no example input was given for {them}; "
            f"pass example_inputs= to set {them}.")


def _run(gm: fx.GraphModule, inputs: list[InputSpec | object]) -> None:
    mode = FakeTensorMode(shape_env=ShapeEnv(duck_shape=False), allow_non_fake_inputs=True)
    # the interpreter's own memo reuses results across layers; fake tensor's per-op cache would only
    # add its (symbolic, costly) bookkeeping on every distinct op: off, the pass takes about half the time
    mode.cache_enabled = False
    values = [_fake_input(mode, spec) if isinstance(spec, InputSpec) else spec for spec in inputs]
    with mode, torch.no_grad(), torch.device(_CPU):  # tensors made without a device: on the CPU too
        _FakeInterpreter(gm, mode).run(*values)


def _fake_input(mode: FakeTensorMode, spec: InputSpec) -> FakeTensor:
    dynamic = [DimDynamic.DYNAMIC if dim in spec.dynamic else DimDynamic.STATIC for dim in range(len(spec.shape))]
    placeholder = torch.empty(spec.shape, dtype=spec.dtype, device=_CPU)  # uninitialized: sizes and dtype only
    return mode.from_tensor(placeholder, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic))


class _Unkeyable(Exception):
    """An argument that cannot be part of a memo key (unhashable): the node runs every time."""


class _FakeInterpreter(fx.Interpreter):
    """Runs a graph on fake tensors, each distinct computation once, writing ``node.meta["val"]``."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.mode = mode
        self.memo: dict[tuple, object] = {}
        self.held: dict[tuple, FakeTensor] = {}  # a parameter's or buffer's metadata -> its fake
        self.shared: dict[tuple, FakeTensor] = {}  # metadata -> the one fake tensor of those shapes
        self.module_keys: dict[str, tuple] = {}

    def run_node(self, node: fx.Node) -> object:
        try:
            if node.op in ("call_function", "call_method", "call_module"):
                value = self._call(node)
            else:
                value = self._shared(super().run_node(node))
        except Exception as error:  # say where: the caller reports the first line
            raise RuntimeError(f"at node '{node.name}' ({node.format_node()}): {one_line(error)}") from error
        node.meta["val"] = value
        return value

    def _call(self, node: fx.Node) -> object:
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        try:
            (args, kwargs), key = _prepared((args, kwargs))
            key = (node.op, self._target_key(node), key)
        except _Unkeyable:
            (args, kwargs), key = _on_cpu((args, kwargs)), None
        if _in_place(node):
            return self._in_place(node, args, kwargs)
        found = self.memo.get(key, _MISSING) if key is not None else _MISSING
        if found is _MISSING:
            found = self._shared(getattr(self, node.op)(node.target, args, kwargs))
            if key is not None:
                self.memo[key] = found
        return found

    def _in_place(self, node: fx.Node, args: tuple, kwargs: dict) -> object:
        """Run an in-place op unshared: values that share a fake tensor must not change their shapes."""
        before = _metadata(args[0]) if args and isinstance(args[0], FakeTensor) else None
        value = getattr(self, node.op)(node.target, args, kwargs)
        if before is not None and _metadata(args[0]) != before:
            raise RuntimeError(f"in-place op '{node.name}' changes the shape of its input")
        return value

    def get_attr(self, target: str, args: tuple, kwargs: dict) -> object:
        value = super().get_attr(target, args, kwargs)
        return self._fake(value) if isinstance(value, torch.Tensor) else value

    def call_module(self, target: str, args: tuple, kwargs: dict) -> object:
        module = self.fetch_attr(target)
        # through a hookless wrapper: the module's forward runs, the user's hooks (a recorder) must not
        held = {f"module.{name}": self._fake(t) for name, t in (*module.named_parameters(), *module.named_buffers())}
        return torch.func.functional_call(_WithoutHooks(module), held, args, kwargs)

    def _fake(self, tensor: torch.Tensor) -> FakeTensor:
        """A parameter, buffer or constant as a fake CPU tensor of its sizes (one per distinct metadata)."""
        key = (tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key not in self.held:  # made under the fake mode: allocates nothing
            self.held[key] = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=_CPU)
        return self.held[key]

    def _target_key(self, node: fx.Node) -> object:
        if node.op != "call_module":
            return node.target
        key = self.module_keys.get(node.target)
        if key is None:
            key = self.module_keys[node.target] = _module_key(self.fetch_attr(node.target))
        return key

    def _shared(self, value: object) -> object:
        """The one fake tensor of ``value``'s metadata (and so for the tensors inside a tuple or list)."""
        if isinstance(value, FakeTensor):
            return self.shared.setdefault(_metadata(value), value)
        if type(value) in (tuple, list):
            return type(value)(self._shared(item) for item in value)
        return value


def _module_key(module: nn.Module) -> tuple:
    """What a module's output shapes depend on: its type, plain settings and tensors' metadata.

    Only torch.nn's own modules are compared by configuration; any other module is itself.
    """
    if not type(module).__module__.startswith("torch.nn."):
        return ("module", id(module))
    settings = tuple((name, value) for name, value in vars(module).items()
                     if isinstance(value, (bool, int, float, str, type(None))) or
                     (isinstance(value, tuple) and all(isinstance(v, (int, bool)) for v in value)))
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in (*module.named_parameters(), *module.named_buffers()))
    return (type(module), settings, tensors)


def _metadata(tensor: FakeTensor) -> tuple:
    return (tuple(map(_expr, tensor.shape)), tuple(map(_expr, tensor.stride())), _expr(tensor.storage_offset()),
            tensor.dtype, tensor.device, tensor.requires_grad)


def _expr(size: object) -> object:
    return size.node.expr if isinstance(size, (torch.SymInt, torch.SymFloat, torch.SymBool)) else size


def _prepared(value: object) -> tuple[object, object]:
    """``value`` with device constants on the CPU, and a hashable key of it (tensors by identity)."""
    if isinstance(value, torch.Tensor):
        return value, ("tensor", id(value))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value, ("symbol", value.node.expr)
    if isinstance(value, torch.device):
        return _CPU, _CPU
    if isinstance(value, (tuple, list)):
        pairs = [_prepared(item) for item in value]
        return type(value)(p[0] for p in pairs), (type(value), *(p[1] for p in pairs))
    if isinstance(value, dict):
        pairs = {name: _prepared(_CPU if name == "device" and isinstance(item, str) else item)
                 for name, item in value.items()}
        return {n: p[0] for n, p in pairs.items()}, (dict, *((n, p[1]) for n, p in pairs.items()))
    if isinstance(value, slice):
        (start, stop, step), key = _prepared((value.start, value.stop, value.step))
        return slice(start, stop, step), (slice, key)
    try:
        hash(value)
    except TypeError:
        raise _Unkeyable from None
    return value, (type(value), value)


def _on_cpu(value: object) -> object:
    """``value`` with every device constant on the CPU (for arguments that cannot be keyed)."""
    return fx.node.map_aggregate(value, lambda item: _CPU if isinstance(item, torch.device) else item)


_IN_PLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior}


def _in_place(node: fx.Node) -> bool:
    """An op that may change its first argument: a method ``x.foo_()`` or an augmented assignment."""
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    return node.op == "call_function" and node.target in _IN_PLACE_FUNCTIONS


class _WithoutHooks(nn.Module):
    """Calls a module's ``forward`` without its hooks (shape propagation must have no side effects)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.module.forward(*args, **kwargs)
