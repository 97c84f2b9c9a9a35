"""Sparsity structures (design section 3).

A structure is a small immutable spec (``Block(32, 32)``, ``NM(4)``, ``Diagonal()``,
``Unstructured()``) used together with a ``sparsity`` in [0, 1). It knows how many
units a weight of a given shape keeps, how to project a dense matrix onto itself
(keep the largest magnitudes while holding its invariant), how to expand its
compressed form back to dense (differentiably, so the dense reference can check
gradients), its cost, and which ``padst`` op computes with it.

Every structure is described in terms of *units* arranged in *groups*, with the same
number of kept units in every group: blocks in a block-row, positions in an M-group,
diagonals (one group), weights (one group, unstructured). Projection and dynamic
sparse training work on boolean unit masks ``[groups, units]`` and never need to know
which structure they handle.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from padst_compiler.kernels.eager.dispatch import structured_linear
from padst_compiler.kernels.implementations import (
    TransposedRows,
    block_to_rows,
    diagonal_columns,
    diagonal_to_rows,
    diagonal_values_from_rows,
    nm_to_rows,
    transpose_rows,
)

Tensor = torch.Tensor


def check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def _kept(total: int, sparsity: float) -> int:
    """Units kept out of ``total`` at ``sparsity`` (round half up, never more than total)."""
    return min(total, math.floor(total * (1 - sparsity) + 0.5))


@dataclass(frozen=True)
class Structure(ABC):
    """Base of the structure specs; subclasses are frozen dataclasses."""

    op = None  # the torch.ops.padst overload; None where no structured kernel exists
    index_itemsize = 8  # int64 indices

    def interchangeable(self, side: str) -> int:
        """Size of the groups of consecutive input (``side="input"``) or output features whose
        order inside the group the structure does not care about (1: every position matters)."""
        return 1

    @abstractmethod
    def kept_units(self, out_features: int, in_features: int, sparsity: float, layer: str | None = None) -> int:
        """Kept units per group (blocks per block-row, n per m, diagonals, or weights),
        after checking the shape; raises ``ValueError`` naming the layer and the rule."""

    # -- units ---------------------------------------------------------------------

    @abstractmethod
    def unit_scores(self, per_weight: Tensor) -> Tensor:
        """Sum of a per-weight ``[out, in]`` score over each unit: ``[groups, units]``."""

    @abstractmethod
    def units_to_dense(self, mask: Tensor, out_features: int, in_features: int) -> Tensor:
        """Boolean ``[out, in]`` matrix of the weights covered by a unit mask (any count per group)."""

    @abstractmethod
    def units_to_index(self, mask: Tensor, out_features: int, in_features: int) -> Tensor:
        """Index tensor of a unit mask that keeps the same count in every group."""

    @abstractmethod
    def index_to_units(self, index: Tensor, out_features: int, in_features: int) -> Tensor:
        """Unit mask ``[groups, units]`` of an index tensor."""

    @abstractmethod
    def compress(self, dense: Tensor, index: Tensor) -> Tensor:
        """The values of ``dense`` at the positions ``index`` keeps."""

    def best_units(self, energy: Tensor, kept: int) -> Tensor:
        """Unit mask ``[groups, units]`` keeping the ``kept`` units of each group that hold the most
        of a per-weight ``[out, in]`` energy."""
        scores = self.unit_scores(energy)
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(kept, dim=1).indices, True)

    def project(self, dense: Tensor, sparsity: float, layer: str | None = None) -> SparseWeight:
        """The structured weight closest to ``dense``: the largest-magnitude units of each group."""
        out_features, in_features = dense.shape
        kept = self.kept_units(out_features, in_features, sparsity, layer)
        dense = dense.detach()
        index = self.units_to_index(self.best_units(dense.float().square(), kept), out_features, in_features)
        return SparseWeight(self, out_features, in_features, self.compress(dense, index).contiguous(), index)

    # -- compressed form -------------------------------------------------------------

    @abstractmethod
    def as_rows(self, values: Tensor, index: Tensor, out_features: int, in_features: int) -> tuple[Tensor, Tensor]:
        """Row-sparse view: column and value of every kept entry, ``[out, kept_per_row]`` each."""

    def expand(self, values: Tensor, index: Tensor, out_features: int, in_features: int) -> Tensor:
        """The dense ``out x in`` matrix of a compressed weight (differentiable in values)."""
        cols, vals = self.as_rows(values, index, out_features, in_features)
        return vals.new_zeros(out_features, in_features).scatter(1, cols, vals)

    def transposed(self, values: Tensor, index: Tensor, out_features: int, in_features: int) -> TransposedRows:
        """``S^T`` in compressed-sparse-column form, as the backward of ``S @ x`` reads it."""
        return transpose_rows(*self.as_rows(values, index, out_features, in_features), in_features)

    def linear(self, x, values, index, out_features, bias=None, in_index=None, out_index=None) -> Tensor:
        """``(S @ x[..., in_index] + bias)[..., out_index]`` through this structure's op."""
        return structured_linear(self.op, x, values, index, out_features, bias, in_index, out_index)

    def kept_count(self, values: Tensor, index: Tensor) -> int:
        """Kept positions of a compressed weight."""
        return values.numel()

    # -- costs -----------------------------------------------------------------------

    @abstractmethod
    def kept_per_row(self, out_features: int, in_features: int, sparsity: float) -> int:
        """Non-zeros in each output row (every structured layout keeps a constant count)."""

    @abstractmethod
    def index_count(self, out_features: int, in_features: int, sparsity: float) -> int:
        """Elements of the index tensor."""

    def nnz(self, out_features: int, in_features: int, sparsity: float) -> int:
        return out_features * self.kept_per_row(out_features, in_features, sparsity)

    def flops(self, out_features: int, in_features: int, sparsity: float, tokens: int) -> int:
        """Multiply-adds times two for a forward pass over ``tokens`` rows of input."""
        return 2 * tokens * self.nnz(out_features, in_features, sparsity)

    def nbytes(self, out_features: int, in_features: int, sparsity: float,
               dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the compressed weight: values plus index."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.nnz(out_features, in_features, sparsity) * itemsize + \
            self.index_count(out_features, in_features, sparsity) * self.index_itemsize

    def _error(self, layer: str | None, out_features: int, in_features: int, rule: str) -> ValueError:
        where = f"layer {layer!r}" if layer else "weight"
        return ValueError(f"{where} of shape {out_features}x{in_features} (out x in) cannot take "
                          f"{self}: {rule}")


@dataclass(frozen=True)
class SparseWeight:
    """A compressed ``out x in`` weight: one value tensor and one index tensor."""

    structure: Structure
    out_features: int
    in_features: int
    values: Tensor
    index: Tensor

    def to_dense(self) -> Tensor:
        return self.structure.expand(self.values, self.index, self.out_features, self.in_features)

    def linear(self, x: Tensor, bias=None, in_index=None, out_index=None) -> Tensor:
        return self.structure.linear(x, self.values, self.index, self.out_features, bias, in_index, out_index)

    @property
    def kept_fraction(self) -> float:
        """Fraction of the dense matrix the structure keeps (a kept weight may still be 0)."""
        return self.structure.kept_count(self.values, self.index) / (self.out_features * self.in_features)


def _row_major_kept(mask: Tensor) -> Tensor:
    """Unit numbers of the kept units of each group, ascending: ``[groups, kept]``."""
    return mask.nonzero()[:, 1].view(mask.shape[0], -1)


# --------------------------------------------------------------------------- block


@dataclass(frozen=True)
class Block(Structure):
    """Dense ``rows x cols`` blocks; every block-row keeps the same number k of blocks.

    Compressed: values ``[out/rows, k, rows, cols]``, column-block index ``[out/rows, k]``.
    """

    rows: int
    cols: int

    def __post_init__(self):
        _positive_int("Block", "rows", self.rows)
        _positive_int("Block", "cols", self.cols)

    def __str__(self) -> str:
        return f"Block({self.rows}x{self.cols})"

    @property
    def op(self):
        return torch.ops.padst.block_linear

    def interchangeable(self, side):
        return self.cols if side == "input" else self.rows

    def kept_units(self, out_features, in_features, sparsity, layer=None):
        sparsity = check_sparsity(sparsity)
        if out_features % self.rows:
            raise self._error(layer, out_features, in_features,
                              f"block rows {self.rows} do not divide out_features {out_features}")
        if in_features % self.cols:
            raise self._error(layer, out_features, in_features,
                              f"block columns {self.cols} do not divide in_features {in_features}")
        kept = _kept(in_features // self.cols, sparsity)
        if kept < 1:
            raise self._error(layer, out_features, in_features,
                              f"sparsity {sparsity} keeps no block of the {in_features // self.cols} "
                              "in a block-row")
        return kept

    def _blocks(self, dense: Tensor) -> Tensor:
        """``[out/rows, in/cols, rows, cols]`` view of a dense matrix."""
        out_features, in_features = dense.shape
        return dense.reshape(out_features // self.rows, self.rows, in_features // self.cols, self.cols) \
                    .permute(0, 2, 1, 3)

    def unit_scores(self, per_weight):
        return self._blocks(per_weight).sum((2, 3))

    def units_to_dense(self, mask, out_features, in_features):
        return mask[:, None, :, None].expand(-1, self.rows, -1, self.cols).reshape(out_features, in_features)

    def units_to_index(self, mask, out_features, in_features):
        return _row_major_kept(mask)

    def index_to_units(self, index, out_features, in_features):
        mask = torch.zeros(out_features // self.rows, in_features // self.cols, dtype=torch.bool,
                           device=index.device)
        return mask.scatter_(1, index, True)

    def compress(self, dense, index):
        return self._blocks(dense).gather(1, index[..., None, None].expand(-1, -1, self.rows, self.cols))

    def as_rows(self, values, index, out_features, in_features):
        return block_to_rows(values, index)

    def kept_per_row(self, out_features, in_features, sparsity):
        return self.kept_units(out_features, in_features, sparsity) * self.cols

    def index_count(self, out_features, in_features, sparsity):
        return out_features // self.rows * self.kept_units(out_features, in_features, sparsity)


# ----------------------------------------------------------------------------- N:M


@dataclass(frozen=True)
class NM(Structure):
    """Each row keeps n of every m consecutive inputs; n = round(m * (1 - sparsity)).

    Compressed: values ``[out, in*n/m]``, position index ``[out, in/m, n]``.
    """

    m: int

    def __post_init__(self):
        _positive_int("NM", "m", self.m)

    def __str__(self) -> str:
        return f"NM(m={self.m})"

    @property
    def op(self):
        return torch.ops.padst.nm_linear

    def interchangeable(self, side):
        return self.m if side == "input" else 1

    def kept_units(self, out_features, in_features, sparsity, layer=None):
        sparsity = check_sparsity(sparsity)
        if in_features % self.m:
            raise self._error(layer, out_features, in_features,
                              f"m = {self.m} does not divide in_features {in_features}")
        kept = _kept(self.m, sparsity)
        if kept < 1:
            raise self._error(layer, out_features, in_features,
                              f"sparsity {sparsity} keeps n = 0 of every m = {self.m} inputs")
        return kept

    def unit_scores(self, per_weight):
        return per_weight.reshape(-1, self.m)

    def units_to_dense(self, mask, out_features, in_features):
        return mask.reshape(out_features, in_features)

    def units_to_index(self, mask, out_features, in_features):
        return _row_major_kept(mask).view(out_features, in_features // self.m, -1)

    def index_to_units(self, index, out_features, in_features):
        mask = torch.zeros(out_features * in_features // self.m, self.m, dtype=torch.bool, device=index.device)
        return mask.scatter_(1, index.reshape(mask.shape[0], -1), True)

    def compress(self, dense, index):
        out_features, in_features = dense.shape
        return dense.reshape(out_features, in_features // self.m, self.m).gather(2, index).reshape(out_features, -1)

    def as_rows(self, values, index, out_features, in_features):
        return nm_to_rows(values, index, in_features)

    def kept_per_row(self, out_features, in_features, sparsity):
        return in_features // self.m * self.kept_units(out_features, in_features, sparsity)

    def index_count(self, out_features, in_features, sparsity):
        return self.nnz(out_features, in_features, sparsity)


# ------------------------------------------------------------------------ diagonal


@dataclass(frozen=True)
class Diagonal(Structure):
    """K wrap-around diagonals of length L = max(out, in); entry j of the diagonal with
    offset o sits at ``(j % out, (j + o) % in)``. Needs min(out, in) to divide max(out, in),
    so the min(out, in) offsets in ``[0, min)`` are the distinct diagonals (the units).

    Compressed: values ``[K, L]``, offsets ``[K]``.
    """

    def __str__(self) -> str:
        return "Diagonal()"

    @property
    def op(self):
        return torch.ops.padst.diag_linear

    def kept_units(self, out_features, in_features, sparsity, layer=None):
        sparsity = check_sparsity(sparsity)
        longer, shorter = max(out_features, in_features), min(out_features, in_features)
        if shorter < 1:
            raise self._error(layer, out_features, in_features, "a weight needs at least one row and one column")
        if longer % shorter:
            raise self._error(layer, out_features, in_features,
                              "wrap-around diagonals need one of out_features and in_features "
                              "to divide the other")
        kept = _kept(shorter, sparsity)
        if kept < 1:
            raise self._error(layer, out_features, in_features,
                              f"sparsity {sparsity} keeps none of the {shorter} diagonals")
        return kept

    def unit_scores(self, per_weight):
        out_features, in_features = per_weight.shape
        every = torch.arange(min(out_features, in_features), device=per_weight.device)
        return self.compress(per_weight, every).sum(1)[None, :]

    def units_to_dense(self, mask, out_features, in_features):
        offsets = mask[0].nonzero()[:, 0]
        ones = torch.ones(len(offsets), max(out_features, in_features), device=mask.device)
        return self.expand(ones, offsets, out_features, in_features) != 0

    def units_to_index(self, mask, out_features, in_features):
        return _row_major_kept(mask)[0]

    def index_to_units(self, index, out_features, in_features):
        shorter = min(out_features, in_features)
        mask = torch.zeros(1, shorter, dtype=torch.bool, device=index.device)
        return mask.scatter_(1, (index % shorter)[None, :], True)

    def compress(self, dense, index):
        out_features, in_features = dense.shape
        cols = diagonal_columns(index, out_features, in_features)
        return diagonal_values_from_rows(dense.gather(1, cols), len(index), out_features)

    def as_rows(self, values, index, out_features, in_features):
        return diagonal_to_rows(values, index, out_features, in_features)

    def kept_per_row(self, out_features, in_features, sparsity):
        kept = self.kept_units(out_features, in_features, sparsity)
        return kept * max(out_features, in_features) // out_features

    def index_count(self, out_features, in_features, sparsity):
        return self.kept_units(out_features, in_features, sparsity)


# -------------------------------------------------------------------- unstructured


@dataclass(frozen=True)
class Unstructured(Structure):
    """Any pattern (the RigL/SET baseline): a dense weight and a boolean mask; one group
    whose units are the single weights."""

    def __str__(self) -> str:
        return "Unstructured()"

    def kept_units(self, out_features, in_features, sparsity, layer=None):
        sparsity = check_sparsity(sparsity)
        kept = _kept(out_features * in_features, sparsity)
        if kept < 1:
            raise self._error(layer, out_features, in_features, f"sparsity {sparsity} keeps no weight")
        return kept

    def unit_scores(self, per_weight):
        return per_weight.reshape(1, -1)

    def units_to_dense(self, mask, out_features, in_features):
        return mask.reshape(out_features, in_features)

    def units_to_index(self, mask, out_features, in_features):
        return mask.reshape(out_features, in_features)

    def index_to_units(self, index, out_features, in_features):
        return index.reshape(1, -1)

    def compress(self, dense, index):
        return dense * index

    def as_rows(self, values, index, out_features, in_features):
        raise NotImplementedError("an unstructured mask keeps a different count in each row")

    def expand(self, values, index, out_features, in_features):
        return values * index

    def kept_count(self, values, index):
        return int(index.sum())

    def linear(self, x, values, index, out_features, bias=None, in_index=None, out_index=None):
        """Masked dense matmul: there is no unstructured kernel, by design."""
        if in_index is not None:
            x = x.index_select(-1, in_index)
        y = F.linear(x, values * index, bias)
        return y if out_index is None else y.index_select(-1, out_index)

    def kept_per_row(self, out_features, in_features, sparsity):
        raise NotImplementedError("an unstructured mask has no fixed count per row; use nnz()")

    def nnz(self, out_features, in_features, sparsity):
        return self.kept_units(out_features, in_features, sparsity)

    def index_count(self, out_features, in_features, sparsity):
        return out_features * in_features

    def nbytes(self, out_features, in_features, sparsity, dtype=torch.float32):
        """Dense values plus a one-byte mask: unstructured sparsity saves no memory."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return out_features * in_features * (itemsize + 1)


STRUCTURE_TYPES = {cls.__name__: cls for cls in (Block, NM, Diagonal, Unstructured)}


def structure_record(structure: Structure) -> dict:
    """A JSON-able description of ``structure``: ``{"type": "Block", "rows": 8, "cols": 8}``."""
    return {"type": type(structure).__name__, **dataclasses.asdict(structure)}


def structure_from_record(record: dict) -> Structure:
    """The structure ``structure_record`` described (ValueError for anything else)."""
    fields = dict(record) if isinstance(record, dict) else {}
    kind = fields.pop("type", None)
    try:
        return STRUCTURE_TYPES[kind](**fields)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"not a structure record: {record!r} (expected e.g. {{'type': 'Block', 'rows': 8, "
                         "'cols': 8}})") from None
