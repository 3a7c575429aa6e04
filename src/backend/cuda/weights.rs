//! Linear weights made on the GPU from a checkpoint's stored bytes (kernels/weights.cu).
//!
//! A merge reads each linear weight twice: the forward pass wants it fused per site in the
//! activations' type, G'W wants it as f32 `[in, out]`. The host copies the stored bytes to
//! the device once; the transpose (nn.Linear stores `[out, in]`), the conversion and the
//! NaN/Inf check happen on the GPU, and the f32 copy is kept on the checkpoint between its
//! two uses. Host decoding was the longest part of a GPU merge (BENCHMARKS.md).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::solve::any_nonfinite;
use super::{c_int, mul, CudaDevice};
use crate::error::{Error, Result};
use crate::io::{Checkpoint, Dtype};
use crate::model::LinearModule;

/// The key of a weight's device copy among a checkpoint's kept values.
fn kept_key(m: &LinearModule) -> String {
    format!("cuda:{}", m.weight)
}

/// [`linear_in_out`], made once per checkpoint when it keeps values (the forward pass reads
/// it first; [`take_linear_in_out`] hands it to G'W after).
pub fn shared_linear_in_out(
    dev: &CudaDevice,
    ckpt: &Checkpoint,
    m: &LinearModule,
) -> Result<Arc<CudaSlice<f32>>> {
    ckpt.keep(&kept_key(m), || linear_in_out(dev, ckpt, m))
}

/// The device copy [`shared_linear_in_out`] kept (forgotten by the checkpoint now), or a
/// new one: uploaded from the host decode a forward pass on the CPU kept (the library
/// allows a CPU forward with the sums on a GPU), else made from the stored bytes.
pub fn take_linear_in_out(
    dev: &CudaDevice,
    ckpt: &Checkpoint,
    m: &LinearModule,
) -> Result<Arc<CudaSlice<f32>>> {
    ckpt.take_kept(&kept_key(m), || {
        match ckpt.take_kept::<Vec<f32>>(&m.weight, || {
            Err(Error::Backend("no host decode kept".into()))
        }) {
            Ok(host) => dev.upload(&host, "linear weight"),
            Err(_) => linear_in_out(dev, ckpt, m),
        }
    })
}

/// A linear weight as a row-major f32 `[in, out]` matrix on the device, whatever its stored
/// layout and float type; NaN or Inf is refused with the host's message (file, tensor,
/// first element in stored order).
pub fn linear_in_out(
    dev: &CudaDevice,
    ckpt: &Checkpoint,
    m: &LinearModule,
) -> Result<CudaSlice<f32>> {
    let (rows, cols) = if m.transposed {
        (m.out_dim, m.in_dim)
    } else {
        (m.in_dim, m.out_dim)
    };
    ckpt.expect_shape(&m.weight, &[rows, cols])?;
    let n = mul("linear weight", rows, cols)?;
    if n == 0 {
        return dev.zeros(0, "linear weight");
    }
    let dtype = ckpt.entry(&m.weight)?.dtype.clone();
    if stored_kernel(&dtype).is_none() {
        // Rare enough to take the host's way.
        return dev.upload(&crate::model::linear_in_out(ckpt, m)?, "linear weight");
    }
    let size = dtype.float_size().expect("a float type");
    let bytes = ckpt.bytes(&m.weight)?;
    if bytes.len() != mul("linear weight bytes", n, size)? {
        return Err(Error::file(
            ckpt.file_of(&m.weight),
            format!(
                "tensor `{}` holds {} bytes, {n} {} values need {}",
                m.weight,
                bytes.len(),
                dtype.name(),
                n * size
            ),
        ));
    }
    let stored = crate::profile::span("load: stored bytes → GPU (staged)", || {
        dev.upload_staged::<u8>(bytes.len(), "linear weight (stored)", |first, dst| {
            dst.copy_from_slice(&bytes[first..first + dst.len()])
        })
    })?;
    let out = stored_to_f32(dev, &dtype, &stored, rows, cols, m.transposed)?;
    if any_nonfinite(dev, &out)? {
        // The host decode names the first bad element in the file's order.
        crate::model::linear_in_out(ckpt, m)?;
        return Err(Error::file(
            ckpt.file_of(&m.weight),
            format!(
                "tensor `{}` holds a non-finite value on the GPU but not on the host",
                m.weight
            ),
        ));
    }
    Ok(out)
}

/// The kernel that reads stored values of `dtype`, for the float types it reads.
fn stored_kernel(dtype: &Dtype) -> Option<&'static str> {
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
    super::check_len(
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
