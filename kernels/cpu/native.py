"""Build, cache and load the native CPU kernels (``native.cpp``).

The kernels are compiled on first use with the system C++ compiler (``$CXX``, else
``c++``) for this machine's instruction set, and cached under
``$PADST_CACHE_DIR`` (default ``~/.cache/padst_compiler``) in a folder named after a hash
of the source, the compiler, the flags and the CPU, so a changed source or a different
machine never loads a stale build. Concurrent builds (test workers) are safe: each
writes a private file and renames it into place.

Without a compiler, or with ``PADST_NATIVE=0``, :func:`library` returns ``None`` and the
ops keep their PyTorch implementations; the reason is given once as a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from padst_compiler.kernels import result_buffers

SOURCE = Path(__file__).with_name("native.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


def _flags() -> tuple[str, ...]:
    """The build flags: ``FLAGS`` and any in ``$PADST_NATIVE_FLAGS`` after them, such as
    ``-mno-avx512f`` to build (and test, or time) the AVX2 kernels on an AVX-512 machine."""
    return FLAGS + tuple(os.environ.get("PADST_NATIVE_FLAGS", "").split())

# Output block widths the block kernels are specialised for (the switches in native.cpp).
BLOCK_WIDTHS = (8, 16, 32, 48, 64)

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "padst_block_mm": (_P, _I, _P, _I, _I, _I, _I, _P, _P, _I, _P, _P, _P, _P, _P, _I),
    "padst_block_sddmm": (_P, _I, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _I),
    "padst_ell_mm": (_P, _I, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P),
    "padst_ell_sddmm": (_P, _I, _P, _I, _I, _I, _I, _P, _P, _P, _P),
    "padst_diag_mm": (_P, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P),
    "padst_nm_mm": (_P, _I, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P),
    "padst_advise_huge_pages": (_P, _I),
    "padst_vector_bits": (),
}

# Results of at least this size get huge pages: glibc's largest dynamic mmap threshold on
# 64-bit systems, so such a result is always a fresh mapping, faulted in page by page as a
# kernel writes it (smaller ones come back from the heap, already faulted in).
HUGE_PAGE_RESULT_BYTES = 32 << 20


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here (the message says why)."""


def _compiler() -> str:
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C++ compiler found (looked for {compiler!r}; set $CXX)")
    return compiler


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


def _build_dir(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, version, " ".join(_flags()),
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    root = Path(os.environ.get("PADST_CACHE_DIR") or Path.home() / ".cache" / "padst_compiler")
    return root / f"native-{key}"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_flags(), str(SOURCE), "-o", scratch], capture_output=True, text=True)
        if result.returncode != 0:
            raise NativeUnavailable(f"compiling {SOURCE.name} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(scratch, target)  # atomic: a concurrent build of the same source is identical
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


def _load() -> ctypes.CDLL:
    if os.environ.get("PADST_NATIVE", "1") == "0":
        raise NativeUnavailable("switched off with PADST_NATIVE=0")
    compiler = _compiler()
    target = _build_dir(compiler) / "padst_native.so"
    if not target.exists():
        _build(compiler, target)
    lib = ctypes.CDLL(str(target))  # after torch: its libgomp is the one the kernels bind to
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` (with one warning saying why) where they cannot be built."""
    try:
        return _load()
    except (NativeUnavailable, OSError) as error:
        if os.environ.get("PADST_NATIVE", "1") != "0":
            warnings.warn(f"padst: native CPU kernels unavailable, using the PyTorch implementations: {error}",
                          RuntimeWarning, stacklevel=2)
        return None


def pointer(t: torch.Tensor | None) -> int | None:
    """Address of a tensor's data for a ctypes call (``None`` stands for an absent tensor)."""
    return None if t is None else t.data_ptr()


def run(name: str, *args) -> None:
    """Run one kernel; the caller has checked that the library is loaded and the shape supported."""
    _call(getattr(library(), name), args)


def _call(function, args) -> None:
    if function(*args) != 0:
        raise RuntimeError(f"padst native kernel {function.__name__} declined its arguments")


class ForwardCall(NamedTuple):
    """A forward kernel call with all but its input and output bound: every forward kernel
    takes ``(x, x stride, y, y stride, tokens, *rest)``. ``keep`` holds the tensors whose
    addresses are in ``rest``."""

    function: object
    rest: tuple
    keep: tuple

    def replay(self, x: torch.Tensor, y: torch.Tensor) -> None:
        _call(self.function, (x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[0], *self.rest))


_recording = threading.local()


def output_buffer(x: torch.Tensor, out_features: int) -> torch.Tensor:
    """The ``[tokens, out_features]`` result a native kernel writes, uninitialised: every
    kernel writes every element, output maps included (they gather, see ``gather_row`` in
    native.cpp), whatever an unchecked index holds. A large result is backed by huge pages
    (see ``padst_advise_huge_pages``); inside ``result_buffers.planned`` the result is the
    caller's buffer where it fits."""
    y = result_buffers.new_result(x, x.shape[0], out_features, zeroed=False)
    if y.nbytes >= HUGE_PAGE_RESULT_BYTES:
        library().padst_advise_huge_pages(y.data_ptr(), y.nbytes)
    return y


def forward(name: str, x: torch.Tensor, y: torch.Tensor, *rest) -> None:
    """Run forward kernel ``name`` from the 2-D ``x`` into ``y``; tensors in ``rest`` are
    passed by address (None as a null pointer). Recorded inside :func:`recording`, to be
    replayed alone later: a caller returns ``y`` as the kernel left it."""
    function = getattr(library(), name)
    args = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in rest)
    _call(function, (x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[0], *args))
    last = getattr(_recording, "last", None)
    if last is not None:
        last[:] = [(ForwardCall(function, args, tuple(a for a in rest if isinstance(a, torch.Tensor))), x, y)]


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[ForwardCall, torch.Tensor, torch.Tensor]]]:
    """The last forward kernel call made in this thread inside the block, with the x and y it
    ran on (a one-element list, empty if none ran; earlier calls are not kept alive)."""
    previous, _recording.last = getattr(_recording, "last", None), []
    try:
        yield _recording.last
    finally:
        _recording.last = previous
