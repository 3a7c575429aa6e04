//! Gram accumulation on the GPU (kernels/gram.cu, kernels/finalize.cu), and the running
//! sums of a merge on the device.
//!
//! Library API for CUDA pipelines: hand [`DeviceGram::accumulate`] your own device buffer of
//! activations (f16 or f32, any row stride), optionally with a row mask, batch after batch;
//! [`DeviceGram::finish`] returns the normalised Gram on the device.
//!
//! ```no_run
//! # fn main() -> regmean_gpu::Result<()> {
//! use regmean_gpu::backend::cuda::{gram::{Activations, DeviceGram}, CudaDevice};
//! let dev = CudaDevice::open(0)?;
//! let (rows, d) = (4096, 768);
//! let x = dev.upload(&vec![half::f16::from_f32(0.5); rows * d], "activations")?;
//! let mut gram = DeviceGram::new(&dev, d, false)?;
//! gram.accumulate(&Activations::F16(x.slice(..)), rows, d, None)?;
//! let (g, rows_counted) = gram.finish()?; // G = XᵀX / rows, [d, d] f32 on the device
//! # let _ = (g, rows_counted); Ok(()) }
//! ```

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

use super::device::CudaDevice;
use super::launch::{c_int, check_len, elementwise, mul};
use crate::error::{Error, Result};

// Mirrors of the launch contract in kernels/gram.cu.
const F16_TILE: usize = 128;
const F16_THREADS: u32 = 256;
const F32_TILE: usize = 128;
const F32_THREADS: u32 = 256;
/// The larger k-step (rows a block stages per step: 32 for f16, 16 for f32); the kernel
/// rounds its row splits to its own k-step, the host only uses this to size the splits.
const K_STEP: usize = 32;

/// A caller's activations `[rows, ldx]` on the device.
pub enum Activations<'a> {
    F16(CudaView<'a, half::f16>),
    F32(CudaView<'a, f32>),
}

/// Which rows are real (1) and which are padding (0), with the number of real rows.
pub struct RowMask<'a> {
    pub mask: CudaView<'a, u8>,
    pub real_rows: u64,
}

/// Accumulates one site's Gram matrix on the device.
pub struct DeviceGram {
    dev: Arc<CudaDevice>,
    d: usize,
    acc: CudaSlice<f32>,
    /// FusionBench's running mean needs each batch's XᵀX on its own first.
    batch: Option<CudaSlice<f32>>,
    rows: u64,
}

impl DeviceGram {
    /// `fusionbench_compat`: every row counts (masks are ignored) and the Gram is
    /// FusionBench's f32 running mean; otherwise Σ XᵀX over real rows / their count.
    pub fn new(dev: &Arc<CudaDevice>, d: usize, fusionbench_compat: bool) -> Result<Self> {
        let acc = dev.zeros::<f32>(d * d, "Gram accumulator")?;
        let batch = if fusionbench_compat {
            Some(dev.zeros::<f32>(d * d, "Gram batch buffer")?)
        } else {
            None
        };
        Ok(DeviceGram {
            dev: dev.clone(),
            d,
            acc,
            batch,
            rows: 0,
        })
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Adds XᵀX of a batch: `x` holds `rows` rows of `d` values, `ldx` apart.
    pub fn accumulate(
        &mut self,
        x: &Activations<'_>,
        rows: usize,
        ldx: usize,
        mask: Option<&RowMask<'_>>,
    ) -> Result<()> {
        check_activations(x, rows, ldx, self.d, mask.map(|m| &m.mask))?;
        if let Some(m) = mask {
            if m.real_rows > rows as u64 {
                return Err(Error::invalid(format!(
                    "row mask claims {} real rows of {rows}",
                    m.real_rows
                )));
            }
        }
        match &mut self.batch {
            None => {
                let m = mask.map(|m| &m.mask);
                launch_gram(&self.dev, x, rows, ldx, self.d, m, &mut self.acc)?;
                self.rows += mask.map_or(rows as u64, |m| m.real_rows);
            }
            Some(batch) => {
                if rows == 0 {
                    return Ok(());
                }
                self.dev.stream().memset_zeros(batch)?;
                launch_gram(&self.dev, x, rows, ldx, self.d, None, batch)?;
                running_mean_step(&self.dev, &mut self.acc, batch, self.d, self.rows, rows)?;
                self.rows += rows as u64;
            }
        }
        Ok(())
    }

    /// The full, symmetric, normalised Gram `[d, d]` and the rows it counted.
    pub fn finish(mut self) -> Result<(CudaSlice<f32>, u64)> {
        if self.rows == 0 {
            return Err(Error::invalid("no rows were accumulated"));
        }
        let scale = if self.batch.is_some() {
            1.0f32
        } else {
            1.0 / self.rows as f32
        };
        mirror_scale(&self.dev, &mut self.acc, self.d, scale)?;
        Ok((self.acc, self.rows))
    }
}

/// Lower triangle → full symmetric matrix, times `scale`.
pub fn mirror_scale(dev: &CudaDevice, g: &mut CudaSlice<f32>, d: usize, scale: f32) -> Result<()> {
    check_len("Gram", g.len(), mul("Gram", d, d)?)?;
    let f = dev.function("finalize", "gram_mirror_scale")?;
    let di = c_int("d", d)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(g).arg(&di).arg(&scale);
    // SAFETY: the signature is (float*, int, float); g holds d·d f32 values (checked).
    unsafe { b.launch(elementwise(d * d)) }?;
    Ok(())
}

/// The checks behind launch_gram's SAFETY: `ldx >= d`, X holds `rows` rows of stride
/// `ldx`, and the mask (when given) one byte per row.
fn check_activations(
    x: &Activations<'_>,
    rows: usize,
    ldx: usize,
    d: usize,
    mask: Option<&CudaView<'_, u8>>,
) -> Result<()> {
    if ldx < d {
        return Err(Error::invalid(format!(
            "row stride {ldx} is smaller than d = {d}"
        )));
    }
    let len = match x {
        Activations::F16(v) => v.len(),
        Activations::F32(v) => v.len(),
    };
    if rows > 0 {
        let need = mul("activations", rows - 1, ldx)?
            .checked_add(d)
            .ok_or_else(|| Error::invalid("activations: size overflows"))?;
        if len < need {
            return Err(Error::invalid(format!(
                "activation buffer of {len} values is too small for {rows} rows of stride {ldx}"
            )));
        }
    }
    if let Some(m) = mask {
        if m.len() < rows {
            return Err(Error::invalid(format!(
                "row mask of {} bytes is too short for {rows} rows",
                m.len()
            )));
        }
    }
    Ok(())
}

/// FusionBench's f32 running mean over `[d, d]` buffers: acc = (acc·seen + batch) /
/// (seen + rows), where `batch` holds the XᵀX of the `rows` new rows.
pub(crate) fn running_mean_step(
    dev: &CudaDevice,
    acc: &mut CudaSlice<f32>,
    batch: &CudaSlice<f32>,
    d: usize,
    seen: u64,
    rows: usize,
) -> Result<()> {
    let n = mul("Gram", d, d)?;
    check_len("running mean accumulator", acc.len(), n)?;
    check_len("running mean batch", batch.len(), n)?;
    let (seen_f, total_f) = (seen as f32, (seen + rows as u64) as f32);
    let f = dev.function("finalize", "gram_running_mean")?;
    let di = c_int("d", d)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(acc).arg(batch).arg(&di).arg(&seen_f).arg(&total_f);
    // SAFETY: (float*, const float*, int, float, float) as pushed; acc and batch hold d·d
    // f32 values (checked above); the kernel touches only those.
    unsafe { b.launch(elementwise(n)) }?;
    Ok(())
}

/// G += XᵀX (lower tiles) with the tensor-core (f16) or FMA (f32) kernel.
pub(crate) fn launch_gram(
    dev: &CudaDevice,
    x: &Activations<'_>,
    rows: usize,
    ldx: usize,
    d: usize,
    mask: Option<&CudaView<'_, u8>>,
    g: &mut CudaSlice<f32>,
) -> Result<()> {
    check_activations(x, rows, ldx, d, mask)?;
    check_len("Gram", g.len(), mul("Gram", d, d)?)?;
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let (tile, threads, name) = match x {
        Activations::F16(_) => (F16_TILE, F16_THREADS, "gram_f16"),
        Activations::F32(_) => (F32_TILE, F32_THREADS, "gram_f32"),
    };
    let t = d.div_ceil(tile);
    let tiles = t * (t + 1) / 2;
    // Enough blocks to fill the GPU twice over, splitting the rows, but at least a few
    // k-steps of rows per block.
    let sms = dev.stream().context().attribute(
        cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    )? as usize;
    let max_splits = rows.div_ceil(8 * K_STEP).max(1);
    let splits = (2 * sms).div_ceil(tiles).clamp(1, max_splits).min(65535);
    // gridDim.x is at most 2³¹ − 1, and the kernel decodes blockIdx.x as an int.
    let tiles = c_int("Gram tiles", tiles)? as u32;
    let cfg = LaunchConfig {
        grid_dim: (tiles, splits as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = dev.function("gram", name)?;
    // The signature is (const X*, long long ldx, long long rows, int d,
    // const unsigned char* mask, float* G): i64, i64, i32, and a 64-bit null for no mask.
    let (ldx, rows, d) = (ldx as i64, rows as i64, c_int("d", d)?);
    let null: u64 = 0;
    let mut b = dev.stream().launch_builder(&f);
    match x {
        Activations::F16(v) => b.arg(v),
        Activations::F32(v) => b.arg(v),
    };
    b.arg(&ldx).arg(&rows).arg(&d);
    match mask {
        Some(m) => b.arg(m),
        None => b.arg(&null),
    };
    b.arg(g);
    // SAFETY: the arguments match the kernel's signature (above), the launch its contract
    // (256 threads, static shared memory only, gridDim.x = T(T+1)/2 for a 128 tile,
    // 1 <= gridDim.y <= 65535); check_activations and the Gram check above guarantee
    // X holds (rows−1)·ldx + d values, the mask `rows` bytes and G d·d values, which
    // bound everything the kernel reads and writes.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Σ G'ᵢ of one site during a merge, on the device.
pub struct DeviceSiteSums {
    pub d: usize,
    pub gram_sum: CudaSlice<f32>,
    /// This model's G' (for its Σ G'W products).
    pub reduced: CudaSlice<f32>,
}

/// Σ G'ᵢWᵢ and Σ Wᵢ of one linear layer, `[d_in, d_out]` row-major, on the device.
pub struct DeviceModuleSums {
    pub d_in: usize,
    pub d_out: usize,
    pub gw_sum: CudaSlice<f32>,
    pub w_sum: CudaSlice<f32>,
}

impl DeviceSiteSums {
    pub fn new(dev: &CudaDevice, d: usize) -> Result<Self> {
        Ok(DeviceSiteSums {
            d,
            gram_sum: dev.zeros(d * d, "Σ G'")?,
            reduced: dev.zeros(d * d, "G'")?,
        })
    }

    /// G' = G with its off-diagonal times `ratio` (diagonal times `diag_mult`), added to Σ G'.
    pub fn add(
        &mut self,
        dev: &CudaDevice,
        gram: &CudaSlice<f32>,
        ratio: f32,
        diag_mult: f32,
    ) -> Result<()> {
        let n = mul("Gram", self.d, self.d)?;
        check_len("Gram", gram.len(), n)?;
        check_len("G'", self.reduced.len(), n)?;
        check_len("Σ G'", self.gram_sum.len(), n)?;
        let f = dev.function("finalize", "reduce_offdiag_accumulate")?;
        let d = c_int("d", self.d)?;
        let mut b = dev.stream().launch_builder(&f);
        b.arg(gram)
            .arg(&mut self.reduced)
            .arg(&mut self.gram_sum)
            .arg(&d)
            .arg(&ratio)
            .arg(&diag_mult);
        // SAFETY: (const float*, float*, float*, int, float, float) as pushed; all three
        // buffers hold d·d f32 values (checked above).
        unsafe { b.launch(elementwise(self.d * self.d)) }?;
        Ok(())
    }
}

impl DeviceModuleSums {
    pub fn new(dev: &CudaDevice, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(DeviceModuleSums {
            d_in,
            d_out,
            gw_sum: dev.zeros(d_in * d_out, "Σ G'W")?,
            w_sum: dev.zeros(d_in * d_out, "Σ W")?,
        })
    }

    /// Σ G'W += G'·W (cuBLAS) and Σ W += W, for W `[d_in, d_out]` row-major.
    pub fn add(
        &mut self,
        dev: &CudaDevice,
        reduced: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
    ) -> Result<()> {
        use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
        let (d_in, d_out) = (self.d_in, self.d_out);
        let n = mul("W", d_in, d_out)?;
        check_len("G'", reduced.len(), mul("G'", d_in, d_in)?)?;
        check_len("W", w.len(), n)?;
        check_len("Σ G'W", self.gw_sum.len(), n)?;
        check_len("Σ W", self.w_sum.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        // A row-major [r, c] buffer is the column-major c×r matrix (its transpose), so
        // row-major C += G'·W is column-major Cᵀ += Wᵀ·G'ᵀ: A = W's buffer (d_out×d_in,
        // ld d_out), B = G''s buffer (d_in×d_in, ld d_in), C d_out×d_in (ld d_out), no
        // transposes. (G'ᵀ = G', but the mapping is exact without relying on it.)
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: c_int("d_out", d_out)?,
            n: c_int("d_in", d_in)?,
            k: c_int("d_in", d_in)?,
            alpha: 1.0f32,
            lda: c_int("d_out", d_out)?,
            ldb: c_int("d_in", d_in)?,
            beta: 1.0f32,
            ldc: c_int("d_out", d_out)?,
        };
        dev.bind()?;
        // SAFETY: the handle is bound to dev's stream (cudarc orders the buffers on it); w
        // holds d_in·d_out, reduced d_in·d_in and gw_sum d_in·d_out f32 values (checked),
        // exactly what cfg's m, n, k and leading dimensions address.
        unsafe { dev.blas().gemm(cfg, w, reduced, &mut self.gw_sum) }?;
        axpy(dev, &mut self.w_sum, w, 1.0)
    }
}

/// y += alpha·x.
pub(crate) fn axpy(
    dev: &CudaDevice,
    y: &mut CudaSlice<f32>,
    x: &CudaSlice<f32>,
    alpha: f32,
) -> Result<()> {
    let f = dev.function("finalize", "axpy_f32")?;
    let n = y.len().min(x.len()) as i64;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(y).arg(x).arg(&n).arg(&alpha);
    // SAFETY: (float*, const float*, long long, float) as pushed; n is the shorter of the
    // two lengths.
    unsafe { b.launch(elementwise(n as usize)) }?;
    Ok(())
}
