"""Rewrite: give a program this rank's parameters, as its :class:`~tpfx.passes.plan.Plan` says, and nothing else.

before (the plan's entries, and the module tree of the captured program)::

    plan.parameters["ffn.fc1.weight"]   column, ShardSpec(0, 512, ((256, 512),)), held by a layer
    self.ffn.fc1 = Linear(in_features=128, out_features=512)

after (rank 1 of tp=2)::

    self.ffn.fc1 = ColumnParallelLinear(in_features=128, out_features=256 (rows (256, 512) of 512))

A Linear module becomes the tpfx layer for its weight's placement, built with the plan's spec:
:class:`~tpfx.layers.ColumnParallelLinear` (one contiguous block of rows),
:class:`~tpfx.layers.BlockColumnParallelLinear` (several blocks: whole heads of q, k and v of a fused
QKV) or :class:`~tpfx.layers.RowParallelLinear`. A parameter that an op uses directly (export graphs)
keeps its op and is replaced by its part::

    plan.parameters["h.0.attn.c_attn.weight"]   column, ShardSpec(1, 192, ((32, 64), (96, 128), (160, 192)))
    h.0.attn.c_attn.weight: (64, 192) -> (64, 96)                     # columns of an (in, out) weight

Replicated parameters are left as they are. The graph is not touched: the collectives around the
sharded linears are the graph rewrites' business (:mod:`tpfx.passes.column_shard`, :mod:`tpfx.passes.row_shard`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from tpfx.errors import ShardingError
from tpfx.layers import (BlockColumnParallelLinear, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                         shard_range)
from tpfx.passes.module_hooks import carry_hooks
from tpfx.passes.plan import ParameterPlan, Placement, Plan


@dataclass(frozen=True)
class ShardedParameters:
    """What the pass changed: the modules replaced by parallel layers, the parameters sliced in place."""

    layers: tuple[str, ...]
    sliced: tuple[str, ...]


def shard_parameters(gm: fx.GraphModule, plan: Plan, *, source: nn.Module | None = None) -> ShardedParameters:
    """Replace ``gm``'s sharded linears and parameters by this rank's parts, as ``plan`` says.

    Args:
        gm: the program to change in place (its module tree; the graph is left alone).
        plan: the plan of ``gm`` for this rank.
        source: where the full weights are read (default ``gm`` itself): the caller's model, so that
            ``gm`` may hold meta placeholders for them.

    Returns:
        The module paths replaced by parallel layers and the parameters sliced in place, in plan order.

    Raises:
        ShardingError: a module the plan shards is not an ``nn.Linear``, or a source parameter's shape
            is not the plan's; raised before anything is changed.
    """
    source = source if source is not None else gm
    for name, entry in plan.parameters.items():
        if entry.spec is not None:
            _check_shape(source, name, entry)
    layers = {path: _vocab_layer(source, path, entry, plan) if entry.placement is Placement.VOCAB
              else _parallel_layer(_linear(source, path, entry), entry, plan) for path, entry in plan.layers().items()}
    parts: dict[int, nn.Parameter] = {}  # one part per source tensor: a tensor under two names stays one
    sliced: dict[str, nn.Parameter] = {}
    for name, entry in plan.parameters.items():
        if entry.spec is not None and not entry.held_by_layer:
            full = source.get_parameter(name)
            if id(full) not in parts:
                # clone so the shard owns compact storage and the caller's tensor is never aliased
                parts[id(full)] = nn.Parameter(entry.spec.take(full.detach()).clone(), requires_grad=full.requires_grad)
            sliced[name] = parts[id(full)]
    for path, layer in layers.items():
        gm.set_submodule(path, layer)
    for name, part in sliced.items():
        owner, _, leaf = name.rpartition(".")
        setattr(gm.get_submodule(owner), leaf, part)
    _retie(gm, plan)
    return ShardedParameters(tuple(layers), tuple(sliced))


def _retie(gm: fx.GraphModule, plan: Plan) -> None:
    """A tied tensor split by two layers (a vocab-parallel embedding and LM head) stays one tensor: the
    first name's part, held under every name (each layer cloned its own part of the same rows)."""
    for names in plan.tied:
        if plan.parameters[names[0]].spec is None:
            continue
        part = gm.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(owner), leaf, part)


def _vocab_layer(source: nn.Module, path: str, entry: ParameterPlan, plan: Plan) -> VocabParallelEmbedding:
    """The vocab-parallel layer holding ``entry``'s rows of the Embedding at ``path``."""
    module = source.get_submodule(path)
    if not isinstance(module, nn.Embedding):
        raise ShardingError(f"'{path}' is a {type(module).__name__}, not an nn.Embedding; only Embedding modules "
                            "can be split by vocabulary rows")
    return VocabParallelEmbedding(module, spec=entry.spec, tp=plan.tp, rank=plan.rank)


def _check_shape(source: nn.Module, name: str, entry: ParameterPlan) -> None:
    shape = tuple(source.get_parameter(name).shape)
    if shape != entry.full_shape:
        raise ShardingError(f"parameter '{name}' is {shape} in the source model but the plan was made for "
                            f"{entry.full_shape}; build the plan from the model whose weights are sharded")


def _linear(source: nn.Module, path: str, entry: ParameterPlan) -> nn.Linear:
    """The full Linear at ``path``; a parallel layer holds weight and bias only, so nothing else may be there."""
    module = source.get_submodule(path)
    kind = "row" if entry.placement is Placement.ROW else "column"
    if not isinstance(module, nn.Linear):
        raise ShardingError(f"'{path}' is a {type(module).__name__}, not an nn.Linear; only Linear modules can be "
                            f"{kind}-sharded")
    extra = sorted({name for name, _ in module.named_parameters()} - {"weight", "bias"})
    if extra:
        raise ShardingError(f"'{path}' ({type(module).__name__}) holds parameters {extra} besides weight and bias, "
                            f"which a {kind}-parallel layer would drop; keep it whole or make it a plain nn.Linear")
    return module


def _parallel_layer(linear: nn.Linear, entry: ParameterPlan, plan: Plan) -> nn.Module:
    """The tpfx layer that holds ``entry``'s spec of ``linear`` (and the bias the plan gives it)."""
    spec = entry.spec
    if entry.placement is Placement.ROW:
        layer: nn.Module = RowParallelLinear(linear, spec=spec, tp=plan.tp, rank=plan.rank)
    elif spec.dim == 0 and spec.ranges == (shard_range(spec.full_size, plan.tp, plan.rank),):
        layer = ColumnParallelLinear(linear, tp=plan.tp, rank=plan.rank)
    else:
        layer = BlockColumnParallelLinear(linear, spec=spec, tp=plan.tp, rank=plan.rank)
    # the layer's runtime contract (shard_spec) must say what the plan says, or checkpoints would disagree
    for leaf, _ in layer.named_parameters():
        planned = plan.parameters.get(f"{entry.module_path}.{leaf}")
        if planned is None or layer.shard_spec(leaf) != planned.spec:
            raise ShardingError(f"the plan of '{entry.module_path}.{leaf}' ({planned.describe() if planned else 'none'})"
                                f" is not what a {type(layer).__name__} holds ({layer.shard_spec(leaf)}); "
                                "the plan is inconsistent: build it with tpfx.passes.plan's strategies")
    # the finder kept linears whose hooks would see something else on a shard whole; the rest run on it
    return carry_hooks(linear, layer, entry.placement, path=entry.module_path)
