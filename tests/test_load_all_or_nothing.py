"""Loading is all or nothing: every check before the first write, and a failed read changes nothing.

Each case is a checkpoint that used to fail (or load garbage) after part of the program was written:
a safetensors tensor running past the end of the data, byte ranges that are negative or overlap,
a meta or sparse last entry, integer/bool/complex values cast into float parameters, an I/O error
half-way. Every one must raise one line naming the key and leave the program exactly as it was
(a meta-built program still entirely on meta; a real one with its old values). Every source goes
through the same checks: a state dict, a torch.save file, a safetensors file, a checkpoint directory
(index + shard files) and a torch.distributed.checkpoint (DCP) directory.
"""

from __future__ import annotations

import functools
import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn

import tpfx
import tpfx.checkpoint
import tpfx.dcp
import tpfx.safetensors_io
from examples.gpt import GPTModel, small_config
from tpfx.safetensors_io import INDEX_NAME, DirectoryWriter, Planned, plan_files

CONFIG = {"vocab_size": 64, "max_position_embeddings": 16, "n_layers": 1, "n_heads": 4, "d_model": 32, "d_ff": 64,
          "dropout": 0.0}


def _model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(small_config(**CONFIG)).eval()


def _programs() -> dict[str, nn.Module]:
    """A meta-built and a real program (rank 1 of tp=2, inspection), the two ways a load starts."""
    with tpfx.parameters_on_meta():
        meta = GPTModel(small_config(**CONFIG)).eval()
    return {"meta": tpfx.parallelize(meta, tp=2, rank=1, tracer="fx"),
            "real": tpfx.parallelize(_model(seed=7), tp=2, rank=1, tracer="fx")}


@functools.cache
def _refusing_programs() -> dict[str, nn.Module]:
    """:func:`_programs` built once for every load that must be refused: each refusal checks that they
    stay exactly as they were, so the next one starts from the same programs."""
    return _programs()


def _snapshot(gm: nn.Module) -> dict[str, torch.Tensor | str]:
    return {k: "meta" if v.is_meta else v.detach().clone() for k, v in gm.state_dict(keep_vars=True).items()}


def _unchanged(gm: nn.Module, before: dict[str, torch.Tensor | str]) -> bool:
    now = _snapshot(gm)
    return now.keys() == before.keys() and all(
        (isinstance(a, str) and isinstance(b, str)) or (not isinstance(a, str) and not isinstance(b, str)
                                                         and torch.equal(a, b))
        for a, b in ((now[k], before[k]) for k in now))


def _refused(source: object, *named: str) -> None:
    """Loading ``source`` into both programs raises one LoadError line naming ``named``; nothing changes."""
    for kind, gm in _refusing_programs().items():
        before = _snapshot(gm)
        with pytest.raises(tpfx.LoadError) as caught:
            tpfx.load_state_dict(gm, source)
        message = str(caught.value)
        assert "\n" not in message and "fix:" in message, message
        assert all(text in message for text in named), message
        assert _unchanged(gm, before), f"{kind}: the program was changed by a load that raised: {message}"


def _sources(state: dict[str, torch.Tensor], folder: Path) -> dict[str, object]:
    """``state`` as every kind of source: the dict, a torch.save file, a safetensors file, a directory of
    three shard files and an index, and a DCP directory."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    torch.save(state, folder / "model.pt")
    total = sum(v.numel() * v.element_size() for v in state.values())
    writer = DirectoryWriter(folder / "directory", plan_files([Planned(k, tuple(v.shape), v.dtype)
                                                              for k, v in state.items()], max(1, total // 3)))
    for key, value in state.items():
        writer.write(key, value)
    writer.close()
    _dcp_save(state, folder / "dcp")
    return {"dict": state, "torch.save": str(folder / "model.pt"), "safetensors": str(folder / "model.safetensors"),
            "directory": str(folder / "directory"), "dcp": str(folder / "dcp")}


def _dcp_save(state: dict[str, object], folder: Path) -> None:
    """``dcp.save`` in this one process (without its warning that it assumes so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def _rewrite_header(path: Path, change) -> None:
    """Apply ``change(header)`` to a safetensors file's JSON header; the data bytes stay as they are."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    data = change(header, raw[8 + length:])
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _last_key(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def test_a_safetensors_tensor_running_past_the_data_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "short.safetensors"
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(path))
    state: dict[str, str] = {}

    def cut_last(header: dict, data: bytes) -> bytes:  # the header stays inside the file: only sizes disagree
        state["key"] = key = _last_key(header)
        begin, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [begin, begin + (end - begin) // 2]
        return data[:begin + (end - begin) // 2]

    _rewrite_header(path, cut_last)
    _refused(str(path), state["key"], "data_offsets")


@pytest.mark.parametrize("damage", ["negative", "overlapping"])
def test_safetensors_offsets_that_are_negative_or_overlap_are_refused(tmp_path, damage):
    path = tmp_path / f"{damage}.safetensors"
    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(path))
    _refused(str(path), _shift_one_entry(path, damage))


def test_a_damaged_shard_of_a_checkpoint_directory_is_refused_before_anything_is_written(tmp_path):
    folder = Path(_sources(_model().state_dict(), tmp_path)["directory"])
    files = list(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values())
    # the last file with two tensors (one can overlap the other): a loader file by file would load the rest first
    shard = max(name for name in files if files.count(name) > 1)
    assert shard != min(files)
    _refused(str(folder), _shift_one_entry(folder / shard, "overlapping"), shard)


def _shift_one_entry(path: Path, damage: str) -> str:
    """Move one header entry's byte range: the first one before the data, or the last onto the one before it;
    returns its key."""
    state: dict[str, str] = {}

    def shift(header: dict, data: bytes) -> bytes:
        ordered = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        key = ordered[0] if damage == "negative" else ordered[-1]
        begin, end = header[key]["data_offsets"]
        moved = -8 if damage == "negative" else header[ordered[-2]]["data_offsets"][0]  # onto the one before
        header[key]["data_offsets"] = [moved, moved + end - begin]
        state["key"] = key
        return data

    _rewrite_header(path, shift)
    return state["key"]


@pytest.mark.parametrize("layout", ["meta", "sparse"])
def test_a_meta_or_sparse_last_entry_is_refused_from_a_dict_and_a_torch_save_file(tmp_path, layout):
    state = _model().state_dict()
    last = next(reversed(state))
    state[last] = state[last].to("meta") if layout == "meta" else state[last].to_sparse()
    torch.save(state, tmp_path / "model.pt")
    for source in (state, str(tmp_path / "model.pt")):
        _refused(source, repr(last), layout)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_integer_bool_and_complex_values_are_not_cast_into_float_parameters(tmp_path, dtype):
    state = _model().state_dict()
    key = "blocks.0.ffn.fc1.bias"
    state[key] = torch.ones_like(state[key], dtype=dtype)
    wanted = str(dtype).removeprefix("torch.")
    for source in _sources(state, tmp_path).values():
        _refused(source, f"dtype mismatch: {key!r} is {wanted}")


def test_every_source_loads_the_same_shards_and_refuses_the_same_missing_key(tmp_path):
    state = _model().state_dict()
    expected = tpfx.parallelize(_model(), tp=2, rank=1, tracer="fx").state_dict()  # rank 1's part of each tensor
    for kind, source in _sources(state, tmp_path / "whole").items():
        gm = _programs()["meta"]
        tpfx.load_state_dict(gm, source)
        loaded = gm.state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded), kind
    partial = {k: v for k, v in state.items() if k != "ln_f.bias"}
    for source in _sources(partial, tmp_path / "partial").values():
        _refused(source, "missing key(s) 'ln_f.bias'")


def test_a_dcp_entry_that_is_no_tensor_is_refused_naming_the_key(tmp_path):
    state: dict[str, object] = dict(_model().state_dict())
    state["ln_f.bias"] = 3  # DCP pickles what is not a tensor
    _dcp_save(state, tmp_path / "dcp")
    _refused(str(tmp_path / "dcp"), "'ln_f.bias' is a pickled object")
    (tmp_path / "dcp" / ".metadata").write_bytes(b"")
    _refused(str(tmp_path / "dcp"), "cannot read its .metadata")


def test_float_checkpoints_of_another_precision_still_load():
    state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in _model().state_dict().items()}
    gm = _programs()["meta"]
    tpfx.load_state_dict(gm, state)
    assert gm.ln_f.weight.dtype == torch.float32 and torch.equal(gm.ln_f.weight, state["ln_f.weight"].float())


READERS = {"torch.save": tpfx.checkpoint._TensorSource, "safetensors": tpfx.safetensors_io.SafetensorsFile,
           "directory": tpfx.safetensors_io.SafetensorsFile, "dcp": tpfx.dcp.DcpDirectory}


@pytest.mark.parametrize("kind", list(READERS))
def test_a_read_that_fails_half_way_leaves_the_program_as_it_was(tmp_path, monkeypatch, kind):
    source = _sources(_model().state_dict(), tmp_path)[kind]
    cls = READERS[kind]
    original, calls = cls.read_into, []

    def failing(self, key, spec, out):  # the disk goes away after a few tensors
        calls.append(key)
        if len(calls) == 6:
            raise OSError(5, "Input/output error")
        return original(self, key, spec, out)

    monkeypatch.setattr(cls, "read_into", failing)
    for gm in _programs().values():
        calls.clear()
        before = _snapshot(gm)
        with pytest.raises(tpfx.LoadError, match="Input/output error.*unchanged"):
            tpfx.load_state_dict(gm, source)
        assert _unchanged(gm, before)
    monkeypatch.setattr(cls, "read_into", original)
    gm = _programs()["meta"]
    tpfx.load_state_dict(gm, source)  # the same file loads once the disk is back
    assert not any(t.is_meta for t in gm.state_dict().values())
