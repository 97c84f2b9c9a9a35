"""The demo's accuracy part: one cell of the gap map (``padst bench accuracy``) where the
learned permutation helps, trained as the map trains it: the MLP on the 8x8 digits, whose
first sparse layer reads raw pixels, dense / unstructured RigL / the structure without a
permutation / with the learned one, several seeds each."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from tqdm import tqdm

from padst_compiler import gapmap
from padst_compiler.kernels import set_checks
from padst_compiler.kernels.structures import Structure
from padst_compiler.recipe import build_model, train

METHODS = ("dense", "RigL", "none", "learned")
LABELS = {"dense": "dense", "RigL": "unstructured RigL", "none": "{structure}, no permutation",
          "learned": "{structure}, learned permutation"}


@dataclass(frozen=True)
class Figure:
    """Test error in percent over the seeds."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    def describe(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}"


def check_fits(structure: Structure, sparsity: float, depth: int = 2) -> None:
    """Refuse, naming the layer, a structure the MLP cannot take at exactly ``sparsity``."""
    config = gapmap.method_config("digits", depth, "none", structure, sparsity, seed=0)
    widths = [config.model.inputs] + [config.model.hidden] * depth
    for position, (inputs, outputs) in enumerate(zip(widths[:-1], widths[1:])):
        structure.kept_units(outputs, inputs, sparsity, layer=f"hidden.{position}")  # the structure's own error
    inexact = gapmap.inexact_layer(build_model(config), sparsity)
    if inexact:
        name, kept = inexact
        raise ValueError(f"layer {name!r} of the digits MLP keeps {kept:.4f} of its weights with {structure}, "
                         f"not 1 - {sparsity}: pick a sparsity this structure takes exactly (e.g. 0.875, 0.9375)")


def compare(structure: Structure, sparsity: float, seeds: int, depth: int = 2,
            progress: bool = True) -> dict[str, Figure]:
    """Test error of every method of ``METHODS`` on the digits task, ``seeds`` runs each."""
    runs = [(method, seed) for method in METHODS for seed in range(seeds)]
    errors: dict[str, list[float]] = {method: [] for method in METHODS}
    with set_checks(False):
        for method, seed in tqdm(runs, desc="digits MLP", disable=not progress, leave=False):
            config = gapmap.method_config("digits", depth, method, structure, sparsity, seed)
            errors[method].append(train(config, progress=False).final["error"] * 100)
    return {method: Figure(tuple(values)) for method, values in errors.items()}


def gap_closed(figures: dict[str, Figure]) -> dict:
    """The structure's gap to unstructured RigL (none - RigL), whether it exceeds two pooled
    standard deviations, and the share of it the learned permutation closes."""
    none, rigl, learned = figures["none"], figures["RigL"], figures["learned"]
    gap = none.mean - rigl.mean
    pooled = math.sqrt((none.std ** 2 + rigl.std ** 2) / 2)
    return {"gap": gap, "real": gap > 2 * pooled, "share": (none.mean - learned.mean) / gap if gap else math.nan,
            "learned_minus_none": learned.mean - none.mean}


def describe_gap(closed: dict) -> str:
    if closed["gap"] <= 0:
        return f"no gap here: the structure without a permutation is already as good as RigL ({closed['gap']:+.2f})"
    verdict = "a real gap (over 2 std)" if closed["real"] else "a gap within 2 std"
    return f"{closed['share'] * 100:.0f} % of {verdict} of {closed['gap']:.2f} points"
