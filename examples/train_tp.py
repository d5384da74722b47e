"""Train the small GPT on tp ranks with AdamW, beside the single-device model, step by step.

    torchrun --nproc-per-node=2 examples/train_tp.py [--steps 40]

Both models start from the same weights and see the same batches and dropout masks; the printed
loss curves should agree to about 1e-5.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tpfx  # noqa: E402
from examples._launch import init_distributed  # noqa: E402
from examples.gpt import GPTModel, small_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    device = init_distributed()
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = small_config(vocab_size=512)
    reference = GPTModel(config).to(device).train()
    gm = tpfx.parallelize(copy.deepcopy(reference), tp=dist.get_world_size())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in (reference, gm)]
    data = torch.Generator().manual_seed(1)
    worst = 0.0
    for step in range(args.steps):
        starts = torch.randint(0, config.vocab_size, (4, 1), generator=data)
        batch = ((starts + torch.arange(32)) * 7 % config.vocab_size).to(device)  # a learnable pattern
        losses = []
        for model, optimizer in zip((reference, gm), optimizers):
            torch.manual_seed(1000 + step)  # the same dropout masks for both
            _, loss = model(batch, labels=batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        worst = max(worst, abs(losses[0] - losses[1]))
        if rank == 0:
            print(f"step {step:3d}  loss tp={dist.get_world_size()}: {losses[1]:.6f}  single device: {losses[0]:.6f}")
    if rank == 0:
        print(f"max |loss difference| over {args.steps} steps: {worst:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
