"""Lets Inductor see the Triton kernels of the structured ops on CUDA (design section 4).

``torch.library.triton_op`` makes its kernels visible by decomposing the op while
AOTAutograd functionalizes the graph: the traced graph then calls the kernels through
``wrap_triton`` and Inductor compiles them as user-defined Triton kernels. A ``triton_op``
has no opaque CPU path, though (Inductor then analyses the kernels on the CPU), so the
``padst`` ops stay plain custom ops and get that decomposition only for CUDA tensors (the
backward ops, and the forward ops on a torch without :mod:`.lowering`'s templates).
Every other device, ``torch.export``, and any torch whose private pieces used here are
missing or behave differently keep the opaque op, which is always correct.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# The private pieces below are those of torch 2.11 to 2.13, the versions this was written against.
_TESTED_TORCH = ((2, 11), (2, 13))


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def torch_version_tested() -> bool:
    """Whether this torch is one whose private Inductor pieces this project was written against."""
    return _TESTED_TORCH[0] <= _torch_version() <= _TESTED_TORCH[1]


def _functional_tensor_mode():
    """AOTAutograd's functionalization mode, or None where this torch is not known to fit."""
    if not torch_version_tested():
        return None
    try:
        from torch._subclasses.functional_tensor import FunctionalTensorMode
    except ImportError:
        return None
    return FunctionalTensorMode


def _export_keeps_custom_ops() -> bool:
    """torch.export keeps Triton-backed ops opaque (it serialises the op, not the kernels)."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


def decompose_on_cuda_supported() -> bool:
    """Whether this torch gets the decomposition; without it every op stays opaque."""
    return _functional_tensor_mode() is not None


def decompose_on_cuda(op, implementation, traceable_launches) -> None:
    """Trace ``implementation`` (the op's Python body) instead of ``op`` for CUDA tensors
    under functionalization, with kernels launched inside ``traceable_launches()``."""
    mode_type = _functional_tensor_mode()
    if mode_type is None:
        return

    def rule(mode, func, types, args, kwargs):
        opaque = lambda: mode.__torch_dispatch__(func, types, args, kwargs)  # noqa: E731
        if args[0].device.type != "cuda" or _export_keeps_custom_ops():
            return opaque()
        try:
            with mode, traceable_launches():
                return implementation(*args, **kwargs)
        except Exception:  # a torch or Triton that traces differently: the opaque op still works
            log.warning("padst: %s stays opaque to Inductor: tracing its Triton kernels failed",
                        func, exc_info=True)
            return opaque()

    op.register_torch_dispatch(mode_type, rule)
