"""``python -m benchmarks.memory``: peak resident memory per rank when a >= 1 GB model is loaded at tp=2.

A GPT of about 1.23 GB of fp32 parameters is saved once as safetensors. Then two paths run, each in a
fresh pair of gloo processes (tp=2), and each rank reports its peak resident memory (``VmHWM``):

* tpfx:  build under ``tpfx.parameters_on_meta()`` -> ``tpfx.parallelize`` -> ``tpfx.load_state_dict(gm, file)``,
  in the default mode (QKV and fc1 sharded) and in ``mode="megatron"`` (all four block linears sharded)
* naive: build the full model -> ``model.load_state_dict(safetensors.torch.load_file(file))`` -> ``tpfx.parallelize``

``python -m benchmarks.memory --checkpoint directory`` measures the checkpoint directories instead:
the model is written by ``tpfx.save_pretrained`` as ``model.safetensors.index.json`` and at least 3
files (``--shard-mb``, default 400), each rank loads its slices from the directory in both modes,
and then every rank takes part in ``tpfx.save_pretrained`` of the program into a new directory (rank
0 gathers and writes, a tensor at a time); the peak after loading and the peak after saving are both
reported, and the saved directory must equal the original byte for byte (tensor for tensor).
Results go to ``benchmarks/results/memory_directory.json``.

The bound of issue 6: peak RSS <= 1.3 x (the rank's own parameter bytes) + the RSS of an idle process
that has imported torch. Both paths end with one forward pass whose logits must agree, so the figures
are those of programs that work. Results go to ``benchmarks/results/memory.json``; a markdown table
is printed. Linux only (it reads ``/proc/self/status``). About a minute on 2 cores, 8 GB of memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import tpfx
from benchmarks.results import machine
from examples.gpt import GPTConfig, GPTModel
from tpfx.launch import launch

BOUND_FACTOR = 1.3
TP = 2
# GPT-2-sized vocabulary, 16 layers of width 1024: 307 M parameters, 1.23 GB in fp32
CONFIG = GPTConfig(vocab_size=50304, max_position_embeddings=1024, n_layers=16, n_heads=16, d_model=1024,
                   d_ff=4096, dropout=0.0)


def memory_status() -> dict[str, int]:
    """This process's resident memory now (``rss``) and at its peak (``peak_rss``), in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024  # reported in kB
    return {"rss": fields["VmRSS"], "peak_rss": fields["VmHWM"]}


def idle_torch_rss() -> int:
    """Resident bytes of a fresh Python process that has imported torch and does nothing else."""
    code = ("import torch, json; from benchmarks.memory import memory_status; "
            "print(json.dumps(memory_status()))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout)["rss"]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _write_checkpoint(rank: int, world_size: int, path: str, config: GPTConfig) -> int:
    """Save a seeded model as safetensors (in its own process, so the parent stays small)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = GPTModel(config)
    save_file(model.state_dict(), path)
    return _tensor_bytes(model.parameters())


def _finish(gm: nn.Module, build_and_load_s: float) -> dict:
    """The rank's figures, after one forward pass that proves the program works."""
    ids = torch.arange(8).view(1, 8)
    with torch.no_grad():
        logits, _ = gm(ids)
    return {"own_param_bytes": _tensor_bytes(gm.parameters()), "buffer_bytes": _tensor_bytes(gm.buffers()),
            "build_and_load_s": build_and_load_s, "logits_head": logits[0, :, :16].clone(), **memory_status()}


def _tpfx_path(rank: int, world_size: int, path: str, config: GPTConfig, mode: str, save_to: str | None = None) -> dict:
    start = time.perf_counter()
    with tpfx.parameters_on_meta():
        model = GPTModel(config).eval()
    gm = tpfx.parallelize(model, tp=world_size, mode=mode)
    del model  # its buffers (the causal masks) were copied into gm; drop them as a user would
    tpfx.load_state_dict(gm, path)
    figures = _finish(gm, time.perf_counter() - start)
    if save_to is not None:  # then write the program back out as a directory, from rank 0
        start = time.perf_counter()
        tpfx.save_pretrained(gm, save_to, max_shard_size=_shard_bytes(path))
        figures |= {"save_s": time.perf_counter() - start, "peak_rss_after_save": memory_status()["peak_rss"]}
    return figures


def _shard_bytes(directory: str) -> int:
    """The largest file of a checkpoint directory: the shard size to save with, so the layout repeats."""
    return max(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def _write_directory(rank: int, world_size: int, path: str, config: GPTConfig, shard_bytes: int) -> int:
    """Save a seeded model as a checkpoint directory with tpfx.save_pretrained (nothing sharded: no gathering)."""
    torch.manual_seed(0)
    model = GPTModel(config)
    tpfx.save_pretrained(model, path, max_shard_size=shard_bytes)
    return _tensor_bytes(model.parameters())


def _same_directories(first: Path, second: Path) -> bool:
    """Whether two checkpoint directories hold the same tensors (read a tensor at a time)."""
    from tpfx.safetensors_io import SafetensorsDirectory

    a, b = SafetensorsDirectory(first), SafetensorsDirectory(second)
    try:
        if a.keys() != b.keys():
            return False
        for key in a.keys():
            left, right = (torch.empty(source.shape(key), dtype=source.file_of[key].entries[key].dtype)
                           for source in (a, b))
            a.read_into(key, None, left)
            b.read_into(key, None, right)
            if not torch.equal(left, right):
                return False
        return True
    finally:
        a.close()
        b.close()


def _naive_path(rank: int, world_size: int, path: str, config: GPTConfig) -> dict:
    from safetensors.torch import load_file

    start = time.perf_counter()
    model = GPTModel(config).eval()
    model.load_state_dict(load_file(path))
    gm = tpfx.parallelize(model, tp=world_size)
    del model  # the full model is dropped once the shards are cut; the peak has been paid
    return _finish(gm, time.perf_counter() - start)


def run(config: GPTConfig, folder: Path, *, checkpoint: str = "file", shard_bytes: int = 400 * 10**6) -> dict:
    """Write the checkpoint, run the paths, and return every figure (bytes and seconds).

    ``checkpoint="file"``: one safetensors file, tpfx (both modes) against the naive path.
    ``checkpoint="directory"``: a save_pretrained directory (files of at most ``shard_bytes``), tpfx
    (both modes) loading it and saving it again.
    """
    idle = idle_torch_rss()
    if checkpoint == "directory":
        path = folder / "model"
        [model_bytes] = launch(_write_directory, 1, str(path), config, shard_bytes, timeout_s=900)
        paths = {name: launch(_tpfx_path, TP, str(path), config, mode, str(folder / f"saved_{mode}"), timeout_s=900)
                 for name, mode in DIRECTORY_PATHS.items()}
        extra = directory_checks(path, {mode: folder / f"saved_{mode}" for mode in DIRECTORY_PATHS.values()})
        checkpoint_bytes = sum(p.stat().st_size for p in path.iterdir())
    else:
        path = folder / "model.safetensors"
        [model_bytes] = launch(_write_checkpoint, 1, str(path), config, timeout_s=900)
        paths = {"tpfx": launch(_tpfx_path, TP, str(path), config, "gather", timeout_s=900),
                 "tpfx megatron": launch(_tpfx_path, TP, str(path), config, "megatron", timeout_s=900),
                 "naive": launch(_naive_path, TP, str(path), config, timeout_s=900)}
        extra, checkpoint_bytes = {"reference": "naive"}, path.stat().st_size
    return {"machine": machine(), "config": dataclasses.asdict(config), "tp": TP, "checkpoint": checkpoint,
            "model_param_bytes": model_bytes, "checkpoint_bytes": checkpoint_bytes,
            "idle_torch_rss": idle, "bound": f"peak_rss <= {BOUND_FACTOR} * own_param_bytes + idle_torch_rss",
            "ranks": rows(paths, idle, extra["reference"]), **extra}


DIRECTORY_PATHS = {"tpfx directory": "gather", "tpfx directory megatron": "megatron"}  # name: mode


def directory_checks(original: Path, saved: dict[str, Path]) -> dict:
    """The directory run's facts: how many files the original has, and whether each save equals it."""
    return {"reference": "tpfx directory", "files": len(list(original.glob("*.safetensors"))),
            "saved_equal": {mode: _same_directories(original, folder) for mode, folder in saved.items()}}


def rows(paths: dict[str, list[dict]], idle: int, reference: str) -> dict[str, list[dict]]:
    """Each path's per-rank figures with the bound, the ratio and the logits' difference from ``reference``'s rank 0."""
    expected = paths[reference][0]["logits_head"]
    table = {}
    for name, per_rank in paths.items():
        table[name] = []
        for rank, figures in enumerate(per_rank):
            bound = BOUND_FACTOR * figures["own_param_bytes"] + idle
            kept = {k: v for k, v in figures.items() if k != "logits_head"}
            table[name].append({**kept, "rank": rank, "bound": bound, "within_bound": figures["peak_rss"] <= bound,
                                "peak_over_own_params": figures["peak_rss"] / figures["own_param_bytes"],
                                "logits_max_diff_vs_reference": (figures["logits_head"] - expected).abs().max().item()})
    return table


def markdown(results: dict) -> str:
    """The figures as a markdown table (MB = 10^6 bytes)."""
    mb = 1e6
    config = results["config"]
    saved = "saved_equal" in results  # the directory run: also the peak after save_pretrained
    source = (f"a save_pretrained directory of {results['files']} files" if saved else "one safetensors file")
    lines = [f"Model: example GPT, {config['n_layers']} layers, d_model {config['d_model']}, vocab "
             f"{config['vocab_size']}: {results['model_param_bytes'] / mb:.0f} MB fp32 parameters, loaded from "
             f"{source}; tp={results['tp']}; idle process with torch imported: "
             f"{results['idle_torch_rss'] / mb:.0f} MB RSS.", "",
             "| path | rank | own params MB | peak RSS MB | bound MB (1.3 × params + idle) | within | "
             "peak / own params | build + load s | logits diff vs " + results.get("reference", "naive") + " rank 0 |"
             + (" peak after save_pretrained MB | save s |" if saved else ""),
             "|---|---:|---:|---:|---:|---|---:|---:|---:|" + ("---:|---:|" if saved else "")]
    for name, rows in results["ranks"].items():
        for row in rows:
            diff = row.get("logits_max_diff_vs_reference", row.get("logits_max_diff_vs_naive_rank0"))
            lines.append(f"| {name} | {row['rank']} | {row['own_param_bytes'] / mb:.0f} | {row['peak_rss'] / mb:.0f} | "
                         f"{row['bound'] / mb:.0f} | {'yes' if row['within_bound'] else 'NO'} | "
                         f"{row['peak_over_own_params']:.2f} | {row['build_and_load_s']:.1f} | {diff:.1e} |"
                         + (f" {row['peak_rss_after_save'] / mb:.0f} | {row['save_s']:.1f} |" if saved else ""))
    if saved:
        equal = ", ".join(f"{mode}: {'yes' if same else 'NO'}" for mode, same in results["saved_equal"].items())
        lines += ["", f"Saved directory equals the original, tensor for tensor: {equal}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the memory benchmark, write ``memory.json`` (or ``memory_directory.json``), print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    parser.add_argument("--layers", type=int, default=CONFIG.n_layers, help="GPT layers (16: 1.23 GB)")
    parser.add_argument("--checkpoint", choices=("file", "directory"), default="file",
                        help="file: one safetensors file, against the naive path; directory: a save_pretrained "
                             "directory (index + shards), loaded and saved again")
    parser.add_argument("--shard-mb", type=int, default=400, help="largest file of the directory, in MB (10^6 bytes)")
    options = parser.parse_args(argv)
    config = dataclasses.replace(CONFIG, n_layers=options.layers)
    with tempfile.TemporaryDirectory(prefix="tpfx-memory-") as folder:
        results = run(config, Path(folder), checkpoint=options.checkpoint, shard_bytes=options.shard_mb * 10**6)
    options.out.mkdir(parents=True, exist_ok=True)
    name = "memory.json" if options.checkpoint == "file" else "memory_directory.json"
    (options.out / name).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {options.out / name}")
    print(markdown(results))


if __name__ == "__main__":
    main()
