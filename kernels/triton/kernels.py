"""Triton kernels for the structured linear ops (design section 4) and their launchers.

The launchers take the same flattened ``[tokens, features]`` arguments as the functions
in :mod:`..implementations`, so the op definition can swap one set for the other. Both permutations
are fused into the kernels: ``in_index`` is an indexed load of ``x`` (and an indexed
store of ``dx``), ``out_index`` an indexed store of ``y`` through its inverse (and an
indexed load of the incoming gradient). Every kernel accumulates in fp32 and writes each
output element exactly once: the input gradient reads the transposed structure, built
on the host by one sort, so no kernel needs atomics. The forward kernels run the bodies
of :mod:`.bodies`, which the Inductor templates of the same forwards run too.

The kernels are plain ``@triton.jit`` functions: with ``TRITON_INTERPRET=1`` set before
this module is imported they run on CPU tensors.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl

from padst_compiler.kernels import implementations, result_buffers
from padst_compiler.kernels.permutation import inverse_permutation
from padst_compiler.kernels.triton import bodies
from padst_compiler.kernels.triton.bodies import inside, matmul_acc

# The interpreter runs the kernels in Python: one configuration keeps it fast and skips
# benchmarking, which needs a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

# Token rows one program of a values-gradient kernel reduces over; longer inputs are
# split across programs whose fp32 partial sums are added on the host.
TOKENS_PER_SPLIT = 64 if INTERPRETED else 4096


def _autotune(configs, key):
    return triton.autotune(configs[:1] if INTERPRETED else configs, key=key)


def _configs(tiles):
    """``triton.Config`` objects of tile dicts (meta-parameters and ``num_warps``)."""
    return [triton.Config({k: v for k, v in tile.items() if k != "num_warps"}, num_warps=tile["num_warps"])
            for tile in tiles]


def _token_tiles(*block_tokens):
    return tuple({"BLOCK_T": t, "num_warps": w} for t in block_tokens for w in (4, 8))


# Tiles of the forward kernels. The Inductor templates of the same forwards
# (kernels/inductor/lowering.py) offer the autotuner these very tiles.
BLOCK_FORWARD_TILES = _token_tiles(16, 32, 64, 128)
ROWS_FORWARD_TILES = tuple({"BLOCK_T": t, "BLOCK_O": o, "num_warps": 4} for t in (16, 64) for o in (32, 64))


# ------------------------------------------------------------------ launching

_tracing = threading.local()


@contextlib.contextmanager
def traceable_launches():
    """Launch through ``torch.library.wrap_triton`` so a graph being traced records the
    kernels; eager launches skip that wrapper, which costs a dispatch per call."""
    previous = getattr(_tracing, "on", False)
    _tracing.on = True
    try:
        yield
    finally:
        _tracing.on = previous


def _launch(kernel, grid):
    if getattr(_tracing, "on", False):
        kernel = torch.library.wrap_triton(kernel)
    return kernel[grid]


def _index_maps(in_index, out_index, fallback):
    """Kernel arguments for the two permutations: the input feature each z-input column
    reads and the output column each z row lands in (``inverse(out_index)``). An absent
    permutation is passed as ``fallback``, a tensor the kernel never reads."""
    in_map = fallback if in_index is None else in_index
    out_pos = fallback if out_index is None else inverse_permutation(out_index)
    return in_map, out_pos, in_index is not None, out_index is not None


def _output(like, rows, cols, scatter):
    """The result a kernel writes, its columns scattered through ``scatter`` (a forward's
    out_index, an input gradient's in_index) when given. A repeated or out-of-range entry
    there leaves columns unwritten, so the result then starts zeroed (wrong numbers, never
    stale memory), as the native kernels' ``output_buffer`` does. Inside
    ``result_buffers.planned`` it is the caller's buffer where that fits."""
    return result_buffers.new_result(like, rows, cols, zeroed=scatter is not None)


def dot_precision(dtype):
    """fp32 inputs multiply in full precision, like torch's default matmul."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _store_z(acc, bias_ptr, out_pos_ptr, y_ptr, tokens, t_mask, z_rows, z_mask, out_features,
             HAS_BIAS: tl.constexpr, HAS_OUT_POS: tl.constexpr):
    """Stores a forward's z tile (bias added) to its output columns: every launcher forward ends so."""
    acc, out_cols, out_ok = bodies.bias_and_columns(acc, bias_ptr, out_pos_ptr, z_rows, z_mask, out_features,
                                                    HAS_BIAS, HAS_OUT_POS)
    tl.store(y_ptr + tokens[:, None] * out_features + out_cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=t_mask[:, None] & out_ok[None, :])


# ----------------------------------------------------------------------- block


def block_tile(block_rows, block_cols):
    """Padded tile sizes (powers of two) and whether tl.dot runs on them."""
    use_dot = max(block_rows, block_cols) >= 16
    floor = 16 if use_dot else 1
    pad = lambda n: max(floor, triton.next_power_of_2(n))  # noqa: E731
    return dict(ROWS=block_rows, COLS=block_cols, ROWS_PAD=pad(block_rows), COLS_PAD=pad(block_cols),
                USE_DOT=use_dot)


@_autotune(_configs(BLOCK_FORWARD_TILES), key=["n_tokens", "kept", "ROWS", "COLS"])
@triton.jit
def _block_forward_kernel(x_ptr, values_ptr, col_blocks_ptr, bias_ptr, in_map_ptr, out_pos_ptr, y_ptr,
                          n_tokens, in_features, out_features, kept,
                          ROWS: tl.constexpr, COLS: tl.constexpr, ROWS_PAD: tl.constexpr,
                          COLS_PAD: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_IN_MAP: tl.constexpr, HAS_OUT_POS: tl.constexpr,
                          BLOCK_T: tl.constexpr):
    """One program: a tile of tokens times one block-row of the output."""
    block_row = tl.program_id(1)
    tokens, t_mask = bodies.token_tile(BLOCK_T, n_tokens)
    acc = bodies.block_forward(x_ptr, in_features, 1, values_ptr, col_blocks_ptr, in_map_ptr, tokens, t_mask,
                               block_row, in_features, kept, ROWS, COLS, ROWS_PAD, COLS_PAD, USE_DOT,
                               DOT_PRECISION, HAS_IN_MAP, BLOCK_T)
    r = tl.arange(0, ROWS_PAD)
    _store_z(acc, bias_ptr, out_pos_ptr, y_ptr, tokens, t_mask, block_row * ROWS + r, r < ROWS, out_features,
             HAS_BIAS, HAS_OUT_POS)


@_autotune(_configs(_token_tiles(16, 32, 64, 128)), key=["n_tokens", "ROWS", "COLS"])
@triton.jit
def _block_grad_input_kernel(grad_ptr, values_ptr, starts_ptr, counts_ptr, block_rows_ptr, kept_blocks_ptr,
                             in_map_ptr, out_pos_ptr, dx_ptr, n_tokens, in_features, out_features,
                             ROWS: tl.constexpr, COLS: tl.constexpr, ROWS_PAD: tl.constexpr,
                             COLS_PAD: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             HAS_IN_MAP: tl.constexpr, HAS_OUT_POS: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program: a tile of tokens times one input column block, summing over the kept
    blocks that read it (the transposed structure, so each dx element is written once)."""
    col_block = tl.program_id(1)
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    r = tl.arange(0, ROWS_PAD)
    c = tl.arange(0, COLS_PAD)
    t_mask, r_mask, c_mask = tokens < n_tokens, r < ROWS, c < COLS
    start = tl.load(starts_ptr + col_block)
    acc = tl.zeros((BLOCK_T, COLS_PAD), dtype=tl.float32)
    for entry in range(start, start + tl.load(counts_ptr + col_block)):
        kept_block = tl.load(kept_blocks_ptr + entry)
        grad_cols = tl.load(block_rows_ptr + entry) * ROWS + r
        if HAS_OUT_POS:
            grad_cols = tl.load(out_pos_ptr + grad_cols, mask=r_mask, other=0)
        g = tl.load(grad_ptr + tokens[:, None] * out_features + grad_cols[None, :],
                    mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        w = tl.load(values_ptr + (kept_block * ROWS + r[:, None]) * COLS + c[None, :],
                    mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        acc = matmul_acc(acc, g, w, USE_DOT, DOT_PRECISION)
    cols = col_block * COLS + c
    cols_ok = c_mask
    if HAS_IN_MAP:
        cols = tl.load(in_map_ptr + cols, mask=c_mask, other=0)
        cols_ok = cols_ok & inside(cols, in_features)
    tl.store(dx_ptr + tokens[:, None] * in_features + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=t_mask[:, None] & cols_ok[None, :])


@_autotune(_configs(_token_tiles(16, 32, 64)), key=["n_tokens", "ROWS", "COLS"])
@triton.jit
def _block_grad_values_kernel(grad_ptr, x_ptr, col_blocks_ptr, in_map_ptr, out_pos_ptr, partial_ptr,
                              n_tokens, in_features, out_features, kept, n_kept_blocks, tokens_per_split,
                              ROWS: tl.constexpr, COLS: tl.constexpr, ROWS_PAD: tl.constexpr,
                              COLS_PAD: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                              HAS_IN_MAP: tl.constexpr, HAS_OUT_POS: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program: one kept block over one split of the tokens (SDDMM: only kept blocks)."""
    kept_block = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.arange(0, ROWS_PAD)
    c = tl.arange(0, COLS_PAD)
    r_mask, c_mask = r < ROWS, c < COLS
    grad_cols = (kept_block // kept) * ROWS + r
    if HAS_OUT_POS:
        grad_cols = tl.load(out_pos_ptr + grad_cols, mask=r_mask, other=0)
    x_cols = tl.load(col_blocks_ptr + kept_block) * COLS + c
    x_ok = c_mask & inside(x_cols, in_features)
    if HAS_IN_MAP:
        x_cols = tl.load(in_map_ptr + x_cols, mask=x_ok, other=0)
        x_ok = x_ok & inside(x_cols, in_features)
    first = split * tokens_per_split
    end = tl.minimum(first + tokens_per_split, n_tokens)
    acc = tl.zeros((ROWS_PAD, COLS_PAD), dtype=tl.float32)
    for t0 in range(first, end, BLOCK_T):
        tokens = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = tokens < end
        g_t = tl.load(grad_ptr + tokens[None, :] * out_features + grad_cols[:, None],
                      mask=r_mask[:, None] & t_mask[None, :], other=0.0)
        x = tl.load(x_ptr + tokens[:, None] * in_features + x_cols[None, :],
                    mask=t_mask[:, None] & x_ok[None, :], other=0.0)
        acc = matmul_acc(acc, g_t, x, USE_DOT, DOT_PRECISION)
    out = partial_ptr + ((split * n_kept_blocks + kept_block) * ROWS + r[:, None]) * COLS + c[None, :]
    tl.store(out, acc, mask=r_mask[:, None] & c_mask[None, :])


def block_forward(x, values, col_blocks, out_features, bias, in_index, out_index):
    x, values = x.contiguous(), values.contiguous()
    n_rows, kept, block_rows, block_cols = values.shape
    n_tokens, in_features = x.shape
    y = _output(x, n_tokens, out_features, out_index)
    in_map, out_pos, has_in, has_out = _index_maps(in_index, out_index, col_blocks)
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_T"]), n_rows)  # noqa: E731
    _launch(_block_forward_kernel, grid)(
        x, values, col_blocks, values if bias is None else bias, in_map, out_pos, y,
        n_tokens, in_features, out_features, kept, **block_tile(block_rows, block_cols),
        DOT_PRECISION=dot_precision(x.dtype), HAS_BIAS=bias is not None, HAS_IN_MAP=has_in, HAS_OUT_POS=has_out)
    return y


def block_grad_input(grad, values, col_blocks, in_features, in_index, out_index):
    grad, values = grad.contiguous(), values.contiguous()
    n_rows, kept, block_rows, block_cols = values.shape
    n_tokens, out_features = grad.shape
    kept_ids = torch.arange(n_rows * kept, device=col_blocks.device).view(n_rows, kept)
    readers = implementations.transpose_rows(col_blocks, kept_ids, in_features // block_cols)
    dx = _output(grad, n_tokens, in_features, in_index)
    in_map, out_pos, has_in, has_out = _index_maps(in_index, out_index, col_blocks)
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_T"]), in_features // block_cols)  # noqa: E731
    _launch(_block_grad_input_kernel, grid)(
        grad, values, readers.starts, readers.counts, readers.rows, readers.values, in_map, out_pos, dx,
        n_tokens, in_features, out_features, **block_tile(block_rows, block_cols),
        DOT_PRECISION=dot_precision(grad.dtype), HAS_IN_MAP=has_in, HAS_OUT_POS=has_out)
    return dx


def block_grad_values(grad, x, values, col_blocks, in_index, out_index):
    grad, x = grad.contiguous(), x.contiguous()
    n_rows, kept, block_rows, block_cols = values.shape
    n_tokens, in_features = x.shape
    n_splits = max(1, triton.cdiv(n_tokens, TOKENS_PER_SPLIT))
    partial = torch.empty(n_splits, *values.shape, device=x.device, dtype=torch.float32)
    in_map, out_pos, has_in, has_out = _index_maps(in_index, out_index, col_blocks)
    _launch(_block_grad_values_kernel, (n_rows * kept, n_splits))(
        grad, x, col_blocks, in_map, out_pos, partial,
        n_tokens, in_features, grad.shape[1], kept, n_rows * kept, TOKENS_PER_SPLIT,
        **block_tile(block_rows, block_cols),
        DOT_PRECISION=dot_precision(x.dtype), HAS_IN_MAP=has_in, HAS_OUT_POS=has_out)
    return partial.sum(0).to(values.dtype)


# ------------------------------------------------------------------ row-sparse
#
# A tile of z rows per program. The N:M and diagonal forwards read the structures' own
# compressed forms (the bodies the Inductor templates share); their gradients run the
# row-sparse (ELL) kernels on the row layouts of implementations.py.


@_autotune(_configs(ROWS_FORWARD_TILES), key=["n_tokens", "out_features", "NNZ"])
@triton.jit
def _nm_forward_kernel(x_ptr, values_ptr, positions_ptr, bias_ptr, in_map_ptr, out_pos_ptr, y_ptr,
                       n_tokens, in_features, out_features, NNZ: tl.constexpr, KEPT: tl.constexpr,
                       GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IN_MAP: tl.constexpr,
                       HAS_OUT_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr):
    """One program: a tile of tokens times a tile of output rows."""
    tokens, t_mask = bodies.token_tile(BLOCK_T, n_tokens)
    z_rows = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    z_mask = z_rows < out_features
    acc = bodies.nm_forward(x_ptr, in_features, 1, values_ptr, positions_ptr, in_map_ptr, tokens, t_mask,
                            z_rows, z_mask, in_features, NNZ, KEPT, GROUP, HAS_IN_MAP, BLOCK_T, BLOCK_O)
    _store_z(acc, bias_ptr, out_pos_ptr, y_ptr, tokens, t_mask, z_rows, z_mask, out_features, HAS_BIAS, HAS_OUT_POS)


@_autotune(_configs(ROWS_FORWARD_TILES), key=["n_tokens", "OUT", "IN", "N_DIAG"])
@triton.jit
def _diag_forward_kernel(x_ptr, values_ptr, offsets_ptr, bias_ptr, in_map_ptr, out_pos_ptr, y_ptr,
                         n_tokens, N_DIAG: tl.constexpr, LENGTH: tl.constexpr, OUT: tl.constexpr,
                         IN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IN_MAP: tl.constexpr,
                         HAS_OUT_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr):
    """One program: a tile of tokens times a tile of output rows."""
    tokens, t_mask = bodies.token_tile(BLOCK_T, n_tokens)
    z_rows = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    z_mask = z_rows < OUT
    acc = bodies.diag_forward(x_ptr, IN, 1, values_ptr, offsets_ptr, in_map_ptr, tokens, t_mask, z_rows, z_mask,
                              N_DIAG, LENGTH, OUT, IN, HAS_IN_MAP, BLOCK_T, BLOCK_O)
    _store_z(acc, bias_ptr, out_pos_ptr, y_ptr, tokens, t_mask, z_rows, z_mask, OUT, HAS_BIAS, HAS_OUT_POS)


@_autotune([triton.Config({"BLOCK_T": t, "BLOCK_I": i}, num_warps=4) for t in (16, 64) for i in (32, 64)],
           key=["n_tokens", "in_features", "out_features"])
@triton.jit
def _ell_grad_input_kernel(grad_ptr, starts_ptr, counts_ptr, rows_ptr, vals_ptr, in_map_ptr, out_pos_ptr,
                           dx_ptr, n_tokens, in_features, out_features,
                           HAS_IN_MAP: tl.constexpr, HAS_OUT_POS: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    """One program: a tile of tokens times a tile of input columns, each summing over the
    rows that read it (compressed-sparse-column form; counts differ between columns)."""
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    t_mask, c_mask = tokens < n_tokens, cols < in_features
    starts = tl.load(starts_ptr + cols, mask=c_mask, other=0)
    counts = tl.load(counts_ptr + cols, mask=c_mask, other=0)
    acc = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    for step in range(tl.max(counts, axis=0)):
        e_mask = step < counts
        grad_cols = tl.load(rows_ptr + starts + step, mask=e_mask, other=0)
        if HAS_OUT_POS:
            grad_cols = tl.load(out_pos_ptr + grad_cols, mask=e_mask, other=0)
        w = tl.load(vals_ptr + starts + step, mask=e_mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + tokens[:, None] * out_features + grad_cols[None, :],
                    mask=t_mask[:, None] & e_mask[None, :], other=0.0)
        acc += g.to(tl.float32) * w[None, :]
    dst = cols
    dst_ok = c_mask
    if HAS_IN_MAP:
        dst = tl.load(in_map_ptr + cols, mask=c_mask, other=0)
        dst_ok = dst_ok & inside(dst, in_features)
    tl.store(dx_ptr + tokens[:, None] * in_features + dst[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=t_mask[:, None] & dst_ok[None, :])


@_autotune([triton.Config({"BLOCK_T": t, "BLOCK_E": e}, num_warps=4) for t in (16, 32) for e in (64, 128)],
           key=["n_tokens", "n_entries"])
@triton.jit
def _ell_grad_values_kernel(grad_ptr, x_ptr, cols_ptr, in_map_ptr, out_pos_ptr, partial_ptr,
                            n_tokens, in_features, out_features, nnz, n_entries, tokens_per_split,
                            HAS_IN_MAP: tl.constexpr, HAS_OUT_POS: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """One program: a tile of kept entries over one split of the tokens (SDDMM)."""
    entries = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(1)
    e_mask = entries < n_entries
    grad_cols = entries // nnz
    if HAS_OUT_POS:
        grad_cols = tl.load(out_pos_ptr + grad_cols, mask=e_mask, other=0)
    x_cols = tl.load(cols_ptr + entries, mask=e_mask, other=0)
    x_ok = e_mask & inside(x_cols, in_features)
    if HAS_IN_MAP:
        x_cols = tl.load(in_map_ptr + x_cols, mask=x_ok, other=0)
        x_ok = x_ok & inside(x_cols, in_features)
    first = split * tokens_per_split
    end = tl.minimum(first + tokens_per_split, n_tokens)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for t0 in range(first, end, BLOCK_T):
        tokens = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        mask = (tokens < end)[:, None] & e_mask[None, :]
        g = tl.load(grad_ptr + tokens[:, None] * out_features + grad_cols[None, :], mask=mask, other=0.0)
        x = tl.load(x_ptr + tokens[:, None] * in_features + x_cols[None, :], mask=mask & x_ok[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32) * x.to(tl.float32), axis=0)
    tl.store(partial_ptr + split * n_entries + entries, acc, mask=e_mask)


def ell_grad_input(grad, cols, vals, in_features, in_index, out_index):
    grad = grad.contiguous()
    n_tokens, out_features = grad.shape
    readers = implementations.transpose_rows(cols, vals, in_features)
    dx = _output(grad, n_tokens, in_features, in_index)
    in_map, out_pos, has_in, has_out = _index_maps(in_index, out_index, cols)
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_T"]), triton.cdiv(in_features, meta["BLOCK_I"]))  # noqa: E731
    _launch(_ell_grad_input_kernel, grid)(
        grad, readers.starts, readers.counts, readers.rows, readers.values, in_map, out_pos, dx,
        n_tokens, in_features, out_features, HAS_IN_MAP=has_in, HAS_OUT_POS=has_out)
    return dx


def ell_grad_values(grad, x, cols, in_index, out_index):
    grad, x, cols = grad.contiguous(), x.contiguous(), cols.contiguous()
    n_tokens, in_features = x.shape
    n_splits = max(1, triton.cdiv(n_tokens, TOKENS_PER_SPLIT))
    partial = torch.empty(n_splits, *cols.shape, device=x.device, dtype=torch.float32)
    in_map, out_pos, has_in, has_out = _index_maps(in_index, out_index, cols)
    grid = lambda meta: (triton.cdiv(cols.numel(), meta["BLOCK_E"]), n_splits)  # noqa: E731
    _launch(_ell_grad_values_kernel, grid)(
        grad, x, cols, in_map, out_pos, partial,
        n_tokens, in_features, grad.shape[1], cols.shape[1], cols.numel(), TOKENS_PER_SPLIT,
        HAS_IN_MAP=has_in, HAS_OUT_POS=has_out)
    return partial.sum(0).to(x.dtype)


# ------------------------------------------------------------ N:M and diagonal


def _rows_forward(kernel, x, values, index, out_features, bias, in_index, out_index, shape: dict):
    """Launches an N:M or diagonal forward kernel (a tile of z rows per program) with the
    kernel's ``shape`` arguments."""
    x, values, index = x.contiguous(), values.contiguous(), index.contiguous()
    n_tokens = x.shape[0]
    y = _output(x, n_tokens, out_features, out_index)
    in_map, out_pos, has_in, has_out = _index_maps(in_index, out_index, index)
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_T"]), triton.cdiv(out_features, meta["BLOCK_O"]))  # noqa: E731
    _launch(kernel, grid)(x, values, index, values if bias is None else bias, in_map, out_pos, y, n_tokens, **shape,
                          HAS_BIAS=bias is not None, HAS_IN_MAP=has_in, HAS_OUT_POS=has_out)
    return y


def nm_forward(x, values, positions, out_features, bias, in_index, out_index):
    _, groups, kept = positions.shape
    in_features = x.shape[1]
    return _rows_forward(_nm_forward_kernel, x, values, positions, out_features, bias, in_index, out_index,
                         dict(in_features=in_features, out_features=out_features, NNZ=groups * kept, KEPT=kept,
                              GROUP=in_features // groups))


def nm_grad_input(grad, values, positions, in_features, in_index, out_index):
    return ell_grad_input(grad, *implementations.nm_to_rows(values, positions, in_features), in_features, in_index, out_index)


def nm_grad_values(grad, x, values, positions, in_index, out_index):
    return ell_grad_values(grad, x, implementations.nm_columns(positions, x.shape[1]), in_index, out_index)


def diag_forward(x, values, offsets, out_features, bias, in_index, out_index):
    n_diag, length = values.shape
    return _rows_forward(_diag_forward_kernel, x, values, offsets, out_features, bias, in_index, out_index,
                         dict(N_DIAG=n_diag, LENGTH=length, OUT=out_features, IN=x.shape[1]))


def diag_grad_input(grad, values, offsets, in_features, in_index, out_index):
    cols, vals = implementations.diagonal_to_rows(values, offsets, grad.shape[1], in_features)
    return ell_grad_input(grad, cols, vals, in_features, in_index, out_index)


def diag_grad_values(grad, x, values, offsets, in_index, out_index):
    cols = implementations.diagonal_columns(offsets, grad.shape[1], x.shape[1])
    row_grads = ell_grad_values(grad, x, cols, in_index, out_index)
    return implementations.diagonal_values_from_rows(row_grads, values.shape[0], grad.shape[1])
