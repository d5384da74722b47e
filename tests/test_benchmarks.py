"""The benchmarks' own claims: the hand-written baseline computes what the single-device model computes,
and the harness's code paths (every variant, traffic count, pass cost, result files) run at a toy size.

One spawn of 2 gloo ranks; no timing is asserted anywhere.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmarks import memory, pass_cost, results, step_time, vocab_step_time
from benchmarks.handwritten import handwritten_gpt, local_part_of_grad
from benchmarks.handwritten_vocab import HandwrittenVocabGPT
from examples.gpt import GPTConfig, GPTModel, small_config
from tests.multiprocess import run_ranks
from tests.parity import max_diff

TOL = 1e-5
TOY = step_time.ModelSize("toy", n_layers=2, n_heads=4, d_model=32, d_ff=64, vocab_size=97, batch=2, seq=8)
TOY_SPEC = step_time.StepSpec(sizes=(TOY,), warmup=1, rounds=2)
TOY_VOCAB = dataclasses.replace(TOY, name="toy vocab", vocab_size=96)  # tp divides the vocabulary


def _handwritten_diffs(mode: str) -> dict[str, float]:
    """Logits, loss and every gradient of the hand-written model against the single-device one."""
    torch.manual_seed(0)
    reference = GPTModel(small_config(dropout=0.0)).train()
    model = handwritten_gpt(reference, mode=mode)
    ids = torch.randint(0, reference.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # padding, so the mask path of the local-head attention counts
    outputs = []
    for program in (reference, model):
        logits, loss = program(ids, attention_mask=mask, labels=ids)
        loss.backward()
        outputs.append((logits, loss))
    diffs = {"logits": max_diff(outputs[1][0], outputs[0][0]), "loss": max_diff(outputs[1][1], outputs[0][1])}
    full = dict(reference.named_parameters())
    tp, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    for name, parameter in model.named_parameters():
        expected = local_part_of_grad(name, full[name].grad, config=reference.config, mode=mode, tp=tp, rank=rank)
        diffs[f"grad {name}"] = max_diff(parameter.grad, expected)
    return diffs


def _handwritten_vocab_diffs(sequence_parallel: bool) -> dict[str, float]:
    """This rank's logits, the loss and every gradient of the hand-written vocab-parallel model against the
    single-device one."""
    torch.manual_seed(0)
    reference = GPTModel(TOY_VOCAB.config()).train()
    model = HandwrittenVocabGPT(reference, sequence_parallel=sequence_parallel)
    ids = torch.randint(0, TOY_VOCAB.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    (logits, loss), (local_logits, local_loss) = reference(ids, labels=ids), model(ids, labels=ids)
    loss.backward()
    local_loss.backward()
    diffs = {"logits": max_diff(local_logits, logits[..., model.vocab_rows]), "loss": max_diff(local_loss, loss)}
    full = dict(reference.named_parameters())
    for name, parameter in model.named_parameters():
        expected = model.local_part_of_grad(name, full[model.single_device_name(name)].grad)
        diffs[f"grad {name}"] = max_diff(parameter.grad, expected)
    return diffs


TOY_GPT = GPTConfig(vocab_size=97, max_position_embeddings=16, n_layers=2, n_heads=4, d_model=32, d_ff=64, dropout=0.0)


def _worker(rank: int, world_size: int, folder: str) -> dict:
    # the memory benchmark's directory path at toy size: load the directory in both modes, save it again
    directory = {name: memory._tpfx_path(rank, world_size, f"{folder}/model", TOY_GPT, mode, f"{folder}/saved_{mode}")
                 for name, mode in memory.DIRECTORY_PATHS.items()}
    return {"gather": _handwritten_diffs("gather"), "megatron": _handwritten_diffs("megatron"),
            "megatron+vocab": _handwritten_vocab_diffs(False), "megatron+vocab+sp": _handwritten_vocab_diffs(True),
            "steps": step_time.rank_worker(rank, world_size, TOY_SPEC), "directory": directory,
            "vocab steps": vocab_step_time.rank_worker(rank, world_size, (TOY_VOCAB,), 1, 1)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("memory")


@pytest.fixture(scope="module")
def ranks(folder) -> list[dict]:
    memory._write_directory(0, 1, str(folder / "model"), TOY_GPT, 20_000)  # nothing sharded: no process group
    return run_ranks(_worker, 2, str(folder))


@pytest.mark.parametrize("mode", ["gather", "megatron", "megatron+vocab", "megatron+vocab+sp"])
def test_handwritten_matches_single_device(ranks, mode):
    for rank, result in enumerate(ranks):
        diffs = result[mode]
        assert len(diffs) > 20  # logits, loss and every parameter's gradient
        bad = {k: v for k, v in diffs.items() if not v <= TOL}
        assert not bad, f"hand-written {mode}, rank {rank}: {bad}"


def test_every_variant_runs_and_computes_the_single_device_loss(ranks):
    summary = step_time.summarize([r["steps"] for r in ranks], TOY_SPEC)["toy"]
    expected = {"single", "handwritten gather", "dtensor gather", "handwritten megatron", "dtensor megatron",
                *(f"tpfx {mode}" for mode in step_time.MODES if step_time.tpfx_has_mode(mode))}
    assert set(summary["median_ms"]) == expected
    assert all(value > 0 for value in summary["median_ms"].values())
    assert summary["ratio_to_tpfx"]["tpfx gather"] == 1.0
    assert all(diff <= TOL for diff in summary["max_loss_diff"].values()), summary["max_loss_diff"]


def test_every_vocab_variant_runs_and_computes_the_single_device_loss(ranks):
    summary = vocab_step_time.summarize([r["vocab steps"] for r in ranks], (TOY_VOCAB,))["toy vocab"]
    assert set(summary["median_ms"]) == {"single", "tpfx megatron", *(f"{who} {layout}" for layout in
                                                                      vocab_step_time.LAYOUTS
                                                                      for who in ("tpfx", "handwritten", "dtensor"))}
    assert summary["ratio_to_tpfx"]["tpfx megatron+vocab+sp"] == 1.0 and "single" not in summary["ratio_to_tpfx"]
    assert all(diff <= TOL for diff in summary["max_loss_diff"].values()), summary["max_loss_diff"]
    table = vocab_step_time.markdown({"toy vocab": summary}, results.machine())
    assert "| L2 d32 V96 B2×T8 | dtensor megatron+vocab+sp |" in table
    assert "| L2 d32 V96 B2×T8 | tpfx megatron+vocab+sp / tpfx megatron+vocab |" in table


def test_counted_traffic_equals_the_communication_table_and_the_closed_form(ranks):
    traffic = step_time.summarize([r["steps"] for r in ranks], TOY_SPEC)["toy"]["traffic"]
    assert "tpfx gather" in traffic
    for name, figures in traffic.items():
        assert figures["measured_bytes"] > 0
        assert figures["equal"], f"{name}: {figures}"
        assert figures["calls"] == figures["closed_form_calls"], f"{name}: {figures}"


def test_pass_cost_and_result_files_at_toy_size(ranks, tmp_path):
    def toy_config(layers: int) -> GPTConfig:
        return GPTConfig(vocab_size=97, max_position_embeddings=16, n_layers=layers, n_heads=4, d_model=32,
                         d_ff=64, dropout=0.0)

    cost = pass_cost.measure((1, 2), config_for=toy_config)
    assert [row["layers"] for row in cost["rows"]] == [1, 2]
    assert all(0 < row["capture_s"] < row["total_s"] and row["export_s"] > 0 for row in cost["rows"])
    # the program's code is generated after capture, and is part of the rest
    assert all(0 < row["code_generation_s"] < row["after_capture_s"] for row in cost["rows"])
    assert all(0 <= row["garbage_collection_s"] < row["after_capture_s"] - row["code_generation_s"]
               for row in cost["rows"])
    assert all(entry["function"] != "tpfx/api.py:_compile" for entry in cost["profile_at_most_layers"]["gather"])
    run = {"machine": results.machine(), "settings": {"label": "toy"}, "pass_cost": cost,
           "steps": step_time.summarize([r["steps"] for r in ranks], TOY_SPEC)}
    paths = results.write(run, tmp_path)
    assert json.loads(paths[0].read_text())["steps"]["toy"]["median_ms"].keys() == run["steps"]["toy"]["median_ms"].keys()
    table = paths[1].read_text()
    assert "| toy (L2 d32 B2×T8) | tpfx gather |" in table and "| 2 |" in table
    assert paths[2].read_bytes().startswith(b"\x89PNG")


def test_garbage_collection_is_timed_inside_the_block_only():
    import gc

    parts: dict[str, float] = {}
    callbacks = list(gc.callbacks)
    gc.collect()  # outside the block: not counted
    with pass_cost._timing_garbage_collection(parts):
        cycles = [[] for _ in range(20000)]
        for cycle in cycles:
            cycle.append(cycle)
        del cycles, cycle
        gc.collect()
    gc.collect()
    assert parts["garbage_collection"] > 0
    assert gc.callbacks == callbacks


def test_a_quick_run_writes_apart_from_the_full_runs_committed_results():
    from benchmarks.__main__ import FULL_RESULTS, results_folder

    def refuse(message: str) -> None:
        raise SystemExit(message)

    assert results_folder(None, quick=False, error=refuse) == FULL_RESULTS
    quick = results_folder(None, quick=True, error=refuse)
    assert quick == FULL_RESULTS / "quick" and FULL_RESULTS in quick.parents
    ignored = (FULL_RESULTS.parent.parent / ".gitignore").read_text().splitlines()
    assert "benchmarks/results/quick/" in ignored  # never committed
    with pytest.raises(SystemExit, match="--quick would replace the full run's results"):
        results_folder(FULL_RESULTS / ".", quick=True, error=refuse)


def test_memory_benchmark_directory_path_at_toy_size(ranks, folder):
    """The code path of ``python -m benchmarks.memory --checkpoint directory``, without its 1 GB model."""
    paths = {name: [r["directory"][name] for r in ranks] for name in memory.DIRECTORY_PATHS}
    table = memory.rows(paths, idle=0, reference="tpfx directory")
    checks = memory.directory_checks(folder / "model", {mode: folder / f"saved_{mode}"
                                                        for mode in memory.DIRECTORY_PATHS.values()})
    assert checks["files"] >= 3 and checks["saved_equal"] == {"gather": True, "megatron": True}, checks
    for name, per_rank in table.items():
        for row in per_rank:
            assert row["logits_max_diff_vs_reference"] <= TOL, (name, row)
            assert min(row["peak_rss_after_save"], row["peak_rss"], row["own_param_bytes"], row["save_s"]) > 0, (name, row)
    text = memory.markdown({"config": {"n_layers": 2, "d_model": 32, "vocab_size": 97}, "model_param_bytes": 1e5,
                            "tp": 2, "idle_torch_rss": 0, "ranks": table, **checks})
    assert "a save_pretrained directory of" in text and "gather: yes, megatron: yes" in text
    assert text.count("| tpfx directory") == 4  # two modes, two ranks
