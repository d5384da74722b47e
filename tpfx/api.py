"""``parallelize``: capture -> find sites -> column-shard -> program + report, and the group set-up."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import inspect
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.constants as dist_constants
from torch.distributed.device_mesh import DeviceMesh
import torch.fx as fx
import torch.nn as nn

from tpfx.passes.graph_view import CALL_FORM
from tpfx.passes.bucket_gradient_sums import bucket_gradient_sums
from tpfx.passes.column_shard import insert_collectives
from tpfx.passes.fake_shapes import FakeShapes, propagate_fake_shapes
from tpfx.passes.find_sites import SiteFinding, find_sites
from tpfx.passes.find_vocab import find_vocab
from tpfx.passes.meta_device import device_of_inputs, retarget_meta_device
from tpfx.passes.node_placements import annotate_linears
from tpfx.passes.pair_megatron import pair_sites
from tpfx.passes.plan import LOGITS, Mode, Plan, gather_plan, megatron_plan, vocab_plan
from tpfx.passes.check_sharded_reads import check_sharded_reads
from tpfx.passes.row_shard import rewrite_other_form, rewrite_pair_graph
from tpfx.passes.lift_flattened_collectives import lift_flattened_collectives
from tpfx.passes.sequence_parallel import SequenceRegion, find_sequence_region, shard_sequence
from tpfx.passes.shard_parameters import shard_parameters
from tpfx.passes.vocab_shard import rewrite_vocab_graph
from tpfx.capture import forward_signature
from tpfx.arguments import require_bool, require_choice, require_count, require_module
from tpfx.collectives import bind_group, control_group, group_key, group_timeout
from tpfx.errors import ConfigError, DefaultTimeoutWarning
from tpfx.deferred import DeferredProgram
from tpfx.export_capture import (TRACERS, Captured, ExampleInputs, NeedsCall, bind_call, capture_for_parallelize,
                                 example_arguments)
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
    30 minutes). Each tp group also gets a control group of the same ranks for tpfx's own checks (the
    replica check, the call check): their collectives never pair with the program's, so ranks out of
    step time out with a message instead of aborting in gloo.
    """
    if layout.inspection:
        return
    timeout = group_timeout(group)
    _warn_if_default_timeout(timeout, layout.key)
    if group is None:
        group, control = _default_groups(layout, timeout)
    else:
        control = _made_earlier("control", layout.key, timeout) or _control_of_given(group, layout, timeout)
    bind_group(layout.key, group, control=control)


def _default_groups(layout: Layout, timeout: datetime.timedelta | None) -> tuple[dist.ProcessGroup | None,
                                                                                   dist.ProcessGroup]:
    """The tp group (None: the world) and control group of the default layout, made by every rank.

    Every rank makes every tp group and every control group, in the same order, as torch requires of
    groups that are not made by their members alone. Control groups made by their members alone would
    be named from how many groups each member has made so far, and ranks of one group that had made
    different numbers (one tp group built more programs than the other before a world-wide one) would
    wait for each other under different names until the timeout.
    """
    world = dist.get_world_size()
    whole_world = layout.tp == world  # the tp group is the world itself: None, nothing to make
    group = None if whole_world else _made_earlier("tp", layout.key, timeout)
    control = _made_earlier("control", layout.key, timeout)
    if control is not None and (whole_world or group is not None):
        return group, control
    for first in range(0, world, layout.tp):
        ranks = list(range(first, first + layout.tp))
        created = None if whole_world else dist.new_group(ranks, timeout=timeout)
        # gloo whatever the group's backend: the checks exchange a few CPU tensors and pickled objects
        created_control = dist.new_group(ranks, timeout=timeout, backend="gloo")
        if first == layout.ranks[0]:
            group, control = created, created_control
    if group is not None:
        _MADE[("tp", layout.key)] = weakref.ref(group)
    _MADE[("control", layout.key)] = weakref.ref(control)
    return group, control


def _control_of_given(group: dist.ProcessGroup, layout: Layout,
                      timeout: datetime.timedelta | None) -> dist.ProcessGroup:
    """The control group of a group the caller made (``group=``, ``mesh=``): made by its members alone.

    torch names such a group from how many groups each member has made; where the members' counts
    differ they would wait for each other under different names until the timeout. The counts are
    compared first (one small collective on ``group``, at build time); where they differ the checks run
    on ``group`` itself, with a warning.
    """
    counts: list[int | None] = [None] * layout.tp
    dist.all_gather_object(counts, _groups_made_here(), group=group)
    if len(set(counts)) > 1:
        warnings.warn(
            f"tpfx: the ranks {list(layout.ranks)} of the given group have made different numbers of process "
            f"groups ({counts}), so tpfx cannot make its own group of them for its checks; they run on the given "
            "group (with the call check on, ranks out of step then abort in gloo instead of raising "
            "CollectiveError); make the same groups on every rank of the group before parallelize", stacklevel=3)
        return group
    control = dist.new_group(list(layout.ranks), timeout=timeout, backend="gloo", use_local_synchronization=True)
    _MADE[("control", layout.key)] = weakref.ref(control)
    return control


def _groups_made_here() -> int | None:
    """How many process groups this process has made: what torch names a group made by its members alone
    from (None where this torch keeps no such count)."""
    names = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_names", None)
    return len(names) if names is not None else None


# The groups earlier parallelize calls made, by (purpose, group key): another program of the same ranks
# reuses them instead of creating groups anew (a rendezvous each, and groups that pile up in a process
# that builds many programs). Weak references: torch's registry owns the groups, and after
# destroy_process_group they are gone (or no longer registered), so the next call makes new ones. Every
# rank makes the same calls, so every rank reuses, or creates, alike.
_MADE: dict[tuple[str, str], weakref.ref[dist.ProcessGroup]] = {}


def _made_earlier(purpose: str, key: str, timeout: datetime.timedelta | None) -> dist.ProcessGroup | None:
    """The live group an earlier call made for ``purpose`` and ``key`` with ``timeout``, or None."""
    reference = _MADE.get((purpose, key))
    group = reference() if reference is not None else None
    if group is None:
        return None
    try:
        dist.get_process_group_ranks(group)  # still registered (not destroyed with the process group)
    except (KeyError, RuntimeError, ValueError):
        return None
    return group if group_timeout(group) == timeout else None


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
    """What one mode does: make the plan from the analysis, rewrite the program's graph (its linears
    annotated from the plan) and another call form's graph (mapped onto the plan by parameter name,
    never analysed again), and extend the report."""

    plan: Callable[[fx.GraphModule, SiteFinding, int, int], Plan]  # (gm, finding, tp, rank)
    rewrite: Callable[[fx.GraphModule, Plan, str], object]  # (gm, plan, group key): the graph only
    rewrite_other_form: Callable[[fx.GraphModule, Plan, str], object]
    report: Callable[[Report, fx.GraphModule, Plan], Report]
    needs_shapes: bool = False  # whether its analysis reads sizes (fx captures then get fake shapes first)
    sequence_parallel: bool = False  # whether its rewrite splits the residual stream along the sequence (the plan says so)


def _gather_other_form(gm: fx.GraphModule, plan: Plan, group: str) -> object:
    # the plan's column sites are found in another form's trace by weight name: annotated, then rewritten
    annotate_linears(gm, plan)
    return insert_collectives(gm, group=group)


def _megatron(gm: fx.GraphModule, finding: SiteFinding, tp: int, rank: int) -> Plan:
    return megatron_plan(gm, finding, pair_sites(gm, finding, tp=tp), tp=tp, rank=rank)


STRATEGIES: dict[Mode, Strategy] = {
    Mode.GATHER: Strategy(
        plan=lambda gm, finding, tp, rank: gather_plan(gm, finding, tp=tp, rank=rank),
        rewrite=lambda gm, plan, group: insert_collectives(gm, group=group), rewrite_other_form=_gather_other_form,
        report=lambda report, gm, plan: report),
    Mode.MEGATRON: Strategy(
        plan=_megatron,
        rewrite=lambda gm, plan, group: rewrite_pair_graph(gm, plan.pairing, tp=plan.tp, group=group),
        rewrite_other_form=lambda traced, plan, group: rewrite_other_form(traced, plan, group=group),
        report=megatron_report, needs_shapes=True),
}
MODES = tuple(mode.value for mode in STRATEGIES)


def _split_sequence(gm: fx.GraphModule, plan: Plan, group: str) -> SequenceRegion:
    """After the mode's rewrite: the residual stream between the pairs split along the sequence."""
    lift_flattened_collectives(gm)  # GPT-2's Conv1D works on (batch*seq, width): its collectives move to (batch, seq, width)
    region = find_sequence_region(gm)
    shard_sequence(gm, region, group=group, tp=plan.tp)
    gm.meta["tpfx_sequence"] = region  # this graph's region (the report reads the program's)
    return region


def _sequence_report(report: Report, gm: fx.GraphModule, plan: Plan) -> Report:
    return dataclasses.replace(megatron_report(report, gm, plan), sequence=gm.meta.get("tpfx_sequence"))


# megatron mode with sequence parallelism: the megatron strategy, then the sequence split on each graph
# (_rewrite splits the sequence after the mode's and the steps' rewrites: a vocab-parallel lookup's sum then
# enters the region as a reduce-scatter)
SEQUENCE_PARALLEL = dataclasses.replace(STRATEGIES[Mode.MEGATRON], report=_sequence_report, sequence_parallel=True)


def strategy_for(mode: str, *, sequence_parallel: bool = False) -> Strategy:
    """The strategy of ``mode`` (one of :data:`MODES`), with sequence parallelism when asked.

    Raises:
        ConfigError: an unknown mode, or sequence parallelism outside megatron mode.
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not a parallelization mode; use one of {', '.join(map(repr, MODES))}")
    if not sequence_parallel:
        return STRATEGIES[Mode(mode)]
    if Mode(mode) is not Mode.MEGATRON:
        raise ConfigError(f"sequence_parallel=True needs mode='megatron' (got mode={mode!r}): the sequence is split "
                          "between row- and column-parallel pairs; pass mode='megatron'")
    return SEQUENCE_PARALLEL


@dataclass(frozen=True)
class Step:
    """A strategy step on top of a mode: it extends the mode's plan, then rewrites each graph after the
    mode's rewrite (the program's and every other call form's). It reads sizes (fx captures get fake shapes)."""

    plan: Callable[[fx.GraphModule, Plan], Plan]  # (gm, the mode's plan): raises before any change
    rewrite: Callable[[fx.GraphModule, Plan, str], object]  # (gm, plan, group key): the graph only


def _vocab_parallel(gm: fx.GraphModule, plan: Plan, logits: str) -> Plan:
    # the linears the mode shards are no LM head; the finder decides on the rest
    return vocab_plan(plan, find_vocab(gm, tp=plan.tp, taken=frozenset(plan.shard_specs())), logits=logits)


def vocab_parallel_step(logits: str) -> Step:
    """Split the vocabulary: embedding tables by rows, LM heads by output features, cross-entropy over
    the split logits (:mod:`tpfx.passes.find_vocab`, :mod:`tpfx.passes.vocab_shard`)."""
    return Step(plan=lambda gm, plan: _vocab_parallel(gm, plan, logits),
                rewrite=lambda gm, plan, group: rewrite_vocab_graph(gm, plan.vocab, tp=plan.tp, group=group,
                                                                     logits=plan.logits))


def parallelize(model: nn.Module, tp: int | None = None, *, group: dist.ProcessGroup | None = None,
                mesh: DeviceMesh | None = None, rank: int | None = None,
                mode: Literal["gather", "megatron"] = "gather", tracer: Literal["auto", "fx", "export"] = "auto",
                example_inputs: ExampleInputs | None = None, sequence_parallel: bool = False,
                vocab_parallel: bool = False, logits: Literal["gathered", "sharded"] = "gathered",
                check_replicas: bool = True, check_calls: bool = False) -> TensorParallelModule | DeferredProgram:
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
        mesh: a one-dimensional ``DeviceMesh`` to use as the tensor-parallel group, as torchtitan
            passes ``mesh["tp"]`` of a (dp, tp) mesh; the alternative to ``group``.
        rank: build this rank's program without a process group, for inspection (it cannot run).
        mode: ``"gather"`` (default): column-shard the sites and all-gather after each.
            ``"megatron"``: pair each QKV/fc1 site with the linear after it (row-parallel, one
            all-reduce), run the ops between on this rank's heads; sites that cannot be paired
            safely stay column-plus-gather (``gm.tpfx_pairing.fallbacks`` says why).
        tracer: ``"auto"`` (default): torch.fx where it traces, else torch.export with
            ``example_inputs`` (or from the first call); ``"fx"``; ``"export"``. An exported
            program has dynamic batch and sequence dims; another call form (other arguments given,
            or the other train/eval mode) is exported from a weightless copy of the model on its
            first call. ``gm.tpfx_report.tracer`` says which was used.
        example_inputs: the arguments of one call of ``model``: a tuple of positional
            arguments, a dict of keyword arguments, or one tensor. Not needed: without them, a
            model torch.fx cannot trace is captured with torch.export from its first call (see
            :mod:`tpfx.deferred`; ``gm.prepare(...)`` captures earlier). torch.export traces this call;
            torch.fx graphs take their symbolic shapes from it (dims 0 and 1 symbolic). Without it,
            fx assumes token ids or, for an input a linear or norm reads first, (batch, seq, width);
            ``gm.tpfx_report.tracer_note`` says which (see :mod:`tpfx.passes.fake_shapes`).
        sequence_parallel: megatron mode only: between the pairs, split the residual stream along the
            sequence (norms, dropouts and residual adds run on 1/tp of the tokens); a reduce-scatter
            after each row-parallel linear and an all-gather before each pair replace the all-reduce
            (:mod:`tpfx.passes.sequence_parallel`). The sequence length must be a multiple of tp.
        vocab_parallel: also split the vocabulary (either mode): the token embedding's table by rows
            (one all-reduce of the lookup), the LM head by output features, and a cross-entropy over
            its logits by the vocabulary-parallel one (max and sum of exponentials all-reduced), so no
            rank holds the full logits for the loss. A vocabulary tp does not divide stays whole
            (``tpfx explain`` says why). Default off (see the README).
        logits: with ``vocab_parallel``, what the model output holds of the logits: ``"gathered"``
            (default: the full logits, one all-gather of (tokens x vocab) per call) or ``"sharded"``
            (this rank's contiguous vocab / tp columns, no gather; a loss in the graph is unaffected).
        check_replicas: check that every rank of the group holds the same model (weights, buffers,
            captured graph, build options and, for a model in training mode with dropout, the random
            state): one small collective (``all_gather_object`` of a fingerprint per tensor and graph
            node), the only collective parallelize runs, at about the cost of reading the weights
            once (see :mod:`tpfx.replicas`); a program captured on its first call runs it in that call
            (not while torch.compile traces an enclosing model: then it is skipped). Pass False only
            where you guarantee identical replicas yourself and reading every weight once is too slow.
        check_calls: a debug mode: before every call, check that all ranks call the program alike
            (tensor shapes, optional arguments, train/eval) with one 48-byte all-gather on a control
            group, so that ranks fed different batch sizes, or one that skipped a backward, fail with
            one line instead of aborting in gloo or pairing collectives wrongly. Off by default: it
            measured 3-7% of the small benchmark GPT's step on 2 CPU cores (more than the 1% a check
            on every step may cost). The environment variable ``TPFX_CHECK_CALLS=1`` turns it on too.

    Returns:
        A :class:`tpfx.program.TensorParallelModule` that accepts every call form the model accepts;
        for a model torch.fx cannot trace, without ``example_inputs``, a
        :class:`tpfx.deferred.DeferredProgram` that becomes one on its first call or ``prepare``.

    Raises:
        ConfigError: an argument of the wrong type or value (``tp`` must be an int >= 1, not a bool,
            float or string; ``model`` an ``nn.Module``), bad group, mesh, rank, mode, tracer or logits,
            or no process group without ``rank=``.
        CaptureError: the model cannot be traced.
        ShardingError: tp does not divide a site's out_features.
        All are raised before any collective runs and leave nothing changed; for a program captured
        on its first call, CaptureError and ShardingError come from that call (or ``prepare``).
        ReplicaError: (after the replica check's collective) the ranks do not hold the same model;
            the message names the first differing tensor, graph node or option and the ranks.
    """
    _check_arguments(model, tp, group=group, rank=rank, mode=mode, tracer=tracer, example_inputs=example_inputs,
                     flags={"sequence_parallel": sequence_parallel, "vocab_parallel": vocab_parallel,
                            "check_replicas": check_replicas, "check_calls": check_calls}, logits=logits)
    check_calls = check_calls or os.environ.get("TPFX_CHECK_CALLS", "") == "1"
    strategy = strategy_for(mode, sequence_parallel=sequence_parallel)
    if logits != "gathered" and not vocab_parallel:
        raise ConfigError(f"logits={logits!r} needs vocab_parallel=True (without it the LM head stays whole)")
    group = _group_of(mesh, group)
    layout = resolve_layout(tp, group=group, rank=rank)
    steps = (vocab_parallel_step(logits),) if vocab_parallel else ()
    # what the replica check compares besides the model: every option that changes the program
    replica_build = None if not check_replicas or layout.inspection else (
        ("mode", mode), ("tp", str(layout.tp)), ("sequence_parallel", str(sequence_parallel)),
        ("vocab_parallel", str(vocab_parallel)), ("logits", logits))
    try:
        with _collector_paused():
            gm = _compile(model, layout, strategy=strategy, tracer=tracer, example_inputs=example_inputs,
                          steps=steps, replica_build=replica_build)
    except NeedsCall as needs:  # fx cannot trace it and there is no example call: capture from the first call
        gm = _deferred(model, layout, strategy=strategy, steps=steps, reason=needs.reason, replica_build=replica_build,
                       check_calls=check_calls)
    _bind_process_group(layout, group)
    if not layout.inspection and isinstance(gm, TensorParallelModule):  # a deferred program: in its first call
        _check_replicas_and_calls(gm, layout, check_calls=check_calls)
    return gm


def _check_replicas_and_calls(gm: TensorParallelModule, layout: Layout, *, check_calls: bool) -> None:
    """Once the group is bound: the replica check (where :func:`_compile` left this rank's summary), then,
    with ``check_calls``, the call check turned on for every call (see :meth:`TensorParallelModule.check_calls_in`)."""
    summary = gm.meta.pop(_REPLICA_SUMMARY, None)
    if summary is not None:
        replica_check(summary, group=control_group(layout.key), key=layout.key)
    gm.check_calls_in(layout.key if check_calls else None)


def _check_arguments(model: object, tp: object, *, group: object, rank: object, mode: object, tracer: object,
                     example_inputs: object, flags: dict[str, object], logits: object) -> None:
    """One line naming the argument, for every argument of :func:`parallelize` of the wrong type or value
    (``flags``: the options that must be True or False, by name)."""
    where = "tpfx.parallelize"
    require_module(model, "model", where)
    require_count(tp, "tp", where, optional=True)
    require_count(rank, "rank", where, optional=True, minimum=0)
    require_choice(mode, "mode", where, MODES, kind="a parallelization mode")
    require_choice(tracer, "tracer", where, TRACERS, kind="a tracer")
    require_choice(logits, "logits", where, LOGITS, kind="an option")
    for name, value in flags.items():
        require_bool(value, name, where)
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ConfigError(f"{where}: group must be a torch.distributed ProcessGroup or None, got "
                          f"{type(group).__name__}; fix: pass dist.new_group(ranks) or omit it")
    if example_inputs is not None and not isinstance(example_inputs, (tuple, dict, torch.Tensor)):
        raise ConfigError(f"{where}: example_inputs is a {type(example_inputs).__name__}; pass a tuple of "
                          "positional arguments, a dict of keyword arguments, or one tensor")


def _group_of(mesh: DeviceMesh | None, group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The tensor-parallel process group that ``mesh=`` or ``group=`` names (None: the default layout)."""
    if mesh is None:
        return group
    if group is not None:
        raise ConfigError("both mesh= and group= were given; pass one of them (mesh['tp'] or its group)")
    if not isinstance(mesh, DeviceMesh):
        raise ConfigError(f"mesh={mesh!r} is not a torch.distributed DeviceMesh; pass init_device_mesh(...)['tp']")
    if mesh.ndim != 1:
        raise ConfigError(f"mesh has {mesh.ndim} dims {mesh.mesh_dim_names}: pass its tensor-parallel dim, "
                          "e.g. mesh['tp'], a one-dimensional mesh")
    return mesh.get_group()


def _deferred(model: nn.Module, layout: Layout, *, strategy: Strategy, steps: tuple[Step, ...],
              reason: str, replica_build: tuple[tuple[str, str], ...] | None, check_calls: bool) -> DeferredProgram:
    """The program captured with torch.export from its first call's arguments (see :mod:`tpfx.deferred`).

    The replica and call checks start with that call; the replica check is skipped when torch.compile
    captures the program while it traces an enclosing model (with fake arguments: no collective there).
    """
    def compile_from(args: tuple, kwargs: dict, training: bool) -> TensorParallelModule:
        call = bind_call(forward_signature(model), args, kwargs)
        build = None if torch.compiler.is_compiling() else replica_build
        with _collector_paused(), _in_mode(model, training):
            program = _compile(model, layout, strategy=strategy, tracer="export", example_inputs=call,
                               steps=steps, fx_failure=reason, replica_build=build)
        if not layout.inspection:
            _check_replicas_and_calls(program, layout, check_calls=check_calls)
        return program

    return DeferredProgram(type(model).__name__, reason, compile_from, training=model.training)


@contextmanager
def _in_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """``model`` in train or eval mode for a capture, every submodule's own mode restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def _compile(model: nn.Module, layout: Layout, *, strategy: Strategy, tracer: str,
             example_inputs: ExampleInputs | None, steps: tuple[Step, ...] = (), fx_failure: str = "",
             replica_build: tuple[tuple[str, str], ...] | None = None) -> TensorParallelModule:
    """capture -> find sites -> plan (the mode's strategy) -> rewrite the graph, shard the parameters -> report.

    The captured program is compiled in place: it is built over a weightless copy of the model, the
    passes change its graph and its modules, and its Python code is generated once, at the end.
    """
    captured = capture_for_parallelize(model, tracer=tracer, example_inputs=example_inputs, fx_failure=fx_failure)
    gm = captured.gm
    if replica_build is not None:  # what the replica check compares, taken from the graph before any rewrite
        gm.meta[_REPLICA_SUMMARY] = _replica_summary(model, captured, replica_build)
    # a model built with parameters on meta was traced on meta: its device constants must say the inputs' device
    retarget_meta_device(gm, device=device_of_inputs(example_inputs))
    # gather mode reads no sizes: shape propagation (a third of a small model's pass) is for pairing only
    needs_shapes = strategy.needs_shapes or bool(steps)
    shapes = _fake_shapes(captured, forward_signature(model), example_inputs) if needs_shapes else None
    # every parameter of the model, also those this graph does not read: the plan lists them all
    adopt_missing(gm, captured.skeleton)
    finding = find_sites(gm, tp=layout.tp)
    warn_if_no_sites(type(model).__name__, finding, tp=layout.tp, stacklevel=3)  # 3: parallelize's caller
    plan = strategy.plan(gm, finding, layout.tp, layout.rank)  # raises before any change
    for step in steps:
        plan = step.plan(gm, plan)
    plan = dataclasses.replace(plan, sequence_parallel=strategy.sequence_parallel)
    annotate_linears(gm, plan)  # node.meta["tpfx"]: what the rewrite does at each linear, from the plan
    _rewrite(gm, plan, layout.key, strategy, steps, other_form=False)
    shard_parameters(gm, plan, source=model)
    gm.tpfx_plan = plan  # what every parameter holds and why; reports and checkpoints read it
    gm.tpfx_pairing = plan.pairing  # megatron mode: the pairs and the fallbacks with their reasons
    take_weights(gm, captured.sources)
    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    captured.serve_call_forms(forward_signature(model),
                              lambda traced: _rewrite(traced, plan, layout.key, strategy, steps, other_form=True),
                              _preparation(shapes, forward_signature(model)))
    note = " ".join(filter(None, [captured.note, shapes.note if shapes is not None else ""]))  # sentences
    report = build_report(gm, model, plan=plan, group=layout.key, call_form=captured.form,
                          tracer=captured.tracer, tracer_note=note)
    gm.tpfx_report = strategy.report(report, gm, plan)
    return gm


def _rewrite(gm: fx.GraphModule, plan: Plan, group: str, strategy: Strategy, steps: tuple[Step, ...], *,
             other_form: bool) -> None:
    """The mode's rewrite of one graph (the program's, or another call form's mapped onto the plan), then
    the steps', then (sequence parallelism) the split of the residual stream, which sees every sum, then
    the whole parameters' gradient sums put in one collective."""
    if other_form:  # mapped by name: a read of a sharded weight this form adds would see the rank's shard
        check_sharded_reads(gm, plan, form=gm.meta.get(CALL_FORM, type(gm).__name__))
    (strategy.rewrite_other_form if other_form else strategy.rewrite)(gm, plan, group)
    for step in steps:
        step.rewrite(gm, plan, group)
    if strategy.sequence_parallel:
        _split_sequence(gm, plan, group)
    bucket_gradient_sums(gm)  # the whole parameters' gradient sums in one collective (every copy-to is in place now)


def _replica_summary(model: nn.Module, captured: Captured, build: tuple[tuple[str, str], ...]) -> Summary:
    """This rank's side of the replica check: build options (``build`` and how the model was captured), the
    captured graph, every tensor's fingerprint.

    The random state is compared only for a model in training mode whose graph drops something: in
    eval mode dropout draws nothing, and unseeded ranks are fine.
    """
    build = (*build, ("tracer", captured.tracer), ("call form", captured.form.describe()))
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
