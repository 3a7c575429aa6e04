//! Every CUDA kernel of the merge against its CPU twin on fresh random inputs: the Gram
//! kernel on awkward shapes (masked rows and padding columns hold NaN), the finalize and
//! weight-conversion kernels, the device Gram and sums, and the solve.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, PushKernelArg};
use rayon::prelude::*;

use super::compare::{check, f64s, Check};
use crate::backend::cuda::gram::{
    launch_gram, Activations, DeviceGram, DeviceModuleSums, DeviceSiteSums,
};
use crate::backend::cuda::{self, elementwise, CudaDevice};
use crate::backend::{Backend, CpuBackend, CpuTensor, GramUpdate};
use crate::demo::Rng;
use crate::error::Result;

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

/// finalize.cu is specified to match the CPU bit for bit (kernels/README.md: `__fmul_rn`,
/// `__fadd_rn`, `__fdiv_rn` and their f64 forms stop nvcc from contracting into FMAs), so
/// its checks allow no difference: a relative tolerance would hide a contracted FMA.
const EXACT: f64 = 0.0;

/// The Gram kernel on one shape: G starts as random values (so stray writes show), the
/// result is compared with init + XᵀX in f64 on the lower tiles and init elsewhere. Masked
/// rows and the padding columns between d and ldx hold NaN: the kernel must never read
/// them into G (kernels/gram.cu zero-fills them while staging).
pub(super) fn check_gram(
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

/// Every element-wise kernel of kernels/finalize.cu against its Rust twin.
pub(super) fn check_finalize(dev: &CudaDevice, rng: &mut Rng) -> Result<Vec<Check>> {
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
pub(super) fn check_weights(dev: &CudaDevice, rng: &mut Rng) -> Result<Vec<Check>> {
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
pub(super) fn check_device_gram(
    dev: &Arc<CudaDevice>,
    rng: &mut Rng,
    compat: bool,
) -> Result<Check> {
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
pub(super) fn check_sums_and_solve(dev: &Arc<CudaDevice>, rng: &mut Rng) -> Result<Check> {
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
    let (want, _) = crate::backend::solve::solve_layer(&host_g, &host_gw32, &w_mean, d_in, d_out);
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
