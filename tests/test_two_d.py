"""2-D parallelism: data parallelism (DDP, FSDP2) over tpfx programs on a (dp=2, tp=2) DeviceMesh.

One spawn of world 4. Each rank builds ``init_device_mesh("cpu", (2, 2), ("dp", "tp"))``, parallelizes
the model over ``mesh["tp"]`` (megatron mode), wraps the program in DDP over the dp group, trains 20
AdamW steps on its dp rank's micro-batch, then does the same with FSDP2's ``fully_shard`` over
``mesh["dp"]``. Every rank also trains the single-device model on the whole batch (both micro-batches,
the mean of their losses): the losses of every step and the final parameters must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

import tpfx
from examples.gpt import GPTConfig, GPTModel
from tests.multiprocess import run_ranks
from tests.parity import max_diff
from tpfx.checkpoint import parameter_shard_specs

STEPS = 20
TOL = 1e-5
# The key part of the fused qkv bias has an exact gradient of zero (it adds one constant to every score
# of a row), so both runs step it on round-off alone, which AdamW normalizes to steps of up to lr: eps
# 1e-6 (real gradients here are >= 1e-4, their steps unchanged) keeps those steps small, and parameters
# are compared at PARAMETER_TOL, ten times the loss tolerance, to leave room for that round-off walk.
ADAMW = {"lr": 1e-2, "eps": 1e-6}
PARAMETER_TOL = 1e-4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=64, max_position_embeddings=16, n_layers=2, n_heads=4, d_model=32, d_ff=64,
                              dropout=0.0))


def _micro_batches(step: int) -> list[torch.Tensor]:
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(100 + step))
    return [ids[:2], ids[2:]]


def _reference_run() -> tuple[list[list[float]], nn.Module]:
    """The single-device model trained on both micro-batches: per step, each micro-batch's loss."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        per_batch = [model(ids, labels=ids)[1] for ids in _micro_batches(step)]
        torch.stack(per_batch).mean().backward()
        optimizer.step()
        losses.append([loss.item() for loss in per_batch])
    return losses, model


def _train(program: nn.Module, dp_rank: int) -> list[float]:
    optimizer = torch.optim.AdamW(program.parameters(), **ADAMW)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        ids = _micro_batches(step)[dp_rank]
        loss = program(ids, labels=ids)[1]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _parameter_diffs(program: nn.Module, specs: dict, reference: nn.Module) -> dict[str, float]:
    full = dict(reference.named_parameters())
    diffs = {}
    for name, parameter in program.named_parameters():
        name = name.removeprefix("module.")  # DDP's wrapper
        held = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter  # FSDP2: gather over dp
        expected = specs[name].take(full[name].detach()) if name in specs else full[name]
        diffs[name] = max_diff(held, expected)
    return diffs


def _two_d_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh["dp"].get_local_rank()
    reference_losses, reference = _reference_run()
    expected = [losses[dp_rank] for losses in reference_losses]
    results = {}

    gm = tpfx.parallelize(_model(), mesh=mesh["tp"], mode="megatron")
    specs = parameter_shard_specs(gm)
    ddp = DistributedDataParallel(gm, process_group=mesh["dp"].get_group())
    losses = _train(ddp, dp_rank)
    results["ddp"] = {"losses": max(abs(a - b) for a, b in zip(losses, expected)),
                      "parameters": max(_parameter_diffs(ddp, specs, reference).items(), key=lambda kv: kv[1])}

    gm = tpfx.parallelize(_model(), mesh=mesh["tp"], mode="megatron")
    fully_shard(gm, mesh=mesh["dp"])
    losses = _train(gm, dp_rank)
    results["fsdp2"] = {"losses": max(abs(a - b) for a, b in zip(losses, expected)),
                        "parameters": max(_parameter_diffs(gm, specs, reference).items(), key=lambda kv: kv[1])}
    errors = []
    for wrong in ({"mesh": mesh}, {"mesh": mesh["tp"], "group": mesh["tp"].get_group()}):
        try:
            tpfx.parallelize(_model(), **wrong)
        except tpfx.ConfigError as error:
            errors.append(str(error))
    results["errors"] = errors
    return results


def test_ddp_and_fsdp2_over_tensor_parallel_programs_on_a_2d_mesh_train_like_one_device():
    for rank, results in enumerate(run_ranks(_two_d_worker, 4, timeout_s=600)):
        for wrapper in ("ddp", "fsdp2"):
            assert results[wrapper]["losses"] <= TOL, f"rank {rank} {wrapper}: losses {results[wrapper]}"
            name, diff = results[wrapper]["parameters"]
            assert diff <= PARAMETER_TOL, f"rank {rank} {wrapper}: parameter {name} differs by {diff:g} after {STEPS} AdamW steps"
        assert len(results["errors"]) == 2 and "mesh['tp']" in results["errors"][0], results["errors"]
        assert "pass one of them" in results["errors"][1], results["errors"]


def test_a_mesh_that_is_not_a_device_mesh_is_a_one_line_error():
    with pytest.raises(tpfx.ConfigError, match="not a torch.distributed DeviceMesh"):
        tpfx.parallelize(_model(), mesh="tp")
