"""The communication table is exact: its bytes equal what a real run hands to the collectives.

One spawn of 2 gloo ranks runs several programs (the example GPT, a user model in float64 with
separate q/k/v and a gated FFN, the Megatron mode and the torch.export capture when
``parallelize`` offers them), counts the bytes at every collective with
:func:`tpfx.collectives.add_observer`, forward and backward apart, and compares them with
:func:`tpfx.passes.comm_table.comm_table` and with ``tpfx dump --format json``.
"""

from __future__ import annotations

import inspect
import json
from collections import Counter
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import tpfx
from tpfx.passes.comm_table import RULES, CommTableError, comm_table, ring_traffic
from tests.multiprocess import run_ranks
from tests.test_cli import GPT, tpfx_command, write_models
from tpfx import collectives
from tpfx.targets import load_target, parallelize_target


def _cases(models: str) -> list[tuple[str, str, int | None, int | None, dict]]:
    """(label, TARGET, batch, seq, parallelize options) of every program the spawn measures."""
    cases = [("gpt", GPT, 2, 16, {}), ("gpt with mask and labels", "examples/gpt.py:tiny_gpt_with_inputs", 3, 8, {}),
             ("user float64", f"{models}:tiny_lm_double_with_inputs", None, None, {})]
    options = inspect.signature(tpfx.parallelize).parameters  # modes and tracers that this tpfx offers
    if "mode" in options:
        cases.append(("gpt megatron", GPT, 2, 16, {"mode": "megatron"}))
    if "tracer" in options:
        cases.append(("gpt export", GPT, 2, 16, {"tracer": "export"}))
    return cases


def _measure(target_spec: str, batch: int | None, seq: int | None, options: dict, tp: int) -> dict:
    """One program: the table's rows and what the collectives really received, forward and backward."""
    target = load_target(target_spec)
    program = parallelize_target(target, tp=tp, batch=batch, seq=seq, options=options)
    inputs = target.inputs(batch=batch, seq=seq, seed=0)
    table = comm_table(program, inputs, tp=tp)
    seen: list[tuple[str, int]] = []
    remove = collectives.add_observer(lambda name, tensor: seen.append((name, tensor.numel() * tensor.element_size())))
    try:
        outputs = program(**inputs)
        forward = list(seen)
        tensors = [outputs] if isinstance(outputs, torch.Tensor) else [o for o in outputs if o is not None]
        loss = next((t for t in tensors if t.dim() == 0), None)
        (loss if loss is not None else tensors[0].float().square().mean()).backward()
    finally:
        remove()
    return {"table": table, "forward": forward, "backward": seen[len(forward):]}


def _rank(rank: int, world_size: int, cases: list) -> dict:
    return {label: _measure(spec, batch, seq, options, world_size) for label, spec, batch, seq, options in cases}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[list[dict], list]:
    cases = _cases(str(write_models(tmp_path_factory.mktemp("user"))))
    return run_ranks(_rank, 2, cases), cases


def test_forward_bytes_equal_the_real_collectives_in_order(measured):
    results, cases = measured
    for result in results:
        for label, _, _, _, _ in cases:
            rows = [(r.op, r.tensor_bytes) for r in result[label]["table"].rows if r.direction == "forward"]
            assert rows == result[label]["forward"], label
            assert rows, f"{label}: no forward collective measured"


def test_backward_bytes_equal_the_real_collectives(measured):
    results, cases = measured
    for result in results:
        for label, _, _, _, _ in cases:
            rows = [(r.op, r.tensor_bytes) for r in result[label]["table"].rows if r.direction == "backward"]
            # autograd may run independent branches in either order: compare as multisets
            assert Counter(rows) == Counter(result[label]["backward"]), label
            assert rows, f"{label}: no backward collective measured"


def test_float64_rows_count_eight_bytes_per_element(measured):
    results, _ = measured
    rows = results[0]["user float64"]["table"].rows
    assert {r.dtype for r in rows} == {"float64"}
    assert all(r.tensor_bytes == 8 * torch.Size(r.shape).numel() for r in rows)


def test_cli_json_lists_the_bytes_of_a_real_run(measured):
    results, _ = measured
    done = tpfx_command("dump", GPT, "--tp", "2", "--batch", "2", "--seq", "16", "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["communication"]["rows"]
    real = results[0]["gpt"]
    assert [(r["op"], r["tensor_bytes"]) for r in rows if r["direction"] == "forward"] == real["forward"]
    backward = Counter((r["op"], r["tensor_bytes"]) for r in rows if r["direction"] == "backward")
    assert backward == Counter(real["backward"])
    for row in rows:
        assert row["traffic_bytes_per_rank"] == float(ring_traffic(row["op"], row["tensor_bytes"], 2))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_ring_model(tp):
    local = 1000 * tp  # bytes handed to an all-gather: this rank's part
    assert ring_traffic("all_gather", local, tp) == Fraction(tp - 1, tp) * (local * tp)
    assert ring_traffic("reduce_scatter", 4096, tp) == Fraction(tp - 1, tp) * 4096
    assert ring_traffic("all_reduce", 4096, tp) == Fraction(2 * (tp - 1), tp) * 4096
    with pytest.raises(ValueError, match="unknown collective op 'broadcast'"):
        ring_traffic("broadcast", 1, tp)


def test_tp4_table_of_the_gpt_without_processes():
    target = load_target(GPT)
    program = tpfx.parallelize(target.model, tp=4, rank=3)
    table = comm_table(program, target.inputs(batch=2, seq=8), tp=4)
    gathers = [r for r in table.rows if r.op == "all_gather"]
    assert [(r.module, r.shape) for r in gathers[:2]] == [("blocks.0.attn.qkv_proj", (2, 8, 96)),
                                                         ("blocks.0.ffn.fc1", (2, 8, 128))]
    assert all(r.traffic_bytes == 3 * r.tensor_bytes for r in gathers)
    reduces = [r for r in table.rows if r.op == "all_reduce"]
    assert len(reduces) == 4 and all(r.direction == "backward" and r.shape == (2, 8, 128) for r in reduces)
    assert all(r.traffic_bytes == 1.5 * r.tensor_bytes for r in reduces)
    assert table.total("forward") + table.total("backward") == table.total()


def test_frozen_inputs_have_no_backward_collective():
    target = load_target(GPT)
    for parameter in target.model.parameters():
        parameter.requires_grad_(False)
    program = tpfx.parallelize(target.model, tp=2, rank=0)
    table = comm_table(program, target.inputs(), tp=2)
    assert {r.direction for r in table.rows} == {"forward"}


def test_a_collective_without_a_rule_is_a_clear_error(monkeypatch):
    def scatter_to_tp(x: torch.Tensor, group: str) -> torch.Tensor:
        return x

    monkeypatch.setitem(collectives.COLLECTIVES, scatter_to_tp, "scatter_to_tp")
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(scatter_to_tp, (x, "tp:0-1")))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    assert "scatter_to_tp" not in RULES
    with pytest.raises(CommTableError, match=r"collective\(s\) \['scatter_to_tp'\] have no rule"):
        comm_table(gm, {"x": torch.zeros(2, 4)}, tp=2)


def test_whole_grouped_keys_and_values_narrowed_per_rank_need_no_process_group_to_count():
    """2 key/value heads at tp=4 (megatron): k and v stay whole; their output gradients are all-reduced."""
    from tests.models import Grouped

    program = tpfx.parallelize(Grouped(kv_heads=2), tp=4, rank=2, mode="megatron")
    table = comm_table(program, {"x": torch.zeros(2, 5, 32)}, tp=4)
    assert [(r.direction, r.op, r.module, r.shape) for r in table.rows] == [
        ("forward", "all_reduce", "o_proj", (2, 5, 32)), ("forward", "all_reduce", "down", (2, 5, 32)),
        ("backward", "all_reduce", "gate", (2, 5, 32)),  # the FFN's input (gate and up share it)
        ("backward", "all_reduce", "v_proj", (2, 5, 16)), ("backward", "all_reduce", "k_proj", (2, 5, 16))]
    # (q's input is the model input here: it needs no gradient, so its copy-to sends nothing)


def test_dropouts_that_draw_a_ranks_part_need_no_process_group_to_count():
    """Train-mode megatron program with SDPA dropout_p and F.dropout between the pairs (tpfx.rank_parts ops)."""
    from tests.models import DropoutInside

    program = tpfx.parallelize(DropoutInside().train(), tp=2, rank=1, mode="megatron")
    targets = {n.target.__name__ for n in program.graph.nodes if n.op == "call_function"}
    assert {"attention_rank_part", "dropout_rank_part"} <= targets
    table = comm_table(program, {"x": torch.zeros(2, 5, 32)}, tp=2)
    assert [(r.direction, r.op, r.module, r.shape) for r in table.rows] == [
        ("forward", "all_reduce", "out", (2, 5, 32)), ("forward", "all_reduce", "fc2", (2, 5, 32)),
        ("backward", "all_reduce", "fc1", (2, 5, 32))]  # the model input needs no gradient: qkv's copy sends nothing
