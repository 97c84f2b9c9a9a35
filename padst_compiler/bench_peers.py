"""``padst bench peers``: the 768 -> 3072 -> 768 GELU MLP at 0.9 sparsity on every CPU runtime a
user could pick, each as a speed-up over the *fastest dense* runtime measured.

PyTorch eager, Inductor, padst eager and ``optimize`` run in this process; Neural Magic's
DeepSparse (dense and 90 % unstructured, from ONNX) runs in its own environment
(``make deepsparse-env``), driven through ``peers_deepsparse``. Samples alternate between
all candidates (both processes), medians of repeats; each process times its own calls.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from padst_compiler import outputs
from padst_compiler.kernels.structures import Block
from padst_compiler.timing import interleaved_self_timed_medians

RESULT_KEYS = ("d", "hidden", "sparsity", "deepsparse", "rows")
DEFAULT_DEEPSPARSE_PYTHON = Path(".venv-deepsparse") / "bin" / "python"
DENSE = ("PyTorch dense", "Inductor dense", "DeepSparse dense")
SETUP_SECONDS, SAMPLE_SECONDS = 900, 300  # compiling the engines; one sample of about 0.2 s
HOW_TO_INSTALL = ("create its environment with `make deepsparse-env` (Python 3.11: deepsparse 1.8.0 pins numpy 1.26 "
                  "and onnx 1.14) or name one with --deepsparse-python")


class GELUMLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class DeepSparseWorker:
    """The DeepSparse process: compiles its engines on start, then times calls on request."""

    def __init__(self, python: Path, setup: dict):
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([str(python), str(Path(__file__).with_name("peers_deepsparse.py"))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, bufsize=1)
        try:
            self.version = self._ask(setup, SETUP_SECONDS)["ready"]
        except BaseException:
            self.close()
            raise

    def _ask(self, message: dict, seconds: float = SAMPLE_SECONDS) -> dict:
        """Send one request and wait up to ``seconds`` for its answer."""
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
        except OSError:  # the process has ended
            raise RuntimeError(self._stderr_tail() or "the DeepSparse process ended") from None
        if not select.select([self.process.stdout], [], [], seconds)[0]:
            raise RuntimeError(f"no answer from the DeepSparse process within {seconds:.0f} s")
        line = self.process.stdout.readline()
        try:
            answer = json.loads(line) if line else {"error": self._stderr_tail() or "the process ended"}
        except ValueError:
            answer = {"error": f"unreadable answer {line[:200]!r}"}
        if not isinstance(answer, dict) or "error" in answer:
            raise RuntimeError(answer.get("error") if isinstance(answer, dict) else f"unreadable answer {line!r}")
        return answer

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        lines = self.stderr.read().strip().splitlines()
        return lines[-1] if lines else ""

    def sampler(self, variant: str, tokens: int) -> Callable[[int], float]:
        return lambda calls: self._ask({"variant": variant, "tokens": tokens, "calls": calls})["seconds"]

    def close(self) -> None:
        try:
            self.process.stdin.write(json.dumps({"quit": True}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.stderr.close()


def _start_deepsparse(python: Path | None, setup: dict) -> tuple[DeepSparseWorker | None, str]:
    """The worker, or None and why DeepSparse is left out."""
    python = python or Path(os.environ.get("PADST_DEEPSPARSE_PYTHON", DEFAULT_DEEPSPARSE_PYTHON))
    if not python.is_file():
        return None, f"DeepSparse left out: there is no Python at {python}; {HOW_TO_INSTALL}"
    try:
        return DeepSparseWorker(python, setup), ""
    except (OSError, RuntimeError) as error:
        return None, f"DeepSparse left out: {python} could not run it ({error}); {HOW_TO_INSTALL}"


def _local_sampler(fn: Callable[[], object]) -> Callable[[int], float]:
    import time

    def sample(calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - start

    return sample


def peer_speed(tokens: tuple[int, ...] = (1, 16, 4096), d: int = 768, hidden: int = 3072, sparsity: float = 0.9,
               repeats: int = 7, deepsparse_python: Path | None = None, out: str | None = None) -> list[dict]:
    if out:
        outputs.check_file(out, "a padst bench peers result", outputs.json_with_keys(RESULT_KEYS))
    with tempfile.TemporaryDirectory() as folder:
        worker, missing = _start_deepsparse(deepsparse_python, {"d": d, "hidden": hidden, "sparsity": sparsity,
                                                                "tokens": list(tokens), "seed": 0, "folder": folder})
        try:
            rows = _measure(tokens, d, hidden, sparsity, repeats, worker)
        finally:
            if worker is not None:
                worker.close()
    title = f"{d} -> {hidden} -> {d} GELU MLP, sparsity {sparsity}, CPU ({torch.get_num_threads()} threads)"
    print(title + (f"; DeepSparse {worker.version}" if worker else ""))
    names = list(rows[0]["ms"])
    print(tabulate([[name] + [f"{row['ms'][name]:.3f} ms  {row['vs_fastest_dense'][name]:.2f}x" for row in rows]
                    for name in names],
                   headers=["runtime"] + [f"{row['tokens']} token(s): ms, vs fastest dense" for row in rows],
                   disable_numparse=True))
    print("fastest dense: " + ", ".join(f"{row['tokens']} token(s) {row['fastest_dense']}" for row in rows))
    if missing:
        print(missing)
    if out:
        outputs.write_json(out, {"d": d, "hidden": hidden, "sparsity": sparsity,
                                 "deepsparse": worker.version if worker else None, "rows": rows})
    return rows


def _measure(tokens, d, hidden, sparsity, repeats, worker: DeepSparseWorker | None) -> list[dict]:
    """One row per token count: milliseconds per call and the speed-up over the fastest dense runtime."""
    from padst_compiler.api import optimize
    from padst_compiler.training import sparsify

    torch.manual_seed(0)
    dense = GELUMLP(d, hidden).eval()
    padst = sparsify(GELUMLP(d, hidden), Block(32, 32), sparsity, permutation="random", strict=True).eval()
    inductor = torch.compile(dense)
    rows = []
    for count in tokens:
        x = torch.randn(count, d, generator=torch.Generator().manual_seed(count))
        optimized = optimize(padst, [x], mode="inference")
        with torch.no_grad():
            samplers = {"PyTorch dense": _local_sampler(lambda: dense(x)),
                        "Inductor dense": _local_sampler(lambda: inductor(x)),
                        "padst eager": _local_sampler(lambda: padst(x)),
                        "padst optimize": _local_sampler(lambda: optimized(x))}
            if worker is not None:
                samplers["DeepSparse dense"] = worker.sampler("dense", count)
                samplers[f"DeepSparse {sparsity:.0%} unstructured"] = worker.sampler("sparse", count)
            seconds = interleaved_self_timed_medians(samplers, repeats=repeats)
        fastest = min((name for name in DENSE if name in seconds), key=seconds.get)
        rows.append({"tokens": count, "fastest_dense": fastest, "ms": {n: s * 1e3 for n, s in seconds.items()},
                     "vs_fastest_dense": {n: seconds[fastest] / s for n, s in seconds.items()}})
    return rows
