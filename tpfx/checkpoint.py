"""Checkpoints in the single-device format: load shards straight from it, gather shards back into it.

Loading (each rank reads only what it holds)::

    with tpfx.parameters_on_meta():
        model = GPTModel(config)                           # no parameter memory
    gm = tpfx.parallelize(model, tp=2)
    tpfx.load_state_dict(gm, "model.safetensors")          # rank r reads rows r*N/2 ... of each shard

Saving (the original model's keys and shapes)::

    state = tpfx.full_state_dict(gm)                        # full tensors on rank 0, {} elsewhere
    if state: torch.save(state, "model.pt")
    tpfx.save_pretrained(gm, "out/")                        # or a transformers-style directory, from rank 0

Which part of a full tensor a rank holds is read from the program's plan (``gm.tpfx_plan``, see
:class:`tpfx.passes.plan.Plan`): a :class:`tpfx.layers.ShardSpec` for every sharded parameter, whether a
parallel layer holds it or a pass sliced it in place (an op on a parameter of an exported graph). A
module without a plan falls back to its layers' ``shard_spec(param_name)``, the runtime contract every
sharded layer keeps. Every other tensor is replicated. Loading is all or nothing: the checkpoint is
checked against the program (keys, shapes, dtypes, stored layouts, a safetensors file's byte ranges)
before the first read, and every tensor is read before the first one is written.

Sources: a state dict; a ``torch.save`` file (opened with ``mmap=True``: its touched pages stay
resident until the load returns); a ``.safetensors`` file; a checkpoint directory as transformers
writes it (``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors``, or one
``model.safetensors``); a ``torch.distributed.checkpoint`` directory (see :mod:`tpfx.dcp`). Safetensors
files are read a rank's byte ranges at a time, never through a mapping (see :mod:`tpfx.safetensors_io`):
peak memory is the rank's own tensors plus one 8 MB buffer.

Saving a directory (:func:`save_pretrained`) gathers one tensor at a time onto the writing rank and
appends its bytes to the file laid out for it, so the writer never holds more than one full tensor
beyond its own shards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn as nn

from tpfx.passes.plan import Plan
from tpfx.collectives import _group as bound_group  # the process group behind a program's group key
from tpfx.arguments import require_bool, require_device, require_module, require_source
from tpfx.errors import ConfigError, LoadError, first_line, one_line
from tpfx.layers import ShardSpec
from tpfx.safetensors_io import (DirectoryWriter, Planned, SafetensorsDirectory, SafetensorsFile, Scratch, parse_size,
                                plan_files)

StateSource = Mapping[str, torch.Tensor] | str | os.PathLike

_MAX_LISTED = 3  # keys named in an error message before "+N more"


@dataclass(frozen=True, eq=False)  # holds a tensor: compared by identity
class _Target:
    """One tensor of the program: every state-dict key that names it (several when tied), its shard."""

    keys: tuple[str, ...]
    tensor: torch.Tensor
    spec: ShardSpec | None

    @property
    def full_shape(self) -> tuple[int, ...]:
        local = tuple(self.tensor.shape)
        return self.spec.full_shape(local) if self.spec else local


def _shard_spec_of(module: nn.Module, key: str, plan: Plan | None) -> ShardSpec | None:
    """This rank's spec of the tensor under ``key``: the plan's; without a plan, the owning layer's ``shard_spec``."""
    if plan is not None:
        entry = plan.parameters.get(key)
        return None if entry is None else entry.spec  # buffers, and parameters added later, are whole
    owner_path, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_path)
    if leaf in owner._parameters and callable(getattr(owner, "shard_spec", None)):
        return owner.shard_spec(leaf)
    return None


def parameter_shard_specs(gm: nn.Module) -> dict[str, ShardSpec]:
    """Every sharded parameter of a program, by qualified name: where it lies in the full tensor.

    Read from the program's plan (``gm.tpfx_plan``, set by :func:`tpfx.parallelize`); a module built
    without one (a bare GraphModule holding tpfx layers) answers with its layers' ``shard_spec``.
    Parameters not listed are replicated. ``spec.take(full)`` gives a rank's part of a full tensor or
    of its gradient, e.g. to compare with a single-device model.
    """
    require_module(gm, "gm", "tpfx.parameter_shard_specs")
    plan = getattr(gm, "tpfx_plan", None)
    specs = {name: _shard_spec_of(gm, name, plan) for name, _ in gm.named_parameters()}
    return {name: spec for name, spec in specs.items() if spec is not None}


def _targets(module: nn.Module) -> list[_Target]:
    """The program's state-dict tensors, tied keys grouped, in state-dict order."""
    keys_of: dict[int, list[str]] = {}
    tensor_of: dict[int, torch.Tensor] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        keys_of.setdefault(id(tensor), []).append(key)
        tensor_of[id(tensor)] = tensor
    plan = getattr(module, "tpfx_plan", None)
    return [_Target(tuple(keys), tensor_of[ident], _shard_spec_of(module, keys[0], plan))
            for ident, keys in keys_of.items()]


# ----------------------------------------------------------------------------------------- sources

class _Source(Protocol):
    """Where full tensors come from; ``read_into`` fills a rank's local tensor with its part of one."""

    where: str  # how error messages name the source

    def keys(self) -> set[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def problem(self, key: str) -> str | None:
        """Why the stored entry under ``key`` holds no data that can be read (meta, sparse, not a tensor), or None."""

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key`` (asked only where :meth:`problem` is None)."""

    def read_into(self, key: str, spec: ShardSpec | None, out: torch.Tensor) -> None: ...

    def close(self) -> None: ...


class _TensorSource:
    """Full tensors held in memory or mapped from a file: a state dict or a ``torch.load(mmap=True)``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise LoadError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                                "pass a flat state dict of tensors (model.state_dict() or tpfx.full_state_dict)")
        self.tensors, self.where = tensors, where

    def keys(self) -> set[str]:
        return set(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def problem(self, key: str) -> str | None:
        tensor = self.tensors[key]
        if tensor.is_meta:
            return f"{key!r} is on the meta device (it holds no values)"
        if tensor.layout != torch.strided:
            return f"{key!r} is a {str(tensor.layout).removeprefix('torch.')} tensor, not a dense one"
        return None

    def read_into(self, key: str, spec: ShardSpec | None, out: torch.Tensor) -> None:
        full = self.tensors[key]
        if spec is None:
            out.copy_(full)
            return
        for local, start, length in spec.pieces():
            out.narrow(spec.dim, local, length).copy_(full.narrow(spec.dim, start, length))

    def close(self) -> None:
        self.tensors = {}


def _open_source(source: StateSource) -> _Source:
    """Open a state dict, a torch.save file, a .safetensors file, a checkpoint directory or a
    ``torch.distributed.checkpoint`` directory as a source of tensors.

    Raises:
        LoadError: the file does not exist, cannot be read, or does not hold a flat state dict.
    """
    if isinstance(source, Mapping):
        return _TensorSource(source, "the given state dict")
    path = Path(source)
    if path.is_dir() and (path / ".metadata").is_file():
        from tpfx.dcp import DcpDirectory  # tpfx.dcp reads the program's tensors through this module

        return DcpDirectory(path)
    if path.is_dir():
        return SafetensorsDirectory(path)
    if path.name.endswith(".safetensors.index.json"):
        return SafetensorsDirectory(path.parent)
    if not path.is_file():
        raise LoadError(f"checkpoint '{path}' does not exist; fix: pass the path of a checkpoint directory "
                        "(model.safetensors.index.json + shards, or a dcp.save directory), a .safetensors or "
                        "torch.save file, or a state dict")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # mmap needs the zip format; old files and foreign files land here
        raise LoadError(f"cannot read '{path}' with torch.load(mmap=True, weights_only=True): {first_line(error)}; fix: "
                        "save a state dict with torch.save(model.state_dict(), path), or use .safetensors") from None
    if not isinstance(loaded, Mapping):
        raise LoadError(f"'{path}' holds a {type(loaded).__name__}, not a state dict; fix: save "
                        "model.state_dict() (or tpfx.full_state_dict(gm)), not the model")
    return _TensorSource(loaded, f"torch.save file '{path}'")


# ------------------------------------------------------------------------------------------ checks

def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    return shown + (f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _problems(targets: list[_Target], source: _Source, *, strict: bool) -> tuple[list[str], list[str]]:
    """What keeps ``source`` from loading into ``targets``: (problems, fixes), both empty when it fits."""
    available = source.keys()
    expected = {key for target in targets for key in target.keys}
    missing = [t.keys[0] for t in targets if not available.intersection(t.keys) and (strict or t.tensor.is_meta)]
    unexpected = sorted(available - expected) if strict else []
    mismatched = [f"{key!r} is {source.shape(key)} in the checkpoint but {t.full_shape} in the model"
                  for t in targets for key in t.keys if key in available and source.shape(key) != t.full_shape]
    problems, fixes = [], []
    if missing or unexpected:
        problems += [f"missing key(s) {_listed(missing)}"] if missing else []
        problems += [f"unexpected key(s) {_listed(unexpected)}"] if unexpected else []
        fixes.append("load a checkpoint of this model class (model.state_dict() or tpfx.full_state_dict)"
                     + (", or pass strict=False to skip keys" if strict else ""))
    if mismatched:
        problems.append("shape mismatch: " + mismatched[0] + (f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
        fixes.append("build the model with the configuration the checkpoint was saved from")
    return problems, fixes


def _meta_buffer_problems(module: nn.Module, source: _Source) -> tuple[list[str], list[str]]:
    """Buffers left on meta that no checkpoint can fill (they are not saved: computed at construction)."""
    available = source.keys()
    lost = [name for name, buffer in module.named_buffers() if buffer.is_meta and name not in available]
    if not lost:
        return [], []
    return ([f"buffer(s) {_listed(lost)} are on the meta device and not in the checkpoint"],
            ["build the model under `with tpfx.parameters_on_meta():` rather than torch.device('meta'), "
             "so that buffers computed by the constructor stay real"])


def _castable(stored: torch.dtype, wanted: torch.dtype) -> bool:
    """The dtype policy: the same dtype, or one floating dtype into another (bf16 checkpoint, fp32 model)."""
    return stored == wanted or (stored.is_floating_point and wanted.is_floating_point)


def _stored_problems(reads: list[tuple[_Target, str]], source: _Source) -> tuple[list[str], list[str]]:
    """Stored tensors that hold no readable values (meta, sparse) or whose dtype may not be cast to the model's."""
    problems_of = {key: source.problem(key) for _, key in reads}
    empty = [problem for problem in problems_of.values() if problem is not None]
    refused = [f"{key!r} is {str(source.dtype(key)).removeprefix('torch.')} in the checkpoint but "
               f"{str(target.tensor.dtype).removeprefix('torch.')} in the model"
               for target, key in reads
               if problems_of[key] is None and not _castable(source.dtype(key), target.tensor.dtype)]
    problems, fixes = [], []
    if empty:
        problems.append(empty[0] + (f" (+{len(empty) - 1} more)" if len(empty) > 1 else ""))
        fixes.append("save real dense tensors (tensor.to_dense(), weights loaded before saving)")
    if refused:
        problems.append("dtype mismatch: " + refused[0] + (f" (+{len(refused) - 1} more)" if len(refused) > 1 else ""))
        fixes.append("only floating dtypes are cast into each other; save the tensor in the model's dtype")
    return problems, fixes


def _device_problems(reads: list[tuple[_Target, str]], device: torch.device) -> tuple[list[str], list[str]]:
    """A ``device`` that cannot hold the meta tensors this load materializes."""
    if not any(target.tensor.is_meta for target, _ in reads):
        return [], []
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch raises either for an absent backend or index
        return [f"device={str(device)!r} is not usable here ({first_line(error)})"], ["pass an available device"]
    return [], []


def _checked_reads(gm: nn.Module, source: _Source, *, strict: bool,
                   device: torch.device) -> list[tuple[_Target, str]]:
    """Every check of ``source`` against ``gm``, all before anything is written: (tensor, key to read) pairs.

    Raises:
        LoadError: one line listing every kind of problem found (keys, shapes, dtypes, stored layouts,
            meta buffers, device) with their fixes.
    """
    targets = _targets(gm)
    available = source.keys()
    reads = [(target, next(key for key in target.keys if key in available))
             for target in targets if available.intersection(target.keys)]
    problems, fixes = _problems(targets, source, strict=strict)
    for more_problems, more_fixes in (_stored_problems(reads, source), _meta_buffer_problems(gm, source),
                                      _device_problems(reads, device)):
        problems, fixes = problems + more_problems, fixes + more_fixes
    if problems:
        raise LoadError(f"cannot load {source.where} into {type(gm).__name__}: "
                        f"{'; '.join(problems)}; fix: {'; '.join(fixes)}")
    return reads


# ----------------------------------------------------------------------------------------- loading

def _stage(target: _Target, source: _Source, key: str, device: torch.device) -> torch.Tensor:
    """This rank's part of ``key`` in a new tensor of the target's dtype: on ``device`` for a meta target."""
    tensor = target.tensor
    staged = torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
    source.read_into(key, target.spec, staged)
    if not tensor.is_meta:
        return staged
    loaded = staged.to(device)
    return type(tensor)(loaded, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else loaded


def _commit(staged: list[tuple[_Target, torch.Tensor]]) -> None:
    """Put every staged tensor into the program: fill a real tensor in place, swap a meta one's storage.

    Swapping, not re-registering, keeps the same object in every module, call form and optimizer. A
    failure undoes the swaps already made (a swapped-out meta tensor holds no values to lose).
    """
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for target, new in staged:
                if target.tensor.is_meta:
                    torch.utils.swap_tensors(target.tensor, new)
                    swapped.append((target.tensor, new))
                else:
                    target.tensor.copy_(new)
    except BaseException:
        for tensor, old in reversed(swapped):
            torch.utils.swap_tensors(tensor, old)
        raise


def load_state_dict(gm: nn.Module, source: StateSource, *, strict: bool = True,
                    device: torch.device | str = "cpu") -> None:
    """Load a single-device checkpoint into a tensor-parallel program; each rank reads only its part.

    Sharded parameters get this rank's part (as the program's plan says), replicated
    parameters and persistent buffers get the whole tensor. Meta tensors (a model built under
    :func:`tpfx.parameters_on_meta`) are materialized on ``device``; real tensors are filled in place.
    Tied parameters are loaded once, from whichever of their keys the checkpoint holds.

    All or nothing, from every source: every check (keys, shapes, dtypes, stored layouts, each
    safetensors header's byte ranges, a directory's index) runs before the first read, and every tensor is read before the first one is written, so
    a failed read (an I/O error) leaves the program exactly as it was. The price is a second copy of
    the real tensors being replaced while they are read; meta tensors cost nothing extra.
    Dtypes: a floating checkpoint tensor is cast to the model's floating dtype; any other difference
    (integer, bool or complex into float, or the reverse) is refused.

    Args:
        gm: the program from :func:`tpfx.parallelize` (any ``nn.Module`` works; without sharded
            layers it loads like ``nn.Module.load_state_dict``).
        source: a single-device state dict, a ``torch.save`` file, a ``.safetensors`` file, or a
            checkpoint directory as transformers writes it (``model.safetensors.index.json`` and the
            files it names, or one ``model.safetensors``; the index file's path works too), or a
            ``torch.distributed.checkpoint`` directory (``dcp.save``; read without collectives).
        strict: when False, unexpected keys are ignored and missing keys keep their current values
            (a missing key whose tensor is still on meta is an error all the same).
        device: where meta tensors are materialized.

    Raises:
        ConfigError: an argument of the wrong type.
        LoadError: missing or unexpected keys, a shape or dtype mismatch, a meta or sparse stored
            tensor, a damaged safetensors header, a meta buffer the checkpoint cannot fill, an
            unusable device or an unreadable source: raised before any tensor is changed. A read that
            fails later raises a LoadError too, with every tensor as it was.
    """
    where = "tpfx.load_state_dict"
    require_module(gm, "gm", where)
    require_source(source, "source", where)
    require_bool(strict, "strict", where)
    device = require_device(device, "device", where)
    with closing(_open_source(source)) as opened:
        reads = _checked_reads(gm, opened, strict=strict, device=device)
        staged, key = [], None
        try:
            for target, key in reads:
                staged.append((target, _stage(target, opened, key, device)))
        except Exception as error:  # I/O after the checks: nothing has been written yet
            raise LoadError(f"reading {key!r} from {opened.where} failed ({one_line(error)}); the program is "
                            "unchanged; fix: check that the file is complete and readable, then load again") from error
        _commit(staged)


# ----------------------------------------------------------------------------------------- gathering

def _tp_group(gm: nn.Module) -> dist.ProcessGroup | None:
    report = getattr(gm, "tpfx_report", None)
    if report is None:
        raise ConfigError(f"{type(gm).__name__} has sharded layers but no tpfx_report, so its tensor-parallel "
                          "group is unknown; fix: call full_state_dict on the program tpfx.parallelize returned")
    return bound_group(report.group)


class _Reused:
    """Two byte buffers that every gathered tensor of a save reuses (the parts, the full tensor): fresh
    tensors per gather, freed in between, leave holes in the heap that stay resident."""

    def __init__(self) -> None:
        self.parts_buffer, self.full_buffer = Scratch(), Scratch()

    def parts(self, local: torch.Tensor, count: int) -> list[torch.Tensor]:
        flat = self.parts_buffer.get(count * local.nbytes).view(local.dtype)
        return [chunk.view(local.shape) for chunk in flat.chunk(count)]

    def full(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = 1
        for size in shape:
            count *= size
        return self.full_buffer.get(count * torch.empty((), dtype=dtype).element_size()).view(dtype).view(shape)


def _assemble(parts: list[torch.Tensor], specs: list[ShardSpec], like: torch.Tensor,
              reused: _Reused | None = None) -> torch.Tensor:
    """The full tensor from every rank's (padded) local part and spec (in ``reused``'s buffer when given)."""
    shape = specs[0].full_shape(tuple(like.shape))
    full = (reused.full(shape, like.dtype) if reused is not None
            else torch.empty(shape, dtype=like.dtype, device=like.device))
    for part, spec in zip(parts, specs):
        for local, start, length in spec.pieces():
            full.narrow(spec.dim, start, length).copy_(part.narrow(spec.dim, local, length))
    return full


def _gather_full(target: _Target, specs: list[ShardSpec], group: dist.ProcessGroup | None,
                 *, to_all: bool, reused: _Reused | None = None) -> torch.Tensor | None:
    """Gather one sharded tensor; the full tensor on the receiving rank(s), None elsewhere.

    With ``reused`` (CPU tensors only), the parts and the full tensor live in its buffers: valid
    until the next gather.
    """
    local = target.tensor.detach().contiguous()
    dim, widest = specs[0].dim, max(spec.local_size for spec in specs)
    if local.shape[dim] < widest:  # collectives need equal shapes: pad the narrower shards
        padding = list(local.shape)
        padding[dim] = widest - local.shape[dim]
        local = torch.cat([local, local.new_zeros(padding)], dim=dim)
    reused = reused if local.device.type == "cpu" else None
    if to_all:
        parts = [torch.empty_like(local) for _ in specs]
        dist.all_gather(parts, local, group=group)
        return _assemble(parts, specs, target.tensor)
    receiver = dist.get_global_rank(group, 0) if group is not None else 0
    if dist.get_rank() != receiver:
        dist.gather(local, None, dst=receiver, group=group)
        return None
    parts = reused.parts(local, len(specs)) if reused is not None else [torch.empty_like(local) for _ in specs]
    dist.gather(local, parts, dst=receiver, group=group)
    return _assemble(parts, specs, target.tensor, reused)


def _loaded_targets(gm: nn.Module) -> list[_Target]:
    """The program's tensors (:func:`_targets`); raises LoadError if any is still on meta (nothing loaded)."""
    targets = _targets(gm)
    on_meta = [t.keys[0] for t in targets if t.tensor.is_meta]
    if on_meta:
        raise LoadError(f"{type(gm).__name__} still has meta tensors {_listed(on_meta)}; "
                        "fix: load weights with tpfx.load_state_dict(gm, checkpoint) first")
    return targets


def full_state_dict(gm: nn.Module, *, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Gather a tensor-parallel program's state into the original model's keys and full shapes.

    Collective: every rank of the program's group must call it. The result loads into the
    single-device model (``model.load_state_dict``) or, through :func:`load_state_dict`, into a
    program of any tp. Replicated tensors are returned without a copy (detached views of the live
    ones): clone them before changing the program further if you keep the dict.

    Args:
        gm: the program from :func:`tpfx.parallelize`.
        rank0_only: only rank 0 of the group receives the full tensors (the others return ``{}``),
            so only one rank holds the whole model; False gives every rank the full dict.

    Returns:
        ``{key: full tensor}`` with every key of the original model's ``state_dict()``.

    Raises:
        LoadError: a tensor is still on meta (nothing has been loaded into the program).
        ConfigError: an argument of the wrong type; the program was built for inspection (no process
            group to gather over).
    """
    require_module(gm, "gm", "tpfx.full_state_dict")
    require_bool(rank0_only, "rank0_only", "tpfx.full_state_dict")
    targets = _loaded_targets(gm)
    sharded = [t for t in targets if t.spec is not None]
    group = _tp_group(gm) if sharded else None
    specs_by_rank = _exchange_specs([t.spec for t in sharded], group) if sharded else []
    receiving = not rank0_only or not dist.is_initialized() or dist.get_rank(group) == 0
    state: dict[str, torch.Tensor] = {}
    position = 0  # index of the next sharded target, in the order the specs were exchanged
    for target in targets:
        tensor = target.tensor.detach()
        if target.spec is not None:
            tensor = _gather_full(target, [specs[position] for specs in specs_by_rank], group, to_all=not rank0_only)
            position += 1
        if receiving:
            state.update(dict.fromkeys(target.keys, tensor))
    return state


def _exchange_specs(mine: list[ShardSpec], group: dist.ProcessGroup | None) -> list[list[ShardSpec]]:
    """Every rank's shard specs (one small collective), in group-rank order."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return everyone


# ----------------------------------------------------------------------------------------- directories

def _writes_here(group: dist.ProcessGroup | None) -> tuple[bool, bool]:
    """(this rank's group takes part, this rank writes): the group holding global rank 0 gathers, its rank 0 writes."""
    if not dist.is_initialized():
        return True, True
    if group is None:
        return True, dist.get_rank() == 0
    ranks = dist.get_process_group_ranks(group)
    return 0 in ranks, dist.get_rank() == 0


def save_pretrained(gm: nn.Module, directory: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                    config: object | None = None) -> None:
    """Write a program's weights as a transformers-style checkpoint directory, from global rank 0.

    The layout is the one :func:`load_state_dict` and ``transformers``' ``from_pretrained`` read:
    ``model.safetensors`` alone, or ``model.safetensors.index.json`` and ``model-0000k-of-0000n.safetensors``
    when the tensors exceed ``max_shard_size``; keys and full shapes are the single-device model's.
    A tensor registered under several keys (tied weights) is written once, under its first key, as
    transformers writes tied weights; ``tpfx.load_state_dict`` and ``from_pretrained`` restore the tie.
    Collective: every rank of the program's group calls it (and, with several tp groups, every
    rank); each sharded tensor is gathered to the writer one at a time. It returns on every rank
    once the directory is complete. Files of an earlier save in ``directory`` that this one does
    not write (``model-*-of-*.safetensors``, the index) are removed.

    Args:
        gm: the program from :func:`tpfx.parallelize`, with its weights loaded.
        directory: created if needed.
        max_shard_size: the largest file, in bytes or as ``"500MB"``, ``"5GB"``, ``"2GiB"``.
        config: a transformers config (anything with ``save_pretrained(directory)``), written beside
            the weights so that ``AutoModel.from_pretrained(directory)`` loads it; None writes none.

    Raises:
        LoadError: a tensor is still on meta (nothing has been loaded into the program).
        ConfigError: a bad ``max_shard_size``, a ``config`` without ``save_pretrained``, a dtype
            safetensors cannot store, or a program built for inspection (nothing to gather over).
    """
    if config is not None and not callable(getattr(config, "save_pretrained", None)):
        raise ConfigError(f"config is a {type(config).__name__} without save_pretrained(directory); pass the "
                          "model's transformers config (model.config) or None")
    targets = _loaded_targets(gm)
    files = plan_files([Planned(t.keys[0], t.full_shape, t.tensor.dtype) for t in targets], parse_size(max_shard_size))
    sharded = [t for t in targets if t.spec is not None]
    group = _tp_group(gm) if sharded else None
    taking_part, writing = _writes_here(group)
    if taking_part:
        specs_by_rank = _exchange_specs([t.spec for t in sharded], group) if sharded else []
        reused = _Reused()  # each gathered tensor is written before the next gather overwrites it
        with closing(DirectoryWriter(Path(directory), files)) if writing else nullcontext() as writer:
            position = 0  # index of the next sharded target, in the order the specs were exchanged
            for target in targets:
                tensor = target.tensor.detach()
                if target.spec is not None:
                    tensor = _gather_full(target, [specs[position] for specs in specs_by_rank], group,
                                          to_all=False, reused=reused)
                    position += 1
                if writing:
                    writer.write(target.keys[0], tensor)
        if writing and config is not None:
            config.save_pretrained(str(directory))
    if dist.is_initialized():
        dist.barrier()  # the directory is complete on every rank's return
