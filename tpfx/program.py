"""The program one rank runs: a GraphModule that serves every call form of the original model.

A graph is traced for one call form (which optional arguments are None, train or eval). The
program holds the graph of the form it was built with, and traces any other form the first time it
is called that way, reusing the sharded modules already held. So ``gm(ids)``, ``gm(ids, mask)`` and
``gm(ids, labels=y)`` each run a graph traced for exactly that call, and all of them share one set
of parameters.

Other forms are traced from the *skeleton*: the weightless copy of the model the program was
compiled from (:func:`tpfx.capture.weightless_copy`). Its leaf modules are the program's own
(tracing reads no values), and the tensors it holds elsewhere (site placeholders, buffers of
container modules) are meta placeholders, so the skeleton costs no memory and keeps nothing alive
after ``.to()`` replaces the program's tensors.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from tpfx.capture import TRACED_CONSTANTS, CallForm, call_form_of, capture
from tpfx.collectives import settle_call_check, start_call_check
from tpfx.errors import ConfigError
from tpfx.passes.graph_view import CALL_FORM
from tpfx.passes.meta_device import device_of_call


class CallForms(tuple):
    """The call forms a program has built, its own graph's first; printed as a sentence."""

    def __repr__(self) -> str:
        if not self:
            return "no call form built yet: the first call builds the first"
        built = [f"{form.describe()} (the program's own graph)" if index == 0 else form.describe()
                 for index, form in enumerate(self)]
        return f"{len(self)} call form{'s' if len(self) > 1 else ''} built: {'; '.join(built)}"

    __str__ = __repr__


@dataclass
class _Forms:
    """What the program needs to trace and rewrite another call form (kept out of the module tree)."""

    skeleton: nn.Module
    signature: inspect.Signature
    primary: CallForm
    rewrite: Callable[[fx.GraphModule, torch.device], object]  # the passes, given where the call's tensors are
    built: dict[CallForm, fx.GraphModule] = field(default_factory=dict)


class TensorParallelModule(fx.GraphModule):
    """A rank's tensor-parallel program; ``.graph`` and ``.code`` show the form it was built with.

    ``tpfx_report`` (set by :func:`tpfx.parallelize`) describes the sites, collectives and memory.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # torch.compile caches what it compiled, and counts recompilations against dynamo's limit (8),
        # per code object of the frame it starts at. That frame is this class's ``__call__`` (fx's
        # call wrapper is skipped by dynamo), so with one code object for every program the ninth
        # program or call form compiled in a process failed under fullgraph=True (eager fallback
        # without it). torch.fx makes a class per program: each gets a copy of ``__call__`` with a
        # code object of its own, so every program has its own cache and limit.
        super().__init_subclass__(**kwargs)
        if "__call__" not in vars(cls):
            cls.__call__ = _own_code_copy(cls.__call__)

    @classmethod
    def without_code(cls, root: nn.Module, graph: fx.Graph, class_name: str) -> TensorParallelModule:
        """The program over ``root`` and ``graph``, its Python code not generated yet.

        tpfx rewrites the captured graph before the program can run; generating code for the graph
        as captured would be thrown away (about a sixth of the whole pass). :meth:`recompile`
        generates it; until then the program cannot be called.
        """
        program = cls.__new__(cls, root, graph, class_name)
        program.__dict__["_tpfx_code_later"] = True  # read by the recompile that fx's constructor makes
        program.__init__(root, graph, class_name)
        return program

    def recompile(self):  # noqa: ANN201 - fx.GraphModule's signature
        if self.__dict__.pop("_tpfx_code_later", False):
            return None  # the constructor's call, from without_code
        return super().recompile()

    def attach_call_forms(self, source: nn.Module, signature: inspect.Signature, primary: CallForm,
                          rewrite: Callable[[fx.GraphModule, torch.device], object]) -> None:
        """Let this program serve other call forms: ``rewrite`` applies the same passes to their graphs.

        Args:
            source: the weightless copy of the model this program was built from: its leaf modules
                are the program's, its other modules hold only meta placeholders.
            signature: the model's forward signature, to tell the call form of a call.
            primary: the call form of this program's own graph.
            rewrite: the passes for a newly traced graph and the device of the call's tensors (graph
                only: its code is generated here).
        """
        # through __dict__ so that the skeleton is not registered as a submodule (no state_dict entries)
        self.__dict__["_tpfx_forms"] = _Forms(source, signature, primary, rewrite)

    @property
    def call_forms(self) -> CallForms:
        """The call forms built so far, the primary one first."""
        forms = self.__dict__.get("_tpfx_forms")
        return CallForms((forms.primary, *forms.built) if forms else ())

    def prepare(self, *args: Any, **kwargs: Any) -> TensorParallelModule:
        """Nothing to do: this program is captured (a program made without example inputs from a model
        torch.fx cannot trace is captured by its ``prepare`` or first call, see :mod:`tpfx.deferred`).

        Returns:
            This program.
        """
        return self

    def module_for_call(self, *args: Any, **kwargs: Any) -> fx.GraphModule:
        """The GraphModule that ``self(*args, **kwargs)`` runs: this one, or the one traced for that call form.

        Raises:
            ConfigError: the arguments do not fit the model's forward signature.
        """
        forms: _Forms | None = self.__dict__.get("_tpfx_forms")
        if forms is None:
            return self
        form = call_form_of(forms.signature, args, kwargs, training=self.training)
        if form == forms.primary:
            return self
        built = forms.built.get(form)  # every call after the first: no device look-up on the step's path
        return built if built is not None else self._module_for(forms, form, device_of_call([*args, *kwargs.values()]))

    # torch.compile builds a call form before tracing: dynamo runs ``_infer_parameters`` in plain Python
    # (eagerly before a compiled top-level call, with fake arguments while tracing an enclosing model)
    # for any module that has ``_initialize_hook``, the protocol it keeps for lazy modules. Building a
    # form traces the model with torch.fx, which dynamo cannot trace through; done here, the compiled
    # frame only looks the form up, and ``torch.compile(program, fullgraph=True)`` has no graph break.
    _initialize_hook = None

    @staticmethod
    def _infer_parameters(module: TensorParallelModule, args: tuple, kwargs: dict | None = None) -> None:
        kwargs = kwargs or {}
        module.module_for_call(*args, **kwargs)
        key = module.__dict__.get("_tpfx_call_check")
        # the compiled frame skips the call check (it would break the graph); before each call of a
        # compiled program it runs here instead, in plain Python, and waits for its answer at once:
        # no collective of the compiled graph settles it
        if key is not None and not torch.compiler.is_compiling():
            module._check_call(key, args, kwargs)
            settle_call_check(key)

    def check_calls_in(self, key: str | None) -> None:
        """Check that the ranks of group ``key`` make the same calls (tensor shapes, optional
        arguments, train/eval): ranks that differ would hand the program's collectives tensors of
        different sizes, which gloo cannot report (it aborts the process).

        Every call starts one all-gather of 48 bytes on the group's control group, asynchronously;
        the program's first collective waits for it (see :func:`tpfx.collectives.start_call_check`).
        ``parallelize`` turns it on; ``None`` turns it off (``gm.check_calls_in(None)``).
        """
        self.__dict__["_tpfx_call_check"] = key

    def _check_call(self, key: str, args: tuple, kwargs: dict) -> None:
        values = [*args, *(kwargs[name] for name in sorted(kwargs))]
        shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in values]
        simple = [v if isinstance(v, (bool, int, float, str, type(None))) else type(v).__name__
                  for v in values if not isinstance(v, torch.Tensor)]
        form = f"{'train' if self.training else 'eval'}, keywords {sorted(kwargs)}, values {simple}"
        start_call_check(key, shapes, form)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self.__dict__.get("_tpfx_call_check")
        # not while torch.compile traces this call: the check's asynchronous all-gather and its Python
        # comparison would break the graph (fullgraph=True refuses that); a compiled program runs unchecked
        if key is not None and not torch.compiler.is_compiling():
            self._check_call(key, args, kwargs)
        return self.call_program(*args, **kwargs)

    def call_program(self, *args: Any, **kwargs: Any) -> Any:
        """What ``self(*args, **kwargs)`` does after the call check: run the graph of this call's form
        (built on its first use).

        A method of its own because torch.fx gives each GraphModule a class whose ``__call__`` is a
        wrapper dynamo will not trace into, and the exported program's differs here only.
        """
        module = self.module_for_call(*args, **kwargs)
        if module is self:
            return super().__call__(*args, **kwargs)
        return self.call_as_this_program(module, super().__call__, args, kwargs)

    def call_as_this_program(self, module: fx.GraphModule, call: Callable[..., Any], args: tuple,
                             kwargs: dict) -> Any:
        """Run another call form's ``module`` inside this program's own call (``call``), as its forward.

        The hooks registered on the program then run around every form as around the primary one:
        FSDP2's ``fully_shard`` gathers the parameters in a forward pre-hook, a user's hook sees each
        call. Under torch.compile the form's module is called directly (no hook is registered there
        that the compiled frame would need, and dynamo does not trace a module's attribute swap).
        """
        if torch.compiler.is_compiling():
            return module(*args, **kwargs)
        self.__dict__["forward"] = module.forward  # nn.Module's call reads self.forward
        try:
            return call(*args, **kwargs)
        finally:
            del self.__dict__["forward"]

    def _module_for(self, forms: _Forms, form: CallForm, device: torch.device) -> fx.GraphModule:
        """Trace, rewrite and bind ``form`` (first call of that form); ``device``: where its tensors are."""
        # the skeleton's leaves are this program's modules: tracing sets their mode, so restore it
        modes = [(module, module.training) for module in self.modules()]
        try:
            traced = capture(forms.skeleton, form)
        finally:
            for module, training in modes:
                module.training = training
        traced.meta[CALL_FORM] = f"({form.describe()})"  # what messages of the passes call it
        forms.rewrite(traced, device)
        # every module, parameter and buffer is this program's own, shared, not copied; the tensor
        # constants are this trace's (another form's constant may have the same name)
        constants = set(traced.meta.get(TRACED_CONSTANTS, ()))
        attributes = graph_attributes(traced.graph, lambda node: traced if node.target in constants else self)
        for name in constants & attributes.keys():
            if isinstance(attributes[name], torch.Tensor) and attributes[name].device.type == "meta":
                raise ConfigError(
                    f"cannot trace ({form.describe()}) for this {self._get_name()} program: its constant '{name}' "
                    "was computed while tracing from a weight, which the weightless copy holds on meta; compute "
                    "it in forward from tensors (or register it as a buffer), or build the program for this form"
                )
        forms.built[form] = fx.GraphModule(attributes, traced.graph, type(self).__name__)
        return forms.built[form]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # .to()/.cuda() may replace buffers by new tensors; other forms re-bind on their next call
        forms: _Forms | None = self.__dict__.get("_tpfx_forms")
        if forms is not None:
            forms.built.clear()
        return super()._apply(fn, recurse)


def _own_code_copy(function: types.FunctionType) -> types.FunctionType:
    """``function`` with a new code object (same bytecode): caches keyed by code object see a new function."""
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__qualname__, copy.__doc__, copy.__kwdefaults__ = function.__qualname__, function.__doc__, function.__kwdefaults__
    return copy


def graph_attributes(graph: fx.Graph, owner_of: Callable[[fx.Node], nn.Module]) -> dict[str, object]:
    """What a GraphModule for ``graph`` needs, by target: each ``get_attr`` and ``call_module`` target
    read from the module ``owner_of(node)`` says (the program, or the capture that made the graph)."""
    attributes: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in attributes:
            value: object = owner_of(node)
            for part in str(node.target).split("."):
                value = getattr(value, part)
            attributes[node.target] = value
    return attributes


def adopt_missing(gm: nn.Module, owner: nn.Module) -> None:
    """Give ``gm`` every submodule, parameter and buffer of ``owner`` that its graph did not reference.

    A GraphModule keeps only what its graph uses; other call forms may use more (a buffer read only
    when a mask is given), and the program's state dict must carry every key of the original model.
    """
    for name, child in owner.named_children():
        mine = getattr(gm, name, None)
        if mine is None:
            gm.add_module(name, child)
        elif type(mine) is nn.Module and mine is not child:
            adopt_missing(mine, child)  # a container the GraphModule made; sharded modules are left alone
    for name, parameter in owner.named_parameters(recurse=False):
        if name not in gm._parameters:
            gm.register_parameter(name, parameter)
    for name, buffer in owner.named_buffers(recurse=False):
        persistent = name not in owner._non_persistent_buffers_set
        if name not in gm._buffers:
            gm.register_buffer(name, buffer, persistent=persistent)
        elif not persistent:
            gm._non_persistent_buffers_set.add(name)  # the GraphModule copy registered it as persistent


def take_weights(gm: nn.Module, sources: dict[int, torch.Tensor]) -> None:
    """Replace each placeholder ``gm`` holds by a copy of the tensor it stands for (``sources``: by id).

    Sharded layers already hold their slices, so what is copied here is what every rank keeps whole.
    A tensor registered under two names stays one tensor; a source on meta stays a placeholder.
    """
    copies: dict[int, torch.Tensor] = {}
    for module in gm.modules():
        for registry in (module._parameters, module._buffers):
            for name, tensor in registry.items():
                source = sources.get(id(tensor)) if tensor is not None else None
                if source is None or source.device.type == "meta":
                    continue
                if id(tensor) not in copies:
                    # clone: the program owns compact storage and the caller's tensor is never aliased
                    data = source.detach().clone()
                    copies[id(tensor)] = (nn.Parameter(data, source.requires_grad)
                                          if isinstance(tensor, nn.Parameter) else data)
                registry[name] = copies[id(tensor)]
