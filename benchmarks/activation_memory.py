"""``python -m benchmarks.activation_memory``: peak activation memory per rank, megatron mode with and without
sequence parallelism, measured in real gloo processes.

Each rank runs one training step (forward + backward, train mode, dropout on) of the example GPT after a
warm-up step (so gradients and buffers already exist and are reused), under ``torch.profiler`` with
memory profiling: every allocation and free of the step is recorded in order, and the peak of the running
sum is the step's peak activation memory on that rank (everything the step allocates above what was
alive before it: saved activations, masks, transient buffers of backward). Beside it: the bytes autograd
saves for backward in the real run (each storage once), and tpfx's own figure for the same call
(:func:`tpfx.passes.activation_memory.activation_bytes`, fake tensors), so the dump's memory line can be
checked against a real run. The figures are per rank, the same on every rank; rank 0's are reported.
Results go to ``benchmarks/results/activation_memory.json``; a markdown table is printed. About a
minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef

import tpfx
from benchmarks.results import machine
from examples.gpt import GPTConfig, GPTModel
from tpfx.launch import launch
from tpfx.passes.activation_memory import activation_bytes

CONFIG = GPTConfig(vocab_size=512, max_position_embeddings=512, n_layers=4, n_heads=8, d_model=256, d_ff=1024,
                   dropout=0.1)
BATCH, SEQ = 4, 256


def peak_step_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Peak of the bytes allocated (minus freed) during one forward + backward, from the profiler's record."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        _, loss = model(ids, labels=ids)
        loss.backward()
    # one record per allocation (+bytes) and free (-bytes), in the order they happened
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                      and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    live = peak = 0
    for record in records:
        live += record.nbytes()
        peak = max(peak, live)
    return peak


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors one real forward saves for backward (parameters and buffers left out)."""
    held = {StorageWeakRef(t.untyped_storage()).cdata for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(tensor.untyped_storage()).cdata
        if key not in held:
            storages.setdefault(key, tensor.untyped_storage().nbytes())
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(ids, labels=ids)
    del loss
    return sum(storages.values())


def _rank(rank: int, world_size: int, sequence_parallel: bool | None) -> dict[str, int]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPTModel(CONFIG).train()
    program = model if sequence_parallel is None else tpfx.parallelize(
        model, tp=world_size, mode="megatron", sequence_parallel=sequence_parallel)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    _, loss = program(ids, labels=ids)  # warm-up: gradients exist from here on
    loss.backward()
    program.zero_grad(set_to_none=False)
    torch.manual_seed(2)
    peak = peak_step_bytes(program, ids)
    program.zero_grad(set_to_none=False)
    result = {"peak_step_bytes": peak, "saved_bytes": saved_bytes(program, ids)}
    if sequence_parallel is not None:
        result["tpfx_estimate_bytes"] = activation_bytes(program, {"input_ids": ids, "labels": ids}, tp=world_size)
    return result


def run(tp: int = 2) -> dict[str, object]:
    """Measure single device, megatron, and megatron + sequence parallel at ``tp``; rank 0's figures."""
    figures = {"single device": launch(_rank, 1, None)[0],
               f"megatron tp={tp}": launch(_rank, tp, False)[0],
               f"megatron + sequence parallel tp={tp}": launch(_rank, tp, True)[0]}
    return {"machine": machine(), "model": {"layers": CONFIG.n_layers, "d_model": CONFIG.d_model,
                                            "heads": CONFIG.n_heads, "d_ff": CONFIG.d_ff,
                                            "vocab": CONFIG.vocab_size, "batch": BATCH, "seq": SEQ,
                                            "dropout": CONFIG.dropout}, "tp": tp, "per_rank": figures}


def markdown(result: dict) -> str:
    """The figures as a table (MB = 2**20 bytes)."""
    rows = ["| variant | peak activation memory per rank (MB) | saved for backward (MB) | tpfx's figure (MB) |",
            "|---|---:|---:|---:|"]
    for label, figures in result["per_rank"].items():
        estimate = figures.get("tpfx_estimate_bytes")
        rows.append(f"| {label} | {figures['peak_step_bytes'] / 2**20:.1f} | {figures['saved_bytes'] / 2**20:.1f} | "
                    f"{estimate / 2**20:.1f} |" if estimate is not None else
                    f"| {label} | {figures['peak_step_bytes'] / 2**20:.1f} | {figures['saved_bytes'] / 2**20:.1f} | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Run, print the table, write ``activation_memory.json``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.activation_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    options = parser.parse_args(argv)
    result = run(options.tp)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "activation_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
