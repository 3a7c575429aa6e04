//! `regmean-gpu doctor`: what this machine offers the GPU engine, and a check of every CUDA
//! kernel against its CPU twin on fresh random inputs (outputs poisoned first, every element
//! compared). `--bench` adds the kernel benchmark: the Gram kernel against cuBLAS GemmEx XᵀX,
//! and the solve, with TFLOP/s and the share of the fp16 tensor peak measured in the same run.

mod forward;

use std::sync::Arc;

use cudarc::driver::{CudaSlice, PushKernelArg};
use rayon::prelude::*;
use serde::Serialize;

use crate::backend::cuda::gram::{
    launch_gram, Activations, DeviceGram, DeviceModuleSums, DeviceSiteSums,
};
use crate::backend::cuda::{self, elementwise, CudaDevice, Probe};
use crate::backend::{Backend, CpuBackend, CpuTensor, GramUpdate};
use crate::demo::Rng;
use crate::error::Result;

#[derive(Serialize, Debug)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub worst_rel_err: f64,
    pub tolerance: f64,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub kernels_embedded: bool,
    pub cuda_available: bool,
    pub unavailable_reason: Option<String>,
    pub probe: Probe,
    pub cuda_bindings: &'static str,
    pub kernel_architectures: &'static [&'static str],
    pub nvcc: &'static str,
    pub device: Option<String>,
    pub compute_capability: Option<String>,
    pub libraries: Vec<String>,
    pub checks: Vec<Check>,
    pub all_passed: bool,
    pub bench: Vec<BenchRow>,
}

#[derive(Serialize, Debug, Clone)]
pub struct BenchRow {
    pub what: String,
    pub d: usize,
    pub rows: usize,
    pub ms: f64,
    pub tflops: f64,
    pub percent_of_peak: f64,
}

/// Runs the probe, the kernel checks (when a GPU is usable) and optionally the benchmark.
pub fn run(bench: bool, say: &dyn Fn(&str)) -> Result<Report> {
    let probe = cuda::probe();
    let reason = probe.unavailable_reason();
    let mut report = Report {
        kernels_embedded: probe.kernels_embedded,
        cuda_available: reason.is_none(),
        unavailable_reason: reason.clone(),
        probe,
        cuda_bindings: "CUDA 13.0 (cudarc, dynamic loading)",
        kernel_architectures: cuda::kernels::ARCHITECTURES,
        nvcc: cuda::kernels::NVCC_VERSION,
        device: None,
        compute_capability: None,
        libraries: Vec::new(),
        checks: Vec::new(),
        all_passed: false,
        bench: Vec::new(),
    };
    if reason.is_some() {
        return Ok(report);
    }
    let dev = CudaDevice::open(0)?;
    report.device = Some(dev.name()?);
    let (major, minor) = dev.compute_capability()?;
    report.compute_capability = Some(format!("sm_{major}{minor}"));
    let mut checks = Vec::new();
    let mut rng = Rng::new(0x5eed);
    for (d, rows, ldx, masked) in [
        (45, 37, 45, true),
        (67, 300, 72, false),
        (768, 4096, 768, true),
        (1000, 513, 1003, false),
    ] {
        checks.push(check_gram(&dev, &mut rng, d, rows, ldx, masked, true)?);
        checks.push(check_gram(&dev, &mut rng, d, rows, ldx, masked, false)?);
    }
    checks.extend(check_finalize(&dev, &mut rng)?);
    checks.extend(check_weights(&dev, &mut rng)?);
    checks.push(check_device_gram(&dev, &mut rng, true)?);
    checks.push(check_device_gram(&dev, &mut rng, false)?);
    checks.push(check_sums_and_solve(&dev, &mut rng)?);
    checks.extend(forward::check_forward_ops(&dev, &mut rng)?);
    for c in &checks {
        say(&format!(
            "  {:<44} {}  worst rel err {:.2e} (tol {:.0e})",
            c.name,
            if c.pass { "pass" } else { "FAIL" },
            c.worst_rel_err,
            c.tolerance
        ));
    }
    report.all_passed = checks.iter().all(|c| c.pass);
    report.checks = checks;
    report.libraries = loaded_libraries();
    if bench {
        report.bench = benchmark(&dev, say)?;
    }
    Ok(report)
}

/// Where the CUDA libraries were loaded from (this process's memory map).
fn loaded_libraries() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            ["libcuda.so", "libcublas", "libcusolver", "libnvrtc"]
                .iter()
                .any(|n| p.contains(n))
        })
        .map(str::to_string)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(want).fold(0.0f64, |m, (a, b)| {
        if a.is_nan() || b.is_nan() {
            f64::INFINITY
        } else {
            m.max((a - b).abs())
        }
    });
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    diff / scale.max(1e-30)
}

fn check(name: String, got: &[f64], want: &[f64], tolerance: f64) -> Check {
    let e = rel_err(got, want);
    Check {
        name,
        pass: e <= tolerance,
        worst_rel_err: e,
        tolerance,
    }
}

/// The Gram kernel on one shape: G starts as random values (so stray writes show), the
/// result is compared with init + XᵀX in f64 on the lower tiles and init elsewhere. Masked
/// rows and the padding columns between d and ldx hold NaN: the kernel must never read
/// them into G (kernels/gram.cu zero-fills them while staging).
fn check_gram(
    dev: &Arc<CudaDevice>,
    rng: &mut Rng,
    d: usize,
    rows: usize,
    ldx: usize,
    masked: bool,
    f16: bool,
) -> Result<Check> {
    let mask: Vec<u8> = (0..rows)
        .map(|r| if masked { (r % 5 != 2) as u8 } else { 1 })
        .collect();
    let mut x: Vec<f32> = rng.normals(rows * ldx, 1.0);
    if f16 {
        x.iter_mut()
            .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
    }
    for (r, row) in x.chunks_mut(ldx).enumerate() {
        let poisoned = if mask[r] == 0 {
            &mut row[..]
        } else {
            &mut row[d..]
        };
        poisoned.iter_mut().for_each(|v| *v = f32::NAN);
    }
    let init: Vec<f32> = rng.normals(d * d, 1.0);
    let mut g = dev.upload(&init, "G")?;
    let mask_dev = dev.upload(&mask, "mask")?;
    let mview = mask_dev.slice(..);
    let m = masked.then_some(&mview);
    if f16 {
        let xh: Vec<half::f16> = x.iter().map(|v| half::f16::from_f32(*v)).collect();
        let xd = dev.upload(&xh, "X")?;
        launch_gram(
            dev,
            &Activations::F16(xd.slice(..)),
            rows,
            ldx,
            d,
            m,
            &mut g,
        )?;
    } else {
        let xd = dev.upload(&x, "X")?;
        launch_gram(
            dev,
            &Activations::F32(xd.slice(..)),
            rows,
            ldx,
            d,
            m,
            &mut g,
        )?;
    }
    let got: Vec<f64> = dev.download(&g)?.iter().map(|v| *v as f64).collect();
    let tile = 128; // both Gram kernels tile by 128 (kernels/gram.cu)
    let taken: Vec<usize> = (0..rows).filter(|r| mask[*r] != 0).collect();
    let mut want: Vec<f64> = init.iter().map(|v| *v as f64).collect();
    // Row i of G gets Σ_r x[r,i]·x[r,j] (f64, rows in order) for every j in a tile on or
    // below the diagonal: j < (i/tile + 1)·tile. Strict-upper tiles are never written.
    want.par_chunks_mut(d).enumerate().for_each(|(i, out)| {
        let end = ((i / tile + 1) * tile).min(d);
        let mut s = vec![0.0f64; end];
        for &r in &taken {
            let xr = &x[r * ldx..r * ldx + end];
            let xi = x[r * ldx + i] as f64;
            s.iter_mut().zip(xr).for_each(|(s, v)| *s += xi * *v as f64);
        }
        out[..end].iter_mut().zip(&s).for_each(|(w, s)| *w += s);
    });
    // Compare the accumulated part relative to its own scale.
    let got_delta: Vec<f64> = got.iter().zip(&init).map(|(g, i)| g - *i as f64).collect();
    let want_delta: Vec<f64> = want.iter().zip(&init).map(|(w, i)| w - *i as f64).collect();
    let tol = if f16 { 1e-3 } else { 1e-5 };
    let kind = if f16 { "gram_f16" } else { "gram_f32" };
    Ok(check(
        format!(
            "{kind} d={d} rows={rows} ldx={ldx}{}",
            if masked { " masked" } else { "" }
        ),
        &got_delta,
        &want_delta,
        tol,
    ))
}

/// Launches an element-wise kernel of kernels/finalize.cu over `n` elements.
macro_rules! launch {
    ($dev:expr, $name:expr, $n:expr, $($arg:expr),+) => {{
        let f = $dev.function("finalize", $name)?;
        let mut b = $dev.stream().launch_builder(&f);
        $( b.arg($arg); )+
        // SAFETY: every call below pushes the kernel's exact C types in order (pointers as
        // CudaSlices, int as i32, long long as i64, float as f32, double as f64; checked
        // against kernels/finalize.cu) and buffers of the sizes its contract names for n.
        unsafe { b.launch(elementwise($n)) }?;
    }};
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| *x as f64).collect()
}

/// finalize.cu is specified to match the CPU bit for bit (kernels/README.md: `__fmul_rn`,
/// `__fadd_rn`, `__fdiv_rn` and their f64 forms stop nvcc from contracting into FMAs), so
/// its checks allow no difference: a relative tolerance would hide a contracted FMA.
const EXACT: f64 = 0.0;

/// Every element-wise kernel of kernels/finalize.cu against its Rust twin.
fn check_finalize(dev: &CudaDevice, rng: &mut Rng) -> Result<Vec<Check>> {
    let d = 77usize;
    let n = d * d;
    let a = rng.normals(n, 1.0);
    let b = rng.normals(n, 1.0);
    let nan = vec![f32::NAN; n];
    let mut out = Vec::new();
    let di = d as i32;

    let mut g = dev.upload(&a, "a")?;
    let scale = 0.25f32;
    launch!(dev, "gram_mirror_scale", n, &mut g, &di, &scale);
    let want: Vec<f64> = (0..n)
        .map(|k| {
            let (i, j) = (k / d, k % d);
            (a[i.max(j) * d + i.min(j)] * scale) as f64
        })
        .collect();
    out.push(check(
        "gram_mirror_scale".into(),
        &f64s(&dev.download(&g)?),
        &want,
        EXACT,
    ));

    let mut acc = dev.upload(&a, "acc")?;
    let xtx = dev.upload(&b, "xtx")?;
    let (seen, total) = (7.0f32, 11.0f32);
    launch!(
        dev,
        "gram_running_mean",
        n,
        &mut acc,
        &xtx,
        &di,
        &seen,
        &total
    );
    let want: Vec<f64> = (0..n)
        .map(|k| {
            if k % d <= k / d {
                ((a[k] * seen + b[k]) / total) as f64
            } else {
                a[k] as f64
            }
        })
        .collect();
    out.push(check(
        "gram_running_mean".into(),
        &f64s(&dev.download(&acc)?),
        &want,
        EXACT,
    ));

    let gsrc = dev.upload(&a, "G")?;
    let mut reduced = dev.upload(&nan, "reduced")?;
    let mut sum = dev.upload(&b, "sum")?;
    let (ratio, diag_mult) = (0.6f32, (1.0f32 - 0.6) + 0.6);
    launch!(
        dev,
        "reduce_offdiag_accumulate",
        n,
        &gsrc,
        &mut reduced,
        &mut sum,
        &di,
        &ratio,
        &diag_mult
    );
    let red: Vec<f64> = (0..n)
        .map(|k| (a[k] * if k / d == k % d { diag_mult } else { ratio }) as f64)
        .collect();
    let sum_want: Vec<f64> = red
        .iter()
        .zip(&b)
        .map(|(r, b)| (*r as f32 + b) as f64)
        .collect();
    out.push(check(
        "reduce_offdiag_accumulate (G')".into(),
        &f64s(&dev.download(&reduced)?),
        &red,
        EXACT,
    ));
    out.push(check(
        "reduce_offdiag_accumulate (Σ G')".into(),
        &f64s(&dev.download(&sum)?),
        &sum_want,
        EXACT,
    ));

    let mut y = dev.upload(&a, "y")?;
    let x = dev.upload(&b, "x")?;
    let (nn, alpha) = (n as i64, 0.5f32);
    launch!(dev, "axpy_f32", n, &mut y, &x, &nn, &alpha);
    let want: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(a, b)| (a + alpha * b) as f64)
        .collect();
    out.push(check(
        "axpy_f32".into(),
        &f64s(&dev.download(&y)?),
        &want,
        EXACT,
    ));

    let src = dev.upload(&a, "src")?;
    let mut wide: CudaSlice<f64> = dev.upload(&vec![f64::NAN; n], "f64")?;
    launch!(dev, "f32_to_f64", n, &src, &mut wide, &nn);
    out.push(check(
        "f32_to_f64".into(),
        &dev.download(&wide)?,
        &f64s(&a),
        EXACT,
    ));
    let mut narrow = dev.upload(&nan, "f32")?;
    launch!(dev, "f64_to_f32", n, &wide, &mut narrow, &nn);
    out.push(check(
        "f64_to_f32".into(),
        &f64s(&dev.download(&narrow)?),
        &f64s(&a),
        EXACT,
    ));

    let lambda = 0.125f64;
    launch!(dev, "add_diagonal_f64", d, &mut wide, &di, &lambda);
    let want: Vec<f64> = (0..n)
        .map(|k| a[k] as f64 + if k / d == k % d { lambda } else { 0.0 })
        .collect();
    out.push(check(
        "add_diagonal_f64".into(),
        &dev.download(&wide)?,
        &want,
        EXACT,
    ));

    let mut diag: CudaSlice<f64> = dev.upload(&vec![f64::NAN; d], "diag")?;
    launch!(dev, "diagonal_f64", d, &wide, &mut diag, &di);
    let want: Vec<f64> = (0..d).map(|i| a[i * d + i] as f64 + lambda).collect();
    out.push(check(
        "diagonal_f64".into(),
        &dev.download(&diag)?,
        &want,
        EXACT,
    ));

    let mut bw: CudaSlice<f64> = dev.upload(&f64s(&a), "B")?;
    let w = dev.upload(&b, "W")?;
    let alpha64 = 0.75f64;
    launch!(dev, "axpy_f64_from_f32", n, &mut bw, &w, &nn, &alpha64);
    let want: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(a, b)| *a as f64 + alpha64 * *b as f64)
        .collect();
    out.push(check(
        "axpy_f64_from_f32".into(),
        &dev.download(&bw)?,
        &want,
        EXACT,
    ));

    for (label, poison) in [
        ("any_nonfinite_f32 (clean)", None),
        ("any_nonfinite_f32 (NaN)", Some(f32::NAN)),
        ("any_nonfinite_f32 (Inf)", Some(f32::INFINITY)),
    ] {
        let mut v = a.clone();
        if let Some(p) = poison {
            v[n - 3] = p;
        }
        let got = crate::backend::cuda::any_nonfinite(dev, &dev.upload(&v, "x")?)?;
        let pass = got == poison.is_some();
        out.push(Check {
            name: label.into(),
            pass,
            worst_rel_err: if pass { 0.0 } else { 1.0 },
            tolerance: 0.0,
        });
    }
    Ok(out)
}

/// kernels/weights.cu's stored → f32 conversion (straight and transposed, from each float
/// type a checkpoint may hold) against the host decode, which it must equal bit for bit.
fn check_weights(dev: &CudaDevice, rng: &mut Rng) -> Result<Vec<Check>> {
    use crate::io::safetensors::{decode_f32, decode_f32_transposed};
    use crate::io::Dtype;
    let (rows, cols) = (45usize, 70usize);
    let values = rng.normals(rows * cols, 3.0);
    let mut out = Vec::new();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|&v| match dtype {
                Dtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                _ => v.to_le_bytes().to_vec(),
            })
            .collect();
        let stored = dev.upload(&bytes, "stored weight")?;
        for transposed in [false, true] {
            let got = cuda::stored_to_f32(dev, &dtype, &stored, rows, cols, transposed)?;
            let want = if transposed {
                decode_f32_transposed(&dtype, &bytes, rows, cols)
            } else {
                decode_f32(&dtype, &bytes)
            }
            .expect("a float type");
            out.push(check(
                format!(
                    "stored_to_f32_{} ({})",
                    dtype.name().to_lowercase(),
                    if transposed { "transposed" } else { "straight" }
                ),
                &f64s(&dev.download(&got)?),
                &f64s(&want),
                EXACT,
            ));
        }
    }
    Ok(out)
}

/// `DeviceGram` over three batches against the CPU engine's accumulator.
fn check_device_gram(dev: &Arc<CudaDevice>, rng: &mut Rng, compat: bool) -> Result<Check> {
    let d = 96;
    let mut gpu = DeviceGram::new(dev, d, compat)?;
    let mut cpu_acc = CpuBackend.zeros(d, d)?;
    let mut seen = 0u64;
    for rows in [40usize, 17, 64] {
        let x = rng.normals(rows * d, 1.0);
        let mask: Vec<u8> = (0..rows).map(|r| (r % 4 != 3) as u8).collect();
        let real = mask.iter().filter(|m| **m != 0).count() as u64;
        let xd = dev.upload(&x, "X")?;
        let md = dev.upload(&mask, "mask")?;
        let row_mask = crate::backend::cuda::gram::RowMask {
            mask: md.slice(..),
            real_rows: real,
        };
        gpu.accumulate(&Activations::F32(xd.slice(..)), rows, d, Some(&row_mask))?;
        let xt = CpuTensor::new(x, rows, d);
        if compat {
            CpuBackend.gram_update(&mut cpu_acc, &xt, None, GramUpdate::RunningMean { seen })?;
            seen += rows as u64;
        } else {
            CpuBackend.gram_update(&mut cpu_acc, &xt, Some(&mask), GramUpdate::Sum)?;
            seen += real;
        }
    }
    let (g, rows) = gpu.finish()?;
    let got = f64s(&dev.download(&g)?);
    let scale = if compat { 1.0 } else { 1.0 / seen as f64 };
    let want: Vec<f64> = (0..d * d)
        .map(|k| {
            let (i, j) = (k / d, k % d);
            cpu_acc.data[i.max(j) * d + i.min(j)] as f64 * scale
        })
        .collect();
    let mut c = check(
        format!(
            "DeviceGram ({})",
            if compat {
                "FusionBench running mean"
            } else {
                "masked sum"
            }
        ),
        &got,
        &want,
        1e-5,
    );
    c.pass &= rows == seen;
    Ok(c)
}

/// Device sums (reduction, cuBLAS G'W) and the cuSOLVER solve against the CPU engine.
fn check_sums_and_solve(dev: &Arc<CudaDevice>, rng: &mut Rng) -> Result<Check> {
    let (d_in, d_out, k) = (64usize, 40usize, 3usize);
    let mut site = DeviceSiteSums::new(dev, d_in)?;
    let mut module = DeviceModuleSums::new(dev, d_in, d_out)?;
    let (ratio, diag_mult) = (0.6f32, (1.0f32 - 0.6) + 0.6);
    let mut host_g = vec![0.0f32; d_in * d_in];
    let mut host_gw = vec![0.0f64; d_in * d_out];
    let mut host_w = vec![0.0f32; d_in * d_out];
    for _ in 0..k {
        let x = rng.normals(200 * d_in, 1.0);
        let mut g = vec![0.0f32; d_in * d_in];
        for r in 0..200 {
            for i in 0..d_in {
                for j in 0..d_in {
                    g[i * d_in + j] += x[r * d_in + i] * x[r * d_in + j] / 200.0;
                }
            }
        }
        let w = rng.normals(d_in * d_out, 0.1);
        site.add(dev, &dev.upload(&g, "G")?, ratio, diag_mult)?;
        module.add(dev, &site.reduced, &dev.upload(&w, "W")?)?;
        for i in 0..d_in {
            for j in 0..d_in {
                let gr = g[i * d_in + j] * if i == j { diag_mult } else { ratio };
                host_g[i * d_in + j] += gr;
                for o in 0..d_out {
                    host_gw[i * d_out + o] += gr as f64 * w[j * d_out + o] as f64;
                }
            }
        }
        host_w.iter_mut().zip(&w).for_each(|(s, v)| *s += v);
    }
    let host_gw32: Vec<f32> = host_gw.iter().map(|v| *v as f32).collect();
    let w_mean: Vec<f32> = host_w.iter().map(|v| v / k as f32).collect();
    let (want, _) = crate::regmean::solve::solve_layer(&host_g, &host_gw32, &w_mean, d_in, d_out);
    let (x, outcome) = crate::backend::cuda::solve::solve_layer(
        dev,
        &site.gram_sum,
        &module.gw_sum,
        &module.w_sum,
        k,
        d_in,
        d_out,
    )?;
    let mut c = check(
        "sums (cuBLAS G'W) + cuSOLVER solve".into(),
        &f64s(&dev.download(&x)?),
        &f64s(&want),
        1e-4,
    );
    c.pass &= !outcome.is_fallback();
    Ok(c)
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
fn benchmark(dev: &Arc<CudaDevice>, say: &dyn Fn(&str)) -> Result<Vec<BenchRow>> {
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
