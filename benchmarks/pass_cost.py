"""Pass cost: ``tpfx.parallelize(model, tp=2, rank=0)`` on a meta-device GPT, by layer count.

No process group and no weights: ``rank=`` builds one rank's program for inspection, and the meta
device makes a GPT-3 175B-shaped model (d_model 12288, 96 heads, d_ff 49152, at 96 layers) cost no
memory, so the figure is the compiler's own work. It is split into capture, site finding and the
rest (rewrite, copy, report) by timing wrappers around the functions ``tpfx.api`` calls, and set
beside ``torch.export.export`` of the same model as a yardstick for what capturing costs elsewhere.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import torch

import tpfx
import tpfx.api
from examples.gpt import GPTConfig, GPTModel


def gpt3_config(n_layers: int) -> GPTConfig:
    """GPT-3 175B's shape (at 96 layers) in the example GPT's config, dropout off."""
    return GPTConfig(vocab_size=50257, max_position_embeddings=2048, n_layers=n_layers, n_heads=96,
                     d_model=12288, d_ff=49152, dropout=0.0)


@contextmanager
def _timing(name: str, into: dict[str, float]) -> Iterator[None]:
    """Accumulate the seconds spent in ``tpfx.api.<name>`` into ``into[name]`` while the block runs."""
    original: Callable = getattr(tpfx.api, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[name] = into.get(name, 0.0) + time.perf_counter() - start

    with mock.patch.object(tpfx.api, name, timed):
        yield


def time_parallelize(model: torch.nn.Module, *, tp: int = 2) -> dict[str, float]:
    """Seconds of one ``parallelize(model, tp=tp, rank=0)``: total, capture, find_sites and the rest."""
    parts: dict[str, float] = {}
    with _timing("capture", parts), _timing("find_sites", parts):
        start = time.perf_counter()
        tpfx.parallelize(model, tp=tp, rank=0)
        total = time.perf_counter() - start
    rest = total - parts["capture"]
    return {"total_s": total, "capture_s": parts["capture"], "find_sites_s": parts["find_sites"], "after_capture_s": rest}


def time_export(model: torch.nn.Module, *, batch: int = 2, seq: int = 16) -> float:
    """Seconds of ``torch.export.export`` of ``model`` (on meta) with meta input ids."""
    input_ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    start = time.perf_counter()
    torch.export.export(model, (input_ids,))
    return time.perf_counter() - start


def measure(layer_counts: tuple[int, ...], *, config_for: Callable[[int], GPTConfig] = gpt3_config,
            repeats: int = 1, export: bool = True) -> dict:
    """Pass cost at each layer count (median of ``repeats``) and how it grows.

    Returns:
        ``{"rows": [{"layers", "total_s", "capture_s", "find_sites_s", "after_capture_s", "export_s"}],
        "growth": {...}}``; see :func:`growth`.
    """
    _warm_up(config_for(1))
    rows = []
    for layers in layer_counts:
        with torch.device("meta"):
            model = GPTModel(config_for(layers)).eval()
        runs = [time_parallelize(model) for _ in range(repeats)]
        row = {"layers": layers} | {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        row["export_s"] = statistics.median(time_export(model) for _ in range(repeats)) if export else None
        rows.append(row)
    return {"rows": rows, "growth": growth(rows)}


def _warm_up(config: GPTConfig) -> None:
    """One untimed run, so that first-call costs (lazy imports, caches) do not land on the first row."""
    with torch.device("meta"):
        model = GPTModel(config).eval()
    tpfx.parallelize(model, tp=2, rank=0)
    time_export(model)


def growth(rows: list[dict]) -> dict[str, float | bool]:
    """How the total grows from the fewest to the most layers, against linear growth.

    ``per_layer_ratio`` is (seconds per layer at the most layers) / (seconds per layer at the fewest):
    about 1 (or below, as fixed costs spread) when linear, about the layer ratio when quadratic.
    """
    first, last = rows[0], rows[-1]
    if last["layers"] == first["layers"]:
        return {"per_layer_ratio": 1.0, "linear": True}
    ratio = (last["total_s"] / last["layers"]) / (first["total_s"] / first["layers"])
    return {"layer_ratio": last["layers"] / first["layers"], "time_ratio": last["total_s"] / first["total_s"],
            "per_layer_ratio": ratio, "linear": ratio <= 1.25}
