"""Small helpers on permutation index vectors (``x[..., p]`` convention)."""

from __future__ import annotations

import torch


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """The index ``q`` with ``x[..., index][..., q] == x``. For an ``index`` in range that is
    not a permutation (value checks off) every entry of ``q`` is still in range."""
    positions = torch.arange(index.numel(), device=index.device, dtype=index.dtype)
    return torch.zeros_like(index).scatter_(0, index, positions)
