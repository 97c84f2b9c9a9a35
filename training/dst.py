"""Dynamic sparse training updates that keep every structure's invariant.

An update drops the kept units with the smallest magnitude and grows as many new
units in the same groups (so every block-row, M-group or layer keeps its count and no
tensor changes shape): RigL grows where the dense gradient is largest, SET at random.
Survivors keep their values and optimizer state; new units start at zero with zero
optimizer state.
"""

from __future__ import annotations

import math

import torch

from padst_compiler.kernels.structures import Structure

Tensor = torch.Tensor


def drop_fraction_at(step: int, alpha: float, end_step: int) -> float:
    """Cosine decay ``alpha/2 * (1 + cos(pi * step / end_step))``, zero after ``end_step``."""
    if step > end_step or end_step <= 0:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * step / end_step))


def plan_update(structure: Structure, values: Tensor, index: Tensor, out_features: int, in_features: int,
                drop_count: int, grow_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Unit masks ``(new, survivors)`` after dropping ``drop_count`` units and regrowing.

    Drops are the smallest-magnitude kept units of the whole layer; each group then grows
    as many units as it lost, best ``grow_scores`` first, preferring units that were not
    just dropped. Ties break on the lower unit number, so every rank decides alike.
    """
    mask = structure.index_to_units(index, out_features, in_features)
    magnitude = structure.unit_scores(structure.expand(values, index, out_features, in_features).float().square())
    drop = magnitude.masked_fill(~mask, math.inf).flatten().topk(drop_count, largest=False).indices
    dropped = torch.zeros_like(mask).view(-1).scatter_(0, drop, True).view_as(mask)
    survivors = mask & ~dropped
    preference = grow_scores.float().clone()
    preference[dropped] = -1.0  # scores are >= 0: free units first, then just-dropped ones
    preference[survivors] = -2.0
    order = preference.argsort(dim=1, descending=True, stable=True)
    take = torch.arange(mask.shape[1], device=mask.device)[None, :] < dropped.sum(1, keepdim=True)
    grow = torch.zeros_like(mask).scatter_(1, order, take)
    return survivors | grow, survivors


def remap(structure: Structure, tensor: Tensor, old_index: Tensor, new_index: Tensor, keep: Tensor,
          out_features: int, in_features: int) -> Tensor:
    """A values-shaped tensor (values, Adam moments, momentum) moved to the new index:
    survivors keep their entries, everything else becomes zero."""
    dense = structure.expand(tensor, old_index, out_features, in_features) * keep
    return structure.compress(dense, new_index)
