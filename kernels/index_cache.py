"""Memoize work that depends only on index tensors.

A layer's indices change only at DST updates (in place, which bumps the tensor's version
counter), while its values change every step. Everything derived from indices alone (the
columns a kernel reads with ``in_index`` fused, the transposed structure of the backward,
inverse permutations, value checks) is therefore computed once per index version instead
of on every call, which matters most at small token counts.

Versions only move when a tensor is changed through itself (an optimizer step, ``copy_``,
``load_state_dict``); a change made through ``tensor.data`` bypasses the counter and is not
seen, as it is not seen by autograd either.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import torch
from torch._subclasses.fake_tensor import is_fake

T = TypeVar("T")
MAX_ENTRIES = 1024
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)

# (name, extra, ids of the tensors) -> (their versions, weak references to them, result);
# least recently used first. One entry per tensor set: a new version replaces the old one.
_entries: OrderedDict[tuple, tuple[tuple, tuple, object]] = OrderedDict()
_lock = threading.Lock()


def _cacheable(t: torch.Tensor | None) -> bool:
    """Real tensors whose identity and version mean something (not fake, traced or inference)."""
    if t is None:
        return True
    if type(t) in _PLAIN_TENSORS:  # the common case, without is_fake's unwrapping
        return not (torch._is_functional_tensor(t) or t.is_inference())
    return not (is_fake(t) or t.is_inference())


def memoize(name: str, tensors: tuple[torch.Tensor | None, ...], compute: Callable[[], T], *extra) -> T:
    """``compute()``, reused while every tensor in ``tensors`` is the same object at the same
    version and ``extra`` (hashable) is equal. Fake, functional and inference tensors are
    never cached. ``compute`` must not depend on autograd state (cache detached results)."""
    if not all(map(_cacheable, tensors)):
        return compute()
    key = (name, extra, tuple(map(id, tensors)))
    versions = tuple(None if t is None else t._version for t in tensors)
    with _lock:
        hit = _entries.get(key)
        # an id can be reused by a new tensor once the old one is gone: the weak references tell
        if hit is not None and hit[0] == versions and \
                all(r is None if t is None else r() is t for r, t in zip(hit[1], tensors)):
            _entries.move_to_end(key)
            return hit[2]
    result = compute()
    with _lock:
        _entries[key] = (versions, tuple(None if t is None else weakref.ref(t) for t in tensors), result)
        _entries.move_to_end(key)
        if len(_entries) > MAX_ENTRIES:
            _entries.popitem(last=False)
    return result
