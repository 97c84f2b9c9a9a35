"""The portable implementations of the structured linear ops: every device but CUDA with
Triton (:mod:`.triton.kernels`) runs these.

Every function works on inputs flattened to ``[tokens, features]``. Each op has up to
three implementations, and :mod:`.eager.select` runs the one that measures fastest per
shape regime:

- ``native``: the C++ kernels of :mod:`.cpu.native` (fp32 CPU tensors). Block weights run a block-sparse
  times dense kernel (forward, and the transposed structure for the input gradient) and
  an SDDMM for the value gradient; N:M and diagonal weights, which have a constant number
  of kept values per output row, run a row-sparse ("ELL") kernel with tokens in the
  vector lanes, its transposed (CSC) form, and an ELL SDDMM.
- ``torch``: vectorised PyTorch: block gathers and batched matmuls; ELL through
  ``embedding_bag``, a fused gather-multiply-reduce.
- ``dense``: the weight expanded and one dense matmul, so a structured layer is never
  slower than its dense counterpart by more than the cost of the expansion.

Permutations are fused: ``in_index`` goes into the columns a kernel reads, ``out_index``
into where it writes. Everything derived from indices alone is memoized per index version
(:mod:`.eager.derived`), so a training step pays for it once per DST update, not per call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from padst_compiler.kernels.cpu import native
from padst_compiler.kernels.eager import select
from padst_compiler.kernels.eager.derived import memoize
from padst_compiler.kernels.permutation import inverse_permutation

Tensor = torch.Tensor


def _frozen_memoize(name: str, values: Tensor, compute):
    """Memoize a detached repacking of ``values`` only where they are frozen (no gradient):
    a frozen model packs its weights once, while a training step, whose values change every
    step, repacks without keeping a copy per layer alive between steps."""
    return compute() if values.requires_grad else memoize(name, (values,), compute)


def _inverse(index: Tensor) -> Tensor:
    return memoize("inverse", (index,), lambda: inverse_permutation(index))


def _int32(index: Tensor) -> Tensor:
    """An index as the int32 the native kernels read."""
    return memoize("int32", (index,), lambda: index.to(torch.int32))


def _rows_in_z_order(grad: Tensor, out_index: Tensor | None) -> Tensor:
    """Gradient w.r.t. z, given the gradient w.r.t. y = z[..., out_index]."""
    return grad if out_index is None else grad.index_select(1, _inverse(out_index))


def _native_fp32(*tensors: Tensor | None) -> bool:
    """Whether the native kernels apply: fp32 CPU tensors and a built library."""
    return (all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu") for t in tensors)
            and native.library() is not None)


def _regime(x: Tensor, values: Tensor, index: Tensor, in_index, out_index) -> tuple:
    return (select.token_bucket(x.shape[0]), x.shape[1], x.dtype, tuple(values.shape), tuple(index.shape),
            in_index is not None, out_index is not None)


# ------------------------------------------------------------------ rows view (dense)


class Rows(NamedTuple):
    """A weight as rows of (column, value), ``[out, per_row]`` each, rows in z order, the
    columns already read through ``in_index``."""

    cols: Tensor
    vals: Tensor


def _dense_weight(rows: Rows, in_features: int) -> Tensor:
    return rows.vals.new_zeros(rows.cols.shape[0], in_features).scatter_(1, rows.cols, rows.vals)


def dense_forward(x, rows: Rows, bias, out_index):
    z = F.linear(x, _dense_weight(rows, x.shape[1]), bias)
    return z if out_index is None else z.index_select(1, out_index)


def dense_grad_input(grad, rows: Rows, in_features, out_index):
    return _rows_in_z_order(grad, out_index) @ _dense_weight(rows, in_features)


def dense_grad_values(grad, x, cols, out_index):
    """Gradient of the kept values as rows: one dense GEMM, then a gather."""
    return (_rows_in_z_order(grad, out_index).t() @ x).gather(1, cols)


class ColumnOrder(NamedTuple):
    """A ``[rows, per_row]`` column table sorted by column (the transposed, CSC order):
    ``order`` lists the entries column by column, ``pointers[j]:pointers[j+1]`` are column
    j's, and ``rows`` is the row of each sorted entry."""

    order: Tensor
    counts: Tensor
    pointers: Tensor
    rows: Tensor


def sort_by_column(cols: Tensor, n_columns: int) -> ColumnOrder:
    """One stable sort of the columns. Counts come from a scatter-add rather than bincount:
    its shape does not depend on the data, so the Triton launchers stay traceable."""
    flat = cols.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_columns, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    pointers = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return ColumnOrder(order, counts, pointers, torch.div(order, cols.shape[1], rounding_mode="floor"))


# ----------------------------------------------------------------------------- block


def _block_columns(col_blocks: Tensor, block_cols: int, in_index: Tensor | None) -> Tensor:
    """Input feature read by each kept weight column, ``[R, k*c]``, with ``in_index`` fused."""
    def compute():
        offsets = torch.arange(block_cols, device=col_blocks.device)
        cols = (col_blocks[..., None] * block_cols + offsets).reshape(col_blocks.shape[0], -1)
        return (cols if in_index is None else in_index[cols]).contiguous()

    return memoize("block columns", (col_blocks, in_index), compute, block_cols)


def _block_rows(values, col_blocks, in_index) -> Rows:
    n_rows, kept, block_rows, block_cols = values.shape
    cols = _block_columns(col_blocks, block_cols, in_index)[:, None, :].expand(-1, block_rows, -1)
    return Rows(cols.reshape(n_rows * block_rows, -1), values.permute(0, 2, 1, 3).reshape(n_rows * block_rows, -1))


def _block_values_from_rows(row_values: Tensor, shape: torch.Size) -> Tensor:
    n_rows, kept, block_rows, block_cols = shape
    return row_values.reshape(n_rows, block_rows, kept, block_cols).permute(0, 2, 1, 3).contiguous()


def _gather_block_inputs(x, values, col_blocks, in_index) -> Tensor:
    """The kept input blocks of each block-row, ``[R, T, k*c]`` (a strided view)."""
    n_rows, kept, _, block_cols = values.shape
    cols = _block_columns(col_blocks, block_cols, in_index)
    return x.index_select(1, cols.flatten()).view(x.shape[0], n_rows, kept * block_cols).transpose(0, 1)


class BlockTransposed(NamedTuple):
    """The blocks that read each input column block, for the input gradient: entries of
    column block q are ``order[entry_ptr[q]:entry_ptr[q+1]]`` (kept-block numbers), and
    ``rows`` holds the incoming-gradient columns each of them reads."""

    entry_ptr: Tensor
    order: Tensor
    rows: Tensor


def _block_transposed(col_blocks, block_rows, block_cols, in_features, out_index) -> BlockTransposed:
    def compute():
        by_column = sort_by_column(col_blocks, in_features // block_cols)
        rows = by_column.rows[:, None] * block_rows + torch.arange(block_rows)  # z rows of each entry
        if out_index is not None:  # z row i is column inverse(out_index)[i] of the incoming gradient
            rows = _inverse(out_index)[rows]
        return BlockTransposed(by_column.pointers, by_column.order, rows.contiguous())

    return memoize("block transposed", (col_blocks, out_index), compute, block_rows, block_cols, in_features)


def block_forward(x, values, col_blocks, out_features, bias, in_index, out_index):
    candidates = {}
    if _native_fp32(x, values, bias) and values.shape[2] in native.BLOCK_WIDTHS:
        candidates["native"] = lambda: _block_forward_native(x, values, col_blocks, out_features, bias,
                                                             in_index, out_index, pack=False)
        if in_index is not None:  # which way of reading through in_index is faster depends on the shape
            candidates["native-packed"] = lambda: _block_forward_native(x, values, col_blocks, out_features, bias,
                                                                        in_index, out_index, pack=True)
    candidates["torch"] = lambda: _block_forward_torch(x, values, col_blocks, out_features, bias, in_index, out_index)
    candidates["dense"] = lambda: dense_forward(x, _block_rows(values, col_blocks, in_index), bias, out_index)
    return select.run("block_forward", _regime(x, values, col_blocks, in_index, out_index), candidates)


def _block_forward_torch(x, values, col_blocks, out_features, bias, in_index, out_index):
    n_rows, kept, block_rows, block_cols = values.shape
    weight = values.permute(0, 1, 3, 2).reshape(n_rows, kept * block_cols, block_rows)
    z = torch.bmm(_gather_block_inputs(x, values, col_blocks, in_index), weight)
    z = z.transpose(0, 1).reshape(x.shape[0], out_features)
    if bias is not None:
        z += bias
    return z if out_index is None else z.index_select(1, out_index)


def _block_forward_native(x, values, col_blocks, out_features, bias, in_index, out_index, pack):
    """Each block-row sums its kept blocks; the panels are the blocks transposed, ``[c, r]``.
    ``in_index`` is either fused into the columns each panel reads (scattered reads, cheap
    while a tile's rows of x fit in L1) or, with ``pack``, applied by the kernel packing
    the tile's rows of x in ``in_index`` order first (a pass over x that then reads
    contiguous columns)."""
    n_rows, kept, block_rows, block_cols = values.shape
    x = x.contiguous()
    y = native.output_buffer(x, out_features)
    plan = memoize("block forward", (col_blocks, in_index, out_index), lambda: _BlockForwardPlan(
        torch.arange(n_rows + 1) * kept, _block_columns(col_blocks, block_cols, None if pack else in_index),
        None if in_index is None or not pack else _int32(in_index),
        None if out_index is None else _int32(out_index)), block_cols, pack)
    panels = _frozen_memoize("block panels", values, lambda: values.detach().transpose(2, 3).contiguous())
    bias = None if bias is None else bias.detach().contiguous()
    native.forward("padst_block_mm", x, y, n_rows, block_rows, plan.entry_ptr, plan.columns, block_cols, panels,
                   None, bias, plan.out_map, plan.in_columns, x.shape[1])
    return y


class _BlockForwardPlan(NamedTuple):
    """Index-derived arguments of the native block forward, memoized together (one lookup
    a call matters at one token): the columns each entry reads, the int32 ``in_index``
    the kernel packs rows through (when it does) and the int32 ``out_index`` it gathers
    each row of the result through."""

    entry_ptr: Tensor
    columns: Tensor
    in_columns: Tensor | None
    out_map: Tensor | None


def block_grad_input(grad, values, col_blocks, in_features, in_index, out_index):
    candidates = {}
    if _native_fp32(grad, values) and values.shape[3] in native.BLOCK_WIDTHS:
        candidates["native"] = lambda: _block_grad_input_native(grad, values, col_blocks, in_features,
                                                                in_index, out_index)
    candidates["torch"] = lambda: _block_grad_input_torch(grad, values, col_blocks, in_features, in_index, out_index)
    candidates["dense"] = lambda: dense_grad_input(grad, _block_rows(values, col_blocks, in_index), in_features,
                                                   out_index)
    return select.run("block_grad_input", _regime(grad, values, col_blocks, in_index, out_index), candidates)


def _block_grad_input_torch(grad, values, col_blocks, in_features, in_index, out_index):
    n_rows, kept, block_rows, block_cols = values.shape
    tokens = grad.shape[0]
    dz = _rows_in_z_order(grad, out_index).reshape(tokens, n_rows, block_rows).transpose(0, 1)
    weight = values.permute(0, 2, 1, 3).reshape(n_rows, block_rows, kept * block_cols)
    partial = torch.bmm(dz, weight).transpose(0, 1).reshape(tokens, -1)
    cols = _block_columns(col_blocks, block_cols, in_index)
    return grad.new_zeros(tokens, in_features).index_add_(1, cols.flatten(), partial)


def _block_grad_input_native(grad, values, col_blocks, in_features, in_index, out_index):
    """The transposed structure: each input column block sums the blocks that read it
    (no atomics, no scatter-add); ``in_index`` becomes the columns the result goes to."""
    n_rows, kept, block_rows, block_cols = values.shape
    transposed = _block_transposed(col_blocks, block_rows, block_cols, in_features, out_index)
    panels = values.detach().contiguous()  # [R*k, r, c]: entry e reads block order[e] in place
    dx_map = None if in_index is None else _int32(_inverse(in_index))  # dx[:, f] = z[:, inverse(in_index)[f]]
    grad = grad.contiguous()
    dx = native.output_buffer(grad, in_features)
    native.run("padst_block_mm", grad.data_ptr(), grad.stride(0), dx.data_ptr(), dx.stride(0), grad.shape[0],
               in_features // block_cols, block_cols, transposed.entry_ptr.data_ptr(), transposed.rows.data_ptr(),
               block_rows, panels.data_ptr(), transposed.order.data_ptr(), None, native.pointer(dx_map), None, 0)
    return dx


def block_grad_values(grad, x, values, col_blocks, in_index, out_index):
    candidates = {}
    if _native_fp32(grad, x, values) and {values.shape[2], values.shape[3]} <= set(native.BLOCK_WIDTHS):
        candidates["native"] = lambda: _block_grad_values_native(grad, x, values, col_blocks, in_index, out_index,
                                                                 pack=False)
        if in_index is not None:  # as in the forward, which way of reading through in_index wins depends on the shape
            candidates["native-packed"] = lambda: _block_grad_values_native(grad, x, values, col_blocks, in_index,
                                                                            out_index, pack=True)
    candidates["torch"] = lambda: _block_grad_values_torch(grad, x, values, col_blocks, in_index, out_index)
    candidates["dense"] = lambda: _block_values_from_rows(
        dense_grad_values(grad, x, _block_rows(values, col_blocks, in_index).cols, out_index), values.shape)
    return select.run("block_grad_values", _regime(x, values, col_blocks, in_index, out_index), candidates)


def _block_grad_values_torch(grad, x, values, col_blocks, in_index, out_index):
    n_rows, kept, block_rows, block_cols = values.shape
    dz = _rows_in_z_order(grad, out_index).reshape(grad.shape[0], n_rows, block_rows).transpose(0, 1)
    dv = torch.bmm(dz.transpose(1, 2), _gather_block_inputs(x, values, col_blocks, in_index))  # [R, r, k*c]
    return dv.view(n_rows, block_rows, kept, block_cols).permute(0, 2, 1, 3).contiguous()


def _block_grad_values_native(grad, x, values, col_blocks, in_index, out_index, pack):
    """SDDMM over the kept blocks. ``in_index`` is either fused into the columns of x each
    block reads (scattered reads; more of them the more blocks are kept) or, with ``pack``,
    applied by the kernel packing each tile of tokens of x in ``in_index`` order (a pass over
    x, whatever the number of blocks). The kernel packs the gradient's rows in z order
    (through ``inverse(out_index)``) the same way."""
    n_rows, kept, block_rows, block_cols = values.shape
    pack_in_index = in_index is not None and pack
    in_map = _int32(in_index) if pack_in_index else None
    out_map = None if out_index is None else _int32(_inverse(out_index))
    grad, x = grad.contiguous(), x.contiguous()
    columns = _block_columns(col_blocks, block_cols, None if pack_in_index else in_index)
    dv = torch.empty_like(values, memory_format=torch.contiguous_format)
    native.run("padst_block_sddmm", grad.data_ptr(), grad.stride(0), x.data_ptr(), x.stride(0), x.shape[0],
               n_rows, kept, block_rows, block_cols, columns.data_ptr(), native.pointer(out_map), dv.data_ptr(),
               native.pointer(in_map), x.shape[1])
    return dv


# ------------------------------------------------------------------- row-sparse (ELL)


class EllIndex(NamedTuple):
    """Index-only parts of a row-sparse weight: ``cols`` ``[out, per_row]`` (z-row order,
    ``in_index`` fused) and the transposed (CSC) form the input gradient reads: the entries of
    input feature j are ``order[col_ptr[j]:col_ptr[j+1]]`` and read gradient columns ``rows``.
    The native kernels read int32 copies of ``cols``, ``rows`` and ``order``."""

    cols: Tensor
    row_ptr: Tensor
    col_ptr: Tensor
    order: Tensor
    rows: Tensor
    cols32: Tensor
    rows32: Tensor
    order32: Tensor


def _ell_index(index: Tensor, in_features: int, in_index, out_index, structure_columns, *extra) -> EllIndex:
    """The structure's own columns (``structure_columns()``, from ``index``), fused with
    ``in_index`` and transposed; one memoized lookup per call."""
    def compute():
        columns = structure_columns()
        cols = (columns if in_index is None else in_index[columns]).contiguous()
        out_rows, per_row = cols.shape
        by_column = sort_by_column(cols, in_features)
        rows = by_column.rows if out_index is None else _inverse(out_index)[by_column.rows]
        rows = rows.contiguous()
        return EllIndex(cols, torch.arange(out_rows + 1) * per_row, by_column.pointers, by_column.order, rows,
                        cols.to(torch.int32), rows.to(torch.int32), by_column.order.to(torch.int32))

    return memoize("ell index", (index, in_index, out_index), compute, in_features, *extra)


def ell_forward(x, ell: EllIndex, vals, bias, out_index, key: tuple, preferred: dict | None = None):
    """The row-sparse forward; ``preferred`` are structure-specific candidates tried first."""
    candidates = dict(preferred or {})
    if _native_fp32(x, vals, bias):
        candidates["native"] = lambda: _ell_forward_native(x, ell, vals, bias, out_index)
    candidates["torch"] = lambda: _ell_forward_torch(x, ell, vals, bias, out_index)
    candidates["dense"] = lambda: dense_forward(x, Rows(ell.cols, vals), bias, out_index)
    return select.run("ell_forward", key, candidates)


def _ell_forward_native(x, ell: EllIndex, vals, bias, out_index):
    x = x.contiguous()
    y = native.output_buffer(x, ell.cols.shape[0])
    vals = vals.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    native.forward("padst_ell_mm", x, y, x.shape[1], ell.cols.shape[0], ell.row_ptr, ell.cols32, vals, None, bias,
                   None if out_index is None else _int32(out_index))
    return y


def _ell_forward_torch(x, ell: EllIndex, vals, bias, out_index):
    z = F.embedding_bag(ell.cols, x.t().contiguous(), per_sample_weights=vals, mode="sum").t()
    if bias is not None:
        z = z + bias
    return (z if out_index is None else z.index_select(1, out_index)).contiguous()


def ell_grad_input(grad, ell: EllIndex, vals, in_features, key: tuple, out_index):
    """``S^T grad`` through the transposed form: one variable-length row per input feature."""
    candidates = {}
    if _native_fp32(grad, vals):
        candidates["native"] = lambda: _ell_grad_input_native(grad, ell, vals, in_features)
    candidates["torch"] = lambda: _ell_grad_input_torch(grad, ell, vals, in_features)
    candidates["dense"] = lambda: dense_grad_input(grad, Rows(ell.cols, vals), in_features, out_index)
    return select.run("ell_grad_input", key, candidates)


def _ell_grad_input_native(grad, ell: EllIndex, vals, in_features):
    grad = grad.contiguous()
    dx = grad.new_empty(grad.shape[0], in_features)
    vals = vals.detach().contiguous()  # read in the transposed order through order32
    native.run("padst_ell_mm", grad.data_ptr(), grad.stride(0), dx.data_ptr(), dx.stride(0), grad.shape[0],
               grad.shape[1], in_features, ell.col_ptr.data_ptr(), ell.rows32.data_ptr(), vals.data_ptr(),
               ell.order32.data_ptr(), None, None)
    return dx


def _ell_grad_input_torch(grad, ell: EllIndex, vals, in_features):
    dx = F.embedding_bag(ell.rows, grad.t().contiguous(), ell.col_ptr[:-1],
                         per_sample_weights=vals.flatten().index_select(0, ell.order), mode="sum")
    return dx.t().contiguous()


def ell_grad_values(grad, x, ell: EllIndex, out_index, key: tuple):
    """Gradient of the kept values, ``[out, per_row]`` in z's row order: only the kept
    entries (SDDMM) natively, else one dense GEMM and a gather."""
    candidates = {}
    if _native_fp32(grad, x):
        candidates["native"] = lambda: _ell_grad_values_native(grad, x, ell, out_index)
    candidates["dense"] = lambda: dense_grad_values(grad, x, ell.cols, out_index)
    return select.run("ell_grad_values", key, candidates)


def _ell_grad_values_native(grad, x, ell: EllIndex, out_index):
    grad, x = grad.contiguous(), x.contiguous()
    dv = x.new_empty(ell.cols.shape)
    dz_map = None if out_index is None else _int32(_inverse(out_index))  # read grad's columns in z order
    native.run("padst_ell_sddmm", grad.data_ptr(), grad.stride(0), x.data_ptr(), x.stride(0), x.shape[0],
               x.shape[1], ell.cols.shape[0], ell.row_ptr.data_ptr(), ell.cols32.data_ptr(), dv.data_ptr(),
               native.pointer(dz_map))
    return dv


class TransposedRows(NamedTuple):
    """``S^T`` in compressed-sparse-column form: the kept entries of input feature ``j``
    are ``rows[starts[j]:starts[j] + counts[j]]`` with ``values`` alongside."""

    starts: Tensor
    counts: Tensor
    rows: Tensor
    values: Tensor


def transpose_rows(cols, vals, in_features) -> TransposedRows:
    """The transposed form of a rows view, built by one stable sort of the columns."""
    by_column = sort_by_column(cols, in_features)
    return TransposedRows(by_column.pointers[:-1], by_column.counts, by_column.rows,
                          vals.flatten().index_select(0, by_column.order))


# ------------------------------------------------------------- N:M and diagonal as ELL


def block_to_rows(values, col_blocks):
    """Block weight as rows of (column, value): ``[out, k*cols]`` each."""
    return tuple(_block_rows(values, col_blocks, None))


def nm_columns(positions, in_features):
    out_features, groups, _ = positions.shape
    group_starts = torch.arange(groups, device=positions.device) * (in_features // groups)
    return (group_starts[None, :, None] + positions).reshape(out_features, -1)


def nm_to_rows(values, positions, in_features):
    """N:M weight as rows of (column, value): ``[out, in*n/m]`` each."""
    return nm_columns(positions, in_features), values


def diagonal_columns(offsets, out_features, in_features):
    """Column of every entry of the diagonals, in row layout ``[out, K*L/out]``: entry j of
    diagonal k sits at ``(j % out, (j + offsets[k]) % in)``, so row i holds j = i + t*out."""
    repeats = max(out_features, in_features) // out_features
    j = torch.arange(out_features, device=offsets.device)[:, None] + \
        torch.arange(repeats, device=offsets.device)[None, :] * out_features
    cols = (j[:, None, :] + offsets[None, :, None]) % in_features
    return cols.reshape(out_features, -1)


def _diagonal_row_values(values, out_features):
    """Diagonal values in row layout, ``[out, K*t]`` (differentiable: ``expand`` uses it)."""
    n_diag, length = values.shape
    return values.view(n_diag, length // out_features, out_features).permute(2, 0, 1).reshape(out_features, -1)


def _kernel_row_values(values, out_features):
    """The same as a contiguous, detached copy for the kernels (a strided copy, kept for a
    frozen model)."""
    return _frozen_memoize("diagonal row values", values,
                           lambda: _diagonal_row_values(values.detach(), out_features).contiguous())


def diagonal_to_rows(values, offsets, out_features, in_features):
    """Diagonal weight as rows of (column, value)."""
    return diagonal_columns(offsets, out_features, in_features), _diagonal_row_values(values, out_features)


def diagonal_values_from_rows(row_values, n_diag, out_features):
    """Inverse of the value layout of :func:`diagonal_to_rows`: ``[out, K*t] -> [K, L]``."""
    repeats = row_values.shape[1] // n_diag
    return row_values.view(out_features, n_diag, repeats).permute(1, 2, 0).reshape(n_diag, -1)


def _nm_index(positions, in_features, in_index, out_index) -> EllIndex:
    return _ell_index(positions, in_features, in_index, out_index, lambda: nm_columns(positions, in_features))


def _diag_index(offsets, out_features, in_features, in_index, out_index) -> EllIndex:
    return _ell_index(offsets, in_features, in_index, out_index,
                      lambda: diagonal_columns(offsets, out_features, in_features), out_features)


# Rows per slice of the sliced N:M layout (one vector of fp32 lanes), and the token counts
# it serves: it re-reads the values for every token, so beyond a few the row-sparse
# kernel's tokens-in-lanes form wins.
SLICE_ROWS = 16
SLICED_TOKENS = 4


def nm_forward(x, values, positions, out_features, bias, in_index, out_index):
    ell = _nm_index(positions, x.shape[1], in_index, out_index)
    preferred = {}
    group_size = x.shape[1] // positions.shape[1]
    # the sliced layout is a repacking of the values: worth it only where it is kept (frozen)
    if x.shape[0] <= SLICED_TOKENS and group_size <= 2 * SLICE_ROWS and not values.requires_grad \
            and _native_fp32(x, values, bias):
        preferred["native-sliced"] = lambda: _nm_forward_sliced(x, values, positions, bias, in_index, out_index)
    return ell_forward(x, ell, values, bias, out_index, ("nm", *_regime(x, values, positions, in_index, out_index)),
                       preferred)


def _sliced(rows: Tensor) -> Tensor:
    """``[out, per_row]`` -> ``[ceil(out / 16), per_row, 16]``: 16 rows side by side per entry,
    zero rows padding the last slice."""
    out_rows, per_row = rows.shape
    padded = F.pad(rows, (0, 0, 0, -out_rows % SLICE_ROWS))
    return padded.view(-1, SLICE_ROWS, per_row).transpose(1, 2).contiguous()


class _FewTokenArguments(NamedTuple):
    """What the few-token native forwards take besides the weight: contiguous x, the output,
    bias, int32 ``in_index`` and int32 ``out_index``."""

    x: Tensor
    y: Tensor
    bias: Tensor | None
    in_columns: Tensor | None
    out_map: Tensor | None


def _few_token_arguments(x, out_features, bias, in_index, out_index) -> _FewTokenArguments:
    x = x.contiguous()
    return _FewTokenArguments(x, native.output_buffer(x, out_features),
                              None if bias is None else bias.detach().contiguous(),
                              None if in_index is None else _int32(in_index),
                              None if out_index is None else _int32(out_index))


def _nm_forward_sliced(x, values, positions, bias, in_index, out_index):
    """``padst_nm_mm``: register permutes within each group instead of gathers."""
    out_features, groups, kept = positions.shape
    x, y, bias, in_columns, out_map = _few_token_arguments(x, out_features, bias, in_index, out_index)
    # offered for frozen values only, so both repackings are kept under one lookup
    sliced_values, sliced_positions = memoize("nm sliced", (values, positions), lambda: (
        _sliced(values.detach()), _sliced(positions.reshape(out_features, -1).to(torch.uint8))))
    native.forward("padst_nm_mm", x, y, x.shape[1], out_features, groups, kept, sliced_values, sliced_positions,
                   bias, in_columns, out_map)
    return y


def nm_grad_input(grad, values, positions, in_features, in_index, out_index):
    ell = _nm_index(positions, in_features, in_index, out_index)
    key = ("nm", in_features, *_regime(grad, values, positions, in_index, out_index))
    return ell_grad_input(grad, ell, values, in_features, key, out_index)


def nm_grad_values(grad, x, values, positions, in_index, out_index):
    ell = _nm_index(positions, x.shape[1], in_index, out_index)
    return ell_grad_values(grad, x, ell, out_index, ("nm", *_regime(x, values, positions, in_index, out_index)))


# Up to this many tokens the diagonal forward streams the diagonals themselves (no index,
# no repacking); more tokens amortise the row-sparse kernel's index reads over its lanes.
DIAGONAL_STREAM_TOKENS = 16


def diag_forward(x, values, offsets, out_features, bias, in_index, out_index):
    key = ("diagonal", out_features, *_regime(x, values, offsets, in_index, out_index))
    ell = _diag_index(offsets, out_features, x.shape[1], in_index, out_index)
    if x.shape[0] <= DIAGONAL_STREAM_TOKENS and _native_fp32(x, values, bias):
        # The row layout of the values is a copy, made only by the candidates that read it.
        candidates = {
            "native-streamed": lambda: _diag_forward_native(x, values, offsets, out_features, bias, in_index,
                                                            out_index),
            "native": lambda: _ell_forward_native(x, ell, _kernel_row_values(values, out_features), bias, out_index),
            "dense": lambda: dense_forward(x, Rows(ell.cols, _kernel_row_values(values, out_features)), bias,
                                           out_index)}
        return select.run("diag_forward", key, candidates)
    return ell_forward(x, ell, _kernel_row_values(values, out_features), bias, out_index, key)


def _diag_forward_native(x, values, offsets, out_features, bias, in_index, out_index):
    """The diagonals streamed in their own layout (``padst_diag_mm``), permutations fused."""
    x, y, bias, in_columns, out_map = _few_token_arguments(x, out_features, bias, in_index, out_index)
    values = values.detach().contiguous()
    offsets = offsets.contiguous()
    native.forward("padst_diag_mm", x, y, x.shape[1], out_features, values.shape[0], offsets, values, bias,
                   in_columns, out_map)
    return y


def diag_grad_input(grad, values, offsets, in_features, in_index, out_index):
    out_features = grad.shape[1]
    ell = _diag_index(offsets, out_features, in_features, in_index, out_index)
    key = ("diagonal", in_features, *_regime(grad, values, offsets, in_index, out_index))
    return ell_grad_input(grad, ell, _kernel_row_values(values, out_features), in_features, key, out_index)


def diag_grad_values(grad, x, values, offsets, in_index, out_index):
    out_features = grad.shape[1]
    ell = _diag_index(offsets, out_features, x.shape[1], in_index, out_index)
    key = ("diagonal", out_features, *_regime(x, values, offsets, in_index, out_index))
    row_grads = ell_grad_values(grad, x, ell, out_index, key)
    return diagonal_values_from_rows(row_grads, values.shape[0], out_features)
