"""Small helpers on permutation index vectors (``x[..., p]`` convention)."""

from __future__ import annotations

import torch


def inverse_permutation(index: torch.Tensor) -> torch.Tensor:
    """The index ``q`` with ``x[..., index][..., q] == x``."""
    positions = torch.arange(index.numel(), device=index.device, dtype=index.dtype)
    return torch.empty_like(index).scatter_(0, index, positions)
