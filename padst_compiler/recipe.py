"""The language-model training recipe shared by ``examples/train_lm.py``, ``padst bench
accuracy`` and ``padst demo``: a small GPT on the embedded corpus, dense or PA-DST."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from padst_compiler.data import ByteCorpus, stdlib_corpus
from padst_compiler.kernels.structures import Structure, Unstructured
from padst_compiler.models import GPT, GPTConfig
from padst_compiler.training import DSTScheduler, sparsify


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``structure=None`` trains the dense model."""

    structure: Structure | None = None
    sparsity: float = 0.9
    permutation: str = "learned"
    growth: str = "rigl"
    distribution: str = "uniform"
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    model: GPTConfig = field(default_factory=GPTConfig)
    corpus_bytes: int = 1_000_000
    update_every: int = 50
    device: str = "cpu"


@dataclass
class RunResult:
    config: RunConfig
    model: GPT
    curve: list[tuple[int, float]]  # (step, validation loss)
    seconds: float
    scheduler: DSTScheduler | None = None

    @property
    def validation_loss(self) -> float:
        return self.curve[-1][1]

    @property
    def perplexity(self) -> float:
        return math.exp(self.validation_loss)


def label(config: RunConfig) -> str:
    if config.structure is None:
        return "dense"
    growth = config.growth.upper() if config.growth == "set" else "RigL"
    extra = f", {config.distribution.upper()}" if config.distribution != "uniform" else ""
    # the unstructured baselines never permute: no "perm none" in their label
    perm = "" if isinstance(config.structure, Unstructured) else f", perm {config.permutation}"
    return f"{config.structure} {growth}{extra}{perm}"


def batch(corpus: ByteCorpus, split: str, config: RunConfig, generator: torch.Generator):
    """Inputs and targets of the run's batch shape on the run's device (drawn on the CPU, so a
    seed gives the same batches on every device)."""
    x, y = corpus.batch(split, config.batch_size, config.model.block_size, generator)
    return x.to(config.device), y.to(config.device)


@torch.no_grad()
def evaluate(model: GPT, corpus: ByteCorpus, config: RunConfig) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(12345)
    losses = [model.loss(*batch(corpus, "validation", config, gen)).item() for _ in range(config.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def build_model(config: RunConfig) -> GPT:
    torch.manual_seed(config.seed)
    model = GPT(config.model)
    if config.structure is not None:
        sparsify(model, config.structure, config.sparsity, permutation=config.permutation,
                 distribution=config.distribution, seed=config.seed)
    return model.to(config.device)


def train(config: RunConfig, corpus: ByteCorpus | None = None, progress: bool = True,
          description: str | None = None) -> RunResult:
    """Train one model; returns the validation curve (evaluated every ``eval_every`` steps)."""
    corpus = corpus or ByteCorpus(stdlib_corpus(config.corpus_bytes))
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = None
    if config.structure is not None:
        sched = DSTScheduler(model, optimizer, total_steps=config.steps, growth=config.growth,
                             update_every=config.update_every, seed=config.seed)
    gen = torch.Generator().manual_seed(config.seed + 1)
    curve = [(0, evaluate(model, corpus, config))]
    start = time.perf_counter()
    bar = tqdm(range(1, config.steps + 1), desc=description or label(config), disable=not progress,
               leave=False, dynamic_ncols=True)
    for step in bar:
        x, y = batch(corpus, "train", config, gen)
        loss = model.loss(x, y)
        total = loss + sched.permutation_penalty() if sched else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if sched:
            sched.step()
        if step % config.eval_every == 0 or step == config.steps:
            curve.append((step, evaluate(model, corpus, config)))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{curve[-1][1]:.3f}",
                            **(sched.progress_postfix() if sched else {}))
    return RunResult(config, model, curve, time.perf_counter() - start, sched)
