"""Input validation for the padst ops.

Shape checks are cheap and always run (also at trace time, from the fake
implementations). Checks that read index *values* cost a pass over the index and a host
sync on a GPU, so each runs once per index tensor and version. The range checks (every
index value inside the tensor it addresses) always run: no input may make a kernel read
or write outside its tensors. The semantic checks (is this a permutation? is a unit kept
twice?) can be switched off (``PADST_CHECKS=0``, :func:`set_checks`); a wrong input then
gives a wrong result, never a crash.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import is_fake

from padst_compiler.kernels.eager.derived import memoize

_checks_enabled = os.environ.get("PADST_CHECKS", "1") != "0"


def checks_enabled() -> bool:
    """Whether the ops validate the values of their index tensors."""
    return _checks_enabled


@contextlib.contextmanager
def set_checks(enabled: bool) -> Iterator[None]:
    """Turn value checks on or off inside a ``with`` block (``PADST_CHECKS=0`` sets the default)."""
    global _checks_enabled
    previous, _checks_enabled = _checks_enabled, bool(enabled)
    try:
        yield
    finally:
        _checks_enabled = previous


def _has_values(index: torch.Tensor) -> bool:
    """Real tensors only: fake (tracing) and meta tensors have no data."""
    if index.numel() == 0 or index.device.type == "meta":
        return False
    if type(index) is torch.Tensor and not torch._is_functional_tensor(index):
        return True  # the common case, without is_fake's unwrapping
    return not is_fake(index)


def _reads_values(index: torch.Tensor) -> bool:
    """Whether the semantic checks (a permutation, no unit kept twice) run on ``index``."""
    return _checks_enabled and _has_values(index)


def _check_once(index: torch.Tensor, check: tuple, run) -> None:
    """A layer's index buffers are checked once per version, not on every call, and again
    after any in-place change (a DST update bumps the version)."""
    memoize("check", (index,), run, check)


def fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _fail_outside(op: str, name: str, index: torch.Tensor, bound: int) -> None:
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= bound:
        fail(op, f"{name} holds {lo if lo < 0 else hi}, outside [0, {bound})")


def check_index_tensor(op: str, name: str, index: torch.Tensor, shape: tuple[int, ...]) -> None:
    """An index must be an int64 tensor of the given shape."""
    if index.dtype != torch.int64:
        fail(op, f"{name} must be an int64 tensor, got {index.dtype}")
    if tuple(index.shape) != tuple(shape):
        fail(op, f"{name} has shape {tuple(index.shape)}, expected {tuple(shape)}")


def check_permutation(op: str, name: str, index: torch.Tensor, length: int) -> None:
    """``index`` must be a permutation of ``range(length)``: in range always, every value
    once while checks are on."""
    check_index_tensor(op, name, index, (length,))
    check_in_range(op, name, index, length)
    if _reads_values(index) and not is_permutation(index):
        counts = torch.bincount(index, minlength=length)
        repeated = int(torch.nonzero(counts > 1)[0])
        fail(op, f"{name} is not a permutation of {length} features: {repeated} appears "
                 f"{int(counts[repeated])} times")


def is_permutation(index: torch.Tensor) -> bool:
    """Whether the 1-D ``index`` is a permutation of ``range(len(index))``, found once per
    index version."""
    n = index.numel()

    def find():
        return n == 0 or (int(index.min()) >= 0 and int(index.max()) < n
                          and bool((torch.bincount(index, minlength=n) == 1).all()))

    return memoize("check", (index,), find, "is a permutation")


def check_in_range(op: str, name: str, index: torch.Tensor, bound: int) -> None:
    """Every value of ``index`` lies in ``[0, bound)``. The kernels read and write through
    these values, so this check runs whatever :func:`set_checks` says (once per version)."""
    if not _has_values(index):
        return

    _check_once(index, ("range", bound), lambda: _fail_outside(op, name, index, bound))


def check_distinct_rows(op: str, name: str, index: torch.Tensor, what: str, modulo: int | None = None) -> None:
    """No value (``% modulo`` if given) repeats along the last dimension of ``index``
    (a kept unit is kept once)."""
    if index.shape[-1] < 2 or not _reads_values(index):
        return

    def run():
        ordered = (index if modulo is None else index % modulo).sort(dim=-1).values
        if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
            fail(op, f"{name} keeps the same {what} twice in one row")

    _check_once(index, ("distinct", modulo), run)


def check_tensor(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """A floating tensor (bias, values) must have the given shape and the input's dtype."""
    if tuple(t.shape) != tuple(shape):
        fail(op, f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        fail(op, f"{name} has dtype {t.dtype} but the input has {dtype}")
