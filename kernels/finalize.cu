// finalize.cu: element-wise kernels around the Gram accumulation and the f64 solve.
//
// What it computes
//   gram_mirror_scale         lower triangle → full symmetric matrix, times `scale`
//   gram_running_mean         FusionBench's running mean of Grams, on the lower triangle
//   reduce_offdiag_accumulate RegMean's off-diagonal reduction, written out and summed
//   axpy_f32, axpy_f64_from_f32, f32_to_f64, f64_to_f32, add_diagonal_f64, diagonal_f64,
//   any_nonfinite_f32: the small vector steps of the solve and its checks (the transpose
//   is weights.cu's stored_to_f32_f32).
//
// Launch contract
//   blockDim = (256); gridDim.x = min(ceil(n / 256), 65535) with n the element count
//   (d*d for the d×d kernels, d for the diagonal ones). Every kernel loops grid-stride, so
//   it is correct for any grid and any block size. No shared memory is configured by the
//   host.
//
// Why this design
//   The d×d kernels walk rows with blocks and columns with threads (grid-stride on both):
//   no 64-bit division per element, coalesced row access, and any grid works. The lower
//   triangle kernels visit only j <= i.
//   The CPU engine is the oracle, and Rust never contracts a*b + c into an FMA, so wherever
//   a product is added the kernels use __fmul_rn / __fadd_rn / __fdiv_rn (and the f64
//   equivalents): nvcc would otherwise fuse them, and the results would differ from the CPU
//   in the last bit (gram_running_mean is specified as that exact f32 operation order).

namespace {

__device__ __forceinline__ long long grid_start() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long grid_stride() {
    return (long long)gridDim.x * blockDim.x;
}

}  // namespace

// For i >= j: v = G[i*d+j] * scale; G[i*d+j] = v; G[j*d+i] = v. Each lower element is read
// and written by one thread only, and its mirror is written by that same thread: no race.
extern "C" __global__ void gram_mirror_scale(float* G, int d, float scale) {
    for (long long i = blockIdx.x; i < d; i += gridDim.x) {
        float* row = G + i * d;
        for (long long j = threadIdx.x; j <= i; j += blockDim.x) {
            const float v = __fmul_rn(row[j], scale);
            row[j] = v;
            G[j * d + i] = v;
        }
    }
}

// For i >= j: acc = (acc * seen + xtx) / total, rounded after every operation.
extern "C" __global__ void gram_running_mean(float* acc, const float* xtx, int d, float seen,
                                             float total) {
    for (long long i = blockIdx.x; i < d; i += gridDim.x) {
        float* a = acc + i * d;
        const float* x = xtx + i * d;
        for (long long j = threadIdx.x; j <= i; j += blockDim.x)
            a[j] = __fdiv_rn(__fadd_rn(__fmul_rn(a[j], seen), x[j]), total);
    }
}

// g = G[i*d+j] * (i == j ? diag_mult : ratio); reduced[i*d+j] = g; sum[i*d+j] += g.
extern "C" __global__ void reduce_offdiag_accumulate(const float* G, float* reduced, float* sum,
                                                     int d, float ratio, float diag_mult) {
    for (long long i = blockIdx.x; i < d; i += gridDim.x) {
        const long long base = i * d;
        for (long long j = threadIdx.x; j < d; j += blockDim.x) {
            const float g = __fmul_rn(G[base + j], i == j ? diag_mult : ratio);
            reduced[base + j] = g;
            sum[base + j] = __fadd_rn(sum[base + j], g);
        }
    }
}

// y[i] += alpha * x[i]
extern "C" __global__ void axpy_f32(float* y, const float* x, long long n, float alpha) {
    for (long long i = grid_start(); i < n; i += grid_stride())
        y[i] = __fadd_rn(y[i], __fmul_rn(alpha, x[i]));
}

extern "C" __global__ void f32_to_f64(const float* in, double* out, long long n) {
    for (long long i = grid_start(); i < n; i += grid_stride()) out[i] = (double)in[i];
}

// Round to nearest even, like Rust's `as f32`.
extern "C" __global__ void f64_to_f32(const double* in, float* out, long long n) {
    for (long long i = grid_start(); i < n; i += grid_stride()) out[i] = __double2float_rn(in[i]);
}

// A[i*d+i] += lambda
extern "C" __global__ void add_diagonal_f64(double* A, int d, double lambda) {
    for (long long i = grid_start(); i < d; i += grid_stride())
        A[i * d + i] = __dadd_rn(A[i * d + i], lambda);
}

// B[i] += alpha * (double)W[i]
extern "C" __global__ void axpy_f64_from_f32(double* B, const float* W, long long n,
                                             double alpha) {
    for (long long i = grid_start(); i < n; i += grid_stride())
        B[i] = __dadd_rn(B[i], __dmul_rn(alpha, (double)W[i]));
}

// diag[i] = A[i*d+i]
extern "C" __global__ void diagonal_f64(const double* A, double* diag, int d) {
    for (long long i = grid_start(); i < d; i += grid_stride()) diag[i] = A[i * d + i];
}

// flag[0] = 1 if any x[i] is NaN or ±Inf (the host zeroes it). Tested on the exponent bits,
// so it holds even if this file is ever built with fast-math. One store per warp at most.
extern "C" __global__ void any_nonfinite_f32(const float* x, long long n, int* flag) {
    bool bad = false;
    for (long long i = grid_start(); i < n; i += grid_stride())
        bad |= (__float_as_uint(x[i]) & 0x7f800000u) == 0x7f800000u;
    if (__any_sync(__activemask(), bad) && (threadIdx.x & 31) == 0) *flag = 1;
}
