// forward.cu: the model forward pass on the GPU, around cuBLAS GEMMs.
//
// What it computes (each in an _f32 and an _f16 version; the _f16 ones read and write
// __half activations and weights but compute in f32)
//   layer_norm        out = LN(x)·gamma + beta, f32 statistics (two passes over the row)
//   add_layer_norm    h += y, then out = LN(h): the residual add fused with the next norm
//   bias_act          x = act(x + bias), act 0 none, 1 gelu_new, 2 quick_gelu (GEMM epilogue)
//   add               x += y
//   attention         softmax(q·kᵀ/√hd + masks)·v over a fused [B·S, 3·H·hd] q|k|v buffer
//   embed_tokens      out[r] = wte[ids[r]] + wpe[r mod seq]
//   clip_tokens       out[b, t] = (t == 0 ? class : patches[b, t−1]) + pos[t]
//   im2col            [B, C, S, S] pixels → [B·(S/p)², C·p·p] rows in the conv weight's order
//   gather_rows       out[i] = x[idx[i]]
//
// Launch contract
//   Element-wise kernels (bias_act, add, embed_tokens, clip_tokens, im2col, gather_rows):
//   blockDim 256, any gridDim.x (grid-stride over all elements).
//   layer_norm, add_layer_norm: blockDim 256, any gridDim.x (grid-stride over rows),
//   dynamic shared memory d·4 bytes.
//   attention: blockDim ATTN_WARPS·32, gridDim (ceil(S/ATTN_WARPS), H, B), hd ≤ ATTN_MAX_HD.
//
// Why this design
//   Attention: one warp per query row, its lanes over 32 keys at a time: each lane computes
//   one full q·k dot product (no shuffles in the inner loop), the warp takes the chunk's max
//   and sum with shuffles, and the running (online) softmax rescales the output, which each
//   lane holds for hd/32 dimensions. Scores never touch memory, so any sequence length
//   works in registers; at CLIP's 50 and GPT-2's ≤1024 tokens the keys stay in L2.
//   Fully masked rows (no allowed key) produce zeros, as the CPU engine does.
//   LayerNorm keeps the row in shared memory as f32 so the variance is the exact two-pass
//   one (torch's biased variance) rather than E[x²] − E[x]², which cancels badly.

#include <cuda_fp16.h>

#define FWD_THREADS 256
#define ATTN_WARPS 4
#define ATTN_MAX_HD 256

namespace {

#include "forward_helpers.cuh"

// Sum over the block (FWD_THREADS threads); every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float partial[FWD_THREADS / 32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < FWD_THREADS / 32 ? partial[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();  // partial and total are reused by the next call
    return r;
}

__device__ __forceinline__ float gelu_new(float x) {
    const float c = 0.7978845608028654f;  // √(2/π)
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float quick_gelu(float x) { return x / (1.0f + expf(-1.702f * x)); }

template <typename T, bool ADD>
__device__ void layer_norm_rows(T* h, const T* y, const T* gamma, const T* beta, T* out,
                                int rows, int d, float eps) {
    extern __shared__ float row[];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        T* hr = h + (long long)r * d;
        float sum = 0.0f;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float v = to_f(hr[c]);
            if (ADD) {
                // Rounded to T as the residual stream is stored, so the norm sees what the
                // next residual add will read.
                T s = from_f<T>(v + to_f(y[(long long)r * d + c]));
                hr[c] = s;
                v = to_f(s);
            }
            row[c] = v;
            sum += v;
        }
        float mean = block_sum(sum) / d;
        float sq = 0.0f;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            float t = row[c] - mean;
            sq += t * t;
        }
        float rstd = rsqrtf(block_sum(sq) / d + eps);
        for (int c = threadIdx.x; c < d; c += blockDim.x)
            out[(long long)r * d + c] =
                from_f<T>((row[c] - mean) * rstd * to_f(gamma[c]) + to_f(beta[c]));
    }
}

template <typename T>
__device__ void bias_act_impl(T* x, const T* bias, long long rows, int cols, int act) {
    long long n = rows * cols;
    for (long long i = grid_start(); i < n; i += grid_stride()) {
        float v = to_f(x[i]);
        if (bias) v += to_f(bias[i % cols]);
        if (act == 1) v = gelu_new(v);
        else if (act == 2) v = quick_gelu(v);
        x[i] = from_f<T>(v);
    }
}

template <typename T>
__device__ void attention_impl(const T* qkv, T* out, const unsigned char* key_mask, int seq,
                               int heads, int hd, int causal, float scale) {
    __shared__ float q_s[ATTN_WARPS][ATTN_MAX_HD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * ATTN_WARPS + warp;
    const int h = blockIdx.y, b = blockIdx.z;
    if (i >= seq) return;  // whole warps leave together: no block-wide barrier follows
    const int d = heads * hd;
    const long long stride = 3LL * d;
    const T* base = qkv + (long long)b * seq * stride;
    for (int c = lane; c < hd; c += 32) q_s[warp][c] = to_f(base[i * stride + h * hd + c]);
    __syncwarp();
    const unsigned char* mask = key_mask ? key_mask + (long long)b * seq : nullptr;
    float m = -INFINITY, l = 0.0f;
    float acc[ATTN_MAX_HD / 32];
#pragma unroll
    for (int r = 0; r < ATTN_MAX_HD / 32; r++) acc[r] = 0.0f;
    const int keys = causal ? i + 1 : seq;
    for (int j0 = 0; j0 < keys; j0 += 32) {
        const int j = j0 + lane;
        float s = -INFINITY;
        if (j < keys && (!mask || mask[j])) {
            const T* k = base + j * stride + d + h * hd;
            float dot = 0.0f;
            for (int c = 0; c < hd; c++) dot += q_s[warp][c] * to_f(k[c]);
            s = dot * scale;
        }
        const float new_m = fmaxf(m, warp_max(s));
        if (new_m == -INFINITY) continue;  // every key so far masked
        const float p = s == -INFINITY ? 0.0f : expf(s - new_m);
        const float corr = m == -INFINITY ? 0.0f : expf(m - new_m);
        l = l * corr + warp_sum(p);
#pragma unroll
        for (int r = 0; r < ATTN_MAX_HD / 32; r++) acc[r] *= corr;
        const int n = min(32, keys - j0);
        for (int t = 0; t < n; t++) {
            const float pt = __shfl_sync(0xffffffffu, p, t);
            if (pt == 0.0f) continue;  // uniform across the warp
            const T* v = base + (j0 + t) * stride + 2 * d + h * hd;
#pragma unroll
            for (int r = 0; r < ATTN_MAX_HD / 32; r++) {
                const int c = lane + 32 * r;
                if (c < hd) acc[r] += pt * to_f(v[c]);
            }
        }
        m = new_m;
    }
    T* o = out + ((long long)b * seq + i) * d + h * hd;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int r = 0; r < ATTN_MAX_HD / 32; r++) {
        const int c = lane + 32 * r;
        if (c < hd) o[c] = from_f<T>(acc[r] * inv);
    }
}

template <typename T>
__device__ void embed_tokens_impl(const T* wte, const T* wpe, const unsigned* ids, T* out,
                                  long long rows, int seq, int d) {
    long long n = rows * d;
    for (long long e = grid_start(); e < n; e += grid_stride()) {
        long long r = e / d;
        int c = (int)(e - r * d);
        out[e] = from_f<T>(to_f(wte[(long long)ids[r] * d + c]) +
                           to_f(wpe[(long long)(r % seq) * d + c]));
    }
}

template <typename T>
__device__ void clip_tokens_impl(const T* patches, const T* cls, const T* pos, T* out,
                                 int batch, int tokens, int d) {
    long long n = (long long)batch * tokens * d;
    for (long long e = grid_start(); e < n; e += grid_stride()) {
        long long r = e / d;
        int c = (int)(e - r * d);
        int b = (int)(r / tokens), t = (int)(r % tokens);
        float v = t == 0 ? to_f(cls[c])
                         : to_f(patches[((long long)b * (tokens - 1) + t - 1) * d + c]);
        out[e] = from_f<T>(v + to_f(pos[(long long)t * d + c]));
    }
}

template <typename T>
__device__ void im2col_impl(const T* pixels, T* out, int batch, int channels, int size,
                            int patch) {
    const int g = size / patch, k = channels * patch * patch;
    long long n = (long long)batch * g * g * k;
    for (long long e = grid_start(); e < n; e += grid_stride()) {
        long long row = e / k;
        int col = (int)(e - row * k);
        int b = (int)(row / (g * g)), cell = (int)(row % (g * g));
        int gy = cell / g, gx = cell % g;
        int ch = col / (patch * patch), rem = col % (patch * patch);
        int y = rem / patch, x = rem % patch;
        out[e] = pixels[(((long long)b * channels + ch) * size + gy * patch + y) * size +
                        gx * patch + x];
    }
}

template <typename T>
__device__ void gather_rows_impl(const T* x, const int* idx, T* out, int n, int cols) {
    long long total = (long long)n * cols;
    for (long long e = grid_start(); e < total; e += grid_stride()) {
        long long r = e / cols;
        int c = (int)(e - r * cols);
        out[e] = x[(long long)idx[r] * cols + c];
    }
}

}  // namespace

#define FORWARD_KERNELS(SUFFIX, T)                                                          \
    extern "C" __global__ void layer_norm_##SUFFIX(const T* x, const T* gamma, const T* beta, \
                                                   T* out, int rows, int d, float eps) {     \
        layer_norm_rows<T, false>(const_cast<T*>(x), nullptr, gamma, beta, out, rows, d, eps); \
    }                                                                                        \
    extern "C" __global__ void add_layer_norm_##SUFFIX(T* h, const T* y, const T* gamma,     \
                                                       const T* beta, T* out, int rows, int d, \
                                                       float eps) {                          \
        layer_norm_rows<T, true>(h, y, gamma, beta, out, rows, d, eps);                      \
    }                                                                                        \
    extern "C" __global__ void bias_act_##SUFFIX(T* x, const T* bias, long long rows,        \
                                                 int cols, int act) {                        \
        bias_act_impl<T>(x, bias, rows, cols, act);                                          \
    }                                                                                        \
    extern "C" __global__ void add_##SUFFIX(T* x, const T* y, long long n) {                 \
        for (long long i = grid_start(); i < n; i += grid_stride())                          \
            x[i] = from_f<T>(to_f(x[i]) + to_f(y[i]));                                       \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)                            \
        attention_##SUFFIX(const T* qkv, T* out, const unsigned char* key_mask, int seq,     \
                           int heads, int hd, int causal, float scale) {                     \
        attention_impl<T>(qkv, out, key_mask, seq, heads, hd, causal, scale);                \
    }                                                                                        \
    extern "C" __global__ void embed_tokens_##SUFFIX(const T* wte, const T* wpe,             \
                                                     const unsigned* ids, T* out,            \
                                                     long long rows, int seq, int d) {       \
        embed_tokens_impl<T>(wte, wpe, ids, out, rows, seq, d);                              \
    }                                                                                        \
    extern "C" __global__ void clip_tokens_##SUFFIX(const T* patches, const T* cls,          \
                                                    const T* pos, T* out, int batch,         \
                                                    int tokens, int d) {                     \
        clip_tokens_impl<T>(patches, cls, pos, out, batch, tokens, d);                       \
    }                                                                                        \
    extern "C" __global__ void im2col_##SUFFIX(const T* pixels, T* out, int batch,           \
                                               int channels, int size, int patch) {          \
        im2col_impl<T>(pixels, out, batch, channels, size, patch);                           \
    }                                                                                        \
    extern "C" __global__ void gather_rows_##SUFFIX(const T* x, const int* idx, T* out,      \
                                                    int n, int cols) {                       \
        gather_rows_impl<T>(x, idx, out, n, cols);                                           \
    }

FORWARD_KERNELS(f32, float)
FORWARD_KERNELS(f16, __half)
