// decoder.cu: the operations of decoder LLMs (Llama, Mistral, Qwen2, Qwen3) that the GPT-2
// and CLIP forward pass (forward.cu) does not have. GEMMs, residual adds and the embedding
// gather are forward.cu's and cuBLAS's.
//
// What it computes (each in an _f32 and an _f16 version; the _f16 ones read and write
// __half activations and weights but compute in f32)
//   rms_norm    out[r, c] = x[r, c]·rsqrt(mean over c's group of x² + eps)·w[c mod g], on the
//               columns [col0, col0 + ncols) of rows of ld values, groups of g columns (the
//               whole row for a layer's norm, head_dim for Qwen3's q/k norms); out may be x
//               (in place): every warp reads its whole group before it writes any of it
//   rotary      RoPE in place on the heads in columns [col0, col0 + heads·hd): non-interleaved
//               halves, x1' = x1·cos − x2·sin, x2' = x2·cos + x1·sin, the angles of row r's
//               position r mod seq read from a [seq, hd/2] (cos, sin) table in f32
//   silu_mul    [rows, 2f] gate|up → [rows, f] silu(gate)·up, silu(x) = x·σ(x)
//   gqa_attention
//               causal grouped-query attention over a fused [B·S, (H + 2·KV)·hd] q|k|v
//               buffer: query head h reads key/value head h / (H / KV), keys whose mask byte
//               is 0 and later keys excluded, scores scaled by `scale`, softmax in f32
//
// Launch contract
//   rms_norm: blockDim DEC_THREADS, any gridDim.x (grid-stride over rows·groups, one warp
//   per group).
//   rotary, silu_mul: blockDim DEC_THREADS, any gridDim.x (grid-stride over elements).
//   gqa_attention: blockDim DEC_WARPS·32, gridDim (ceil(S/DEC_BQ), H, B), hd ≤ DEC_MAX_HD,
//   no dynamic shared memory (the tiles are static, 41 KB).
//
// Why this design
//   Attention is flash-style: a block takes DEC_BQ query rows of one head (DEC_ROWS per
//   warp) and walks the keys in tiles of DEC_BK, staged in shared memory as f32 (K padded to
//   hd + 1 columns so that the 32 lanes, one key each, read different banks). Each lane
//   computes its key's full dot product against all of its warp's rows at once (one K load
//   serves DEC_ROWS FMAs), the warp takes each row's max and sum with shuffles, and the
//   running (online) softmax rescales the output, which each lane holds for hd/32 columns.
//   Scores only ever live in registers: a 2,048-token sequence needs no T×T buffer, and
//   causal tiles past a block's last query are never loaded. Fully masked rows (no allowed
//   key) produce zeros, as the CPU engine does.
//   RMSNorm is one warp per group: Qwen3's head_dim groups fill a warp, and a layer's row
//   (≤ 8 K values) is read twice from L1. The RoPE table comes from the host, computed as
//   the CPU engine computes it (f32 angles, cos/sin in f64), so both see the same angles.

#include <cuda_fp16.h>

#define DEC_THREADS 256
#define DEC_WARPS 4
#define DEC_ROWS 4
#define DEC_BQ (DEC_WARPS * DEC_ROWS)
#define DEC_BK 32
#define DEC_MAX_HD 128
#define DEC_CHUNKS (DEC_MAX_HD / 32)

namespace {

#include "forward_helpers.cuh"

template <typename T>
__device__ void rms_norm_impl(const T* x, T* out, const T* w, long long rows, int ld, int col0,
                              int ncols, int group, float eps) {
    const int lane = threadIdx.x & 31;
    const long long warp0 = grid_start() >> 5, warps = grid_stride() >> 5;
    const long long groups = rows * (ncols / group);
    for (long long gi = warp0; gi < groups; gi += warps) {
        const long long r = gi / (ncols / group);
        const long long base = r * ld + col0 + (gi - r * (ncols / group)) * group;
        float sq = 0.0f;
        for (int c = lane; c < group; c += 32) {
            const float v = to_f(x[base + c]);
            sq += v * v;
        }
        // The same statistic as the CPU engine: mean of squares, then 1/√(· + eps).
        const float inv = 1.0f / sqrtf(warp_sum(sq) / group + eps);
        // Every lane's reads above precede every lane's writes below (warp_sum synchronises
        // the warp), so out may alias x.
        for (int c = lane; c < group; c += 32)
            out[base + c] = from_f<T>(to_f(w[c]) * (to_f(x[base + c]) * inv));
    }
}

template <typename T>
__device__ void rotary_impl(T* x, const float2* table, long long rows, int ld, int col0,
                            int heads, int hd, int seq) {
    const int half = hd / 2;
    const long long n = rows * heads * half;
    for (long long e = grid_start(); e < n; e += grid_stride()) {
        const long long r = e / ((long long)heads * half);
        const int rem = (int)(e - r * heads * half);
        const int h = rem / half, i = rem % half;
        const float2 cs = table[(r % seq) * half + i];
        T* head = x + r * ld + col0 + (long long)h * hd;
        const float u = to_f(head[i]), v = to_f(head[i + half]);
        head[i] = from_f<T>(u * cs.x - v * cs.y);
        head[i + half] = from_f<T>(v * cs.x + u * cs.y);
    }
}

template <typename T>
__device__ void silu_mul_impl(const T* gate_up, T* out, long long rows, int f) {
    const long long n = rows * f;
    for (long long e = grid_start(); e < n; e += grid_stride()) {
        const long long r = e / f;
        const int c = (int)(e - r * f);
        const float g = to_f(gate_up[r * 2 * f + c]), u = to_f(gate_up[r * 2 * f + f + c]);
        out[e] = from_f<T>(g / (1.0f + expf(-g)) * u);
    }
}

template <typename T>
__device__ void gqa_attention_impl(const T* qkv, T* out, const unsigned char* key_mask, int seq,
                                   int heads, int kv_heads, int hd, float scale) {
    __shared__ float q_s[DEC_BQ][DEC_MAX_HD];
    __shared__ float k_s[DEC_BK][DEC_MAX_HD + 1];
    __shared__ float v_s[DEC_BK][DEC_MAX_HD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (heads / kv_heads);
    const int q0 = blockIdx.x * DEC_BQ;
    const long long stride = (long long)(heads + 2 * kv_heads) * hd;
    const T* base = qkv + (long long)b * seq * stride;
    const long long k_col = (long long)heads * hd + (long long)kvh * hd;
    const long long v_col = k_col + (long long)kv_heads * hd;
    const unsigned char* mask = key_mask ? key_mask + (long long)b * seq : nullptr;

    for (int e = threadIdx.x; e < DEC_BQ * hd; e += DEC_WARPS * 32) {
        const int r = e / hd, c = e % hd, i = q0 + r;
        q_s[r][c] = i < seq ? to_f(base[i * stride + (long long)h * hd + c]) : 0.0f;
    }
    // This warp's rows: q0 + warp·DEC_ROWS + t.
    const int row0 = q0 + warp * DEC_ROWS;
    float m[DEC_ROWS], l[DEC_ROWS], acc[DEC_ROWS][DEC_CHUNKS];
#pragma unroll
    for (int t = 0; t < DEC_ROWS; t++) {
        m[t] = -INFINITY;
        l[t] = 0.0f;
#pragma unroll
        for (int k = 0; k < DEC_CHUNKS; k++) acc[t][k] = 0.0f;
    }
    // Causal: no query of this block sees a key past its last row.
    const int key_end = min(seq, q0 + DEC_BQ);
    for (int j0 = 0; j0 < key_end; j0 += DEC_BK) {
        __syncthreads();  // the previous tile is consumed (and q_s written, the first time)
        for (int e = threadIdx.x; e < DEC_BK * hd; e += DEC_WARPS * 32) {
            const int j = e / hd, c = e % hd, key = j0 + j;
            const bool in = key < key_end;
            k_s[j][c] = in ? to_f(base[key * stride + k_col + c]) : 0.0f;
            v_s[j][c] = in ? to_f(base[key * stride + v_col + c]) : 0.0f;
        }
        __syncthreads();
        if (j0 > row0 + DEC_ROWS - 1 || row0 >= seq) continue;  // uniform across the warp
        const int j = j0 + lane;
        float s[DEC_ROWS];
#pragma unroll
        for (int t = 0; t < DEC_ROWS; t++) s[t] = 0.0f;
        for (int c = 0; c < hd; c++) {
            const float kc = k_s[lane][c];
#pragma unroll
            for (int t = 0; t < DEC_ROWS; t++) s[t] += q_s[warp * DEC_ROWS + t][c] * kc;
        }
        const bool allowed = j < key_end && (!mask || mask[j]);
        float p[DEC_ROWS];
#pragma unroll
        for (int t = 0; t < DEC_ROWS; t++) {
            const int i = row0 + t;
            const float st = allowed && j <= i && i < seq ? s[t] * scale : -INFINITY;
            const float new_m = fmaxf(m[t], warp_max(st));
            if (new_m == -INFINITY) {  // every key so far masked (uniform across the warp)
                p[t] = 0.0f;
                continue;
            }
            p[t] = st == -INFINITY ? 0.0f : expf(st - new_m);
            const float corr = m[t] == -INFINITY ? 0.0f : expf(m[t] - new_m);
            l[t] = l[t] * corr + warp_sum(p[t]);
#pragma unroll
            for (int k = 0; k < DEC_CHUNKS; k++) acc[t][k] *= corr;
            m[t] = new_m;
        }
        const int n = min(DEC_BK, key_end - j0);
        for (int u = 0; u < n; u++) {
            float v[DEC_CHUNKS];
#pragma unroll
            for (int k = 0; k < DEC_CHUNKS; k++) {
                const int c = lane + 32 * k;
                v[k] = c < hd ? v_s[u][c] : 0.0f;
            }
#pragma unroll
            for (int t = 0; t < DEC_ROWS; t++) {
                const float pt = __shfl_sync(0xffffffffu, p[t], u);
#pragma unroll
                for (int k = 0; k < DEC_CHUNKS; k++) acc[t][k] += pt * v[k];
            }
        }
    }
    const int d = heads * hd;
#pragma unroll
    for (int t = 0; t < DEC_ROWS; t++) {
        const int i = row0 + t;
        if (i >= seq) break;
        T* o = out + ((long long)b * seq + i) * d + (long long)h * hd;
        const float inv = l[t] > 0.0f ? 1.0f / l[t] : 0.0f;
#pragma unroll
        for (int k = 0; k < DEC_CHUNKS; k++) {
            const int c = lane + 32 * k;
            if (c < hd) o[c] = from_f<T>(acc[t][k] * inv);
        }
    }
}

}  // namespace

#define DECODER_KERNELS(SUFFIX, T)                                                            \
    extern "C" __global__ void rms_norm_##SUFFIX(const T* x, T* out, const T* w,               \
                                                 long long rows, int ld, int col0, int ncols,  \
                                                 int group, float eps) {                       \
        rms_norm_impl<T>(x, out, w, rows, ld, col0, ncols, group, eps);                        \
    }                                                                                          \
    extern "C" __global__ void rotary_##SUFFIX(T* x, const float2* table, long long rows,      \
                                               int ld, int col0, int heads, int hd, int seq) { \
        rotary_impl<T>(x, table, rows, ld, col0, heads, hd, seq);                              \
    }                                                                                          \
    extern "C" __global__ void silu_mul_##SUFFIX(const T* gate_up, T* out, long long rows,     \
                                                 int f) {                                      \
        silu_mul_impl<T>(gate_up, out, rows, f);                                               \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32)                               \
        gqa_attention_##SUFFIX(const T* qkv, T* out, const unsigned char* key_mask, int seq,   \
                               int heads, int kv_heads, int hd, float scale) {                 \
        gqa_attention_impl<T>(qkv, out, key_mask, seq, heads, kv_heads, hd, scale);            \
    }

DECODER_KERNELS(f32, float)
DECODER_KERNELS(f16, __half)
