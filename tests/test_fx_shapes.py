"""Symbolic shapes on fx captures, and what the Megatron analysis does with them.

* every node of an fx capture carries ``meta["val"]``: batch and sequence symbolic, feature sizes known,
  from the example inputs or from the documented assumption (and none at all when that fails);
* ``B, T, C = x.size(); k.view(B, T, self.n_head, C // self.n_head)`` (nanoGPT's idiom) pairs in megatron
  mode: ``C // n_head`` is a known number;
* a size read of a split dim (``h.shape[-1]`` after fc1) that flows out of the shape arguments of its pair
  gets the single-device size (``read * tp``), or the pair falls back with a one-line reason;
* parity in real processes (world 4: tp=2 and tp=4), both modes, fx and torch.export.

The models are written here.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import tpfx
from tpfx.capture import capture, forward_signature
from tpfx.passes.fake_shapes import BATCH_HINT, SEQ_HINT, InputSpec, propagate_fake_shapes
from tpfx.passes.find_sites import find_sites
from tpfx.passes.localize_shapes import localize_shapes, restore_full_sizes
from tpfx.passes.pair_megatron import Pairing, pair_sites
from tpfx.passes.plan import megatron_plan
from tpfx.passes.shard_parameters import shard_parameters
from tests.multiprocess import merged, rank_cases, run_ranks
from tests.parity import grad_diffs, max_diff

WIDTH, HEADS, VOCAB = 32, 4, 50
TOL = 1e-5


class NanoAttention(nn.Module):
    """nanoGPT's causal self-attention: the head size is read from the input's shape."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS, block_size: int = 16) -> None:
        super().__init__()
        self.n_head = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # noqa: N806 - nanoGPT's names
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)


class SizeRead(nn.Module):
    """An FFN that scales by its hidden width read off the hidden tensor: local on each rank of a pair."""

    def __init__(self, width: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        y = F.gelu(h) * h.shape[-1]
        return self.fc2(y)


class WholeShapeRead(nn.Module):
    """Makes a tensor of the hidden tensor's whole shape: ``torch.ones(h.shape)`` must be d_ff wide on every rank."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(F.gelu(h)) + torch.ones(h.shape).sum(-1, keepdim=True)


class TinyLM(nn.Module):
    """Token ids in, logits and an optional loss out: nanoGPT's attention, then the size-reading FFN."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.attn, self.ffn = NanoAttention(), SizeRead(WIDTH, 4 * WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor | None = None):
        x = self.embed(ids)
        x = x + self.attn(x)
        logits = self.head(x + self.ffn(x) / 64)
        loss = None if labels is None else F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return logits, loss


class UnplacedRead(nn.Module):
    """Reads the hidden width counted from the front (``h.size(2)``); its input is (B, T, 2, 4), which
    tpfx cannot assume, so without example inputs it has no shapes and cannot place the read."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x.flatten(2))
        return self.fc2(F.gelu(h) * h.size(2))


class GroupedHeadRead(nn.Module):
    """Heads viewed as (2 groups, 2 per group), scores scaled by the group count ``q.size(1)``: at tp=2 the
    groups are split, so each rank reads 1 where 2 is meant, through a division."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.o = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (proj(x).view(b, t, 2, 2, WIDTH // 4).permute(0, 2, 3, 1, 4) for proj in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-2, -1)) * (q.size(1) / 2.0)
        out = F.softmax(scores, dim=-1) @ v  # (b, 2, 2, t, 8)
        return self.o(out.permute(0, 3, 1, 2, 4).reshape(b, t, WIDTH))


def _sizes(node: fx.Node) -> list:
    return list(node.meta["val"].shape)


def _one(gm: fx.GraphModule, predicate) -> fx.Node:
    (found,) = [node for node in gm.graph.nodes if predicate(node)]
    return found


def _is_module(name: str):
    return lambda node: node.op == "call_module" and node.target == name


@pytest.mark.parametrize("example", [None, (torch.randn(3, 6, WIDTH),)], ids=["assumed", "example"])
def test_fx_nodes_carry_symbolic_batch_and_sequence_and_known_feature_sizes(example):
    model = NanoAttention()
    gm = capture(model)
    given = {"x": example[0]} if example else None
    shapes = propagate_fake_shapes(gm, list(forward_signature(model).parameters), given=given)
    assert shapes.propagated and all("val" in node.meta for node in gm.graph.nodes)
    batch, seq, width = _sizes(_one(gm, _is_module("c_attn")))
    assert isinstance(batch, torch.SymInt) and isinstance(seq, torch.SymInt) and width == 3 * WIDTH
    assert batch.node.expr != seq.node.expr  # two symbols, not one
    views = [node for node in gm.graph.nodes if node.op == "call_method" and node.target == "view"]
    assert [_sizes(v)[2:] for v in views] == [[HEADS, WIDTH // HEADS]] * 3 + [[WIDTH]]
    head_size = _one(gm, lambda n: n.target is operator.floordiv and n is views[0].args[4])
    assert head_size.meta["val"] == WIDTH // HEADS  # C // n_head: a number
    expected = InputSpec.of(example[0]) if example else InputSpec((BATCH_HINT, SEQ_HINT, WIDTH), torch.float32, (0, 1))
    assert shapes.inputs == {"x": expected}
    assert ("assume x (batch, seq, 32) float32" in shapes.note) == (example is None)


def test_token_ids_are_assumed_for_an_input_that_no_linear_or_norm_reads_first():
    model = TinyLM()
    gm = capture(model)
    shapes = propagate_fake_shapes(gm, ["ids", "labels"])
    assert shapes.inputs == {name: InputSpec((BATCH_HINT, SEQ_HINT), torch.int64, (0, 1)) for name in ("ids", "labels")}
    logits = _sizes(_one(gm, _is_module("head")))
    assert all(isinstance(size, torch.SymInt) for size in logits[:2]) and logits[2] == VOCAB
    report = tpfx.parallelize(model, tp=2, rank=0, tracer="fx", mode="megatron").tpfx_report
    assert report.tracer_note == ("Symbolic shapes assume ids (batch, seq) int64 and labels (batch, seq) int64, as "
                                  "no example input was given for them; pass example_inputs= to set them.")


def test_an_input_the_example_leaves_out_is_assumed_with_the_examples_batch_and_sequence():
    model = TinyLM()
    gm = capture(model)  # every optional argument present: labels is read
    ids = torch.randint(0, VOCAB, (3, 9))
    shapes = propagate_fake_shapes(gm, ["ids", "labels"], given={"ids": ids})  # cross-entropy meets ids and labels
    assert shapes.propagated and shapes.inputs == {"ids": InputSpec.of(ids),
                                                   "labels": InputSpec((3, 9), torch.int64, (0, 1))}
    assert "assume labels (batch, seq) int64" in shapes.note and "ids" not in shapes.note.split("assume")[1]


def test_a_wrong_assumption_leaves_no_shapes_and_parallelize_works_as_before():
    model = UnplacedRead()
    gm = capture(model)
    shapes = propagate_fake_shapes(gm, ["x"])
    assert not shapes.propagated and not any("val" in node.meta for node in gm.graph.nodes)
    assert shapes.note.startswith("The analysis has no symbolic shapes (") and "\n" not in shapes.note
    program = tpfx.parallelize(model, tp=2, rank=0, tracer="fx", mode="megatron")
    assert program.tpfx_report.tracer_note == shapes.note


def _pairing(model: nn.Module, tp: int, example: tuple | None = None) -> tuple[fx.GraphModule, Pairing]:
    gm = capture(model)
    given = dict(zip(forward_signature(model).parameters, example)) if example else None
    propagate_fake_shapes(gm, list(forward_signature(model).parameters), given=given)
    return gm, pair_sites(gm, find_sites(gm, tp=tp), tp=tp)


def _sum_of_ranks(model: nn.Module, x: torch.Tensor, tp: int, example: tuple | None = None) -> torch.Tensor:
    """Every rank's program without its collectives, summed, and the row bias added once (one pair, the output)."""
    total = 0
    for rank in range(tp):
        gm, pairing = _pairing(model, tp, example)
        (pair,) = pairing.pairs
        shard_parameters(gm, megatron_plan(gm, find_sites(gm, tp=tp), pairing, tp=tp, rank=rank), source=model)
        restore_full_sizes(gm, pair.full_sizes, tp=tp)
        localize_shapes(gm, pair.shape_edits, tp=tp)
        gm.graph.lint()
        gm.recompile()
        total = total + gm(x)
    return total + model.get_submodule(pair.row_module_path).bias


@pytest.mark.parametrize("tp", [2, 4])
def test_nanogpt_attention_pairs_with_whole_heads_and_local_shapes(tp):
    torch.manual_seed(0)
    model = NanoAttention()
    gm, pairing = _pairing(model, tp)
    assert not pairing.fallbacks
    assert [p.describe() for p in pairing.pairs] == ["c_attn [3, 4*, 8] -> c_proj [4*, 8]"]
    edits = pairing.pairs[0].shape_edits
    nodes = {node.name: node for node in gm.graph.nodes}
    # the split size C and the final width C are traced sizes; each view's head count is the literal n_head
    assert [(nodes[e.node_name].target, e.path, e.value if isinstance(e.value, int) else "traced") for e in edits] == [
        ("split", (1,), "traced"), ("view", (3,), HEADS), ("view", (3,), HEADS), ("view", (3,), HEADS),
        ("view", (3,), "traced")]
    assert not pairing.pairs[0].full_sizes  # k.size(-1) is the head size, not split
    x = torch.randn(2, 5, WIDTH)
    torch.testing.assert_close(_sum_of_ranks(model, x, tp), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tp", [2, 4])
def test_a_size_read_of_the_split_width_gets_the_full_size_where_it_leaves_the_shapes(tp):
    torch.manual_seed(0)
    model = SizeRead()
    gm, pairing = _pairing(model, tp)
    (full,) = pairing.pairs[0].full_sizes
    nodes = {node.name: node for node in gm.graph.nodes}
    assert nodes[full.read].args[1:] == ("shape",) and (full.rank, full.elements) == (3, (2,))  # h.shape: d_ff split
    ((producer, user),) = full.uses
    assert full.chain == (producer,) and nodes[producer].args == (nodes[full.read], -1)  # h.shape[-1] ...
    assert nodes[user].target is operator.mul and nodes[user].args[1] is nodes[producer]  # ... scales gelu(h)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(_sum_of_ranks(model, x, tp), model(x), atol=1e-5, rtol=0)
    program = tpfx.parallelize(model, tp=tp, rank=0, mode="megatron", tracer="fx")
    scale = [n for n in program.graph.nodes if n.target is operator.mul and n.args[1] == tp]
    assert len(scale) == 1 and scale[0].args[0].target is operator.getitem  # the read, times tp
    assert [u.target for u in scale[0].users] == [operator.mul]  # ... is what multiplies gelu(h)


def test_a_whole_shape_read_of_the_split_width_is_rebuilt_with_the_full_width():
    gm, pairing = _pairing(WholeShapeRead(), 2)
    (full,) = pairing.pairs[0].full_sizes
    nodes = {node.name: node for node in gm.graph.nodes}
    assert nodes[full.read].args[1:] == ("shape",) and (full.rank, full.elements, full.chain) == (3, (2,), ())
    ((producer, user),) = full.uses
    assert producer == full.read and nodes[user].target is torch.ones
    program = tpfx.parallelize(WholeShapeRead(), tp=2, rank=0, mode="megatron", tracer="fx")
    (ones,) = [n for n in program.graph.nodes if n.target is torch.ones]
    (shape,) = ones.args
    assert [item.target for item in shape] == [operator.getitem, operator.getitem, operator.mul]
    assert shape[2].args == (shape[2].args[0], 2) and shape[2].args[0].args[1] == 2  # h.shape[2] * tp


def test_a_read_whose_place_is_unknown_falls_back_in_one_line_and_example_inputs_make_it_right():
    torch.manual_seed(0)
    model = UnplacedRead()
    _, pairing = _pairing(model, 2)
    (fallback,) = pairing.fallbacks
    assert fallback.reason.startswith("size read 'size' (") and "unknown rank" in fallback.reason
    assert "pass example_inputs=" in fallback.reason and "\n" not in fallback.reason
    x = torch.randn(2, 5, 2, 4)
    _, paired = _pairing(model, 2, (x,))
    assert len(paired.pairs[0].full_sizes) == 1 and not paired.fallbacks
    torch.testing.assert_close(_sum_of_ranks(model, x, 2, (x,)), model(x), atol=1e-5, rtol=0)


def test_a_read_of_a_split_head_dim_is_recomputed_through_its_arithmetic():
    torch.manual_seed(0)
    model = GroupedHeadRead()
    gm, pairing = _pairing(model, 2)
    assert [p.describe() for p in pairing.pairs] == ["q [2*, 2, 8], k [2*, 2, 8], v [2*, 2, 8] -> o [2*, 2, 8]"]
    (full,) = pairing.pairs[0].full_sizes
    nodes = {node.name: node for node in gm.graph.nodes}
    assert (nodes[full.read].target, nodes[full.read].args[1:], full.rank) == ("size", (1,), 0)  # q.size(1): groups
    ((producer, user),) = full.uses
    assert full.chain == (producer,) and nodes[producer].target is operator.truediv  # q.size(1) / 2.0 ...
    assert nodes[user].target is operator.mul  # ... scales the scores: recomputed as (q.size(1) * 2) / 2.0
    x = torch.randn(2, 5, WIDTH)
    torch.testing.assert_close(_sum_of_ranks(model, x, 2), model(x), atol=1e-5, rtol=0)


def test_export_graphs_hold_the_static_width_as_a_constant():
    model = SizeRead()
    program = tpfx.parallelize(model, tp=2, rank=0, mode="megatron", tracer="export",
                               example_inputs=(torch.randn(2, 5, 8),))
    (pair,) = program.tpfx_pairing.pairs
    assert not pair.full_sizes and not program.tpfx_pairing.fallbacks
    (scaled,) = [n for n in program.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert scaled.args[1] == 32  # d_ff, the single-device width: nothing to restore


# -- real processes ---------------------------------------------------------------------------------


def _step(model: nn.Module, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    logits, loss = out if isinstance(out, tuple) else (out, None)
    loss = loss if loss is not None else logits.pow(2).mean()
    loss.backward()
    return logits, loss


def _diffs(program: nn.Module, reference: nn.Module, kwargs: dict) -> dict[str, float]:
    (ref_out, ref_loss), (out, loss) = _step(reference, kwargs), _step(program, kwargs)
    return {"output": max_diff(out, ref_out), "loss": max_diff(loss, ref_loss),
            **{f"grad {name}": diff for name, diff in grad_diffs(program, reference).items()}}


def _cases() -> dict[str, tuple]:
    """label -> (model factory, call kwargs, parallelize options)."""
    x = torch.randn(2, 5, WIDTH, generator=torch.Generator().manual_seed(1))
    small = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(2))
    unplaced = torch.randn(2, 5, 2, 4, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    return {
        "nano attention fx": (NanoAttention, {"x": x}, {"tracer": "fx"}),
        "grouped head read fx": (GroupedHeadRead, {"x": x}, {"tracer": "fx"}),
        "size read fx": (SizeRead, {"x": small}, {"tracer": "fx"}),
        "size read export": (SizeRead, {"x": small}, {"tracer": "export", "example_inputs": (small,)}),
        "whole shape read fx": (WholeShapeRead, {"x": small}, {"tracer": "fx"}),
        "unplaced read fx + example": (UnplacedRead, {"x": unplaced}, {"tracer": "fx", "example_inputs": (unplaced,)}),
        "tiny lm fx ids+labels": (TinyLM, {"ids": ids, "labels": ids}, {"tracer": "fx"}),
        "tiny lm fx ids": (TinyLM, {"ids": ids}, {"tracer": "fx"}),  # another call form: traced on first use
    }


def _worker(rank: int, world_size: int) -> dict:
    results, models = {}, _cases()
    # 2 groups of heads: tp=4 splits the view's heads, falls back
    cases = [(tp, label, mode) for tp in (2, 4) for label in models for mode in ("gather", "megatron")
             if not (tp == 4 and label.startswith("grouped"))]
    for (tp, label, mode), group in rank_cases(cases, lambda case: case[0]):
        make, kwargs, options = models[label]
        torch.manual_seed(0)
        reference = make()
        program = tpfx.parallelize(reference, tp=tp, mode=mode, group=group, **options)
        pairing = program.tpfx_pairing
        results[(tp, label, mode)] = {
            "diffs": _diffs(program, reference, kwargs), "pairs": len(pairing.pairs) if pairing else None,
            "fallbacks": [f.reason for f in pairing.fallbacks] if pairing else [],
            "full sizes": sum(len(p.full_sizes) for p in pairing.pairs) if pairing else 0}
    return results


@pytest.fixture(scope="module")
def world() -> list[dict]:
    return run_ranks(_worker, 4)


def test_logits_loss_and_every_gradient_match_one_device_at_tp_2_and_4(world):
    assert len(merged(world)) == 2 * (2 * len(_cases()) - 1)  # both modes; tp=4 without the grouped model
    for rank, results in enumerate(world):
        for (tp, label, mode), checked in results.items():
            assert len(checked["diffs"]) > 3, (tp, label, mode)  # output, loss and every parameter's gradient
            bad = {k: v for k, v in checked["diffs"].items() if not v <= TOL}
            assert not bad, f"{label} {mode} tp={tp} rank {rank}: {bad}"


def test_in_megatron_mode_every_model_pairs_and_size_reads_are_restored(world):
    expected_pairs = {"nano attention fx": 1, "grouped head read fx": 1, "size read fx": 1, "size read export": 1,
                      "whole shape read fx": 1,
                      "unplaced read fx + example": 1, "tiny lm fx ids+labels": 2, "tiny lm fx ids": 2}
    expected_full = {"grouped head read fx": 1, "size read fx": 1, "whole shape read fx": 1, "unplaced read fx + example": 1,
                     "tiny lm fx ids+labels": 1, "tiny lm fx ids": 1}
    for results in world:
        for (tp, label, mode), checked in results.items():
            if mode != "megatron":
                continue
            assert (checked["pairs"], checked["fallbacks"]) == (expected_pairs[label], []), (tp, label)
            assert checked["full sizes"] == expected_full.get(label, 0), (tp, label)
