"""Sequence parallelism in megatron mode (passes/sequence_parallel.py): the rewritten graph, and parity in
real gloo processes (fp32).

One spawn per tp (2 and 4). Each rank checks, against the single-device model with the same weights:
the example GPT in train mode with dropout for several AdamW steps (logits, loss and every gradient
of each step, each from the weights the previous steps updated), the grouped-query model with a gated FFN
the model on flattened tokens (GPT-2's Conv1D style) and the one with a cumsum and a mean over the
sequence between its blocks, of tests/models.py,
Hugging Face LLaMA through torch.export, the communication table's all-gather / reduce-scatter rows
against the bytes the collectives are handed, and a sequence length tp does not divide.
"""

from __future__ import annotations

import operator

import importlib.util
from collections import Counter

import pytest
import torch
import torch.nn as nn

import tpfx
from examples.gpt import GPTModel, small_config
from tests.models import WIDTH, FlatTokens, Grouped, TokenMixing
from tests.multiprocess import run_ranks
from tests.parity import grad_diffs, max_diff, observed_collectives
from tpfx.collectives import (copy_to_tp, sum_gradients_over_tp, gather_from_sequence, gather_sequence_whole, reduce_from_tp,
                              reduce_scatter_to_sequence, split_to_sequence)
from tpfx.errors import ConfigError, ShardingError
from tpfx.passes.activation_memory import activation_bytes
from tpfx.passes.comm_table import comm_table
from tpfx.rank_parts import call_with_parameters, dropout_module_rank_part

HAVE_HF = importlib.util.find_spec("transformers") is not None
TOL = 1e-5
STEPS = 3


def _gpt(dropout: float = 0.1) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(small_config(vocab_size=96, d_model=32, d_ff=64, n_heads=4, dropout=dropout))


def _ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _calls(gm: nn.Module) -> list[tuple[object, torch.fx.Node]]:
    """(target, node) of every call_function node, in graph order."""
    return [(n.target, n) for n in gm.graph.nodes if n.op == "call_function"]


# ------------------------------------------------------------------------------------ the rewritten graph

@pytest.fixture(scope="module")
def program() -> nn.Module:
    """Rank 0's sequence-parallel program of the example GPT (train mode, dropout 0.1), for inspection."""
    return tpfx.parallelize(_gpt().train(), tp=2, rank=0, mode="megatron", sequence_parallel=True)


def test_block_reads_the_sequence_gathered_and_leaves_it_reduce_scattered(program):
    gm = program
    targets = [target for target, _ in _calls(gm)]
    assert reduce_from_tp not in targets  # every row sum is a reduce-scatter now
    assert targets.count(reduce_scatter_to_sequence) == targets.count(gather_from_sequence) == 4
    modules = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    for pair in gm.tpfx_pairing.pairs:
        column, row = modules[pair.columns[0].module_path], modules[pair.row_module_path]
        assert column.args[0].target is gather_from_sequence and column.args[0].args[1] == -2
        assert [user.target for user in row.users] == [reduce_scatter_to_sequence]
    # the stream's norms run on the slice with gradient-summed parameters, its dropouts draw the whole mask
    norms = [n for target, n in _calls(gm) if target is call_with_parameters]
    assert len(norms) == 5
    # their gradients, and the row linears' biases', are summed in one collective: 5 norms x (weight, bias)
    # and 2 x 2 biases, each the item of one sum_gradients_over_tp (not 14 all-reduces of their own)
    (bucket,) = [n for t, n in _calls(gm) if t is sum_gradients_over_tp]
    assert len(bucket.args[0]) == 14 and all(read.op == "get_attr" for read in bucket.args[0])
    assert all(c.target is operator.getitem and c.args[0] is bucket for n in norms for c in n.args[1].values())
    assert not [n for t, n in _calls(gm) if t is copy_to_tp and n.args[0].op == "get_attr"]
    assert sum(1 for t, n in _calls(gm) if t is dropout_module_rank_part and n.args[2] == -2) == 5
    # whole on the way in (after the embeddings' sum), gathered whole for the LM head
    (split,) = [n for t, n in _calls(gm) if t is split_to_sequence]
    assert [a.op for a in split.args[0].all_input_nodes] == ["call_module", "call_module"]  # token + position
    assert modules["lm_head"].args[0].target is gather_sequence_whole
    assert "sequence parallel: 22 ops" in gm.tpfx_report.sequence_summary()
    assert "reduce-scatter along the sequence" in {r["module"]: r["reason"] for r in
                                                   gm.tpfx_report.linear_decisions()}["blocks.0.ffn.fc2"]


def test_collectives_on_flattened_tokens_move_to_the_sequence_dim():
    gm = tpfx.parallelize(FlatTokens(), tp=2, rank=0, mode="megatron", sequence_parallel=True)
    modules = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    # fc1 of the second block reads the gathered sequence flattened again; each fc2's sum is reduce-scattered
    # after the view that restores (batch, seq, width)
    assert modules["fc1s.1"].args[0].args[0].target is gather_from_sequence
    for fc2 in ("fc2s.0", "fc2s.1"):
        (view,) = modules[fc2].users
        assert [user.target for user in view.users] == [reduce_scatter_to_sequence]


def test_ops_that_mix_tokens_read_the_whole_sequence():
    gm = tpfx.parallelize(TokenMixing(), tp=2, rank=0, mode="megatron", sequence_parallel=True)
    mixing = [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("cumsum", "mean")]
    assert len(mixing) == 2 and all(n.args[0].target is gather_sequence_whole for n in mixing)
    (cumsum, mean) = mixing
    # the running sum goes back to the slice; the mean (no sequence dim, from the weights) is read on the
    # slice by the subtraction, so its gradient, each rank's tokens' share, is summed over the ranks
    assert [u.target for u in cumsum.users] == [split_to_sequence]
    assert [u.target for u in mean.users] == [copy_to_tp]
    assert [u.target for u in gm.graph.output_node().all_input_nodes] == [gather_sequence_whole]


def test_sequence_parallel_needs_megatron_mode_and_lowers_activation_bytes(program):
    with pytest.raises(ConfigError, match="sequence_parallel=True needs mode='megatron'"):
        tpfx.parallelize(_gpt(), tp=2, rank=0, sequence_parallel=True)
    inputs = {"input_ids": _ids(2, 16), "labels": _ids(2, 16)}
    plain = tpfx.parallelize(_gpt().train(), tp=2, rank=0, mode="megatron")
    measured = {sp: activation_bytes(gm, inputs, tp=2) for sp, gm in ((False, plain), (True, program))}
    assert 0 < measured[True] < measured[False]


def test_cli_flag_shows_the_region_and_activation_bytes(capsys):
    from tpfx.cli import main

    assert main(["dump", "examples/gpt.py:tiny_gpt", "--mode", "megatron", "--sequence-parallel", "--format",
                 "json", "--seq", "8"]) == 0
    import json

    document = json.loads(capsys.readouterr().out)
    assert document["options"] == {"mode": "megatron", "sequence_parallel": True}
    assert document["sequence_parallel"].startswith("sequence parallel: 22 ops")
    ops = Counter((r["direction"], r["op"]) for r in document["communication"]["rows"])
    assert ops[("forward", "reduce_scatter")] == ops[("backward", "reduce_scatter")] == 4
    assert document["memory"]["activation_bytes"] > 0


# ------------------------------------------------------------------------------------ real processes

def _adamw_steps(rank: int, tp: int) -> dict[str, float]:
    """STEPS AdamW steps in train mode (dropout 0.1 in the stream and between the pairs), one random state each."""
    reference = _gpt().train()
    gm = tpfx.parallelize(reference, tp=tp, mode="megatron", sequence_parallel=True)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-2) for model in (reference, gm)]
    worst: dict[str, float] = {}
    for step in range(STEPS):
        ids = _ids(seed=step)
        results = []
        for model, optimizer in zip((reference, gm), optimizers):
            torch.manual_seed(100 + step)
            optimizer.zero_grad(set_to_none=True)
            logits, loss = model(ids, labels=ids)
            loss.backward()
            results.append((logits, loss))
        diffs = {"logits": max_diff(results[1][0], results[0][0]), "loss": max_diff(results[1][1], results[0][1])}
        diffs |= {f"grad {k}": v for k, v in grad_diffs(gm, reference).items()}
        for optimizer in optimizers:  # the next step starts from the updated weights of each
            optimizer.step()
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in diffs.items()}
    return worst


def _module(make: type[nn.Module], tp: int) -> dict[str, float]:
    """Output and every gradient of one forward and backward (loss: the output's square mean) on (2, 8, WIDTH)."""
    torch.manual_seed(0)
    reference = make().eval()
    gm = tpfx.parallelize(reference, tp=tp, mode="megatron", sequence_parallel=True)
    assert gm.tpfx_report.sequence_split()
    x = torch.randn(2, 8, WIDTH, generator=torch.Generator().manual_seed(3))
    outs = []
    for model in (reference, gm):
        out = model(x)
        out.pow(2).mean().backward()
        outs.append(out)
    return {"output": max_diff(outs[1], outs[0])} | {f"grad {k}": v for k, v in grad_diffs(gm, reference).items()}


def _llama(tp: int) -> dict[str, float]:
    from examples import hf_models

    reference = hf_models.build("llama", num_hidden_layers=1, num_key_value_heads=2)
    inputs = hf_models.example_inputs()
    gm = tpfx.parallelize(reference, tp=tp, mode="megatron", sequence_parallel=True, example_inputs=inputs)
    ref, par = reference(**inputs), gm(**inputs)
    ref.loss.backward()
    par.loss.backward()
    diffs = {"logits": max_diff(par.logits, ref.logits), "loss": max_diff(par.loss, ref.loss)}
    assert gm.tpfx_report.tracer == "export" and gm.tpfx_report.sequence_split()
    return diffs | {f"grad {k}": v for k, v in grad_diffs(gm, reference).items()}


def _communication_and_indivisible(tp: int) -> dict[str, object]:
    """(direction, op, bytes) of every collective in one training step, as handed to them and as the table's
    rows; and the message of a call with a sequence length tp does not divide."""
    gm = tpfx.parallelize(_gpt(0.0).eval(), tp=tp, mode="megatron", sequence_parallel=True)
    inputs = {"input_ids": _ids(), "labels": _ids()}
    seen = observed_collectives(gm, inputs)
    table = [(r.direction, r.op, r.tensor_bytes) for r in comm_table(gm, inputs, tp=tp).rows]
    try:
        gm(_ids(seq=tp * 2 + 1), labels=_ids(seq=tp * 2 + 1))
        refused = ""
    except ShardingError as error:
        refused = str(error)
    return {"seen": sorted(seen), "table": sorted(table), "indivisible": refused}


def _world(rank: int, world_size: int) -> dict:
    # at tp=4 the grouped model's 2 key/value heads stay whole on every rank
    result = {"gpt adamw": _adamw_steps(rank, world_size),
              "grouped gated ffn": _module(lambda: Grouped(kv_heads=2), world_size),
              "flat tokens (Conv1D style)": _module(FlatTokens, world_size),
              "cumsum and mean over the sequence": _module(TokenMixing, world_size)}
    if HAVE_HF:
        result["hf llama (export)"] = _llama(world_size)
    return {"diffs": result, "communication": _communication_and_indivisible(world_size)}


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def world(request) -> tuple[int, list[dict]]:
    return request.param, run_ranks(_world, request.param)


def test_logits_loss_gradients_and_adamw_steps_match_single_device(world):
    tp, results = world
    for rank, result in enumerate(results):
        assert ("hf llama (export)" in result["diffs"]) == HAVE_HF
        for label, diffs in result["diffs"].items():
            assert len(diffs) > 5, label  # output, loss and every parameter's gradient
            bad = {k: v for k, v in diffs.items() if not v <= TOL}
            assert not bad, f"{label} tp={tp} rank {rank}: {bad}"


def test_comm_table_rows_are_the_bytes_the_collectives_are_handed(world):
    tp, results = world
    for result in results:
        seen, table = result["communication"]["seen"], result["communication"]["table"]
        assert seen == [tuple(row) for row in table]
        ops = Counter((direction, op) for direction, op, _ in seen)
        assert ops[("forward", "reduce_scatter")] == ops[("backward", "all_gather")] - 1 == 4  # + the entry split
        assert ops[("forward", "all_gather")] == ops[("backward", "reduce_scatter")] + 1 == 5  # + the LM head's


def test_a_sequence_tp_does_not_divide_is_refused_in_one_line(world):
    tp, results = world
    for result in results:
        message = result["communication"]["indivisible"]
        assert f"sequence length {2 * tp + 1}" in message and f"not divisible by tp={tp}" in message
        assert "pad the sequence" in message and "\n" not in message
