"""``python -m benchmarks [--quick] [--out DIR]``: time tpfx against its baselines and write the results.

--quick (under 3 minutes on 2 cores): the small and medium GPT, fewer rounds, pass cost once per
layer count; it writes to ``benchmarks/results/quick/`` (not committed) and never into the full
run's folder. The full run adds a large GPT, more rounds, three repeats of the pass cost and the
pass cost of capturing through torch.export, and writes ``benchmarks/results/`` (committed).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from benchmarks import memory, pass_cost, results, step_time

QUICK = {"label": "quick", "sizes": (step_time.SMALL, step_time.MEDIUM), "warmup": 3, "rounds": 15,
         "layers": (12, 24, 48, 96), "repeats": 1, "export_path": False}
FULL = {"label": "full", "sizes": (step_time.SMALL, step_time.MEDIUM, step_time.LARGE), "warmup": 5, "rounds": 30,
        "layers": (12, 24, 48, 96), "repeats": 3, "export_path": True}


FULL_RESULTS = Path(__file__).parent / "results"  # the full run's committed results; quick runs never write here


def results_folder(out: Path | None, *, quick: bool, error: Callable[[str], None]) -> Path:
    """Where a run writes: ``--out``, else the full run's folder, or its ``quick/`` subfolder for --quick.

    ``error`` (the parser's) is called when a quick run is pointed at the full run's folder.
    """
    if out is None:
        return FULL_RESULTS / "quick" if quick else FULL_RESULTS
    if quick and out.resolve() == FULL_RESULTS.resolve():
        error(f"--quick would replace the full run's results in {out}; leave out --out (quick results go to "
              f"{FULL_RESULTS / 'quick'}) or choose another folder")
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks and write latest.json / latest.md / latest.png."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short run (under 3 minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results folder (default {FULL_RESULTS.name}/, with --quick {FULL_RESULTS.name}/quick/)")
    parser.add_argument("--skip-steps", action="store_true", help="only the pass cost")
    parser.add_argument("--skip-pass", action="store_true", help="only the step times and traffic")
    parser.add_argument("--memory", action="store_true",
                        help="also rerun the memory benchmark (python -m benchmarks.memory) first")
    options = parser.parse_args(argv)
    options.out = results_folder(options.out, quick=options.quick, error=parser.error)
    settings = QUICK if options.quick else FULL
    run: dict = {"machine": results.machine(),
                 "settings": {k: [getattr(s, "name", s) for s in v] if isinstance(v, tuple) else v
                              for k, v in settings.items()}}
    if not options.skip_steps:
        spec = step_time.StepSpec(sizes=settings["sizes"], warmup=settings["warmup"], rounds=settings["rounds"])
        run["steps"] = step_time.run(spec)
    if options.memory:
        memory.main(["--out", str(options.out)])
    for folder in (options.out, FULL_RESULTS):  # the checkpoint path's figures, from their own run
        if (folder / "memory.json").exists():
            run["memory"] = json.loads((folder / "memory.json").read_text())
            break
    if not options.skip_pass:
        run["pass_cost"] = pass_cost.measure(settings["layers"], repeats=settings["repeats"],
                                              export_path=settings["export_path"])
    for path in results.write(run, options.out):
        print(f"wrote {path}")
    print(results.markdown(run))


if __name__ == "__main__":
    main()
