"""Vocabulary parallelism: the embedding split by rows, the LM head by vocabulary, the parallel cross-entropy.

One spawn per tp (2 and 4) runs every model in real gloo processes (fp32) against the single-device
model built from the same weights, in megatron mode with and without sequence parallelism
(``LAYOUTS``): the example GPT (untied) in several call forms, also in gather mode, with logits
gathered and sharded; a GPT with its embedding and head tied; a grouped-query model with gated FFNs
whose loss is ``nll_loss(log_softmax(...))`` (also in gather mode at tp=2); Hugging Face GPT-2 (tied)
through torch.export. The example GPT trains 20 AdamW steps with dropout on (megatron at tp=2,
megatron with sequence parallelism at both tp), every step's loss and gradients compared, then its
gathered state dict and a sharded load. Each rank also counts what its collectives are handed in one
step and compares it with the communication table. The checks that need no process group (finding,
plans, explain, the memory line, the graph's code) build one rank's program for inspection.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tpfx
from examples.gpt import GPTModel, small_config
from tests.models import GroupedLM, tie_embedding_and_head
from tests.multiprocess import run_ranks
from tests.parity import assert_close, grad_diffs, max_diff
from tpfx.cli import main
from tpfx.collectives import add_observer, gather_from_sequence, gather_from_tp, reduce_scatter_to_sequence
from tpfx.passes.comm_table import comm_table
from tpfx.rank_parts import embedding_rank_part

HAVE_HF = importlib.util.find_spec("transformers") is not None
VOCAB = 96  # divisible by 2 and 4


def _gpt(dropout: float = 0.0) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(small_config(vocab_size=VOCAB, d_model=32, n_heads=4, d_ff=64, max_position_embeddings=16,
                                 dropout=dropout)).eval()


def _tied_gpt() -> GPTModel:
    return tie_embedding_and_head(_gpt(), "token_embedding", "lm_head")


def _ids(batch: int = 2, seq: int = 8, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _outputs(out: object) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, loss) of any of the models' outputs."""
    if hasattr(out, "logits"):
        return out.logits, out.loss
    if isinstance(out, tuple):
        return out
    return (None, out) if out.dim() == 0 else (out, None)


def _step(model: nn.Module, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    logits, loss = _outputs(model(**kwargs))
    (loss if loss is not None else logits.pow(2).mean()).backward()
    return logits, loss


def _compare(gm: nn.Module, reference: nn.Module, kwargs: dict, *, rank: int, tp: int,
             sharded: bool = False) -> dict[str, float]:
    """Logits (this rank's columns when ``sharded``), loss and every gradient after one step of each."""
    (ref_logits, ref_loss), (logits, loss) = _step(reference, kwargs), _step(gm, kwargs)
    if sharded and ref_logits is not None:
        width = ref_logits.shape[-1] // tp
        ref_logits = ref_logits[..., rank * width:(rank + 1) * width]
    diffs = {"logits": max_diff(logits, ref_logits), "loss": max_diff(loss, ref_loss)}
    return diffs | {f"grad {name}": value for name, value in grad_diffs(gm, reference).items()}


def _observed(gm: nn.Module, kwargs: dict) -> list[tuple[str, str, int]]:
    """(direction, collective, bytes handed to it) of one forward and backward."""
    seen: list[tuple[str, str, int]] = []
    phase = ["forward"]
    remove = add_observer(lambda name, t: seen.append((phase[0], name, t.numel() * t.element_size())))
    try:
        _, loss = _outputs(gm(**kwargs))
        phase[0] = "backward"
        loss.backward()
    finally:
        remove()
    return seen


def _comm(gm: nn.Module, kwargs: dict, tp: int) -> dict[str, list]:
    """What the collectives are handed in one step, and what the communication table says."""
    return {"observed": _observed(gm, kwargs),
            "table": [(r.direction, r.collective, r.op, r.tensor_bytes) for r in comm_table(gm, kwargs, tp=tp).rows]}


def _state_diffs(gm: nn.Module, reference: nn.Module) -> dict[str, float]:
    """The program's gathered state dict (original keys, full shapes) against the single-device one."""
    state, expected = tpfx.full_state_dict(gm, rank0_only=False), reference.state_dict()
    assert state.keys() == expected.keys()
    return {name: max_diff(value, expected[name]) for name, value in state.items()}


# the layouts every model runs in, by name: the vocabulary rewrite is the same in each, the collectives
# around it are not (under sequence parallelism the lookup's sum is a reduce-scatter along the sequence
# and the head reads an all-gather of it)
LAYOUTS = {"gather": {"mode": "gather"}, "megatron": {"mode": "megatron"},
           "megatron+sp": {"mode": "megatron", "sequence_parallel": True}}


def _other_ids(layout: str) -> torch.Tensor:
    """A second call form's ids: 5 tokens, or 4 under sequence parallelism (tp must divide the sequence)."""
    return _ids(3, 4 if LAYOUTS[layout].get("sequence_parallel") else 5, seed=9)


def _models(rank: int, tp: int) -> dict[str, dict]:
    ids = _ids()
    results: dict[str, dict] = {}
    for layout, options in LAYOUTS.items():
        reference, other = _gpt(), _other_ids(layout)
        gm = tpfx.parallelize(reference, tp=tp, vocab_parallel=True, **options)
        forms = {"ids+labels": {"input_ids": ids, "labels": ids}, "ids": {"input_ids": other}}
        if layout != "gather":
            forms["ids+mask+labels"] = {"input_ids": other, "attention_mask": torch.ones_like(other), "labels": other}
        results[f"gpt {layout}"] = {form: _compare(gm, reference, kwargs, rank=rank, tp=tp)
                                    for form, kwargs in forms.items()}
        if layout != "gather":
            results.setdefault("comm", {})[f"gathered, {layout}"] = _comm(gm, forms["ids+labels"], tp)
    reference = _gpt()
    gm = tpfx.parallelize(reference, tp=tp, mode="megatron", vocab_parallel=True, logits="sharded")
    results["gpt logits sharded"] = {"ids+labels": _compare(gm, reference, {"input_ids": ids, "labels": ids},
                                                            rank=rank, tp=tp, sharded=True)}
    results["comm"]["sharded, megatron"] = _comm(gm, {"input_ids": ids, "labels": ids}, tp)
    for layout in ("megatron", "megatron+sp"):
        reference = _tied_gpt()
        gm = tpfx.parallelize(reference, tp=tp, vocab_parallel=True, **LAYOUTS[layout])
        results[f"tied gpt {layout}"] = {
            "ids+labels": _compare(gm, reference, {"input_ids": ids, "labels": ids}, rank=rank, tp=tp),
            "tied": float(gm.token_embedding.weight is not gm.lm_head.weight),
            "full state dict": _state_diffs(gm, reference)}
    for layout in ("gather", "megatron", "megatron+sp") if tp == 2 else ("megatron", "megatron+sp"):
        torch.manual_seed(0)
        reference = GroupedLM(vocab=VOCAB).eval()
        gm = tpfx.parallelize(reference, tp=tp, vocab_parallel=True, **LAYOUTS[layout])
        results[f"grouped {layout}"] = {"ids+labels": _compare(gm, reference, {"ids": ids, "labels": ids}, rank=rank,
                                                               tp=tp),
                                        "ids": _compare(gm, reference, {"ids": _other_ids(layout)}, rank=rank, tp=tp)}
    if HAVE_HF:
        from examples import hf_models

        for layout in ("megatron", "megatron+sp"):
            reference = hf_models.build("gpt2", n_layer=1)
            inputs = hf_models.example_inputs()
            gm = tpfx.parallelize(reference, tp=tp, vocab_parallel=True, example_inputs=inputs, **LAYOUTS[layout])
            other = hf_models.example_inputs(3, _other_ids(layout).shape[1], seed=4)
            results[f"hf gpt2 export {layout}"] = {"example": _compare(gm, reference, inputs, rank=rank, tp=tp),
                                                   "other shape": _compare(gm, reference, other, rank=rank, tp=tp),
                                                   "tracer": gm.tpfx_report.tracer}
    return results


ADAMW_STEPS = 20


def _adamw_steps(program: nn.Module, reference: nn.Module, kwargs: dict, steps: int) -> dict[str, float]:
    """``steps`` AdamW steps of each model in train mode, each step from its own random state (so the same
    dropout masks): the largest difference over the steps of the loss and of every gradient, and of every
    parameter after the last step.

    eps=1e-6: a key bias's gradient is zero (softmax ignores a shift of the scores), so in floating point it
    is rounding noise, which Adam's default eps (1e-8) would scale up to a full step of either sign.
    """
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6) for model in (program, reference)]
    worst: dict[str, float] = {}
    for step in range(steps):
        losses = []
        for model, optimizer in zip((program, reference), optimizers):
            torch.manual_seed(100 + step)
            optimizer.zero_grad(set_to_none=True)
            _, loss = _outputs(model(**kwargs))
            loss.backward()
            losses.append(loss)
        diffs = {"loss": max_diff(*losses)} | {f"grad {k}": v for k, v in grad_diffs(program, reference).items()}
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in diffs.items()}
        for optimizer in optimizers:  # the next step starts from the weights each model updated
            optimizer.step()
    specs = program.tpfx_plan.shard_specs()
    full = dict(reference.named_parameters())
    for name, value in program.named_parameters():
        worst[f"param {name}"] = max_diff(value, specs[name].take(full[name]) if name in specs else full[name])
    return worst


def _train(rank: int, tp: int, layout: str) -> dict[str, float]:
    """ADAMW_STEPS AdamW steps with dropout on (vocab parallel, in ``layout``): the loss, every gradient of
    every step and the parameters stay equal, the gathered state dict is the single-device one, and (megatron)
    loading that into a fresh program gives the same shards."""
    reference = _gpt(dropout=0.1).train()
    gm = tpfx.parallelize(reference, tp=tp, vocab_parallel=True, **LAYOUTS[layout])
    diffs = _adamw_steps(gm, reference, {"input_ids": _ids(), "labels": _ids(seed=8)}, ADAMW_STEPS)
    diffs |= {f"state {name}": value for name, value in _state_diffs(gm, reference).items()}
    if layout != "megatron":
        return diffs  # the sharded load below does not depend on the layout of the activations
    # a fresh program loads the trained single-device state dict: each rank reads its rows of the vocabulary
    fresh = tpfx.parallelize(_gpt(dropout=0.1).train(), tp=tp, vocab_parallel=True, **LAYOUTS[layout])
    tpfx.load_state_dict(fresh, reference.state_dict())
    held = dict(gm.named_parameters())
    return diffs | {f"loaded {name}": max_diff(value, held[name]) for name, value in fresh.named_parameters()}


def _world(rank: int, world_size: int) -> dict:
    trained = ("megatron", "megatron+sp") if world_size == 2 else ("megatron+sp",)
    return {"models": _models(rank, world_size), "train": {layout: _train(rank, world_size, layout)
                                                           for layout in trained}}


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def world(request) -> tuple[int, list[dict]]:
    return request.param, run_ranks(_world, request.param, timeout_s=600)


def test_logits_loss_and_every_gradient_match_single_device(world):
    tp, results = world
    for rank, result in enumerate(results):
        for model, forms in result["models"].items():
            if model == "comm":
                continue
            for form, diffs in forms.items():  # "full state dict": the tied program gathered
                if isinstance(diffs, dict):
                    assert len(diffs) > 10, (model, form)  # logits, loss and every parameter's gradient
                    assert_close(diffs, f"{model} {form} tp={tp} rank {rank}")
        expected = {"comm", "gpt logits sharded", *(f"{model} {layout}" for layout in ("megatron", "megatron+sp")
                                                    for model in ("gpt", "tied gpt", "grouped", "hf gpt2 export"))}
        expected |= {"gpt gather"} | ({"grouped gather"} if tp == 2 else set())
        assert set(result["models"]) == expected - (set() if HAVE_HF else {"hf gpt2 export megatron",
                                                                          "hf gpt2 export megatron+sp"})
        for layout in ("megatron", "megatron+sp"):
            assert result["models"][f"tied gpt {layout}"]["tied"] == 0.0  # the embedding and head hold one tensor
            if HAVE_HF:
                assert result["models"][f"hf gpt2 export {layout}"]["tracer"] == "export"


def test_adamw_steps_with_dropout_match_single_device(world):
    tp, results = world
    for rank, result in enumerate(results):
        assert set(result["train"]) == ({"megatron", "megatron+sp"} if tp == 2 else {"megatron+sp"})
        for layout, diffs in result["train"].items():
            assert len(diffs) > 40  # the loss, every gradient, parameter, state entry and loaded shard
            assert_close(diffs, f"{ADAMW_STEPS} AdamW steps, {layout} tp={tp} rank {rank}")


def test_comm_table_is_what_a_real_run_hands_the_collectives(world):
    tp, results = world
    tokens = 2 * 7  # shifted labels of (2, 8)
    for result in results:
        assert set(result["models"]["comm"]) == {"gathered, megatron", "gathered, megatron+sp", "sharded, megatron"}
        for logits, measured in result["models"]["comm"].items():
            observed, table = measured["observed"], measured["table"]
            assert Counter((d, op, size) for d, _, op, size in table) == Counter(observed), logits
            vocab_rows = [row for row in table if row[1] == "vocab_parallel_cross_entropy"]
            assert [row[3] for row in vocab_rows] == [tokens * 4, tokens * 2 * 4]  # the row maxima, (sum-exp, target)
            gathers = [size for _, _, op, size in table if op == "all_gather"]
            logits_gathers = [] if logits.startswith("sharded") else [2 * 8 * VOCAB // tp * 4]
            if logits.endswith("megatron+sp"):  # and slices of the stream (2 x 8/tp x 32 fp32), the gradient of the
                # position rows (8/tp x 32) split where they join it
                slices = {2 * 8 // tp * 32 * 4, 8 // tp * 32 * 4}
                assert set(gathers) - slices == set(logits_gathers) and slices <= set(gathers), gathers
                gathers = [size for size in gathers if size not in slices]
            # the loss in the graph: logits are gathered only for the output, and then once (2 x 8 x V/tp fp32)
            assert gathers == logits_gathers, logits


# ------------------------------------------------------------------------------- one rank, no process group


def test_the_token_table_and_head_are_found_by_structure_and_the_positions_stay_whole():
    plan = tpfx.parallelize(_gpt(), tp=2, rank=1, vocab_parallel=True).tpfx_plan
    assert plan.vocab.keys() == (("token_embedding",), ("lm_head",))
    assert plan.entry("token_embedding.weight").describe() == "vocab: dim 0 blocks [(48, 96)] of 96"
    assert plan.entry("lm_head.weight").describe() == "column: dim 0 blocks [(48, 96)] of 96"
    # positions are looked up by ids the model computes (arange), not by a graph input
    assert plan.entry("position_embedding.weight").spec is None


def test_tied_table_and_head_are_one_tensor_with_one_shard():
    gm = tpfx.parallelize(_tied_gpt(), tp=2, rank=0, mode="megatron", vocab_parallel=True)
    plan = gm.tpfx_plan
    assert plan.tied == (("token_embedding.weight", "lm_head.weight"),)
    assert plan.entry("token_embedding.weight").spec == plan.entry("lm_head.weight").spec is not None
    assert gm.token_embedding.weight is gm.lm_head.weight and gm.lm_head.weight.shape == (48, 32)


def _gathers_downstream(gm: nn.Module, module: str) -> list[str]:
    """The all-gathers (of the vocabulary or of the sequence) that read ``module``'s output, at any distance."""
    (start,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == module]
    reached, work = set(), [start]
    while work:
        for user in work.pop().users:
            if user not in reached:
                reached.add(user)
                work.append(user)
    return [n.name for n in reached if getattr(n.target, "__name__", "") in
            ("gather_from_tp", "gather_from_sequence", "gather_sequence_whole")]


def test_with_the_loss_in_the_graph_no_logits_are_gathered():
    ids = _ids()
    for layout, options in LAYOUTS.items():  # a model that returns only the loss when given labels
        torch.manual_seed(0)
        gm = tpfx.parallelize(GroupedLM(vocab=VOCAB), tp=2, rank=0, vocab_parallel=True, example_inputs=(ids, ids),
                              **options)
        assert "vocab_parallel_cross_entropy" in gm.code and "nll_loss" not in gm.code and "log_softmax" not in gm.code
        assert _gathers_downstream(gm, "head") == [], layout
    for layout in ("megatron", "megatron+sp"):
        # the example GPT returns the logits too: "sharded" leaves them split, so nothing is gathered after the head
        sharded = tpfx.parallelize(_gpt(), tp=2, rank=0, vocab_parallel=True, logits="sharded",
                                   example_inputs=(ids, None, ids), **LAYOUTS[layout])
        assert "gather_from_tp" not in sharded.code and "vocab_parallel_cross_entropy" in sharded.code
        assert _gathers_downstream(sharded, "lm_head") == [], layout
        # gathered (default): one all-gather, for the output only; the loss reads this rank's logits
        gathered = tpfx.parallelize(_gpt(), tp=2, rank=0, vocab_parallel=True, example_inputs=(ids, None, ids),
                                    **LAYOUTS[layout])
        (gather,) = gathered.graph.find_nodes(op="call_function", target=gather_from_tp)
        assert _gathers_downstream(gathered, "lm_head") == [gather.name], layout
        assert [user.op for user in gather.users] == ["output"]
    # under sequence parallelism the head reads the sequence gathered (its input), never the logits
    assert sharded.graph.find_nodes(op="call_module", target="lm_head")[0].args[0].target is gather_from_sequence


def test_an_exported_lookup_is_reduce_scattered_along_the_sequence():
    # torch.export spells the lookup aten.embedding; its rank part keeps the lookup's shape, so under sequence
    # parallelism its sum is the region's first reduce-scatter (Hugging Face GPT-2 crashed when it was not:
    # the all-reduced whole sequence met the position rows already split)
    ids = _ids()
    torch.manual_seed(0)
    gm = tpfx.parallelize(GroupedLM(vocab=VOCAB), tp=2, rank=0, mode="megatron", vocab_parallel=True,
                          sequence_parallel=True, tracer="export", example_inputs=(ids, ids))
    (lookup,) = gm.graph.find_nodes(op="call_function", target=embedding_rank_part)
    assert [user.target for user in lookup.users] == [reduce_scatter_to_sequence]
    assert gm.tpfx_report.sequence_summary().startswith("sequence parallel: 10 ops on 1/tp of the sequence; "
                                                        "5 reduce-scatter(s) in")


def test_parameter_bytes_per_rank_of_the_example_gpt_are_at_most_0_52_of_one_device(capsys):
    from examples.gpt import tiny_gpt

    model = tiny_gpt()
    single = sum(p.numel() * p.element_size() for p in model.parameters())
    gm = tpfx.parallelize(model, tp=2, rank=1, mode="megatron", vocab_parallel=True)
    held = sum(p.numel() * p.element_size() for p in gm.parameters())
    assert held <= 0.52 * single and held / single < 0.51, held / single
    assert main(["dump", "examples/gpt.py:tiny_gpt", "--tp", "2", "--rank", "1", "--mode", "megatron",
                 "--vocab-parallel"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(line for line in lines if line.startswith("single device:"))
    assert line == f"single device: {single:,} bytes; rank 1: {held:,} bytes ({held / single:.1%})"
    assert lines[-1].startswith("activations of one training step at input_ids: int64[2, 16]: ")


def test_sites_table_explain_and_diff_show_the_vocabulary_parts(capsys):
    options = ["--tp", "2", "--mode", "megatron", "--vocab-parallel"]
    assert main(["dump", "examples/gpt.py:tiny_gpt_with_inputs", "--format", "json", "--diff", *options]) == 0
    document = json.loads(capsys.readouterr().out)
    rows = {row["module"]: row for row in document["sites"]}
    assert rows["token_embedding"] | {} == {"module": "token_embedding", "role": "embedding", "weight": [10000, 128],
                                            "shard": [5000, 128], "collectives": ["reduce_from_tp"]}
    assert rows["lm_head"]["shard"] == [5000, 128] and rows["lm_head"]["collectives"] == [
        "copy_to_tp", "vocab_parallel_cross_entropy", "gather_from_tp"]
    communication = document["communication"]["rows"]
    statistics = [(r["module"], r["shape"]) for r in communication if r["collective"] == "vocab_parallel_cross_entropy"]
    assert statistics == [("lm_head", [30]), ("lm_head", [30, 2])]  # 2 x 15 shifted tokens
    assert document["memory"]["vocab_parallel_rank_bytes"] * 2 == document["memory"]["vocab_parallel_single_device_bytes"]
    assert main(["explain", "examples/gpt.py:tiny_gpt_with_inputs", "--format", "json", *options]) == 0
    linears = {row["module"]: row for row in json.loads(capsys.readouterr().out)["linears"]}
    assert linears["token_embedding"]["sharded"] and "split by vocabulary (5000 per rank" in linears["token_embedding"]["reason"]
    assert linears["lm_head"]["sharded"] and linears["lm_head"]["reason"].startswith(
        "LM head: its 10000 output features are the vocabulary, column-split (5000 per rank, no gather); "
        "cross-entropy over its logits replaced by the vocabulary-parallel one")
    added = [line for line in document["graph"]["diff"].splitlines() if line.startswith("+")]
    assert any("vocab_parallel_cross_entropy(" in line for line in added)
    assert any("reduce_from_tp(token_embedding" in line for line in added)


def test_a_vocabulary_tp_does_not_divide_stays_whole_with_the_reason(capsys):
    torch.manual_seed(0)
    model = GPTModel(small_config(vocab_size=97, d_model=32, n_heads=4, d_ff=64, max_position_embeddings=16))
    gm = tpfx.parallelize(model, tp=2, rank=0, vocab_parallel=True)
    for name in ("token_embedding.weight", "lm_head.weight"):
        entry = gm.tpfx_plan.entry(name)
        assert entry.spec is None and "not divisible by tp=2" in entry.reason, entry.reason
    decisions = {row["module"]: row for row in gm.tpfx_report.linear_decisions()}
    assert not decisions["lm_head"]["sharded"] and not decisions["token_embedding"]["sharded"]
    assert decisions["lm_head"]["reason"].startswith("LM head kept whole: its 97 output features (the vocabulary) "
                                                     "are not divisible by tp=2")
    assert "cross_entropy(" in gm.code and "vocab_parallel" not in gm.code


def test_options_are_checked():
    with pytest.raises(tpfx.ConfigError, match="logits='sharded' needs vocab_parallel=True"):
        tpfx.parallelize(_gpt(), tp=2, rank=0, logits="sharded")
    with pytest.raises(tpfx.ConfigError, match="logits='all' is not an option"):
        tpfx.parallelize(_gpt(), tp=2, rank=0, vocab_parallel=True, logits="all")


def test_ops_the_region_does_not_know_read_gathered_logits():
    class Sampler(nn.Module):  # softmax over the vocabulary, label smoothing: both need the full logits
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

        def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            logits = self.head(self.embed(ids)).float()
            smoothed = F.cross_entropy(logits.view(-1, VOCAB), ids.view(-1), label_smoothing=0.1)
            return logits, logits.softmax(dim=-1), smoothed

    with pytest.warns(tpfx.NoSitesWarning):  # no attention or FFN: only the vocabulary is split
        gm = tpfx.parallelize(Sampler(), tp=2, rank=0, vocab_parallel=True)
    gathers = {n.args[0].target: sorted(str(getattr(u.target, "__name__", u.target)) for u in n.users)
               for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "gather_from_tp"}
    # the output and the softmax read the gathered float(); the label-smoothed loss the gathered view, which
    # keeps the logits split (its literal vocabulary size is this rank's)
    assert gathers == {"float": ["output", "softmax"], "view": ["cross_entropy"]}
    assert "view(-1, 48)" in gm.code and "vocab_parallel" not in gm.code


def test_the_op_registry_reads_every_spelling_of_lookups_and_losses():
    aten = torch.ops.aten

    def losses(x, t, w):
        return (F.cross_entropy(x, t, reduction="sum"), aten.cross_entropy_loss.default(x, t, None, 0, -1),
                F.nll_loss(x, t, weight=w), aten.nll_loss_nd.default(x, t), F.cross_entropy(x, t, label_smoothing=0.2))

    def lookups(ids, w):
        return aten.embedding.default(w, ids, 3), aten.embedding.default(w, ids), F.embedding(ids, w, max_norm=1.0)

    from tpfx.passes.ops import embedding_call, loss_call

    calls = [loss_call(n) for n in torch.fx.symbolic_trace(losses).graph.nodes if loss_call(n) is not None]
    assert [(c.reduction, c.ignore_index, c.log_probabilities, c.unsupported) for c in calls] == [
        ("sum", -100, False, ""), ("none", -1, False, ""), ("mean", -100, True, "class weights"),
        ("mean", -100, True, ""), ("mean", -100, False, "label smoothing")]
    graph = torch.fx.symbolic_trace(lookups).graph
    found = [embedding_call(n, {}) for n in graph.nodes if embedding_call(n, {}) is not None]
    assert [(c.ids.name, c.weight.name, c.padding_idx, c.max_norm) for c in found] == [
        ("ids", "w", 3, None), ("ids", "w", None, None), ("ids", "w", None, 1.0)]


def test_a_tied_table_stays_whole_with_its_head_and_says_why():
    model = _tied_gpt()
    model.lm_head.register_forward_hook(lambda module, args, output: output)  # would see a shard of the logits
    gm = tpfx.parallelize(model, tp=2, rank=0, vocab_parallel=True)
    head, table = gm.tpfx_plan.entry("lm_head.weight"), gm.tpfx_plan.entry("token_embedding.weight")
    assert head.spec is None and table.spec is None
    assert "forward hook" in head.reason, head.reason
    assert "it is one tensor with 'lm_head.weight' (tied), which stays whole" in table.reason, table.reason
    assert "vocab_parallel" not in gm.code and "reduce_from_tp" not in gm.code


def test_activation_bytes_are_what_a_real_step_saves_and_shrink_with_the_vocabulary_split():
    from tpfx.passes.activation_memory import activation_bytes

    model, inputs = _gpt(), {"input_ids": _ids(), "labels": _ids()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not (tensor.is_leaf and tensor.requires_grad):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs)  # the single device, for real
    whole = activation_bytes(tpfx.parallelize(model, tp=1, rank=0), inputs, tp=1)
    assert whole == sum(saved.values()) > 0
    split = {vocab: activation_bytes(tpfx.parallelize(model, tp=2, rank=0, mode="megatron", vocab_parallel=vocab),
                                     inputs, tp=2) for vocab in (False, True)}
    logits = 2 * 8 * VOCAB * 4  # saved by the head's consumers: halved with the vocabulary split
    assert split[True] < split[False] - logits // 2, split
