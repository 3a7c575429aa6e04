//! `doctor --bench`: the Gram kernel against cuBLAS GemmEx computing the full XᵀX (the
//! baseline, wrapped here for this alone), and the solve, timed with CUDA events after
//! warm-up, with TFLOP/s and the share of the fp16 tensor peak measured in the same run.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use serde::Serialize;

use crate::backend::cuda::gram::{launch_gram, Activations};
use crate::backend::cuda::{self, CudaDevice};
use crate::error::Result;

#[derive(Serialize, Debug, Clone)]
pub struct BenchRow {
    pub what: String,
    pub d: usize,
    pub rows: usize,
    pub ms: f64,
    pub tflops: f64,
    pub percent_of_peak: f64,
}

/// Times `f` with CUDA events after two warm-up runs; milliseconds per call.
fn time_ms(dev: &CudaDevice, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    f()?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = dev.stream().record_event(flags)?;
    for _ in 0..reps {
        f()?;
    }
    let end = dev.stream().record_event(flags)?;
    end.synchronize()?;
    Ok(start.elapsed_ms(&end)? as f64 / reps as f64)
}

/// cublasGemmEx with f16 inputs and f32 output: C[m×n] = A·op(B), column-major, ldc = m.
/// A is m×k (lda ≥ m); B is k×n (ldb ≥ k), or with `trans_b` stored n×k (ldb ≥ n).
#[allow(clippy::too_many_arguments)]
fn gemm_ex_f16(
    dev: &CudaDevice,
    a: &CudaSlice<half::f16>,
    b: &CudaSlice<half::f16>,
    c: &mut CudaSlice<f32>,
    m: usize,
    n: usize,
    k: usize,
    trans_b: bool,
    lda: usize,
    ldb: usize,
) -> Result<()> {
    use cudarc::cublas::sys as bs;
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
    if lda < m || ldb < b_rows {
        return Err(crate::error::Error::invalid(format!(
            "gemm_ex_f16: lda {lda} < m {m} or ldb {ldb} < {b_rows}"
        )));
    }
    // A column-major r×c matrix with leading dimension ld spans (c − 1)·ld + r elements.
    let span = |r: usize, c: usize, ld: usize| {
        if r == 0 || c == 0 {
            0
        } else {
            (c - 1) * ld + r
        }
    };
    cuda::check_len("GemmEx A", a.len(), span(m, k, lda))?;
    cuda::check_len("GemmEx B", b.len(), span(b_rows, b_cols, ldb))?;
    cuda::check_len("GemmEx C", c.len(), span(m, n, m))?;
    let (mi, ni, ki) = (
        cuda::c_int("m", m)?,
        cuda::c_int("n", n)?,
        cuda::c_int("k", k)?,
    );
    let (ldai, ldbi) = (cuda::c_int("lda", lda)?, cuda::c_int("ldb", ldb)?);
    // The raw cuBLAS call does not make the context current itself.
    dev.bind()?;
    let stream = dev.stream();
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (ap, _as) = a.device_ptr(stream);
    let (bp, _bs) = b.device_ptr(stream);
    let (cp, _cs) = c.device_ptr_mut(stream);
    let tb = if trans_b {
        bs::cublasOperation_t::CUBLAS_OP_T
    } else {
        bs::cublasOperation_t::CUBLAS_OP_N
    };
    // SAFETY: the buffers hold at least the spans the dimensions and leading dimensions
    // address (checked above); alpha and beta are host f32 (cuBLAS' default host pointer
    // mode, and CUBLAS_COMPUTE_32F takes f32 scalars); the handle is bound to this stream,
    // and the guards, dropped at the end of the function, order the buffers on it.
    unsafe {
        bs::cublasGemmEx(
            *dev.blas().handle(),
            bs::cublasOperation_t::CUBLAS_OP_N,
            tb,
            mi,
            ni,
            ki,
            &alpha as *const f32 as *const _,
            ap as *const _,
            bs::cudaDataType_t::CUDA_R_16F,
            ldai,
            bp as *const _,
            bs::cudaDataType_t::CUDA_R_16F,
            ldbi,
            &beta as *const f32 as *const _,
            cp as *mut _,
            bs::cudaDataType_t::CUDA_R_32F,
            mi,
            bs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            bs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .result()?;
    Ok(())
}

/// The kernel benchmark. FLOPs are counted as a full XᵀX (2·rows·d²) for both, so the
/// TFLOP/s columns compare directly and their ratio is the speed-up.
pub(super) fn benchmark(dev: &Arc<CudaDevice>, say: &dyn Fn(&str)) -> Result<Vec<BenchRow>> {
    let mut rows_out = Vec::new();
    // The fp16 tensor peak, measured: a large square GemmEx.
    let n = 8192;
    let a = dev.upload(&vec![half::f16::from_f32(0.01); n * n], "peak A")?;
    let mut c = dev.zeros::<f32>(n * n, "peak C")?;
    let ms = time_ms(dev, 10, || {
        gemm_ex_f16(dev, &a, &a, &mut c, n, n, n, false, n, n)
    })?;
    let peak = 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12;
    say(&format!(
        "  measured fp16 tensor peak (GemmEx {n}³, f32 out): {peak:.0} TFLOP/s"
    ));
    rows_out.push(BenchRow {
        what: "peak GemmEx".into(),
        d: n,
        rows: n,
        ms,
        tflops: peak,
        percent_of_peak: 100.0,
    });
    drop((a, c));
    say(&format!(
        "  {:>5} {:>6} {:>14} {:>14} {:>7} {:>9}",
        "d", "rows", "gemmEx TF/s", "gram TF/s", "ratio", "% peak"
    ));
    for d in [768usize, 1024, 3072, 4096] {
        for rows in [4096usize, 65536] {
            let x = dev.upload(&vec![half::f16::from_f32(0.01); rows * d], "X")?;
            let mut g = dev.zeros::<f32>(d * d, "G")?;
            let flops = 2.0 * rows as f64 * (d * d) as f64;
            let reps = if rows * d * d > 100_000_000_000 {
                5
            } else {
                20
            };
            let gemm = time_ms(dev, reps, || {
                gemm_ex_f16(dev, &x, &x, &mut g, d, d, rows, true, d, d)
            })?;
            let ours = time_ms(dev, reps, || {
                launch_gram(
                    dev,
                    &Activations::F16(x.slice(..)),
                    rows,
                    d,
                    d,
                    None,
                    &mut g,
                )
            })?;
            let (tg, to) = (flops / (gemm * 1e-3) / 1e12, flops / (ours * 1e-3) / 1e12);
            say(&format!(
                "  {d:>5} {rows:>6} {tg:>14.1} {to:>14.1} {:>6.2}× {:>8.1}%",
                gemm / ours,
                100.0 * to / peak
            ));
            rows_out.push(BenchRow {
                what: "cublasGemmEx XᵀX".into(),
                d,
                rows,
                ms: gemm,
                tflops: tg,
                percent_of_peak: 100.0 * tg / peak,
            });
            rows_out.push(BenchRow {
                what: "gram_f16".into(),
                d,
                rows,
                ms: ours,
                tflops: to,
                percent_of_peak: 100.0 * to / peak,
            });
        }
    }
    // The solves of GPT-2's two largest layers: mlp.c_fc (d_in 768, d_out 3072) and
    // mlp.c_proj (d_in 3072, d_out 768).
    for (d_in, d_out) in [(768usize, 3072usize), (3072, 768)] {
        let mut g = vec![0.0f32; d_in * d_in];
        (0..d_in).for_each(|i| g[i * d_in + i] = 1.0 + (i % 7) as f32);
        let gs = dev.upload(&g, "Σ G'")?;
        let rhs = dev.upload(&vec![0.5f32; d_in * d_out], "Σ G'W")?;
        let ms = time_ms(dev, 3, || {
            crate::backend::cuda::solve::solve_layer(dev, &gs, &rhs, &rhs, 2, d_in, d_out)
                .map(|_| ())
        })?;
        let flops = (d_in as f64).powi(3) / 3.0 + 2.0 * (d_in * d_in * d_out) as f64;
        say(&format!("  solve d_in={d_in} d_out={d_out}: {ms:.2} ms (f64 Cholesky + solve, {:.2} TFLOP/s f64)", flops / (ms * 1e-3) / 1e12));
        rows_out.push(BenchRow {
            what: "solve_layer (f64)".into(),
            d: d_in,
            rows: d_out,
            ms,
            tflops: flops / (ms * 1e-3) / 1e12,
            percent_of_peak: f64::NAN,
        });
    }
    Ok(rows_out)
}
