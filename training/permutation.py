"""Soft permutations: matrices in the Birkhoff polytope pushed towards a vertex.

A soft permutation ``M`` (d x d) is non-negative with rows and columns summing to one.
The layer computes ``x @ M.T``; at a permutation matrix with ``M[i, p[i]] = 1`` that
is ``x[..., p]``, the gather convention of the whole project.
"""

from __future__ import annotations

import math

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


def block_kept_energy(profiles: Tensor, order: Tensor, group: int, kept: int, along: int) -> Tensor:
    """Energy a block structure keeps when the permuted axis is read in ``order``.

    ``profiles[p, f]`` is the energy of feature ``f`` inside block ``p`` of the other axis;
    the permuted axis is cut into groups of ``group`` consecutive positions, giving block
    energies ``B[p, g]``; each block-row keeps its ``kept`` best blocks (``along`` is the
    axis of ``B`` the choice runs over).
    """
    blocks = profiles[:, order].reshape(profiles.shape[0], -1, group).sum(-1)
    return blocks.topk(kept, dim=along).values.sum()


def refine_block_permutation(profiles: Tensor, start: Tensor, group: int, kept: int, along: int,
                             generator: torch.Generator, max_passes: int = 20,
                             max_candidates: int = 128) -> tuple[Tensor, float]:
    """Swap features between groups while that raises the kept energy (best swap per position).

    Each position ``i`` evaluates swaps with up to ``max_candidates`` other positions at once
    (all of them for small layers, a seeded sample for large ones): a swap only moves two
    columns of ``B``, so the candidates are one batched update of ``B``.
    """
    order = start.clone()
    size = order.numel()
    groups_of = torch.arange(size) // group
    total = profiles.sum().item()
    blocks = profiles[:, order].reshape(profiles.shape[0], -1, group).sum(-1)
    current = blocks.topk(kept, dim=along).values.sum().item()
    for _ in range(max_passes):
        improved = False
        for i in range(size):
            gi = int(groups_of[i])
            others = torch.arange(size) if size <= max_candidates else \
                torch.randperm(size, generator=generator)[:max_candidates]
            delta = profiles[:, order[others]] - profiles[:, order[i]][:, None]  # [P, n]: swap i <-> others
            candidates = blocks.unsqueeze(0).repeat(len(others), 1, 1)
            candidates[:, :, gi] += delta.t()
            candidates.scatter_add_(2, groups_of[others][:, None, None].expand(-1, blocks.shape[0], 1),
                                    -delta.t()[:, :, None])
            scores = candidates.topk(kept, dim=along + 1).values.sum((1, 2))
            scores[groups_of[others] == gi] = -math.inf
            best = int(scores.argmax())
            if scores[best].item() > current + 1e-9 * max(total, 1.0):
                j = int(others[best])
                order[i], order[j] = order[j].clone(), order[i].clone()
                blocks, current, improved = candidates[best], scores[best].item(), True
        if not improved:
            break
    return order, current


def harden_for_block(effective: Tensor, soft: Tensor, rows: int, cols: int, kept: int, side: str,
                     generator: torch.Generator, restarts: int | None = None) -> Tensor:
    """Hardening that looks at what the structure can keep, not only at the soft matrix.

    The soft phase learns a good dense effective weight ``W = S M`` but ``M`` itself rarely
    gets close to a vertex; the assignment on ``M`` then picks a permutation that is no
    better than the identity. Here the permutation is chosen to maximise the energy of
    ``W`` that the block structure keeps (local search over swaps between groups, started
    from the grouped assignment on ``M``, from the identity and from ``restarts`` random
    orders), so the hard layer stays close to the function the soft layer learned.
    """
    energy = effective.detach().double().square()
    out_features, in_features = energy.shape
    if side == "input":  # columns are permuted: profiles per block-row, groups of `cols` columns
        profiles, group, along = energy.reshape(out_features // rows, rows, in_features).sum(1), cols, 1
        start = harden(soft, cols)
    else:  # rows are permuted (S' = W[q], p = inv(q)): profiles per column block, groups of `rows`
        profiles = energy.reshape(out_features, in_features // cols, cols).sum(2).t()
        group, along = rows, 0
        # y = M z: the block rows group z positions, the columns of M; harden(M.T) assigns a y
        # position to each z position, which is the row order q searched here (p = inv(q))
        start = harden(soft.t(), rows)
    # Integer energies (2**24 levels of the total): every comparison in the search is exact, so
    # bit-level differences between runs (DDP ranks, resumed checkpoints) cannot change its path.
    profiles = torch.round(profiles / profiles.sum().clamp(min=1e-300) * 2 ** 24)
    size = start.numel()
    if restarts is None:  # small layers: restarts are cheap and avoid local optima
        restarts = 4 if size <= 256 else 0
    starts = [start.cpu(), torch.arange(size)] + [torch.randperm(size, generator=generator) for _ in range(restarts)]
    best, best_energy = None, -math.inf
    for candidate in starts:
        order, kept_energy = refine_block_permutation(profiles.cpu(), candidate, group, kept, along, generator)
        if kept_energy > best_energy:
            best, best_energy = order, kept_energy
    best = best.to(soft.device)
    return best if side == "input" else torch.argsort(best)
