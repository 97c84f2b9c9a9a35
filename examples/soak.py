"""Soak test: PA-DST training killed with SIGKILL at random moments and resumed from its last
checkpoint must end exactly where an uninterrupted run ends, with flat memory and no
checkpoint ever left half-written.

    python examples/soak.py [--steps 20000] [--seed 0] [--out DIR]    (about 15 minutes on 2 cores)
    python examples/soak.py --steps 3000                               (a quick check, about 2 minutes)

A small GPT (Block 8x8 at 0.875, learned permutations, RigL every 50 steps, hardening at 10 %)
trains first without interruption, then again in a process that is killed at random times
(5-60 s after each start) and restarted until it finishes; it writes a checkpoint (model,
optimizer, scheduler) every 100 steps by replacing the file atomically. After every kill
the checkpoint must load. At the end both runs' final states must be bit-equal, and the
resident memory of the uninterrupted run, sampled every 50 steps, must not grow by more than
10 % after its first 500 steps. Exit status 0 when all holds.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

CHECKPOINT_EVERY, RSS_EVERY = 100, 50


def resident_mib() -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def worker(folder: Path, steps: int) -> None:
    """Train to ``steps``, resuming from ``folder/checkpoint.pt`` if there is one."""
    import torch
    import torch.nn.functional as F

    from padst_compiler.models import GPT, GPTConfig
    from padst_compiler.outputs import atomic_open
    from padst_compiler.training import Block, DSTScheduler, sparsify

    torch.manual_seed(0)
    model = sparsify(GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, d_model=128)),
                     Block(8, 8), 0.875, permutation="learned")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = DSTScheduler(model, optimizer, total_steps=steps, update_every=50)
    checkpoint = folder / "checkpoint.pt"
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
    with open(folder / "rss.log", "a") as rss:
        for step in range(start, steps):
            idx = torch.randint(0, 256, (8, 65), generator=torch.Generator().manual_seed(step))
            loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sched.step()
            if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
                with atomic_open(checkpoint, binary=True) as file:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": sched.state_dict(), "step": step + 1}, file)
            if (step + 1) % RSS_EVERY == 0:
                rss.write(f"{step + 1} {resident_mib():.1f}\n")
                rss.flush()
    (folder / "done").write_text("done\n")


def run_to_the_end(folder: Path, steps: int, kills: random.Random | None) -> tuple[int, float]:
    """Run workers until one finishes; with ``kills``, kill each after 5-60 s. Returns the number
    of kills and the seconds taken."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--worker", str(folder), "--steps", str(steps)]
    environment = {**os.environ, "PADST_AUTOTUNE": "0"}  # the same kernels in every process
    killed, began = 0, time.perf_counter()
    while not (folder / "done").exists():
        process = subprocess.Popen(command, env=environment)
        try:
            process.wait(timeout=kills.uniform(5, 60) if kills else None)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed += 1
            saved = folder / "checkpoint.pt"  # torch.load raises if it were half-written
            step = torch.load(saved, weights_only=False)["step"] if saved.exists() else 0
            print(f"  killed; the checkpoint loads, step {step}", flush=True)
            continue
        if process.returncode != 0:
            raise SystemExit(f"the worker in {folder} failed with exit status {process.returncode}")
    return killed, time.perf_counter() - began


def same(a, b) -> bool:
    import torch

    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--out", type=Path, default=Path("soak_out"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return 0
    import torch

    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: choose a new folder")
    print(f"uninterrupted run, {args.steps} steps ...", flush=True)
    _, reference_seconds = run_to_the_end(args.out / "uninterrupted", args.steps, None)
    print(f"  {reference_seconds:.0f} s\nrun killed at random times ...", flush=True)
    killed, killed_seconds = run_to_the_end(args.out / "killed", args.steps, random.Random(args.seed))
    final = [torch.load(args.out / name / "checkpoint.pt", weights_only=False) for name in ("uninterrupted", "killed")]
    equal = same(*final)
    rss = [float(line.split()[1]) for line in (args.out / "uninterrupted" / "rss.log").read_text().splitlines()
           if int(line.split()[0]) > 500]
    growth = rss[-1] / rss[0] - 1 if len(rss) > 1 else 0.0
    leftovers = [path.name for path in (args.out / "killed").iterdir() if path.name.endswith(".padst-tmp")]
    print(f"killed {killed} times; {killed_seconds:.0f} s in all\n"
          f"final states bit-equal: {'yes' if equal else 'NO'}\n"
          f"resident memory after step 500: {rss[0]:.0f} -> {rss[-1]:.0f} MiB ({growth * 100:+.1f} %)\n"
          f"temporary files left by killed writes (the checkpoint itself stayed whole): {len(leftovers)}")
    return 0 if equal and growth < 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
