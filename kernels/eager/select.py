"""Pick the fastest implementation of an op per shape regime, by measuring it.

Every CPU op has several correct implementations (native C++, vectorised PyTorch, a
dense matmul on the expanded weight). Which one wins depends on the structure, the
shapes and the token count, so the first call in a regime times each candidate on the
real inputs and remembers the winner; later calls run it directly. Token counts are
bucketed to powers of two, so a new batch size in the same bucket measures nothing.

An eager call that needs no gradient replays the native kernel call it ended in (see
``dispatch.structured_linear``) and skips the Python around it, so inside :func:`replayed`
a native candidate is timed as that replay: timed with its Python, a native kernel lost to
the PyTorch one at 16 tokens of a 256-wide layer (37 against 32 µs), which a replayed call
then ran at 87 µs a layer instead of 31. Those choices are kept apart from the others.

``PADST_AUTOTUNE=0`` (or :func:`set_autotune`) skips measuring and takes the first
candidate in preference order (native, then PyTorch), which makes runs bit-reproducible
across processes; the ranks of a distributed run always do this. :func:`choices` lists what was picked, for the debug output.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import torch

from padst_compiler.kernels.cpu import native

Candidate = Callable[[], torch.Tensor]

_autotune = os.environ.get("PADST_AUTOTUNE", "1") != "0"
_forced: str | None = None
_chosen: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}
_generation = 0  # moves when the choices are forgotten
_replay = threading.local()  # .active: the calls chosen for now replay their native kernel call


@contextlib.contextmanager
def set_autotune(enabled: bool) -> Iterator[None]:
    """Measure candidates (True) or take the preferred one (False) inside a ``with`` block."""
    global _autotune
    previous, _autotune = _autotune, bool(enabled)
    try:
        yield
    finally:
        _autotune = previous


@contextlib.contextmanager
def only(name: str) -> Iterator[None]:
    """Run implementation ``name`` ("native", "torch" or "dense") inside a ``with`` block, for
    tests and benchmarks; an op without that implementation for its inputs runs its first."""
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


@contextlib.contextmanager
def replayed() -> Iterator[None]:
    """Choose for calls whose later repeats replay their last native kernel call alone."""
    previous, _replay.active = getattr(_replay, "active", False), True
    try:
        yield
    finally:
        _replay.active = previous


def _as_repeated(candidate: Candidate) -> Candidate:
    """What a repeat of ``candidate`` costs where calls replay: the native kernel call it
    ended in, if any, replayed on the same tensors; otherwise the whole candidate."""
    with native.recording() as last:
        candidate()
    if not last:
        return candidate
    call, x, y = last[0]
    return lambda: call.replay(x, y)


def token_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens``: the regime key for the token count."""
    return 1 << max(0, tokens - 1).bit_length()


def _best_seconds(candidates: dict[str, Candidate], repeats: int = 3) -> dict[str, float]:
    """Best of ``repeats`` timed calls of each candidate, after one warm-up call each
    (first-touch allocations, the lazily built native library). The rounds interleave the
    candidates (a b a b ...), so a slow phase of the machine spreads over all of them
    instead of landing on whichever one was being timed when it came."""
    for candidate in candidates.values():
        candidate()
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeats):
        for name, candidate in candidates.items():
            start = time.perf_counter()
            candidate()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def run(op: str, key: tuple, candidates: dict[str, Candidate]) -> torch.Tensor:
    """Run the chosen candidate for ``(op, key)``; candidates are in preference order."""
    if _forced in candidates:
        return candidates[_forced]()
    names = list(candidates)
    if len(names) == 1 or not _autotune or _forced is not None:
        return candidates[names[0]]()
    replaying = getattr(_replay, "active", False)
    full_key = (op, torch.get_num_threads(), replaying, *key)
    name = _chosen.get(full_key)
    if name is None or name not in candidates:
        if _distributed():
            name = _chosen[full_key] = names[0]
        else:
            _timings[full_key] = _best_seconds({n: _as_repeated(c) if replaying else c
                                                for n, c in candidates.items()})
            name = _chosen[full_key] = min(_timings[full_key], key=_timings[full_key].get)
    return candidates[name]()


def _distributed() -> bool:
    """Whether this process is one of several ranks. Timings differ between processes, so
    ranks that measured could pick different implementations, whose results differ in the
    last bits; data-dependent training decisions (a hardened permutation, a mask update)
    could then differ between ranks and leave DDP waiting for a gradient one rank never
    produces. Ranks therefore take the preferred implementation, the same on all of them."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def choices() -> list[dict]:
    """What was picked so far: one record per op and regime, with the measured times (ms);
    ``replayed``: chosen for eager calls that replay their kernel call (timed as that)."""
    return [{"op": key[0], "threads": key[1], "replayed": key[2], "regime": list(map(str, key[3:])), "chosen": name,
             "ms": {n: round(s * 1e3, 4) for n, s in _timings.get(key, {}).items()}}
            for key, name in _chosen.items()]


def state() -> tuple:
    """What decides which implementation a call runs besides its shapes: a decision cached
    under this key is the one :func:`run` makes (a first call that measures runs the winner
    last, so its last kernel call is the chosen one's)."""
    return _autotune, _forced, _generation, torch.get_num_threads()


def clear() -> None:
    """Forget every choice (for benchmarks that must measure from scratch)."""
    global _generation
    _generation += 1
    _chosen.clear()
    _timings.clear()
