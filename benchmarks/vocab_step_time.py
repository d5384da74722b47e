"""``python -m benchmarks.vocab_step_time [--quick] [--out DIR]``: step time with the vocabulary split (and the sequence).

On 2 gloo ranks (tp=2), the example GPT at the small and medium sizes of :mod:`benchmarks.step_time`
(``--quick``: the small one, fewer rounds), one training step (forward + backward, the loss computed in
the model) of:

* ``megatron+vocab``: tpfx ``parallelize(model, mode="megatron", vocab_parallel=True, logits="sharded")``,
  the hand-written equivalent (:mod:`benchmarks.handwritten_vocab`) and DTensor (``ColwiseParallel`` /
  ``RowwiseParallel`` with the embedding and head split by vocabulary, ``loss_parallel``;
  :func:`benchmarks.dtensor_baseline.dtensor_vocab_gpt`);
* ``megatron+vocab+sp``: the same three with sequence parallelism (tpfx ``sequence_parallel=True``,
  DTensor ``SequenceParallel``);
* for scale: the single device and tpfx ``megatron`` with the vocabulary whole.

Every variant returns this rank's logits (V/tp columns) and never gathers them. Each variant's loss is
checked against the single-device loss before timing; the variants run interleaved with a barrier before
each step, and the parent reports, per step, the slower rank's time, then the median (the method of
:mod:`benchmarks.step_time`). Ratios are to tpfx of the same layout, in the same run. Writes
``vocab_step_time.json`` and ``vocab_step_time.md`` (``--quick``: ``vocab_step_time-quick.*``).
"""

from __future__ import annotations


import torch
import torch.nn as nn

import tpfx
from benchmarks import results
from benchmarks.dtensor_baseline import dtensor_vocab_gpt
from benchmarks.handwritten_vocab import HandwrittenVocabGPT
from benchmarks.step_time import MEDIUM, SMALL, ModelSize, _time_rounds, slowest_rank_medians_ms, training_step
from examples.gpt import GPTModel
from tpfx.launch import launch

LAYOUTS = {"megatron+vocab": False, "megatron+vocab+sp": True}  # layout -> sequence parallel


def build_variants(reference: GPTModel) -> dict[str, nn.Module]:
    """Every program to time, by label (``"single"``, ``"tpfx megatron"``, ``"dtensor megatron+vocab+sp"``, ...)."""
    variants: dict[str, nn.Module] = {"single": reference,
                                      "tpfx megatron": tpfx.parallelize(reference, mode="megatron")}
    for layout, sequence_parallel in LAYOUTS.items():
        variants[f"tpfx {layout}"] = tpfx.parallelize(reference, mode="megatron", vocab_parallel=True,
                                                      sequence_parallel=sequence_parallel, logits="sharded")
        variants[f"handwritten {layout}"] = HandwrittenVocabGPT(reference, sequence_parallel=sequence_parallel)
        variants[f"dtensor {layout}"] = dtensor_vocab_gpt(reference, sequence_parallel=sequence_parallel)
    return variants


def rank_worker(rank: int, world_size: int, sizes: tuple[ModelSize, ...], warmup: int,
                rounds: int) -> dict[str, dict]:
    """Inside a rank, per size: build every variant, check its loss, warm it up and time it."""
    torch.set_num_threads(1)
    measured = {}
    for size in sizes:
        torch.manual_seed(0)
        reference = GPTModel(size.config()).train()
        variants = build_variants(reference)
        input_ids = torch.randint(0, size.vocab_size, (size.batch, size.seq),
                                  generator=torch.Generator().manual_seed(1))
        losses = {name: training_step(model, input_ids) for name, model in variants.items()}
        for _ in range(warmup - 1):  # the loss check above was the first warm-up step
            for model in variants.values():
                training_step(model, input_ids)
        measured[size.name] = {"loss_diff": {name: abs(loss - losses["single"]) for name, loss in losses.items()},
                               "times": _time_rounds(variants, input_ids, rounds * size.rounds_factor)}
    return measured


def layout_of(name: str) -> str:
    """``"dtensor megatron+vocab+sp"`` -> ``"megatron+vocab+sp"``; ``"single"`` -> ``"single"``."""
    return name.partition(" ")[2] or name


def summarize(rank_results: list[dict[str, dict]], sizes: tuple[ModelSize, ...]) -> dict[str, dict]:
    """Per size: the median of the slower rank per step, each variant's ratio to tpfx of its layout, and the
    ratios between tpfx's layouts."""
    summary = {}
    for size in sizes:
        per_rank = [result[size.name] for result in rank_results]
        medians = slowest_rank_medians_ms(per_rank)
        to_tpfx = {name: value / medians[f"tpfx {layout_of(name)}"] for name, value in medians.items()
                   if f"tpfx {layout_of(name)}" in medians}
        between = {"tpfx megatron+vocab / tpfx megatron": medians["tpfx megatron+vocab"] / medians["tpfx megatron"],
                   "tpfx megatron+vocab+sp / tpfx megatron+vocab":
                       medians["tpfx megatron+vocab+sp"] / medians["tpfx megatron+vocab"]}
        summary[size.name] = {"size": size.name, "shape": f"L{size.n_layers} d{size.d_model} V{size.vocab_size} "
                                                          f"B{size.batch}×T{size.seq}",
                              "median_ms": medians, "ratio_to_tpfx": to_tpfx, "tpfx_layouts": between,
                              "max_loss_diff": {name: max(r["loss_diff"][name] for r in per_rank) for name in medians}}
    return summary


def markdown(summary: dict[str, dict], machine: dict) -> str:
    """The tables the README quotes: one row per size and variant, then tpfx's layouts against each other."""
    lines = [f"{machine['date']} · torch {machine['torch']} · {machine['cpus']} CPUs · gloo, tp=2, 1 thread per "
             "rank, fp32; one training step (forward + backward, loss in the model), median of the slower rank",
             "", "| size | variant | ms | ratio to tpfx (same layout) | loss diff vs single |",
             "|---|---|---:|---:|---:|"]
    for figures in summary.values():
        for name, value in figures["median_ms"].items():
            ratio = figures["ratio_to_tpfx"].get(name)
            lines.append(f"| {figures['shape']} | {name} | {value:.2f} | {'' if ratio is None else f'{ratio:.3f}'} "
                         f"| {figures['max_loss_diff'][name]:.1e} |")
    lines += ["", "| size | tpfx layouts | ratio |", "|---|---|---:|"]
    lines += [f"| {figures['shape']} | {label} | {value:.3f} |" for figures in summary.values()
              for label, value in figures["tpfx_layouts"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark; write vocab_step_time.json / .md under ``--out`` and print the table."""
    options = results.quick_and_out_options(argv, prog="python -m benchmarks.vocab_step_time", doc=__doc__,
                                            quick_help="the small GPT only, fewer rounds (a smoke run)")
    sizes, warmup, rounds = ((SMALL,), 2, 5) if options.quick else ((SMALL, MEDIUM), 4, 30)
    summary = summarize(launch(rank_worker, 2, sizes, warmup, rounds, timeout_s=3600), sizes)
    results.write_summary(options.out, "vocab_step_time-quick" if options.quick else "vocab_step_time",
                          {"sizes": summary}, markdown(summary, results.machine()))


if __name__ == "__main__":
    main()
