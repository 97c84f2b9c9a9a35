"""Wall-clock timing for benchmarks: interleaved runs, median over repeats.

Interleaving (a, b, a, b, ...) instead of (a, a, ..., b, b, ...) exposes every
candidate to the same machine state, so a ratio measured in one process is fair. Each
timed call follows an untimed call of the same candidate (a lead-in), so no candidate
pays for what the one before it left behind: a dense training step leaves freed memory
that the next candidate faults back in, and the PA-DST model timed right after it in a
fixed order ran 60-130 ms (10-25 %) slower than the same model timed after another one.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def interleaved_medians(candidates: Mapping[str, Callable[[], object]], repeats: int = 7, warmup: int = 1,
                        min_seconds: float = 0.2, lead_in: bool = True) -> dict[str, float]:
    """Median wall time in seconds of each zero-argument callable (see :func:`interleaved_samples`)."""
    samples = interleaved_samples(candidates, repeats, warmup, min_seconds, lead_in)
    return {name: statistics.median(times) for name, times in samples.items()}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[i] / denominator[i]``, two candidates' samples from
    the same :func:`interleaved_samples` rounds. A slow phase of the machine that spans a
    round scales both times of that round and leaves their ratio alone, where two medians
    taken apart can each land on either side of the phase. Differences between processes
    (where each one's memory landed) stay: state a ratio of a few percent over several runs."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired samples must be the same non-zero length, got {len(numerator)} and "
                         f"{len(denominator)}")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def interleaved_samples(candidates: Mapping[str, Callable[[], object]], repeats: int = 7, warmup: int = 1,
                        min_seconds: float = 0.2, lead_in: bool = True) -> dict[str, list[float]]:
    """Wall times in seconds of each zero-argument callable, one timed call per round and
    candidate (the same number of rounds for all), each after an untimed lead-in call of the
    same callable unless ``lead_in`` is off. Each round starts one candidate further on, so
    every candidate follows each of the others about equally often: even after its lead-in
    call, the 12-layer PA-DST training step timed right after the dense model's measured
    +7.3 % against the one after it, and +0.3 % with the two swapped (one process each).

    Fast candidates get more rounds: warm-up lasts at least ``warmup`` rounds and a
    quarter of ``min_seconds``, and the timed rounds go on past ``repeats`` until they
    cover ``min_seconds``. A 50 µs op is then judged on hundreds of warm calls rather than
    a few cold ones (the first calls after start-up run several times slower), while an
    op of a second still runs ``repeats`` times."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")

    names = list(candidates)

    def run_round(first: int, samples=None):
        for name in names[first:] + names[:first]:
            fn = candidates[name]
            if lead_in and samples is not None:
                fn()
            start = time.perf_counter()
            fn()
            if samples is not None:
                samples[name].append(time.perf_counter() - start)

    start, rounds = time.perf_counter(), 0
    while rounds < warmup or time.perf_counter() - start < min_seconds / 4:
        run_round(rounds % len(names))
        rounds += 1
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or time.perf_counter() - start < min_seconds:
        run_round(rounds % len(names), samples)
        rounds += 1
    return samples


def interleaved_self_timed_medians(samplers: Mapping[str, Callable[[int], float]], repeats: int = 7,
                                   sample_seconds: float = 0.2, settle_seconds: float = 0.05) -> dict[str, float]:
    """Median seconds per call of candidates that time themselves: ``sampler(k)`` makes k
    calls and returns their wall time as it measured it (another process measures its own
    calls, so the message round trip is not counted). Each sample makes enough calls to last
    about ``sample_seconds``; samples run interleaved, ``repeats`` rounds after a warm-up.
    Each sample starts ``settle_seconds`` after the one before: thread pools that spin after
    their last call (OpenMP's) would otherwise take cores from the next candidate."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    calls = {}
    for name, sampler in samplers.items():
        sampler(1)  # first call: lazy initialisation
        per_call = max(sampler(1), 1e-7)
        calls[name] = max(1, round(sample_seconds / per_call))
        sampler(calls[name])  # warm
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(repeats):
        for name, sampler in samplers.items():
            time.sleep(settle_seconds)
            samples[name].append(sampler(calls[name]) / calls[name])
    return {name: statistics.median(times) for name, times in samples.items()}


def machine() -> str:
    """The processor a benchmark ran on: its model name, widest vector instruction set and
    thread count. The same command gives different ratios on different processors (the dense
    baseline's library gains more from AVX-512 on some than the sparse kernels do), so every
    benchmark prints this beside its figures."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    import torch

    return f"{fields.get('model name') or platform.processor() or 'unknown CPU'}, {isa}, {torch.get_num_threads()} threads"
