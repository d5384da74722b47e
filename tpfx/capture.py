"""Capture: an ``nn.Module`` becomes a ``torch.fx.GraphModule``, one graph per *call form*.

A call form is which optional arguments (those whose default is None) are absent, plus the
train/eval mode. Python control flow such as ``if attention_mask is not None`` or
``F.dropout(x, training=self.training)`` is decided while tracing, so a graph traced for one form
is only valid for that form. tpfx therefore traces each form separately (see
:class:`tpfx.program.TensorParallelModule`), and a graph never runs under a form it was not traced for.
"""

from __future__ import annotations

import bisect
import copy
import dis
import inspect
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from tpfx.arguments import require_module
from tpfx.errors import CaptureError, ConfigError, one_line
from tpfx.passes.module_hooks import hooks_lost_in_capture, shared_hook_objects


@dataclass(frozen=True)
class CallForm:
    """Which optional arguments a call leaves out (None or omitted), and the module's mode."""

    absent: frozenset[str] = field(default_factory=frozenset)
    training: bool = False

    def describe(self) -> str:
        """A short human form, e.g. ``eval, without attention_mask, labels``."""
        mode = "train" if self.training else "eval"
        return f"{mode}, without {', '.join(sorted(self.absent))}" if self.absent else f"{mode}, all arguments"


def forward_signature(model: nn.Module) -> inspect.Signature:
    """The signature of ``model.forward`` (bound, so without ``self``)."""
    return inspect.signature(model.forward)


# Keyword arguments by which a forward builds and returns a key/value cache for generation (the Hugging
# Face convention: ``use_cache``, True by default in every pretrained config), and the value that turns
# it off. A tensor-parallel forward and training never need the cache, and neither tracer can return it
# (torch.export refuses the cache object, torch.fx cannot branch on a traced flag), so every captured
# call turns it off when the forward accepts it; a call that turns it on is refused in one line.
CACHE_SWITCHES: dict[str, object] = {"use_cache": False}


def cache_switches(signature: inspect.Signature) -> dict[str, object]:
    """The cache switches ``signature`` takes by name, each with the value that turns the cache off."""
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name: off for name, off in CACHE_SWITCHES.items()
            if name in signature.parameters and signature.parameters[name].kind in named}


def cache_note(signature: inspect.Signature) -> str:
    """The report's sentence about the switches the captured call turned off ("" when there are none)."""
    switches = cache_switches(signature)
    if not switches:
        return ""
    given = ", ".join(f"{name}={off!r}" for name, off in switches.items())
    return f"The captured call passes {given}, so the program keeps no key/value cache."


def check_cache_off(signature: inspect.Signature, arguments: dict[str, object]) -> None:
    """Raise unless every cache switch in ``arguments`` (by name) is absent, None or its off value.

    Raises:
        ConfigError: the call turns a key/value cache on.
    """
    for name, off in cache_switches(signature).items():
        value = arguments.get(name)
        if value is not None and value != off:
            raise ConfigError(f"{name}={value!r}: a tensor-parallel program keeps no key/value cache (it runs "
                              f"with {name}={off!r}); fix: omit {name} or pass {name}={off!r}")


def optional_parameters(signature: inspect.Signature) -> tuple[str, ...]:
    """Names of the parameters whose default is None: the ones a call form may leave out.

    Cache switches are not among them: every captured call turns the cache off (:data:`CACHE_SWITCHES`).
    """
    switches = cache_switches(signature)
    return tuple(name for name, p in signature.parameters.items()
                 if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                 and name not in switches)


def call_form_of(signature: inspect.Signature, args: tuple, kwargs: dict, *, training: bool) -> CallForm:
    """The call form of a concrete call ``forward(*args, **kwargs)``.

    Raises:
        ConfigError: the arguments do not fit the model's forward signature.
    """
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ConfigError(f"call does not match forward{signature}: {error}") from None
    check_cache_off(signature, bound.arguments)
    bound.apply_defaults()
    absent = frozenset(name for name in optional_parameters(signature) if bound.arguments.get(name) is None)
    return CallForm(absent=absent, training=training)


# GraphModule.meta key: the names of the tensor constants fx recorded while tracing (``_tensor_constant0``)
TRACED_CONSTANTS = "tpfx_traced_constants"


# code object -> (instruction offsets, the number of values each instruction unpacks, or None)
_UNPACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unpack_count(code: object, last_instruction: int) -> int | None:
    """How many values the instruction running at ``last_instruction`` of ``code`` unpacks (None if it does not)."""
    table = _UNPACKS.get(code)
    if table is None:
        instructions = list(dis.get_instructions(code))
        table = _UNPACKS[code] = ([i.offset for i in instructions],
                                  [i.argval if i.opname == "UNPACK_SEQUENCE" else None for i in instructions])
    offsets, counts = table
    if sys.version_info < (3, 11):
        return counts[last_instruction // 2] if last_instruction // 2 < len(counts) else None
    index = bisect.bisect_left(offsets, last_instruction)  # the first instruction at or after it
    return counts[index] if index < len(counts) else None


class _UnpackingProxy(fx.Proxy):
    """A proxy that unpacks (``b, t, c = x.size()``) by reading its caller's bytecode once per function.

    torch.fx's proxy disassembles the calling function on every unpacking, once per layer, and the
    frame it keeps refers to itself, so each call leaves a cycle holding the whole disassembly for
    the garbage collector. Here the instruction table is cached per code object and no frame is kept.
    """

    def __iter__(self):  # noqa: ANN204 - Proxy's signature
        caller = sys._getframe(1)
        count = _unpack_count(caller.f_code, caller.f_lasti)
        del caller  # no reference cycle through this frame
        if count is not None:
            return (self[index] for index in range(count))
        return self.tracer.iter(self)


class _PathTracer(fx.Tracer):
    """An fx tracer that remembers which module it was inside when tracing failed.

    Buffers become ``get_attr`` proxies, so slicing a buffer by a traced size
    (``self.causal_mask[:, :, :T, :T]``) is recorded instead of failing on a concrete tensor.
    """

    proxy_buffer_attributes = True

    def __init__(self, leaf_types: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.failed_in: tuple[str, nn.Module] | None = None
        self._tensor_names: tuple[dict[int, str], dict[int, str]] | None = None

    def getattr(self, attr: str, attr_val: object, parameter_proxy_cache: dict[str, fx.Proxy]) -> object:
        # fx finds a tensor attribute's qualified name by walking every parameter (or buffer) of the
        # root on each first read: one walk per layer's buffer, quadratic in depth. An index by
        # identity, built once per trace, gives the same name (the first one the walk would meet).
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if self._tensor_names is None:
            self._tensor_names = (self._first_names(self.root.named_parameters()),
                                  self._first_names(self.root.named_buffers()))
        parameters, buffers = self._tensor_names
        name = parameters.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:  # not registered on the root (or registered during forward): fx's own search
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def trace(self, root, concrete_args=None):  # noqa: ANN001, ANN201 - fx.Tracer's signature
        self._tensor_names = None  # the index belongs to one root
        return super().trace(root, concrete_args)

    @staticmethod
    def _first_names(named: object) -> dict[int, str]:
        names: dict[int, str] = {}
        for name, tensor in named:
            names.setdefault(id(tensor), name)
        return names

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _UnpackingProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), m)
            raise


def capture(model: nn.Module, form: CallForm | None = None, *, leaf_types: tuple[type, ...] = (),
            into: Callable[[nn.Module, fx.Graph, str], fx.GraphModule] = fx.GraphModule,
            onto: nn.Module | None = None) -> fx.GraphModule:
    """Trace ``model`` with torch.fx for one call form.

    Args:
        model: the single-device model; its mode is set to ``form.training`` while tracing and restored.
        form: the call form; default: every optional argument present, the model's current mode.
        leaf_types: extra module types to keep as single ``call_module`` nodes.
        into: what builds the GraphModule from (root, graph, class name): a GraphModule class, or
            ``TensorParallelModule.without_code`` for a program that the passes compile further.
        onto: build the GraphModule over this copy of ``model`` (same module paths, e.g. a
            :func:`weightless_copy`) instead of over ``model``. Tensor constants that fx records while
            tracing (it sets them on the traced root) move there, so ``model`` is left as it was.

    Returns:
        A GraphModule whose graph is valid for ``form`` only.

    Raises:
        ConfigError: ``model`` is not an ``nn.Module`` or ``form`` not a :class:`CallForm`.
        CaptureError: the model cannot be traced; the message names the module and the reason.
    """
    require_module(model, "model", "tpfx.capture")
    if form is not None and not isinstance(form, CallForm):
        raise ConfigError(f"tpfx.capture: form must be a tpfx.CallForm or None, got {type(form).__name__}; "
                          "fix: pass tpfx.CallForm(absent=frozenset({'labels'}), training=False)")
    form = form or CallForm(training=model.training)
    tracer = _PathTracer(leaf_types)
    if lost := hooks_lost_in_capture(model, is_leaf=tracer.is_leaf_module):
        raise CaptureError(f"cannot capture {type(model).__name__} with torch.fx ({form.describe()}): {lost}")
    modes = [(module, module.training) for module in model.modules()]  # each restored: not all share one
    attributes_before = set(vars(model))
    model.train(form.training)
    try:
        switches = cache_switches(forward_signature(model))
        graph = tracer.trace(model, concrete_args={**dict.fromkeys(form.absent), **switches} or None)
        _settle_cache_switches(graph, switches)
    except Exception as error:  # the tracer's own errors are of many types; each becomes one line
        where = "the top-level forward"
        if tracer.failed_in is not None:
            path, module = tracer.failed_in
            where = f"module '{path or '<root>'}' ({type(module).__name__})"
        raise CaptureError(
            f"cannot capture {type(model).__name__} with torch.fx ({form.describe()}): {where} failed: "
            f"{one_line(error)}. Fix: make that code traceable (no Python branches on tensor "
            "values, no iteration over tensors), or wrap it in a module tpfx treats as a leaf"
        ) from error
    finally:
        for module, training in modes:
            module.training = training
        recorded = {name: vars(model).pop(name) for name in set(vars(model)) - attributes_before}
    root = model if onto is None else onto
    for name, constant in recorded.items():
        setattr(root, name, constant)
    gm = into(root, graph, type(model).__name__)
    if onto is None:
        for name in recorded:  # the GraphModule holds them now
            delattr(model, name)
    gm.meta[TRACED_CONSTANTS] = tuple(recorded)
    gm.graph.lint()
    return gm



def _settle_cache_switches(graph: fx.Graph, switches: dict[str, object]) -> None:
    """Make each cache switch an optional input of the forward's own name that defaults to off.

    fx makes a concrete argument a placeholder ``use_cache_1`` with the forward's default (None) and a
    guard that it equals the traced value, so omitting it (as a user does) would fail the guard. The
    value is checked when the program is called (:func:`check_cache_off`), so the guard goes.
    """
    renamed = {f"{name}_1": (name, off) for name, off in switches.items()}
    for node in graph.find_nodes(op="placeholder"):
        if node.target not in renamed:
            continue
        node.target, off = renamed[node.target]
        node.args = (off,)
        for guard in list(node.users):  # ``use_cache_1 == False`` and the assert that reads it
            for user in list(guard.users):
                graph.erase_node(user)
            graph.erase_node(guard)


def weightless_copy(model: nn.Module) -> tuple[nn.Module, dict[int, torch.Tensor]]:
    """A copy of ``model`` whose parameters and buffers are meta placeholders, and where each came from.

    tpfx compiles this copy: tracing reads no tensor values, and the finished program takes a copy
    of each placeholder's source (or this rank's slice of it) only once it knows which it needs.
    A tensor registered under two names stays one placeholder. The copy's hooks call the user's own
    hook objects (:func:`tpfx.passes.module_hooks.shared_hook_objects`), so what they record is seen.

    Returns:
        The copy, and ``{id(placeholder): the model's tensor}``.
    """
    memo: dict[int, object] = shared_hook_objects(model)  # the copy's hooks are the user's, not copies
    sources: dict[int, torch.Tensor] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in memo:
            continue
        meta = torch.empty_like(tensor, device="meta")
        placeholder = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
        memo[id(tensor)] = placeholder
        sources[id(placeholder)] = tensor
    return copy.deepcopy(model, memo), sources
