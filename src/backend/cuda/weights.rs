//! Linear weights made on the GPU from a checkpoint's stored bytes (kernels/weights.cu).
//!
//! A merge reads each linear weight twice: the forward pass wants it fused per site in the
//! activations' type, G'W wants it as f32 `[in, out]`. The host copies the stored bytes to
//! the device once; the transpose (nn.Linear stores `[out, in]`), the conversion and the
//! NaN/Inf check happen on the GPU, and the merge holds the f32 copy between its two uses
//! (`regmean::model_weights`). Host decoding was the longest part of a GPU merge
//! (BENCHMARKS.md).

use cudarc::driver::CudaSlice;

use super::convert::{any_nonfinite, stored_kernel, stored_to_f32};
use super::device::CudaDevice;
use super::launch::mul;
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::LinearModule;

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
