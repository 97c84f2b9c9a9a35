"""Eager calls of the structured ops without the dispatcher, and their replay.

A plain eager call that needs no gradient runs the op's implementation directly: the
dispatcher and the custom-op layers cost about 25 µs a call, most of the time of a
one-token forward. Where that call ends in a native kernel, the next calls with the same
layer tensors replay the kernel call alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from padst_compiler.kernels import result_buffers
from padst_compiler.kernels.cpu import native
from padst_compiler.kernels.eager import select
from padst_compiler.kernels.eager.derived import memoize
from padst_compiler.kernels.ops import checks

Tensor = torch.Tensor

# ``torch.ops.padst.<name>`` -> the function its forward runs, and the same for the
# ``<name>_grad_input`` ops (filled in as the ops are defined).
DIRECT_FORWARD: dict[object, Callable] = {}
DIRECT_GRAD_INPUT: dict[object, Callable] = {}
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _dispatcher_needed(*tensors: Tensor | None) -> bool:
    """Whether a call must go through the dispatcher: anything tracing, transforming,
    profiling or differentiating it, or a tensor that is not a plain CPU/CUDA tensor."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None \
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled() \
            or torch._C._functorch.maybe_current_level() is not None or torch._C._autograd._profiler_enabled():
        return True
    grad = torch.is_grad_enabled()
    return any(t is not None and (type(t) not in _PLAIN_TENSORS or (grad and t.requires_grad)) for t in tensors)


def structured_linear(op, x, values, index, out_features, bias=None, in_index=None, out_index=None,
                      out: Tensor | None = None) -> Tensor:
    """``op(x, values, index, ...)`` for a structured op. A plain eager call that needs no
    gradient runs the op's implementation directly: the dispatcher and the custom-op layers
    cost about 25 µs a call, most of the time of a one-token forward. Where that call ends
    in a native kernel on x, the next calls with the same layer tensors (same objects and
    versions), input shape and implementation choice replay the kernel call alone: the
    checks, the choice and the argument preparation are another 40-60 µs of Python. Each
    layer keeps the call of its latest input shape (decoding repeats one), as a trainable
    layer's call holds a copy of its weights. With ``out`` (a buffer Inductor planned, of
    the result's size) the result is written there and ``out`` returned."""
    args = (x, values, index, out_features, bias, in_index, out_index)
    return _run(op, args, out, lambda: _direct(op, *args))


def structured_grad_input(op, grad, values, index, in_features, in_index=None, out_index=None,
                          out: Tensor | None = None) -> Tensor:
    """``op(grad, values, index, ...)`` for a structured op's ``*_grad_input``, skipping the
    dispatcher where nothing needs it and writing into ``out`` as :func:`structured_linear`
    does. No replay: a backward runs at training token counts, where the Python around the
    kernel call is a small share of it."""
    args = (grad, values, index, in_features, in_index, out_index)
    return _run(op, args, out, lambda: DIRECT_GRAD_INPUT[op](*args))


def _run(op, args: tuple, out: Tensor | None, direct: Callable[[], Tensor]) -> Tensor:
    """``op(*args)`` through the dispatcher where a call needs it, else ``direct()`` (the
    op's implementation), its kernels writing into ``out`` where it fits (see
    :mod:`..result_buffers`); with ``out`` any result written elsewhere is copied there and
    ``out`` returned."""
    if _dispatcher_needed(*(a for a in args if not isinstance(a, int))):
        y = op(*args)  # an op's result is its own
    else:
        with result_buffers.planned(None if out is None else out.view(-1, out.shape[-1])):
            y = direct()
    if out is None:
        return y
    if y.data_ptr() != out.data_ptr():  # an implementation that allocates its result
        out.copy_(y.view(out.shape))
    return out


def _direct(op, x, values, index, out_features, bias, in_index, out_index) -> Tensor:
    """The op's implementation, or the replay of its native kernel call (see above)."""
    direct = DIRECT_FORWARD[op]
    if x.dim() == 0 or x.device.type != "cpu" or native.library() is None:
        return direct(x, values, index, out_features, bias, in_index, out_index)
    x2 = x.reshape(-1, x.shape[-1])
    layer = memoize("direct forward", (values, index, bias, in_index, out_index), dict, op, x2.dtype,
                    out_features, checks.checks_enabled(), select.state())
    shape = (x2.shape, x2.stride())
    recorded = layer.get("replay")  # (shape, call); one dict operation at a time, safe across threads
    if recorded is not None and recorded[0] == shape:
        y = native.output_buffer(x2, out_features)
        recorded[1].replay(x2, y)
        return y.view(*x.shape[:-1], out_features)
    with native.recording() as last, select.replayed():
        y = direct(x, values, index, out_features, bias, in_index, out_index)
    layer.pop("replay", None)
    if last and x2.stride(-1) == 1:
        call, x_read, y_written = last[0]  # the call that wrote y (a first call may have measured others)
        if x_read.data_ptr() == x2.data_ptr() and x_read.stride(0) == x2.stride(0) \
                and y_written.data_ptr() == y.data_ptr() and y_written.shape == (x2.shape[0], out_features) \
                and y_written.is_contiguous():
            layer["replay"] = (shape, call)
    return y
