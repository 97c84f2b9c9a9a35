"""``padst bench depth``: per-layer forward time against model depth.

Whatever the ops derive from a layer (index plans, packed panels, check results, recorded
kernel calls) is kept with that layer, so a deep model must cost the same per layer as a
shallow one. The sweep times a stack of N sparsified ``nn.Linear`` layers (hardened random
permutations) eagerly without autograd and compiled with ``optimize``, beside the dense
stack of the same depth, and reports the spread of the per-layer time over the depths.
"""

from __future__ import annotations

import contextlib
import time

import torch
from tabulate import tabulate
from torch import nn

from padst_compiler import outputs
from padst_compiler.kernels import Block, set_checks
from padst_compiler.kernels.structures import Structure
from padst_compiler.timing import interleaved_medians, machine

RESULT_KEYS = ("structure", "sparsity", "rows")  # the keys of the JSON result (--out FILE)


def _stack(depth: int, width: int, structure: Structure | None, sparsity: float) -> nn.Sequential:
    from padst_compiler.training import harden_permutations, sparsify

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    if structure is not None:
        sparsify(model, structure, sparsity, permutation="random", strict=True)  # no layer left dense
        harden_permutations(model)
    return model.eval()


def depth_sweep(depths=(50, 120, 200, 500), widths=(256, 1024), tokens=(16, 512), structure: Structure = Block(16, 16),
                sparsity: float = 0.9, compiled: bool = True, repeats: int = 5, out: str | None = None) -> list[dict]:
    """Per-layer forward time (µs) of the sparse stack, eager and (``compiled``) through
    ``optimize``, and of the dense stack eagerly, for every depth, width and token count;
    all depths of one width are timed interleaved, so that the spread printed at the end
    (slowest over fastest per-layer time across depths) compares like with like."""
    if out:  # refused now, not after minutes of timing
        outputs.check_file(out, "a padst bench depth result", outputs.json_with_keys(RESULT_KEYS))
    rows = []
    with set_checks(False), _flushed_denormals():  # hundreds of layers shrink activations into denormals
        for width in widths:
            models, compile_s = {}, {}
            for depth in depths:
                models["dense eager", depth] = _stack(depth, width, None, sparsity)
                models["padst eager", depth] = _stack(depth, width, structure, sparsity)
                if compiled:
                    models["padst optimize", depth], compile_s[depth] = _optimized(
                        _stack(depth, width, structure, sparsity), torch.randn(tokens[0], width))
            for n in tokens:
                x = torch.randn(n, width)
                with torch.no_grad():
                    medians = interleaved_medians({key: (lambda m=model: m(x)) for key, model in models.items()},
                                                  repeats=repeats)
                for depth in depths:
                    rows.append({"width": width, "depth": depth, "tokens": n, "compile_s": compile_s.get(depth),
                                 **{f"{kind} us/layer": seconds / depth * 1e6
                                    for (kind, d), seconds in medians.items() if d == depth}})
            del models
    _report(rows)
    if out:
        outputs.write_json(out, {"structure": str(structure), "sparsity": sparsity, "rows": rows})
    return rows


def _optimized(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, float]:
    """``optimize(model)`` and its compile time (compiled for any token count)."""
    from padst_compiler.api import optimize

    torch._dynamo.reset()
    start = time.perf_counter()
    optimized = optimize(model, [example], dynamic=True)
    return optimized, time.perf_counter() - start


@contextlib.contextmanager
def _flushed_denormals():
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)  # the default


def spread(rows: list[dict], column: str) -> dict[tuple[int, int], float]:
    """Slowest over fastest per-layer time across depths, per (width, tokens)."""
    groups: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        if row.get(column) is not None:
            groups.setdefault((row["width"], row["tokens"]), []).append(row[column])
    return {key: max(times) / min(times) for key, times in groups.items()}


def _report(rows: list[dict]) -> None:
    columns = [c for c in ("dense eager us/layer", "padst eager us/layer", "padst optimize us/layer") if c in rows[0]]
    print(machine())
    print(tabulate([(r["width"], r["depth"], r["tokens"], *(f"{r[c]:.1f}" for c in columns),
                     f"{r['dense eager us/layer'] / r['padst eager us/layer']:.2f}x",
                     "" if r["compile_s"] is None else f"{r['compile_s']:.0f}") for r in rows],
                   headers=["width", "layers", "tokens", *columns, "eager vs dense", "compile s"],
                   disable_numparse=True))
    for column in columns[1:]:
        figures = ", ".join(f"width {w} / {n} tokens {s:.2f}" for (w, n), s in sorted(spread(rows, column).items()))
        print(f"{column.removesuffix(' us/layer')}: slowest / fastest per-layer time across depths: {figures}")
