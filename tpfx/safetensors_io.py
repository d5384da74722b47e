"""Safetensors files and Hugging Face checkpoint directories: read a rank's slices, write a tensor at a time.

A checkpoint directory is what ``transformers`` writes and loads::

    model.safetensors.index.json          {"metadata": {"total_size": N}, "weight_map": {key: file}}
    model-00001-of-00003.safetensors      each file: 8-byte header length, JSON header, tensor bytes
    ...

or, when it fits in one file, ``model.safetensors`` alone.

Reading: every header is checked when a file is opened, before anything is read: each entry's dtype,
shape and byte range (inside the data, as long as the tensor, disjoint from the others), so a
damaged file is refused naming the key instead of loading garbage. A file is read without mmap, on
purpose: pages of a mapped file count in the process's resident memory for as long as the mapping
lives, so reading through a mapping holds every touched byte twice (mapped page + tensor). The JSON header gives each tensor's byte range; ``readinto``
fills the destination tensor straight from the rank's rows, one tensor at a time. A shard along
dim >= 1 reads whole rows a block at a time into one scratch buffer (8 MB, shared by every file of a
directory) and keeps the rank's columns, so no full tensor is ever held.

Writing: the files and their headers are laid out first from the tensors' names, shapes and dtypes
(:func:`plan_files`), then each tensor's bytes are appended as it arrives (:class:`DirectoryWriter`),
so the writer holds one full tensor at a time, never a whole file.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tpfx.errors import ConfigError, LoadError
from tpfx.layers import ShardSpec

CHUNK_BYTES = 8 << 20  # column shards and dtype casts go through a scratch buffer of this size
INDEX_NAME = "model.safetensors.index.json"  # the names transformers reads and writes
SINGLE_NAME = "model.safetensors"
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"

DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
    ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("C64", "complex64"))
    if hasattr(torch, attr)}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Entry:
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
        return rest * _element_size(self.dtype)


class Scratch:
    """One reusable byte buffer: fresh temporaries between loaded tensors would leave holes in the heap
    that the process keeps as resident memory."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, nbytes: int) -> torch.Tensor:
        """At least ``nbytes`` bytes (the first ``nbytes`` of the buffer)."""
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(nbytes, CHUNK_BYTES), dtype=torch.uint8)
        return self.buffer[:nbytes]


class SafetensorsFile:
    """A ``.safetensors`` file: its JSON header, then byte ranges read straight into destination tensors."""

    def __init__(self, path: Path, scratch: Scratch | None = None) -> None:
        self.where = f"safetensors file '{path}'"
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self.scratch = scratch or Scratch()
        try:
            self.entries = self._read_header()
        except Exception:
            self.file.close()
            raise

    def _read_header(self) -> dict[str, Entry]:
        """Every entry of the header, each one's byte range checked against its size, the data and the others.

        Raises:
            LoadError: an unreadable header, or an entry naming its key (see :func:`_span`,
                :func:`_check_disjoint`): nothing is read from a file whose header does not add up.
        """
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
        return {key: Entry(dtype, shape, data_start + begin) for key, (dtype, shape, begin, _) in spans.items()}

    def keys(self) -> set[str]:
        return set(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].dtype

    def problem(self, key: str) -> str | None:
        """None: every entry's byte range was checked with the header."""
        return None

    def read_into(self, key: str, spec: ShardSpec | None, out: torch.Tensor) -> None:
        """Fill ``out`` with this rank's part (``spec``; None: the whole tensor) of the tensor ``key``."""
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

    def _read_rows(self, entry: Entry, first: int, count: int, out: torch.Tensor) -> None:
        """Rows ``[first, first + count)`` into ``out``: straight into it when dtype and layout allow."""
        if out.dtype == entry.dtype and out.is_contiguous() and out.device.type == "cpu":
            self._fill(out, entry.offset + first * entry.row_bytes)
            return
        for done, block in self._chunks(entry, first, count):  # cast or copy through the scratch buffer
            out.narrow(0, done, block.shape[0]).copy_(block)

    def _chunks(self, entry: Entry, first: int, count: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Rows ``[first, first + count)`` a chunk at a time: (rows done before it, the chunk in the scratch)."""
        per_chunk = max(1, CHUNK_BYTES // max(1, entry.row_bytes))
        for done in range(0, count, per_chunk):
            rows = min(per_chunk, count - done)
            block = self.scratch.get(rows * entry.row_bytes).view(entry.dtype).view((rows,) + entry.shape[1:])
            self._fill(block, entry.offset + (first + done) * entry.row_bytes)
            yield done, block

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


_Span = tuple[torch.dtype, tuple[int, ...], int, int]  # dtype, shape, first and end byte within the data


def _span(key: str, info: object, data_length: int, where: str) -> _Span:
    """(dtype, shape, begin, end) of one header entry, its byte range checked against its size and the data.

    Raises:
        LoadError: naming the key: an unknown dtype, a malformed shape or offsets, a range outside the
            data, or a range whose length is not the tensor's size (a wrong or truncated file).
    """
    fix = "fix: the file is damaged or not a safetensors file; write it again with safetensors' save_file"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise LoadError(f"{where}: header entry {key!r} lacks dtype, shape or data_offsets; {fix}")
    dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise LoadError(f"{where}: tensor {key!r} has dtype {info['dtype']!r}, which torch "
                        f"{torch.__version__} cannot hold; fix: save it as one of {', '.join(sorted(DTYPES))}")

    def naturals(value: object, count: int | None) -> bool:
        return (isinstance(value, list) and (count is None or len(value) == count)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value))

    shape, offsets = info["shape"], info["data_offsets"]
    if not naturals(shape, None) or not naturals(offsets, 2):
        raise LoadError(f"{where}: tensor {key!r} has shape {shape!r} and data_offsets {offsets!r}; both must be "
                        f"lists of non-negative integers (two offsets); {fix}")
    begin, end = offsets
    nbytes = torch.Size(shape).numel() * _element_size(dtype)
    if begin > end or end > data_length or end - begin != nbytes:
        raise LoadError(f"{where}: tensor {key!r} has data_offsets [{begin}, {end}] but its {info['dtype']} "
                        f"shape {list(shape)} needs {nbytes} bytes within the {data_length} bytes of data; {fix}")
    return dtype, tuple(shape), begin, end


def _check_disjoint(spans: dict[str, _Span], where: str) -> None:
    """Raise a LoadError naming two tensors whose byte ranges overlap (each would read the other's bytes)."""
    ordered = sorted((begin, end, key) for key, (_, _, begin, end) in spans.items() if end > begin)
    for (_, end, before), (begin, _, after) in itertools.pairwise(ordered):
        if begin < end:
            raise LoadError(f"{where}: the bytes of tensors {before!r} and {after!r} overlap (one starts at "
                            f"{begin}, before the other ends at {end}); fix: the file is damaged, write it again "
                            "with safetensors' save_file")


class SafetensorsDirectory:
    """A checkpoint directory: ``model.safetensors.index.json`` and the files it names, or one ``.safetensors`` file.

    Every file's header is read when the directory is opened (so keys and shapes are checked before
    anything loads); tensors are read from the file the index names, through one shared scratch buffer.
    """

    def __init__(self, path: Path) -> None:
        self.where = f"checkpoint directory '{path}'"
        self.files: dict[str, SafetensorsFile] = {}
        self.file_of: dict[str, SafetensorsFile] = {}
        scratch = Scratch()
        try:
            for key, name in self._weight_map(path).items():
                if name not in self.files:
                    if not (path / name).is_file():
                        raise LoadError(f"{self.where}: its index names '{name}' (for {key!r}), which does not exist; "
                                        "fix: copy every file of the checkpoint, or write the directory again")
                    self.files[name] = SafetensorsFile(path / name, scratch)
                if key not in self.files[name].entries:
                    raise LoadError(f"{self.where}: its index puts {key!r} in '{name}', whose header has no such "
                                    "tensor; fix: write the directory again (the index and the files disagree)")
                self.file_of[key] = self.files[name]
        except Exception:
            self.close()
            raise

    def _weight_map(self, path: Path) -> dict[str, str]:
        """``{key: file name}``: from the index, or every key of the directory's one safetensors file."""
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if not indexes:
            singles = sorted(path.glob("*.safetensors"))
            if len(singles) != 1:
                raise LoadError(f"{self.where} has no {INDEX_NAME} and {len(singles)} .safetensors files; fix: pass "
                                f"a directory written by save_pretrained ({INDEX_NAME} + shards, or one {SINGLE_NAME})")
            single = SafetensorsFile(singles[0])  # its header only; reopened below with the shared scratch
            single.close()
            return dict.fromkeys(single.entries, singles[0].name)
        index = path / INDEX_NAME if (path / INDEX_NAME).exists() else indexes[0]
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError("weight_map is not {name: file}")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise LoadError(f"{self.where}: '{index.name}' is not a checkpoint index ({type(error).__name__}: {error}); "
                            "fix: pass a directory written by save_pretrained") from None
        return weight_map

    def keys(self) -> set[str]:
        return set(self.file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file_of[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.file_of[key].dtype(key)

    def problem(self, key: str) -> str | None:
        """None: every file's header was checked when the directory was opened."""
        return None

    def read_into(self, key: str, spec: ShardSpec | None, out: torch.Tensor) -> None:
        """Fill ``out`` with this rank's part of ``key``, from the file the index names."""
        self.file_of[key].read_into(key, spec, out)

    def close(self) -> None:
        for opened in self.files.values():
            opened.close()
        self.files, self.file_of = {}, {}


# ------------------------------------------------------------------------------------------ writing

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from ``5_000_000`` or ``"5MB"`` / ``"5GiB"`` (transformers' spelling of a shard size).

    Raises:
        ConfigError: not a positive size.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(size))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _UNITS or int(match.group(1)) <= 0:
        raise ConfigError(f"max_shard_size={size!r} is not a size; pass bytes (an int) or e.g. '500MB', '5GB', '2GiB'")
    return int(match.group(1)) * _UNITS[unit]


@dataclass(frozen=True)
class Planned:
    """A tensor to write: its key, full shape and dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * _element_size(self.dtype)


def plan_files(tensors: Sequence[Planned], max_bytes: int) -> list[list[Planned]]:
    """Split ``tensors`` (in order) into files of at most ``max_bytes`` each (a larger tensor gets a file of its own).

    Raises:
        ConfigError: a dtype that safetensors cannot store.
    """
    files: list[list[Planned]] = [[]]
    size = 0
    for planned in tensors:
        if planned.dtype not in DTYPE_NAMES:
            raise ConfigError(f"tensor {planned.key!r} is {planned.dtype}, which safetensors cannot store; "
                              "fix: cast the program to a floating or integer dtype first")
        if files[-1] and size + planned.nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(planned)
        size += planned.nbytes
    return files


class DirectoryWriter:
    """Writes a checkpoint directory laid out by :func:`plan_files`: :meth:`write` each tensor in that
    order (the bytes go straight to its file), then :meth:`close` writes the index."""

    def __init__(self, directory: Path, files: list[list[Planned]]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        count = len(files)
        self.names = [SINGLE_NAME] if count == 1 else [SHARD_NAME.format(index=i + 1, count=count) for i in range(count)]
        self.directory, self.files = directory, files
        for stale in [*directory.glob("model-*-of-*.safetensors"), directory / SINGLE_NAME, directory / INDEX_NAME]:
            if stale.name not in self.names and stale.is_file():  # a previous save's files: loaders would mix them in
                stale.unlink()
        self.order = [(position, planned) for position, planned_files in enumerate(files) for planned in planned_files]
        self.next = 0
        self.handle = None
        self.position = -1

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append the next tensor (it must be the next planned key, with the planned shape and dtype)."""
        position, planned = self.order[self.next]
        if key != planned.key or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise ValueError(f"expected {planned} next, got {key!r} {tuple(tensor.shape)} {tensor.dtype}")
        if position != self.position:
            self._open(position)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.handle.write(memoryview(data.numpy()))
        self.next += 1

    def _open(self, position: int) -> None:
        """Close the previous file and start file ``position`` with its header."""
        if self.handle is not None:
            self.handle.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}  # transformers reads the format
        start = 0
        for planned in self.files[position]:
            header[planned.key] = {"dtype": DTYPE_NAMES[planned.dtype], "shape": list(planned.shape),
                                   "data_offsets": [start, start + planned.nbytes]}
            start += planned.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the tensor bytes start 8-byte aligned, as safetensors writes them
        self.handle = open(self.directory / self.names[position], "wb")  # noqa: SIM115 - closed in _open/close
        self.handle.write(struct.pack("<Q", len(text)) + text)
        self.position = position

    def close(self) -> None:
        """Finish the last file and write the index (when there are several files)."""
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.next != len(self.order):
            raise ValueError(f"{len(self.order) - self.next} planned tensors were not written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(p.nbytes for f in self.files for p in f)},
                     "weight_map": {p.key: self.names[i] for i, f in enumerate(self.files) for p in f}}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
