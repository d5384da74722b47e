"""Pass cost: ``tpfx.parallelize(model, tp=2, rank=0)`` on a meta-device GPT, by layer count.

No process group and no weights: ``rank=`` builds one rank's program for inspection, and the meta
device makes a GPT-3 175B-shaped model (d_model 12288, 96 heads, d_ff 49152, at 96 layers) cost no
memory, so the figure is the compiler's own work (in CPU seconds, see ``_clock``). It is split into capture, site finding and the
rest (rewrite, copy, report) by timing wrappers around the functions ``tpfx.api`` calls, and set
beside ``torch.export.export`` of the same model as a yardstick for what capturing costs elsewhere.
"""

from __future__ import annotations

import cProfile
import gc
import inspect
import pstats
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

import tpfx
import tpfx.api
from examples.gpt import GPTConfig, GPTModel


# CPU seconds of this process: the pass is single-threaded Python (meta tensors compute nothing), so on
# an idle machine this equals wall time, and on a shared one it does not count the time others hold the CPU
_clock = time.process_time

# what tpfx.api calls to capture, newest name first (capture grew a torch.export path)
_CAPTURE_STEPS = ("capture_for_parallelize", "capture")


def gpt3_config(n_layers: int) -> GPTConfig:
    """GPT-3 175B's shape (at 96 layers) in the example GPT's config, dropout off."""
    return GPTConfig(vocab_size=50257, max_position_embeddings=2048, n_layers=n_layers, n_heads=96,
                     d_model=12288, d_ff=49152, dropout=0.0)


@contextmanager
def _timing(name: str, into: dict[str, float]) -> Iterator[None]:
    """Accumulate the seconds spent in ``tpfx.api.<name>`` into ``into[name]`` while the block runs."""
    original: Callable = getattr(tpfx.api, name)

    def timed(*args, **kwargs):
        start = _clock()
        try:
            return original(*args, **kwargs)
        finally:
            into[name] = into.get(name, 0.0) + _clock() - start

    with mock.patch.object(tpfx.api, name, timed):
        yield


def _accepts(option: str) -> bool:
    return option in inspect.signature(tpfx.parallelize).parameters


def _modes() -> tuple[str, ...]:
    return ("gather", "megatron") if _accepts("mode") else ("gather",)


def _timed_total(model: torch.nn.Module, **options) -> float:
    start = _clock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's internal deprecations, once per node
        tpfx.parallelize(model, tp=2, rank=0, **options)
    return _clock() - start


@contextmanager
def _timing_code_generation(into: dict[str, float], *, outside: str) -> Iterator[None]:
    """Accumulate into ``into["code_generation"]`` the seconds torch.fx spends writing and compiling
    Python code (``GraphModule.recompile``) outside of the ``tpfx.api.<outside>`` step."""
    original = torch.fx.GraphModule.recompile
    inside_step = [0]

    def timed_recompile(self):  # noqa: ANN001, ANN202
        start = _clock()
        try:
            return original(self)
        finally:
            if not inside_step[0]:
                into["code_generation"] = into.get("code_generation", 0.0) + _clock() - start

    step: Callable = getattr(tpfx.api, outside)

    def marked_step(*args, **kwargs):
        inside_step[0] += 1
        try:
            return step(*args, **kwargs)
        finally:
            inside_step[0] -= 1

    with mock.patch.object(torch.fx.GraphModule, "recompile", timed_recompile), \
            mock.patch.object(tpfx.api, outside, marked_step):
        yield


@contextmanager
def _timing_garbage_collection(into: dict[str, float]) -> Iterator[None]:
    """Accumulate into ``into["garbage_collection"]`` the seconds Python's cyclic collector runs in the block.

    tpfx pauses the collector while it compiles, so its one collection comes when the pass ends and
    is counted after capture, though it walks what capture made as well as what the rewrites made.
    """
    started: list[float] = []

    def on_collection(phase: str, info: dict) -> None:  # gc.callbacks' signature
        if phase == "start":
            started.append(_clock())
        elif started:
            into["garbage_collection"] = into.get("garbage_collection", 0.0) + _clock() - started.pop()

    gc.callbacks.append(on_collection)
    try:
        yield
    finally:
        gc.callbacks.remove(on_collection)


def time_parallelize(model: torch.nn.Module, *, export_path: bool = False) -> dict[str, float]:
    """Seconds of one ``parallelize(model, tp=2, rank=0)``: total, capture, find_sites and the rest.

    ``code_generation_s`` is the part of the rest that torch.fx spends writing and compiling the
    program's Python code (tpfx asks for it once, after every rewrite), and ``garbage_collection_s``
    the part the cyclic garbage collector takes (see :func:`_timing_garbage_collection`). Also, where this tpfx has
    them, the totals of Megatron mode (``megatron_total_s``) and, with ``export_path``, of capturing
    through torch.export (``export_path_total_s``).
    """
    parts: dict[str, float] = {}
    capture_step = next(name for name in _CAPTURE_STEPS if hasattr(tpfx.api, name))
    gc.collect()  # the previous run's garbage is not this run's cost
    with _timing_code_generation(parts, outside=capture_step), _timing(capture_step, parts), \
            _timing("find_sites", parts), _timing_garbage_collection(parts):
        total = _timed_total(model)
    row = {"total_s": total, "capture_s": parts[capture_step], "find_sites_s": parts["find_sites"],
           "after_capture_s": total - parts[capture_step], "code_generation_s": parts.get("code_generation", 0.0),
           "garbage_collection_s": parts.get("garbage_collection", 0.0)}
    if "megatron" in _modes():
        row["megatron_total_s"] = _timed_total(model, mode="megatron")
    if export_path and _accepts("tracer"):
        example = (torch.zeros(2, 16, dtype=torch.long, device="meta"),)
        row["export_path_total_s"] = _timed_total(model, tracer="export", example_inputs=example)
    return row


def profile_parallelize(model: torch.nn.Module, *, mode: str = "gather", tp: int = 2,
                        top: int = 8) -> list[dict[str, object]]:
    """Where ``parallelize`` spends its time: its direct callees by cumulative seconds under cProfile.

    cProfile roughly doubles Python-heavy code, so read the shares, not the seconds.
    """
    options = {} if mode == "gather" else {"mode": mode}
    profiler = cProfile.Profile()
    profiler.runcall(tpfx.parallelize, model, tp=tp, rank=0, **options)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, ..., cumulative, callers)
    # the steps are the callees of the compile function (newer tpfx), else of parallelize itself
    roots = [key for key in stats if key[0].endswith("api.py") and key[2] in ("_compile", "parallelize")]
    root = min(roots, key=lambda key: key[2] != "_compile")
    total = stats[root][3]
    callees = [(key, callers[root][3]) for key, (*_, callers) in stats.items() if root in callers]
    callees.sort(key=lambda item: -item[1])
    return [{"function": f"{Path(file).parent.name}/{Path(file).name}:{name}", "profiled_s": seconds,
             "share": seconds / total} for (file, _, name), seconds in callees[:top]]


def time_export(model: torch.nn.Module, *, batch: int = 2, seq: int = 16) -> float:
    """Seconds of ``torch.export.export`` of ``model`` (on meta) with meta input ids."""
    input_ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    start = _clock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.export.export(model, (input_ids,))
    return _clock() - start


def measure(layer_counts: tuple[int, ...], *, config_for: Callable[[int], GPTConfig] = gpt3_config,
            repeats: int = 1, export: bool = True, export_path: bool = False) -> dict:
    """Pass cost at each layer count (the fastest of ``repeats``: the least disturbed by other load) and its growth.

    Args:
        layer_counts: the layer counts, fewest first.
        config_for: the model config at a layer count (default the GPT-3 175B shape).
        repeats: runs per layer count.
        export: also time ``torch.export.export`` alone.
        export_path: also time ``parallelize`` capturing through torch.export.

    Returns:
        ``{"rows": [{"layers", "total_s", "capture_s", "find_sites_s", "after_capture_s", "export_s", ...}],
        "growth": {...}, "profile_at_most_layers": {mode: [...]}}``; see :func:`growth`, :func:`profile_parallelize`.
    """
    _warm_up(config_for(1))
    rows = []
    for layers in layer_counts:
        with torch.device("meta"):
            model = GPTModel(config_for(layers)).eval()
        runs = [time_parallelize(model, export_path=export_path) for _ in range(repeats)]
        row = {"layers": layers} | min(runs, key=lambda run: run["total_s"])
        row["export_s"] = min(time_export(model) for _ in range(repeats)) if export else None
        rows.append(row)
    profiles = {mode: profile_parallelize(model, mode=mode) for mode in _modes()}
    result = {"rows": rows, "growth": growth(rows), "profile_at_most_layers": profiles}
    if hasattr(tpfx.api, "_replica_summary"):
        result["replica_check"] = time_replica_check(model) | {"layers": layer_counts[-1]}
    return result


def time_replica_check(model: torch.nn.Module, *, real_mb: int = 64) -> dict[str, float]:
    """Seconds of the replica check ``parallelize`` runs in a process group (``check_replicas=True``).

    ``summary_s``: this rank's summary (a digest per graph node, a fingerprint per tensor: on the
    meta model only names, shapes and dtypes). ``exchange_s``: pickling it, the collective
    (``all_gather_object`` on a 1-rank gloo group here: the wire time of a real group comes on top)
    and the comparison. ``payload_bytes``: what each rank sends. ``fingerprint_gb_per_s``: how fast
    real weights are fingerprinted (a ``real_mb`` MB fp32 tensor), so that a model with real weights
    costs about its parameter bytes / this rate on top.
    """
    import pickle
    import tempfile

    import torch.distributed as dist

    from tpfx.export_capture import capture_for_parallelize
    from tpfx.replicas import check_replicas, fingerprint

    captured = capture_for_parallelize(model, tracer="fx", example_inputs=None)
    start = _clock()
    summary = tpfx.api._replica_summary(model, captured, (("mode", "gather"), ("tp", "2")))
    summary_s = _clock() - start
    with tempfile.TemporaryDirectory() as folder:
        started_group = not dist.is_initialized()
        if started_group:
            dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            start = _clock()
            check_replicas(summary, group=None, key="tp:0-0")
            exchange_s = _clock() - start
        finally:
            if started_group:
                dist.destroy_process_group()
    weights = torch.randn(real_mb << 8, 1024)  # real_mb MB of fp32, a weight's rows
    start = time.perf_counter()
    fingerprint(weights)
    rate = weights.numel() * 4 / (time.perf_counter() - start) / 1e9
    return {"summary_s": summary_s, "exchange_s": exchange_s, "total_s": summary_s + exchange_s,
            "payload_bytes": len(pickle.dumps(summary)), "fingerprint_gb_per_s": rate}


def _warm_up(config: GPTConfig) -> None:
    """One untimed run, so that first-call costs (lazy imports, caches) do not land on the first row."""
    with torch.device("meta"):
        model = GPTModel(config).eval()
    tpfx.parallelize(model, tp=2, rank=0)
    time_export(model)


def growth(rows: list[dict]) -> dict[str, float | bool]:
    """How the total grows from the fewest to the most layers, against linear growth.

    ``per_layer_ratio`` is (seconds per layer at the most layers) / (seconds per layer at the fewest):
    about 1 (or below, as fixed costs spread) when linear, about the layer ratio when quadratic;
    up to 1.5 is counted as linear, the noise of a shared machine.
    """
    first, last = rows[0], rows[-1]
    if last["layers"] == first["layers"]:
        return {"per_layer_ratio": 1.0, "linear": True}
    ratio = (last["total_s"] / last["layers"]) / (first["total_s"] / first["layers"])
    return {"layer_ratio": last["layers"] / first["layers"], "time_ratio": last["total_s"] / first["total_s"],
            "per_layer_ratio": ratio, "linear": ratio <= 1.5}
