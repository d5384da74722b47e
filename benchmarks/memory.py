"""``python -m benchmarks.memory``: peak resident memory per rank when a >= 1 GB model is loaded at tp=2.

A GPT of about 1.23 GB of fp32 parameters is saved once as safetensors. Then two paths run, each in a
fresh pair of gloo processes (tp=2), and each rank reports its peak resident memory (``VmHWM``):

* tpfx:  build under ``tpfx.parameters_on_meta()`` -> ``tpfx.parallelize`` -> ``tpfx.load_state_dict(gm, file)``,
  in the default mode (QKV and fc1 sharded) and in ``mode="megatron"`` (all four block linears sharded)
* naive: build the full model -> ``model.load_state_dict(safetensors.torch.load_file(file))`` -> ``tpfx.parallelize``

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


def _tpfx_path(rank: int, world_size: int, path: str, config: GPTConfig, mode: str) -> dict:
    start = time.perf_counter()
    with tpfx.parameters_on_meta():
        model = GPTModel(config).eval()
    gm = tpfx.parallelize(model, tp=world_size, mode=mode)
    del model  # its buffers (the causal masks) were copied into gm; drop them as a user would
    tpfx.load_state_dict(gm, path)
    return _finish(gm, time.perf_counter() - start)


def _naive_path(rank: int, world_size: int, path: str, config: GPTConfig) -> dict:
    from safetensors.torch import load_file

    start = time.perf_counter()
    model = GPTModel(config).eval()
    model.load_state_dict(load_file(path))
    gm = tpfx.parallelize(model, tp=world_size)
    del model  # the full model is dropped once the shards are cut; the peak has been paid
    return _finish(gm, time.perf_counter() - start)


def run(config: GPTConfig, folder: Path) -> dict:
    """Write the checkpoint, run both paths, and return every figure (bytes and seconds)."""
    path = str(folder / "model.safetensors")
    [model_bytes] = launch(_write_checkpoint, 1, path, config, timeout_s=900)
    idle = idle_torch_rss()
    paths = {"tpfx": launch(_tpfx_path, TP, path, config, "gather", timeout_s=900),
             "tpfx megatron": launch(_tpfx_path, TP, path, config, "megatron", timeout_s=900),
             "naive": launch(_naive_path, TP, path, config, timeout_s=900)}
    reference = paths["naive"][0]["logits_head"]
    ranks = {}
    for name, per_rank in paths.items():
        rows = []
        for rank, figures in enumerate(per_rank):
            bound = BOUND_FACTOR * figures["own_param_bytes"] + idle
            logits = figures.pop("logits_head")
            rows.append({**figures, "rank": rank, "bound": bound, "within_bound": figures["peak_rss"] <= bound,
                         "peak_over_own_params": figures["peak_rss"] / figures["own_param_bytes"],
                         "logits_max_diff_vs_naive_rank0": (logits - reference).abs().max().item()})
        ranks[name] = rows
    return {"machine": machine(), "config": dataclasses.asdict(config), "tp": TP,
            "model_param_bytes": model_bytes, "checkpoint_bytes": Path(path).stat().st_size,
            "idle_torch_rss": idle, "bound": f"peak_rss <= {BOUND_FACTOR} * own_param_bytes + idle_torch_rss",
            "ranks": ranks}


def markdown(results: dict) -> str:
    """The figures as a markdown table (MB = 10^6 bytes)."""
    mb = 1e6
    config = results["config"]
    lines = [f"Model: example GPT, {config['n_layers']} layers, d_model {config['d_model']}, vocab "
             f"{config['vocab_size']}: {results['model_param_bytes'] / mb:.0f} MB fp32 parameters; tp={results['tp']}; "
             f"idle process with torch imported: {results['idle_torch_rss'] / mb:.0f} MB RSS.", "",
             "| path | rank | own params MB | peak RSS MB | bound MB (1.3 × params + idle) | within | "
             "peak / own params | build + load s | logits diff |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name, rows in results["ranks"].items():
        for row in rows:
            lines.append(f"| {name} | {row['rank']} | {row['own_param_bytes'] / mb:.0f} | {row['peak_rss'] / mb:.0f} | "
                         f"{row['bound'] / mb:.0f} | {'yes' if row['within_bound'] else 'NO'} | "
                         f"{row['peak_over_own_params']:.2f} | {row['build_and_load_s']:.1f} | "
                         f"{row['logits_max_diff_vs_naive_rank0']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Run the memory benchmark, write ``memory.json``, print the table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    parser.add_argument("--layers", type=int, default=CONFIG.n_layers, help="GPT layers (16: 1.23 GB)")
    options = parser.parse_args(argv)
    config = dataclasses.replace(CONFIG, n_layers=options.layers)
    with tempfile.TemporaryDirectory(prefix="tpfx-memory-") as folder:
        results = run(config, Path(folder))
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "memory.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {options.out / 'memory.json'}")
    print(markdown(results))


if __name__ == "__main__":
    main()
