"""``parallelize``: capture -> find sites -> column-shard -> program + report, and the group set-up."""

from __future__ import annotations

import datetime
import gc
import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.constants as dist_constants
import torch.fx as fx
import torch.nn as nn

from tpfx.passes.column_shard import insert_collectives
from tpfx.passes.fake_shapes import FakeShapes, propagate_fake_shapes
from tpfx.passes.find_sites import SiteFinding, find_sites
from tpfx.passes.meta_device import device_of_inputs, retarget_meta_device
from tpfx.passes.pair_megatron import pair_sites
from tpfx.passes.plan import Mode, Plan, gather_plan, megatron_plan
from tpfx.passes.row_shard import rewrite_other_form, rewrite_pair_graph
from tpfx.passes.shard_parameters import shard_parameters
from tpfx.capture import forward_signature
from tpfx.collectives import bind_group, control_group, group_key, group_timeout
from tpfx.arguments import require_bool, require_choice, require_count, require_module
from tpfx.errors import ConfigError, DefaultTimeoutWarning
from tpfx.export_capture import Captured, ExampleInputs, capture_for_parallelize, example_arguments
from tpfx.megatron_report import megatron_report
from tpfx.no_sites import warn_if_no_sites
from tpfx.program import TensorParallelModule, adopt_missing, take_weights
from tpfx.replicas import Summary, graph_signature, model_fingerprints, uses_dropout
from tpfx.replicas import check_replicas as replica_check
from tpfx.report import Report, build_report

# torch's defaults: the gloo/world default (30 min) and, where it has one, NCCL's
_DEFAULT_TIMEOUTS = tuple(t for t in (dist_constants.default_pg_timeout, dist_constants.default_pg_nccl_timeout) if t)
_REPLICA_SUMMARY = "tpfx_replica_summary"  # gm.meta key, from capture to the check after the group is bound


@dataclass(frozen=True)
class Layout:
    """Where this program runs: the degree, this rank's index in its group, the group's global ranks."""

    tp: int
    rank: int
    ranks: tuple[int, ...]
    inspection: bool  # built with rank= and no process group: never runs a collective

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ConfigError(f"tp={self.tp} must be a positive integer")
        if not 0 <= self.rank < self.tp:
            raise ConfigError(f"rank={self.rank} is outside the tensor-parallel group of size tp={self.tp}; "
                              f"use a rank in 0..{self.tp - 1}")

    @property
    def key(self) -> str:
        """The group key the collectives nodes carry."""
        return group_key(list(self.ranks))


def resolve_layout(tp: int | None, *, group: dist.ProcessGroup | None, rank: int | None) -> Layout:
    """Check tp, group and rank against the process group, without running any collective.

    Raises:
        ConfigError: no process group and no ``rank=``; tp does not divide the world size; tp differs
            from the given group's size; rank= disagrees with this process.
    """
    if not dist.is_initialized():
        if rank is None:
            raise ConfigError("no torch.distributed process group is initialized: run under torchrun and call "
                              "dist.init_process_group(...) first, or pass rank= to build one rank's program "
                              "for inspection")
        if tp is None:
            raise ConfigError("tp is required with rank= and no process group (there is no world size to default to)")
        return Layout(tp, rank, tuple(range(tp)), inspection=True)
    if group is not None:
        size = dist.get_world_size(group)
        if tp not in (None, size):
            raise ConfigError(f"tp={tp} differs from the size {size} of the given group; pass tp={size} or omit it")
        layout = Layout(size, dist.get_rank(group), tuple(dist.get_process_group_ranks(group)), inspection=False)
    else:
        world, me = dist.get_world_size(), dist.get_rank()
        tp = world if tp is None else tp
        if tp < 1 or world % tp:
            raise ConfigError(f"tp={tp} does not divide the world size {world}; use a tp that divides {world} "
                              "(groups are tp consecutive ranks)")
        first = me - me % tp
        layout = Layout(tp, me % tp, tuple(range(first, first + tp)), inspection=False)
    if rank is not None and rank != layout.rank:
        raise ConfigError(f"rank={rank} but this process is rank {layout.rank} of its tensor-parallel group "
                          f"{list(layout.ranks)}; omit rank= inside a process group")
    return layout


def _bind_process_group(layout: Layout, group: dist.ProcessGroup | None) -> None:
    """Create (collectively, on every rank) the tp groups if needed, and bind this rank's group key.

    New groups get the timeout of the group they are carved from (torch would give them its default
    30 minutes). Each tp group also gets a control group of the same ranks, made by its members
    alone, for tpfx's own checks (the replica check, the call check): their collectives never pair
    with the program's, so ranks out of step time out with a message instead of aborting in gloo.
    """
    if layout.inspection:
        return
    timeout = group_timeout(group)
    _warn_if_default_timeout(timeout, layout.key)
    if group is None and layout.tp != dist.get_world_size():
        world = dist.get_world_size()
        for first in range(0, world, layout.tp):  # every rank must create every group, in the same order
            created = dist.new_group(list(range(first, first + layout.tp)), timeout=timeout)
            if first == layout.ranks[0]:
                group = created
    # gloo whatever the group's backend: the checks exchange a few CPU tensors and pickled objects
    control = dist.new_group(list(layout.ranks), timeout=timeout, backend="gloo", use_local_synchronization=True)
    bind_group(layout.key, group, control=control)


_warned_default_timeout: list[str] = []  # group keys warned about: once per process is enough


def _warn_if_default_timeout(timeout: datetime.timedelta | None, key: str) -> None:
    if timeout is None or timeout not in _DEFAULT_TIMEOUTS or _warned_default_timeout:
        return
    _warned_default_timeout.append(key)
    warnings.warn(DefaultTimeoutWarning(
        f"tpfx.parallelize: the process group of {key} has torch's default timeout ({timeout}), so a rank "
        "that fails or skips a collective leaves the others waiting that long; fix: pass "
        "timeout=datetime.timedelta(minutes=5) (longer than your slowest step) to dist.init_process_group"),
        stacklevel=3)  # 3: parallelize's caller


@dataclass(frozen=True)
class Strategy:
    """What one mode does: make the plan from the analysis, rewrite the program's graph and another call
    form's graph for it, and extend the report."""

    plan: Callable[[fx.GraphModule, SiteFinding, int, int], Plan]  # (gm, finding, tp, rank)
    rewrite: Callable[[fx.GraphModule, Plan, str], object]  # (gm, plan, group key): the graph only
    rewrite_other_form: Callable[[fx.GraphModule, Plan, str], object]
    report: Callable[[Report, fx.GraphModule, Plan], Report]
    needs_shapes: bool = False  # whether its analysis reads sizes (fx captures then get fake shapes first)


def _gather_collectives(gm: fx.GraphModule, plan: Plan, group: str) -> object:
    # any call form: the plan's column sites are found in its trace by module or parameter name
    return insert_collectives(gm, plan.gathered, group=group)


def _megatron(gm: fx.GraphModule, finding: SiteFinding, tp: int, rank: int) -> Plan:
    return megatron_plan(gm, finding, pair_sites(gm, finding, tp=tp), tp=tp, rank=rank)


STRATEGIES: dict[Mode, Strategy] = {
    Mode.GATHER: Strategy(
        plan=lambda gm, finding, tp, rank: gather_plan(gm, finding, tp=tp, rank=rank),
        rewrite=_gather_collectives, rewrite_other_form=_gather_collectives,
        report=lambda report, gm, plan: report),
    Mode.MEGATRON: Strategy(
        plan=_megatron,
        rewrite=lambda gm, plan, group: rewrite_pair_graph(gm, plan.pairing, tp=plan.tp, group=group),
        rewrite_other_form=lambda traced, plan, group: rewrite_other_form(traced, plan.pairing, tp=plan.tp,
                                                                          group=group),
        report=megatron_report, needs_shapes=True),
}
MODES = tuple(mode.value for mode in STRATEGIES)
TRACERS = ("auto", "fx", "export")


def parallelize(model: nn.Module, tp: int | None = None, *, group: dist.ProcessGroup | None = None,
                rank: int | None = None, mode: Literal["gather", "megatron"] = "gather",
                tracer: Literal["auto", "fx", "export"] = "auto",
                example_inputs: ExampleInputs | None = None, check_replicas: bool = True) -> TensorParallelModule:
    """Make ``model`` tensor-parallel: return this rank's program as a GraphModule.

    The attention QKV projections and FFN first linears are found by graph structure and
    column-sharded (each rank holds out_features / tp rows), with an all-gather after each. The
    caller's model is not changed. ``gm.tpfx_plan`` says what every parameter holds (its shard spec,
    or why it stays whole); ``gm.tpfx_report`` describes what was done.

    Args:
        model: the unmodified single-device model, with the same weights on every rank.
        tp: tensor-parallel degree; default the world size (or the size of ``group``). Smaller than
            the world size, it forms groups of tp consecutive ranks.
        group: an existing process group to use as the tensor-parallel group.
        rank: build this rank's program without a process group, for inspection (it cannot run).
        mode: ``"gather"`` (default): column-shard the sites and all-gather after each.
            ``"megatron"``: pair each QKV/fc1 site with the linear after it (row-parallel, one
            all-reduce), run the ops between on this rank's heads; sites that cannot be paired
            safely stay column-plus-gather (``gm.tpfx_pairing.fallbacks`` says why).
        tracer: ``"auto"`` (default): torch.fx where it traces, else torch.export with
            ``example_inputs``; ``"fx"``; ``"export"`` (needs ``example_inputs``). An exported
            program has dynamic batch and sequence dims; another call form (other arguments given,
            or the other train/eval mode) is exported from a weightless copy of the model on its
            first call. ``gm.tpfx_report.tracer`` says which was used.
        example_inputs: the arguments of one call of ``model``: a tuple of positional
            arguments, a dict of keyword arguments, or one tensor. torch.export traces this call;
            torch.fx graphs take their symbolic shapes from it (dims 0 and 1 symbolic). Without it,
            fx assumes token ids or, for an input a linear or norm reads first, (batch, seq, width);
            ``gm.tpfx_report.tracer_note`` says which (see :mod:`tpfx.passes.fake_shapes`).
        check_replicas: check that every rank of the group holds the same model (weights, buffers,
            captured graph, build options and, for a model in training mode with dropout, the random
            state): one small collective (``all_gather_object`` of a fingerprint per tensor and graph
            node), the only collective parallelize runs, at about the cost of reading the weights
            once (see :mod:`tpfx.replicas`). Pass False only where you guarantee identical replicas
            yourself and reading every weight once is too slow.

    Returns:
        A :class:`tpfx.program.TensorParallelModule` that accepts every call form the model accepts.

    Raises:
        ConfigError: an argument of the wrong type or value (``tp`` must be an int >= 1, not a bool,
            float or string; ``model`` an ``nn.Module``), bad group or rank, or no process group
            without ``rank=``.
        CaptureError: the model cannot be traced.
        ShardingError: tp does not divide a site's out_features.
        All are raised before any collective runs and leave nothing changed.
        ReplicaError: (after the replica check's collective) the ranks do not hold the same model;
            the message names the first differing tensor, graph node or option and the ranks.
    """
    _check_arguments(model, tp, group=group, rank=rank, mode=mode, tracer=tracer, example_inputs=example_inputs)
    require_bool(check_replicas, "check_replicas", "tpfx.parallelize")
    layout = resolve_layout(tp, group=group, rank=rank)
    summarize = check_replicas and not layout.inspection
    with _collector_paused():
        gm = _compile(model, layout, mode=mode, tracer=tracer, example_inputs=example_inputs, summarize=summarize)
    summary = gm.meta.pop(_REPLICA_SUMMARY, None)
    _bind_process_group(layout, group)
    if summary is not None:
        replica_check(summary, group=control_group(layout.key), key=layout.key)
    if not layout.inspection:
        gm.check_calls_in(layout.key)
    return gm


def _check_arguments(model: object, tp: object, *, group: object, rank: object, mode: object, tracer: object,
                     example_inputs: object) -> None:
    """One line naming the argument, for every argument of :func:`parallelize` of the wrong type or value."""
    where = "tpfx.parallelize"
    require_module(model, "model", where)
    require_count(tp, "tp", where, optional=True)
    require_count(rank, "rank", where, optional=True, minimum=0)
    require_choice(mode, "mode", where, MODES, kind="parallelization mode")
    require_choice(tracer, "tracer", where, TRACERS, kind="tracer")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ConfigError(f"{where}: group must be a torch.distributed ProcessGroup or None, got "
                          f"{type(group).__name__}; fix: pass dist.new_group(ranks) or omit it")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, dict, torch.Tensor)):
        raise ConfigError(f"{where}: example_inputs is a {type(example_inputs).__name__}; pass a tuple of "
                          "positional arguments, a dict of keyword arguments, or one tensor")


def _compile(model: nn.Module, layout: Layout, *, mode: str, tracer: str,
             example_inputs: ExampleInputs | None, summarize: bool = False) -> TensorParallelModule:
    """capture -> find sites -> plan (the mode's strategy) -> rewrite the graph, shard the parameters -> report.

    The captured program is compiled in place: it is built over a weightless copy of the model, the
    passes change its graph and its modules, and its Python code is generated once, at the end.
    """
    captured = capture_for_parallelize(model, tracer=tracer, example_inputs=example_inputs)
    gm = captured.gm
    if summarize:  # what the replica check compares, taken from the graph before any rewrite
        gm.meta[_REPLICA_SUMMARY] = _replica_summary(model, captured, mode=mode, tp=layout.tp)
    # a model built with parameters on meta was traced on meta: its device constants must say the inputs' device
    retarget_meta_device(gm, device=device_of_inputs(example_inputs))
    strategy = STRATEGIES[Mode(mode)]
    # gather mode reads no sizes: shape propagation (a third of a small model's pass) is for pairing only
    shapes = _fake_shapes(captured, forward_signature(model), example_inputs) if strategy.needs_shapes else None
    # every parameter of the model, also those this graph does not read: the plan lists them all
    adopt_missing(gm, captured.skeleton)
    finding = find_sites(gm, tp=layout.tp)
    warn_if_no_sites(type(model).__name__, finding, tp=layout.tp, stacklevel=3)  # 3: parallelize's caller
    plan = strategy.plan(gm, finding, layout.tp, layout.rank)  # raises before any change
    strategy.rewrite(gm, plan, layout.key)
    shard_parameters(gm, plan, source=model)
    gm.tpfx_plan = plan  # what every parameter holds and why; reports and checkpoints read it
    gm.tpfx_pairing = plan.pairing  # megatron mode: the pairs and the fallbacks with their reasons
    take_weights(gm, captured.sources)
    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    captured.serve_call_forms(forward_signature(model),
                              lambda traced: strategy.rewrite_other_form(traced, plan, layout.key),
                              _preparation(shapes, forward_signature(model)))
    note = "; ".join(filter(None, [captured.note, shapes.note if shapes is not None else ""]))
    report = build_report(gm, model, plan=plan, group=layout.key, call_form=captured.form,
                          tracer=captured.tracer, tracer_note=note)
    gm.tpfx_report = strategy.report(report, gm, plan)
    return gm


def _replica_summary(model: nn.Module, captured: Captured, *, mode: str, tp: int) -> Summary:
    """This rank's side of the replica check: build options, the captured graph, every tensor's fingerprint.

    The random state is compared only for a model in training mode whose graph drops something: in
    eval mode dropout draws nothing, and unseeded ranks are fine.
    """
    build = (("mode", mode), ("tp", str(tp)), ("tracer", captured.tracer), ("call form", captured.form.describe()))
    with_random_state = model.training and uses_dropout(captured.gm)
    return Summary(build, graph_signature(captured.gm), model_fingerprints(model, with_random_state=with_random_state))


def _fake_shapes(captured: Captured, signature: inspect.Signature,
                 example_inputs: ExampleInputs | None) -> FakeShapes | None:
    """Symbolic shapes on an fx capture (export graphs have them), from the example inputs where given."""
    if captured.tracer != "fx":
        return None
    try:
        given = example_arguments(signature, example_inputs) if example_inputs is not None else {}
    except ConfigError:  # fx never needed them: inputs that do not fit are assumed instead
        given = {}
    return propagate_fake_shapes(captured.gm, list(signature.parameters), given=given)


def _preparation(shapes: FakeShapes | None, signature: inspect.Signature
                 ) -> Callable[[fx.GraphModule, torch.device], None]:
    """What another call form's graph needs before the passes: its device constants, and (fx) the
    symbolic shapes of the program's own form, from the same inputs, so that it pairs alike."""
    def prepare(traced: fx.GraphModule, device: torch.device) -> None:
        retarget_meta_device(traced, device=device)
        if shapes is not None and shapes.propagated:
            propagate_fake_shapes(traced, list(signature.parameters), given=shapes.inputs)

    return prepare


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a program is compiled.

    Tracing and copying a model allocate hundreds of thousands of objects, and every few thousand
    allocations the collector walks the (growing) heap: about a quarter of the pass's time at 96
    layers, growing faster than the layer count. Nothing the pass makes is cyclic garbage it needs
    freed early; the collector runs as usual afterwards.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
