//! A Gram accumulator over the caller's own activations, and the per-layer closed form from
//! sums the caller holds: the pieces of RegMean for pipelines that run their own forward
//! passes (the C ABI in `capi/` and the Python package bind exactly these).
//!
//! The API (stable):
//!
//! ```text
//! enum RowType { F32, F16, BF16 }
//! enum HostRows<'a> { F32(&'a [f32]), F16(&'a [half::f16]), BF16(&'a [half::bf16]) }
//! enum AccumulatorDevice { Cpu, Cuda(Arc<CudaDevice>) }
//! struct Accumulator
//!     fn new(device: &AccumulatorDevice, dim: usize, fusionbench_compat: bool) -> Result<Self>
//!     fn dim(&self) -> usize
//!     fn rows(&self) -> u64                      // rows counted so far
//!     fn is_cuda(&self) -> bool
//!     fn update(&mut self, x: HostRows<'_>, rows: usize, row_stride: usize,
//!               mask: Option<&[u8]>) -> Result<()>
//!     unsafe fn update_device(&mut self, x: u64, dtype: RowType, rows: usize,
//!               row_stride: usize, mask: Option<u64>) -> Result<()>   // CUDA only
//!     fn finish(self) -> Result<SiteGram>        // the Gram on the host
//!     fn finish_on_device(self) -> Result<(CudaSlice<f32>, u64)>      // CUDA only
//!     unsafe fn finish_into_device(self, out: u64) -> Result<u64>     // CUDA only
//! unsafe fn cuda_device_on_stream(ordinal: usize, stream: CUstream) -> Result<Arc<CudaDevice>>
//! fn solve(gram_sum: &[f32], gw_sum: &[f32], w_mean: &[f32], d_in: usize, d_out: usize)
//!     -> Result<(Vec<f32>, SolveOutcome)>
//! ```
//!
//! Conventions are the merge's own: rows are `dim` values each, `row_stride` elements apart
//! (`row_stride >= dim`); XᵀX is accumulated in f32 (f16 and bf16 rows widen exactly on the
//! CPU; on a GPU f16 rows go through the merge's tensor-core kernel, bf16 rows are widened to
//! f32 on the device first); a mask has one byte per row, 0 for a padding row, which is then
//! skipped as padding rows are in the merge. `finish` gives the full symmetric `[dim, dim]`
//! Gram, Σ XᵀX / rows by default, or with `fusionbench_compat` FusionBench's f32 running
//! mean over every row (a mask is then refused: FusionBench counts padding rows). This is
//! the G of the merge's Gram files, before the `reduce_non_diagonal_ratio` step.
//!
//! ```
//! use regmean_gpu::accumulator::{Accumulator, AccumulatorDevice, HostRows};
//! let mut acc = Accumulator::new(&AccumulatorDevice::Cpu, 2, false)?;
//! // Three rows of width 2, stored 3 apart; the middle one is padding.
//! let x = [1.0, 2.0, 9.0, 7.0, 7.0, 9.0, 3.0, 4.0, 9.0];
//! acc.update(HostRows::F32(&x), 3, 3, Some(&[1, 0, 1]))?;
//! let g = acc.finish()?;
//! assert_eq!((g.rows, g.gram), (2, vec![5.0, 7.0, 7.0, 10.0]));
//! # Ok::<(), regmean_gpu::Error>(())
//! ```
//!
//! The CUDA path (a caller's device pointer on a caller's stream) has not been verified on a
//! GPU yet, and says so once per process when it is used.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use half::{bf16, f16};

use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::backend::cuda::gram::{Activations, DeviceGram, RowMask};
use crate::backend::cuda::CudaDevice;
use crate::backend::solve::{solve_layer, SolveOutcome};
use crate::error::{Error, Result};
use crate::model::{GramSink, Site};
use crate::regmean::{GramAccumulator, SiteGram};

/// The element type of a caller's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowType {
    F32,
    F16,
    BF16,
}

impl RowType {
    pub fn name(self) -> &'static str {
        match self {
            RowType::F32 => "f32",
            RowType::F16 => "f16",
            RowType::BF16 => "bf16",
        }
    }
}

/// A caller's rows in host memory.
#[derive(Clone, Copy, Debug)]
pub enum HostRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl HostRows<'_> {
    fn len(&self) -> usize {
        match self {
            HostRows::F32(v) => v.len(),
            HostRows::F16(v) => v.len(),
            HostRows::BF16(v) => v.len(),
        }
    }

    /// The rows packed to `[rows, dim]` f32 (exact for every type).
    fn packed_f32(&self, rows: usize, row_stride: usize, dim: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * dim);
        for r in 0..rows {
            let at = r * row_stride..r * row_stride + dim;
            match self {
                HostRows::F32(v) => out.extend_from_slice(&v[at]),
                HostRows::F16(v) => out.extend(v[at].iter().map(|x| x.to_f32())),
                HostRows::BF16(v) => out.extend(v[at].iter().map(|x| x.to_f32())),
            }
        }
        out
    }
}

/// Where an accumulator computes.
#[derive(Clone)]
pub enum AccumulatorDevice {
    Cpu,
    /// A GPU, bound to a stream (see [`cuda_device_on_stream`] for a caller's own stream).
    Cuda(Arc<CudaDevice>),
}

/// The CPU backend every CPU accumulator runs on (it has no state).
static CPU: CpuBackend = CpuBackend;

enum Engine {
    /// The merge's own accumulator, over one site.
    Cpu(GramAccumulator<'static, CpuBackend>),
    Cuda {
        dev: Arc<CudaDevice>,
        gram: DeviceGram,
    },
}

/// Accumulates the Gram matrix of one stream of activation rows (see the module docs).
pub struct Accumulator {
    dim: usize,
    compat: bool,
    engine: Engine,
}

/// The site name the accumulator's Gram carries (in errors and in [`SiteGram::name`]).
const SITE: &str = "accumulator";

impl Accumulator {
    pub fn new(device: &AccumulatorDevice, dim: usize, fusionbench_compat: bool) -> Result<Self> {
        if dim == 0 {
            return Err(Error::invalid("Gram accumulator: dim must be at least 1"));
        }
        let engine = match device {
            AccumulatorDevice::Cpu => {
                let site = Site {
                    name: SITE.into(),
                    dim,
                    modules: Vec::new(),
                };
                Engine::Cpu(GramAccumulator::new(&CPU, vec![site], fusionbench_compat)?)
            }
            AccumulatorDevice::Cuda(dev) => {
                warn_unverified();
                Engine::Cuda {
                    dev: dev.clone(),
                    gram: DeviceGram::new(dev, dim, fusionbench_compat)?,
                }
            }
        };
        Ok(Accumulator {
            dim,
            compat: fusionbench_compat,
            engine,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Rows counted so far (masked-out rows are not counted).
    pub fn rows(&self) -> u64 {
        match &self.engine {
            Engine::Cpu(acc) => acc.rows()[0],
            Engine::Cuda { gram, .. } => gram.rows(),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self.engine, Engine::Cuda { .. })
    }

    /// Adds the rows `x` holds: `rows` rows of `dim` values, `row_stride` elements apart;
    /// with `mask` (one byte per row), only the rows whose byte is non-zero.
    pub fn update(
        &mut self,
        x: HostRows<'_>,
        rows: usize,
        row_stride: usize,
        mask: Option<&[u8]>,
    ) -> Result<()> {
        self.check_shape(x.len(), rows, row_stride, mask.map(<[u8]>::len))?;
        if rows == 0 {
            return Ok(());
        }
        let need = needed_len(rows, row_stride, self.dim)?;
        match &mut self.engine {
            Engine::Cpu(acc) => {
                let packed =
                    CpuTensor::new(x.packed_f32(rows, row_stride, self.dim), rows, self.dim);
                acc.observe(0, &packed, mask)
            }
            Engine::Cuda { dev, gram } => {
                let real_rows = mask.map(|m| m.iter().filter(|&&v| v != 0).count() as u64);
                let mask = mask.map(|m| dev.upload(m, "row mask")).transpose()?;
                let mask = mask.as_ref().zip(real_rows).map(|(m, real_rows)| RowMask {
                    mask: m.slice(..),
                    real_rows,
                });
                let mut add =
                    |x: Activations<'_>| gram.accumulate(&x, rows, row_stride, mask.as_ref());
                match x {
                    HostRows::F16(v) => {
                        let v = dev.upload(&v[..need], "activations (f16)")?;
                        add(Activations::F16(v.slice(..)))
                    }
                    HostRows::F32(v) => {
                        let v = dev.upload(&v[..need], "activations (f32)")?;
                        add(Activations::F32(v.slice(..)))
                    }
                    HostRows::BF16(v) => {
                        // Widened on the host (exact), keeping the caller's layout.
                        let wide: Vec<f32> = v[..need].iter().map(|x| x.to_f32()).collect();
                        let v = dev.upload(&wide, "activations (bf16 as f32)")?;
                        add(Activations::F32(v.slice(..)))
                    }
                }
            }
        }
    }

    /// [`Accumulator::update`] from device memory, on the accumulator's stream (the caller's
    /// own, for a device made by [`cuda_device_on_stream`]): `x` is a device pointer to
    /// rows of `dtype`, `mask` (when given) a device pointer to one byte per row. A mask is
    /// read back to count its real rows, which waits for the stream.
    ///
    /// # Safety
    /// `x` must point to at least (rows − 1)·row_stride + dim elements of `dtype` and `mask`
    /// to `rows` bytes, allocated in the accumulator's CUDA context, written by work ordered
    /// before this call on the accumulator's stream, and kept alive (not freed nor rewritten)
    /// until the work this call queues on that stream has finished.
    pub unsafe fn update_device(
        &mut self,
        x: u64,
        dtype: RowType,
        rows: usize,
        row_stride: usize,
        mask: Option<u64>,
    ) -> Result<()> {
        let Engine::Cuda { dev, gram } = &mut self.engine else {
            return Err(Error::invalid(
                "Gram accumulator: a device pointer was given to an accumulator on the CPU",
            ));
        };
        if x == 0 || mask == Some(0) {
            return Err(Error::invalid("Gram accumulator: null device pointer"));
        }
        let need = needed_len(rows, row_stride, self.dim)?;
        if self.compat && mask.is_some() {
            return Err(compat_mask());
        }
        if row_stride < self.dim {
            return Err(stride_error(row_stride, self.dim));
        }
        if rows == 0 {
            return Ok(());
        }
        // The caller guarantees the lengths, the context and the lifetime of both buffers
        // (above); `Borrowed` never frees them.
        let mask = match mask {
            Some(m) => {
                // SAFETY: `rows` bytes at `m`, as the caller guarantees.
                let m = unsafe { Borrowed::<u8>::new(dev, m, rows) };
                let host = dev.download(m.slice())?;
                Some((m, host.iter().filter(|&&v| v != 0).count() as u64))
            }
            None => None,
        };
        let mask = mask.as_ref().map(|(m, real_rows)| RowMask {
            mask: m.slice().slice(..),
            real_rows: *real_rows,
        });
        let mut add = |x: Activations<'_>| gram.accumulate(&x, rows, row_stride, mask.as_ref());
        match dtype {
            RowType::F16 => {
                // SAFETY: `need` elements of f16 at `x`, as the caller guarantees.
                let v = unsafe { Borrowed::<f16>::new(dev, x, need) };
                add(Activations::F16(v.slice().slice(..)))
            }
            RowType::F32 => {
                // SAFETY: `need` elements of f32 at `x`, as the caller guarantees.
                let v = unsafe { Borrowed::<f32>::new(dev, x, need) };
                add(Activations::F32(v.slice().slice(..)))
            }
            RowType::BF16 => {
                // No bf16 Gram kernel: widened (exactly) on the device, layout kept.
                // SAFETY: `need` elements of bf16 (read as u16 bits) at `x`, as the caller
                // guarantees.
                let v = unsafe { Borrowed::<u16>::new(dev, x, need) };
                let wide = crate::backend::cuda::stored_to_f32(
                    dev,
                    &crate::io::Dtype::BF16,
                    v.slice(),
                    1,
                    need,
                    false,
                )?;
                add(Activations::F32(wide.slice(..)))
            }
        }
    }

    /// The full, symmetric `[dim, dim]` Gram on the host, with the rows it counted.
    pub fn finish(self) -> Result<SiteGram> {
        if self.rows() == 0 {
            return Err(no_rows());
        }
        match self.engine {
            Engine::Cpu(acc) => {
                let mut grams = acc.finish(0)?;
                Ok(grams.sites.remove(0))
            }
            Engine::Cuda { dev, gram } => {
                let (g, rows) = finish_device(&dev, gram)?;
                Ok(SiteGram {
                    name: SITE.into(),
                    dim: self.dim,
                    rows,
                    gram: dev.download(&g)?,
                })
            }
        }
    }

    /// The full, symmetric `[dim, dim]` Gram as f32 on the accumulator's device (queued on
    /// its stream), with the rows it counted. CUDA only.
    pub fn finish_on_device(self) -> Result<(CudaSlice<f32>, u64)> {
        if self.rows() == 0 {
            return Err(no_rows());
        }
        match self.engine {
            Engine::Cpu(_) => Err(Error::invalid(
                "Gram accumulator: the accumulator is on the CPU: its Gram is on the host (finish)",
            )),
            Engine::Cuda { dev, gram } => finish_device(&dev, gram),
        }
    }

    /// [`Accumulator::finish_on_device`] into the caller's device buffer `out` (dim² f32),
    /// queued on the accumulator's stream; returns the rows counted.
    ///
    /// # Safety
    /// `out` must point to dim² f32 values allocated in the accumulator's CUDA context, not
    /// used by other work until the copy queued on the accumulator's stream has finished.
    pub unsafe fn finish_into_device(self, out: u64) -> Result<u64> {
        if out == 0 {
            return Err(Error::invalid("Gram accumulator: null device pointer"));
        }
        let Engine::Cuda { dev, .. } = &self.engine else {
            return Err(Error::invalid(
                "Gram accumulator: a device pointer was given to an accumulator on the CPU",
            ));
        };
        let dev = dev.clone();
        let (g, rows) = self.finish_on_device()?;
        // SAFETY: the caller's promise (above); `Borrowed` never frees the buffer.
        let mut dst = unsafe { Borrowed::<f32>::new(&dev, out, g.len()) };
        let dst = dst.0.as_mut().expect("present until dropped");
        dev.stream().memcpy_dtod(&g, dst)?;
        Ok(rows)
    }

    fn check_shape(
        &self,
        len: usize,
        rows: usize,
        row_stride: usize,
        mask_len: Option<usize>,
    ) -> Result<()> {
        if row_stride < self.dim {
            return Err(stride_error(row_stride, self.dim));
        }
        let need = needed_len(rows, row_stride, self.dim)?;
        if len < need {
            return Err(Error::invalid(format!(
                "Gram accumulator: {len} values are too few for {rows} rows of {} with row stride {row_stride} ({need} needed)",
                self.dim
            )));
        }
        match mask_len {
            Some(_) if self.compat => Err(compat_mask()),
            Some(m) if m != rows => Err(Error::invalid(format!(
                "Gram accumulator: the mask has {m} entries for {rows} rows"
            ))),
            _ => Ok(()),
        }
    }
}

fn finish_device(dev: &CudaDevice, gram: DeviceGram) -> Result<(CudaSlice<f32>, u64)> {
    let (g, rows) = gram.finish()?;
    if crate::backend::cuda::any_nonfinite(dev, &g)? {
        return Err(Error::Numerical(
            "Gram accumulator: the Gram is not finite (the rows hold inf or NaN, or f32 overflowed)".into(),
        ));
    }
    Ok((g, rows))
}

/// Values a buffer of `rows` rows `row_stride` apart must hold: (rows − 1)·stride + dim.
fn needed_len(rows: usize, row_stride: usize, dim: usize) -> Result<usize> {
    if rows == 0 {
        return Ok(0);
    }
    (rows - 1)
        .checked_mul(row_stride)
        .and_then(|n| n.checked_add(dim))
        .ok_or_else(|| Error::invalid("Gram accumulator: rows × row stride overflows"))
}

fn stride_error(row_stride: usize, dim: usize) -> Error {
    Error::invalid(format!(
        "Gram accumulator: row stride {row_stride} is smaller than dim {dim}"
    ))
}

fn compat_mask() -> Error {
    Error::invalid(
        "Gram accumulator: a row mask was given in FusionBench compat mode, where every row counts (padding included): drop the mask",
    )
}

fn no_rows() -> Error {
    Error::invalid(
        "Gram accumulator: no rows were accumulated (every update was empty or masked out)",
    )
}

/// Says once per process that the CUDA accumulator is unverified.
fn warn_unverified() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        eprintln!("regmean-gpu: warning: the CUDA Gram accumulator has not been verified on a GPU yet: compare its Gram with a CPU accumulator's before relying on it");
    });
}

/// A caller's device buffer seen as a `CudaSlice` that is never freed here.
struct Borrowed<T>(Option<CudaSlice<T>>);

impl<T> Borrowed<T> {
    /// # Safety
    /// `ptr` must be a live allocation of at least `len` elements of `T` in `dev`'s context,
    /// kept alive while the work queued on it is pending.
    unsafe fn new(dev: &CudaDevice, ptr: u64, len: usize) -> Self {
        // SAFETY: passed on to the caller (above).
        Borrowed(Some(unsafe { dev.stream().upgrade_device_ptr(ptr, len) }))
    }

    fn slice(&self) -> &CudaSlice<T> {
        self.0
            .as_ref()
            .expect("a borrowed slice is present until dropped")
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            // The caller owns the memory: give the pointer back instead of freeing it.
            s.leak();
        }
    }
}

/// A device bound to a caller's own stream: every kernel of an accumulator made on it is
/// queued on that stream, after the caller's work there.
///
/// # Safety
/// `stream` must be a live CUDA stream (or null, the legacy default stream) of the primary
/// context of device `ordinal` (the context the CUDA runtime, hence PyTorch, uses), and stay
/// alive while the device or anything made on it is used.
pub unsafe fn cuda_device_on_stream(
    ordinal: usize,
    stream: cudarc::driver::sys::CUstream,
) -> Result<Arc<CudaDevice>> {
    let probe = crate::backend::cuda::probe();
    if let Some(why) = probe.unavailable_reason() {
        return Err(Error::invalid(format!("cannot use the GPU: {why}")));
    }
    if ordinal >= probe.devices {
        return Err(Error::invalid(format!(
            "CUDA device {ordinal}: only {} CUDA device(s) present",
            probe.devices
        )));
    }
    let ctx = cudarc::driver::CudaContext::new(ordinal)?;
    // SAFETY: everything made on this context uses the one stream below, so cudarc's
    // cross-stream events are not needed; the stream's validity is the caller's promise.
    let stream = unsafe {
        ctx.disable_event_tracking();
        ctx.wrap_borrowed_stream(stream)
    };
    CudaDevice::on_stream(stream)
}

/// One layer's RegMean closed form from sums the caller holds: W = (Σ G'ᵢ)⁻¹ Σ G'ᵢWᵢ for
/// `gram_sum` = Σ G'ᵢ `[d_in, d_in]` (symmetric), `gw_sum` = Σ G'ᵢWᵢ and `w_mean` = the
/// average W̄ of the task weights (both `[d_in, d_out]`, the weights as `[in, out]`), all
/// row-major f32. In f64 by Cholesky, with the merge's fallback towards W̄ (see
/// [`crate::backend::solve`]); returns W `[d_in, d_out]` and how it was solved.
pub fn solve(
    gram_sum: &[f32],
    gw_sum: &[f32],
    w_mean: &[f32],
    d_in: usize,
    d_out: usize,
) -> Result<(Vec<f32>, SolveOutcome)> {
    let square = d_in
        .checked_mul(d_in)
        .ok_or_else(|| Error::invalid("solve: d_in² overflows"))?;
    let rect = d_in
        .checked_mul(d_out)
        .ok_or_else(|| Error::invalid("solve: d_in·d_out overflows"))?;
    for (what, len, need) in [
        ("gram_sum", gram_sum.len(), square),
        ("gw_sum", gw_sum.len(), rect),
        ("w_mean", w_mean.len(), rect),
    ] {
        if len != need {
            return Err(Error::invalid(format!(
                "solve: {what} has {len} values, [{d_in}, {}] needs {need}",
                if what == "gram_sum" { d_in } else { d_out }
            )));
        }
    }
    // The solve reads the row-major buffer as column-major, which is the same matrix only
    // when it is symmetric.
    for i in 0..d_in {
        for j in 0..i {
            let (a, b) = (gram_sum[i * d_in + j], gram_sum[j * d_in + i]);
            if a != b && !(a.is_nan() && b.is_nan()) {
                return Err(Error::invalid(format!(
                    "solve: gram_sum is not symmetric ([{i}, {j}] = {a}, [{j}, {i}] = {b}): sum symmetric Grams, or mirror one triangle"
                )));
            }
        }
    }
    Ok(solve_layer(gram_sum, gw_sum, w_mean, d_in, d_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Σ XᵀX over the unmasked rows in f64, the reference.
    fn reference(
        x: &[f32],
        rows: usize,
        stride: usize,
        dim: usize,
        mask: Option<&[u8]>,
    ) -> (Vec<f64>, u64) {
        let mut g = vec![0.0f64; dim * dim];
        let mut n = 0;
        for r in 0..rows {
            if mask.is_some_and(|m| m[r] == 0) {
                continue;
            }
            n += 1;
            let row = &x[r * stride..r * stride + dim];
            for i in 0..dim {
                for j in 0..dim {
                    g[i * dim + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        (g, n)
    }

    fn rows_of(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn strided_masked_f32_updates_equal_the_f64_mean() {
        let (dim, stride) = (37, 41);
        let mut acc = Accumulator::new(&AccumulatorDevice::Cpu, dim, false).unwrap();
        let (mut sum, mut n) = (vec![0.0f64; dim * dim], 0);
        for (batch, rows) in [(0u32, 5usize), (1, 0), (2, 17)] {
            let x = rows_of(rows * stride, batch + 1);
            let mask: Vec<u8> = (0..rows).map(|r| (r % 3 != 1) as u8).collect();
            acc.update(HostRows::F32(&x), rows, stride, Some(&mask))
                .unwrap();
            let (g, m) = reference(&x, rows, stride, dim, Some(&mask));
            sum.iter_mut().zip(g).for_each(|(s, g)| *s += g);
            n += m;
        }
        assert_eq!(acc.rows(), n);
        let g = acc.finish().unwrap();
        assert_eq!((g.dim, g.rows), (dim, n));
        for (k, (got, want)) in g.gram.iter().zip(&sum).enumerate() {
            let want = want / n as f64;
            assert!(
                (*got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "[{k}] {got} vs {want}"
            );
            assert_eq!(*got, g.gram[(k % dim) * dim + k / dim], "symmetric at {k}");
        }
    }

    #[test]
    fn half_rows_widen_exactly() {
        let (dim, rows) = (8, 6);
        let x = rows_of(rows * dim, 7);
        let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let gram_of = |rows_in: HostRows<'_>, widened: Vec<f32>| {
            let mut a = Accumulator::new(&AccumulatorDevice::Cpu, dim, false).unwrap();
            a.update(rows_in, rows, dim, None).unwrap();
            let mut w = Accumulator::new(&AccumulatorDevice::Cpu, dim, false).unwrap();
            w.update(HostRows::F32(&widened), rows, dim, None).unwrap();
            assert_eq!(a.finish().unwrap().gram, w.finish().unwrap().gram);
        };
        gram_of(HostRows::F16(&h), h.iter().map(|v| v.to_f32()).collect());
        gram_of(HostRows::BF16(&b), b.iter().map(|v| v.to_f32()).collect());
    }

    #[test]
    fn compat_mode_is_the_running_mean_over_every_row() {
        let dim = 4;
        let mut acc = Accumulator::new(&AccumulatorDevice::Cpu, dim, true).unwrap();
        let (a, b) = (rows_of(3 * dim, 1), rows_of(5 * dim, 2));
        acc.update(HostRows::F32(&a), 3, dim, None).unwrap();
        acc.update(HostRows::F32(&b), 5, dim, None).unwrap();
        let (ga, _) = reference(&a, 3, dim, dim, None);
        let (gb, _) = reference(&b, 5, dim, dim, None);
        let g = acc.finish().unwrap();
        assert_eq!(g.rows, 8);
        for k in 0..dim * dim {
            let want = (ga[k] + gb[k]) / 8.0;
            assert!((g.gram[k] as f64 - want).abs() < 1e-5, "{k}");
        }
        let mut acc = Accumulator::new(&AccumulatorDevice::Cpu, dim, true).unwrap();
        let e = acc
            .update(HostRows::F32(&a), 3, dim, Some(&[1, 1, 1]))
            .unwrap_err();
        assert!(e.to_string().contains("compat"), "{e}");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut acc = Accumulator::new(&AccumulatorDevice::Cpu, 4, false).unwrap();
        let x = [0.0f32; 10];
        for (rows, stride, mask, want) in [
            (3, 4, None, "too few"),
            (2, 3, None, "row stride 3"),
            (2, 4, Some(&[1u8][..]), "mask has 1 entries"),
            (usize::MAX, 8, None, "overflows"),
        ] {
            let e = acc
                .update(HostRows::F32(&x), rows, stride, mask)
                .unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        assert!(Accumulator::new(&AccumulatorDevice::Cpu, 0, false).is_err());
        // SAFETY: rejected before any pointer is read (the accumulator is on the CPU).
        let e = unsafe { acc.update_device(16, RowType::F32, 1, 4, None) }.unwrap_err();
        assert!(e.to_string().contains("CPU"), "{e}");
        acc.update(HostRows::F32(&x), 2, 4, Some(&[0, 0])).unwrap();
        assert!(acc.finish().unwrap_err().to_string().contains("no rows"));
    }

    #[test]
    fn solve_checks_its_inputs_and_solves() {
        // A = [[4, 1], [1, 3]], X = [[1, 2], [3, 4]] → B = A·X.
        let (x, how) = solve(
            &[4.0, 1.0, 1.0, 3.0],
            &[7.0, 12.0, 10.0, 14.0],
            &[0.0; 4],
            2,
            2,
        )
        .unwrap();
        assert_eq!(how, SolveOutcome::Cholesky);
        for (g, w) in x.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((g - w).abs() < 1e-6, "{x:?}");
        }
        let e = solve(&[4.0, 1.0, 2.0, 3.0], &[0.0; 4], &[0.0; 4], 2, 2).unwrap_err();
        assert!(e.to_string().contains("not symmetric"), "{e}");
        let e = solve(&[4.0, 1.0, 1.0, 3.0], &[0.0; 3], &[0.0; 4], 2, 2).unwrap_err();
        assert!(e.to_string().contains("gw_sum has 3"), "{e}");
    }
}
