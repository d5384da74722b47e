"""parallelize without processes: options, errors, memory accounting, the caller's model untouched."""

from __future__ import annotations

import copy

import pytest
import torch

import tpfx
from examples.gpt import GPTModel, small_config
from tpfx.layers import ColumnParallelLinear


def test_no_process_group_without_rank_is_one_clear_line():
    with pytest.raises(tpfx.ConfigError, match=r"^no torch.distributed process group is initialized: .* pass rank="):
        tpfx.parallelize(GPTModel(small_config(n_layers=1)), tp=2)


@pytest.mark.parametrize("tp, rank, message", [
    (None, 0, "tp is required with rank= and no process group"),
    (2, 2, r"rank=2 is outside the tensor-parallel group of size tp=2; use a rank in 0..1"),
    (0, 0, "tp=0 must be a positive integer"),
])
def test_bad_inspection_options(tp, rank, message):
    with pytest.raises(tpfx.ConfigError, match=message):
        tpfx.parallelize(GPTModel(small_config(n_layers=1)), tp=tp, rank=rank)


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_linears_hold_one_tp_th_of_their_bytes(tp):
    gm = tpfx.parallelize(GPTModel(small_config(n_layers=2)), tp=tp, rank=tp - 1)
    report = gm.tpfx_report
    assert report.site_bytes_rank * tp == report.site_bytes_single
    assert report.param_bytes_single - report.param_bytes_rank == report.site_bytes_single * (tp - 1) // tp
    shards = [m for m in gm.modules() if isinstance(m, ColumnParallelLinear)]
    assert len(shards) == 4 and all(m.weight.shape[0] * tp == m.full_out_features for m in shards)


def test_callers_model_is_not_mutated_and_nothing_is_shared():
    model = GPTModel(small_config(n_layers=1)).train()
    before = copy.deepcopy(model.state_dict())
    gm = tpfx.parallelize(model, tp=2, rank=0)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.blocks[0].attn.qkv_proj) is torch.nn.Linear
    caller = {p.data_ptr() for p in model.parameters()}
    assert not caller & {p.data_ptr() for p in gm.parameters()}


def test_program_keeps_the_original_state_dict_keys():
    model = GPTModel(small_config(n_layers=2))
    gm = tpfx.parallelize(model, tp=2, rank=1)
    assert set(gm.state_dict()) == set(model.state_dict())
    assert "blocks.0.attn.causal_mask" not in gm.state_dict()  # non-persistent stays non-persistent
    assert gm.get_buffer("blocks.0.attn.causal_mask").shape == (1, 1, 128, 128)


def test_report_lists_sites_and_collectives():
    report = tpfx.parallelize(GPTModel(small_config(n_layers=2)), tp=2, rank=0).tpfx_report
    assert [row["module"] for row in report.sites_table()] == [
        "blocks.0.attn.qkv_proj", "blocks.0.ffn.fc1", "blocks.1.attn.qkv_proj", "blocks.1.ffn.fc1"]
    assert [kind for _, kind in report.collective_nodes] == ["copy_to_tp", "gather_from_tp"] * 4
    assert report.group == "tp:0-1" and report.call_form.absent == frozenset()


@pytest.mark.parametrize("was_enabled", [True, False])
def test_garbage_collector_state_is_restored_after_success_and_error(was_enabled):
    import gc

    (gc.enable if was_enabled else gc.disable)()
    try:
        tpfx.parallelize(GPTModel(small_config(n_layers=1)), tp=2, rank=0)
        assert gc.isenabled() is was_enabled
        with pytest.raises(tpfx.ShardingError):
            tpfx.parallelize(GPTModel(small_config(n_layers=1, d_ff=510)), tp=4, rank=0)
        assert gc.isenabled() is was_enabled
    finally:
        gc.enable()


@pytest.mark.parametrize("mode", ["gather", "megatron"])
def test_code_is_generated_once(mode):
    """The rewrites change the graph only; the program's Python code is generated once, at the end."""
    from unittest import mock

    generated = []
    original = torch.fx.GraphModule.recompile

    def counting(self):
        generated.append(type(self).__name__)
        return original(self)

    with mock.patch.object(torch.fx.GraphModule, "recompile", counting):
        gm = tpfx.parallelize(GPTModel(small_config(n_layers=2)), tp=2, rank=0, mode=mode)
    assert len(generated) == 1 and "copy_to_tp" in gm.code


class _DeviceFromWeights(torch.nn.Module):
    """Reads a device off its weights while tracing (as Hugging Face's ``self.device`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.parameters()).device  # concrete while tracing: the traced copy's device
        return x * self.scale + torch.arange(4, device=device)


def test_constants_made_while_tracing_are_real_and_not_left_on_the_callers_model():
    """The model itself is traced (its weights' device, real constants); the program is built over a copy."""
    model = _DeviceFromWeights()
    attributes = set(vars(model))
    gm = tpfx.parallelize(model, tp=2, rank=0)  # no sites: no collectives, so it runs without a group
    assert set(vars(model)) == attributes  # fx set its tensor constant on the traced root; it moved to the copy
    assert "_tensor_constant0" in gm.code
    x = torch.ones(3, 4)
    torch.testing.assert_close(gm(x), model(x))
