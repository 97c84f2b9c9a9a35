"""Where a forward kernel writes its result: a new tensor, or a buffer its caller planned.

Inductor plans the buffers of the extern kernels it calls with ``out=`` and hands a freed
one to a later op of the same size where that does not raise its estimate of the peak. A
result an op allocates itself is new memory on every call: on the CPU a large one is a
fresh mapping the kernel faults in page by page. As out= calls, the structured ops of a
12-layer GPT-2-small forward at 4096 tokens went from 325 to 205 ms of system time a call
(1.40-1.48 s -> 1.18-1.20 s in all). The structured forward ops' Inductor call therefore
runs inside :func:`planned`, and the kernels take their result from :func:`new_result`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_planned = threading.local()  # .out: the buffer the forward running in this thread writes


@contextlib.contextmanager
def planned(out: torch.Tensor | None) -> Iterator[None]:
    """Forward kernels run in this thread inside the block write their result into ``out``
    where it fits (see :func:`new_result`; None: into new tensors); the caller copies any
    result that did not. Only an op's implementation called directly may run inside: one
    called through the dispatcher must return memory of its own."""
    previous, _planned.out = getattr(_planned, "out", None), out
    try:
        yield
    finally:
        _planned.out = previous


def new_result(like: torch.Tensor, rows: int, cols: int, zeroed: bool) -> torch.Tensor:
    """A ``[rows, cols]`` result of ``like``'s dtype and device, zero-filled if ``zeroed``:
    the planned buffer when it has exactly that shape, dtype and device and is contiguous,
    else a new tensor."""
    out = getattr(_planned, "out", None)
    if out is not None and out.shape == (rows, cols) and out.dtype == like.dtype and out.device == like.device \
            and out.is_contiguous():
        return out.zero_() if zeroed else out
    return like.new_zeros(rows, cols) if zeroed else like.new_empty(rows, cols)
