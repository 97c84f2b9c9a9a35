"""``padst demo``: the main job, end to end on the embedded data.

1. Accuracy: one cell of the gap map where the learned permutation helps (``demo_accuracy``):
   the MLP on the 8x8 digits, dense / unstructured RigL / the structure without a
   permutation / PA-DST with learned permutations, several seeds each, and the share of
   the structure's gap the permutation closes.
2. Train a small GPT with PA-DST on the standard library's source (``recipe``), compile it
   with ``torch.compile(..., backend="padst")`` for a few more training steps and with
   ``optimize`` for inference; check both against eager.
3. Time the compiled PA-DST GPT against the dense GPT compiled with Inductor.
4. Print one table; write ``results.json``, the accuracy plot and the graph-diff report
   (``padst diff``'s records and one HTML page) under the output directory, a new or empty
   one or an earlier demo's (``outputs.claim_directory``): nothing else is overwritten.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

from padst_compiler import debug, demo_accuracy, outputs
from padst_compiler.api import optimize
from padst_compiler.bench import speed_medians
from padst_compiler.data import ByteCorpus, stdlib_corpus
from padst_compiler.demo_plot import plot_accuracy
from padst_compiler.kernels.structures import NM, Block, Diagonal, Structure
from padst_compiler.models import GPT, GPTConfig
from padst_compiler.recipe import RunConfig, batch, build_model, train
from padst_compiler.training import padst_layers

COMMAND = "padst demo"
# everything the demo writes in its output folder; the folders hold padst diff's records of the compiled graphs
RESULTS, PLOT, HTML_REPORT = "results.json", "accuracy.png", "graph_diff.html"
DEBUG, TRAINING_DEBUG = "padst_debug", "padst_debug_training"
COMPILED_TRAINING_STEPS = 3
TIMING_REPEATS = 5
# compiled against eager on the same weights: Inductor reorders float sums, nothing more
MATCH_TOLERANCE = dict(rtol=1e-3, atol=1e-4)

STRUCTURE_NAMES = "blockN (N x N blocks, e.g. block8), blockRxC (e.g. block8x16), nmM (e.g. nm32) or diagonal"
_STRUCTURE_PATTERNS = (
    (re.compile(r"block(\d+)"), lambda m: Block(int(m[1]), int(m[1]))),
    (re.compile(r"block(\d+)x(\d+)"), lambda m: Block(int(m[1]), int(m[2]))),
    (re.compile(r"nm(\d+)"), lambda m: NM(int(m[1]))),
    (re.compile(r"diagonal"), lambda m: Diagonal()),
)


def parse_structure(text: str) -> Structure:
    """``block8`` -> ``Block(8, 8)``, ``nm32`` -> ``NM(32)``, ``diagonal`` -> ``Diagonal()``."""
    for pattern, build in _STRUCTURE_PATTERNS:
        match = pattern.fullmatch(text.strip().lower())
        if match:
            return build(match)
    raise ValueError(f"unknown structure {text!r}: use {STRUCTURE_NAMES}")


def check_structure_fits(structure: Structure, sparsity: float, model_config: GPTConfig) -> None:
    """Refuse before any training a structure some linear layer cannot take at ``sparsity``:
    ``sparsify`` would leave that layer dense and the comparison would not be what it says.
    Raises the structure's one-line ValueError naming the layer."""
    model = GPT(model_config)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight is not model.tok.weight:  # the tied head stays dense
            structure.kept_units(module.out_features, module.in_features, sparsity, layer=name)


@dataclass(frozen=True)
class Match:
    """How close a compiled computation came to eager."""

    max_abs_diff: float
    matches: bool

    def describe(self) -> str:
        return f"{'yes' if self.matches else 'NO'} (max |diff| {self.max_abs_diff:.1e})"


def compare_to_eager(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Match:
    """(compiled, eager) pairs match when every pair is close (``MATCH_TOLERANCE``); report the
    largest difference either way instead of raising, so the table can show it."""
    worst, matches = 0.0, True
    for actual, expected in pairs:
        worst = max(worst, (actual.float() - expected.float()).abs().max().item())
        try:
            torch.testing.assert_close(actual, expected, **MATCH_TOLERANCE)
        except AssertionError:
            matches = False
    return Match(worst, matches)


def compiled_training_check(model: GPT, corpus: ByteCorpus, config: RunConfig, debug_dir: Path
                            ) -> tuple[Match, Callable[..., torch.Tensor]]:
    """Continue training ``model`` for a few Adam steps through the ``padst`` backend, and check
    each step's loss and gradients against an eager copy holding the same weights. Returns the
    match and the compiled loss function (reused for timing)."""
    eager = copy.deepcopy(model)
    compiled_loss = torch.compile(model.loss, backend="padst", options={"debug_dir": str(debug_dir)})
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed + 2)
    pairs = []
    for _ in range(COMPILED_TRAINING_STEPS):
        x, y = batch(corpus, "train", config, gen)
        optimizer.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        loss, eager_loss = compiled_loss(x, y), eager.loss(x, y)
        loss.backward()
        eager_loss.backward()
        pairs.append((loss.detach(), eager_loss.detach()))
        pairs += [(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters()) if p.grad is not None]
        optimizer.step()
        with torch.no_grad():  # the next step compares on the same weights again
            for p, q in zip(model.parameters(), eager.parameters()):
                q.copy_(p)
    return compare_to_eager(pairs), compiled_loss


def gather_counts(debug_dir: Path) -> dict[str, int]:
    """Standalone feature gathers the padst passes found (once ``canonicalize`` has turned every
    way of writing a permutation into one) and left, and how many ended fused into a
    structured op as its in / out index, summed over the recorded graphs."""
    totals = {"before": 0, "after": 0, "fused": 0}
    for run in debug.load_runs(debug_dir):
        canonical = next(p for p in run.passes if p.name == "canonicalize")
        totals["before"] += canonical.counts_after["gathers"]
        totals["after"] += run.passes[-1].counts_after["gathers"]
        totals["fused"] += run.passes[-1].counts_after["fused_gathers"]
    return totals


def _describe_gathers(counts: dict[str, int]) -> str:
    return f"{counts['before']} -> {counts['after']} standalone gathers ({counts['fused']} fused into structured ops)"


def inference_check(model: GPT, idx: torch.Tensor, debug_dir: Path) -> tuple[Match, nn.Module]:
    """``optimize`` a copy of ``model`` for inference (recording the passes in ``debug_dir``) and
    compare its output with eager; returns the match and the optimized module."""
    with torch.no_grad():
        expected = model.eval()(idx)
    model.train()
    optimized = optimize(copy.deepcopy(model), [idx], mode="inference", debug_dir=debug_dir)
    return compare_to_eager([(optimized(idx), expected)]), optimized


def _compile_workers(device: str):
    """On a 2-core machine Inductor's pool of compile workers takes longer to start (about 15 s
    measured) than it saves on the demo's C++ kernels: compile in this process there."""
    few_cores = device == "cpu" and (os.cpu_count() or 1) <= 2
    return torch._inductor.config.patch(compile_threads=1) if few_cores else contextlib.nullcontext()


def run(*, structure: Structure, sparsity: float, steps: int, device: str, out: str | Path,
        model: GPTConfig | None = None, batch_size: int = 16, seeds: int = 3) -> dict:
    """Run the demo (its defaults are the command line's); returns what ``results.json`` holds,
    ``"passed"`` saying whether every check held. ``model``, ``batch_size`` and ``seeds`` let
    tests run tiny."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to this torch build")
    base = RunConfig(structure=structure, sparsity=sparsity, steps=steps, device=device, batch_size=batch_size,
                     eval_every=max(1, steps // 8), model=model or GPTConfig())
    check_structure_fits(structure, sparsity, base.model)
    demo_accuracy.check_fits(structure, sparsity)
    out = outputs.claim_directory(out, COMMAND, (RESULTS, PLOT, HTML_REPORT, DEBUG, TRAINING_DEBUG))
    training_debug, inference_debug = out / TRAINING_DEBUG, out / DEBUG
    for folder in (training_debug, inference_debug):  # an earlier demo's: a rerun must not count its graphs
        shutil.rmtree(folder, ignore_errors=True)

    print(f"padst demo 1/2, accuracy: an MLP on scikit-learn's 8x8 digits, its hidden layers {structure} at "
          f"{sparsity} (the first reads raw pixels), {seeds} seeds of dense, unstructured RigL, no permutation "
          f"and learned permutations", flush=True)
    figures = demo_accuracy.compare(structure, sparsity, seeds)
    closed = demo_accuracy.gap_closed(figures)

    corpus = ByteCorpus(stdlib_corpus(base.corpus_bytes))
    print(f"padst demo 2/2, compiler: a {base.model.n_layer}-layer GPT (d {base.model.d_model}) on "
          f"{base.corpus_bytes / 1e6:g} MB of the Python standard library's source, byte level, PA-DST "
          f"{structure} {sparsity}; {steps} steps, batch {batch_size} x {base.model.block_size}, {device}", flush=True)
    trained = train(base, corpus, description="PA-DST GPT")
    padst = trained.model
    dense = build_model(replace(base, structure=None))  # timing only: its weights do not matter
    layers = padst_layers(padst)
    hard = sum(not layer.soft for _, layer in layers)
    idx, _ = batch(corpus, "validation", base, torch.Generator().manual_seed(base.seed))
    x, y = batch(corpus, "train", base, torch.Generator().manual_seed(base.seed))
    with _compile_workers(device):
        print("compiling PA-DST training (torch.compile, backend 'padst'), checking it against eager ...", flush=True)
        training_match, padst_loss = compiled_training_check(padst, corpus, base, training_debug)
        print("compiling PA-DST inference (padst_compiler.optimize), checking it against eager ...", flush=True)
        inference_match, padst_inference = inference_check(padst, idx, inference_debug)
        print("compiling the dense model with Inductor, timing both ...", flush=True)
        dense_inference = torch.compile(copy.deepcopy(dense).eval(), backend="inductor")
        dense_loss = torch.compile(dense.loss, backend="inductor")
        infer_s, step_s = speed_medians(
            {"padst": lambda: padst_inference(idx), "dense": lambda: dense_inference(idx)},
            {"padst": (padst, lambda: padst_loss(x, y)), "dense": (dense, lambda: dense_loss(x, y))},
            TIMING_REPEATS)

    html_report = outputs.write_text(out / HTML_REPORT, debug.render_html(debug.load_runs(inference_debug)))
    plot = plot_accuracy({demo_accuracy.LABELS[m].format(structure=structure): f.values for m, f in figures.items()},
                         f"digits MLP, {structure} {sparsity}: {demo_accuracy.describe_gap(closed)}",
                         out / PLOT)
    summary = {
        "settings": {"structure": str(structure), "sparsity": sparsity, "steps": steps, "device": device,
                     "batch_size": batch_size, "model": vars(base.model), "seed": base.seed, "seeds": seeds},
        "accuracy": {"task": "digits MLP (gap map settings)", "metric": "test error %",
                     "runs": {m: list(f.values) for m, f in figures.items()},
                     "mean": {m: f.mean for m, f in figures.items()}, "std": {m: f.std for m, f in figures.items()},
                     "gap_closed": closed},
        "gpt": {"validation_loss": trained.validation_loss, "perplexity": trained.perplexity,
                "train_seconds": trained.seconds, "curve": trained.curve},
        "hardened_layers": hard, "padst_layers": len(layers),
        "compiled_training_matches_eager": vars(training_match),
        "inference_matches_eager": vars(inference_match),
        "inference_ms": {name: s * 1e3 for name, s in infer_s.items()},
        "train_step_ms": {name: s * 1e3 for name, s in step_s.items()},
        "gathers": {"training": gather_counts(training_debug), "inference": gather_counts(inference_debug)},
        "files": {"debug_dir": str(inference_debug), "training_debug_dir": str(training_debug),
                  "html_report": str(html_report), "plot": str(plot), "results": str(out / RESULTS)},
    }
    summary["passed"] = training_match.matches and inference_match.matches and hard == len(layers)
    outputs.write_json(out / RESULTS, summary)
    print()
    print(results_table(summary))
    return summary


def results_table(summary: dict) -> str:
    infer, step, gathers, files = (summary["inference_ms"], summary["train_step_ms"], summary["gathers"],
                                   summary["files"])
    settings, accuracy = summary["settings"], summary["accuracy"]
    cell = f"{settings['structure']} {settings['sparsity']}"
    rows = [(f"digits test error % ({settings['seeds']} seeds): {demo_accuracy.LABELS[m].format(structure=cell)}",
             f"{accuracy['mean'][m]:.2f} ± {accuracy['std'][m]:.2f}") for m in demo_accuracy.METHODS]
    rows += [
        ("share of the structure's gap to RigL closed by learning the permutation",
         demo_accuracy.describe_gap(accuracy["gap_closed"])),
        (f"GPT PA-DST {cell}: validation loss (perplexity)",
         f"{summary['gpt']['validation_loss']:.4f} ({summary['gpt']['perplexity']:.2f})"),
        ("learned permutations hardened", f"{summary['hardened_layers']} of {summary['padst_layers']} layers"),
        (f"compiled training (padst) matches eager, {COMPILED_TRAINING_STEPS} steps",
         Match(**summary["compiled_training_matches_eager"]).describe()),
        ("optimize() inference matches eager", Match(**summary["inference_matches_eager"]).describe()),
        ("inference ms: PA-DST (padst) / dense (Inductor)",
         f"{infer['padst']:.2f} / {infer['dense']:.2f} = {infer['dense'] / infer['padst']:.2f}x speed-up"),
        ("training step ms: PA-DST (padst) / dense (Inductor)",
         f"{step['padst']:.2f} / {step['dense']:.2f} = {step['dense'] / step['padst']:.2f}x speed-up"),
        ("permutations, training graph", _describe_gathers(gathers["training"])),
        ("permutations, inference graph", _describe_gathers(gathers["inference"])),
        ("graph-diff report", f"{files['debug_dir']} (padst diff {files['debug_dir']}), {files['html_report']}"),
        ("accuracy plot", files["plot"]),
        ("results as JSON", files["results"]),
    ]
    return tabulate(rows, headers=["result", "value"], disable_numparse=True)
