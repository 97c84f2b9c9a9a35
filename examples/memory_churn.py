"""Create, train one step, freeze and delete many small sparsified models, and print how much
the process grew (Linux: resident set size from /proc/self/status). What the kernels derive
from a layer's tensors is freed with them, so the growth should stay near zero.

    python examples/memory_churn.py [MODELS]        (default 50)
"""

import gc
import sys
from pathlib import Path

import torch
from torch import nn

from padst_compiler.kernels import NM, cache_summary
from padst_compiler.training import harden_permutations, sparsify


def resident_mib() -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def one_model() -> None:
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)])
    sparsify(model, NM(32), 0.875, permutation="random")
    harden_permutations(model)
    x = torch.randn(16, 512, requires_grad=True)
    model(x).sum().backward()
    model.requires_grad_(False)
    with torch.no_grad():
        model(x[:1])
        model(x)


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    for _ in range(5):  # warm-up: allocator pools, the native library, implementation choices
        one_model()
    gc.collect()
    start = resident_mib()
    for _ in range(count):
        one_model()
    gc.collect()
    print(f"RSS after 5 warm-up models {start:.0f} MiB, after {count} more {resident_mib():.0f} MiB "
          f"({resident_mib() - start:+.0f} MiB); derived entries still alive: {sum(cache_summary()['derived'].values())}")
