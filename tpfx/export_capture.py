"""Capture through ``torch.export``, for models that torch.fx cannot trace (most real model code).

torch.fx symbolic tracing fails on keyword-only signatures, cache objects and Python branches on
tensor values; ``torch.export`` runs the model on fake tensors instead and records an ATen-level
graph whose weights are ``get_attr`` parameters. tpfx exports with the batch and sequence
dimensions (dims 0 and 1 of every tensor input) left dynamic, so one program serves other shapes
than the example's.

An exported graph is fixed to its example call: which arguments are given (tensors, with their
dtype and rank, or constants such as ``use_cache=False``) and the train/eval mode. The program
(:class:`ExportedTensorParallelModule`) reads the *export form* of every call; the first call of
another form exports the model's weightless copy for it (on meta), and the same passes rewrite that
graph, which then runs with the program's parameters. A graph never runs under a form it was not
exported for.

``parallelize(model, tracer="auto")`` uses torch.fx where it works and falls back to torch.export
when fx fails and ``example_inputs`` are given; the report says which.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from tpfx.capture import (CallForm, cache_note, cache_switches, call_form_of, capture, check_cache_off,
                          forward_signature, weightless_copy)
from tpfx.errors import CaptureError, ConfigError, one_line
from tpfx.passes.graph_view import CALL_FORM
from tpfx.passes.inline_grad_regions import inline_grad_regions
from tpfx.passes.module_hooks import hooks_lost_in_capture
from tpfx.passes.meta_device import device_of_call
from tpfx.program import CallForms, TensorParallelModule, graph_attributes

TRACERS = ("auto", "fx", "export")
ExampleInputs = tuple | dict | torch.Tensor


@dataclass(frozen=True)
class ExportForm:
    """What an exported graph is specialized to: the mode, and each given argument's kind."""

    training: bool
    arguments: tuple[tuple[str, str], ...]  # (name, "tensor int64 2-d" or the repr of a constant)

    def describe(self) -> str:
        """A short human form, e.g. ``eval, input_ids=tensor int64 2-d, use_cache=False``."""
        given = ", ".join(f"{name}={kind}" for name, kind in self.arguments) or "no arguments"
        return f"{'train' if self.training else 'eval'}, {given}"


def bind_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name, None ones left out and ``**kwargs`` spread out, and each cache
    switch the forward takes set to off (:data:`tpfx.capture.CACHE_SWITCHES`).

    Raises:
        ConfigError: the arguments do not fit the signature, or they turn a key/value cache on.
    """
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ConfigError(f"call does not match forward{signature}: {error}") from None
    call: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL and value:
            raise ConfigError(f"forward(*{name}) with {len(value)} extra positional arguments cannot be exported; "
                              "pass them by keyword in example_inputs")
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update((key, item) for key, item in value.items() if item is not None)
        elif kind is not inspect.Parameter.VAR_POSITIONAL and value is not None:
            call[name] = value
    check_cache_off(signature, call)
    return call | cache_switches(signature)


def example_arguments(signature: inspect.Signature, example_inputs: ExampleInputs) -> dict[str, Any]:
    """The arguments of the example call by name, None ones left out (see :func:`bind_call`).

    Raises:
        ConfigError: the example inputs are not a tuple, dict or tensor, or do not fit the signature.
    """
    args, kwargs = _as_args_kwargs(example_inputs)
    return bind_call(signature, args, kwargs)


def export_form(call: dict[str, Any], *, training: bool) -> ExportForm:
    """The :class:`ExportForm` of a call (from :func:`bind_call`)."""
    def kind(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"tensor {str(value.dtype).removeprefix('torch.')} {value.dim()}-d"
        return repr(value)
    return ExportForm(training, tuple((name, kind(value)) for name, value in call.items()))


def _as_args_kwargs(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    raise ConfigError(f"example_inputs is a {type(example_inputs).__name__}; pass a tuple of positional "
                      "arguments, a dict of keyword arguments, or one tensor")


def _dynamic_shapes(call: dict[str, Any]) -> dict[str, Any]:
    """Dims 0 and 1 (batch, sequence) of every tensor argument dynamic; export specializes what must be."""
    auto = torch.export.Dim.AUTO
    return {name: ({dim: auto for dim in range(min(value.dim(), 2))} if isinstance(value, torch.Tensor) else None)
            for name, value in call.items()}


@dataclass(frozen=True)
class Exported:
    """A model captured by torch.export: the unlifted graph module and what it is specialized to."""

    gm: fx.GraphModule  # ATen ops; parameters, buffers and constants are get_attr (shared with the model)
    form: ExportForm
    dynamic_dims: tuple[str, ...]  # e.g. ("input_ids.shape[0]", "input_ids.shape[1]"): the dims left dynamic
    fixed_dims: tuple[tuple[str, int, int], ...] = ()  # (argument, dim, size): batch/sequence dims export fixed


def export_capture(model: nn.Module, example_inputs: ExampleInputs) -> Exported:
    """Capture ``model`` with ``torch.export`` for the call ``model(*example_inputs)`` (or ``**``).

    Args:
        model: the single-device model, exported in its current train/eval mode; it is not changed.
        example_inputs: a tuple of positional arguments, a dict of keyword arguments, or one tensor.

    Returns:
        The unlifted ATen graph module, its export form and its dynamic dims.

    Raises:
        ConfigError: the example inputs do not fit the model's forward.
        CaptureError: torch.export fails; the message has the first line of its reason.
    """
    args, kwargs = _as_args_kwargs(example_inputs)
    call = bind_call(forward_signature(model), args, kwargs)
    # clones: export would merge two arguments that are one tensor (input_ids passed as labels too)
    # into one graph input, and the program would then ignore the second one
    example = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in call.items()}
    form = export_form(call, training=model.training)
    if lost := hooks_lost_in_capture(model, is_leaf=None):
        raise CaptureError(f"cannot capture {type(model).__name__} with torch.export ({form.describe()}): {lost}")
    try:
        with quiet_export():
            program = torch.export.export(model, (), example, dynamic_shapes=_dynamic_shapes(example), strict=False)
    except Exception as error:  # export raises many types; each becomes one line naming the model
        raise CaptureError(
            f"cannot capture {type(model).__name__} with torch.export ({form.describe()}): "
            f"{one_line(error)}. Fix: make that code exportable (no branches on tensor values; "
            "see torch.export's troubleshooting), or try other example_inputs"
        ) from error
    with quiet_export():
        gm = program.module()
    inline_grad_regions(gm)  # a no_grad block is a nested graph torch.compile cannot trace with dynamic shapes
    gm.graph.lint()
    return Exported(gm, form, *_dims_of(gm, example))


def _dims_of(gm: fx.GraphModule, example: dict[str, Any]) -> tuple[tuple[str, ...], tuple[tuple[str, int, int], ...]]:
    """The dims export kept dynamic, and the batch/sequence dims of top-level arguments it fixed (a size-1 example)."""
    dynamic, fixed = [], []
    leaves = tree_flatten_with_path(example)[0]  # the graph's placeholders, in the same order
    for (path, value), node in zip(leaves, gm.graph.find_nodes(op="placeholder")):
        name = path[0].key + keystr(path[1:])
        shape = getattr(node.meta.get("val"), "shape", ())
        for axis, size in enumerate(shape):
            if isinstance(size, torch.SymInt):
                dynamic.append(f"{name}.shape[{axis}]")
            elif axis < 2 and len(path) == 1 and isinstance(value, torch.Tensor):
                fixed.append((name, axis, int(size)))
    return tuple(dynamic), tuple(fixed)


@dataclass
class _Reexport:
    """What an exported program needs to export and rewrite another call form (kept out of the module tree)."""

    source: nn.Module  # a weightless copy of the original model: export runs it on fake tensors
    rewrite: Callable[[fx.GraphModule, torch.device], object]  # the passes, given where the call's tensors are
    built: dict[ExportForm, ExportedTensorParallelModule] = field(default_factory=dict)


class ExportedTensorParallelModule(TensorParallelModule):
    """A rank's program captured by torch.export: its graph serves the call form of its example inputs,
    at any batch and length; another call form (other arguments given, or the other train/eval mode)
    is exported from a weightless copy of the model the first time it is called, rewritten by the
    same passes and served with the same parameters."""

    def attach_export_form(self, signature: inspect.Signature, form: ExportForm,
                           fixed_dims: tuple[tuple[str, int, int], ...] = (), *,
                           reexport: _Reexport | None = None) -> None:
        """Fix this graph to ``form``; with ``reexport``, other forms are exported lazily, else they raise.

        ``fixed_dims`` are batch/sequence dims that export could not keep dynamic; other sizes raise.
        """
        self.__dict__["_tpfx_export"] = (signature, form)
        self.__dict__["_tpfx_fixed_dims"] = fixed_dims
        self.__dict__["_tpfx_reexport"] = reexport

    @property
    def export_form(self) -> ExportForm:
        """The arguments and mode the graph was exported for."""
        return self.__dict__["_tpfx_export"][1]

    @property
    def call_forms(self) -> CallForms:
        """The call forms exported so far, this graph's first."""
        signature, form = self.__dict__["_tpfx_export"]
        reexport: _Reexport | None = self.__dict__.get("_tpfx_reexport")
        forms = [form, *(reexport.built if reexport else ())]
        return CallForms(CallForm(absent=frozenset(name for name in _optional(signature) if name not in dict(f.arguments)),
                                  training=f.training) for f in forms)

    def module_for_call(self, *args: Any, **kwargs: Any) -> fx.GraphModule:
        """The GraphModule that ``self(*args, **kwargs)`` runs: this one, or the one exported for that call.

        Raises:
            ConfigError: the arguments do not fit the forward signature, or this program cannot export
                another form (one built from an exported graph module, not from a model).
            CaptureError: torch.export fails on this call form.
        """
        signature, _ = self.__dict__["_tpfx_export"]
        return self._module_for(bind_call(signature, args, kwargs))

    def call_arguments(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The arguments by name that ``self(*args, **kwargs)`` hands its graph: None ones left out, the
        cache switches set to off (an exported graph takes them as inputs and checks their value).

        Raises:
            ConfigError: the arguments do not fit the forward signature, or they turn a cache on.
        """
        return bind_call(self.__dict__["_tpfx_export"][0], args, kwargs)

    def call_program(self, *args: Any, **kwargs: Any) -> Any:
        """What ``self(*args, **kwargs)`` does: run the graph exported for this call (exported on first use)."""
        signature, _ = self.__dict__["_tpfx_export"]
        call = bind_call(signature, args, kwargs)
        module = self._module_for(call)
        module._check_fixed_dims(call)
        if module is self:
            return fx.GraphModule.__call__(self, **call)
        return self.call_as_this_program(module, lambda **c: fx.GraphModule.__call__(self, **c), (), call)

    def _module_for(self, call: dict[str, Any]) -> ExportedTensorParallelModule:
        form, given = self.export_form, export_form(call, training=self.training)
        if given == form:
            return self
        reexport: _Reexport | None = self.__dict__.get("_tpfx_reexport")
        if reexport is None:
            raise ConfigError(
                f"this {self._get_name()} program was captured with torch.export for ({form.describe()}) and "
                f"cannot run ({given.describe()}): an exported graph is fixed to its example call and mode; call "
                "it that way, or parallelize again with the model in this mode and example_inputs= matching this call"
            )
        if given not in reexport.built:
            reexport.built[given] = self._export_form(reexport, call, given)
        return reexport.built[given]

    def _export_form(self, reexport: _Reexport, call: dict[str, Any], given: ExportForm) -> ExportedTensorParallelModule:
        """Export ``call`` from the weightless copy, rewrite it, and bind its graph to this program's modules."""
        # the copy's weights are on meta: so are the example's tensors (device constants are retargeted below)
        example = {name: value.to("meta") if isinstance(value, torch.Tensor) else value for name, value in call.items()}
        was_training = reexport.source.training
        reexport.source.train(given.training)
        try:
            exported = export_capture(reexport.source, example)
        finally:
            reexport.source.train(was_training)
        exported.gm.meta[CALL_FORM] = f"({given.describe()})"  # what messages of the passes call it
        reexport.rewrite(exported.gm, device_of_call(call.values()))
        # parameters and buffers are this program's (sharded where the passes sharded them); the rest
        # (constants, export's guard module) belongs to the new export, and must not be a placeholder
        own = {name for name, _ in self.named_parameters(remove_duplicate=False)}
        own |= {name for name, _ in self.named_buffers(remove_duplicate=False)}
        attributes = graph_attributes(exported.gm.graph, lambda node: self if node.target in own else exported.gm)
        for target, value in attributes.items():
            if target not in own and isinstance(value, torch.Tensor) and value.device.type == "meta":
                raise ConfigError(
                    f"cannot export ({given.describe()}) for this {self._get_name()} program: the new graph's "
                    f"constant '{target}' was computed from the weightless copy of the model (meta); "
                    "parallelize with example_inputs= of this call form instead"
                )
        module = ExportedTensorParallelModule(attributes, exported.gm.graph, self._get_name())
        module.attach_export_form(self.__dict__["_tpfx_export"][0], given, exported.fixed_dims)
        module.train(given.training)
        return module

    def _check_fixed_dims(self, call: dict[str, Any]) -> None:
        """Raise unless the dims that export fixed have the sizes the graph was exported for."""
        for name, axis, size in self.__dict__.get("_tpfx_fixed_dims", ()):
            if call[name].shape[axis] != size:
                raise ConfigError(
                    f"argument {name} has size {call[name].shape[axis]} in dim {axis}, but this program was exported "
                    f"from an example with size {size} there, which torch.export fixes; parallelize again and capture "
                    "from example_inputs (or a first call, or gm.prepare) of batch size and sequence length 2 or more"
                )

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # .to()/.cuda() may replace buffers by new tensors; other forms are exported again on their next call
        reexport: _Reexport | None = self.__dict__.get("_tpfx_reexport")
        if reexport is not None:
            reexport.built.clear()
        return super()._apply(fn, recurse)


def _optional(signature: inspect.Signature) -> tuple[str, ...]:
    return tuple(name for name, p in signature.parameters.items() if p.default is None)


@dataclass(frozen=True)
class Captured:
    """The program :func:`tpfx.parallelize` compiles, and how it was captured.

    ``gm`` is built over a weightless copy of the model (``skeleton``): its parameters and buffers
    are meta placeholders, and ``sources`` says which tensor of the model each one stands for.
    """

    gm: TensorParallelModule
    skeleton: nn.Module
    sources: dict[int, torch.Tensor]
    tracer: str  # "fx" or "export"
    form: CallForm  # the primary call form (for export: the example call's)
    exported: Exported | None = None
    note: str = ""  # why "auto" fell back to export, the dynamic dims
    model_copy: nn.Module | None = None  # export: a weightless copy of the model, to export other call forms

    def serve_call_forms(self, signature: inspect.Signature, rewrite: Callable[[fx.GraphModule], object],
                         prepare: Callable[[fx.GraphModule, torch.device], object]) -> None:
        """Let the program serve other call forms with the same ``rewrite``: fx traces them from the
        skeleton, export exports them from the model's weightless copy. Both copies hold meta
        placeholders, so ``prepare`` first fixes a new graph for the device of the call's tensors."""

        def prepare_and_rewrite(traced: fx.GraphModule, device: torch.device) -> None:
            prepare(traced, device)
            rewrite(traced)

        if self.exported is None:
            self.gm.attach_call_forms(self.skeleton, signature, self.form, prepare_and_rewrite)
            return
        reexport = _Reexport(self.model_copy, prepare_and_rewrite) if self.model_copy is not None else None
        self.gm.attach_export_form(signature, self.exported.form, self.exported.fixed_dims, reexport=reexport)


class NeedsCall(CaptureError):
    """torch.fx cannot trace the model (or ``tracer="export"`` was asked for) and no example call was given.

    :func:`tpfx.parallelize` answers it with a program that is captured by torch.export from its
    first call (:class:`tpfx.deferred.DeferredProgram`); ``reason`` says why fx was not used.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def capture_for_parallelize(model: nn.Module, *, tracer: str = "auto",
                            example_inputs: ExampleInputs | None = None, fx_failure: str = "") -> Captured:
    """Capture ``model`` with the tracer asked for: ``fx``, ``export``, or ``auto`` (fx, else export).

    Either tracer runs on the model itself (fx with proxies, export on fake tensors), so devices and
    constants it records are the model's; the program is then built over a weightless copy of the
    model (fx) or of the exported graph module (export). The model is not changed.

    Args:
        model: the single-device model.
        tracer: ``"auto"``, ``"fx"`` or ``"export"``.
        example_inputs: the arguments of one call (needed by torch.export).
        fx_failure: why torch.fx was not used, when the caller already knows (a program captured on
            its first call, after fx failed at ``parallelize``); the tracer note starts with it.

    Raises:
        ConfigError: an unknown tracer.
        NeedsCall: torch.export is needed (fx failed, or ``tracer="export"``) and there are no example inputs.
        CaptureError: the tracer(s) fail.
    """
    if tracer not in TRACERS:
        raise ConfigError(f"tracer={tracer!r} is not a tracer; use one of {', '.join(map(repr, TRACERS))}")
    from_first_call = bool(fx_failure)  # the caller knew fx fails: a program captured on its first call
    if tracer == "export" and example_inputs is None:
        raise NeedsCall("tracer='export' needs example_inputs= (a tuple of positional arguments or a dict of "
                        "keyword arguments, as the model's forward takes them), or a first call to capture from",
                        reason="tracer='export' was asked for")
    # fx: the program's skeleton; export: what other call forms are exported from (a failed fx capture
    # leaves it untouched, so "auto" falling back to export does not copy the model twice)
    model_copy, sources = weightless_copy(model)
    if tracer in ("auto", "fx"):
        form = CallForm(training=model.training)
        try:
            gm = capture(model, form, into=TensorParallelModule.without_code, onto=model_copy)
            return Captured(gm, model_copy, sources, "fx", form, note=cache_note(forward_signature(model)))
        except CaptureError as error:
            if tracer == "fx":
                raise
            fx_failure = str(error).split(". Fix:", 1)[0].split("): ", 1)[-1]  # where and why, without the advice
            if example_inputs is None:
                raise NeedsCall(f"{error}; or pass example_inputs= so that tpfx captures it with "
                                "torch.export instead", reason=fx_failure) from error
    exported = export_capture(model, _on_meta(example_inputs) if _built_on_meta(model) else example_inputs)
    with quiet_export():  # copying the exported graph module copies its tree specs
        skeleton, sources = weightless_copy(exported.gm)
    args, kwargs = _as_args_kwargs(example_inputs)
    form = call_form_of(forward_signature(model), args, kwargs, training=model.training)
    note = _export_note(type(model).__name__, fx_failure,
                        "its first call (or gm.prepare)" if from_first_call else "example_inputs", exported)
    note = " ".join(filter(None, [note, cache_note(forward_signature(model))]))
    gm = ExportedTensorParallelModule.without_code(skeleton, skeleton.graph, type(model).__name__)
    return Captured(gm, skeleton, sources, "export", form, exported, note, model_copy=model_copy)


def _built_on_meta(model: nn.Module) -> bool:
    """Whether the model's parameters are meta placeholders (built under :func:`tpfx.parameters_on_meta`)."""
    return any(parameter.is_meta for parameter in model.parameters())


def _on_meta(example_inputs: ExampleInputs) -> ExampleInputs:
    """The example's tensors on meta: a model whose weights are there computes on meta, and a tensor it
    makes on its input's device (positions, a causal mask) must meet them there. The graph's device
    constants say meta; :func:`tpfx.passes.meta_device.retarget_meta_device` makes them the call's device."""
    def moved(value: object) -> object:
        return value.to("meta") if isinstance(value, torch.Tensor) else value
    if isinstance(example_inputs, dict):
        return {name: moved(value) for name, value in example_inputs.items()}
    return tuple(map(moved, example_inputs)) if isinstance(example_inputs, tuple) else moved(example_inputs)


def _export_note(model_name: str, fx_failure: str, origin: str, exported: Exported) -> str:
    """Why the model was exported, from what, and what stayed dynamic, as sentences for ``tracer_note``."""
    if fx_failure and not fx_failure.startswith("tracer="):
        why = f"torch.fx could not trace {model_name} ({fx_failure}), so it was captured with torch.export from {origin}."
    else:
        why = f"{model_name} was captured with torch.export from {origin}, as tracer='export' asks."
    dims = ", ".join(exported.dynamic_dims)
    return f"{why} Dims left dynamic: {dims}." if dims else f"{why} torch.export left no dim dynamic."


_LEAF_SPEC_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


@contextmanager
def quiet_export() -> Iterator[None]:
    """Hide torch's own deprecation warning about ``LeafSpec``, which torch.export and copying its
    graph module raise from inside torch (nothing a tpfx user wrote or can change); others still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LEAF_SPEC_DEPRECATION, category=FutureWarning)
        yield
