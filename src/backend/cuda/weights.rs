//! Linear weights made on the GPU from a checkpoint's stored bytes (kernels/weights.cu).
//!
//! A merge reads each linear weight twice: the forward pass wants it fused per site in the
//! activations' type, G'W wants it as f32 `[in, out]`. The host copies the stored bytes to
//! the device once; the transpose (nn.Linear stores `[out, in]`), the conversion and the
//! NaN/Inf check happen on the GPU, and the f32 copy is kept on the checkpoint between its
//! two uses. Host decoding was the longest part of a GPU merge (BENCHMARKS.md).
//!
//! A copy from pageable memory holds the calling thread for the whole transfer (the driver
//! stages it), so in a merge the thread that opens the next model ahead also copies its
//! stored bytes into page-locked buffers ([`StagingPool`]); the merge's own thread then only
//! queues asynchronous copies from them.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaSlice, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use rayon::prelude::*;

use super::solve::any_nonfinite;
use super::{c_int, mul, CudaDevice};
use crate::error::{Error, Result};
use crate::io::{Checkpoint, Dtype};
use crate::model::LinearModule;

/// The key of a weight's device copy among a checkpoint's kept values.
fn kept_key(m: &LinearModule) -> String {
    format!("cuda:{}", m.weight)
}

/// The key of a weight's staged stored bytes among a checkpoint's kept values.
fn staged_key(m: &LinearModule) -> String {
    format!("staged:{}", m.weight)
}

/// Page-locked host buffers for stored weight bytes, reused from model to model (every
/// model of a merge has the same shapes; pinning memory is slow, so it is done once).
pub struct StagingPool {
    ctx: Arc<CudaContext>,
    free: Mutex<Vec<PinnedHostSlice<u8>>>,
    /// Bytes allocated so far, against [`STAGING_LIMIT`].
    allocated: std::sync::atomic::AtomicUsize,
}

/// The most page-locked memory a pool takes (two models' linear weights of a base-size
/// model fit; beyond it weights are copied from the file, as without staging). Locked
/// pages cannot be swapped: an unbounded pool could starve the host.
pub const STAGING_LIMIT: usize = 2 << 30;

/// One weight's stored bytes in a page-locked buffer, which goes back to its pool when
/// this is dropped (after its copy to the device is queued, or with its checkpoint).
pub struct Staged {
    buf: Option<PinnedHostSlice<u8>>,
    pool: Arc<StagingPool>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.free().push(buf);
        }
    }
}

impl StagingPool {
    pub fn new(dev: &CudaDevice) -> Arc<Self> {
        Arc::new(StagingPool {
            ctx: dev.stream().context().clone(),
            free: Mutex::new(Vec::new()),
            allocated: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<PinnedHostSlice<u8>>> {
        // Buffers are pushed and popped whole: a panic elsewhere leaves the list usable.
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Copies the stored bytes of `modules` into page-locked buffers kept on `ckpt` (which
    /// must keep values) for [`linear_in_out`]. Best effort: a weight that cannot be staged
    /// (no float type the kernels read, or no page-locked memory left) is copied from the
    /// file when its turn comes, and its errors are reported then.
    pub fn stage<'a>(
        self: &Arc<Self>,
        ckpt: &Checkpoint,
        modules: impl IntoIterator<Item = &'a LinearModule>,
    ) {
        for m in modules {
            let Ok(entry) = ckpt.entry(&m.weight) else {
                continue;
            };
            let Ok(bytes) = ckpt.bytes(&m.weight) else {
                continue;
            };
            if stored_kernel(&entry.dtype).is_none() || bytes.is_empty() {
                continue;
            }
            let Some(mut buf) = self.buffer(bytes.len()) else {
                return;
            };
            // Waits for the buffer's last copy to the device, if it is still running.
            let Ok(dst) = buf.as_mut_slice() else {
                return;
            };
            dst.par_chunks_mut(1 << 20)
                .zip(bytes.par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
            let staged = Staged {
                buf: Some(buf),
                pool: self.clone(),
            };
            let _ = ckpt.keep(&staged_key(m), || Ok(staged));
        }
    }

    /// A free buffer of exactly `len` bytes, or a new one.
    fn buffer(&self, len: usize) -> Option<PinnedHostSlice<u8>> {
        let reused = {
            let mut free = self.free();
            let at = free.iter().position(|b| b.len() == len);
            at.map(|i| free.swap_remove(i))
        };
        if reused.is_some() {
            return reused;
        }
        use std::sync::atomic::Ordering;
        let before = self.allocated.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) > STAGING_LIMIT {
            self.allocated.fetch_sub(len, Ordering::Relaxed);
            return None;
        }
        // SAFETY: the buffer is written whole (copy_from_slice of `len` bytes) before it is
        // kept, and only kept buffers are copied to the device.
        unsafe { self.ctx.alloc_pinned::<u8>(len) }.ok()
    }
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
/// new one.
pub fn take_linear_in_out(
    dev: &CudaDevice,
    ckpt: &Checkpoint,
    m: &LinearModule,
) -> Result<Arc<CudaSlice<f32>>> {
    ckpt.take_kept(&kept_key(m), || linear_in_out(dev, ckpt, m))
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
    let dtype = ckpt.entry(&m.weight)?.dtype.clone();
    let Some(kernel) = stored_kernel(&dtype) else {
        // Rare enough to take the host's way.
        return dev.upload(&crate::model::linear_in_out(ckpt, m)?, "linear weight");
    };
    let n = mul("linear weight", rows, cols)?;
    if n == 0 {
        return dev.zeros(0, "linear weight");
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
    let staged = ckpt
        .take_kept::<Staged>(&staged_key(m), || Err(Error::Backend("not staged".into())))
        .ok()
        .and_then(|s| Arc::try_unwrap(s).ok());
    let stored = match staged.as_ref().and_then(|s| s.buf.as_ref()) {
        Some(buf) if buf.len() == bytes.len() => {
            crate::profile::span("load: staged bytes → GPU (async)", || {
                dev.stream()
                    .clone_htod(buf)
                    .map_err(|e| super::oom(e, "linear weight (stored)", bytes.len()))
            })?
        }
        _ => crate::profile::span("load: stored bytes → GPU", || {
            dev.upload(bytes, "linear weight (stored)")
        })?,
    };
    // The buffer goes back to the pool; cudarc's event on it makes its next user wait for
    // this copy.
    drop(staged);
    let out = stored_to_f32(dev, kernel, &stored, rows, cols, m.transposed)?;
    if any_nonfinite(dev, &out)? {
        // The host decode names the first bad element in the file's order.
        crate::model::linear_in_out(ckpt, m)?;
        return Err(Error::Backend(format!(
            "cuda: `{}` holds a non-finite value on the GPU but not on the host",
            m.weight
        )));
    }
    Ok(out)
}

/// The kernel that reads a stored float type, for the types it reads.
fn stored_kernel(dtype: &Dtype) -> Option<&'static str> {
    match dtype {
        Dtype::F32 => Some("stored_to_f32_f32"),
        Dtype::F16 => Some("stored_to_f32_f16"),
        Dtype::BF16 => Some("stored_to_f32_bf16"),
        _ => None,
    }
}

/// Stored `[rows, cols]` values → f32, transposed to `[cols, rows]` when asked. `kernel`
/// names the stored type (`stored_to_f32_{f32,f16,bf16}`); `stored` holds its values as
/// uploaded, in elements of any size (the raw bytes of a checkpoint, or f32).
pub(crate) fn stored_to_f32<S: DeviceRepr>(
    dev: &CudaDevice,
    kernel: &str,
    stored: &CudaSlice<S>,
    rows: usize,
    cols: usize,
    transposed: bool,
) -> Result<CudaSlice<f32>> {
    let n = mul("weight", rows, cols)?;
    let size = match kernel {
        "stored_to_f32_f32" => 4,
        "stored_to_f32_f16" | "stored_to_f32_bf16" => 2,
        other => return Err(Error::invalid(format!("no weight kernel `{other}`"))),
    };
    super::check_len(
        "stored weight bytes",
        mul("stored bytes", stored.len(), std::mem::size_of::<S>())?,
        mul("weight bytes", n, size)?,
    )?;
    // SAFETY: the kernel writes every one of the rows·cols elements (each tile covers its
    // part of the matrix, the grid-stride loop every tile) before anything reads them.
    let mut out = unsafe { dev.uninit::<f32>(n, "linear weight (f32)") }?;
    if n == 0 {
        return Ok(out);
    }
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
