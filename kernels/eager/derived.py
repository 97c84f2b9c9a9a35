"""What the ops derive from a layer's tensors, owned by those tensors.

A layer's indices change only at DST updates (in place, which bumps the tensor's version
counter) and a frozen layer's values not at all. Everything the ops derive from them (the
columns a kernel reads with ``in_index`` fused, the transposed structure of the backward,
inverse permutations, packed weight panels, value checks, recorded kernel calls) is
therefore computed once per version instead of on every call, which matters most at
small token counts.

Each derived result is filed under the first tensor it is derived from (its *owner*) and
is dropped when the owner is freed (a weak-reference finalizer), so a model of any depth
keeps the state of all of its layers, and a deleted model takes its state with it: there
is no global size bound to cycle through. A result must therefore not hold its owner
(or a view of it) alive: :func:`memoize` refuses to file a result that *is* one of its
tensors, and callers hand over detached copies.

A result is reused while its tensors are the same objects at the same versions and
storage addresses. A change made through ``tensor.data`` bypasses the version counter and
is not seen (as it is not seen by autograd), unless it moved the storage.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
from torch._subclasses.fake_tensor import is_fake

T = TypeVar("T")
MAX_PER_OWNER = 16  # a tensor used with ever-new partner tensors or options keeps its latest ones
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class _Owned:
    """The results filed under one live tensor: key -> (stamps, weak partners, result)."""

    __slots__ = ("owner", "entries")

    def __init__(self, owner: torch.Tensor):
        self.owner = weakref.ref(owner)
        self.entries: dict[tuple, tuple[tuple, tuple, object]] = {}


_owned: dict[int, _Owned] = {}  # id(owner) -> its results, removed when the owner is freed
_computed: dict[str, int] = {}  # results computed (cache misses) per kind, since the process started
_lock = threading.RLock()  # re-entered by a finalizer that runs when dropping a result frees a tensor


def _cacheable(t: torch.Tensor | None) -> bool:
    """Real tensors whose identity and version mean something (not fake, traced or inference)."""
    if t is None:
        return True
    if type(t) in _PLAIN_TENSORS:  # the common case, without is_fake's unwrapping
        return not (torch._is_functional_tensor(t) or t.is_inference())
    return not (is_fake(t) or t.is_inference())


def _stamp(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t._version, t.data_ptr())


def _forget(key: int, owned: _Owned) -> None:
    with _lock:
        if _owned.get(key) is owned:
            del _owned[key]


def _owned_by(owner: torch.Tensor) -> _Owned:
    """The results table of ``owner``, created (with its finalizer) on first use; called under the lock."""
    owned = _owned.get(id(owner))
    if owned is None or owned.owner() is not owner:  # an id is reused once its tensor is gone
        owned = _owned[id(owner)] = _Owned(owner)
        weakref.finalize(owner, _forget, id(owner), owned)
    return owned


def memoize(name: str, tensors: tuple[torch.Tensor | None, ...], compute: Callable[[], T], *extra) -> T:
    """``compute()``, reused while every tensor in ``tensors`` is the same object at the same
    version and storage, and ``extra`` (hashable) is equal; filed under ``tensors[0]``.
    Fake, functional and inference tensors are never cached. ``compute`` must not depend on
    autograd state (cache detached results) nor return anything that holds ``tensors[0]``."""
    owner = tensors[0]
    if owner is None or not all(map(_cacheable, tensors)):
        return compute()
    key = (name, extra, tuple(None if t is None else id(t) for t in tensors[1:]))
    stamps = tuple(map(_stamp, tensors))
    owned = _owned.get(id(owner))  # reads need no lock: a dict lookup is atomic
    hit = None if owned is None or owned.owner() is not owner else owned.entries.get(key)
    # a partner's id can be reused by a new tensor once the old one is gone: the weak references tell
    if hit is not None and hit[0] == stamps and \
            all(r is None if t is None else r() is t for r, t in zip(hit[1], tensors[1:])):
        return hit[2]
    result = compute()
    _computed[name] = _computed.get(name, 0) + 1
    if any(result is t for t in tensors):  # filing it would keep its owner alive forever
        return result
    partners = tuple(None if t is None else weakref.ref(t) for t in tensors[1:])
    with _lock:
        entries = _owned_by(owner).entries
        entries.pop(key, None)  # re-inserted last: the oldest entry goes first when the table is full
        entries[key] = (stamps, partners, result)
        if len(entries) > MAX_PER_OWNER:
            del entries[next(iter(entries))]
    return result


def forget(tensor: torch.Tensor) -> None:
    """Drop everything derived from ``tensor`` (as its owner)."""
    with _lock:
        owned = _owned.get(id(tensor))
        if owned is not None and owned.owner() is tensor:
            owned.entries.clear()


def clear() -> None:
    """Drop everything derived from every tensor (benchmarks that must start cold)."""
    with _lock:
        for owned in list(_owned.values()):  # clearing may free tensors, whose finalizers edit _owned
            owned.entries.clear()


def computed() -> dict[str, int]:
    """How many results of each kind were computed (cache misses) since the process started."""
    with _lock:
        return dict(_computed)


def summary() -> dict[str, int]:
    """How many results of each kind live tensors hold (for the debug output and tests)."""
    counts: dict[str, int] = {}
    with _lock:
        for owned in _owned.values():
            for name, *_ in owned.entries:
                counts[name] = counts.get(name, 0) + 1
    return counts
