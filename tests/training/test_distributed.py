"""Under DDP (gloo, 2 CPU processes) masks, growth and hardened permutations agree on every
rank and with one process training on the same global batches."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from padst_compiler.training.layer import decode_record

from . import ddp_worker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_ranks_agree_with_each_other_and_with_a_single_process(tmp_path):
    worker = Path(ddp_worker.__file__)
    log = tmp_path / "torchrun.log"
    # The log is a file, not a pipe: a worker that outlives torchrun would hold a pipe open,
    # and reading it to its end would wait for that worker instead of reporting the failure.
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
             f"--master_port={free_port()}", str(worker), str(tmp_path)],
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
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    model = ddp_worker.build()
    initial_masks = [model[0].index.clone(), model[2].index.clone()]
    single = ddp_worker.train(model, model)
    assert not torch.equal(single["0.index"], initial_masks[0])  # the masks did move
    assert not torch.equal(single["2.index"], initial_masks[1])

    for key, value in single.items():
        if not torch.is_tensor(value):
            assert rank0[key] == rank1[key] == value, key
        elif value.is_floating_point():
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
            torch.testing.assert_close(rank0[key], value, rtol=1e-9, atol=1e-12, msg=key)
        else:  # masks and hardened permutations: exactly equal everywhere
            assert torch.equal(rank0[key], rank1[key]) and torch.equal(rank0[key], value), key
    assert all(decode_record(state)["hard"] for key, state in single.items() if key.endswith("_extra_state"))
