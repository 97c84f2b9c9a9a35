// Native CPU kernels for the structured linear ops (fp32), built on first use by
// kernels/native.py with the system compiler and loaded with ctypes.
//
// Two kernel families cover the three structures, forward and backward:
//
//   block_mm     z[t, o*W:(o+1)*W] = bias + sum_e x[t, icol(e, :)] @ panel(e), y[t, f] = z[t, omap(f)]
//                Block-sparse times dense: output block o (width W) sums a variable
//                list of entries e, each a (D x W) weight panel reading D input columns
//                (entries may share panels through panel_of, so nothing is gathered).
//                Forward (entries = kept blocks of a block-row, panels = W^T) and grad of
//                input (entries = the blocks of a block-column, panels = W) are both this.
//                Column maps fuse in_index / out_index: the input side is read one scalar
//                at a time (broadcast), so an indexed load costs nothing extra.
//   block_sddmm  dv[e] = dz[:, rows(e)]^T @ x[:, icol(e, :)], summed over all tokens; with an
//                out_index or in_index each tile of tokens of dz or x is packed in map order
//                first (no extra pass over memory).
//   ell_mm       Row-sparse (constant or variable row length) times dense, with tokens
//                as vector lanes; used by N:M and diagonal weights.
//   ell_sddmm    dv[e] = sum_t dz[t, row(e)] * x[t, col(e)].
//
// All loops are written with GCC vector extensions so that the same source gives AVX-512
// code on AVX-512 machines and AVX2 code elsewhere (-march=native). Threads come from
// OpenMP, which resolves to the libgomp torch has already loaded.
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));

// Register tiles are sized to the register file: 32 vector registers on AVX-512, 16 on AVX2.
// A tile sized for AVX-512 compiled for AVX2 becomes twice as many 256-bit registers and
// spills (a 64-wide block forward ran 2.5x slower than with AVX2-sized tiles).
#if defined(__AVX512F__)
constexpr bool WIDE_REGISTERS = true;
#else
constexpr bool WIDE_REGISTERS = false;
#endif

// The register width the kernels were built for (what a benchmark or test reports).
extern "C" int padst_vector_bits() { return WIDE_REGISTERS ? 512 : 256; }

// Unaligned vector access (memcpy compiles to one vmovups; the pointers are only float-aligned).
template <typename V>
static inline V load(const float* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V>
static inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
// A broadcast: s - 0 is s for every s (s + 0 is not, for s = -0), so this folds to one
// vbroadcastss where V{} + s would keep a real add.
template <typename V>
static inline V splat(float s) { return s - V{}; }

// Per-thread working memory that outlives a call. Buffers above glibc's mmap threshold
// (128 KiB) would otherwise be mapped afresh and page-faulted in on every call, which costs
// more than a small call's arithmetic. Not zeroed. A thread's slots are distinct buffers;
// each grows to the largest call it served and is kept (a few MiB for GPT-2-sized layers,
// besides the block values gradient's packed copy of x or of the gradient through a
// permutation: 12 MiB for 4096 tokens of 768 features, 48 MiB for 3072).
enum Slot { SHARED, ROWS, TILE, OUTPUT, SLOTS };
static float* buffer(Slot slot, size_t count) {
    thread_local std::vector<float> buffers[SLOTS];
    std::vector<float>& b = buffers[slot];
    if (b.size() < count) b.resize(count);
    return b.data();
}

// out[f] = row[map[f]] for f < width, with the row in L1: stores front to back, and on AVX-512
// 16-lane gathers (AVX2 builds keep the scalar loop, as AVX2 gathers were not measured). This
// is how every kernel applies an output map (a forward's out_index, a block input gradient's
// inverse in_index) to rows of z: the scalar scatter y[inverse(map)[j]] = z[j] they used made
// a 4096-token Block(32x32) input gradient through in_index 1.19-1.72x as slow as without
// (768 -> 2304, 768 -> 768, 768 -> 3072), against 1.02-1.23x with the gather. It also writes
// every column of out whatever the map holds, so no result needs zeroing first.
static void gather_row(const float* row, const int32_t* map, int64_t width, float* out) {
    int64_t f = 0;
#if defined(__AVX512F__)
    for (; f + 16 <= width; f += 16)
        _mm512_storeu_ps(out + f, _mm512_i32gather_ps(_mm512_loadu_si512(map + f), row, 4));
#endif
    for (; f < width; ++f) out[f] = row[map[f]];
}

// Threads that split the output columns of the same rows of y, through an output map,
// would store into each other's cache lines on every row: both cores then fight over them
// (a 16-token call of a 256-wide layer took 2-2.5x as long as without the map). Such
// kernels write z, the rows in their own column order, and then gather whole rows, each
// thread its own tokens. Called inside a parallel region, after the barrier that completes z.
static void gather_rows(const float* z, int64_t width, float* y, int64_t ys, int64_t tokens, const int32_t* map) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t) gather_row(z + t * width, map, width, y + t * ys);
}

// Asks the kernel to back [p, p + bytes) with transparent huge pages (where the system
// leaves THP to madvise). A result above the C library's mmap threshold is a fresh mapping
// on every call, and a kernel writing it takes a page fault every 4 KiB: for a
// 4096 x 3072 fp32 result that was about 40 % of a Block(32x32) forward. Called before the
// first write; the whole pages inside the range only. Returns madvise's result (0: done).
extern "C" int padst_advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    const uintptr_t start = ((uintptr_t)p + page - 1) / page * page, end = ((uintptr_t)p + bytes) / page * page;
    return end > start ? madvise((void*)start, end - start, MADV_HUGEPAGE) : 0;
#else
    (void)p; (void)bytes;
    return -1;
#endif
}

// ------------------------------------------------------------------------- block_mm

struct BlockMM {
    const float* x; int64_t x_stride;
    float* y; int64_t y_stride;
    int64_t width;             // W: output block width, a multiple of the vector width
    const int64_t* entry_ptr;  // [blocks + 1]: entries of output block o are entry_ptr[o]..entry_ptr[o+1]
    const int64_t* icol;       // [E, depth]: input column read by each panel row
    int64_t depth;             // D
    const float* panels;       // [P, D, W]
    const int64_t* panel_of;   // [E]: panel of each entry, or null (entry e uses panel e)
    const float* bias;         // [blocks * W] or null
    const int32_t* omap;       // [blocks * W] z column of each y column, or null (y is z)
};

// MR tokens by NV vectors of one output block, from its column c0: MR*NV accumulators stay
// in registers. The tokens' rows of x start at xrow, a.x_stride apart; they are rows t0.. of y.
template <typename V, int NV, int MR>
static void block_mm_tile(const BlockMM& a, const float* xrow, int64_t t0, int64_t o, int64_t c0) {
    constexpr int L = sizeof(V) / sizeof(float);
    V acc[MR][NV];
    for (int v = 0; v < NV; ++v) {
        V b = a.bias ? load<V>(a.bias + o * a.width + c0 + v * L) : V{};
        for (int m = 0; m < MR; ++m) acc[m][v] = b;
    }
    for (int64_t e = a.entry_ptr[o]; e < a.entry_ptr[o + 1]; ++e) {
        const int64_t* cols = a.icol + e * a.depth;
        const float* panel = a.panels + (a.panel_of ? a.panel_of[e] : e) * a.depth * a.width + c0;
        for (int64_t d = 0; d < a.depth; ++d) {
            V w[NV];
            for (int v = 0; v < NV; ++v) w[v] = load<V>(panel + d * a.width + v * L);
            const float* xc = xrow + cols[d];
            for (int m = 0; m < MR; ++m) {
                V s = splat<V>(xc[m * a.x_stride]);
                for (int v = 0; v < NV; ++v) acc[m][v] += s * w[v];
            }
        }
    }
    for (int m = 0; m < MR; ++m) {
        float* yrow = a.y + (t0 + m) * a.y_stride;
        for (int v = 0; v < NV; ++v) store<V>(yrow + o * a.width + c0 + v * L, acc[m][v]);
    }
}

// row[in_map[f]] for f < in_features into out. The row is first copied front to back, which
// the hardware prefetcher streams, instead of being read in map order, one cache miss at a
// time; the copy, in L1, is then gathered (a 3072 -> 768 Block(32x32) forward through
// in_index at 4096 tokens: 12.7 -> 10.3 ms with AVX-512 gathers).
static void pack_row(const float* row, const int32_t* in_map, int64_t in_features, float* scratch, float* out) {
    std::memcpy(scratch, row, sizeof(float) * in_features);
    gather_row(scratch, in_map, in_features, out);
}

// Each work item is MR tokens across every output block, so each thread writes whole rows
// of y front to back (the x rows of the item stay in L1, the panels stream from L2). With
// few tokens the output blocks are split across threads too. An input map (in_index) is
// applied by packing rows of x in map order into a buffer that the tiles then read like an
// unpermuted x (read through the map directly, every column of a panel would be a
// different cache line of every row): per item when items are whole rows of y, once for
// all tokens when the blocks are split (few tokens; with an out_index their tiles then
// write z, and rows of y are gathered from it, see gather_rows).
template <typename V, int NV, int MR>
static void block_mm_run(const BlockMM& a, int64_t tokens, int64_t blocks, const int32_t* in_map,
                         int64_t in_features) {
    if (blocks == 0) return;
    const int64_t groups = (tokens + MR - 1) / MR;
    const int64_t splits = groups >= 4 * omp_get_max_threads() ? 1 : blocks;
    const int64_t per_split = (blocks + splits - 1) / splits;
    const bool pack_all = in_map && splits > 1, pack_items = in_map && splits == 1;
    float* all = pack_all ? buffer(SHARED, tokens * in_features) : nullptr;
    const bool gather_after = a.omap && splits > 1, gather_items = a.omap && splits == 1;
    const int64_t z_width = blocks * a.width;
    float* z = gather_after ? buffer(OUTPUT, tokens * z_width) : nullptr;
#pragma omp parallel
    {
        float* scratch = in_map ? buffer(ROWS, in_features) : nullptr;
        if (pack_all) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tokens; ++t)
                pack_row(a.x + t * a.x_stride, in_map, in_features, scratch, all + t * in_features);
        }
        float* packed = pack_items ? buffer(TILE, MR * in_features) : nullptr;
        float* z_item = gather_items ? buffer(OUTPUT, MR * z_width) : nullptr;
        BlockMM item = a;
        if (in_map) item.x_stride = in_features;
        if (gather_after || gather_items) {
            item.y = gather_after ? z : z_item;
            item.y_stride = z_width;
            item.omap = nullptr;
        }
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t g = 0; g < groups; ++g) {
            for (int64_t part = 0; part < splits; ++part) {
                const int64_t t0 = g * MR, o1 = std::min(blocks, (part + 1) * per_split);
                const int64_t count = std::min<int64_t>(MR, tokens - t0);
                const float* rows = pack_all ? all + t0 * in_features : a.x + t0 * a.x_stride;
                if (pack_items) {
                    for (int64_t m = 0; m < count; ++m)
                        pack_row(a.x + (t0 + m) * a.x_stride, in_map, in_features, scratch, packed + m * in_features);
                    rows = packed;
                }
                const int64_t z0 = gather_items ? 0 : t0;  // the item's first row in item.y
                for (int64_t o = part * per_split; o < o1; ++o)
                    for (int64_t c0 = 0; c0 < a.width; c0 += NV * (int64_t)(sizeof(V) / sizeof(float))) {
                        if (count == MR)
                            block_mm_tile<V, NV, MR>(item, rows, z0, o, c0);
                        else
                            for (int64_t m = 0; m < count; ++m)
                                block_mm_tile<V, NV, 1>(item, rows + m * item.x_stride, z0 + m, o, c0);
                    }
                if (gather_items)
                    for (int64_t m = 0; m < count; ++m)
                        gather_row(z_item + m * z_width, a.omap, z_width, a.y + (t0 + m) * a.y_stride);
            }
        }
        if (gather_after) gather_rows(z, z_width, a.y, a.y_stride, tokens, a.omap);
    }
}

extern "C" int padst_block_mm(const float* x, int64_t x_stride, float* y, int64_t y_stride, int64_t tokens,
                              int64_t blocks, int64_t width, const int64_t* entry_ptr, const int64_t* icol,
                              int64_t depth, const float* panels, const int64_t* panel_of, const float* bias,
                              const int32_t* out_map, const int32_t* in_map, int64_t in_features) {
    BlockMM a{x, x_stride, y, y_stride, width, entry_ptr, icol, depth, panels, panel_of, bias, out_map};
    if (width != 8 && width != 16 && width != 32 && width != 48 && width != 64)
        return 1;  // unsupported width: the caller uses the PyTorch path
    if (width == 8)
        block_mm_run<v8, 1, 12>(a, tokens, blocks, in_map, in_features);
    else if (!WIDE_REGISTERS)  // 16 columns at a time: 12 accumulators, 2 weights and a broadcast
        block_mm_run<v8, 2, 6>(a, tokens, blocks, in_map, in_features);
    else if (width == 16)
        block_mm_run<v16, 1, 14>(a, tokens, blocks, in_map, in_features);
    else if (width == 32)
        block_mm_run<v16, 2, 12>(a, tokens, blocks, in_map, in_features);
    else if (width == 48)
        block_mm_run<v16, 3, 8>(a, tokens, blocks, in_map, in_features);
    else
        block_mm_run<v16, 4, 6>(a, tokens, blocks, in_map, in_features);
    return 0;
}

// ---------------------------------------------------------------------- block_sddmm

struct BlockSDDMM {
    const float* dz; int64_t dz_stride;  // gradient of z (rows in z order)
    const float* x; int64_t x_stride;
    int64_t tokens, kept, rows, cols;
    const int64_t* icol;  // [R * kept, cols]: input column of each weight column
    float* dv;            // [R, kept, rows, cols]
};

// CB weight columns by NV vectors of block rows from row v0, accumulated over a token range.
template <typename V, int NV, int CB>
static void block_sddmm_tile(const BlockSDDMM& a, int64_t e, int64_t c0, int64_t v0, int64_t t0, int64_t t1,
                             float* out) {
    constexpr int L = sizeof(V) / sizeof(float);
    const int64_t block_row = e / a.kept;
    const int64_t* cols = a.icol + e * a.cols + c0;
    V acc[CB][NV];
    for (int c = 0; c < CB; ++c)
        for (int v = 0; v < NV; ++v) acc[c][v] = V{};
    for (int64_t t = t0; t < t1; ++t) {
        const float* dzr = a.dz + t * a.dz_stride + block_row * a.rows + v0;
        const float* xr = a.x + t * a.x_stride;
        V g[NV];
        for (int v = 0; v < NV; ++v) g[v] = load<V>(dzr + v * L);
        for (int c = 0; c < CB; ++c) {
            V s = splat<V>(xr[cols[c]]);
            for (int v = 0; v < NV; ++v) acc[c][v] += s * g[v];
        }
    }
    // out is entry e's gradient transposed, [cols, rows]: each accumulator adds as one vector
    for (int c = 0; c < CB; ++c)
        for (int v = 0; v < NV; ++v) {
            float* dst = out + (c0 + c) * a.rows + v0 + v * L;
            store<V>(dst, load<V>(dst) + acc[c][v]);
        }
}

// Tokens per SDDMM tile: 64 rows of a 3072-wide input are 768 KiB, within L2.
constexpr int64_t SDDMM_TOKEN_TILE = 64;

// Each thread owns a range of kept blocks (so dv needs no atomics) and walks the tokens in
// short tiles, visiting all its blocks per tile: the tile's rows of x and dz stay in L2
// however the permutations scatter the columns read. The tiles add into a per-thread
// [cols, rows] copy of each block, which is transposed into dv once at the end: adding
// scalars into [rows, cols] after every token tile cost as much as the tile's arithmetic.
// Permutations are applied by packing the rows in map order first (see pack_row): x's
// through in_map (an in_index; the caller may instead fuse it into icol, which reads one
// cache line per weight column of each row), dz's through out_map (inverse(out_index)), so
// the gradient's rows are always read as vectors (reading them one scalar at a time through
// the map made a 3072 -> 768 values gradient through out_index 1.23x as slow as without, at
// 4096 tokens). Every thread reads every row, so all rows are packed once up front, each
// thread a share, into buffers the tiles then read: packing each tile per thread did the
// work twice (768 -> 2304, 4096 tokens: +18 % over the unpermuted call, against +11 %).
template <typename V, int NV, int CB>
static void block_sddmm_run(const BlockSDDMM& a, int64_t entries, const int32_t* in_map, int64_t in_features,
                            const int32_t* out_map) {
    constexpr int64_t lanes = NV * sizeof(V) / sizeof(float);
    const int64_t tile = SDDMM_TOKEN_TILE, block = a.rows * a.cols, z_width = entries / a.kept * a.rows;
    float* packed_x = in_map ? buffer(SHARED, a.tokens * in_features) : nullptr;
    float* packed_dz = out_map ? buffer(OUTPUT, a.tokens * z_width) : nullptr;
#pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t per = (entries + threads - 1) / threads;
        const int64_t e0 = std::min(entries, me * per), e1 = std::min(entries, e0 + per);
        float* sums = buffer(TILE, (e1 - e0) * block);
        std::memset(sums, 0, sizeof(float) * (e1 - e0) * block);
        float* scratch = in_map || out_map ? buffer(ROWS, std::max(in_features, z_width)) : nullptr;
        if (in_map || out_map) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < a.tokens; ++t) {
                if (in_map) pack_row(a.x + t * a.x_stride, in_map, in_features, scratch, packed_x + t * in_features);
                if (out_map) pack_row(a.dz + t * a.dz_stride, out_map, z_width, scratch, packed_dz + t * z_width);
            }
        }
        for (int64_t t0 = 0; t0 < a.tokens && e0 < e1; t0 += tile) {
            const int64_t t1 = std::min(a.tokens, t0 + tile);
            BlockSDDMM item = a;  // the tile's rows, from token 0
            item.dz = a.dz + t0 * a.dz_stride;
            item.x = a.x + t0 * a.x_stride;
            if (in_map) {
                item.x = packed_x + t0 * in_features;
                item.x_stride = in_features;
            }
            if (out_map) {
                item.dz = packed_dz + t0 * z_width;
                item.dz_stride = z_width;
            }
            for (int64_t e = e0; e < e1; ++e) {
                float* out = sums + (e - e0) * block;
                for (int64_t v0 = 0; v0 < a.rows; v0 += lanes) {
                    int64_t c = 0;
                    for (; c + CB <= a.cols; c += CB) block_sddmm_tile<V, NV, CB>(item, e, c, v0, 0, t1 - t0, out);
                    for (; c < a.cols; ++c) block_sddmm_tile<V, NV, 1>(item, e, c, v0, 0, t1 - t0, out);
                }
            }
        }
        for (int64_t e = e0; e < e1; ++e)
            for (int64_t c = 0; c < a.cols; ++c)
                for (int64_t r = 0; r < a.rows; ++r)
                    a.dv[e * block + r * a.cols + c] = sums[(e - e0) * block + c * a.rows + r];
    }
}

extern "C" int padst_block_sddmm(const float* dz, int64_t dz_stride, const float* x, int64_t x_stride,
                                 int64_t tokens, int64_t block_rows, int64_t kept, int64_t rows, int64_t cols,
                                 const int64_t* icol, const int32_t* out_map, float* dv, const int32_t* in_map,
                                 int64_t in_features) {
    BlockSDDMM a{dz, dz_stride, x, x_stride, tokens, kept, rows, cols, icol, dv};
    const int64_t entries = block_rows * kept;
    if (rows != 8 && rows != 16 && rows != 32 && rows != 48 && rows != 64) return 1;  // vectors along block rows
    if (rows == 8)
        block_sddmm_run<v8, 1, 12>(a, entries, in_map, in_features, out_map);
    else if (!WIDE_REGISTERS)  // 16 at a time: 12 accumulators, 2 vectors and a broadcast
        block_sddmm_run<v8, 2, 6>(a, entries, in_map, in_features, out_map);
    else if (rows == 16)
        block_sddmm_run<v16, 1, 12>(a, entries, in_map, in_features, out_map);
    else if (rows == 32)
        block_sddmm_run<v16, 2, 8>(a, entries, in_map, in_features, out_map);
    else if (rows == 48)
        block_sddmm_run<v16, 3, 6>(a, entries, in_map, in_features, out_map);
    else
        block_sddmm_run<v16, 4, 5>(a, entries, in_map, in_features, out_map);
    return 0;
}

// --------------------------------------------------------------- ell_mm / ell_sddmm
//
// Row-sparse weights have no dense sub-blocks to reuse a loaded input for, so these
// kernels put tokens in the vector lanes: a thread transposes a tile of tokens into a
// feature-major buffer of its own, then each output row is a short sum of scaled buffer
// rows (column indices are int32 here: they are most of the bytes read at few tokens).
// Threads never wait for each other inside a call (no barriers): with few token
// tiles they split the output rows instead and each transposes the small tile itself.

// out[(f - f0) * lanes + l] = in[(t0 + l) * stride + column(f)] for f in [f0, f1), zero past the
// last token; column(f) is f, or map[f] where the tile's features are a reordering of in's
// columns (a gradient's rows read in z order: each row is small enough to stay in L1 while
// its columns are picked, which costs far less than reordering the whole gradient first).
static void transpose_tile(const float* in, int64_t stride, int64_t t0, int64_t count, int64_t f0, int64_t f1,
                           int64_t lanes, float* out, const int32_t* map = nullptr) {
    for (int64_t l = 0; l < lanes; ++l) {
        const float* row = in + (t0 + l) * stride;
        for (int64_t f = f0; f < f1; ++f) out[(f - f0) * lanes + l] = l < count ? row[map ? map[f] : f] : 0.0f;
    }
}

// out[f] = tile[map[f] * lanes + lane] for f < width: one token (lane) of a feature-major tile
// as a row of y in map order, stored front to back (see gather_row). The vector path needs
// every index of the tile to fit an int32.
static void gather_lane(const float* tile, int64_t lanes, int64_t lane, const int32_t* map, int64_t width,
                        float* out) {
    int64_t f = 0;
#if defined(__AVX512F__)
    if (width * lanes <= INT32_MAX) {
        const __m512i stride = _mm512_set1_epi32((int32_t)lanes);
        for (; f + 16 <= width; f += 16) {
            const __m512i at = _mm512_mullo_epi32(_mm512_loadu_si512(map + f), stride);
            _mm512_storeu_ps(out + f, _mm512_i32gather_ps(at, tile + lane, 4));
        }
    }
#endif
    for (; f < width; ++f) out[f] = tile[map[f] * lanes + lane];
}

// Entry e's value: vals[e], or vals[val_of[e]] where the entries are a reordering of the
// values (the transposed structure reads the forward's values in place).
static inline float value_of(const float* vals, const int32_t* val_of, int64_t e) {
    return vals[val_of ? val_of[e] : e];
}

// One output row over a tile of NT * 16 tokens. Independent chains of accumulators hide the
// FMA latency: four on AVX-512; on AVX2 no more than 8 registers of accumulators in all.
template <int NT>
static void ell_mm_row(const float* xt, float* out, const int32_t* cols, const float* vals, int64_t begin,
                       int64_t end, float bias) {
    using V = std::conditional_t<WIDE_REGISTERS, v16, v8>;
    constexpr int L = sizeof(V) / sizeof(float), NV = NT * 16 / L;
    constexpr int CHAINS = WIDE_REGISTERS ? 4 : std::max(1, std::min(4, 8 / NV));
    constexpr int64_t lanes = NT * 16;
    V acc[CHAINS][NV] = {};
    int64_t e = begin;
    for (; e + CHAINS <= end; e += CHAINS)
        for (int u = 0; u < CHAINS; ++u) {
            const float* src = xt + cols[e + u] * lanes;
            const V s = splat<V>(vals[e + u]);
            for (int n = 0; n < NV; ++n) acc[u][n] += s * load<V>(src + n * L);
        }
    for (; e < end; ++e) {
        const float* src = xt + cols[e] * lanes;
        const V s = splat<V>(vals[e]);
        for (int n = 0; n < NV; ++n) acc[0][n] += s * load<V>(src + n * L);
    }
    for (int n = 0; n < NV; ++n) {
        V sum = splat<V>(bias);
        for (int u = 0; u < CHAINS; ++u) sum += acc[u][n];
        store<V>(out + n * L, sum);
    }
}

// Work items: (token tile, chunk of output rows); one chunk per tile when tiles are plenty.
struct RowSplit {
    int64_t tiles, chunks, rows_per_chunk;
    RowSplit(int64_t tokens, int64_t lanes, int64_t rows) {
        const int64_t threads = omp_get_max_threads();
        tiles = (tokens + lanes - 1) / lanes;
        chunks = tiles >= 4 * threads ? 1 : std::min<int64_t>(rows, (4 * threads + tiles - 1) / tiles);
        rows_per_chunk = (rows + chunks - 1) / chunks;
    }
};

template <int NT>
static void ell_mm_run(const float* x, int64_t xs, float* y, int64_t ys, int64_t tokens, int64_t features,
                       int64_t rows, const int64_t* row_ptr, const int32_t* cols, const float* vals,
                       const float* bias, const int32_t* out_map) {
    constexpr int64_t lanes = NT * 16;
    if (rows == 0) return;
    const RowSplit split(tokens, lanes, rows);
    float* z = out_map && split.chunks > 1 ? buffer(OUTPUT, tokens * rows) : nullptr;  // see gather_rows
#pragma omp parallel
    {
        float* xt = buffer(ROWS, features * lanes);
        float* yt = buffer(TILE, split.rows_per_chunk * lanes);
        int64_t held = -1;  // the token tile now in xt
#pragma omp for schedule(static)
        for (int64_t item = 0; item < split.tiles * split.chunks; ++item) {
            const int64_t tile = item / split.chunks, t0 = tile * lanes;
            const int64_t count = std::min(lanes, tokens - t0);
            const int64_t r0 = (item % split.chunks) * split.rows_per_chunk;
            const int64_t r1 = std::min(rows, r0 + split.rows_per_chunk);
            if (tile != held) transpose_tile(x, xs, t0, count, 0, features, lanes, xt);
            held = tile;
            for (int64_t o = r0; o < r1; ++o)
                ell_mm_row<NT>(xt, yt + (o - r0) * lanes, cols, vals, row_ptr[o], row_ptr[o + 1],
                               bias ? bias[o] : 0.0f);
            for (int64_t l = 0; l < count; ++l) {
                if (z) {
                    for (int64_t o = r0; o < r1; ++o) z[(t0 + l) * rows + o] = yt[(o - r0) * lanes + l];
                } else if (out_map) {  // one chunk: all rows of the tile are here
                    gather_lane(yt, lanes, l, out_map, rows, y + (t0 + l) * ys);
                } else {
                    float* out = y + (t0 + l) * ys;
                    for (int64_t o = r0; o < r1; ++o) out[o] = yt[(o - r0) * lanes + l];
                }
            }
        }
        if (z) gather_rows(z, rows, y, ys, tokens, out_map);
    }
}

// sum_e value_of(e) * xr[cols[e]] over [begin, end), with hardware gathers where the target has them.
static inline float gather_dot(const float* xr, const int32_t* cols, const float* vals, const int32_t* val_of,
                               int64_t begin, int64_t end) {
    int64_t e = begin;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; e + 32 <= end; e += 32)
        for (int u = 0; u < 2; ++u) {
            const int64_t at = e + 16 * u;
            const __m512 v = val_of ? _mm512_i32gather_ps(_mm512_loadu_si512(val_of + at), vals, 4)
                                    : _mm512_loadu_ps(vals + at);
            acc[u] = _mm512_fmadd_ps(_mm512_i32gather_ps(_mm512_loadu_si512(cols + at), xr, 4), v, acc[u]);
        }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
#elif defined(__AVX2__)
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    auto indices = [](const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
    for (; e + 16 <= end; e += 16)
        for (int u = 0; u < 2; ++u) {
            const int64_t at = e + 8 * u;
            const __m256 v = val_of ? _mm256_i32gather_ps(vals, indices(val_of + at), 4) : _mm256_loadu_ps(vals + at);
            acc[u] = _mm256_fmadd_ps(_mm256_i32gather_ps(xr, indices(cols + at), 4), v, acc[u]);
        }
    const v8 total = reinterpret_cast<v8>(_mm256_add_ps(acc[0], acc[1]));
    for (int l = 0; l < 8; ++l) sum += total[l];
#endif
    for (; e < end; ++e) sum += value_of(vals, val_of, e) * xr[cols[e]];
    return sum;
}

// A handful of tokens would leave most vector lanes empty: gather-dot each row instead.
static void ell_mm_few_tokens(const float* x, int64_t xs, float* y, int64_t ys, int64_t tokens, int64_t rows,
                              const int64_t* row_ptr, const int32_t* cols, const float* vals,
                              const int32_t* val_of, const float* bias, const int32_t* out_map) {
    float* z = out_map ? buffer(OUTPUT, tokens * rows) : y;  // see gather_rows
    const int64_t zs = out_map ? rows : ys;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < rows; ++o)
            for (int64_t t = 0; t < tokens; ++t)
                z[t * zs + o] = gather_dot(x + t * xs, cols, vals, val_of, row_ptr[o], row_ptr[o + 1]) +
                                (bias ? bias[o] : 0.0f);
        if (out_map) gather_rows(z, rows, y, ys, tokens, out_map);
    }
}

// val_of (optional) reorders the values, see value_of: a handful of tokens reads them through
// it; more tokens reorder them once, which costs less than an indirection per read.
extern "C" int padst_ell_mm(const float* x, int64_t xs, float* y, int64_t ys, int64_t tokens, int64_t features,
                            int64_t rows, const int64_t* row_ptr, const int32_t* cols, const float* vals,
                            const int32_t* val_of, const float* bias, const int32_t* out_map) {
    if (tokens <= 4) {
        ell_mm_few_tokens(x, xs, y, ys, tokens, rows, row_ptr, cols, vals, val_of, bias, out_map);
        return 0;
    }
    if (val_of) {
        float* ordered = buffer(SHARED, row_ptr[rows]);
#pragma omp parallel for schedule(static)
        for (int64_t e = 0; e < row_ptr[rows]; ++e) ordered[e] = vals[val_of[e]];
        vals = ordered;
    }
    if (tokens <= 16)
        ell_mm_run<1>(x, xs, y, ys, tokens, features, rows, row_ptr, cols, vals, bias, out_map);
    else
        ell_mm_run<2>(x, xs, y, ys, tokens, features, rows, row_ptr, cols, vals, bias, out_map);
    return 0;
}

// Each thread owns a range of output rows (so dv needs no atomics) and walks all token tiles.
template <int NT>
static void ell_sddmm_run(const float* dz, int64_t dzs, const float* x, int64_t xs, int64_t tokens,
                          int64_t features, int64_t rows, const int64_t* row_ptr, const int32_t* cols, float* dv,
                          const int32_t* dz_map) {
    constexpr int64_t lanes = NT * 16;
    std::memset(dv, 0, sizeof(float) * row_ptr[rows]);
#pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t per = (rows + threads - 1) / threads;
        const int64_t r0 = std::min(rows, me * per), r1 = std::min(rows, r0 + per);
        float* xt = buffer(ROWS, features * lanes);
        float* dzt = buffer(TILE, (r1 - r0) * lanes);
        for (int64_t t0 = 0; r0 < r1 && t0 < tokens; t0 += lanes) {
            const int64_t count = std::min(lanes, tokens - t0);
            transpose_tile(x, xs, t0, count, 0, features, lanes, xt);
            transpose_tile(dz, dzs, t0, count, r0, r1, lanes, dzt, dz_map);
            for (int64_t o = r0; o < r1; ++o) {
                v16 g[NT];
                for (int n = 0; n < NT; ++n) g[n] = load<v16>(dzt + (o - r0) * lanes + n * 16);
                for (int64_t e = row_ptr[o]; e < row_ptr[o + 1]; ++e) {
                    const float* src = xt + cols[e] * lanes;
                    v16 acc = g[0] * load<v16>(src);
                    for (int n = 1; n < NT; ++n) acc += g[n] * load<v16>(src + n * 16);
                    float s = 0.0f;
                    for (int l = 0; l < 16; ++l) s += acc[l];
                    dv[e] += s;
                }
            }
        }
    }
}

// A handful of tokens: each kept value's gradient is a short dot product of its own.
static void ell_sddmm_few_tokens(const float* dz, int64_t dzs, const float* x, int64_t xs, int64_t tokens,
                                 int64_t rows, const int64_t* row_ptr, const int32_t* cols, float* dv,
                                 const int32_t* dz_map) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < rows; ++o)
        for (int64_t e = row_ptr[o]; e < row_ptr[o + 1]; ++e) {
            const int64_t column = dz_map ? dz_map[o] : o;
            float sum = 0.0f;
            for (int64_t t = 0; t < tokens; ++t) sum += dz[t * dzs + column] * x[t * xs + cols[e]];
            dv[e] = sum;
        }
}

// dz_map (optional): row o of the weight's gradient reads column dz_map[o] of dz (a gradient
// w.r.t. y = z[:, out_index] read in z order, dz_map = inverse(out_index)).
extern "C" int padst_ell_sddmm(const float* dz, int64_t dzs, const float* x, int64_t xs, int64_t tokens,
                               int64_t features, int64_t rows, const int64_t* row_ptr, const int32_t* cols,
                               float* dv, const int32_t* dz_map) {
    if (tokens <= 4)
        ell_sddmm_few_tokens(dz, dzs, x, xs, tokens, rows, row_ptr, cols, dv, dz_map);
    else if (tokens <= 16)
        ell_sddmm_run<1>(dz, dzs, x, xs, tokens, features, rows, row_ptr, cols, dv, dz_map);
    else
        ell_sddmm_run<4>(dz, dzs, x, xs, tokens, features, rows, row_ptr, cols, dv, dz_map);
    return 0;
}

// --------------------------------------------------------------------------- nm_mm
//
// An N:M weight keeps n of every m consecutive inputs, so every value of a group reads one
// of the same m (<= 32) inputs: two vector registers hold them, and a register permute
// (vpermt2ps on AVX-512) picks each row's input where a gather would go to memory. The
// values and positions are "sliced" by 16 rows, [chunks][groups * n][16], so one step
// serves 16 rows at once: for a few tokens this streams the values once with no gathers.
// Positions are single bytes: a one-token call is bound by the bytes it streams.
typedef int32_t vi16 __attribute__((vector_size(64)));

// 16 bytes to 16 int32 lanes (one vpmovzxbd where AVX-512 has it).
static inline vi16 widen(const uint8_t* p) {
#if defined(__AVX512F__)
    return reinterpret_cast<vi16>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    typedef uint8_t vb16 __attribute__((vector_size(16)));
    vb16 bytes;
    std::memcpy(&bytes, p, sizeof(bytes));
    return __builtin_convertvector(bytes, vi16);
#endif
}

extern "C" int padst_nm_mm(const float* x, int64_t xs, float* y, int64_t ys, int64_t tokens, int64_t in,
                           int64_t out, int64_t groups, int64_t kept, const float* vals, const uint8_t* positions,
                           const float* bias, const int32_t* icol, const int32_t* out_map) {
    constexpr int64_t L = 16;
    const int64_t m = in / groups, chunks = (out + L - 1) / L, per_chunk = groups * kept;
    if (m > 2 * L) return 1;
    // each token's inputs (through in_index), padded so a group's two vectors never read past the end
    const int64_t padded = in + 2 * L;
    float* inputs = buffer(SHARED, tokens * padded);
    float* z = out_map ? buffer(OUTPUT, tokens * out) : y;  // threads own chunks of columns: see gather_rows
    const int64_t zs = out_map ? out : ys;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; ++t) {
            if (icol)
                pack_row(x + t * xs, icol, in, buffer(ROWS, in), inputs + t * padded);
            else
                std::memcpy(inputs + t * padded, x + t * xs, sizeof(float) * in);
            std::fill(inputs + t * padded + in, inputs + (t + 1) * padded, 0.0f);
        }
#pragma omp for collapse(2) schedule(static)
        for (int64_t c = 0; c < chunks; ++c)
            for (int64_t t = 0; t < tokens; ++t) {
                const float* xt = inputs + t * padded;
                const float* v = vals + c * per_chunk * L;
                const uint8_t* p = positions + c * per_chunk * L;
                v16 acc[2] = {};
                for (int64_t g = 0; g < groups; ++g) {
                    const v16 lo = load<v16>(xt + g * m), hi = load<v16>(xt + g * m + L);
                    for (int64_t s = 0; s < kept; ++s, v += L, p += L) {
                        acc[s & 1] += load<v16>(v) * __builtin_shuffle(lo, hi, widen(p));
                    }
                }
                const v16 sum = acc[0] + acc[1];
                for (int64_t l = 0; l < L && c * L + l < out; ++l) {
                    const int64_t o = c * L + l;
                    z[t * zs + o] = sum[l] + (bias ? bias[o] : 0.0f);
                }
            }
        if (out_map) gather_rows(z, out, y, ys, tokens, out_map);
    }
    return 0;
}

// ------------------------------------------------------------------------- diag_mm
//
// A wrap-around diagonal weight needs no column index: entry j of diagonal k sits at row
// j % out and column (j + offset_k) % in. With S = min(out, in), write j = c*S + u: for a
// fixed chunk c the rows (c*S) % out + u and the columns (c*S + offset_k) % in + u are both
// consecutive in u, once the input row is laid out twice ([x, x]) so no column wraps.
// Each diagonal is then a streaming multiply-add over its contiguous values: for a few
// tokens this reads every value once and no index at all. Threads own ranges of u, and so
// disjoint output rows.
extern "C" int padst_diag_mm(const float* x, int64_t xs, float* y, int64_t ys, int64_t tokens, int64_t in,
                             int64_t out, int64_t diagonals, const int64_t* offsets, const float* vals,
                             const float* bias, const int32_t* icol, const int32_t* out_map) {
    constexpr int64_t L = 16, U = 4 * L;  // 4 vectors of u per step
    const int64_t shorter = std::min(in, out), length = std::max(in, out), chunks = length / shorter;
    float* twice = buffer(SHARED, tokens * 2 * in);
    float* z = out_map ? buffer(OUTPUT, tokens * out) : y;  // threads own ranges of rows: see gather_rows
    const int64_t zs = out_map ? out : ys;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tokens; ++t) {
            float* row = twice + t * 2 * in;
            if (icol)  // the second half is the scratch copy pack_row gathers from
                pack_row(x + t * xs, icol, in, row + in, row);
            else
                std::memcpy(row, x + t * xs, sizeof(float) * in);
            std::memcpy(row + in, row, sizeof(float) * in);
        }
        const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t per = (shorter + threads * L - 1) / (threads * L) * L;
        const int64_t u0 = std::min(shorter, me * per), u1 = std::min(shorter, u0 + per);
        std::vector<int64_t> column(diagonals);
        for (int64_t c = 0; c < chunks && u0 < u1; ++c) {
            const int64_t row = (c * shorter) % out;
            for (int64_t k = 0; k < diagonals; ++k) column[k] = (c * shorter + offsets[k]) % in;
            if (c == 0 || out > in)  // a new range of rows: start from the bias
                for (int64_t t = 0; t < tokens; ++t)
                    for (int64_t u = u0; u < u1; ++u) z[t * zs + row + u] = bias ? bias[row + u] : 0.0f;
            const float* v = vals + c * shorter;
            for (int64_t t = 0; t < tokens; ++t) {
                const float* xt = twice + t * 2 * in;
                float* zt = z + t * zs + row;
                int64_t u = u0;
                for (; u + U <= u1; u += U) {
                    v16 acc[4];
                    for (int n = 0; n < 4; ++n) acc[n] = load<v16>(zt + u + n * L);
                    for (int64_t k = 0; k < diagonals; ++k)
                        for (int n = 0; n < 4; ++n)
                            acc[n] += load<v16>(v + k * length + u + n * L) * load<v16>(xt + column[k] + u + n * L);
                    for (int n = 0; n < 4; ++n) store<v16>(zt + u + n * L, acc[n]);
                }
                for (; u + L <= u1; u += L) {
                    v16 acc = load<v16>(zt + u);
                    for (int64_t k = 0; k < diagonals; ++k)
                        acc += load<v16>(v + k * length + u) * load<v16>(xt + column[k] + u);
                    store<v16>(zt + u, acc);
                }
                for (; u < u1; ++u) {
                    float acc = zt[u];
                    for (int64_t k = 0; k < diagonals; ++k) acc += v[k * length + u] * xt[column[k] + u];
                    zt[u] = acc;
                }
            }
        }
        if (out_map) {
#pragma omp barrier
            gather_rows(z, out, y, ys, tokens, out_map);
        }
    }
    return 0;
}

