"""The seed's forward check, done by tpfx on the unmodified GPT.

    torchrun --nproc-per-node=2 examples/parallelize_gpt.py

Prints what the seed prints (world size, max diff vs rank 0, shapes, loss) plus the max diff
against the single-device model.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tpfx  # noqa: E402
from examples._launch import init_distributed  # noqa: E402
from examples.gpt import GPTModel, small_config  # noqa: E402


def main() -> None:
    device = init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(123)  # the same weights, inputs and dropout masks on every rank
    config = small_config()
    model = GPTModel(config).to(device)
    input_ids = torch.randint(0, config.vocab_size, (2, 16), device=device)
    attention_mask = torch.ones_like(input_ids)

    gm = tpfx.parallelize(model, tp=world_size)
    if rank == 0:
        print("world_size:", world_size)
        for row in gm.tpfx_report.sites_table():  # the shard shapes are the plan's (gm.tpfx_plan)
            print(f"sharded {row['module']} ({row['role']}): {tuple(row['weight'])} -> {tuple(row['shard'])}")

    torch.manual_seed(7)
    logits, loss = gm(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    torch.manual_seed(7)
    ref_logits, ref_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    with torch.no_grad():
        logits_rank0 = logits.clone()
        dist.broadcast(logits_rank0, src=0)
        diff_rank0 = (logits_rank0 - logits).abs().max().item()
        diff_single = (ref_logits - logits).abs().max().item()
    print(f"rank {rank}: max diff vs rank0: {diff_rank0}  max diff vs single device: {diff_single}")
    if rank == 0:
        print("input_ids shape:", tuple(input_ids.shape))
        print("logits shape:", tuple(logits.shape))
        print(f"loss: {loss.item():.6f} (single device: {ref_loss.item():.6f})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
