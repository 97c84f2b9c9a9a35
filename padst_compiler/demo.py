"""``padst demo``: the main job.

At this stage it checks every structured op against the dense reference on one
GPT-2-sized MLP layer (768 -> 3072, 4096 tokens) and times it against ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tabulate import tabulate

from padst_compiler.kernels import NM, Block, Diagonal, Structure, Unstructured, set_checks
from padst_compiler.timing import interleaved_medians

DEMO_STRUCTURES: tuple[Structure, ...] = (Block(32, 32), Block(64, 64), NM(32), Diagonal(), Unstructured())


@dataclass(frozen=True)
class LayerCheck:
    structure: str
    kept_fraction: float
    max_abs_error: float
    forward_ms: float
    dense_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.forward_ms


def check_layer(structure: Structure, sparsity: float, in_features: int = 768, out_features: int = 3072,
                tokens: int = 4096, repeats: int = 7, seed: int = 0) -> LayerCheck:
    """Run one structured layer, compare it with the masked dense matmul, time both."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=gen)
    dense = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
    bias = torch.randn(out_features, generator=gen)
    weight = structure.project(dense, sparsity, layer=f"demo {out_features}x{in_features}")
    reference_weight = weight.to_dense()
    with torch.no_grad():
        error = (weight.linear(x, bias) - F.linear(x, reference_weight, bias)).abs().max().item()
    with torch.no_grad(), set_checks(False):  # index validation is checked above, not timed
        times = interleaved_medians({
            "sparse": lambda: weight.linear(x, bias),
            "dense": lambda: F.linear(x, dense, bias),
        }, repeats=repeats)
    return LayerCheck(str(structure), weight.kept_fraction, error, times["sparse"] * 1e3, times["dense"] * 1e3)


def run(sparsity: float = 0.9, tokens: int = 4096, repeats: int = 7) -> list[LayerCheck]:
    torch.manual_seed(0)
    print(f"padst demo: structured ops on a 768 -> 3072 layer, {tokens} tokens, sparsity {sparsity}, "
          f"fp32 on the CPU ({torch.get_num_threads()} threads); median of {repeats} interleaved runs, "
          "index value checks off while timing\n")
    results = [check_layer(s, sparsity, tokens=tokens, repeats=repeats) for s in DEMO_STRUCTURES]
    rows = [(r.structure, f"{r.kept_fraction:.3f}", f"{r.max_abs_error:.1e}", f"{r.forward_ms:.2f}",
             f"{r.dense_ms:.2f}", f"{r.speedup:.2f}x") for r in results]
    print(tabulate(rows, headers=["structure", "kept", "max abs err", "forward ms", "F.linear ms",
                                  "speed-up vs dense"], disable_numparse=True))
    print("\nUnstructured is the masked dense baseline: it has no sparse kernel, by design.")
    return results
