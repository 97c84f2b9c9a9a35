"""Soft permutations: matrices in the Birkhoff polytope pushed towards a vertex.

A soft permutation ``M`` (d x d) is non-negative with rows and columns summing to one.
The layer computes ``x @ M.T``; at a permutation matrix with ``M[i, p[i]] = 1`` that
is ``x[..., p]``, the gather convention of the whole project.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

Tensor = torch.Tensor


@torch.no_grad()
def project_to_birkhoff_(matrix: Tensor, iterations: int = 10, eps: float = 1e-12) -> Tensor:
    """Clamp to >= 0 and alternate column / row normalisation (Sinkhorn-Knopp), in place.

    Rows are normalised last, so every row sums to one exactly and columns to one within
    the tolerance the iterations reach.
    """
    matrix.clamp_(min=0)
    for _ in range(iterations):
        matrix.div_(matrix.sum(0, keepdim=True).clamp_(min=eps))
        matrix.div_(matrix.sum(1, keepdim=True).clamp_(min=eps))
    return matrix


def permutation_penalty(matrix: Tensor) -> Tensor:
    """``sum_i (|M_i,:|_1 - |M_i,:|_2) + sum_j (|M_:,j|_1 - |M_:,j|_2)``, divided by 2d.

    Zero exactly on permutation matrices; for a doubly stochastic matrix at most
    ``1 - 1/sqrt(d)``, so one threshold serves every layer size.
    """
    rows = matrix.abs().sum(1) - matrix.norm(dim=1)
    cols = matrix.abs().sum(0) - matrix.norm(dim=0)
    return (rows.sum() + cols.sum()) / (2 * matrix.shape[0])


def harden(matrix: Tensor, group: int = 1) -> Tensor:
    """The permutation closest to ``matrix``: the assignment maximising ``sum_i M[i, p[i]]``.

    With ``group > 1`` the positions come in groups of that many interchangeable slots
    (the columns of one weight block, the inputs of one M-group): a feature then scores
    the mass its whole group gives it, so hardening keeps what the soft matrix learned
    about *which group* a feature belongs to, whatever the order inside the group.
    Returned as an index vector ``p`` (``x[..., p] == x @ P.T``).
    """
    if group > 1:
        size = matrix.shape[0]
        matrix = matrix.reshape(size // group, group, size).sum(1).repeat_interleave(group, dim=0)
    rows, cols = linear_sum_assignment(matrix.detach().float().cpu().numpy(), maximize=True)
    index = torch.empty(matrix.shape[0], dtype=torch.int64)
    index[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return index.to(matrix.device)


def identity_like_soft(size: int, noise: float, generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """A doubly stochastic start: uniform ``1/d`` plus a small positive perturbation.

    Starting at the barycentre keeps the layer close to a mean-field mixing at first and
    lets the gradient decide which permutation to move to; the noise breaks the symmetry.
    """
    matrix = torch.full((size, size), 1.0 / size, dtype=dtype)
    matrix += noise / size * torch.rand(size, size, generator=generator, dtype=dtype)
    return project_to_birkhoff_(matrix)


def random_permutation(size: int, generator: torch.Generator | None = None) -> Tensor:
    return torch.randperm(size, generator=generator)
