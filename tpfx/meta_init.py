"""Build a model whose parameters take no memory, while its buffers are computed for real.

A model too large for one device is built on the ``meta`` device, parallelized, and then each rank
loads only its shards (:func:`tpfx.load_state_dict`). Building it under ``torch.device("meta")``
puts *everything* on meta, including buffers the constructor computes (the causal mask
``torch.tril(torch.ones(n, n))``, rotary frequencies): they are usually not in the checkpoint
(``persistent=False``), so they would be lost. Under :func:`parameters_on_meta` the constructor
runs normally and only parameters are moved to meta as they are registered::

    with tpfx.parameters_on_meta():
        model = GPTModel(config)          # parameters: meta (no memory); causal_mask: real bool tensor
    gm = tpfx.parallelize(model, tp=2)    # shards are meta too
    tpfx.load_state_dict(gm, "model.safetensors")   # each rank reads only its shards

The same holds for models captured with torch.export (Hugging Face models): build them inside the
block, then ``tpfx.parallelize(model, tp=2, example_inputs=...)``; the device constants that export
records from meta weights are turned into the example inputs' device (:mod:`tpfx.passes.meta_device`).

Each parameter is still created on the CPU first (``nn.Parameter(torch.empty(...))``) and moved at
once, so at most one parameter exists for real at a time, and ``torch.empty`` touches no pages.
Initialization code that runs after registration (``reset_parameters``) runs on meta and costs nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn as nn
from torch.nn.modules.module import register_module_parameter_registration_hook


def _to_meta(parameter: nn.Parameter) -> nn.Parameter:
    """A meta copy of ``parameter`` with its class and ``requires_grad``."""
    if parameter.is_meta or isinstance(parameter, nn.parameter.UninitializedParameter):
        return parameter  # already weightless, or shaped only on first use
    return type(parameter)(parameter.detach().to("meta"), parameter.requires_grad)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within this block, every parameter this thread registers on a module is placed on the meta device.

    Buffers, and all other tensors the constructors compute, stay real. It uses torch's global
    parameter-registration hook, limited to the thread that opened the block: modules that other
    threads build meanwhile keep real parameters. Blocks nest.

    Yields:
        Nothing; build the model inside the block.
    """
    owner = threading.get_ident()

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or threading.get_ident() != owner:
            return None  # keep what was registered
        return _to_meta(param)

    handle = register_module_parameter_registration_hook(on_meta)
    try:
        yield
    finally:
        handle.remove()
