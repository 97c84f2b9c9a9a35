"""``padst bench export``: does the deployable package keep the speed-up?

The dense GPT and the PA-DST GPT (Block 32x32 at 0.9, hardened permutations) are each
exported to an AOTInductor package (dynamic batch and sequence), loaded back in this process
and timed on the same token batches, interleaved, medians of repeats.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from padst_compiler import outputs
from padst_compiler.kernels.structures import Block
from padst_compiler.timing import interleaved_medians

RESULT_KEYS = ("layers", "d_model", "sparsity", "rows")


def _export_dense(model, example, dynamic_shapes, path: Path) -> None:
    with torch.no_grad():
        program = torch.export.export(model.eval(), example, dynamic_shapes=dynamic_shapes)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def package_speed(layers: int = 2, d_model: int = 768, heads: int = 12, sparsity: float = 0.9,
                  shapes: tuple[tuple[int, int], ...] = ((1, 16), (1, 128), (8, 512)), repeats: int = 7,
                  out: str | None = None) -> list[dict]:
    """Time the dense and the PA-DST package on ``[batch, sequence]`` token batches; print
    milliseconds and the speed-up, and the export + compile time of each package."""
    from padst_compiler.deploy import export, load_package
    from padst_compiler.models import GPT, GPTConfig
    from padst_compiler.training import sparsify

    if out:
        outputs.check_file(out, "a padst bench export result", outputs.json_with_keys(RESULT_KEYS))
    longest = max(sequence for _, sequence in shapes)
    config = GPTConfig(block_size=longest, n_layer=layers, n_head=heads, d_model=d_model)
    example = (torch.zeros(2, 16, dtype=torch.long),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("sequence", min=2, max=longest)},)
    compile_seconds, packages = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("dense", "PA-DST"):
            torch.manual_seed(0)
            model = GPT(config)
            path = Path(folder) / f"{name}.pt2"
            start = time.perf_counter()
            if name == "dense":
                _export_dense(model, example, dynamic, path)
            else:  # "random" is hardened from the start: the same kernels as a learned permutation
                sparsify(model, Block(32, 32), sparsity, permutation="random", strict=True)
                export(model, example, path, dynamic_shapes=dynamic)
            compile_seconds[name] = time.perf_counter() - start
            packages[name] = load_package(path)
    rows = []
    for batch, sequence in shapes:
        ids = torch.randint(0, config.vocab_size, (batch, sequence), generator=torch.Generator().manual_seed(0))
        times = interleaved_medians({name: (lambda p=package: p(ids)) for name, package in packages.items()},
                                    repeats=repeats)
        rows.append({"batch": batch, "sequence": sequence, "dense_ms": times["dense"] * 1e3,
                     "padst_ms": times["PA-DST"] * 1e3, "speedup": times["dense"] / times["PA-DST"]})
    print(f"AOTInductor packages: GPT {layers} layers, d {d_model}, Block(32x32) at {sparsity}, CPU; export + compile "
          f"{compile_seconds['dense']:.0f} s dense, {compile_seconds['PA-DST']:.0f} s PA-DST")
    print(tabulate([(f"{r['batch']}x{r['sequence']}", f"{r['dense_ms']:.2f}", f"{r['padst_ms']:.2f}",
                     f"{r['speedup']:.2f}x") for r in rows],
                   headers=["tokens (batch x sequence)", "dense package ms", "PA-DST package ms", "speed-up"],
                   disable_numparse=True))
    if out:
        outputs.write_json(out, {"layers": layers, "d_model": d_model, "sparsity": sparsity, "rows": rows})
    return rows
