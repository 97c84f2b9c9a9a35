"""Keep freed CPU memory for reuse, as a caching allocator does (opt-in, process-wide).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a request above
its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it on free, so every
large activation, gradient or result of every step is new memory, zero-filled by the
kernel one 4 KiB page fault at a time. A compiled 12-layer GPT-2-small training step at
4096 tokens on 2 cores spent 0.9 s (dense) and 0.7 s (PA-DST) of system time on that, and
kept freed memory took the steps from 10.5 to 8.9 s and from 3.9 to 3.5 s
(``examples/fresh_memory.py``). PyTorch's CPU tuning guide suggests a caching malloc
(jemalloc, tcmalloc) for the same reason; :func:`keep_freed_memory` gets glibc to behave
so without installing one. The price is that resident memory stays at its high-water mark.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER = -1  # a trim threshold of -1 disables trimming (mallopt(3))
_kept = False


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from its heap (no per-allocation mappings) and keep
    what is freed there for the next allocation (no trimming): the same as running with
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<huge>``. Affects the
    whole process from this call on, and is meant to be called once at its start; there is
    no undo. Returns whether both settings were applied: False, with nothing changed, where
    the C library is not glibc."""
    global _kept
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _kept = _kept or (bool(mallopt(_M_TRIM_THRESHOLD, _NEVER)) and bool(mallopt(_M_MMAP_MAX, 0)))
    return _kept


def freed_memory_kept() -> bool:
    """Whether this process keeps freed memory: :func:`keep_freed_memory` was applied, or the
    process started with glibc's tunable for it (benchmarks report this beside their figures)."""
    return _kept or "glibc.malloc.mmap_max=0" in os.environ.get("GLIBC_TUNABLES", "")
