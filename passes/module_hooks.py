"""Analysis: the hooks a module runs, and whether a tensor-parallel shard of a linear can keep them.

before (a model's linear with hooks)::

    model.ffn.fc1.register_forward_pre_hook(clip)     # clip(module, args)
    model.ffn.fc1.register_forward_hook(center)       # center(module, args, output)

after (facts)::

    carry_hooks(fc1, ColumnParallelLinear(fc1, ...), Placement.COLUMN, path="ffn.fc1")  # the shard runs clip
    hooks_keep_whole(fc1, "ffn.fc1", Placement.COLUMN)
    # -> "'ffn.fc1' has a forward hook 'center', which on a column-parallel shard would see this rank's
    #     slice of the output; remove the hook, or apply it in the forward of the parent module 'ffn' ..."

torch.fx traces a container module's hooks into the graph, but keeps a leaf module's hooks on the
module object, to run when the program calls it; a linear that tpfx replaces by its shard would lose
them. Whether a hook can move onto the shard depends on what it sees there (each rank runs it):

==========================  ============================================  =====================================
hook                        column-parallel shard (gather and megatron)   row-parallel shard (megatron)
==========================  ============================================  =====================================
forward pre-hook            the whole input, as on one device: carried    this rank's slice of the input
forward hook                this rank's slice of the output               a partial sum of the output
backward pre-hook           this rank's slice of the output gradient      the whole output gradient: carried*
backward hook (full/legacy) a slice / partial sum of the gradients        this rank's slice of the input grad
==========================  ============================================  =====================================

A column shard's input is the replicated input (``copy_to_tp`` is the identity forward), so a pre-hook
computes the same new input on every rank; its backward is linear in the incoming gradient, which
``copy_to_tp`` all-reduces after it. A row shard's output gradient is the whole one (``reduce_from_tp``
is the identity backward), so a backward pre-hook returns the same gradient on every rank, and each
rank's weight and input gradients are its slices of the single-device ones. (*) Only without a bias:
the row shard's bias is added after the all-reduce, outside the module, so its gradient would miss
the hook's change. Any other hook keeps the linear whole (gather mode: a ``Replicated`` record; megatron mode: the
pair falls back), with a reason naming the module, the hook and the fix. In megatron mode a module
called between a pair (an ``nn.GELU`` or ``nn.Dropout`` with a hook) sees the rank's part only, so any
hook there makes the pair fall back too.

Global hooks (``torch.nn.modules.module.register_module_forward_hook`` and its kin) run on every module
the program calls, the shards included, so they count as hooks of every linear; they need no carrying.
A carried hook is called with the shard as its module: one that reads the module's weight sees this
rank's part. Removing the original hook's handle later does not remove the carried copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import torch.nn as nn
import torch.nn.modules.module as torch_module

from tpfx.errors import ShardingError
from tpfx.layers import Placement


class HookKind(Enum):
    """What a hook is called with, as the reasons name it."""

    FORWARD_PRE = "forward pre-hook"
    FORWARD = "forward hook"
    BACKWARD_PRE = "backward pre-hook"
    BACKWARD = "backward hook"


# what a hook of each kind would see on a shard; None: the same as on one device, so it is carried
_SEES_ON_SHARD: dict[tuple[Placement, HookKind], str | None] = {
    (Placement.COLUMN, HookKind.FORWARD_PRE): None,
    (Placement.COLUMN, HookKind.FORWARD): "this rank's slice of the output",
    (Placement.COLUMN, HookKind.BACKWARD_PRE): "this rank's slice of the output gradient",
    (Placement.COLUMN, HookKind.BACKWARD): "this rank's slice of the output gradient and a partial input gradient",
    (Placement.ROW, HookKind.FORWARD_PRE): "this rank's slice of the input features",
    (Placement.ROW, HookKind.FORWARD): "a partial sum of the output, without the bias",
    (Placement.ROW, HookKind.BACKWARD_PRE): None,
    (Placement.ROW, HookKind.BACKWARD): "this rank's slice of the input gradient",
}


@dataclass(frozen=True)
class ModuleHook:
    """One hook a module runs: its kind, the function and how it was registered."""

    kind: HookKind
    function: Callable[..., object]
    with_kwargs: bool = False  # a forward pre-hook that takes (module, args, kwargs)
    is_global: bool = False  # registered for every module (torch.nn.modules.module.register_module_*)

    @property
    def name(self) -> str:
        """The function's qualified name, or its class's name for a callable object."""
        function = getattr(self.function, "func", self.function)  # a functools.partial names its function
        return getattr(function, "__qualname__", None) or type(function).__name__

    def describe(self) -> str:
        """E.g. ``forward hook 'center'`` or ``global forward hook 'Tracer.record'``."""
        return f"{'global ' if self.is_global else ''}{self.kind.value} '{self.name}'"


def module_hooks(module: nn.Module, *, include_global: bool = True) -> list[ModuleHook]:
    """The hooks that run when ``module`` is called: its own, then (with ``include_global``) the global ones.

    Args:
        module: any module.
        include_global: also list the hooks registered for every module.

    Returns:
        The hooks in the order torch runs each kind, own before global.
    """
    hooks = _registered(vars(module), is_global=False)
    return hooks + _registered(vars(torch_module), is_global=True) if include_global else hooks


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _registered(registry: dict[str, object], *, is_global: bool) -> list[ModuleHook]:
    """The hooks of one registry: a module's ``__dict__``, or torch.nn.modules.module's globals."""
    prefix = "_global" if is_global else ""
    pre, forward, backward_pre, backward = (registry.get(f"{prefix}{name}") or {} for name in _HOOK_DICTS)
    if not (pre or forward or backward_pre or backward):
        return []  # the common case, once per linear and module of a large model
    with_kwargs = registry.get(f"{prefix}_forward_pre_hooks_with_kwargs") or {}
    return ([ModuleHook(HookKind.FORWARD_PRE, f, key in with_kwargs, is_global) for key, f in pre.items()]
            + [ModuleHook(HookKind.FORWARD, f, is_global=is_global) for f in forward.values()]
            + [ModuleHook(HookKind.BACKWARD_PRE, f, is_global=is_global) for f in backward_pre.values()]
            + [ModuleHook(HookKind.BACKWARD, f, is_global=is_global) for f in backward.values()])


def hooks_keep_whole(module: nn.Module, path: str, placement: Placement) -> str:
    """Why ``module`` (at ``path``) must stay whole instead of becoming a ``placement`` shard.

    Args:
        module: the linear module the analysis would shard.
        path: its qualified name, for the reason.
        placement: the shard it would become.

    Returns:
        One line naming the first hook that could not run correctly on the shard, what it would see
        there and the fix; "" when every hook of ``module`` can be carried (or it has none).
    """
    for hook in module_hooks(module):
        sees = _SEES_ON_SHARD[placement, hook.kind]
        if placement is Placement.ROW and hook.kind is HookKind.BACKWARD_PRE and module.bias is not None:
            sees = "the gradient of the output without the bias, which tpfx adds after the all-reduce, outside it"
        if sees is not None:
            return (f"'{path}' has a {hook.describe()}, which on a {placement.value}-parallel shard would see {sees}; "
                    f"{_fix(path, hook)}")
    return ""


def hooks_keep_pair_whole(modules: dict[str, nn.Module], row_path: str, between: Iterable[str]) -> str:
    """Why a megatron pair must fall back: its row linear has a hook a row shard cannot keep, or a
    module called between the pair (on this rank's heads or features only) has any hook.

    Args:
        modules: the graph module's ``named_modules()``.
        row_path: the row linear's module path ("" for an op on a parameter: export graphs inline hooks).
        between: the targets of the modules called on the pair's values between its linears.

    Returns:
        One line naming the module, the hook and the fix; "" when the pair can be formed.
    """
    if row_path and (why := hooks_keep_whole(modules[row_path], row_path, Placement.ROW)):
        return why
    for path in between:
        module = modules[path]
        if isinstance(module, nn.Linear):
            continue  # the pair's own column linears: checked as column shards by the site finder
        hooks = module_hooks(module)
        if hooks:
            return (f"'{path}' ({type(module).__name__}) has a {hooks[0].describe()}, which megatron mode would "
                    f"run on this rank's heads or features only; {_fix(path, hooks[0])}")
    return ""


def carry_hooks(source: nn.Module, shard: nn.Module, placement: Placement, *, path: str) -> nn.Module:
    """Register ``source``'s own hooks on ``shard``, which replaces it; global hooks run on ``shard`` anyway.

    Args:
        source: the single-device linear.
        shard: this rank's replacement of it.
        placement: what ``shard`` is.
        path: the module path, for the error.

    Returns:
        ``shard``, its hooks registered in ``source``'s order.

    Raises:
        ShardingError: a hook would not see on ``shard`` what it sees on one device; the analysis keeps
            such a linear whole, so this means the shard was asked for without it.
    """
    if why := hooks_keep_whole(source, path, placement):
        raise ShardingError(f"cannot replace {why}")
    for hook in module_hooks(source, include_global=False):
        if hook.kind is HookKind.FORWARD_PRE:
            shard.register_forward_pre_hook(hook.function, with_kwargs=hook.with_kwargs)
        else:  # the only other kind a shard keeps (see _SEES_ON_SHARD)
            shard.register_full_backward_pre_hook(hook.function)
    return shard


def _fix(path: str, hook: ModuleHook) -> str:
    """The way out for ``hook`` on the module at ``path``, in words."""
    if hook.is_global:
        return "remove the global hook (its handle's remove()) before parallelizing and while the program runs"
    parent = path.rpartition(".")[0]
    if hook.kind in (HookKind.BACKWARD_PRE, HookKind.BACKWARD):
        return "remove the hook (the program keeps no backward hook of a module it traces through either)"
    if not parent:
        return "remove the hook, or move the linear into a submodule and register the hook on that"
    return (f"remove the hook, or apply it in the forward of the parent module '{parent}' or as a hook on it "
            "(tpfx traces those into the graph)")


def hooks_lost_in_capture(model: nn.Module, *, is_leaf: Callable[[nn.Module, str], bool] | None) -> str:
    """Why capturing ``model`` would run without one of its hooks ("" when the capture keeps them all).

    torch.fx (``is_leaf``: the tracer's leaf test) traces the hooks of the modules it traces through
    into the graph, keeps a leaf module's on the module, and loses two kinds: the model's own hooks (it
    traces ``forward``, not the call) and the backward hooks of the modules it traces through (a graph
    records none; torch even loops on an old-style one). torch.export (``is_leaf`` None) traces every
    forward hook into the graph and drops every backward hook.

    Args:
        model: the model about to be captured.
        is_leaf: the fx tracer's ``is_leaf_module``; None for torch.export.

    Returns:
        One line naming the module, the hook and the fix, or "".
    """
    backward = (HookKind.BACKWARD_PRE, HookKind.BACKWARD)
    for path, module in model.named_modules():
        hooks = module_hooks(module, include_global=False)
        if is_leaf is not None and not path and hooks:
            return (f"{type(model).__name__} has a {hooks[0].describe()} on the model itself, which torch.fx does not "
                    "trace (the program would run without it); remove it and apply it to the program's inputs or "
                    "output in your own code, or register it on a submodule")
        lost = [h for h in hooks if h.kind in backward and (is_leaf is None or not is_leaf(module, path))]
        if lost:
            kept = "a leaf module such as nn.Linear keeps it with tracer='fx'" if is_leaf is None else (
                "torch.fx keeps one on a leaf module such as nn.Linear")
            return (f"module '{path or '<root>'}' ({type(module).__name__}) has a {lost[0].describe()}, which "
                    f"{'torch.export' if is_leaf is None else 'torch.fx'} drops (the captured graph records no "
                    f"module backward hook); remove the hook ({kept})")
    return ""


def shared_hook_objects(model: nn.Module) -> dict[int, object]:
    """A ``copy.deepcopy`` memo under which a copy of ``model`` keeps calling the user's own hook objects.

    A deep copy would copy a hook that holds state (a bound method of a recorder object, a
    ``functools.partial`` over a list, a callable object), and the program's calls would then go to
    the copy, never seen by the user. A bound method of one of the model's own modules is left out:
    the copy's hook is bound to the module's copy, as the copied module tree expects.

    Args:
        model: the model about to be copied.

    Returns:
        ``{id(hook): hook}`` for every hook of every module of ``model`` that is not bound to one of them.
    """
    own = {id(module) for module in model.modules()}
    return {id(hook.function): hook.function for module in model.modules()
            for hook in module_hooks(module, include_global=False)
            if id(getattr(hook.function, "__self__", None)) not in own}
