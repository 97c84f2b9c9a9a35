"""Permutations of a layer's features: chosen from a dense weight, or learned as a soft matrix.

The default (``permutation="learned"``) chooses the permutation from a dense weight: the
one under which the structure keeps the most of that weight's energy
(:func:`select_permutation`). The paper's recipe (``permutation="birkhoff"``) learns a
soft matrix ``M`` in the Birkhoff polytope (non-negative, rows and columns summing to
one), pushes it to a vertex with the l1-l2 penalty and rounds it by the assignment
problem. The layer computes ``x @ M.T``; at a permutation matrix with ``M[i, p[i]] = 1``
that is ``x[..., p]``, the gather convention of the whole project.
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import linear_sum_assignment

from padst_compiler.kernels.structures import NM, Structure

Tensor = torch.Tensor

# ------------------------------------------------------------------ the soft (Birkhoff) recipe

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


# ------------------------------------------------------------------ choosing from a dense weight

SMALL_LAYER_SCHEDULE = (0.5, 1, 1, 2, 2, 4, 8, math.inf, math.inf)  # sharpness of each assignment round
LARGE_LAYER_SCHEDULE = (1, math.inf)
LARGE_NM_SCHEDULE = (math.inf,)  # an N:M round on 768 inputs costs about 0.4 s (its values differ per group)


def _credit(ratio: Tensor, sharpness: float) -> Tensor:
    """Credit for a unit whose score is ``ratio`` times its group's smallest kept one: 1 if kept,
    ``ratio ** sharpness`` below (``sharpness = inf``: the structure's own hard choice)."""
    if math.isinf(sharpness):
        return (ratio >= 1).to(ratio.dtype)
    ratio = ratio.clamp(max=1)
    return ratio if sharpness == 1 else ratio ** sharpness


def _permuted(energy: Tensor, order: Tensor, side: str) -> Tensor:
    return energy[:, order] if side == "input" else energy[order]


def _kept(structure: Structure, energy: Tensor, sparsity: float) -> float:
    """Energy ``structure.project`` keeps of a per-weight ``[out, in]`` energy."""
    out_features, in_features = energy.shape
    kept = structure.kept_units(out_features, in_features, sparsity)
    scores = structure.unit_scores(energy)
    return float(scores.topk(kept, dim=1).values.sum(dtype=torch.float64))


def _keep_weights(structure: Structure, energy: Tensor, sparsity: float, sharpness: float) -> Tensor:
    """``[out, in]`` weights in [0, 1]: 1 where the structure keeps a position, and for the
    other units ``(score / smallest kept score) ** sharpness`` of their group, so a low
    sharpness also credits units that could still be kept (the search is less greedy)."""
    out_features, in_features = energy.shape
    kept = structure.kept_units(out_features, in_features, sparsity)
    energy = energy.detach().requires_grad_(True)
    with torch.enable_grad():
        scores = structure.unit_scores(energy)
        smallest_kept = scores.detach().topk(kept, dim=1).values[:, -1:].clamp(min=1e-30)
        weights = _credit(scores.detach() / smallest_kept, sharpness)
        # unit_scores is a linear map from positions to units; its adjoint spreads unit weights back
        (spread,) = torch.autograd.grad((scores * weights).sum(), energy)
    return spread


def _placement_value(structure: Structure, energy: Tensor, permuted: Tensor, side: str, sparsity: float,
                     sharpness: float) -> Tensor:
    """``value[j, f]``: (weighted) energy kept if feature ``f`` took position ``j`` of the permuted
    axis, with the structure's kept units fixed by the current order (``permuted`` is ``energy``
    in that order).

    For blocks and diagonals which units are kept does not depend on which feature sits where
    inside a unit. An N:M mask is chosen per row and group from the inputs in it, so it always
    favours the current order; there a feature scores, for each group, the rows in which it
    would enter the group's top n.
    """
    if side == "input" and isinstance(structure, NM):
        out_features, in_features = energy.shape
        n = structure.kept_units(out_features, in_features, sparsity)
        groups = permuted.reshape(out_features, in_features // structure.m, structure.m)
        smallest_kept = groups.topk(n, dim=2).values[..., -1].clamp(min=1e-30)  # [out, groups]
        per_group = torch.stack([(energy * _credit(energy / smallest_kept[:, g, None], sharpness)).sum(0)
                                 for g in range(smallest_kept.shape[1])])  # [groups, features]
        return per_group.repeat_interleave(structure.m, dim=0)
    weights = _keep_weights(structure, permuted, sparsity, sharpness)
    return weights @ energy.t() if side == "output" else weights.t() @ energy


def _improve(energy: Tensor, structure: Structure, sparsity: float, side: str, start: Tensor,
             sharpness_schedule: tuple[float, ...]) -> tuple[Tensor, float]:
    """Alternate "which units the structure keeps in this order" and "the best order for those
    units" (an assignment problem), from soft to hard credit for units near the threshold;
    returns the best order visited and the energy it keeps."""
    order = best = start
    best_kept = _kept(structure, _permuted(energy, order, side), sparsity)
    for sharpness in sharpness_schedule:
        value = _placement_value(structure, energy, _permuted(energy, order, side), side, sparsity, sharpness)
        _, features = linear_sum_assignment(value.cpu().numpy(), maximize=True)
        order = torch.from_numpy(features).to(start.device)
        kept = _kept(structure, _permuted(energy, order, side), sparsity)
        if kept > best_kept * (1 + 1e-9):
            best, best_kept = order, kept
    return best, best_kept


def _refine_by_swaps(energy: Tensor, structure: Structure, sparsity: float, side: str, order: Tensor,
                     kept: float, budget: float) -> tuple[Tensor, float]:
    """Best-improvement swaps of two positions, each pass scoring every swap exactly (the kept
    energy of the whole swapped matrix, batched), for as many passes as ``budget`` (energy
    entries scored in all) allows; layers too large for a useful number of passes (one swap
    each) keep the assignment's order."""
    size = order.numel()
    if size < 2:  # nothing to swap
        return order, kept
    first, second = torch.triu_indices(size, size, offset=1, device=order.device)
    max_passes = int(budget // (first.numel() * energy.numel()))
    if max_passes < size:
        return order, kept
    kept_units = structure.kept_units(*energy.shape, sparsity)

    def kept_after(swap_first, swap_second):
        orders = order.expand(len(swap_first), size).clone()
        orders[torch.arange(len(swap_first)), swap_first] = order[swap_second]
        orders[torch.arange(len(swap_first)), swap_second] = order[swap_first]
        permuted = torch.stack([_permuted(energy, candidate, side) for candidate in orders])
        scores = torch.vmap(structure.unit_scores)(permuted)
        return scores.topk(kept_units, dim=-1).values.sum((1, 2), dtype=torch.float64), orders

    for _ in range(max_passes):
        scores, orders = kept_after(first, second)
        best = int(scores.argmax())
        if float(scores[best]) <= kept * (1 + 1e-9):
            break
        order, kept = orders[best], float(scores[best])
    return order, kept


def select_permutation(weight: Tensor, structure: Structure, sparsity: float, side: str,
                       starts: list[Tensor],
                       sharpness_schedule: tuple[float, ...] | None = None, swap_budget: float = 5e7) -> Tensor:
    """The permutation under which ``structure`` keeps the most energy of the dense ``weight``.

    ``weight`` is the layer's dense ``[out, in]`` matrix in feature order. Returned as the
    layer's ``perm_index`` ``p``: the structured weight is then fitted to ``weight[:, p]`` on
    the input side and to ``weight[argsort(p)]`` on the output side. The result keeps at least
    as much as the best of ``starts`` (index vectors in the same convention); energies are
    relative, so the choice does not depend on the scale of the weight or of the loss.

    Each assignment round costs about 0.1-0.4 s at 768 features, so large layers take a
    short schedule (hardening stays under a second) and small ones a long one plus swaps.
    """
    energy = weight.detach().float().square()
    if sharpness_schedule is None and starts[0].numel() <= 256:
        sharpness_schedule = SMALL_LAYER_SCHEDULE
    elif sharpness_schedule is None:
        sharpness_schedule = LARGE_NM_SCHEDULE if isinstance(structure, NM) and side == "input" \
            else LARGE_LAYER_SCHEDULE
    best, best_kept = None, -math.inf
    for start in starts:
        order = start if side == "input" else torch.argsort(start)  # the order of S's rows on the output side
        order, kept = _improve(energy, structure, sparsity, side, order.to(energy.device), sharpness_schedule)
        order, kept = _refine_by_swaps(energy, structure, sparsity, side, order, kept, swap_budget)
        if kept > best_kept:
            best, best_kept = order, kept
    best = best.to(weight.device)
    return best if side == "input" else torch.argsort(best)
