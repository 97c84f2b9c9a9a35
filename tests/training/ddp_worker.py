"""Worker for test_distributed: PA-DST training under DistributedDataParallel (gloo, CPU).

Run as ``python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py OUT_DIR``, or
imported by the test for the single-process run over the same global batches.
"""

import os
import sys
from pathlib import Path

import torch
from torch import nn

from padst_compiler.training import Block, DSTScheduler, sparsify

STEPS, GLOBAL_BATCH = 12, 32


def build(permutation="learned"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)).double()
    sparsify(model, Block(4, 4), 0.5, permutation=permutation)
    return model


def train(model, wrapped, rank=0, world=1, after_step=None, resume=None):
    """``after_step(step, optimizer, sched)`` runs after each step; ``resume(optimizer, sched)``
    restores a checkpoint before the first and returns the step to continue from."""
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    sched = DSTScheduler(wrapped, optimizer, total_steps=STEPS, update_every=3, harden_at=0.5, t_end=1.0,
                         harden_threshold=0.0)
    shard = GLOBAL_BATCH // world
    for step in range(resume(optimizer, sched) if resume else 0, STEPS):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(GLOBAL_BATCH, 16, generator=gen, dtype=torch.float64)
        target = torch.randn(GLOBAL_BATCH, 16, generator=gen, dtype=torch.float64)
        x, target = x[rank * shard:(rank + 1) * shard], target[rank * shard:(rank + 1) * shard]
        loss = (wrapped(x) - target).square().mean()  # the scheduler applies the permutation penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sched.step()
        if after_step:
            after_step(step + 1, optimizer, sched)
    return model.state_dict()


def main(out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = build()
    # find_unused_parameters: a hardened soft matrix stops receiving gradients
    wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    state = train(model, wrapped, rank, world)
    torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter teardown: freeing DDP's reducer there can deadlock in gloo's process
    # group destructor (a gloo thread waits for the GIL the freeing thread holds); seen in
    # about one run in three under load. Everything this worker produces is saved above.
    sys.stdout.flush()
    os._exit(0)
