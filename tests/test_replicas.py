"""The replica check and the call check, in one spawn of 2 gloo ranks.

Ranks that hold different weights, configurations or dropout random state used to run to
completion with outputs that differ across ranks; now ``parallelize`` raises one line naming the
first differing tensor (or graph node) and the ranks, on every rank. Ranks called with different
batch sizes used to abort inside gloo (SIGABRT); now every rank raises one line before the program's
first collective. A group with torch's default timeout gets one warning. The sequence-parallel and
vocabulary-parallel collectives fail, like the others, in one line naming the collective and the
program line (three real gloo timeouts of 1 s, on groups rank 1 leaves waiting). A group of the
caller's whose ranks have made different numbers of groups gets a warning and a working program,
where tpfx's own check group used to wait until the timeout.
"""

from __future__ import annotations

import datetime
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

import tpfx
from examples.gpt import GPTModel, small_config
from tests.multiprocess import run_ranks
from tpfx.collectives import bind_group, gather_from_sequence, vocab_parallel_cross_entropy

CONFIG = {"vocab_size": 64, "max_position_embeddings": 16, "n_layers": 1, "n_heads": 4, "d_model": 32, "d_ff": 64,
          "dropout": 0.0}


def _model(seed: int = 0, **overrides: float) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(small_config(**{**CONFIG, **overrides})).eval()


def _error(build) -> str:
    """The one-line message of the TpfxError that ``build()`` raises ("" when it raises none)."""
    try:
        build()
    except tpfx.TpfxError as error:
        assert "\n" not in str(error), str(error)
        return f"{type(error).__name__}: {error}"
    return ""


def _ids(batch: int) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (batch, 8), generator=torch.Generator().manual_seed(1))


def _world2(rank: int, world_size: int) -> dict[str, str]:
    results: dict[str, str] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = tpfx.parallelize(_model(), tp=2, tracer="fx", check_calls=True)  # the call check: a debug mode
    results["same model"] = _error(lambda: None)
    results["warned (group with a timeout)"] = str(any(issubclass(w.category, tpfx.DefaultTimeoutWarning)
                                                       for w in caught))

    different = _model()
    if rank == 1:
        with torch.no_grad():
            different.blocks[0].ffn.fc2.weight[3, 5] += 1e-3  # one value, on one rank
    results["weights"] = _error(lambda: tpfx.parallelize(different, tp=2, tracer="fx"))
    results["weights, check off"] = _error(lambda: tpfx.parallelize(different, tp=2, tracer="fx",
                                                                    check_replicas=False))
    other = _model() if rank == 0 else _model(n_heads=2)  # another configuration: other reshapes
    results["configuration"] = _error(lambda: tpfx.parallelize(other, tp=2, tracer="fx"))

    torch.manual_seed(0)
    training = GPTModel(small_config(**{**CONFIG, "dropout": 0.1})).train()
    torch.manual_seed(rank)  # the dropout masks would differ between ranks
    results["random state"] = _error(lambda: tpfx.parallelize(training, tp=2, tracer="fx"))
    torch.manual_seed(5)
    results["random state, same seed"] = _error(lambda: tpfx.parallelize(training, tp=2, tracer="fx"))

    results["batch sizes"] = _error(lambda: gm(_ids(2 if rank == 0 else 3)))
    results["same batch"] = _error(lambda: gm(_ids(2)))
    # compiled: the check runs before each call of the compiled program, outside its graph
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    results["compiled, same batch"] = _error(lambda: compiled(_ids(2)))
    results["compiled, batch sizes"] = _error(lambda: compiled(_ids(2 if rank == 0 else 3)))

    default_group = dist.new_group([0, 1])  # no timeout: torch's 30 minutes
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tpfx.parallelize(_model(), group=default_group, tracer="fx")
        tpfx.parallelize(_model(), group=default_group, tracer="fx")
    results["default timeout warnings"] = str(sum(issubclass(w.category, tpfx.DefaultTimeoutWarning)
                                                  for w in caught))
    return results | _uneven_group_counts(rank) | _lonely_collectives(rank)


def _uneven_group_counts(rank: int) -> dict[str, str]:
    """A group of the caller's whose ranks have made different numbers of groups (rank 0 one more, made by
    itself alone): torch would give the check group tpfx makes of them a different name on each rank, and
    both would wait until the timeout. tpfx warns and runs its checks on the given group."""
    if rank == 0:
        dist.new_group([0], use_local_synchronization=True)
    given = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=60))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = tpfx.parallelize(_model(), group=given, tracer="fx", check_calls=True)
    logits, _ = gm(_ids(2))
    reference, _ = _model()(_ids(2))
    return {"uneven counts: warning": " | ".join(str(w.message) for w in caught if "numbers of process groups" in str(w.message)),
            "uneven counts: logits diff": str((logits - reference).abs().max().item()),
            "uneven counts: other batch": _error(lambda: gm(_ids(2 if rank == 0 else 3)))}


def _program(collective, *arguments: object, inputs: int = 1) -> fx.GraphModule:
    """A program whose one node calls ``collective(<inputs placeholders>, *arguments)``, as tpfx's rewrites
    insert them: its generated code is the program line a failure names."""
    graph = fx.Graph()
    placeholders = [graph.placeholder(f"x{index}") for index in range(inputs)]
    graph.output(graph.call_function(collective, (*placeholders, *arguments)))
    return fx.GraphModule(nn.Module(), graph)


def _lonely_collectives(rank: int) -> dict[str, str]:
    """Rank 0 runs a sequence collective forward, one backward and the vocab-parallel loss on three groups
    with a 1 s timeout that rank 1 never joins (after the one forward both run): the one-line errors."""
    keys = ("tp:forward", "tp:backward", "tp:loss")
    for key in keys:
        bind_group(key, dist.new_group([0, 1], timeout=datetime.timedelta(seconds=1)))
    x = torch.randn(2, 4, 8, requires_grad=True)
    gathered = _program(gather_from_sequence, 1, "tp:backward")(x)  # both ranks: the forward succeeds
    errors = []
    if rank == 0:
        logits, target = torch.randn(6, 8), torch.randint(0, 16, (6,))
        lonely = [lambda: _program(gather_from_sequence, 1, "tp:forward")(x),
                  lambda: gathered.sum().backward(),
                  lambda: _program(vocab_parallel_cross_entropy, "tp:loss", inputs=2)(logits, target)]
        with ThreadPoolExecutor(len(lonely)) as pool:  # the three timeouts at once
            errors = list(pool.map(_error, lonely))
    dist.barrier()  # rank 1 stays (its groups open) until rank 0's collectives have timed out
    return dict(zip(("sequence forward", "sequence backward", "vocab loss"), errors))


@pytest.fixture(scope="module")
def world2() -> list[dict[str, str]]:
    return run_ranks(_world2, 2)


def test_identical_replicas_pass_and_a_group_with_a_timeout_is_not_warned_about(world2):
    for results in world2:
        assert results["same model"] == "" and results["warned (group with a timeout)"] == "False"
        assert results["weights, check off"] == ""
        assert results["random state, same seed"] == "" and results["same batch"] == ""


def test_a_differing_weight_is_named_with_the_ranks_on_every_rank(world2):
    for results in world2:
        message = results["weights"]
        assert message.startswith("ReplicaError:"), message
        assert "'blocks.0.ffn.fc2.weight' holds different values on rank(s) 1" in message, message
        assert "check_replicas=False" in message


def test_another_configuration_and_another_dropout_random_state_are_found(world2):
    for results in world2:
        assert results["configuration"].startswith("ReplicaError:"), results["configuration"]
        assert "rank 1 captured a different graph from rank 0's, first at node" in results["configuration"]
        assert "dropout random state differs between rank 0 and rank(s) 1" in results["random state"]
        assert "torch.manual_seed" in results["random state"]


def test_different_batch_sizes_raise_one_line_on_every_rank_instead_of_aborting(world2):
    for results in world2:
        assert results["compiled, same batch"] == "", results["compiled, same batch"]
        for message in (results["batch sizes"], results["compiled, batch sizes"]):  # eager, then compiled
            assert message.startswith("CollectiveError:") and "different inputs" in message, message
            assert "rank 0: first tensor [2, 8]" in message and "rank 1: first tensor [3, 8]" in message


def test_sequence_and_vocab_collectives_fail_in_one_line_naming_the_collective_and_the_program_line(world2):
    expected = {"sequence forward": ("all_gather of group tp:forward at program line", "gather_from_sequence("),
                "sequence backward": ("reduce_scatter (backward) of group tp:backward at program line",
                                      "gather_from_sequence("),
                "vocab loss": ("all_reduce of group tp:loss at program line", "vocab_parallel_cross_entropy(")}
    for name, texts in expected.items():
        message = world2[0][name]
        assert message.startswith("CollectiveError:") and "within the group timeout" in message, message
        assert all(text in message for text in texts), message


def test_a_group_with_torchs_default_timeout_is_warned_about_once(world2):
    assert [results["default timeout warnings"] for results in world2] == ["1", "1"]


def test_ranks_of_a_given_group_with_different_group_counts_get_a_warning_and_a_working_program(world2):
    for rank, results in enumerate(world2):
        counts = re.search(r"ranks \[0, 1\] of the given group have made different numbers of process groups "
                           r"\(\[(\d+), (\d+)\]\)", results["uneven counts: warning"])
        assert counts and int(counts[1]) == int(counts[2]) + 1, results["uneven counts: warning"]
        assert float(results["uneven counts: logits diff"]) <= 1e-5, rank
        # the call check still names the differing batch: every rank makes it, on the given group
        assert "called the program with different inputs" in results["uneven counts: other batch"], rank
