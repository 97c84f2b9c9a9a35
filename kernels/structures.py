"""Sparsity structures (design section 3).

A structure is a small immutable spec (``Block(32, 32)``, ``NM(4)``, ``Diagonal()``,
``Unstructured()``) used together with a ``sparsity`` in [0, 1). It knows how many
units a weight of a given shape keeps, how to project a dense matrix onto itself
(keep the largest magnitudes while holding its invariant), how to expand its
compressed form back to dense (differentiably, so the dense reference can check
gradients), its cost, and which ``padst`` op computes with it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from padst_compiler.kernels.cpu import (
    TransposedRows,
    block_to_rows,
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

    @abstractmethod
    def kept_units(self, out_features: int, in_features: int, sparsity: float, layer: str | None = None) -> int:
        """Kept units per group (blocks per block-row, n per m, diagonals, or weights),
        after checking the shape; raises ``ValueError`` naming the layer and the rule."""

    @abstractmethod
    def project(self, dense: Tensor, sparsity: float, layer: str | None = None) -> SparseWeight:
        """The structured weight closest to ``dense``: the largest-magnitude units."""

    def expand(self, values: Tensor, index: Tensor, out_features: int, in_features: int) -> Tensor:
        """The dense ``out x in`` matrix of a compressed weight (differentiable in values)."""
        cols, vals = self.as_rows(values, index, out_features, in_features)
        return vals.new_zeros(out_features, in_features).scatter(1, cols, vals)

    @abstractmethod
    def kept_per_row(self, out_features: int, in_features: int, sparsity: float) -> int:
        """Non-zeros in each output row (every structured layout keeps a constant count)."""

    @abstractmethod
    def as_rows(self, values: Tensor, index: Tensor, out_features: int, in_features: int) -> tuple[Tensor, Tensor]:
        """Row-sparse view: column and value of every kept entry, ``[out, kept_per_row]`` each."""

    def transposed(self, values: Tensor, index: Tensor, out_features: int, in_features: int) -> TransposedRows:
        """``S^T`` in compressed-sparse-column form, as the backward of ``S @ x`` reads it."""
        return transpose_rows(*self.as_rows(values, index, out_features, in_features), in_features)

    def linear(self, x, values, index, out_features, bias=None, in_index=None, out_index=None) -> Tensor:
        """``(S @ x[..., in_index] + bias)[..., out_index]`` through this structure's op."""
        return self.op(x, values, index, out_features, bias, in_index, out_index)

    op = None  # the torch.ops.padst overload; None where no structured kernel exists

    def kept_count(self, values: Tensor, index: Tensor) -> int:
        """Kept positions of a compressed weight."""
        return values.numel()

    # -- costs -------------------------------------------------------------------

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

    index_itemsize = 8  # int64 indices

    @abstractmethod
    def index_count(self, out_features: int, in_features: int, sparsity: float) -> int:
        """Elements of the index tensor."""

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

    def kept_per_row(self, out_features, in_features, sparsity):
        return self.kept_units(out_features, in_features, sparsity) * self.cols

    def index_count(self, out_features, in_features, sparsity):
        return out_features // self.rows * self.kept_units(out_features, in_features, sparsity)

    def _blocks(self, dense: Tensor) -> Tensor:
        out_features, in_features = dense.shape
        return dense.reshape(out_features // self.rows, self.rows, in_features // self.cols, self.cols) \
                    .permute(0, 2, 1, 3)

    def project(self, dense, sparsity, layer=None):
        out_features, in_features = dense.shape
        kept = self.kept_units(out_features, in_features, sparsity, layer)
        blocks = self._blocks(dense.detach())
        scores = blocks.float().square().sum((2, 3))
        col_blocks = scores.topk(kept, dim=1).indices.sort(dim=1).values
        values = blocks.gather(1, col_blocks[..., None, None].expand(-1, -1, self.rows, self.cols))
        return SparseWeight(self, out_features, in_features, values.contiguous(), col_blocks)

    def as_rows(self, values, index, out_features, in_features):
        return block_to_rows(values, index)

    @property
    def op(self):
        return torch.ops.padst.block_linear


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

    def kept_per_row(self, out_features, in_features, sparsity):
        return in_features // self.m * self.kept_units(out_features, in_features, sparsity)

    def index_count(self, out_features, in_features, sparsity):
        return self.nnz(out_features, in_features, sparsity)

    def project(self, dense, sparsity, layer=None):
        out_features, in_features = dense.shape
        kept = self.kept_units(out_features, in_features, sparsity, layer)
        groups = dense.detach().reshape(out_features, in_features // self.m, self.m)
        positions = groups.abs().topk(kept, dim=2).indices.sort(dim=2).values
        values = groups.gather(2, positions).reshape(out_features, -1)
        return SparseWeight(self, out_features, in_features, values.contiguous(), positions)

    def as_rows(self, values, index, out_features, in_features):
        return nm_to_rows(values, index, in_features)

    @property
    def op(self):
        return torch.ops.padst.nm_linear


# ------------------------------------------------------------------------ diagonal


@dataclass(frozen=True)
class Diagonal(Structure):
    """K wrap-around diagonals of length L = max(out, in); entry j of the diagonal with
    offset o sits at ``(j % out, (j + o) % in)``. Needs min(out, in) to divide max(out, in).

    Compressed: values ``[K, L]``, offsets ``[K]``.
    """

    def __str__(self) -> str:
        return "Diagonal()"

    def kept_units(self, out_features, in_features, sparsity, layer=None):
        sparsity = check_sparsity(sparsity)
        longer, shorter = max(out_features, in_features), min(out_features, in_features)
        if longer % shorter:
            raise self._error(layer, out_features, in_features,
                              "wrap-around diagonals need one of out_features and in_features "
                              "to divide the other")
        kept = _kept(shorter, sparsity)
        if kept < 1:
            raise self._error(layer, out_features, in_features,
                              f"sparsity {sparsity} keeps none of the {shorter} diagonals")
        return kept

    def kept_per_row(self, out_features, in_features, sparsity):
        kept = self.kept_units(out_features, in_features, sparsity)
        return kept * max(out_features, in_features) // out_features

    def index_count(self, out_features, in_features, sparsity):
        return self.kept_units(out_features, in_features, sparsity)

    def project(self, dense, sparsity, layer=None):
        out_features, in_features = dense.shape
        kept = self.kept_units(out_features, in_features, sparsity, layer)
        every = torch.arange(min(out_features, in_features), device=dense.device)
        cols, _ = diagonal_to_rows(dense.new_empty(len(every), max(out_features, in_features)), every,
                                   out_features, in_features)
        diagonals = diagonal_values_from_rows(dense.detach().gather(1, cols), len(every), out_features)
        offsets = diagonals.float().square().sum(1).topk(kept).indices.sort().values
        return SparseWeight(self, out_features, in_features, diagonals[offsets].contiguous(), offsets)

    def as_rows(self, values, index, out_features, in_features):
        return diagonal_to_rows(values, index, out_features, in_features)

    @property
    def op(self):
        return torch.ops.padst.diag_linear


# -------------------------------------------------------------------- unstructured


@dataclass(frozen=True)
class Unstructured(Structure):
    """Any pattern (the RigL/SET baseline): a dense weight and a boolean mask."""

    def __str__(self) -> str:
        return "Unstructured()"

    def kept_units(self, out_features, in_features, sparsity, layer=None):
        sparsity = check_sparsity(sparsity)
        kept = _kept(out_features * in_features, sparsity)
        if kept < 1:
            raise self._error(layer, out_features, in_features, f"sparsity {sparsity} keeps no weight")
        return kept

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

    def project(self, dense, sparsity, layer=None):
        out_features, in_features = dense.shape
        kept = self.kept_units(out_features, in_features, sparsity, layer)
        keep = dense.detach().abs().flatten().topk(kept).indices
        mask = torch.zeros(out_features * in_features, dtype=torch.bool, device=dense.device)
        mask[keep] = True
        mask = mask.view(out_features, in_features)
        return SparseWeight(self, out_features, in_features, (dense.detach() * mask).contiguous(), mask)

    def expand(self, values, index, out_features, in_features):
        return values * index

    def kept_count(self, values, index):
        return int(index.sum())

    def as_rows(self, values, index, out_features, in_features):
        raise NotImplementedError("an unstructured mask keeps a different count in each row")

    def linear(self, x, values, index, out_features, bias=None, in_index=None, out_index=None):
        """Masked dense matmul: there is no unstructured kernel, by design."""
        if in_index is not None:
            x = x.index_select(-1, in_index)
        y = F.linear(x, values * index, bias)
        return y if out_index is None else y.index_select(-1, out_index)
