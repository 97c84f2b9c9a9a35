"""Worker for test_distributed: PA-DST training under FSDP2 (``fully_shard``, gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 fsdp_worker.py OUT_DIR SAVE_AT|resume|- [PERMUTATION]``:
trains ``ddp_worker``'s model and schedule with every PA-DST layer and the root sharded,
and saves each rank's whole state. With SAVE_AT it also writes a torch.distributed.checkpoint
at that step; with ``resume`` it starts from that checkpoint instead of step 0.
"""

import os
import sys
from pathlib import Path

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from padst_compiler.training import padst_layers
from padst_compiler.training.sharded_checkpoint import load_sharded, save_sharded
from padst_compiler.training.sharding import whole

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402  (the model, the data and the schedule of the DDP test)


def sharded_model(world: int, permutation: str):
    model = ddp_worker.build(permutation)
    mesh = init_device_mesh("cpu", (world,))
    for _, layer in padst_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main(out_dir: str, mode: str, permutation: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = sharded_model(world, permutation)
    checkpoint = Path(out_dir) / "checkpoint"

    def save(step, optimizer, sched):
        if mode.isdigit() and step == int(mode):
            save_sharded(checkpoint, model, optimizer, sched)

    def restore(optimizer, sched) -> int:
        return load_sharded(checkpoint, model, optimizer, sched)

    ddp_worker.train(model, model, rank, world, after_step=save, resume=restore if mode == "resume" else None)
    state = {key: whole(value) if torch.is_tensor(value) else value for key, value in model.state_dict().items()}
    torch.save(state, Path(out_dir) / f"rank{rank}{'-resumed' if mode == 'resume' else ''}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "learned")
    sys.stdout.flush()
    os._exit(0)  # as ddp_worker: no interpreter teardown around gloo's threads
