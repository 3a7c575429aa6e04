//! Element-wise device conversions: stored checkpoint values (f32, f16, bf16) to f32 with
//! an optional transpose, and the non-finite check of a device buffer.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::launch::{c_int, check_len, elementwise, mul};
use crate::error::{Error, Result};
use crate::io::Dtype;

/// The kernel that reads stored values of `dtype`, for the float types it reads.
pub(crate) fn stored_kernel(dtype: &Dtype) -> Option<&'static str> {
    match dtype {
        Dtype::F32 => Some("stored_to_f32_f32"),
        Dtype::F16 => Some("stored_to_f32_f16"),
        Dtype::BF16 => Some("stored_to_f32_bf16"),
        _ => None,
    }
}

/// Stored `[rows, cols]` values of `dtype` (F32, F16 or BF16) → f32, transposed to
/// `[cols, rows]` when asked; `stored` holds them as uploaded, in elements of any size (the
/// raw bytes of a checkpoint, or f32).
pub(crate) fn stored_to_f32<S: DeviceRepr>(
    dev: &CudaDevice,
    dtype: &Dtype,
    stored: &CudaSlice<S>,
    rows: usize,
    cols: usize,
    transposed: bool,
) -> Result<CudaSlice<f32>> {
    let n = mul("weight", rows, cols)?;
    let (Some(kernel), Some(size)) = (stored_kernel(dtype), dtype.float_size()) else {
        return Err(Error::invalid(format!(
            "no kernel reads stored {} weights",
            dtype.name()
        )));
    };
    check_len(
        "stored weight bytes",
        mul("stored bytes", stored.len(), std::mem::size_of::<S>())?,
        mul("weight bytes", n, size)?,
    )?;
    if n == 0 {
        return dev.zeros(0, "linear weight (f32)");
    }
    // SAFETY: the kernel writes every one of the rows·cols elements (each tile covers its
    // part of the matrix, the grid-stride loop every tile) before anything reads them.
    let mut out = unsafe { dev.uninit::<f32>(n, "linear weight (f32)") }?;
    let f = dev.function("weights", kernel)?;
    let (r, c, t) = (
        c_int("rows", rows)?,
        c_int("cols", cols)?,
        transposed as i32,
    );
    let tiles = rows.div_ceil(32) * cols.div_ceil(32);
    let cfg = LaunchConfig {
        grid_dim: (tiles.clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(stored).arg(&mut out).arg(&r).arg(&c).arg(&t);
    // SAFETY: (const X*, float*, int, int, int) as pushed, X the stored type whose size was
    // checked above against the bytes in `stored` (rows·cols values; device allocations are
    // 256-byte aligned for any X); out holds rows·cols f32; 256 threads as the kernel needs.
    unsafe { b.launch(cfg) }?;
    Ok(out)
}

/// Row-major `[rows, cols]` → `[cols, rows]`.
pub(crate) fn transpose(
    dev: &CudaDevice,
    x: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
) -> Result<CudaSlice<f32>> {
    stored_to_f32(dev, &Dtype::F32, x, rows, cols, true)
}

/// Whether `x` holds a NaN or an infinity (one flag downloaded: this synchronises).
pub fn any_nonfinite(dev: &CudaDevice, x: &CudaSlice<f32>) -> Result<bool> {
    let mut flag = dev.zeros::<i32>(1, "flag")?;
    let f = dev.function("finalize", "any_nonfinite_f32")?;
    let n = x.len() as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(&n).arg(&mut flag);
    // SAFETY: (const float*, long long, int*) as pushed; x holds n values, flag one i32
    // (zeroed, as the kernel requires).
    unsafe { b.launch(elementwise(x.len())) }?;
    Ok(dev.download(&flag)?[0] != 0)
}
