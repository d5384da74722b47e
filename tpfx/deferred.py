"""A program captured on its first call: for models torch.fx cannot trace, without example inputs.

torch.fx traces with proxies, so a forward that asserts on a size (``assert t <= self.block_size``),
iterates over ``x.shape`` or builds a tensor from a traced size (``torch.ones(t, t)``) cannot be
traced without knowing the sizes. torch.export can, but it needs one call's arguments. As
``torch.compile`` does, :func:`tpfx.parallelize` then returns a :class:`DeferredProgram`: the
options, the process group and the model were checked when it was made; its first call
(``gm(ids)``) exports the model from that call's arguments (batch and sequence dims dynamic), shards
the weights and runs. From then on the object *is* the rank's program (an
:class:`~tpfx.export_capture.ExportedTensorParallelModule`: ``gm.graph``, ``gm.tpfx_report``,
``gm.parameters()``), so code that holds ``gm`` keeps working.

``gm.prepare(*args, **kwargs)`` captures from those arguments without running (for loading a
checkpoint, making an optimizer, reading the report before the first step). Before either, what
only a captured program has (parameters, state dict, graph, report, plan) raises one line saying so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from tpfx.errors import ConfigError
from tpfx.program import CallForms, TensorParallelModule

# what a captured program has and a deferred one has not yet (parameters and state are guarded below)
_CAPTURED_ONLY = frozenset({"graph", "code", "tpfx_report", "tpfx_plan", "tpfx_pairing", "export_form"})


@dataclass(frozen=True)
class _Pending:
    """What the first call needs: how to compile the program from a call's arguments, and why it waits."""

    model_name: str
    reason: str  # why torch.fx was not used
    compile: Callable[[tuple, dict, bool], TensorParallelModule]  # (args, kwargs, training) -> the program


class DeferredProgram(nn.Module):
    """A rank's program that is captured from its first call (or :meth:`prepare`), then becomes it.

    Made by :func:`tpfx.parallelize` when torch.fx cannot trace the model and no ``example_inputs``
    were given. ``train()`` / ``eval()`` before the first call choose the mode it is captured in.
    """

    def __init__(self, model_name: str, reason: str, compile: Callable[[tuple, dict, bool], TensorParallelModule],
                 *, training: bool) -> None:
        """Args:
            model_name: the model's class name, for messages.
            reason: why torch.fx was not used (its failure, in one line).
            compile: builds the program from one call's positional and keyword arguments, in a mode.
            training: the mode the program starts in (the model's).
        """
        super().__init__()
        self.__dict__["_tpfx_pending"] = _Pending(model_name, reason, compile)
        self.training = training

    def prepare(self, *args: Any, **kwargs: Any) -> TensorParallelModule:
        """Capture, shard and compile the program from the arguments of one call, without running it.

        Afterwards this object is the program; the arguments are only looked at (their dtypes,
        ranks and sizes), so zeros of the right shape do. Batch and sequence dims stay dynamic when
        they are 2 or more in this call.

        Returns:
            This object, now a :class:`~tpfx.program.TensorParallelModule`.

        Raises:
            ConfigError: the arguments do not fit the model's forward.
            CaptureError: torch.export cannot capture the model for this call.
        """
        pending: _Pending = self.__dict__["_tpfx_pending"]
        program = pending.compile(args, kwargs, self.training)
        _carry_hooks(self, program)
        # become the program: its per-instance class (torch.fx gives each GraphModule its own) and its state
        object.__setattr__(self, "__class__", type(program))
        object.__setattr__(self, "__dict__", program.__dict__)
        return self  # type: ignore[return-value] - the class was just changed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self, DeferredProgram):  # not captured yet (torch.compile may call this after it was)
            self.prepare(*args, **kwargs)
        # the program's own call, now that this is the program (its class's: fx's per-instance wrapper is not
        # traced by torch.compile)
        return TensorParallelModule.__call__(self, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The program's call (captures first). Defined here so that ``torch.compile(gm)`` compiles this
        object's ``__call__``, which picks the graph of each call form, as it does for a captured
        program; with nn.Module's placeholder forward it would inline ``nn.Module._call_impl``, which
        calls the first form's graph for every form."""
        return self(*args, **kwargs)

    # torch.compile: capture before dynamo traces the first call (see TensorParallelModule._infer_parameters)
    # (the same hook: it calls module_for_call, which here captures first)
    _initialize_hook = TensorParallelModule._initialize_hook
    _infer_parameters = staticmethod(TensorParallelModule._infer_parameters)

    def module_for_call(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Capture from this call's arguments (see :meth:`prepare`), then the graph such a call runs."""
        self.prepare(*args, **kwargs)
        return self.module_for_call(*args, **kwargs)

    @property
    def call_forms(self) -> CallForms:
        """None yet: the first call builds the first."""
        return CallForms(())

    def __getattr__(self, name: str) -> Any:
        if name in _CAPTURED_ONLY:
            raise self._not_yet(f"gm.{name}")
        return super().__getattr__(name)

    def named_parameters(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - nn.Module's signature
        raise self._not_yet("gm.parameters()")

    def named_buffers(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - nn.Module's signature
        raise self._not_yet("gm.buffers()")

    def state_dict(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - nn.Module's signature
        raise self._not_yet("gm.state_dict()")

    def load_state_dict(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - nn.Module's signature
        raise self._not_yet("gm.load_state_dict()")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to zero before the first call (a training loop may call it first)."""

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's signature (.to(), .cuda(), .half())
        raise self._not_yet("gm.to() (or .cuda(), .half(), ...)")

    def extra_repr(self) -> str:
        pending: _Pending = self.__dict__["_tpfx_pending"]
        return f"{pending.model_name}, captured on its first call"

    def _not_yet(self, what: str) -> ConfigError:
        pending: _Pending = self.__dict__["_tpfx_pending"]
        return ConfigError(
            f"{what} needs the captured program, and this {pending.model_name} program is captured on its first "
            f"call because torch.fx could not trace it ({pending.reason}); call gm(...) or gm.prepare(<the "
            "arguments of one call>) first, or pass example_inputs= to tpfx.parallelize")


def _carry_hooks(deferred: nn.Module, program: nn.Module) -> None:
    """Hooks registered on the deferred program before its first call move onto the program."""
    for name, hooks in vars(deferred).items():
        if "hook" in name and isinstance(hooks, dict) and hooks:
            getattr(program, name).update(hooks)
