"""The demo's validation-loss plot, drawn without a display (matplotlib's Agg canvas)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure


def plot_validation_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path) -> Path:
    """One line per run, validation loss against training step, saved as a small PNG."""
    figure = Figure(figsize=(6.4, 4), dpi=100)  # a bare Figure never touches pyplot's global backend
    axes = figure.subplots()
    for name, curve in curves.items():
        steps, losses = zip(*curve)
        axes.plot(steps, losses, marker=".", label=name)
    axes.set_xlabel("training step")
    axes.set_ylabel("validation loss (nats per byte)")
    axes.set_title("padst demo: validation loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)
