//! The per-layer RegMean solve on the device: f64 Cholesky with cuSOLVER (potrf, then potrs),
//! every `info` checked, and the same fallback as the CPU engine (backend::solve): damping
//! towards the average weights, then the plain average.

use cudarc::cusolver::sys as cs;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::convert::{any_nonfinite, transpose};
use super::device::CudaDevice;
use super::launch::{c_int, check_len, elementwise, mul};
use crate::backend::solve::{SolveOutcome, MIN_RCOND};
use crate::error::{Error, Result};

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
    if k == 0 || d_in == 0 || d_out == 0 {
        return Err(Error::invalid(format!(
            "solve_layer: k = {k}, d_in = {d_in}, d_out = {d_out} (all must be positive)"
        )));
    }
    // Everything below indexes with C ints (cuSOLVER, the kernels): check once, here.
    let n = mul("W", d_in, d_out)?;
    c_int("d_in", d_in)?;
    c_int("d_out", d_out)?;
    check_len("Σ G'", gram_sum.len(), mul("Σ G'", d_in, d_in)?)?;
    check_len("Σ G'W", gw_sum.len(), n)?;
    check_len("Σ W", w_sum.len(), n)?;
    // cuSOLVER is column-major. A row-major [r, c] buffer is the column-major c×r matrix, so
    // Σ G' needs no transpose (it is symmetric, and potrf reads only one triangle); the
    // right-hand side is transposed into column-major d_in × d_out.
    let rhs_t = transpose(dev, gw_sum, d_in, d_out)?;
    let reason = match attempt(dev, gram_sum, &rhs_t, None, d_in, d_out)? {
        Ok(x) => return Ok((x, SolveOutcome::Cholesky)),
        Err(reason) => reason,
    };
    // W̄ = ΣW / k, rounded to f32 like the CPU engine's `v / k as f32`: the f64 product
    // (1/k)·w is within 2⁻⁵² of w/k, and w/k (never an f32 midpoint) stays at least about
    // 2⁻²⁵/k away from one, so both round to the same f32 for every result in f32's normal
    // range (a subnormal result may differ in its last bit). An f32 multiply by 1/k, by
    // contrast, differs from the CPU in the last bit on about a quarter of the elements.
    let w_mean = {
        let mut acc = dev.zeros::<f64>(n, "average weights (f64)")?;
        axpy_f64_from_f32(dev, &mut acc, w_sum, n, 1.0 / k as f64)?;
        to_f32(dev, &acc)?
    };
    let diag = diagonal(dev, &to_f64(dev, gram_sum)?, d_in)?;
    let mean_diag = diag.iter().sum::<f64>() / d_in as f64;
    if mean_diag.is_finite() && mean_diag > 0.0 {
        let w_mean_t = transpose(dev, &w_mean, d_in, d_out)?;
        let mut epsilon = 1e-8;
        while epsilon <= 0.1 + 1e-12 {
            let lambda = epsilon * mean_diag;
            if let Ok(x) = attempt(
                dev,
                gram_sum,
                &rhs_t,
                Some((lambda, &w_mean_t)),
                d_in,
                d_out,
            )? {
                return Ok((x, SolveOutcome::Damped { epsilon, reason }));
            }
            epsilon *= 10.0;
        }
    }
    Ok((w_mean, SolveOutcome::Average { reason }))
}

/// One factorise-and-solve, optionally damped towards W̄: (A + λI) X = B + λ·W̄ (the CPU
/// engine's operations: A[i,i] + λ and B + λ·(W̄ as f64), each rounded once, in f64).
/// Ok(Err(reason)) when the system is not usable; Err for device failures.
/// The caller (solve_layer) has checked the buffer sizes and that d, n_rhs fit a C int.
fn attempt(
    dev: &CudaDevice,
    gram_sum: &CudaSlice<f32>,
    rhs_t: &CudaSlice<f32>,
    damping: Option<(f64, &CudaSlice<f32>)>,
    d: usize,
    n_rhs: usize,
) -> Result<std::result::Result<CudaSlice<f32>, String>> {
    let mut a = to_f64(dev, gram_sum)?;
    let mut b = to_f64(dev, rhs_t)?;
    let di = c_int("d", d)?;
    let nrhs = c_int("n_rhs", n_rhs)?;
    if let Some((lambda, w_mean_t)) = damping {
        check_len("A", a.len(), d * d)?;
        let f = dev.function("finalize", "add_diagonal_f64")?;
        let mut l = dev.stream().launch_builder(&f);
        l.arg(&mut a).arg(&di).arg(&lambda);
        // SAFETY: (double*, int, double) as pushed; a holds d·d f64 values (checked).
        unsafe { l.launch(elementwise(d)) }?;
        axpy_f64_from_f32(dev, &mut b, w_mean_t, d * n_rhs, lambda)?;
    }
    let handle = dev.solver().cu();
    let lower = cs::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let mut info = dev.zeros::<i32>(1, "cuSOLVER info")?;
    let mut lwork = 0i32;
    // The raw cuSOLVER calls below do not make the context current themselves.
    dev.bind()?;
    {
        let stream = dev.stream();
        let (a_ptr, _a_sync) = a.device_ptr(stream);
        // SAFETY: handle is bound to this stream; a is a live d×d f64 buffer (lda = d), which
        // the query does not read; lwork is a host i32 the call writes.
        unsafe {
            cs::cusolverDnDpotrf_bufferSize(handle, lower, di, a_ptr as *mut f64, di, &mut lwork)
        }
        .result()?;
    }
    // Lwork counts f64 elements, not bytes.
    let mut work = dev.zeros::<f64>(lwork.max(1) as usize, "cuSOLVER workspace")?;
    dev.bind()?;
    {
        let stream = dev.stream();
        let (a_ptr, _a_sync) = a.device_ptr_mut(stream);
        let (w_ptr, _w_sync) = work.device_ptr_mut(stream);
        let (i_ptr, _i_sync) = info.device_ptr_mut(stream);
        // SAFETY: the handle is bound to dev's stream, on which the guards order these
        // buffers (they are dropped at the end of this block, after the call is enqueued);
        // a is d×d f64 with lda = d, work holds lwork f64 as queried, info one i32.
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
    // Stream-ordered after potrf, and download synchronises: info is final.
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
    dev.bind()?;
    {
        let stream = dev.stream();
        let (a_ptr, _a_sync) = a.device_ptr(stream);
        let (b_ptr, _b_sync) = b.device_ptr_mut(stream);
        let (i_ptr, _i_sync) = info.device_ptr_mut(stream);
        // SAFETY: as for potrf; a holds the d×d factor (lower, lda = d), b the column-major
        // d×n_rhs right-hand side (ldb = d, d·n_rhs f64), info one i32.
        unsafe {
            cs::cusolverDnDpotrs(
                handle,
                lower,
                di,
                nrhs,
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
        // potrs reports only argument errors (info = −i); it has no numerical failure.
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

/// y += alpha·(f64)x over the first n elements.
fn axpy_f64_from_f32(
    dev: &CudaDevice,
    y: &mut CudaSlice<f64>,
    x: &CudaSlice<f32>,
    n: usize,
    alpha: f64,
) -> Result<()> {
    check_len("axpy_f64_from_f32 y", y.len(), n)?;
    check_len("axpy_f64_from_f32 x", x.len(), n)?;
    let f = dev.function("finalize", "axpy_f64_from_f32")?;
    let nn = n as i64;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(y).arg(x).arg(&nn).arg(&alpha);
    // SAFETY: (double*, const float*, long long, double) as pushed; both hold n values.
    unsafe { l.launch(elementwise(n)) }?;
    Ok(())
}

fn to_f64(dev: &CudaDevice, x: &CudaSlice<f32>) -> Result<CudaSlice<f64>> {
    let mut out = dev.zeros::<f64>(x.len(), "f64 solve buffer")?;
    let f = dev.function("finalize", "f32_to_f64")?;
    let n = x.len() as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(&mut out).arg(&n);
    // SAFETY: (const float*, double*, long long) as pushed; both hold n values.
    unsafe { b.launch(elementwise(x.len())) }?;
    Ok(out)
}

fn to_f32(dev: &CudaDevice, x: &CudaSlice<f64>) -> Result<CudaSlice<f32>> {
    let mut out = dev.zeros::<f32>(x.len(), "f32 solution")?;
    let f = dev.function("finalize", "f64_to_f32")?;
    let n = x.len() as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(&mut out).arg(&n);
    // SAFETY: (const double*, float*, long long) as pushed; both hold n values.
    unsafe { b.launch(elementwise(x.len())) }?;
    Ok(out)
}

fn diagonal(dev: &CudaDevice, a: &CudaSlice<f64>, d: usize) -> Result<Vec<f64>> {
    check_len("diagonal input", a.len(), mul("diagonal input", d, d)?)?;
    let mut diag = dev.zeros::<f64>(d, "diagonal")?;
    let f = dev.function("finalize", "diagonal_f64")?;
    let di = c_int("d", d)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(a).arg(&mut diag).arg(&di);
    // SAFETY: (const double*, double*, int) as pushed; a holds d·d values (checked), diag d.
    unsafe { b.launch(elementwise(d)) }?;
    dev.download(&diag)
}
