"""Load what the CLI works on: ``path/to/file.py:factory`` or ``package.module:factory``.

The factory takes no arguments and returns a model, or ``(model, example_inputs)`` where
``example_inputs`` is a tuple of positional arguments, a dict of keyword arguments or one tensor, or
``(model, [example_inputs, ...])``: several example calls, one per call form ``tpfx verify`` checks
(the first is the one ``dump`` and ``explain`` use).
Without example inputs, tpfx infers the required arguments of ``forward`` from their first use in
the captured graph (an Embedding takes token ids, a Linear or LayerNorm takes features).

Every argument becomes an :class:`ArgumentRecipe`, so that the same target yields shape-only
inputs for the communication table and seeded random inputs for ``tpfx verify``, at any batch and
sequence length.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from tpfx.capture import CallForm, capture, optional_parameters
from tpfx.errors import CaptureError, TpfxError, first_line, one_line


class TargetError(TpfxError):
    """A TARGET cannot be loaded: bad spelling, missing file or factory, or a factory that fails."""


@dataclass(frozen=True)
class ArgumentRecipe:
    """How to make one argument of ``forward``: a tensor of a shape and dtype, or a fixed value.

    Tensors are laid out batch first, then sequence: ``batch`` replaces dim 0 and ``seq`` dim 1.
    Integer tensors are drawn from ``[low, high)`` (token ids below the vocabulary size, 0/1 masks).
    """

    name: str
    shape: tuple[int, ...] | None = None  # None: not a tensor, pass ``value``
    dtype: torch.dtype | None = None
    low: int = 0
    high: int = 2
    value: object = None

    def make(self, *, batch: int | None, seq: int | None, generator: torch.Generator | None) -> object:
        """The argument at the given sizes; random when ``generator`` is given, else zeros (shape only)."""
        if self.shape is None:
            return self.value
        shape = list(self.shape)
        for dim, size in ((0, batch), (1, seq)):
            if size is not None and len(shape) > dim:
                shape[dim] = size
        if generator is None:
            return torch.zeros(shape, dtype=self.dtype)
        if self.dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=generator).bool()
        if self.dtype.is_floating_point:
            return torch.randn(shape, generator=generator).to(self.dtype)
        return torch.randint(self.low, self.high, shape, generator=generator, dtype=self.dtype)


@dataclass(frozen=True)
class Target:
    """A loaded TARGET: the model and a recipe for every argument its forward is called with."""

    spec: str
    model: nn.Module
    recipes: tuple[ArgumentRecipe, ...]  # the first (or only) call
    inputs_from_factory: bool
    more_calls: tuple[tuple[ArgumentRecipe, ...], ...] = ()  # further example calls the factory declares

    def inputs(self, *, batch: int | None = None, seq: int | None = None,
               seed: int | None = None) -> dict[str, object]:
        """Keyword arguments for ``model(**inputs)``: seeded random with ``seed``, else zeros."""
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return {r.name: r.make(batch=batch, seq=seq, generator=generator) for r in self.recipes}

    def calls(self, *, batch: int | None = None, seq: int | None = None, seed: int | None = None,
              every_form: bool = False) -> list[tuple[str, dict[str, object]]]:
        """(label, keyword arguments) of every call to check: the declared ones, and with ``every_form``
        also one per optional argument of ``forward`` that tpfx can give a non-default value
        (a bool flipped, a number changed, ``None`` replaced by a number its annotation allows).

        A graph is traced per call form, so a branch that only a non-default argument takes runs a
        graph no other call checks.
        """
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        calls = [{r.name: r.make(batch=batch, seq=seq, generator=generator) for r in recipes}
                 for recipes in (self.recipes, *self.more_calls)]
        labelled = [(_label(call), call) for call in calls]
        if every_form:
            given = set().union(*(call for call in calls))
            for name, parameter in inspect.signature(self.model.forward).parameters.items():
                value = _non_default(parameter)
                if name not in given and value is not _NONE:
                    labelled.append((f"{name}={value!r}", {**calls[0], name: value}))
        return labelled

    def describe_inputs(self, *, batch: int | None = None, seq: int | None = None) -> str:
        """A one-line description such as ``input_ids: int64[2, 16]``."""
        parts = []
        for name, value in self.inputs(batch=batch, seq=seq).items():
            shown = (f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
                     if isinstance(value, torch.Tensor) else repr(value))
            parts.append(f"{name}: {shown}")
        return ", ".join(parts)


def parallelize_target(target: Target, *, tp: int | None, rank: int | None = None, batch: int | None = None,
                       seq: int | None = None, options: dict[str, object] | None = None) -> nn.Module:
    """``tpfx.parallelize`` of the target's model, handing it example inputs where it takes them.

    Args:
        target: a loaded TARGET.
        tp, rank: as for :func:`tpfx.parallelize` (``rank`` builds an inspection program).
        batch, seq: the sizes of the example inputs (a torch.export capture specializes on a call).
        options: further keyword options of ``parallelize`` (``mode``, ``tracer``, ...).

    Returns:
        This rank's program.
    """
    from tpfx.api import parallelize  # tpfx.api imports the passes; keep this module light to import

    options = dict(options or {})
    if "example_inputs" in inspect.signature(parallelize).parameters:
        options.setdefault("example_inputs", target.inputs(batch=batch, seq=seq, seed=0))
    return parallelize(target.model, tp=tp, rank=rank, **options)


def load_target(spec: str) -> Target:
    """Import the factory named by ``spec``, call it and describe the model's inputs.

    Args:
        spec: ``path/to/file.py:factory`` or ``package.module:factory``.

    Returns:
        The model and its argument recipes (from the factory's example inputs, else inferred).

    Raises:
        TargetError: bad spelling, missing file, module or factory, a factory that raises (or calls
            ``sys.exit``) or returns something else than a model; inputs that cannot be inferred.
        CaptureError: inputs must be inferred and the model cannot be captured.
    """
    factory = _resolve_factory(spec)
    try:
        produced = factory()
    except SystemExit as error:  # sys.exit() in user code must not end the CLI silently with its status
        raise TargetError(f"factory {spec!r} called sys.exit({error.code!r}) instead of returning a model; "
                          "fix the factory so that it returns a model") from error
    except Exception as error:  # any failure of user code becomes one line naming the factory
        raise TargetError(f"factory {spec!r} raised {one_line(error)}; "
                          "fix the factory so that it returns a model") from error
    model, example = produced if isinstance(produced, tuple) and len(produced) == 2 else (produced, None)
    if not isinstance(model, nn.Module):
        raise TargetError(f"factory {spec!r} returned {type(produced).__name__}, expected an nn.Module, "
                          "(nn.Module, example_inputs) or (nn.Module, [example_inputs, ...])")
    if example is None:
        return Target(spec, model, _inferred_recipes(model, spec), inputs_from_factory=False)
    if isinstance(example, list):  # several example calls: one per call form to check
        if not example:
            raise TargetError(f"factory {spec!r} returned an empty list of example calls; give at least one")
        first, *more = (_recipes_from_example(model, call, spec) for call in example)
        return Target(spec, model, first, inputs_from_factory=True, more_calls=tuple(more))
    return Target(spec, model, _recipes_from_example(model, example, spec), inputs_from_factory=True)


_NONE = object()  # no non-default value can be made for a parameter


def _non_default(parameter: inspect.Parameter) -> object:
    """A value other than the default of an optional, non-tensor ``forward`` parameter, or ``_NONE``."""
    default = parameter.default
    if default is inspect.Parameter.empty or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
        return _NONE
    if isinstance(default, bool):
        return not default
    if isinstance(default, float):
        return default * 2 if default else 0.5
    if isinstance(default, int):
        return default * 2 if default else 2
    if default is None:
        annotation = str(parameter.annotation)
        for word, value in (("float", 0.5), ("int", 2), ("bool", True)):
            if word in annotation and "Tensor" not in annotation:
                return value
    return _NONE


def _label(call: dict[str, object]) -> str:
    """How a call is named in verify's table: its arguments, non-tensors with their values."""
    return ", ".join(name if isinstance(value, torch.Tensor) else f"{name}={value!r}" for name, value in call.items())


def _resolve_factory(spec: str) -> Callable[[], object]:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise TargetError(f"TARGET {spec!r} must be path/to/file.py:factory or package.module:factory")
    module = _import_file(where, spec) if where.endswith(".py") or "/" in where else _import_module(where, spec)
    factory = getattr(module, name, None)
    if factory is None:
        available = sorted(n for n, v in vars(module).items()
                           if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_"))
        raise TargetError(f"{where!r} has no factory {name!r}; its functions are: {', '.join(available) or 'none'}")
    if not callable(factory):
        raise TargetError(f"{where}:{name} is a {type(factory).__name__}, not a callable factory")
    return factory


def _import_file(path_text: str, spec: str) -> object:
    path = Path(path_text).resolve()
    if not path.is_file():
        raise TargetError(f"file {path_text!r} of TARGET {spec!r} does not exist (looked at {path}); check the path")
    name = f"tpfx_target_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # like running the file: its sibling imports work
    try:
        module_spec.loader.exec_module(module)
    except ModuleNotFoundError as error:  # a package the file needs is not installed: say which to install
        del sys.modules[name]
        raise TargetError(f"importing {path_text!r} needs {missing_package_fix(error)}") from error
    except (Exception, SystemExit) as error:  # the user's file (sys.exit at import too); one line with its error
        del sys.modules[name]
        what = f"sys.exit({error.code!r})" if isinstance(error, SystemExit) else one_line(error)
        raise TargetError(f"importing {path_text!r} raised {what}; fix the file so that it imports "
                          "(guard its script part with `if __name__ == '__main__':`)") from error
    return module


def missing_package_fix(error: ModuleNotFoundError) -> str:
    """What to install for a missing import: ``transformers, which is not installed; install it with
    pip install -e ".[hf]" ...`` when one of tpfx's extras provides it (the smallest such extra)."""
    package = (error.name or first_line(error)).split(".")[0]
    extras = _extras_providing(package)
    if not extras:
        return f"the package {package!r}, which is not installed; install it (pip install {package})"
    extra = min(extras, key=extras.get)
    return (f"the package {package!r}, which is not installed; install tpfx's {extra!r} extra: "
            f'pip install -e ".[{extra}]" in a clone of tpfx (or pip install "tpfx[{extra}]")')


def _extras_providing(package: str) -> dict[str, int]:
    """tpfx's extras that install ``package``, each with its number of requirements (from the installed metadata)."""
    try:
        requirements = importlib.metadata.requires("tpfx") or []
    except importlib.metadata.PackageNotFoundError:  # tpfx run from a source tree it was not installed from
        return {}
    sizes: dict[str, int] = {}
    providing = set()
    for requirement in requirements:
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if extra is None:
            continue
        sizes[extra.group(1)] = sizes.get(extra.group(1), 0) + 1
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group()
        if re.sub(r"[-_.]+", "-", name).lower() == re.sub(r"[-_.]+", "-", package).lower():
            providing.add(extra.group(1))
    return {extra: sizes[extra] for extra in providing}


def _import_module(name: str, spec: str) -> object:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] != name.split(".")[0]:  # found, but it imports a missing package
            raise TargetError(f"importing module {name!r} needs {missing_package_fix(error)}") from error
        raise TargetError(f"module {name!r} of TARGET {spec!r} cannot be found ({first_line(error)}); "
                          "install it or give a path/to/file.py") from error
    except (Exception, SystemExit) as error:  # the user's module (sys.exit at import too)
        what = f"sys.exit({error.code!r})" if isinstance(error, SystemExit) else one_line(error)
        raise TargetError(f"importing module {name!r} raised {what}") from error


def _recipes_from_example(model: nn.Module, example: object, spec: str) -> tuple[ArgumentRecipe, ...]:
    args, kwargs = ((), example) if isinstance(example, dict) else (
        ((example,) if isinstance(example, torch.Tensor) else tuple(example)), {})
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as error:
        raise TargetError(f"example inputs of {spec!r} do not fit {type(model).__name__}.forward: {error}") from None
    recipes = []
    for name, value in bound.arguments.items():
        if not isinstance(value, torch.Tensor):
            recipes.append(ArgumentRecipe(name, value=value))
        elif value.dtype.is_floating_point or value.dtype == torch.bool or value.numel() == 0:
            recipes.append(ArgumentRecipe(name, tuple(value.shape), value.dtype))
        else:  # integers keep their range: ids stay below the vocabulary size, masks stay 0/1
            low, high = int(value.min()), int(value.max()) + 1
            recipes.append(ArgumentRecipe(name, tuple(value.shape), value.dtype, low=low, high=max(high, low + 1)))
    return tuple(recipes)


def _inferred_recipes(model: nn.Module, spec: str, *, batch: int = 2, seq: int = 16) -> tuple[ArgumentRecipe, ...]:
    """Recipes for the required arguments, from the module each placeholder first feeds."""
    signature = inspect.signature(model.forward)
    optional = optional_parameters(signature)
    try:
        gm = capture(model, CallForm(absent=frozenset(optional), training=model.training))
    except CaptureError as error:
        raise CaptureError(f"{error}; or make the factory in {spec!r} return (model, example_inputs) so that "
                           "torch.export can capture it") from error
    required = {name for name, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    recipes = []
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.target not in required:
            continue  # optional arguments are left out (None); fx keeps placeholders for them too
        first = next((user for user in node.users if user.op == "call_module"), None)
        module = gm.get_submodule(first.target) if first is not None else None
        if isinstance(module, nn.Embedding):
            recipes.append(ArgumentRecipe(node.target, (batch, seq), torch.long, high=module.num_embeddings))
        elif isinstance(module, (nn.Linear, nn.LayerNorm)):
            width = module.in_features if isinstance(module, nn.Linear) else module.normalized_shape[-1]
            recipes.append(ArgumentRecipe(node.target, (batch, seq, width), torch.float32))
        else:
            feeds = type(module).__name__ if module is not None else "no module"
            raise TargetError(f"cannot infer argument {node.target!r} of {type(model).__name__}.forward: it first "
                              f"feeds {feeds}, not an Embedding, Linear or LayerNorm; make the factory in {spec!r} "
                              "return (model, example_inputs)")
    return tuple(recipes)
