"""``python -m benchmarks.compiled [--quick] [--out DIR]``: step time of torch.compile'd programs vs eager.

On 2 gloo ranks (tp=2), the example GPT at the medium size (``--quick``: the small one, fewer rounds):
tpfx in gather and megatron mode, eager and ``torch.compile(program, fullgraph=True)`` (Inductor), and
DTensor's megatron plan eager and compiled. Each variant's loss is checked against the single-device
loss before timing; the variants run interleaved with a barrier before each step (the method of
:mod:`benchmarks.step_time`), and the parent reports, per step, the slower rank's time, then the median.

The targets (from the compile issue): tpfx compiled <= 0.8 x DTensor compiled (megatron) and
tpfx compiled <= 1.0 x tpfx eager, at the medium size. Writes ``compiled.json`` and ``compiled.md``.
"""

from __future__ import annotations


import torch
import torch.nn as nn

import tpfx
from benchmarks import results
from benchmarks.dtensor_baseline import dtensor_gpt
from benchmarks.step_time import MEDIUM, SMALL, ModelSize, _time_rounds, slowest_rank_medians_ms, training_step
from examples.gpt import GPTModel
from tpfx.launch import launch

TARGETS = {"tpfx megatron compiled / dtensor megatron compiled": 0.8,
           "tpfx megatron compiled / tpfx megatron": 1.0, "tpfx gather compiled / tpfx gather": 1.0}


def _variants(reference: GPTModel) -> dict[str, nn.Module]:
    gather = tpfx.parallelize(reference)
    sites = tuple(site.module_path for site in gather.tpfx_report.sites)
    megatron = tpfx.parallelize(reference, mode="megatron")
    dtensor = dtensor_gpt(reference, mode="megatron", site_paths=sites)
    return {"single": reference, "tpfx gather": gather, "tpfx megatron": megatron, "dtensor megatron": dtensor,
            "tpfx gather compiled": torch.compile(gather, fullgraph=True),
            "tpfx megatron compiled": torch.compile(megatron, fullgraph=True),
            "dtensor megatron compiled": torch.compile(dtensor)}


def rank_worker(rank: int, world_size: int, size: ModelSize, warmup: int, rounds: int) -> dict:
    """Inside a rank: build, check the loss of, warm up (compile) and time every variant."""
    torch.manual_seed(0)
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1  # the ranks share the cores
    reference = GPTModel(size.config()).train()
    variants = _variants(reference)
    input_ids = torch.randint(0, size.vocab_size, (size.batch, size.seq), generator=torch.Generator().manual_seed(1))
    losses = {name: training_step(model, input_ids) for name, model in variants.items()}
    for _ in range(warmup - 1):
        for model in variants.values():
            training_step(model, input_ids)
    times = _time_rounds(variants, input_ids, rounds)
    return {"loss_diff": {name: abs(loss - losses["single"]) for name, loss in losses.items()}, "times": times}


def summarize(per_rank: list[dict], size: ModelSize) -> dict:
    """Median of the slower rank per step; the ratios the targets name."""
    medians = slowest_rank_medians_ms(per_rank)
    ratios = {}
    for label, target in TARGETS.items():
        numerator, denominator = label.split(" / ")
        ratios[label] = {"ratio": medians[numerator] / medians[denominator], "target": target}
    return {"size": size.name, "median_ms": medians, "ratios": ratios,
            "max_loss_diff": {name: max(r["loss_diff"][name] for r in per_rank) for name in medians}}


def markdown(summary: dict, machine: dict) -> str:
    """The table the README quotes."""
    lines = [f"Size: {summary['size']}; machine: {machine}", "", "| variant | median ms | loss diff |",
             "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.1f} | {summary['max_loss_diff'][name]:.1e} |" for name, ms in summary["median_ms"].items()]
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|---|"]
    lines += [f"| {label} | {r['ratio']:.2f} | <= {r['target']} | {'yes' if r['ratio'] <= r['target'] else 'no'} |"
              for label, r in summary["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write compiled.json / compiled.md under ``--out``."""
    options = results.quick_and_out_options(argv, prog="python -m benchmarks.compiled", doc=__doc__,
                                            quick_help="the small GPT, fewer rounds (a smoke run)")
    size, warmup, rounds = (SMALL, 3, 10) if options.quick else (MEDIUM, 4, 30)
    summary = summarize(launch(rank_worker, 2, size, warmup, rounds, timeout_s=3600), size)
    results.write_summary(options.out, "compiled-quick" if options.quick else "compiled", summary,
                          markdown(summary, results.machine()))


if __name__ == "__main__":
    main()
