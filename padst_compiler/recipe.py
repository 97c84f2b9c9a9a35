"""The training recipe shared by ``examples/train_lm.py``, ``padst bench accuracy`` and
``padst demo``: one run, dense or PA-DST, of one of two tasks on the embedded data, chosen
by the run's model configuration: a small GPT on the standard library's source
(``GPTConfig``) or an MLP on the 8x8 digits (``MLPConfig``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from torch import nn

from padst_compiler.data import ByteCorpus, Digits, stdlib_corpus
from padst_compiler.kernels.structures import Structure, Unstructured
from padst_compiler.models import GPT, GPTConfig, MLPClassifier, MLPConfig
from padst_compiler.training import DSTScheduler, sparsify


@dataclass(frozen=True)
class RunConfig:
    """One training run. ``structure=None`` trains the dense model."""

    structure: Structure | None = None
    sparsity: float = 0.9
    permutation: str = "learned"
    dense_warmup: bool | None = None  # None: the permutation mode's default (on for "learned" only)
    schedule: dict = field(default_factory=dict)  # DSTScheduler options beyond the defaults
    growth: str = "rigl"
    distribution: str = "uniform"
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    lr_warmup: float = 0.0  # fraction of the steps over which the learning rate ramps linearly up to ``lr``
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    model: GPTConfig | MLPConfig = field(default_factory=GPTConfig)
    corpus_bytes: int = 1_000_000
    update_every: int = 50
    device: str = "cpu"


@dataclass
class RunResult:
    config: RunConfig
    model: nn.Module
    curve: list[tuple[int, float]]  # (step, validation loss)
    seconds: float
    scheduler: DSTScheduler | None = None
    final: dict[str, float] = field(default_factory=dict)  # the task's figures after the last step

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


class LanguageModelTask:
    """Next-byte prediction with the small GPT; validation loss over fixed batches."""

    def __init__(self, corpus: ByteCorpus):
        self.corpus = corpus

    def build(self, config: RunConfig) -> GPT:
        return GPT(config.model)

    def sparsify_options(self, model: GPT) -> dict:
        return {}  # every linear layer; the head is tied to the embedding and stays dense

    def batch(self, split: str, config: RunConfig, generator: torch.Generator):
        return batch(self.corpus, split, config, generator)

    @torch.no_grad()
    def evaluate(self, model: GPT, config: RunConfig) -> dict[str, float]:
        gen = torch.Generator().manual_seed(12345)
        losses = [model.loss(*self.batch("validation", config, gen)).item() for _ in range(config.eval_batches)]
        return {"loss": sum(losses) / len(losses)}


class DigitsTask:
    """The 8x8 digits with an MLP whose hidden layers (the first reads raw pixels) are sparse;
    test loss and error rate on the whole test split."""

    def __init__(self, digits: Digits):
        self.digits = digits

    def build(self, config: RunConfig) -> MLPClassifier:
        return MLPClassifier(config.model)

    def sparsify_options(self, model: MLPClassifier) -> dict:
        return {"include": ["hidden.*"]}

    def batch(self, split: str, config: RunConfig, generator: torch.Generator):
        x, y = self.digits.batch(config.batch_size, generator)
        return x.to(config.device), y.to(config.device)

    @torch.no_grad()
    def evaluate(self, model: MLPClassifier, config: RunConfig) -> dict[str, float]:
        x, y = self.digits.test_x.to(config.device), self.digits.test_y.to(config.device)
        logits = model(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, y).item(),
                "error": (logits.argmax(-1) != y).float().mean().item()}


def default_task(config: RunConfig, corpus: ByteCorpus | None = None):
    """The task a run's model configuration belongs to, on the embedded data."""
    if isinstance(config.model, MLPConfig):
        return DigitsTask(Digits())
    return LanguageModelTask(corpus or ByteCorpus(stdlib_corpus(config.corpus_bytes)))


def batch(corpus: ByteCorpus, split: str, config: RunConfig, generator: torch.Generator):
    """Inputs and targets of the run's batch shape on the run's device (drawn on the CPU, so a
    seed gives the same batches on every device)."""
    x, y = corpus.batch(split, config.batch_size, config.model.block_size, generator)
    return x.to(config.device), y.to(config.device)


def evaluate(model: nn.Module, task, config: RunConfig) -> dict[str, float]:
    model.eval()
    figures = task.evaluate(model, config)
    model.train()
    return figures


def build_model(config: RunConfig, task=None) -> nn.Module:
    task = task or default_task(config)
    torch.manual_seed(config.seed)
    model = task.build(config)
    if config.structure is not None:
        sparsify(model, config.structure, config.sparsity, permutation=config.permutation,
                 distribution=config.distribution, seed=config.seed, dense_warmup=config.dense_warmup,
                 strict=True, **task.sparsify_options(model))  # a layer left dense would skew the figures
    return model.to(config.device)


def train(config: RunConfig, corpus: ByteCorpus | None = None, progress: bool = True,
          description: str | None = None, task=None) -> RunResult:
    """Train one model; returns the validation curve (evaluated every ``eval_every`` steps).
    ``task`` defaults to the one ``config.model`` belongs to (``corpus`` serves the GPT task)."""
    task = task or default_task(config, corpus)
    model = build_model(config, task)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    warmup_steps = config.lr_warmup * config.steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps)) \
        if warmup_steps >= 1 else None
    sched = None
    if config.structure is not None:
        sched = DSTScheduler(model, optimizer, total_steps=config.steps, growth=config.growth,
                             update_every=config.update_every, seed=config.seed, **config.schedule)
    gen = torch.Generator().manual_seed(config.seed + 1)
    curve = [(0, evaluate(model, task, config)["loss"])]
    start = time.perf_counter()
    bar = tqdm(range(1, config.steps + 1), desc=description or label(config), disable=not progress,
               leave=False, dynamic_ncols=True)
    final = {}
    for step in bar:
        x, y = task.batch("train", config, gen)
        loss = model.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if lr_schedule:
            lr_schedule.step()
        if sched:
            sched.step()
        if step % config.eval_every == 0 or step == config.steps:
            final = evaluate(model, task, config)
            curve.append((step, final["loss"]))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{curve[-1][1]:.3f}",
                            **(sched.progress_postfix() if sched else {}))
    return RunResult(config, model, curve, time.perf_counter() - start, sched, final)
