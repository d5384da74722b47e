"""The plan's per-node annotations, and other call forms mapped onto the plan by parameter name.

* every linear the plan shards or pairs carries ``node.meta["tpfx"]`` (where its output is, which
  collective goes before and after it), written from the plan; the rewrites read only these;
* another call form in megatron mode is mapped onto the program's plan by parameter name: no site
  finding and no pairing decision runs again; its own shape arguments are derived for the plan's
  split, and a form that uses a pair's linears differently is refused in one line;
* ``groups = heads // k.shape[1]`` (a size read off the split heads used as a repeat count, the same
  on every rank) gets the single-device value.

One spawn (4 gloo ranks: tp=2 in two groups, and tp=4) checks the numbers against one device.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import tpfx
import tpfx.api
import tpfx.passes.find_sites as find_sites_module
import tpfx.passes.pair_megatron as pair_megatron_module
from examples.gpt import GPTModel, small_config
from tests.models import GroupsFromShapes, ShortcutWithoutScale
from tests.multiprocess import merged, rank_cases, run_ranks
from tests.parity import grad_diffs, max_diff, square_mean_step
from tpfx.capture import capture
from tpfx.collectives import copy_to_tp, gather_from_tp, reduce_from_tp
from tpfx.passes.column_shard import insert_collectives
from tpfx.passes.fake_shapes import propagate_fake_shapes
from tpfx.passes.find_sites import find_sites
from tpfx.passes.node_placements import META_KEY, Collective, NodePlacement, Output, annotate_linears
from tpfx.passes.pair_megatron import pair_sites
from tpfx.passes.plan import gather_plan

TOL = 1e-5


def _placements(gm: torch.fx.GraphModule) -> dict[str, NodePlacement]:
    return {str(n.target): n.meta[META_KEY] for n in gm.graph.nodes if n.op == "call_module" and META_KEY in n.meta}


def test_megatron_plan_annotates_each_linear_it_shards_with_its_output_and_collectives():
    gm = tpfx.parallelize(GPTModel(small_config(n_layers=1)), tp=2, rank=0, mode="megatron")
    placed = _placements(gm)
    assert sorted(placed) == ["blocks.0.attn.out_proj", "blocks.0.attn.qkv_proj", "blocks.0.ffn.fc1", "blocks.0.ffn.fc2"]
    qkv, out = placed["blocks.0.attn.qkv_proj"], placed["blocks.0.attn.out_proj"]
    assert (qkv.parameter, qkv.output, qkv.before, qkv.after, qkv.pair) == (
        "blocks.0.attn.qkv_proj.weight", Output.SHARDED, Collective.COPY_TO, None, "blocks.0.attn.out_proj")
    assert qkv.dim == -1 and out.dim is None
    assert (out.output, out.before, out.after, out.pair) == (Output.PARTIAL, None, Collective.REDUCE,
                                                             "blocks.0.attn.out_proj")
    assert placed["blocks.0.ffn.fc2"].describe() == "partial, reduce_from_tp after"
    # one source: each annotation agrees with its weight's entry in the plan
    for placement in placed.values():
        entry = gm.tpfx_plan.entry(placement.parameter)
        assert entry.placement.value == {"sharded": "column", "partial": "row"}[placement.output.value]


def test_gather_rewrite_reads_the_annotations_only():
    model = GPTModel(small_config(n_layers=1))
    gm = capture(model)
    finding = find_sites(gm, tp=2)
    plan = gather_plan(gm, finding, tp=2, rank=0)
    written = annotate_linears(gm, plan)
    assert {p.describe() for p in written.values()} == {"sharded on dim -1, copy_to_tp before, gather_from_tp after"}
    assert sorted(p.parameter for p in written.values()) == ["blocks.0.attn.qkv_proj.weight", "blocks.0.ffn.fc1.weight"]
    qkv = next(n for n in gm.graph.nodes if n.target == "blocks.0.attn.qkv_proj")
    del qkv.meta[META_KEY]  # the site is still in the plan, but nothing tells the rewrite to gather it
    insert_collectives(gm, group="tp:0-1")
    assert qkv.args[0].target is not copy_to_tp and [u.target for u in qkv.users] != [gather_from_tp]
    fc1 = next(n for n in gm.graph.nodes if n.target == "blocks.0.ffn.fc1")
    assert fc1.args[0].target is copy_to_tp and [u.target for u in fc1.users] == [gather_from_tp]


def test_megatron_call_form_maps_the_plan_by_name_without_finding_or_choosing_again(monkeypatch):
    model = GPTModel(small_config(n_layers=1)).eval()
    gm = tpfx.parallelize(model, tp=2, rank=0, mode="megatron")

    def no_analysis(*args: object, **kwargs: object) -> None:
        raise AssertionError("another call form must map the plan by name, not decide the pairs again")

    for module, name in ((tpfx.api, "find_sites"), (find_sites_module, "find_sites"), (pair_megatron_module, "pair_sites"),
                         (pair_megatron_module, "_choose_heads"), (tpfx.api, "pair_sites")):
        monkeypatch.setattr(module, name, no_analysis)
    form = gm.module_for_call(torch.randint(0, 100, (2, 5)))  # ids only: a form the program was not traced with
    assert form is not gm
    placed = _placements(form)
    assert placed == _placements(gm)  # the same annotations, mapped by weight name
    qkv = next(n for n in form.graph.nodes if n.target == "blocks.0.attn.qkv_proj")
    assert qkv.args[0].target is copy_to_tp
    out = next(n for n in form.graph.nodes if n.target == "blocks.0.attn.out_proj")
    assert [u.target for u in out.users] == [reduce_from_tp]
    # this trace's own head view, derived for the plan's split: 4 heads become the rank's 2
    (view,) = [n for n in form.graph.nodes if n.op == "call_method" and n.target == "view" and n.args[0] is qkv]
    assert view.args[3:] == (3, 2, 32)  # (B, T, 3, H, Dh)


def test_a_call_form_that_uses_a_pairs_linears_differently_is_refused_in_one_line():
    gm = tpfx.parallelize(ShortcutWithoutScale(), tp=2, rank=0, mode="megatron")
    assert [p.describe() for p in gm.tpfx_pairing.pairs] == ["q_proj [4*, 8], k_proj [4*, 8], v_proj [4*, 8] -> o_proj [4*, 8]"]
    x = torch.randn(2, 5, 32)
    with pytest.raises(tpfx.ShardingError) as refused:
        gm.module_for_call(x)
    message = str(refused.value)
    assert message.startswith("call form (train, without scale) applies only some of the column linears of pair "
                              "q_proj [4*, 8]") and "\n" not in message


def test_a_repeat_count_computed_from_a_split_size_gets_the_single_device_value():
    model = GroupsFromShapes("literal").eval()
    gm = capture(model)
    propagate_fake_shapes(gm, ["x"], given={"x": torch.randn(2, 5, 32)})
    (pair,) = pair_sites(gm, find_sites(gm, tp=2), tp=2).pairs
    assert pair.describe() == "q_proj [2*, 2, 8], k_proj [2*, 8], v_proj [2*, 8] -> o_proj [2*, 2, 8]"
    (full,) = pair.full_sizes  # k.shape[1] reads the rank's 1 kv head; 4 // it must be the single-device 2
    nodes = {n.name: n for n in gm.graph.nodes}
    assert sorted(str(nodes[user].target) for _, user in full.uses) == ["repeat_interleave"] * 2


# ------------------------------------------------------------------------------------------------
# parity: one spawn, 4 gloo ranks
# ------------------------------------------------------------------------------------------------

def _gpt_forms(tp: int, group: dist.ProcessGroup | None) -> dict[str, float]:
    """A megatron GPT built from the full call (ids, mask, labels), then called with ids only, in eval and train."""
    torch.manual_seed(0)
    reference = GPTModel(small_config(n_layers=1, dropout=0.0, vocab_size=64, d_model=32, d_ff=64,
                                          max_position_embeddings=16))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    gm = tpfx.parallelize(reference, tp=tp, mode="megatron", group=group)
    worst = {}
    for training in (False, True):  # the eval form and the train form: both new to the program
        gm.train(training)
        reference.train(training)
        for model in (gm, reference):
            model.zero_grad(set_to_none=True)
        out, _ = gm(ids)
        ref, _ = reference(ids)
        out.pow(2).mean().backward()
        ref.pow(2).mean().backward()
        diffs = [max_diff(out, ref), *grad_diffs(gm, reference).values()]
        worst[f"ids only, {'train' if training else 'eval'}"] = max(diffs)
    return worst


def _world(rank: int, world_size: int) -> dict:
    warnings.simplefilter("ignore")  # torch.export's own deprecation notices
    result = {}
    cases = [("literal", 2, "fx", "megatron"), ("literal", 4, "fx", "megatron"), ("literal", 2, "export", "megatron"),
             ("both", 2, "fx", "megatron"), ("both", 4, "fx", "gather"), ("gpt call forms", 2)]
    for case, group in rank_cases(cases, lambda case: case[1]):
        if case[0] == "gpt call forms":
            result[case] = _gpt_forms(2, group)
            continue
        spelling, tp, tracer, mode = case
        torch.manual_seed(0)
        reference = GroupsFromShapes(spelling)
        x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
        gm = tpfx.parallelize(reference, tp=tp, mode=mode, tracer=tracer, example_inputs=(x,), group=group)
        out, loss = square_mean_step(gm, x)
        ref, ref_loss = square_mean_step(reference, x)
        diffs = [max_diff(out, ref), max_diff(loss, ref_loss), *grad_diffs(gm, reference).values()]
        pairs = len(gm.tpfx_pairing.pairs) if gm.tpfx_pairing else None
        result[case] = (max(diffs), len(diffs), pairs)
    return result


@pytest.fixture(scope="module")
def world() -> list[dict]:
    return run_ranks(_world, 4)


def test_repeat_counts_from_shapes_and_other_call_forms_match_single_device(world):
    assert len(merged(world)) == 6
    for rank, result in enumerate(world):
        for key, checked in result.items():
            if key[0] == "gpt call forms":
                assert checked and all(diff <= TOL for diff in checked.values()), (key, rank, checked)
                continue
            worst, count, pairs = checked
            assert worst <= TOL and count >= 8, (key, rank, worst)
            assert pairs == (1 if key[3] == "megatron" else None), key  # it pairs, not falls back
