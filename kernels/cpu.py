"""Vectorised PyTorch implementations of the structured linear ops.

Every function works on inputs flattened to ``[tokens, features]``. Permutations are
fused the cheap way: ``in_index`` is folded into the column indices the kernel reads,
``out_index`` into the rows it writes, so neither costs an extra pass over the
activations except where noted.

Block sparsity gathers the kept input blocks and runs one batched matmul per
block-row. N:M and diagonal weights have a constant number of kept values per output
row, so both run through one row-sparse ("ELL") kernel built on
``embedding_bag``, which is a fused gather-multiply-reduce on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from padst_compiler.kernels.permutation import inverse_permutation


def _rows_in_z_order(grad: torch.Tensor, out_index: torch.Tensor | None) -> torch.Tensor:
    """Gradient w.r.t. z, given the gradient w.r.t. y = z[..., out_index]."""
    return grad if out_index is None else grad.index_select(1, inverse_permutation(out_index))


# ----------------------------------------------------------------------------- block


def _block_columns(col_blocks: torch.Tensor, block_cols: int, in_index: torch.Tensor | None) -> torch.Tensor:
    """Input feature read by each kept weight column, ``[R, k*c]``, with ``in_index`` fused."""
    offsets = torch.arange(block_cols, device=col_blocks.device)
    cols = (col_blocks[..., None] * block_cols + offsets).reshape(col_blocks.shape[0], -1)
    return cols if in_index is None else in_index[cols]


def _gather_block_inputs(x: torch.Tensor, values: torch.Tensor, col_blocks: torch.Tensor,
                         in_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept input blocks of each block-row, ``[R, T, k*c]`` (a strided view), and their columns."""
    n_rows, kept, _, block_cols = values.shape
    cols = _block_columns(col_blocks, block_cols, in_index)
    gathered = x.index_select(1, cols.flatten()).view(x.shape[0], n_rows, kept * block_cols)
    return gathered.transpose(0, 1), cols


def block_forward(x, values, col_blocks, out_features, bias, in_index, out_index):
    n_rows, kept, block_rows, block_cols = values.shape
    xg, _ = _gather_block_inputs(x, values, col_blocks, in_index)
    weight = values.permute(0, 1, 3, 2).reshape(n_rows, kept * block_cols, block_rows)
    z = torch.bmm(xg, weight).transpose(0, 1).reshape(x.shape[0], out_features)
    if bias is not None:
        z += bias
    return z if out_index is None else z.index_select(1, out_index)


def block_grad_input(grad, values, col_blocks, in_features, in_index, out_index):
    n_rows, kept, block_rows, block_cols = values.shape
    tokens = grad.shape[0]
    dz = _rows_in_z_order(grad, out_index).reshape(tokens, n_rows, block_rows).transpose(0, 1)
    weight = values.permute(0, 2, 1, 3).reshape(n_rows, block_rows, kept * block_cols)
    partial = torch.bmm(dz, weight).transpose(0, 1).reshape(tokens, -1)
    cols = _block_columns(col_blocks, block_cols, in_index)
    dx = grad.new_zeros(tokens, in_features)
    return dx.index_add_(1, cols.flatten(), partial)


def block_grad_values(grad, x, values, col_blocks, in_index, out_index):
    n_rows, kept, block_rows, block_cols = values.shape
    dz = _rows_in_z_order(grad, out_index).reshape(grad.shape[0], n_rows, block_rows).transpose(0, 1)
    xg, _ = _gather_block_inputs(x, values, col_blocks, in_index)
    dv = torch.bmm(dz.transpose(1, 2), xg)  # [R, r, k*c]
    return dv.view(n_rows, block_rows, kept, block_cols).permute(0, 2, 1, 3).contiguous()


# ------------------------------------------------------------------- row-sparse (ELL)


def _effective_rows(cols, vals, in_index, out_index):
    """Columns and values of the rows of ``y`` (not z), with both permutations fused."""
    if in_index is not None:
        cols = in_index[cols]
    if out_index is not None:
        cols, vals = cols.index_select(0, out_index), vals.index_select(0, out_index)
    return cols, vals


def ell_forward(x, cols, vals, bias, in_index, out_index):
    cols, vals = _effective_rows(cols, vals, in_index, out_index)
    y = F.embedding_bag(cols, x.t().contiguous(), per_sample_weights=vals, mode="sum").t().contiguous()
    if bias is not None:
        y += bias if out_index is None else bias.index_select(0, out_index)
    return y


class TransposedRows(NamedTuple):
    """``S^T`` in compressed-sparse-column form: the kept entries of input feature ``j``
    are ``rows[starts[j]:starts[j] + counts[j]]`` with ``values`` alongside."""

    starts: torch.Tensor
    counts: torch.Tensor
    rows: torch.Tensor
    values: torch.Tensor


def transpose_rows(cols, vals, in_features) -> TransposedRows:
    """The transposed form the backward needs, built by one stable sort of the columns."""
    flat = cols.flatten()
    order = torch.argsort(flat, stable=True)
    # a scatter-add rather than bincount: its shape does not depend on the data, so the
    # Triton launchers that reuse this stay traceable under torch.compile
    counts = torch.zeros(in_features, dtype=flat.dtype, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    rows = torch.div(order, cols.shape[1], rounding_mode="floor")
    return TransposedRows(torch.cumsum(counts, 0) - counts, counts, rows, vals.flatten()[order])


def ell_grad_input(grad, cols, vals, in_features, in_index, out_index):
    """``S^T grad`` through the transposed form: one variable-length embedding bag per input."""
    transposed = transpose_rows(*_effective_rows(cols, vals, in_index, out_index), in_features)
    dx = F.embedding_bag(transposed.rows, grad.t().contiguous(), transposed.starts,
                         per_sample_weights=transposed.values, mode="sum")
    return dx.t().contiguous()


def ell_grad_values(grad, x, cols, in_index, out_index):
    """Gradient of the kept values, ``[out, nnz_per_row]`` in z's row order.

    On the CPU one dense GEMM followed by a gather beats a gather-dot over the kept
    positions at every token count we measured, so the dense product is used here.
    """
    if in_index is not None:
        cols = in_index[cols]
    dense = _rows_in_z_order(grad, out_index).t() @ x
    return dense.gather(1, cols)


# ------------------------------------------------------------- N:M and diagonal as ELL


def block_to_rows(values, col_blocks):
    """Block weight as rows of (column, value): ``[out, k*cols]`` each."""
    n_rows, kept, block_rows, block_cols = values.shape
    cols = _block_columns(col_blocks, block_cols, None)[:, None, :].expand(-1, block_rows, -1)
    vals = values.permute(0, 2, 1, 3)
    return cols.reshape(n_rows * block_rows, -1), vals.reshape(n_rows * block_rows, -1)


def nm_to_rows(values, positions, in_features):
    """N:M weight as rows of (column, value): ``[out, in*n/m]`` each."""
    out_features, groups, _ = positions.shape
    group_starts = torch.arange(groups, device=positions.device) * (in_features // groups)
    cols = (group_starts[None, :, None] + positions).reshape(out_features, -1)
    return cols, values


def diagonal_columns(offsets, out_features, in_features):
    """Column of every entry of the diagonals, in row layout ``[out, K*L/out]``: entry j of
    diagonal k sits at ``(j % out, (j + offsets[k]) % in)``, so row i holds j = i + t*out."""
    repeats = max(out_features, in_features) // out_features
    j = torch.arange(out_features, device=offsets.device)[:, None] + \
        torch.arange(repeats, device=offsets.device)[None, :] * out_features
    cols = (j[:, None, :] + offsets[None, :, None]) % in_features
    return cols.reshape(out_features, -1)


def diagonal_to_rows(values, offsets, out_features, in_features):
    """Diagonal weight as rows of (column, value)."""
    n_diag, length = values.shape
    vals = values.view(n_diag, length // out_features, out_features).permute(2, 0, 1)
    return diagonal_columns(offsets, out_features, in_features), vals.reshape(out_features, -1)


def diagonal_values_from_rows(row_values, n_diag, out_features):
    """Inverse of the value layout of :func:`diagonal_to_rows`: ``[out, K*t] -> [K, L]``."""
    repeats = row_values.shape[1] // n_diag
    return row_values.view(out_features, n_diag, repeats).permute(1, 2, 0).reshape(n_diag, -1)


class RowSparseKernels(NamedTuple):
    """The three row-sparse (ELL) kernels; N:M and diagonal weights run on any such set."""

    forward: Callable
    grad_input: Callable
    grad_values: Callable


ROW_SPARSE = RowSparseKernels(ell_forward, ell_grad_input, ell_grad_values)


def nm_forward(x, values, positions, out_features, bias, in_index, out_index, ell=ROW_SPARSE):
    return ell.forward(x, *nm_to_rows(values, positions, x.shape[1]), bias, in_index, out_index)


def nm_grad_input(grad, values, positions, in_features, in_index, out_index, ell=ROW_SPARSE):
    cols, vals = nm_to_rows(values, positions, in_features)
    return ell.grad_input(grad, cols, vals, in_features, in_index, out_index)


def nm_grad_values(grad, x, values, positions, in_index, out_index, ell=ROW_SPARSE):
    cols, _ = nm_to_rows(values, positions, x.shape[1])
    return ell.grad_values(grad, x, cols, in_index, out_index)


def diag_forward(x, values, offsets, out_features, bias, in_index, out_index, ell=ROW_SPARSE):
    cols, vals = diagonal_to_rows(values, offsets, out_features, x.shape[1])
    return ell.forward(x, cols, vals, bias, in_index, out_index)


def diag_grad_input(grad, values, offsets, in_features, in_index, out_index, ell=ROW_SPARSE):
    cols, vals = diagonal_to_rows(values, offsets, grad.shape[1], in_features)
    return ell.grad_input(grad, cols, vals, in_features, in_index, out_index)


def diag_grad_values(grad, x, values, offsets, in_index, out_index, ell=ROW_SPARSE):
    cols, _ = diagonal_to_rows(values, offsets, grad.shape[1], x.shape[1])
    row_grads = ell.grad_values(grad, x, cols, in_index, out_index)
    return diagonal_values_from_rows(row_grads, values.shape[0], grad.shape[1])
