// weights.cu: linear weights made on the GPU from a checkpoint's stored bytes.
//
// What it computes
//   stored_to_f32_{f32,f16,bf16}  a stored [rows, cols] tensor → f32, straight
//                                 (out[r*cols+c]) or transposed (out[c*rows+r])
//   place_columns_{f32,f16}       out[r*ld + offset + c] = in[r*cols + c], converted: one
//                                 module's [in, out] weight into a site's fused [in, Σout]
//
// Launch contract
//   stored_to_f32_*: blockDim exactly 256; any gridDim.x (blocks walk 32×32 tiles
//   grid-stride). `in` is the raw upload of the stored bytes (device allocations are
//   256-byte aligned, so any element type may be read from it).
//   place_columns_*: any blockDim and gridDim.x (grid-stride over rows·cols).
//
// Why this design
//   A merge reads every linear weight twice: the forward pass wants it in the activations'
//   type and fused per site, G'W wants it in f32 as [in, out]. Decoding, transposing and
//   converting on the host cost more than the whole forward pass on the GPU (the profile in
//   BENCHMARKS.md), so the host only copies the stored bytes once, and both layouts are made
//   here. The transpose goes through a padded 32×33 shared tile so both the read and the
//   write are coalesced; the straight case uses the same tile walk for one code path.
//   Conversions round as the host's do (f16 → f32 and bf16 → f32 are exact;
//   f32 → f16 is round-to-nearest-even, as the `half` crate's from_f32), so the GPU
//   weights equal what the host path uploaded, bit for bit.

#include <cuda_fp16.h>

namespace {

__device__ __forceinline__ float load_f32(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f32(const __half* p, long long i) {
    return __half2float(p[i]);
}
// bf16 is the top half of an f32: widen the bits (exact, NaN and Inf included).
__device__ __forceinline__ float load_f32(const unsigned short* p, long long i) {
    return __uint_as_float((unsigned int)p[i] << 16);
}

__device__ __forceinline__ void store_from_f32(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_from_f32(__half* p, long long i, float v) {
    p[i] = __float2half_rn(v);
}

template <typename S>
__device__ void stored_to_f32(const S* in, float* out, int rows, int cols, int transposed) {
    __shared__ float tile[32][33];
    const long long tiles_r = ((long long)rows + 31) / 32, tiles_c = ((long long)cols + 31) / 32;
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;  // 32 × 8
    // The loop bound depends only on blockIdx: the barriers inside are uniform per block.
    for (long long t = blockIdx.x; t < tiles_r * tiles_c; t += gridDim.x) {
        const long long r0 = (t / tiles_c) * 32, c0 = (t % tiles_c) * 32;
#pragma unroll
        for (int k = 0; k < 32; k += 8) {
            const long long r = r0 + ty + k, c = c0 + tx;
            if (r < rows && c < cols) tile[ty + k][tx] = load_f32(in, r * cols + c);
        }
        __syncthreads();
        if (transposed) {
#pragma unroll
            for (int k = 0; k < 32; k += 8) {
                const long long c = c0 + ty + k, r = r0 + tx;
                if (r < rows && c < cols) out[c * rows + r] = tile[tx][ty + k];
            }
        } else {
#pragma unroll
            for (int k = 0; k < 32; k += 8) {
                const long long r = r0 + ty + k, c = c0 + tx;
                if (r < rows && c < cols) out[r * cols + c] = tile[ty + k][tx];
            }
        }
        __syncthreads();
    }
}

template <typename T>
__device__ void place_columns(const float* in, T* out, int rows, int cols, int ld, int offset) {
    const long long n = (long long)rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / cols, c = i % cols;
        store_from_f32(out, r * ld + offset + c, in[i]);
    }
}

}  // namespace

#define STORED_TO_F32(SUFFIX, S)                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                       \
        stored_to_f32_##SUFFIX(const S* in, float* out, int rows, int cols, int transposed) { \
        stored_to_f32<S>(in, out, rows, cols, transposed);                                  \
    }
STORED_TO_F32(f32, float)
STORED_TO_F32(f16, __half)
STORED_TO_F32(bf16, unsigned short)

#define PLACE_COLUMNS(SUFFIX, T)                                                            \
    extern "C" __global__ void place_columns_##SUFFIX(const float* in, T* out, int rows,    \
                                                      int cols, int ld, int offset) {       \
        place_columns<T>(in, out, rows, cols, ld, offset);                                  \
    }
PLACE_COLUMNS(f32, float)
PLACE_COLUMNS(f16, __half)
