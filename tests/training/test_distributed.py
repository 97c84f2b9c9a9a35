"""Under DDP and FSDP2 (gloo, 2 CPU processes) masks, growth and hardened permutations agree on
every rank and with one process training on the same global batches; an FSDP2 run resumed from
a torch.distributed.checkpoint ends equal to an uninterrupted one."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from padst_compiler.training.layer import WARMUP_TENSORS, decode_record

from . import ddp_worker, fsdp_worker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(worker: Path, out_dir: Path, *args: str) -> None:
    """``torchrun --nproc_per_node 2 worker out_dir *args``, never leaving a process behind."""
    log = out_dir / "torchrun.log"
    # The log is a file, not a pipe: a worker that outlives torchrun would hold a pipe open,
    # and reading it to its end would wait for that worker instead of reporting the failure.
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
             f"--master_port={free_port()}", str(worker), str(out_dir), *args],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            launcher.wait(timeout=300)
        except subprocess.TimeoutExpired:  # torchrun stops its own workers on SIGTERM
            os.killpg(launcher.pid, signal.SIGTERM)
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        finally:
            try:  # never leave a worker behind
                os.killpg(launcher.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert launcher.returncode == 0, f"torchrun exited with {launcher.returncode}:\n" + log.read_text()[-4000:]


def assert_ranks_match_a_single_process(rank0: dict, rank1: dict, skip=(), permutation="learned") -> None:
    model = ddp_worker.build(permutation)
    initial_masks = [model[0].index.clone(), model[2].index.clone()]
    single = ddp_worker.train(model, model)
    assert not torch.equal(single["0.index"], initial_masks[0])  # the masks did move
    assert not torch.equal(single["2.index"], initial_masks[1])
    for key, value in single.items():
        if key.rpartition(".")[2] in skip:
            continue
        if not torch.is_tensor(value):
            assert rank0[key] == rank1[key] == value, key
        elif value.is_floating_point():
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
            torch.testing.assert_close(rank0[key], value, rtol=1e-9, atol=1e-12, msg=key)
        else:  # masks and hardened permutations: exactly equal everywhere
            assert torch.equal(rank0[key], rank1[key]) and torch.equal(rank0[key], value), key
    assert all(decode_record(state)["hard"] for key, state in single.items() if key.endswith("_extra_state"))


def test_ddp_ranks_agree_with_each_other_and_with_a_single_process(tmp_path):
    run_workers(Path(ddp_worker.__file__), tmp_path)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert_ranks_match_a_single_process(rank0, rank1)


@pytest.mark.parametrize("save_at", [4, 8], ids=["checkpoint-while-warming-up", "checkpoint-after-hardening"])
def test_fsdp2_ranks_agree_with_a_single_process_and_resume_from_a_distributed_checkpoint(tmp_path, save_at):
    worker = Path(fsdp_worker.__file__)
    run_workers(worker, tmp_path, str(save_at))
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    # FSDP2 cannot resize what it shards: a hardened layer keeps its warm-up tensors (unused)
    assert rank0["0.dense_weight_proxy"].shape == (32, 16)
    assert_ranks_match_a_single_process(rank0, rank1, skip=WARMUP_TENSORS)
    run_workers(worker, tmp_path, "resume")
    for rank, uninterrupted in enumerate((rank0, rank1)):
        resumed = torch.load(tmp_path / f"rank{rank}-resumed.pt", weights_only=True)
        for key, value in uninterrupted.items():
            assert torch.equal(resumed[key], value), key


def test_fsdp2_learns_birkhoff_permutations_as_a_single_process_does(tmp_path):
    """The soft matrices' penalty gradient and Sinkhorn projection work on sharded matrices."""
    run_workers(Path(fsdp_worker.__file__), tmp_path, "-", "birkhoff")
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert_ranks_match_a_single_process(rank0, rank1, permutation="birkhoff")
