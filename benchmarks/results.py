"""Write a benchmark run: ``latest.json`` (everything), ``latest.md`` (the tables) and ``latest.png`` (the plots)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

# targets of issue 7: tpfx / baseline step time at the small size, and the pass cost at the most layers
TARGETS = {"handwritten": 1.05, "dtensor": 0.8}
PASS_TARGET_S = 1.5


def machine() -> dict[str, object]:
    """Where the figures were taken."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def quick_and_out_options(argv: list[str] | None, *, prog: str, doc: str, quick_help: str) -> argparse.Namespace:
    """The command line of one benchmark module: ``--quick`` (a smoke run) and ``--out`` (the results folder,
    ``benchmarks/results/`` by default)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    return parser.parse_args(argv)


def write_summary(out_dir: Path, name: str, document: dict, text: str) -> None:
    """Write one benchmark's ``name.json`` (``document`` and the machine) and ``name.md`` (``text``) under
    ``out_dir``, and print the text."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(document | {"machine": machine()}, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(text + "\n")
    print(text)


def write(results: dict, out_dir: Path) -> list[Path]:
    """Write ``results`` (``machine``, ``settings``, ``steps``, ``pass_cost``) to ``out_dir``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "latest.json", out_dir / "latest.md", out_dir / "latest.png"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(markdown(results))
    plot(results, paths[2])
    return paths


def markdown(results: dict) -> str:
    """The run as markdown: machine, step times with ratios, traffic, pass cost."""
    info = results["machine"]
    lines = [f"# tpfx benchmarks ({results['settings']['label']})", "",
             f"{info['date']} · torch {info['torch']} · {info['cpus']} CPUs ({info['processor']}) · "
             f"{info['platform']} · gloo, tp=2, 1 thread per rank, fp32", ""]
    if "steps" in results:
        lines += _step_tables(results["steps"])
    if "pass_cost" in results:
        lines += _pass_table(results["pass_cost"])
    return "\n".join(lines + _memory_section(results.get("memory"))) + "\n"


def _memory_section(memory: dict | None) -> list[str]:
    """The checkpoint path's peak memory per rank, from ``python -m benchmarks.memory`` (memory.json)."""
    lines = ["## Memory: peak resident memory per rank, loading a safetensors checkpoint at tp=2", ""]
    if memory is None:
        return lines + ["Not measured in this folder yet: run `python -m benchmarks.memory` (about a minute, 8 GB), "
                        "then `python -m benchmarks` again to include it here.", ""]
    from benchmarks.memory import markdown as memory_markdown  # memory.py imports this module: import late

    return lines + [f"Measured {memory['machine']['date']} (torch {memory['machine']['torch']}).", "",
                    memory_markdown(memory)]


def _step_tables(steps: dict) -> list[str]:
    lines = ["## Step time (forward + backward, median, ms)", "",
             "Ratio = variant / tpfx of the same mode, measured in the same run (below 1: faster than tpfx).", "",
             "| size | variant | ms | ratio to tpfx | loss diff vs single |", "|---|---|---:|---:|---:|"]
    for size_name, entry in steps.items():
        size = entry["size"]
        label = f"{size_name} (L{size['n_layers']} d{size['d_model']} B{size['batch']}×T{size['seq']})"
        for name, ms in entry["median_ms"].items():
            ratio = entry["ratio_to_tpfx"][name]
            lines.append(f"| {label} | {name} | {ms:.2f} | {'—' if ratio is None else f'{ratio:.3f}'} | "
                         f"{entry['max_loss_diff'][name]:.1e} |")
        for name in entry.get("not_yet", []):
            lines.append(f"| {label} | {name} | not yet | — | — |")
    lines += ["", "## Communication per step (ring bytes per rank)", "",
              "| size | program | measured | comm table | closed form | equal | calls |", "|---|---|---:|---:|---:|---|---|"]
    for size_name, entry in steps.items():
        for name, t in entry["traffic"].items():
            lines.append(f"| {size_name} | {name} | {t['measured_bytes']:.0f} | {t['table_bytes']:.0f} | "
                         f"{t['closed_form_bytes']:.0f} | {t['equal']} | {t['calls']} |")
    return lines + [""] + _target_lines(steps)


def _target_lines(steps: dict) -> list[str]:
    small = steps[next(iter(steps))]
    lines = ["## Targets at the smallest size", ""]
    for mode in ("gather", "megatron"):
        mine = small["median_ms"].get(f"tpfx {mode}")
        for baseline, limit in TARGETS.items():
            theirs = small["median_ms"].get(f"{baseline} {mode}")
            if mine is None or theirs is None:
                lines.append(f"- tpfx {mode} ≤ {limit} × {baseline} {mode}: not yet measured (mode not in tpfx)")
                continue
            ratio = mine / theirs
            lines.append(f"- tpfx {mode} ≤ {limit} × {baseline} {mode}: {ratio:.3f} "
                         f"({'met' if ratio <= limit else 'MISSED'})")
    return lines + [""]


def _pass_table(pass_cost: dict) -> list[str]:
    rows = pass_cost["rows"]
    extra = [(key, label) for key, label in (("megatron_total_s", "megatron mode total"),
                                             ("export_path_total_s", "total, tracer='export'"))
             if all(key in row for row in rows)]
    lines = ["## Pass cost: parallelize(tp=2, rank=0) on a meta-device GPT (GPT-3 175B shape at 96 layers)", "",
             "CPU seconds of the process (equal to wall time on an idle machine; not inflated by other load).", "",
             "| layers | total | capture | after capture | of which find_sites | of which code generation "
             "(torch.fx) | of which garbage collection | torch.export alone |"
             + "".join(f" {label} |" for _, label in extra), "|---:" * (8 + len(extra)) + "|"]
    for row in rows:
        export = "—" if row["export_s"] is None else f"{row['export_s']:.3f}"
        generation, collection = (f"{row[key]:.3f}" if key in row else "—"
                                  for key in ("code_generation_s", "garbage_collection_s"))
        lines.append(f"| {row['layers']} | {row['total_s']:.3f} | {row['capture_s']:.3f} | "
                     f"{row['after_capture_s']:.3f} | {row['find_sites_s']:.3f} | {generation} | {collection} | {export} |"
                     + "".join(f" {row[key]:.3f} |" for key, _ in extra))
    growth, last = pass_cost["growth"], rows[-1]
    half = last["after_capture_s"] <= last["capture_s"] / 2
    lines += ["", f"- growth (gather mode): time per layer at {last['layers']} layers / at {rows[0]['layers']} = "
                  f"{growth['per_layer_ratio']:.2f} ({'linear' if growth['linear'] else 'NOT linear'})",
              f"- {last['layers']} layers under {PASS_TARGET_S} s: {last['total_s']:.2f} s "
              f"({'met' if last['total_s'] < PASS_TARGET_S else 'MISSED'}); after capture ≤ half of capture: "
              f"{last['after_capture_s']:.2f} vs {last['capture_s']:.2f} s ({'met' if half else 'MISSED'})"]
    if not half and "code_generation_s" in last:
        collection = last.get("garbage_collection_s", 0.0)
        passes = last["after_capture_s"] - last["code_generation_s"] - collection
        lines.append(f"- why: of the {last['after_capture_s']:.2f} s after capture, {last['code_generation_s']:.2f} s is "
                     "torch.fx writing and compiling the program's Python code (once, after every rewrite), "
                     f"{collection:.2f} s is Python's garbage collector walking what the whole pass allocated "
                     "(paused while tpfx compiles, it runs once at the end), and "
                     f"{passes:.2f} s ({passes / last['capture_s']:.2f} × capture) is tpfx's own work: finding sites, "
                     "rewriting, slicing, the report. Capture itself is cheap: fx tracing and the weightless copy"
                     + (f" (torch.export alone takes {last['export_s']:.1f} s)" if last.get("export_s") else ""))
    for mode, profile in pass_cost.get("profile_at_most_layers", {}).items():
        shares = ", ".join(f"{entry['function']} {100 * entry['share']:.0f}%" for entry in profile)
        lines.append(f"- where {mode} mode spends it at {last['layers']} layers (cProfile shares): {shares}")
    check = pass_cost.get("replica_check")
    if check:
        lines.append(f"- replica check (in a process group, check_replicas=True) at {check['layers']} layers: "
                     f"{check['total_s']:.3f} s ({check['summary_s']:.3f} s summary, {check['exchange_s']:.3f} s "
                     f"exchange and comparison), {check['payload_bytes'] / 1e3:.0f} kB sent per rank; real weights "
                     f"add their bytes / {check['fingerprint_gb_per_s']:.1f} GB/s (fingerprinting rate here)")
    return lines + [""]


def plot(results: dict, path: Path) -> None:
    """Step time per size (bars per variant) and pass time per layer count, side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, (steps_axis, pass_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    if "steps" in results:
        _plot_steps(steps_axis, results["steps"])
    if "pass_cost" in results:
        _plot_pass(pass_axis, results["pass_cost"])
    figure.suptitle(f"tpfx benchmarks · torch {results['machine']['torch']} · {results['machine']['date']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_steps(axis, steps: dict) -> None:
    names = list(next(iter(steps.values()))["median_ms"])
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        values = [entry["median_ms"][name] for entry in steps.values()]
        axis.bar([i + index * width for i in range(len(steps))], values, width, label=name)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(steps))], list(steps))
    axis.set_yscale("log")
    axis.set_ylabel("step time, ms (median, log scale)")
    axis.set_title("forward + backward, gloo tp=2")
    axis.legend(fontsize=7)


def _plot_pass(axis, pass_cost: dict) -> None:
    rows = pass_cost["rows"]
    layers = [row["layers"] for row in rows]
    for key, label in (("total_s", "parallelize total"), ("megatron_total_s", "parallelize megatron"),
                       ("export_path_total_s", "parallelize, tracer='export'"), ("capture_s", "capture"),
                       ("after_capture_s", "after capture"), ("export_s", "torch.export alone")):
        if all(row.get(key) is not None for row in rows):
            axis.plot(layers, [row[key] for row in rows], marker="o", label=label)
    axis.set_xlabel("layers (GPT-3 175B shape, meta device)")
    axis.set_ylabel("CPU seconds")
    axis.set_title("pass cost")
    axis.legend(fontsize=7)
