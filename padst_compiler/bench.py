"""Benchmarks (not tests): ``padst bench accuracy``.

Short CPU training runs of the small GPT on the embedded corpus at 90 % sparsity, same
steps and seed for every method: dense, unstructured RigL / SET (uniform and ERK), and
every structure with no, a random and a learned permutation.
"""

from __future__ import annotations

import json
from pathlib import Path

from tabulate import tabulate

from padst_compiler.data import ByteCorpus, stdlib_corpus
from padst_compiler.kernels.structures import NM, Block, Diagonal, Unstructured
from padst_compiler.recipe import RunConfig, label, train

ACCURACY_STRUCTURES = (Block(8, 8), NM(32), Diagonal())


def accuracy_configs(steps: int, sparsity: float = 0.9, seed: int = 0, lr: float = 1e-3) -> list[RunConfig]:
    common = dict(steps=steps, sparsity=sparsity, seed=seed, lr=lr)
    configs = [RunConfig(structure=None, **common),
               RunConfig(structure=Unstructured(), permutation="none", growth="rigl", **common),
               RunConfig(structure=Unstructured(), permutation="none", growth="set", **common),
               RunConfig(structure=Unstructured(), permutation="none", growth="rigl", distribution="erk", **common)]
    for structure in ACCURACY_STRUCTURES:
        for permutation in ("none", "random", "learned"):
            configs.append(RunConfig(structure=structure, permutation=permutation, **common))
    return configs


def accuracy(steps: int = 600, sparsity: float = 0.9, seed: int = 0, lr: float = 1e-3, out: str | None = None,
             progress: bool = True) -> list[dict]:
    corpus = ByteCorpus(stdlib_corpus(RunConfig().corpus_bytes))
    rows = []
    for config in accuracy_configs(steps, sparsity, seed, lr):
        result = train(config, corpus, progress=progress)
        density = 1.0 if result.scheduler is None else float(result.scheduler.progress_postfix()["density"])
        rows.append({"method": label(config), "density": density, "val_loss": result.validation_loss,
                     "perplexity": result.perplexity, "seconds": result.seconds})
        print(f"{rows[-1]['method']}: val loss {result.validation_loss:.4f}", flush=True)
    print(tabulate([(r["method"], f"{r['density']:.3f}", f"{r['val_loss']:.4f}", f"{r['perplexity']:.2f}",
                     f"{r['seconds']:.0f}") for r in rows],
                   headers=["method", "density", "val loss", "perplexity", "train s"], disable_numparse=True))
    if out:
        Path(out).write_text(json.dumps({"steps": steps, "sparsity": sparsity, "seed": seed, "lr": lr, "runs": rows},
                                        indent=2))
    return rows
