"""The demo's plots, drawn without a display (matplotlib's Agg canvas)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from padst_compiler import outputs


def plot_accuracy(errors: Mapping[str, Sequence[float]], title: str, path: str | Path) -> Path:
    """One bar per method: mean test error with one standard deviation, every seed as a dot."""
    figure = Figure(figsize=(7.2, 4), dpi=100)
    axes = figure.subplots()
    for position, (name, values) in enumerate(errors.items()):
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        axes.bar(position, statistics.fmean(values), yerr=spread, capsize=4, alpha=0.7)
        axes.plot([position] * len(values), values, "k.", alpha=0.6)
    axes.set_xticks(range(len(errors)), list(errors), rotation=12, fontsize=8)
    axes.set_ylabel("test error % (mean, std, seeds)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return outputs.save_figure(figure, path)
