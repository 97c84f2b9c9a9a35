"""The forward kernels' bodies: one ``@triton.jit`` function per structure that computes a
program's ``[tokens, z rows]`` accumulator, and the helpers every kernel shares.

Two kinds of kernel run these bodies: the launcher kernels of :mod:`.kernels` (eager calls
and traced graphs) and the Inductor templates of :mod:`..inductor.lowering`, whose
generated modules import this one. Each kernel only picks its program's tile and stores the
result its own way (``tl.store``, or Inductor's store where an epilogue fuses), so what a
forward computes is written once.

Every address taken from an index value is masked with :func:`inside`: the ops check index
ranges before launching, but a graph compiled by Inductor reads the index buffers without
those checks, and no value may make a kernel read or write outside its tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def inside(index, size):
    """Lanes whose index value addresses one of ``size`` entries."""
    return (index >= 0) & (index < size)


@triton.jit
def matmul_acc(acc, a, b, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32. ``tl.dot`` needs every dimension >= 16 (the launchers pad
    to that when it wastes at most half a tile); smaller blocks use a broadcast product."""
    if USE_DOT:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    else:
        out = acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return out


@triton.jit
def token_tile(BLOCK_T: tl.constexpr, n_tokens):
    """This program's token rows (int64: tokens times features can pass 2**31) and their mask."""
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    return tokens, tokens < n_tokens


@triton.jit
def load_x(x_ptr, stride_xt, stride_xi, tokens, t_mask, cols, cols_ok, in_features, in_map_ptr,
           HAS_IN_MAP: tl.constexpr):
    """The ``[tokens, cols]`` tile of x, read through in_index when there is one; columns
    outside x (an index value out of range) and masked lanes read 0."""
    cols_ok = cols_ok & inside(cols, in_features)
    if HAS_IN_MAP:
        cols = tl.load(in_map_ptr + cols, mask=cols_ok, other=0)
        cols_ok = cols_ok & inside(cols, in_features)
    return tl.load(x_ptr + tokens[:, None] * stride_xt + cols[None, :] * stride_xi,
                   mask=t_mask[:, None] & cols_ok[None, :], other=0.0)


@triton.jit
def block_forward(x_ptr, stride_xt, stride_xi, values_ptr, col_blocks_ptr, in_map_ptr, tokens, t_mask,
                  block_row, in_features, kept, ROWS: tl.constexpr, COLS: tl.constexpr,
                  ROWS_PAD: tl.constexpr, COLS_PAD: tl.constexpr, USE_DOT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, HAS_IN_MAP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Block: ``[BLOCK_T, ROWS_PAD]`` of z, one block-row, summing its ``kept`` blocks."""
    r = tl.arange(0, ROWS_PAD)
    c = tl.arange(0, COLS_PAD)
    r_mask, c_mask = r < ROWS, c < COLS
    acc = tl.zeros((BLOCK_T, ROWS_PAD), dtype=tl.float32)
    for slot in range(kept):
        kept_block = block_row * kept + slot
        cols = tl.load(col_blocks_ptr + kept_block) * COLS + c
        x = load_x(x_ptr, stride_xt, stride_xi, tokens, t_mask, cols, c_mask, in_features, in_map_ptr, HAS_IN_MAP)
        w_t = tl.load(values_ptr + (kept_block * ROWS + r[None, :]) * COLS + c[:, None],
                      mask=c_mask[:, None] & r_mask[None, :], other=0.0)
        acc = matmul_acc(acc, x, w_t, USE_DOT, DOT_PRECISION)
    return acc


@triton.jit
def nm_forward(x_ptr, stride_xt, stride_xi, values_ptr, positions_ptr, in_map_ptr, tokens, t_mask,
               z_rows, z_mask, in_features, NNZ: tl.constexpr, KEPT: tl.constexpr, GROUP: tl.constexpr,
               HAS_IN_MAP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr):
    """N:M: ``[BLOCK_T, BLOCK_O]`` of z, a gather-dot per row over its kept positions, read
    in the structure's own ``[out, groups, kept]`` form."""
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for slot in range(NNZ):
        cols = (slot // KEPT) * GROUP + tl.load(positions_ptr + z_rows * NNZ + slot, mask=z_mask, other=0)
        v = tl.load(values_ptr + z_rows * NNZ + slot, mask=z_mask, other=0.0).to(tl.float32)
        x = load_x(x_ptr, stride_xt, stride_xi, tokens, t_mask, cols, z_mask, in_features, in_map_ptr, HAS_IN_MAP)
        acc += x.to(tl.float32) * v[None, :]
    return acc


@triton.jit
def diag_forward(x_ptr, stride_xt, stride_xi, values_ptr, offsets_ptr, in_map_ptr, tokens, t_mask,
                 z_rows, z_mask, N_DIAG: tl.constexpr, LENGTH: tl.constexpr, OUT: tl.constexpr,
                 IN: tl.constexpr, HAS_IN_MAP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr):
    """Diagonals: ``[BLOCK_T, BLOCK_O]`` of z. Entry j of diagonal k sits at
    ``(j % OUT, (j + offsets[k]) % IN)``, so row i holds j = i + t*OUT for t below LENGTH/OUT."""
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for k in range(N_DIAG):
        offset = tl.load(offsets_ptr + k)
        for repeat in range(LENGTH // OUT):
            j = z_rows + repeat * OUT
            cols = (j + offset) % IN
            v = tl.load(values_ptr + k * LENGTH + j, mask=z_mask, other=0.0).to(tl.float32)
            x = load_x(x_ptr, stride_xt, stride_xi, tokens, t_mask, cols, z_mask, IN, in_map_ptr, HAS_IN_MAP)
            acc += x.to(tl.float32) * v[None, :]
    return acc


@triton.jit
def bias_and_columns(acc, bias_ptr, out_pos_ptr, z_rows, z_mask, out_features, HAS_BIAS: tl.constexpr,
                     HAS_OUT_POS: tl.constexpr):
    """The accumulator with the bias added, the output column of each z row (its position
    through out_index: each row is stored straight to its permuted column) and which of
    those columns may be stored."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + z_rows, mask=z_mask, other=0.0).to(tl.float32)[None, :]
    out_cols = z_rows
    if HAS_OUT_POS:
        out_cols = tl.load(out_pos_ptr + z_rows, mask=z_mask, other=0)
    return acc, out_cols, z_mask & inside(out_cols, out_features)
