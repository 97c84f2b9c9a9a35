"""``padst bench accuracy``: the gap map.

Where does structure cost accuracy against unstructured sparsity, and how much of that gap
does a permutation close? One grid over task (the small GPT on the standard library's
source; an MLP on the 8x8 digits, whose first layer reads raw pixels in a fixed layout),
depth, structure, sparsity and permutation method, with dense, unstructured RigL and SET as
references; every cell trained with several seeds (same steps, batches and learning rate
for every method of a task), reported as mean and standard deviation.

Runs go to ``DIR/runs.jsonl`` as they finish, so an interrupted map resumes where it
stopped; ``DIR/gapmap.json``, ``DIR/gapmap.png`` and the printed table summarise it. DIR
holds nothing else (``outputs.claim_directory``): a folder with other files is refused.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import MISSING, asdict, dataclass, fields, replace
from multiprocessing import get_context
from pathlib import Path

from tabulate import tabulate

from padst_compiler import outputs

COMMAND = "padst bench accuracy"
RUNS, SUMMARY, PLOT = "runs.jsonl", "gapmap.json", "gapmap.png"  # everything the map writes in its folder

SPARSITIES = (0.875, 0.9375, 0.96875)  # 1/8, 1/16, 1/32 kept: what every structure can take exactly
STRUCTURES = ("Block(4x4)", "Block(8x8)", "NM(m=32)", "Diagonal()")
REFERENCES = ("RigL", "SET")  # unstructured, uniform
PERMUTATIONS = ("none", "none+warmup", "random", "learned")
PAPER = "birkhoff"  # the paper's recipe: one row at the lowest sparsity (its soft phase is costly)


@dataclass(frozen=True)
class Method:
    """How one row of the map trains (``structure`` None: dense; "unstructured": RigL / SET)."""

    description: str
    permutation: str = "none"
    dense_warmup: bool | None = None
    schedule: tuple[tuple[str, object], ...] = ()  # DSTScheduler options
    growth: str = "rigl"


METHODS = {
    "dense": Method("dense"),
    "RigL": Method("unstructured RigL (uniform)"),
    "SET": Method("unstructured SET (uniform)", growth="set"),
    "none": Method("structure, no permutation"),
    "none+warmup": Method("structure, no permutation, dense warm-up (ablation: the warm-up alone)",
                          dense_warmup=True),
    "random": Method("structure, fixed random permutation", permutation="random"),
    "learned": Method("structure, learned permutation (the default recipe)", permutation="learned"),
    "birkhoff": Method("structure, the paper's recipe (soft Birkhoff matrix, l1-l2 penalty, threshold 0.22, "
                       "Hungarian, soft phase half of training)", permutation="birkhoff",
                       schedule=(("harden_at", 0.5),)),
}


@dataclass(frozen=True)
class TaskSettings:
    """Training settings shared by every run of one task."""

    steps: int
    batch_size: int
    lr: float
    seeds: int
    depths: tuple[int, ...]
    metric: str  # what the map compares (lower is better)
    lr_warmup: float = 0.0  # fraction of the steps with a linear learning-rate ramp


TASKS = {
    # 10 seeds: with 5, one cell's gap (diagonal, 2 layers, 1/16) passed for real and vanished with 15
    "digits": TaskSettings(steps=1500, batch_size=64, lr=1e-3, seeds=10, depths=(2, 4), metric="test error %"),
    # a transformer trained with Adam at 1e-3 needs a learning-rate ramp: without one the dense 4-layer
    # GPT diverged on one seed of three (2.53 against 2.23-2.27)
    "gpt": TaskSettings(steps=400, batch_size=8, lr=1e-3, seeds=3, depths=(2, 4), metric="val loss", lr_warmup=0.1),
}


@dataclass(frozen=True)
class Cell:
    """One configuration of the map (trained once per seed)."""

    task: str
    depth: int
    method: str
    structure: str | None = None  # a name from STRUCTURES; None for dense and the references
    sparsity: float | None = None  # None for dense

    @property
    def key(self) -> str:
        return f"{self.task}/L{self.depth}/{self.structure or '-'}/{self.sparsity or '-'}/{self.method}"


def _structure(name: str | None):
    from padst_compiler.kernels.structures import NM, Block, Diagonal, Unstructured

    known = {"Block(4x4)": Block(4, 4), "Block(8x8)": Block(8, 8), "NM(m=32)": NM(32), "Diagonal()": Diagonal(),
             "unstructured": Unstructured()}  # RigL / SET cells have no structure name
    return known[name]


def run_config(cell: Cell, seed: int, settings: TaskSettings | None = None):
    """The ``RunConfig`` of one cell and seed."""
    structure = None if cell.method == "dense" else _structure(cell.structure or "unstructured")
    return method_config(cell.task, cell.depth, cell.method, structure, cell.sparsity or 0.0, seed, settings)


def method_config(task: str, depth: int, method: str, structure, sparsity: float, seed: int,
                  settings: TaskSettings | None = None):
    """A ``RunConfig`` that trains ``method`` (a key of ``METHODS``) on ``task`` with the map's
    settings; ``structure`` is ignored for dense and replaced by ``Unstructured()`` for RigL / SET."""
    from padst_compiler.kernels.structures import Unstructured
    from padst_compiler.models import GPTConfig, MLPConfig
    from padst_compiler.recipe import RunConfig

    settings = settings or TASKS[task]
    chosen = METHODS[method]
    model = GPTConfig(n_layer=depth) if task == "gpt" else MLPConfig(hidden=64, n_layer=depth)
    structure = None if method == "dense" else Unstructured() if method in REFERENCES else structure
    return RunConfig(structure=structure, sparsity=sparsity, permutation=chosen.permutation,
                     dense_warmup=chosen.dense_warmup, schedule=dict(chosen.schedule), growth=chosen.growth,
                     steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                     lr_warmup=settings.lr_warmup, eval_every=settings.steps, seed=seed, model=model)


def inexact_layer(model, sparsity: float) -> tuple[str, float] | None:
    """The first PA-DST layer of ``model`` (name, kept fraction) that does not keep exactly
    ``1 - sparsity`` of its weights (a structure rounds its kept units), or None."""
    from padst_compiler.training import padst_layers

    for name, layer in padst_layers(model):
        kept = layer.structure.kept_count(layer.values, layer.index) / (layer.in_features * layer.out_features)
        if not math.isclose(kept, 1 - sparsity):
            return name, kept
    return None


def feasible(cell: Cell) -> bool:
    """Whether every layer the task sparsifies takes the cell's structure at exactly its
    sparsity (a structure that has to round its kept units would make the row another density)."""
    if cell.structure is None:
        return True
    from padst_compiler.recipe import build_model

    try:
        model = build_model(replace(run_config(cell, 0), permutation="none", dense_warmup=None))
    except ValueError:
        return False
    return inexact_layer(model, cell.sparsity) is None


def grid(quick: bool = False, tasks: tuple[str, ...] = tuple(TASKS)) -> list[Cell]:
    """The cells of the full map, or of the ``quick`` subset (one depth, one sparsity, two
    structures); cells a layer shape cannot take are left out."""
    cells = []
    for task in tasks:
        depths = TASKS[task].depths[:1] if quick else TASKS[task].depths
        sparsities = (0.9375,) if quick else SPARSITIES
        structures = ("Block(8x8)", "Diagonal()") if quick and task == "gpt" else \
            ("Block(4x4)", "Diagonal()") if quick else STRUCTURES
        for depth in depths:
            cells.append(Cell(task, depth, "dense"))
            for sparsity in sparsities:
                cells += [Cell(task, depth, ref, None, sparsity) for ref in REFERENCES]
                for structure in structures:
                    methods = PERMUTATIONS + ((PAPER,) if sparsity == sparsities[0] and not quick else ())
                    cells += [Cell(task, depth, method, structure, sparsity) for method in methods]
    return [cell for cell in cells if feasible(cell)]


# ---------------------------------------------------------------------------------- running


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one run per core: the runs are too small to share cores well


def run_one(cell: Cell, seed: int, settings: TaskSettings) -> dict:
    """Train one cell with one seed; returns its record (metric, seconds, kept density)."""
    import warnings

    from padst_compiler.kernels import set_checks
    from padst_compiler.recipe import train
    from padst_compiler.training import padst_layers

    config = run_config(cell, seed, settings)
    with set_checks(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config, progress=False)
    metric = result.final["error"] * 100 if settings.metric == "test error %" else result.final["loss"]
    layers = [layer for _, layer in padst_layers(result.model)]
    density = sum(layer.structure.kept_count(layer.values, layer.index) for layer in layers) / \
        sum(layer.in_features * layer.out_features for layer in layers) if layers else 1.0
    return {"cell": cell.key, **asdict(cell), "seed": seed, "metric": metric, "loss": result.final["loss"],
            "seconds": result.seconds, "density": density}


def _same_settings(recorded: dict, current: dict | None) -> bool:
    """Whether a run was trained with ``current`` (None: a task not run now); a setting added
    since the run was recorded counts at its default. The number of seeds is not how a run
    trains: runs of a map with fewer seeds are the first seeds of one with more."""
    if current is None:
        return True
    defaults = {f.name: f.default for f in fields(TaskSettings) if f.default is not MISSING}
    return {**defaults, **recorded, "seeds": None} == {**current, "seeds": None}


_RECORD_KEYS = {"cell", "task", "depth", "method", "structure", "sparsity", "seed", "metric", "seconds", "density"}


def load_runs(log: Path) -> list[dict]:
    """The run records in ``log`` (none if it is missing). A last line without its newline is
    what a killed run leaves: it is dropped from the file, with a warning, and trained again;
    any other line that is not a run record is refused, the file left as it is."""
    if not log.exists():
        return []
    text = outputs.read_text(log)
    complete, _, partial = text.rpartition("\n")
    records = []
    for number, line in enumerate(complete.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (isinstance(record, dict) and _RECORD_KEYS <= record.keys()):
            raise outputs.PathError(f"{log}: line {number} is not a padst run record; fix it or choose another "
                                    "folder")
        records.append(record)
    if partial.strip():
        print(f"{COMMAND}: warning: {log}: dropping its last line, cut short (a killed run); that run is trained "
              "again", file=sys.stderr, flush=True)
        outputs.write_text(log, text[:-len(partial)])
    return records


def _settings(tasks) -> dict:
    """The settings of ``tasks`` as a run record holds them (JSON types)."""
    return json.loads(json.dumps({task: asdict(TASKS[task]) for task in tasks}))


def open_log(out: str | Path, tasks) -> tuple[Path, list[dict]]:
    """The runs file of the map's folder ``out`` and its records. ``out`` is refused if it
    holds anything but the map's files, or runs of ``tasks`` trained with other settings; a
    folder from before padst marked its folders counts as the map's if it holds a runs file."""
    out = outputs.claim_directory(out, COMMAND, (RUNS, SUMMARY, PLOT), adopt=lambda entries: RUNS in entries)
    log, settings = out / RUNS, _settings(tasks)
    records = load_runs(log)
    for record in records:
        if record.get("settings") and not _same_settings(record["settings"], settings.get(record["task"])):
            raise outputs.PathError(f"{log} holds runs trained with other settings ({record['settings']}); "
                                    "use another --out directory")
    return log, records


def run(cells: list[Cell], out: str | Path, workers: int | None = None, progress: bool = True) -> list[dict]:
    """Train every cell with every seed of its task (skipping runs ``out/runs.jsonl`` already
    holds, see ``open_log``) in ``workers`` processes; returns all records."""
    tasks = {cell.task for cell in cells}
    log, records = open_log(out, tasks)
    settings = _settings(tasks)
    done = {(r["cell"], r["seed"]) for r in records}
    # cheapest task and shallowest model first, every seed of a cell together: a map stopped
    # part-way has whole cells (mean and deviation), and resuming it trains only what is missing
    order = sorted(cells, key=lambda cell: (list(TASKS).index(cell.task), cell.depth))
    jobs = [(cell, seed) for cell in order for seed in range(TASKS[cell.task].seeds) if (cell.key, seed) not in done]
    workers = workers or os.cpu_count() or 1
    if progress:
        print(f"gap map: {len(cells)} cells, {len(jobs)} runs to train ({len(done)} already in {log}), "
              f"{workers} worker(s)", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool, \
            log.open("a") as sink:
        futures = {pool.submit(run_one, cell, seed, TASKS[cell.task]): (cell, seed) for cell, seed in jobs}
        for count, future in enumerate(as_completed(futures), 1):
            record = {**future.result(), "settings": settings[futures[future][0].task]}
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            records.append(record)
            if progress:
                elapsed = time.perf_counter() - start
                print(f"[{count}/{len(jobs)} {elapsed / 60:.1f} min] {record['cell']} seed {record['seed']}: "
                      f"{record['metric']:.4f}", flush=True)
    return records


# ------------------------------------------------------------------------------- summarising


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(records: list[dict]) -> dict:
    """Mean and standard deviation per cell, and per structured configuration (task, depth,
    structure, sparsity): the gap between no permutation and unstructured RigL, how far
    learned is from none in pooled standard deviations, and the share of the gap it closes
    where the gap is real (none worse than RigL by more than two pooled standard deviations)."""
    by_cell: dict[str, list[dict]] = {}
    for record in records:
        by_cell.setdefault(record["cell"], []).append(record)
    cells = {}
    for key, runs in by_cell.items():
        mean, std = _stats([r["metric"] for r in runs])
        first = runs[0]
        cells[key] = {"task": first["task"], "depth": first["depth"], "structure": first["structure"],
                      "sparsity": first["sparsity"], "method": first["method"], "mean": mean, "std": std,
                      "seeds": len(runs), "seconds": statistics.fmean(r["seconds"] for r in runs),
                      "density": statistics.fmean(r["density"] for r in runs)}

    def cell(task, depth, structure, sparsity, method):
        return cells.get(Cell(task, depth, method, structure, sparsity).key)

    comparisons = []
    for entry in cells.values():
        if entry["method"] != "none":
            continue
        where = (entry["task"], entry["depth"], entry["structure"], entry["sparsity"])
        none, learned, rigl = entry, cell(*where, "learned"), cell(*where[:2], None, where[3], "RigL")
        row = {"task": where[0], "depth": where[1], "structure": where[2], "sparsity": where[3],
               "rows": {m: cell(*where, m) for m in PERMUTATIONS + (PAPER,) if cell(*where, m)}}
        if learned:
            pooled = math.sqrt((none["std"] ** 2 + learned["std"] ** 2) / 2)
            row["learned_minus_none_in_std"] = (learned["mean"] - none["mean"]) / pooled if pooled > 0 else 0.0
            row["learned_time_vs_none"] = learned["seconds"] / none["seconds"]
        if rigl:
            pooled = math.sqrt((none["std"] ** 2 + rigl["std"] ** 2) / 2)
            gap = none["mean"] - rigl["mean"]
            row["rigl"] = rigl
            row["gap"] = gap
            row["gap_is_real"] = pooled > 0 and gap > 2 * pooled
            if learned and gap != 0:
                row["share_closed"] = (none["mean"] - learned["mean"]) / gap
        comparisons.append(row)
    comparisons.sort(key=lambda r: (r["task"], r["depth"], r["sparsity"], r["structure"]))
    return {"cells": cells, "comparisons": comparisons}


def _figure(entry: dict | None) -> str:
    if entry is None:
        return "-"
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}"


def table(summary: dict) -> str:
    """One line per structured configuration: references, every permutation method, the gap to
    RigL and what the learned permutation does with it."""
    cells = summary["cells"]
    lines = []
    for row in summary["comparisons"]:
        dense = cells.get(Cell(row["task"], row["depth"], "dense").key)
        gap = "-" if "gap" not in row else f"{row['gap']:+.3f}{' (real)' if row['gap_is_real'] else ''}"
        closed = f"{row['share_closed'] * 100:.0f} %" if row.get("gap_is_real") and "share_closed" in row else "-"
        harm = row.get("learned_minus_none_in_std")
        lines.append((row["task"], row["depth"], row["structure"], f"{1 - row['sparsity']:.4f}", _figure(dense),
                      _figure(row.get("rigl")), *(_figure(row["rows"].get(m)) for m in PERMUTATIONS + (PAPER,)),
                      gap, closed, "-" if harm is None else f"{harm:+.1f}"))
    headers = ["task", "L", "structure", "density", "dense", "RigL", *PERMUTATIONS, PAPER, "gap none-RigL",
               "closed", "learned-none (std)"]
    return tabulate(lines, headers=headers, disable_numparse=True)


def plot(summary: dict, path: Path) -> Path:
    """One panel per (task, depth, structure): the metric against density for RigL and every
    permutation method, error bars one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["depth"], r["structure"]) for r in summary["comparisons"]})
    columns = 4
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, (task, depth, structure) in zip(axes.flat, panels):
        series = {m: [] for m in ("RigL",) + PERMUTATIONS + (PAPER,)}
        for row in summary["comparisons"]:
            if (row["task"], row["depth"], row["structure"]) != (task, depth, structure):
                continue
            for method, entry in [("RigL", row.get("rigl"))] + list(row["rows"].items()):
                if entry:
                    series[method].append((1 - row["sparsity"], entry["mean"], entry["std"]))
        for offset, (method, points) in enumerate(series.items()):
            if points:
                points.sort()
                density, mean, std = zip(*points)
                shifted = [d * 2 ** (0.06 * (offset - len(series) / 2)) for d in density]  # bars side by side
                axis.errorbar(shifted, mean, std, marker="o", capsize=3, label=method,
                              linestyle="--" if method == "RigL" else "-")
        axis.set_xscale("log", base=2)
        axis.set_title(f"{task}, {depth} layers, {structure}", fontsize=9)
        axis.set_xlabel("density")
        axis.set_ylabel(TASKS[task].metric)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    outputs.save_figure(figure, path, dpi=110)
    plt.close(figure)
    return path


def gap_map(quick: bool = False, tasks: tuple[str, ...] = tuple(TASKS), out: str | Path = "padst_gapmap",
            workers: int | None = None) -> dict:
    """Run (or resume) the map and write ``gapmap.json`` and ``gapmap.png`` under ``out``."""
    out = Path(out)
    open_log(out, tasks)  # refuse a folder that is not the map's now, not once the grid is built (a minute)
    cells = grid(quick, tasks)
    records = run(cells, out, workers)
    wanted = {cell.key for cell in cells}
    summary = summarize([r for r in records if r["cell"] in wanted and r["seed"] < TASKS[r["task"]].seeds])
    summary["settings"] = {task: asdict(TASKS[task]) for task in tasks}
    summary["methods"] = {name: method.description for name, method in METHODS.items()}
    print(table(summary))
    print(f"\nmap as JSON: {outputs.write_json(out / SUMMARY, summary)}; plot: {plot(summary, out / PLOT)}")
    return summary
