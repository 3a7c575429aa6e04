//! The per-layer RegMean solve on the device: f64 Cholesky with cuSOLVER (potrf, then potrs),
//! every `info` checked, and the same fallback as the CPU engine (regmean::solve): damping
//! towards the average weights, then the plain average.

use cudarc::cusolver::sys as cs;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::{elementwise, CudaDevice};
use crate::error::{Error, Result};
use crate::regmean::solve::{SolveOutcome, MIN_RCOND};

/// Solves (Σ G') W = Σ G'W for W `[d_in, d_out]` (row-major f32, on the device), given Σ W
/// over `k` models for the fallback.
pub fn solve_layer(
    dev: &CudaDevice,
    gram_sum: &CudaSlice<f32>,
    gw_sum: &CudaSlice<f32>,
    w_sum: &CudaSlice<f32>,
    k: usize,
    d_in: usize,
    d_out: usize,
) -> Result<(CudaSlice<f32>, SolveOutcome)> {
    // cuSOLVER is column-major: Σ G' is symmetric (layout-free); the right-hand side and the
    // average are transposed into column-major d_in × d_out.
    let rhs_t = transpose(dev, gw_sum, d_in, d_out)?;
    let reason = match attempt(dev, gram_sum, &rhs_t, None, d_in, d_out)? {
        Ok(x) => return Ok((x, SolveOutcome::Cholesky)),
        Err(reason) => reason,
    };
    let diag = diagonal(dev, &to_f64(dev, gram_sum)?, d_in)?;
    let mean_diag = diag.iter().sum::<f64>() / d_in as f64;
    if mean_diag.is_finite() && mean_diag > 0.0 {
        let w_mean_t = transpose(dev, w_sum, d_in, d_out)?;
        let mut epsilon = 1e-8;
        while epsilon <= 0.1 + 1e-12 {
            let lambda = epsilon * mean_diag;
            if let Ok(x) = attempt(
                dev,
                gram_sum,
                &rhs_t,
                Some((lambda, &w_mean_t, k)),
                d_in,
                d_out,
            )? {
                return Ok((x, SolveOutcome::Damped { epsilon, reason }));
            }
            epsilon *= 10.0;
        }
    }
    let mut avg = dev.zeros::<f32>(d_in * d_out, "average weights")?;
    super::gram::axpy(dev, &mut avg, w_sum, 1.0 / k as f32)?;
    Ok((avg, SolveOutcome::Average { reason }))
}

/// One factorise-and-solve, optionally damped: (A + λI) X = B + (λ/k)·ΣW.
/// Ok(Err(reason)) when the system is not usable; Err for device failures.
fn attempt(
    dev: &CudaDevice,
    gram_sum: &CudaSlice<f32>,
    rhs_t: &CudaSlice<f32>,
    damping: Option<(f64, &CudaSlice<f32>, usize)>,
    d: usize,
    n_rhs: usize,
) -> Result<std::result::Result<CudaSlice<f32>, String>> {
    let mut a = to_f64(dev, gram_sum)?;
    let mut b = to_f64(dev, rhs_t)?;
    if let Some((lambda, w_sum_t, k)) = damping {
        let f = dev.function("finalize", "add_diagonal_f64")?;
        let di = d as i32;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&mut a).arg(&di).arg(&lambda);
        // SAFETY: a holds d·d f64 values.
        unsafe { l.launch(elementwise(d)) }?;
        let f = dev.function("finalize", "axpy_f64_from_f32")?;
        let (n, alpha) = ((d * n_rhs) as i64, lambda / k as f64);
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&mut b).arg(w_sum_t).arg(&n).arg(&alpha);
        // SAFETY: b and w_sum_t hold d·n_rhs values.
        unsafe { l.launch(elementwise(d * n_rhs)) }?;
    }
    let handle = dev.solver().cu();
    let lower = cs::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let di = d as i32;
    let mut info = dev.zeros::<i32>(1, "cuSOLVER info")?;
    let mut lwork = 0i32;
    {
        let stream = dev.stream();
        let (a_ptr, _a_sync) = a.device_ptr_mut(stream);
        // SAFETY: handle is bound to this stream; a is a live d×d f64 buffer; lwork is a
        // host i32 the call writes.
        unsafe {
            cs::cusolverDnDpotrf_bufferSize(handle, lower, di, a_ptr as *mut f64, di, &mut lwork)
        }
        .result()?;
    }
    let mut work = dev.zeros::<f64>(lwork.max(1) as usize, "cuSOLVER workspace")?;
    {
        let stream = dev.stream();
        let (a_ptr, _a_sync) = a.device_ptr_mut(stream);
        let (w_ptr, _w_sync) = work.device_ptr_mut(stream);
        let (i_ptr, _i_sync) = info.device_ptr_mut(stream);
        // SAFETY: buffers sized as queried above; all on the handle's stream.
        unsafe {
            cs::cusolverDnDpotrf(
                handle,
                lower,
                di,
                a_ptr as *mut f64,
                di,
                w_ptr as *mut f64,
                lwork,
                i_ptr as *mut i32,
            )
        }
        .result()?;
    }
    let status = dev.download(&info)?[0];
    if status > 0 {
        return Ok(Err(format!(
            "Cholesky failed at column {status}: the summed Gram is not positive definite"
        )));
    }
    if status < 0 {
        return Err(Error::Numerical(format!(
            "cuSOLVER potrf rejected argument {}",
            -status
        )));
    }
    let diag = diagonal(dev, &a, d)?;
    let (lo, hi) = diag.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    let rcond = (lo / hi).powi(2);
    if rcond.is_nan() || rcond < MIN_RCOND {
        return Ok(Err(format!(
            "the summed Gram is near-singular (reciprocal condition ≈ {rcond:.1e})"
        )));
    }
    {
        let stream = dev.stream();
        let (a_ptr, _a_sync) = a.device_ptr(stream);
        let (b_ptr, _b_sync) = b.device_ptr_mut(stream);
        let (i_ptr, _i_sync) = info.device_ptr_mut(stream);
        // SAFETY: a is the d×d factor, b d×n_rhs column-major, info one i32.
        unsafe {
            cs::cusolverDnDpotrs(
                handle,
                lower,
                di,
                n_rhs as i32,
                a_ptr as *const f64,
                di,
                b_ptr as *mut f64,
                di,
                i_ptr as *mut i32,
            )
        }
        .result()?;
    }
    let status = dev.download(&info)?[0];
    if status != 0 {
        return Err(Error::Numerical(format!(
            "cuSOLVER potrs rejected argument {}",
            -status
        )));
    }
    let x_t = to_f32(dev, &b)?;
    if any_nonfinite(dev, &x_t)? {
        return Ok(Err("the solution is not finite".into()));
    }
    // Column-major d × n_rhs is row-major n_rhs × d: transpose back to [d, n_rhs].
    Ok(Ok(transpose(dev, &x_t, n_rhs, d)?))
}

/// Row-major `[rows, cols]` → `[cols, rows]`.
pub(crate) fn transpose(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
) -> Result<CudaSlice<f32>> {
    let mut out = dev.zeros::<f32>(rows * cols, "transpose")?;
    let f = dev.function("finalize", "transpose_f32")?;
    let (r, c) = (rows as i32, cols as i32);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(&mut out).arg(&r).arg(&c);
    // SAFETY: x and out hold rows·cols values.
    unsafe { b.launch(elementwise(rows * cols)) }?;
    Ok(out)
}

fn to_f64(dev: &CudaDevice, x: &CudaSlice<f32>) -> Result<CudaSlice<f64>> {
    let mut out = dev.zeros::<f64>(x.len(), "f64 solve buffer")?;
    let f = dev.function("finalize", "f32_to_f64")?;
    let n = x.len() as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(&mut out).arg(&n);
    // SAFETY: both hold n values.
    unsafe { b.launch(elementwise(x.len())) }?;
    Ok(out)
}

fn to_f32(dev: &CudaDevice, x: &CudaSlice<f64>) -> Result<CudaSlice<f32>> {
    let mut out = dev.zeros::<f32>(x.len(), "f32 solution")?;
    let f = dev.function("finalize", "f64_to_f32")?;
    let n = x.len() as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(&mut out).arg(&n);
    // SAFETY: both hold n values.
    unsafe { b.launch(elementwise(x.len())) }?;
    Ok(out)
}

fn diagonal(dev: &CudaDevice, a: &CudaSlice<f64>, d: usize) -> Result<Vec<f64>> {
    let mut diag = dev.zeros::<f64>(d, "diagonal")?;
    let f = dev.function("finalize", "diagonal_f64")?;
    let di = d as i32;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(a).arg(&mut diag).arg(&di);
    // SAFETY: a holds d·d values, diag d.
    unsafe { b.launch(elementwise(d)) }?;
    dev.download(&diag)
}

pub(crate) fn any_nonfinite(dev: &CudaDevice, x: &CudaSlice<f32>) -> Result<bool> {
    let mut flag = dev.zeros::<i32>(1, "flag")?;
    let f = dev.function("finalize", "any_nonfinite_f32")?;
    let n = x.len() as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(&n).arg(&mut flag);
    // SAFETY: x holds n values, flag one i32.
    unsafe { b.launch(elementwise(x.len())) }?;
    Ok(dev.download(&flag)?[0] != 0)
}
