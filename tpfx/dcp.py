"""The program's state dict for ``torch.distributed.checkpoint`` (DCP): each rank saves and loads its pieces.

::

    import torch.distributed.checkpoint as dcp
    dcp.save(tpfx.dcp_state_dict(gm), checkpoint_id="ckpt/step100")      # every rank writes its shards
    dcp.load(tpfx.dcp_state_dict(gm4), checkpoint_id="ckpt/step100")     # a program of any tp, in place
    dcp.load(model.state_dict(), checkpoint_id="ckpt/step100")            # the single-device model, one process

The keys and full shapes are the single-device model's, so DCP's metadata describes the model, not
the parallel layout: a checkpoint loads into a program of another tp (DCP reads the overlap of the
saved chunks with each rank's), into the single-device model (``dcp.load`` without a process group,
or ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save``), and from a DCP save of the
single-device model. No format of tpfx's own is involved.

``dcp.load`` writes into the program as it reads, so a checkpoint that does not fit (a missing key,
another shape) leaves it half loaded. ``tpfx.load_state_dict(gm, "ckpt/step100")`` reads the same
directory all or nothing (:class:`DcpDirectory`): keys, shapes and dtypes are checked against DCP's
metadata before the first read, and every read lands in a staged tensor before the first write. It
runs without collectives (each rank reads its own blocks).

A sharded parameter is presented to DCP as a :class:`RankPieces`: a tensor of the full shape that
holds no storage of its own and implements DCP's checkpointable protocol (``__create_write_items__``,
``__create_chunk_list__``, ``__get_tensor_shard__``): its chunks are the blocks of the rank's
:class:`tpfx.layers.ShardSpec`, each a view of the live parameter. A DTensor cannot say this in
general: a rank of a fused QKV weight in megatron mode holds several separate blocks of the full
tensor. Replicated tensors are plain tensors (DCP writes one copy). Saving reads the program's
tensors and loading writes into them, through the views.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from tpfx.checkpoint import _targets
from tpfx.errors import LoadError, one_line
from tpfx.layers import ShardSpec


class RankPieces(torch.Tensor):
    """A full-shape stand-in for a rank's part of a sharded tensor, for DCP only (it has no storage).

    ``local`` is the rank's tensor (a parameter of the program); ``spec`` says which blocks of the
    full tensor it holds. Any other use of it as a tensor raises.
    """

    local: torch.Tensor
    spec: ShardSpec

    @staticmethod
    def __new__(cls, local: torch.Tensor, spec: ShardSpec) -> RankPieces:
        full = spec.full_shape(tuple(local.shape))
        made = torch.Tensor._make_wrapper_subclass(cls, full, dtype=local.dtype, device=local.device)
        made.local, made.spec = local, spec
        return made

    def _chunks(self) -> list[tuple[ChunkStorageMetadata, torch.Tensor]]:
        """Each block: where it lies in the full tensor, and the view of the local tensor that holds it."""
        chunks = []
        for local_start, full_start, length in self.spec.pieces():
            view = self.local.narrow(self.spec.dim, local_start, length)
            offsets = [0] * self.local.dim()
            offsets[self.spec.dim] = full_start
            chunks.append((ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=view.shape), view))
        return chunks

    def __create_write_items__(self, fqn: str, object: Any) -> list[WriteItem]:  # noqa: A002 - DCP's name
        properties = TensorProperties.create_from_tensor(self.local)
        return [WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=self.shape))
                for chunk, _ in self._chunks()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [chunk for chunk, _ in self._chunks()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for chunk, view in self._chunks():
            if chunk.offsets == index.offset:
                return view
        raise ValueError(f"{index.fqn}: this rank holds no block at offset {tuple(index.offset or ())}")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206 - torch's protocol
        raise TypeError(f"{func} on a tpfx.dcp.RankPieces: it stands for a rank's blocks of a sharded tensor "
                        "and is only for torch.distributed.checkpoint; use the program's own parameters instead")

    def __repr__(self) -> str:  # type: ignore[override]
        return f"RankPieces(full shape {tuple(self.shape)}, blocks {self.spec.ranges} of dim {self.spec.dim})"


def dcp_state_dict(gm: nn.Module, *, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The program's state for ``torch.distributed.checkpoint.save`` and ``load``, under the single-device keys.

    Sharded tensors are :class:`RankPieces` (the rank's blocks of the full tensor, as views of its
    parameters); replicated ones are the program's tensors, detached. Loading with ``dcp.load``
    writes into the program's parameters in place, so optimizers and other call forms see the new
    values. Tied keys name the same tensor.

    Args:
        gm: the program from :func:`tpfx.parallelize` (any ``nn.Module``: without a plan, its
            layers' ``shard_spec`` say what is sharded).
        device: where tensors still on meta (a program built under :func:`tpfx.parameters_on_meta`)
            get memory, uninitialized, so that ``dcp.load`` can fill them.

    Returns:
        ``{key: tensor}`` with every key of the original model's ``state_dict()``.
    """
    state: dict[str, torch.Tensor] = {}
    for target in _targets(gm):
        tensor = target.tensor
        if tensor.is_meta:
            tensor = _materialize(tensor, torch.device(device))
        value = tensor.detach() if target.spec is None else RankPieces(tensor.detach(), target.spec)
        state.update(dict.fromkeys(target.keys, value))
    return state


def _materialize(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Give a meta tensor storage on ``device`` in place (the same object stays in every module)."""
    made = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device=device)
    if isinstance(tensor, nn.Parameter):
        made = type(tensor)(made, requires_grad=tensor.requires_grad)
    torch.utils.swap_tensors(tensor, made)
    return tensor


class _MetadataOnce(dcp.FileSystemReader):
    """A DCP directory reader that reads its metadata file once (``dcp.load`` asks for it at every call)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class DcpDirectory:
    """A ``torch.distributed.checkpoint`` directory as a source of :func:`tpfx.load_state_dict`.

    Keys, full shapes and dtypes come from DCP's metadata (read when it is opened, so every check runs
    before the first read); ``read_into`` loads this rank's blocks of one tensor with ``dcp.load``
    without collectives (``no_dist``), through the same :class:`RankPieces` a DCP load of
    :func:`dcp_state_dict` uses.
    """

    def __init__(self, path: Path) -> None:
        self.where = f"torch.distributed.checkpoint directory '{path}'"
        self.reader = _MetadataOnce(path)
        try:
            self.entries = self.reader.read_metadata().state_dict_metadata
        except Exception as error:  # a missing, truncated or foreign .metadata file: pickle raises anything
            raise LoadError(f"{self.where}: cannot read its .metadata ({one_line(error)}); fix: pass a directory "
                            "written by dcp.save(tpfx.dcp_state_dict(gm), checkpoint_id=...) and copied whole") from None

    def keys(self) -> set[str]:
        return set(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        entry = self.entries[key]
        return tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else ()

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].properties.dtype  # asked only of tensors (problem() is None)

    def problem(self, key: str) -> str | None:
        """A saved object that is no tensor (DCP stores other objects as pickled bytes)."""
        if isinstance(self.entries[key], TensorStorageMetadata):
            return None
        return f"{key!r} is a pickled object in the DCP checkpoint, not a tensor"

    def read_into(self, key: str, spec: ShardSpec | None, out: torch.Tensor) -> None:
        """Fill ``out`` with this rank's part (``spec``; None: the whole tensor) of ``key``."""
        value = out if spec is None else RankPieces(out, spec)
        with warnings.catch_warnings():  # that no_dist reads in one process is what we ask for, not news
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load({key: value}, storage_reader=self.reader, no_dist=True)

    def close(self) -> None:
        self.entries = {}
