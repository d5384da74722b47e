"""Local heads: the QKV layout is read from the graph and the shapes between a pair become local.

Each attention below writes its q, k and v another way. The numerical check runs every rank's
program in this one process with the collectives left out: the row-parallel linear's partial sums
over the ranks, plus its bias, must equal the single-device block, which holds only if every rank
got whole heads of q, k and v and every shape between the pair was made local.
"""

from __future__ import annotations

import itertools
import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from examples.gpt import GPTModel, small_config
from tpfx.passes.find_sites import find_sites
from tpfx.passes.factors import FeatureLayout
from tpfx.passes.factors import ShapeEdit
from tpfx.passes.localize_shapes import localize_shapes
from tpfx.passes.pair_megatron import Pairing, pair_sites
from tpfx.passes.plan import megatron_plan
from tpfx.passes.shard_parameters import shard_parameters
from tpfx.capture import capture
from tpfx.errors import ShardingError
from tests.models import HEAD, HEADS, WIDTH, FusedLastDim, Grouped, HeadMixing, Interleaved

def _pairing(model: nn.Module, tp: int) -> tuple[fx.GraphModule, Pairing]:
    gm = capture(model)
    return gm, pair_sites(gm, find_sites(gm, tp=tp), tp=tp)


def _sum_of_ranks(model: nn.Module, x: torch.Tensor, tp: int) -> torch.Tensor:
    """Every rank's local program (no collectives) summed; each row linear's bias added once.

    Valid for a model with one pair whose row linear's output is the model output.
    """
    total = 0
    for rank in range(tp):
        gm, pairing = _pairing(model, tp)
        assert len(pairing.pairs) == 1 and not pairing.fallbacks
        shard_parameters(gm, megatron_plan(gm, find_sites(gm, tp=tp), pairing, tp=tp, rank=rank), source=model)
        localize_shapes(gm, pairing.pairs[0].shape_edits, tp=tp)
        gm.recompile()  # the pass changes the graph only
        total = total + gm(x)
    bias = model.get_submodule(pairing.pairs[0].row_module_path).bias
    return total + (bias if bias is not None else 0)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("make", [FusedLastDim, Interleaved], ids=["qkv-last-dim", "interleaved"])
def test_ranks_of_one_attention_sum_to_single_device(make, tp):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(2, 5, WIDTH)
    torch.testing.assert_close(_sum_of_ranks(model, x, tp), model(x), atol=1e-5, rtol=0)


def test_layouts_are_read_from_the_graph():
    gpt_pairs = _pairing(GPTModel(small_config(n_layers=1)), 2)[1].pairs
    assert [(p.column_layouts, p.row_layout) for p in gpt_pairs] == [
        ((FeatureLayout((3, 4, 32), 1),), FeatureLayout((4, 32), 0)),  # fused [3, H, Dh]
        ((FeatureLayout((512,), 0),), FeatureLayout((512,), 0))]
    last_dim = _pairing(FusedLastDim(), 2)[1].pairs[0]
    assert last_dim.column_layouts == (FeatureLayout((3, HEADS, HEAD), 1),)
    interleaved = _pairing(Interleaved(), 2)[1].pairs[0]
    assert interleaved.column_layouts == (FeatureLayout((HEADS, 3, HEAD), 0),)
    grouped = _pairing(Grouped(kv_heads=2), 2)[1].pairs[0]
    assert grouped.column_layouts == (FeatureLayout((2, 2, HEAD), 0), FeatureLayout((2, HEAD), 0),
                                      FeatureLayout((2, HEAD), 0))


def test_fused_rows_of_a_rank_are_whole_heads_of_q_k_and_v():
    layout = FeatureLayout((3, 4, 32), 1)
    assert layout.ranges(2, 0) == ((0, 64), (128, 192), (256, 320))
    assert layout.ranges(2, 1) == ((64, 128), (192, 256), (320, 384))
    assert FeatureLayout((4, 3, 8), 0).ranges(2, 1) == ((48, 96),)  # interleaved: one contiguous block
    assert FeatureLayout((6,), None).ranges(3, 2) == ((0, 6),)


def test_shape_edits_divide_literals_and_wrap_traced_sizes():
    gm, pairing = _pairing(GPTModel(small_config(n_layers=1)), 2)
    attention = pairing.pairs[0]
    assert attention.shape_edits == (ShapeEdit("view", (4,), 4), ShapeEdit("view_1", (3,), "getitem_2"))
    localize_shapes(gm, attention.shape_edits, tp=2)
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["view"].args[3:] == (3, 2, 32)  # head count 4 -> 2; the 3 of q/k/v and Dh stay
    width = nodes["view_1"].args[3]
    assert width.target is operator.floordiv and width.args == (nodes["getitem_2"], 2)
    gm.graph.lint()


def test_sizes_read_from_local_tensors_are_not_divided_again():
    grouped = _pairing(Grouped(kv_heads=2), 2)[1].pairs[0]
    assert grouped.shape_edits == ()  # -1 in the views; kv from k.shape is already local at run time


def test_a_literal_that_tp_does_not_divide_is_a_one_line_error():
    gm, pairing = _pairing(GPTModel(small_config(n_layers=1)), 2)
    with pytest.raises(ShardingError, match=r"shape argument 4 of node 'view' .* not divisible by tp=3") as error:
        localize_shapes(gm, pairing.pairs[0].shape_edits, tp=3)
    assert "\n" not in str(error.value)


def test_head_mixing_op_is_not_head_local():
    _, pairing = _pairing(HeadMixing(), 2)
    assert not pairing.pairs
    (fallback,) = pairing.fallbacks
    assert [s.module_path for s in fallback.sites] == ["qkv"]
    # the mean over dim 1 (the heads) blocks the head factor: no factor is left to split
    assert fallback.reason == ("no factor of the input of 'out' can be split across tp=2 "
                               "(4: 'mean' (mean) reduces over it; 8: 'matmul' contracts it)")


@pytest.mark.parametrize("factors", [(3, 4, 32), (512,), (4, 3, 8), (6, 2, 2, 3), (1, 4, 5)])
def test_layout_ranges_are_the_ranks_slice_of_the_sharded_factor(factors):
    """The blocks equal the brute-force answer: indices whose sharded-factor coordinate is this rank's."""
    for axis, tp in itertools.product(range(len(factors)), (1, 2, 4)):
        if factors[axis] % tp:
            continue
        for rank in range(tp):
            kept = factors[axis] // tp
            index = torch.arange(math.prod(factors)).view(factors).narrow(axis, rank * kept, kept).reshape(-1)
            blocks = FeatureLayout(factors, axis).ranges(tp, rank)
            assert torch.cat([torch.arange(start, stop) for start, stop in blocks]).tolist() == index.tolist()
            assert all(stop < start for (_, stop), (start, _) in zip(blocks, blocks[1:]))  # merged where touching
