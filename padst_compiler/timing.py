"""Wall-clock timing for benchmarks: interleaved runs, median over repeats.

Interleaving (a, b, a, b, ...) instead of (a, a, ..., b, b, ...) exposes every
candidate to the same machine state, so a ratio measured in one process is fair.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleaved_medians(candidates: Mapping[str, Callable[[], object]], repeats: int = 7,
                        warmup: int = 1) -> dict[str, float]:
    """Median wall time in seconds of each zero-argument callable."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}
