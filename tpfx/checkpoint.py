"""Checkpoints in the single-device format: load shards straight from it, gather shards back into it.

Loading (each rank reads only what it holds)::

    with tpfx.parameters_on_meta():
        model = GPTModel(config)                           # no parameter memory
    gm = tpfx.parallelize(model, tp=2)
    tpfx.load_state_dict(gm, "model.safetensors")          # rank r reads rows r*N/2 ... of each shard

Saving (the original model's keys and shapes)::

    state = tpfx.full_state_dict(gm)                        # full tensors on rank 0, {} elsewhere
    if state: torch.save(state, "model.pt")

Which part of a full tensor a rank holds is read from the program's plan (``gm.tpfx_plan``, see
:class:`tpfx.passes.plan.Plan`): a :class:`tpfx.layers.ShardSpec` for every sharded parameter, whether a
parallel layer holds it or a pass sliced it in place (an op on a parameter of an exported graph). A
module without a plan falls back to its layers' ``shard_spec(param_name)``, the runtime contract every
sharded layer keeps. Every other tensor is replicated. Loading is all or nothing: the checkpoint is
checked against the program (keys, shapes, dtypes, stored layouts, a safetensors file's byte ranges)
before the first read, and every tensor is read before the first one is written.

Sources: a state dict; a ``torch.save`` file (opened with ``mmap=True``); a ``.safetensors`` file.
A safetensors file is read without mmap, on purpose: pages of a mapped file count in the process's
resident memory for as long as the mapping lives, so reading through a mapping holds every touched
byte twice (mapped page + tensor). tpfx reads the file's JSON header, then ``readinto`` each rank's
byte ranges straight into the destination tensor, one tensor at a time: peak memory is the rank's
own tensors plus one 8 MB scratch buffer (for column shards and dtype casts). A ``torch.save`` file
is memory-mapped by ``torch.load``, so its touched pages stay resident until the load returns.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import closing
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

StateSource = Mapping[str, torch.Tensor] | str | os.PathLike

_CHUNK_BYTES = 8 << 20  # column shards and dtype casts go through a scratch buffer of this size
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

    def dtype(self, key: str) -> torch.dtype: ...

    def problem(self, key: str) -> str | None:
        """Why the stored tensor under ``key`` holds no data that can be read (meta, sparse), or None."""

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


_SAFETENSORS_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
    ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("C64", "complex64"))
    if hasattr(torch, attr)}


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors file: dtype, shape and where its bytes start in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along dim 0 (the whole tensor for a scalar)."""
        rest = 1
        for size in self.shape[1:]:
            rest *= size
        return rest * torch.empty((), dtype=self.dtype).element_size()


class _SafetensorsSource:
    """A ``.safetensors`` file: its JSON header, then byte ranges read straight into destination tensors."""

    def __init__(self, path: Path) -> None:
        self.where = f"safetensors file '{path}'"
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self.scratch: torch.Tensor | None = None
        try:
            self.entries = self._read_header()
        except Exception:
            self.file.close()
            raise

    def _read_header(self) -> dict[str, _Entry]:
        size = os.fstat(self.file.fileno()).st_size
        try:
            (length,) = struct.unpack("<Q", self.file.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(self.file.read(length))
        except (struct.error, ValueError) as error:
            header, problem = None, f"{type(error).__name__}: {error}"
        else:
            problem = None if isinstance(header, dict) else f"the header is a JSON {type(header).__name__}"
        if problem is not None:
            raise LoadError(f"{self.where} has no readable safetensors header ({problem}); "
                            "fix: pass a file written by safetensors' save_file, or a torch.save file")
        data_start = 8 + length
        spans = {key: _span(key, info, size - data_start, self.where)
                 for key, info in header.items() if key != "__metadata__"}
        _check_disjoint(spans, self.where)
        return {key: _Entry(dtype, shape, data_start + begin) for key, (dtype, shape, begin, _) in spans.items()}

    def keys(self) -> set[str]:
        return set(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].dtype

    def problem(self, key: str) -> str | None:
        return None  # every entry's byte range was checked with the header

    def read_into(self, key: str, spec: ShardSpec | None, out: torch.Tensor) -> None:
        entry = self.entries[key]
        if not entry.shape:  # a scalar: one "row" of one element
            self._read_rows(entry, 0, 1, out.reshape(1))
        elif spec is None:
            self._read_rows(entry, 0, entry.shape[0], out)
        elif spec.dim == 0:
            for local, start, length in spec.pieces():
                self._read_rows(entry, start, length, out.narrow(0, local, length))
        else:  # a shard along dim >= 1: read whole rows a chunk at a time, keep this rank's columns
            for done, block in self._chunks(entry, 0, entry.shape[0]):
                destination = out.narrow(0, done, block.shape[0])
                for local, start, length in spec.pieces():
                    destination.narrow(spec.dim, local, length).copy_(block.narrow(spec.dim, start, length))

    def _read_rows(self, entry: _Entry, first: int, count: int, out: torch.Tensor) -> None:
        """Rows ``[first, first + count)`` into ``out``: straight into it when dtype and layout allow."""
        if out.dtype == entry.dtype and out.is_contiguous() and out.device.type == "cpu":
            self._fill(out, entry.offset + first * entry.row_bytes)
            return
        for done, block in self._chunks(entry, first, count):  # cast or copy through the scratch buffer
            out.narrow(0, done, block.shape[0]).copy_(block)

    def _chunks(self, entry: _Entry, first: int, count: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Rows ``[first, first + count)`` a chunk at a time: (rows done before it, the chunk in the scratch)."""
        per_chunk = max(1, _CHUNK_BYTES // max(1, entry.row_bytes))
        for done in range(0, count, per_chunk):
            rows = min(per_chunk, count - done)
            block = self._scratch(rows * entry.row_bytes).view(entry.dtype).view((rows,) + entry.shape[1:])
            self._fill(block, entry.offset + (first + done) * entry.row_bytes)
            yield done, block

    def _scratch(self, nbytes: int) -> torch.Tensor:
        # one buffer reused for every chunk: fresh temporaries between the loaded tensors would leave
        # holes in the heap that the process keeps as resident memory
        if self.scratch is None or self.scratch.numel() < nbytes:
            self.scratch = torch.empty(max(nbytes, _CHUNK_BYTES), dtype=torch.uint8)
        return self.scratch[:nbytes]

    def _fill(self, tensor: torch.Tensor, offset: int) -> None:
        """Read ``tensor``'s bytes (contiguous, on the CPU) from ``offset`` in the file."""
        if not tensor.numel():
            return
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        self.file.seek(offset)
        filled = 0
        while filled < len(view):  # a single read returns at most about 2 GiB
            got = self.file.readinto(view[filled:])
            if not got:
                raise LoadError(f"{self.where} ends early; fix: the file is truncated, write it again")
            filled += got

    def close(self) -> None:
        self.file.close()
        self.scratch = None


def _span(key: str, info: object, data_length: int, where: str
          ) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, its byte range checked against its size and the data.

    Raises:
        LoadError: naming the key: an unknown dtype, a malformed shape or offsets, a range outside the
            data, or a range whose length is not the tensor's size (a wrong or truncated file).
    """
    fix = "fix: the file is damaged or not a safetensors file; write it again with safetensors' save_file"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise LoadError(f"{where}: header entry {key!r} lacks dtype, shape or data_offsets; {fix}")
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise LoadError(f"{where}: tensor {key!r} has dtype {info['dtype']!r}, which torch "
                        f"{torch.__version__} cannot hold; fix: save it as one of "
                        f"{', '.join(sorted(_SAFETENSORS_DTYPES))}")

    def naturals(value: object, count: int | None) -> bool:
        return (isinstance(value, list) and (count is None or len(value) == count)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value))

    shape, offsets = info["shape"], info["data_offsets"]
    if not naturals(shape, None) or not naturals(offsets, 2):
        raise LoadError(f"{where}: tensor {key!r} has shape {shape!r} and data_offsets {offsets!r}; both must be "
                        f"lists of non-negative integers (two offsets); {fix}")
    begin, end = offsets
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if begin > end or end > data_length or end - begin != nbytes:
        raise LoadError(f"{where}: tensor {key!r} has data_offsets [{begin}, {end}] but its {info['dtype']} "
                        f"shape {list(shape)} needs {nbytes} bytes within the {data_length} bytes of data; {fix}")
    return dtype, tuple(shape), begin, end


def _check_disjoint(spans: Mapping[str, tuple[torch.dtype, tuple[int, ...], int, int]], where: str) -> None:
    """Raise a LoadError naming two tensors whose byte ranges overlap (each would read the other's bytes)."""
    ordered = sorted((begin, end, key) for key, (_, _, begin, end) in spans.items() if end > begin)
    for (_, end, before), (begin, _, after) in itertools.pairwise(ordered):
        if begin < end:
            raise LoadError(f"{where}: the bytes of tensors {before!r} and {after!r} overlap (one starts at "
                            f"{begin}, before the other ends at {end}); fix: the file is damaged, write it again "
                            "with safetensors' save_file")


def _open_source(source: StateSource) -> _Source:
    """Open a state dict, a torch.save file or a .safetensors file as a source of tensors.

    Raises:
        LoadError: the file does not exist, cannot be read, or does not hold a flat state dict.
    """
    if isinstance(source, Mapping):
        return _TensorSource(source, "the given state dict")
    path = Path(source)
    if not path.is_file():
        raise LoadError(f"checkpoint '{path}' does not exist or is not a file; fix: pass the path of a "
                        ".safetensors or torch.save file, or a state dict")
    if path.suffix == ".safetensors":
        return _SafetensorsSource(path)
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
    empty = [problem for _, key in reads if (problem := source.problem(key)) is not None]
    refused = [f"{key!r} is {str(source.dtype(key)).removeprefix('torch.')} in the checkpoint but "
               f"{str(target.tensor.dtype).removeprefix('torch.')} in the model"
               for target, key in reads if not _castable(source.dtype(key), target.tensor.dtype)]
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

    All or nothing: every check (keys, shapes, dtypes, stored layouts, a safetensors file's byte
    ranges) runs before the first read, and every tensor is read before the first one is written, so
    a failed read (an I/O error) leaves the program exactly as it was. The price is a second copy of
    the real tensors being replaced while they are read; meta tensors cost nothing extra.
    Dtypes: a floating checkpoint tensor is cast to the model's floating dtype; any other difference
    (integer, bool or complex into float, or the reverse) is refused.

    Args:
        gm: the program from :func:`tpfx.parallelize` (any ``nn.Module`` works; without sharded
            layers it loads like ``nn.Module.load_state_dict``).
        source: a single-device state dict, a ``torch.save`` file, or a ``.safetensors`` file.
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


def _assemble(parts: list[torch.Tensor], specs: list[ShardSpec], like: torch.Tensor) -> torch.Tensor:
    """The full tensor from every rank's (padded) local part and spec."""
    full = torch.empty(specs[0].full_shape(tuple(like.shape)), dtype=like.dtype, device=like.device)
    for part, spec in zip(parts, specs):
        for local, start, length in spec.pieces():
            full.narrow(spec.dim, start, length).copy_(part.narrow(spec.dim, local, length))
    return full


def _gather_full(target: _Target, specs: list[ShardSpec], group: dist.ProcessGroup | None,
                 *, to_all: bool) -> torch.Tensor | None:
    """Gather one sharded tensor; the full tensor on the receiving rank(s), None elsewhere."""
    local = target.tensor.detach().contiguous()
    dim, widest = specs[0].dim, max(spec.local_size for spec in specs)
    if local.shape[dim] < widest:  # collectives need equal shapes: pad the narrower shards
        padding = list(local.shape)
        padding[dim] = widest - local.shape[dim]
        local = torch.cat([local, local.new_zeros(padding)], dim=dim)
    parts = [torch.empty_like(local) for _ in specs]
    if to_all:
        dist.all_gather(parts, local, group=group)
        return _assemble(parts, specs, target.tensor)
    receiver = dist.get_global_rank(group, 0) if group is not None else 0
    receiving = dist.get_rank() == receiver
    dist.gather(local, parts if receiving else None, dst=receiver, group=group)
    return _assemble(parts, specs, target.tensor) if receiving else None


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
    targets = _targets(gm)
    on_meta = [t.keys[0] for t in targets if t.tensor.is_meta]
    if on_meta:
        raise LoadError(f"{type(gm).__name__} still has meta tensors {_listed(on_meta)}; "
                        "fix: load weights with tpfx.load_state_dict(gm, checkpoint) first")
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
