// gram.cu: Gram matrices (syrk) of layer activations, G += Xᵀ·X over the unmasked rows.
//
// What it computes
//   G (d×d, row-major f32, leading dimension d) += Σ_r X[r,:]ᵀ·X[r,:] over the rows r in
//   [0, rows) with mask[r] != 0 (mask == nullptr: every row). X is row-major with a row
//   stride of ldx elements (ldx >= d). Only tiles on or below the diagonal are computed: the
//   strict upper triangle outside the diagonal tiles is never written, and inside a diagonal
//   tile both halves are written (the host mirrors the lower triangle afterwards).
//
// Launch contract (the host mirrors the #defines below)
//   gram_f16: blockDim = (GRAM_THREADS_F16 = 256), tile GRAM_TILE_F16 = 128, k-step 32 rows.
//   gram_f32: blockDim = (GRAM_THREADS_F32 = 256), tile GRAM_TILE_F32 = 128, k-step 16 rows.
//   T = ceil(d / tile), gridDim.x = T*(T+1)/2: block x computes the x-th lower-triangular
//     tile in row-major order, (0,0), (1,0), (1,1), (2,0), ... (decoded in the kernel).
//     Blocks whose tile starts at or past d exit at once, so a grid sized for a smaller
//     tile is still correct, only wasteful.
//   gridDim.y = S, the number of row splits (any S >= 1, at most 65535). The kernel derives
//     its own rows: chunk = ceil(rows / S) rounded up to a multiple of the k-step, block y
//     takes [y*chunk, min(rows, (y+1)*chunk)); blocks whose range is empty exit at once.
//     The host passes nothing but S. A good S fills the GPU: S ≈ ceil(2 · #SMs / #tiles),
//     capped so that every split keeps at least a few hundred rows.
//   Shared memory is static (exactly 48 KiB per block for both kernels): no dynamic shared
//     memory, no cuFuncSetAttribute. gridDim.z = 1, no stream or cluster requirements.
//   Results are added into G with atomicAdd: G accumulates across splits and calls, and the
//     host zeroes it once.
//
// Why this design
//   gram_f16 is a 128×128×32 tensor-core tile (mma.sync m16n8k16, f16 in, f32 accumulate):
//   8 warps in a 2×4 grid of 64×32 warp tiles, a 3-stage cp.async pipeline (global → shared
//   without a register round trip, one __syncthreads per k-step) and ldmatrix.trans. The two
//   operands of a Gram tile are both column panels of X stored as rows of X, i.e. k-major:
//   ldmatrix.trans turns k-major shared tiles into exactly the row-major A / col-major B
//   fragments mma.sync wants, so X is never transposed in memory. The 256-byte shared rows
//   are XOR-swizzled per 16-byte chunk (chunk ^ (k & 7)), which makes both the cp.async
//   stores and the 8-row ldmatrix reads conflict-free without padding, and lets three stages
//   of both panels fit exactly the 48 KiB of static shared memory.
//   __launch_bounds__(256, 2): at most 128 registers (64 of them accumulators), so two
//   blocks (16 warps, 96 KiB of shared memory) share an SM and hide each other's barriers.
//   Masked rows, rows past the split and columns >= d are zero-filled by cp.async's src-size
//   operand while staging (no compaction copy, and NaNs in masked rows cannot leak into G).
//   The mask bytes are loaded one k-step ahead of the copies that need them, so the mask
//   never puts a global-memory round trip between a barrier and the tensor-core work.
//   cp.async needs 16-byte aligned sources: when X is not 16-byte aligned or ldx is not a
//   multiple of 8 (f16) / 4 (f32), the whole grid takes a synchronous path with scalar,
//   coalesced loads into the same shared layout (the choice depends only on kernel
//   arguments, so it is uniform across the grid).
//   Diagonal tiles use the same panel for both operands: it is staged once.
//   gram_f32 must be true f32 (its accuracy target is 1e-5 relative against an f64 Gram, so
//   no TF32 and no f16): a classic SIMT register-blocked tile, 8×8 outputs per thread as
//   2×2 sub-blocks of 4×4, which reads each operand with conflict-free float4 shared loads
//   (4 LDS.128 per 64 FMA), fed by the same cp.async 3-stage pipeline.
//   atomicAdd makes the summation order across splits (and across calls into the same G)
//   nondeterministic; within a block each output is accumulated k-step by k-step in row
//   order.

#include <cuda_fp16.h>

#define GRAM_TILE_F16 128
#define GRAM_THREADS_F16 256
#define GRAM_KSTEP_F16 32
#define GRAM_TILE_F32 128
#define GRAM_THREADS_F32 256
#define GRAM_KSTEP_F32 16
#define GRAM_STAGES 3

namespace {

// ---------------------------------------------------------------------------------------
// Helpers shared by both kernels

// Decodes block b into the b-th tile (tr, tc), tc <= tr, of the lower triangle in row-major
// order (b = tr*(tr+1)/2 + tc). The float estimate is corrected with exact integer steps, so
// it is right for every b an int can hold.
__device__ __forceinline__ void decode_lower_tile(int b, int& tr, int& tc) {
    int r = (int)((sqrtf(8.0f * (float)b + 1.0f) - 1.0f) * 0.5f);
    while ((long long)r * (r + 1) / 2 > b) --r;
    while ((long long)(r + 1) * (r + 2) / 2 <= b) ++r;
    tr = r;
    tc = b - (int)((long long)r * (r + 1) / 2);
}

// The rows [begin, end) of this block's split; begin >= end when the split is empty.
template <int KSTEP>
__device__ __forceinline__ void split_rows(long long rows, long long& begin, long long& end) {
    const long long splits = gridDim.y;
    long long chunk = (rows + splits - 1) / splits;
    chunk = (chunk + KSTEP - 1) / KSTEP * KSTEP;
    begin = (long long)blockIdx.y * chunk;
    end = begin + chunk < rows ? begin + chunk : rows;
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16-byte cp.async that copies `bytes` (0..16) from src and zero-fills the rest.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ bool row_taken(const unsigned char* mask, long long r, long long end) {
    return r < end && (mask == nullptr || mask[r] != 0);
}

// The take/zero decision for the two rows (kr and kr + STRIDE of each k-step) that a thread
// stages in the cp.async path. The mask bytes are loaded one k-step before the copies that
// need them: a mask load consumed right away would stall every warp on a global-memory
// round trip each k-step, just ahead of its tensor-core work.
template <int KSTEP, int STRIDE>
struct RowPrefetch {
    const unsigned char* mask;
    long long begin, end;
    int kr;
    unsigned char m[2];

    __device__ __forceinline__ RowPrefetch(const unsigned char* mask_, long long begin_,
                                           long long end_, int kr_)
        : mask(mask_), begin(begin_), end(end_), kr(kr_), m{1, 1} {}

    __device__ __forceinline__ long long row(int step, int i) const {
        return begin + (long long)step * KSTEP + kr + i * STRIDE;
    }
    __device__ __forceinline__ void fetch(int step) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const long long r = row(step, i);
            m[i] = (mask != nullptr && r < end) ? mask[r] : (unsigned char)1;
        }
    }
    // Only valid for the step fetched last.
    __device__ __forceinline__ void takes(int step, bool (&take)[2]) const {
#pragma unroll
        for (int i = 0; i < 2; ++i) take[i] = row(step, i) < end && m[i] != 0;
    }
};

// ---------------------------------------------------------------------------------------
// gram_f16

constexpr int F16_ROW_BYTES = GRAM_TILE_F16 * 2;                 // 256: one k-row of a panel
constexpr int F16_PANEL_BYTES = GRAM_KSTEP_F16 * F16_ROW_BYTES;  // 8 KiB
constexpr int F16_STAGE_BYTES = 2 * F16_PANEL_BYTES;             // both panels

// The multi-stage cp.async pipeline both Gram kernels run over their k-steps: the first
// GRAM_STAGES − 1 panels staged ahead, then per step a wait for the oldest panel, one
// barrier, the refill of the buffer read in the previous step, and `compute(step)` on this
// step's buffer. The buffer refilled was last read in the previous iteration, which every
// thread has finished: one barrier per k-step is enough.
template <bool VEC, class Prefetch, class Stage, class Compute>
__device__ __forceinline__ void gram_pipeline(Prefetch& rows_next, int nsteps, Stage& stage,
                                              Compute&& compute) {
#pragma unroll
    for (int s = 0; s < GRAM_STAGES - 1; ++s) {
        if (VEC) rows_next.fetch(s);
        if (s < nsteps) stage(s);
        if (VEC) cp_async_commit();
    }
    if (VEC) rows_next.fetch(GRAM_STAGES - 1);

    for (int step = 0; step < nsteps; ++step) {
        if (VEC) cp_async_wait<GRAM_STAGES - 2>();
        __syncthreads();
        if (step + GRAM_STAGES - 1 < nsteps) stage(step + GRAM_STAGES - 1);
        if (VEC) {
            cp_async_commit();
            rows_next.fetch(step + GRAM_STAGES);
        }
        compute(step);
    }
}

// Byte offset of the 16-byte chunk `c` (8 halves) of k-row `k` inside a panel.
__device__ __forceinline__ unsigned f16_swz(int k, int c) {
    return (unsigned)(k * F16_ROW_BYTES + ((c ^ (k & 7)) << 4));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned addr, unsigned& r0, unsigned& r1,
                                              unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                          unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Stages k-rows [k0, k0 + 32) of the panel starting at column `col0` into `panel`.
// VEC: two 16-byte cp.async per thread: thread t owns chunk t & 15 of the rows
// f16_vec_row(t) and f16_vec_row(t) + 16, which the caller has already decided to take or
// zero (take[0], take[1]). Scalar: thread t owns column t & 127 of the even or odd rows, so
// each warp load instruction reads 64 contiguous bytes.
__device__ __forceinline__ int f16_vec_row(int t) { return t >> 4; }
template <bool VEC>
__device__ __forceinline__ void f16_stage_panel(unsigned char* panel, const __half* X,
                                                long long ldx, int d,
                                                const unsigned char* mask, long long k0,
                                                long long end, int col0, const bool (&take)[2]) {
    const int t = threadIdx.x;
    if (VEC) {
        const int c = t & 15;
        const int col = col0 + c * 8;
        const int left = d - col;
        const int col_bytes = left >= 8 ? 16 : (left > 0 ? left * 2 : 0);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int k = f16_vec_row(t) + 16 * i;
            const long long r = k0 + k;
            const bool copy = take[i] && col_bytes > 0;
            const __half* src = copy ? X + r * ldx + col : X;
            cp_async_16(smem_addr(panel + f16_swz(k, c)), src, copy ? col_bytes : 0);
        }
    } else {
        const int m = t & 127;
        const int col = col0 + m;
        const unsigned short* xs = reinterpret_cast<const unsigned short*>(X);
        // Fully unrolled, the 16 loads in flight push the kernel past 128 registers (spills).
#pragma unroll 4
        for (int i = 0; i < GRAM_KSTEP_F16 / 2; ++i) {
            const int k = (t >> 7) + 2 * i;
            const long long r = k0 + k;
            unsigned short v = 0;
            if (col < d && row_taken(mask, r, end)) v = xs[r * ldx + col];
            *reinterpret_cast<unsigned short*>(panel + f16_swz(k, m >> 3) + (m & 7) * 2) = v;
        }
    }
}

template <bool VEC>
__device__ __forceinline__ void gram_f16_tile(const __half* X, long long ldx, int d,
                                              const unsigned char* mask, float* G,
                                              unsigned char (*smem)[F16_STAGE_BYTES],
                                              int tr, int tc, long long begin, long long end) {
    const bool diag = tr == tc;
    const int colA = tr * GRAM_TILE_F16;  // rows of the G tile
    const int colB = tc * GRAM_TILE_F16;  // columns of the G tile
    const int nsteps = (int)((end - begin + GRAM_KSTEP_F16 - 1) / GRAM_KSTEP_F16);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3;  // warp tile: rows wm*64.., columns wn*32..
    const int q = lane >> 3, r8 = lane & 7;
    // Lane addresses for ldmatrix.x4.trans. A (16×16 of the row panel, k-major in shared):
    // matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15) → the
    // a0..a3 registers of m16n8k16. B: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15),
    // (k 8-15, n 8-15) → b0,b1 of two n8 tiles. The m16 tile i (n16 pair jp) only flips
    // chunk bits 1-2 of the swizzle, i.e. XOR (i << 5) on the offset.
    const unsigned offA = f16_swz(r8 + (q >> 1) * 8, wm * 8 + (q & 1));
    const unsigned offB = f16_swz(r8 + (q & 1) * 8, wn * 4 + (q >> 1));

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    RowPrefetch<GRAM_KSTEP_F16, 16> rows_next(mask, begin, end, f16_vec_row(threadIdx.x));
    auto stage = [&](int step) {
        unsigned char* buf = smem[step % GRAM_STAGES];
        const long long k0 = begin + (long long)step * GRAM_KSTEP_F16;
        bool take[2];
        rows_next.takes(step, take);
        f16_stage_panel<VEC>(buf, X, ldx, d, mask, k0, end, colA, take);
        if (!diag) f16_stage_panel<VEC>(buf + F16_PANEL_BYTES, X, ldx, d, mask, k0, end, colB, take);
    };

    gram_pipeline<VEC>(rows_next, nsteps, stage, [&](int step) {
        const unsigned baseA = smem_addr(smem[step % GRAM_STAGES]);
        const unsigned baseB = diag ? baseA : baseA + F16_PANEL_BYTES;
#pragma unroll
        for (int kk = 0; kk < GRAM_KSTEP_F16 / 16; ++kk) {
            unsigned a[4][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                ldsm_x4_trans(baseA + (offA ^ (i << 5)) + kk * 16 * F16_ROW_BYTES, a[i][0],
                              a[i][1], a[i][2], a[i][3]);
#pragma unroll
            for (int jp = 0; jp < 2; ++jp)
                ldsm_x4_trans(baseB + (offB ^ (jp << 5)) + kk * 16 * F16_ROW_BYTES,
                              b[2 * jp][0], b[2 * jp][1], b[2 * jp + 1][0], b[2 * jp + 1][1]);
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_16816(acc[i][j], a[i], b[j][0], b[j][1]);
        }
    });

    // Accumulator layout of m16n8: c0,c1 at (row g, columns 2t, 2t+1), c2,c3 at row g + 8.
    const int g = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = colA + wm * 64 + i * 16 + g + h * 8;
            if (row >= d) continue;
            float* grow = G + (long long)row * d;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = colB + wn * 32 + j * 8 + tq * 2;
                if (col < d) atomicAdd(grow + col, acc[i][j][2 * h]);
                if (col + 1 < d) atomicAdd(grow + col + 1, acc[i][j][2 * h + 1]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// gram_f32

constexpr int F32_ROW_BYTES = GRAM_TILE_F32 * 4;                 // 512: one k-row of a panel
constexpr int F32_PANEL_BYTES = GRAM_KSTEP_F32 * F32_ROW_BYTES;  // 8 KiB
constexpr int F32_STAGE_BYTES = 2 * F32_PANEL_BYTES;

// VEC: thread t owns 16-byte chunk t & 31 of rows f32_vec_row(t) and f32_vec_row(t) + 8 (a
// warp fills one 512-byte row: conflict-free), taken or zeroed as take[0], take[1] say.
// Scalar: thread t owns column t & 127 of the even or odd rows.
__device__ __forceinline__ int f32_vec_row(int t) { return t >> 5; }
template <bool VEC>
__device__ __forceinline__ void f32_stage_panel(unsigned char* panel, const float* X,
                                                long long ldx, int d,
                                                const unsigned char* mask, long long k0,
                                                long long end, int col0, const bool (&take)[2]) {
    const int t = threadIdx.x;
    if (VEC) {
        const int c = t & 31;
        const int col = col0 + c * 4;
        const int left = d - col;
        const int col_bytes = left >= 4 ? 16 : (left > 0 ? left * 4 : 0);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int k = f32_vec_row(t) + 8 * i;
            const long long r = k0 + k;
            const bool copy = take[i] && col_bytes > 0;
            const float* src = copy ? X + r * ldx + col : X;
            cp_async_16(smem_addr(panel + k * F32_ROW_BYTES + c * 16), src, copy ? col_bytes : 0);
        }
    } else {
        const int m = t & 127;
        const int col = col0 + m;
#pragma unroll
        for (int i = 0; i < GRAM_KSTEP_F32 / 2; ++i) {
            const int k = (t >> 7) + 2 * i;
            const long long r = k0 + k;
            float v = 0.0f;
            if (col < d && row_taken(mask, r, end)) v = X[r * ldx + col];
            *reinterpret_cast<float*>(panel + k * F32_ROW_BYTES + m * 4) = v;
        }
    }
}

template <bool VEC>
__device__ __forceinline__ void gram_f32_tile(const float* X, long long ldx, int d,
                                              const unsigned char* mask, float* G,
                                              unsigned char (*smem)[F32_STAGE_BYTES],
                                              int tr, int tc, long long begin, long long end) {
    const bool diag = tr == tc;
    const int colA = tr * GRAM_TILE_F32;
    const int colB = tc * GRAM_TILE_F32;
    const int nsteps = (int)((end - begin + GRAM_KSTEP_F32 - 1) / GRAM_KSTEP_F32);
    // Thread (ty, tx) of a 16×16 grid owns rows {ty*4, 64 + ty*4} + 0..3 and columns
    // {tx*4, 64 + tx*4} + 0..3 of the tile: a warp reads 2 distinct A float4 (broadcast) and
    // 16 consecutive B float4 per k, both conflict-free.
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    RowPrefetch<GRAM_KSTEP_F32, 8> rows_next(mask, begin, end, f32_vec_row(threadIdx.x));
    auto stage = [&](int step) {
        unsigned char* buf = smem[step % GRAM_STAGES];
        const long long k0 = begin + (long long)step * GRAM_KSTEP_F32;
        bool take[2];
        rows_next.takes(step, take);
        f32_stage_panel<VEC>(buf, X, ldx, d, mask, k0, end, colA, take);
        if (!diag) f32_stage_panel<VEC>(buf + F32_PANEL_BYTES, X, ldx, d, mask, k0, end, colB, take);
    };

    gram_pipeline<VEC>(rows_next, nsteps, stage, [&](int step) {
        const unsigned char* pa = smem[step % GRAM_STAGES];
        const unsigned char* pb = diag ? pa : pa + F32_PANEL_BYTES;
#pragma unroll
        for (int k = 0; k < GRAM_KSTEP_F32; ++k) {
            const float4* ra = reinterpret_cast<const float4*>(pa + k * F32_ROW_BYTES);
            const float4* rb = reinterpret_cast<const float4*>(pb + k * F32_ROW_BYTES);
            const float4 a0 = ra[ty], a1 = ra[16 + ty];
            const float4 b0 = rb[tx], b1 = rb[16 + tx];
            const float a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
            const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
    });

#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int row = colA + (i >> 2) * 64 + ty * 4 + (i & 3);
        if (row >= d) continue;
        float* grow = G + (long long)row * d;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = colB + (j >> 2) * 64 + tx * 4 + (j & 3);
            if (col < d) atomicAdd(grow + col, acc[i][j]);
        }
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Kernels

extern "C" __global__ void __launch_bounds__(GRAM_THREADS_F16, 2)
    gram_f16(const __half* X, long long ldx, long long rows, int d, const unsigned char* mask,
             float* G) {
    __shared__ __align__(128) unsigned char smem[GRAM_STAGES][F16_STAGE_BYTES];
    long long begin, end;
    split_rows<GRAM_KSTEP_F16>(rows, begin, end);
    if (begin >= end) return;
    int tr, tc;
    decode_lower_tile((int)blockIdx.x, tr, tc);
    if (tr * GRAM_TILE_F16 >= d) return;  // a grid sized for a smaller tile: nothing here
    const bool vec = (reinterpret_cast<unsigned long long>(X) & 15) == 0 && (ldx & 7) == 0;
    if (vec)
        gram_f16_tile<true>(X, ldx, d, mask, G, smem, tr, tc, begin, end);
    else
        gram_f16_tile<false>(X, ldx, d, mask, G, smem, tr, tc, begin, end);
}

extern "C" __global__ void __launch_bounds__(GRAM_THREADS_F32, 2)
    gram_f32(const float* X, long long ldx, long long rows, int d, const unsigned char* mask,
             float* G) {
    __shared__ __align__(128) unsigned char smem[GRAM_STAGES][F32_STAGE_BYTES];
    long long begin, end;
    split_rows<GRAM_KSTEP_F32>(rows, begin, end);
    if (begin >= end) return;
    int tr, tc;
    decode_lower_tile((int)blockIdx.x, tr, tc);
    if (tr * GRAM_TILE_F32 >= d) return;  // a grid sized for a smaller tile: nothing here
    const bool vec = (reinterpret_cast<unsigned long long>(X) & 15) == 0 && (ldx & 3) == 0;
    if (vec)
        gram_f32_tile<true>(X, ldx, d, mask, G, smem, tr, tc, begin, end);
    else
        gram_f32_tile<false>(X, ldx, d, mask, G, smem, tr, tc, begin, end);
}
