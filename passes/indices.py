"""Compile-time arithmetic on permutation indices (``x[..., p]`` convention, None = identity)."""

from __future__ import annotations

import torch

from padst_compiler.kernels.permutation import inverse_permutation


def is_identity(index: torch.Tensor | None) -> bool:
    return index is None or torch.equal(index, torch.arange(len(index), device=index.device))


def compose(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """Index of ``x[..., first][..., second]``."""
    if first is None or second is None:
        composed = second if first is None else first
    else:
        composed = first[second]
    return None if is_identity(composed) else composed


def inverse(index: torch.Tensor | None) -> torch.Tensor | None:
    return None if index is None else inverse_permutation(index)
