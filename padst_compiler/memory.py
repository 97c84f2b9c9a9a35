"""Peak tensor memory of one call, the same measure on the CPU and on CUDA.

On CUDA the caching allocator keeps the statistic. On the CPU PyTorch keeps none, and the
process's RSS high-water mark is no substitute: glibc keeps freed heap memory resident
and hands it out again, so the RSS one compiled GPT training step adds moved between 876
and 1248 MiB over three identical steps of one process. The profiler's memory events
(every allocation and free of PyTorch's CPU allocator, in order) give the bytes tensors
held at the worst moment instead, exactly and the same on every run. Buffers a kernel
allocates outside PyTorch (the native kernels' per-thread tiles, a few KiB) are not seen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tensor_peak_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Bytes of tensor memory at the peak of ``fn()``, above what was allocated when it
    started (tensors alive before the call are not counted; its result, if kept, is)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        fn()
    changes = sorted((event.start_ns(), event.nbytes()) for event in recorded.profiler.kineto_results.events()
                     if event.name() == "[memory]")
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return peak
