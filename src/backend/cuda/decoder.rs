//! The decoder-LLM operations of the [`CudaBackend`] (RMSNorm, RoPE, the SiLU-gated MLP and
//! causal grouped-query attention), launching kernels/decoder.cu. Their CPU twins are in
//! `cpu_decoder.rs` and `cpu.rs` (`doctor` and tests/gpu_decoder.rs compare the two). The
//! GEMMs, residual adds and the embedding gather are forward.rs's.

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::forward::{CudaBackend, CudaTensor, Elem};
use super::launch::{c_int, check_len, elementwise, mul};
use crate::backend::cpu_decoder::rope_table;
use crate::backend::GqaShape;
use crate::error::{Error, Result};

/// Mirrors of the launch contract in kernels/decoder.cu.
const DEC_WARPS: usize = 4;
const DEC_BQ: usize = 16;
const DEC_MAX_HD: usize = 128;

/// An error unless `cols` lies in a tensor of `width` columns and splits into groups of
/// `group` (> 0) columns.
fn check_columns(op: &str, cols: &Range<usize>, width: usize, group: usize) -> Result<()> {
    if cols.start > cols.end
        || cols.end > width
        || group == 0
        || !(cols.end - cols.start).is_multiple_of(group)
    {
        return Err(Error::Backend(format!(
            "{op}: columns {cols:?} in groups of {group} of a tensor of {width} columns"
        )));
    }
    Ok(())
}

/// The arguments of an `rms_norm` launch after its checks: (rows, ld, col0, ncols, group)
/// and the threads it needs (one warp per group).
type NormLaunch = ((i64, i32, i32, i32, i32), usize);

/// A [`NormLaunch`], or none when there is nothing to normalise.
type NormArgs = Option<NormLaunch>;

fn norm_args(
    x: &CudaTensor,
    cols: &Range<usize>,
    weight: &CudaTensor,
    w_len: usize,
) -> Result<NormArgs> {
    let (rows, width) = x.dims();
    let (wr, wc) = weight.dims();
    let group = wr * wc;
    check_columns("rms_norm", cols, width, group)?;
    check_len("rms_norm weight", w_len, group)?;
    let groups = mul("rms_norm", rows, (cols.end - cols.start) / group)?;
    if groups == 0 {
        return Ok(None);
    }
    let args = (
        rows as i64,
        c_int("cols", width)?,
        c_int("column", cols.start)?,
        c_int("columns", cols.end - cols.start)?,
        c_int("group", group)?,
    );
    Ok(Some((args, mul("rms_norm", groups, 32)?)))
}

impl CudaBackend {
    /// Launches `rms_norm` over `launch` (from [`norm_args`]) reading the device buffer at
    /// `src` and writing the one at `dst` (the same one for in place).
    ///
    /// # Safety
    /// `src` and `dst` must each address rows·ld elements of T, alive and ordered on this
    /// stream until the launch is enqueued, and `launch` must come from [`norm_args`] for
    /// that tensor and `weight`.
    unsafe fn launch_rms_norm<T: Elem>(
        &self,
        src: u64,
        dst: u64,
        weight: &CudaTensor,
        launch: NormLaunch,
        eps: f32,
    ) -> Result<()> {
        let ((r, ld, col0, ncols, group), threads) = launch;
        let f = self.kernel_in::<T>("decoder", "rms_norm")?;
        let mut b = self.device().stream().launch_builder(&f);
        b.arg(&src).arg(&dst).arg(T::view(weight)?);
        b.arg(&r)
            .arg(&ld)
            .arg(&col0)
            .arg(&ncols)
            .arg(&group)
            .arg(&eps);
        // SAFETY: (const T*, T*, const T*, long long, int, int, int, int, float) as pushed;
        // src and dst hold rows·ld elements (the caller's contract), the weight `group`
        // (norm_args checked it), the columns [col0, col0 + ncols) lie within ld; one warp
        // per group, grid-stride, as the kernel's contract asks; src may equal dst.
        unsafe { b.launch(elementwise(threads)) }?;
        Ok(())
    }

    pub(super) fn rms_norm_t<T: Elem>(
        &self,
        x: &CudaTensor,
        weight: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        let (rows, width) = x.dims();
        let mut out = self.output::<T>(rows, width, "rms_norm output")?;
        let (wr, wc) = weight.dims();
        if wr * wc != width {
            return Err(Error::Backend(format!(
                "rms_norm: {} weights for rows of {width}",
                wr * wc
            )));
        }
        let Some(launch) = norm_args(x, &(0..width), weight, T::view(weight)?.len())? else {
            return Ok(out);
        };
        check_len("rms_norm x", T::view(x)?.len(), rows * width)?;
        let stream = self.device().stream();
        let (xp, _xg) = T::view(x)?.device_ptr(stream);
        let (op, _og) = T::view_mut(&mut out)?.device_ptr_mut(stream);
        // SAFETY: x holds rows·width elements (checked) and out was allocated so; the guards,
        // dropped after the launch is enqueued, order both on the stream. Every column is
        // normalised (ncols = width), so out is written whole, as `output` requires.
        unsafe { self.launch_rms_norm::<T>(xp, op, weight, launch, eps) }?;
        drop((_xg, _og));
        Ok(out)
    }

    pub(super) fn rms_norm_columns_t<T: Elem>(
        &self,
        x: &mut CudaTensor,
        cols: Range<usize>,
        weight: &CudaTensor,
        eps: f32,
    ) -> Result<()> {
        let Some(launch) = norm_args(x, &cols, weight, T::view(weight)?.len())? else {
            return Ok(());
        };
        let (rows, width) = x.dims();
        check_len("rms_norm x", T::view(x)?.len(), rows * width)?;
        let stream = self.device().stream();
        let (xp, _xg) = T::view_mut(x)?.device_ptr_mut(stream);
        // SAFETY: in place (each warp reads its group whole before writing it): x holds
        // rows·width elements (checked); the guard, dropped after the launch is enqueued,
        // orders x on the stream.
        unsafe { self.launch_rms_norm::<T>(xp, xp, weight, launch, eps) }?;
        drop(_xg);
        Ok(())
    }

    /// The (cos, sin) table of (seq, inv_freq) on the device: every layer of a forward pass
    /// rotates by the same one, so it is uploaded once and reused while they are unchanged.
    fn rope_table_on_device(&self, seq: usize, inv_freq: &[f32]) -> Result<Arc<CudaSlice<f32>>> {
        let mut last = self
            .rope_table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((s, f, t)) = last.as_ref() {
            if *s == seq && f.as_slice() == inv_freq {
                return Ok(t.clone());
            }
        }
        let flat: Vec<f32> = rope_table(seq, inv_freq)
            .into_iter()
            .flat_map(|(c, s)| [c, s])
            .collect();
        let table = Arc::new(self.device().upload(&flat, "RoPE table")?);
        *last = Some((seq, inv_freq.to_vec(), table.clone()));
        Ok(table)
    }

    pub(super) fn rotary_t<T: Elem>(
        &self,
        x: &mut CudaTensor,
        cols: Range<usize>,
        head_dim: usize,
        seq: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        let (rows, width) = x.dims();
        check_columns("rotary", &cols, width, head_dim)?;
        let half = head_dim / 2;
        if inv_freq.len() != half || !head_dim.is_multiple_of(2) || seq == 0 {
            return Err(Error::Backend(format!(
                "rotary: {} frequencies for head_dim {head_dim}, sequences of {seq}",
                inv_freq.len()
            )));
        }
        if !rows.is_multiple_of(seq) {
            return Err(Error::Backend(format!(
                "rotary: {rows} rows are not sequences of {seq}"
            )));
        }
        let heads = (cols.end - cols.start) / head_dim;
        let n = mul("rotary", mul("rotary", rows, heads)?, half)?;
        if n == 0 {
            return Ok(());
        }
        check_len("rotary x", T::view(x)?.len(), rows * width)?;
        let table = self.rope_table_on_device(seq, inv_freq)?;
        check_len("RoPE table", table.len(), seq * head_dim)?;
        let (r, ld, col0) = (
            rows as i64,
            c_int("cols", width)?,
            c_int("column", cols.start)?,
        );
        let (hi, hdi, si) = (
            c_int("heads", heads)?,
            c_int("head_dim", head_dim)?,
            c_int("seq", seq)?,
        );
        let f = self.kernel_in::<T>("decoder", "rotary")?;
        let mut b = self.device().stream().launch_builder(&f);
        b.arg(T::view_mut(x)?).arg(table.as_ref());
        b.arg(&r).arg(&ld).arg(&col0).arg(&hi).arg(&hdi).arg(&si);
        // SAFETY: (T*, const float2*, long long, int, int, int, int, int) as pushed; x holds
        // rows·ld elements and the heads lie within ld (checked), the table seq·hd/2 float
        // pairs (a fresh allocation, aligned for float2); grid-stride over rows·heads·hd/2.
        unsafe { b.launch(elementwise(n)) }?;
        Ok(())
    }

    pub(super) fn silu_mul_t<T: Elem>(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        let (rows, cols) = gate_up.dims();
        if !cols.is_multiple_of(2) {
            return Err(Error::Backend(format!(
                "silu_mul: {cols} columns is not gate|up"
            )));
        }
        let f_dim = cols / 2;
        let mut out = self.output::<T>(rows, f_dim, "silu_mul output")?;
        let n = mul("silu_mul", rows, f_dim)?;
        if n == 0 {
            return Ok(out);
        }
        check_len("silu_mul gate|up", T::view(gate_up)?.len(), rows * cols)?;
        let (r, fi) = (rows as i64, c_int("intermediate size", f_dim)?);
        let f = self.kernel_in::<T>("decoder", "silu_mul")?;
        let mut b = self.device().stream().launch_builder(&f);
        b.arg(T::view(gate_up)?)
            .arg(T::view_mut(&mut out)?)
            .arg(&r)
            .arg(&fi);
        // SAFETY: (const T*, T*, long long, int) as pushed; gate_up holds rows·2f and out
        // rows·f elements (checked / allocated), every one of which the grid-stride writes.
        unsafe { b.launch(elementwise(n)) }?;
        Ok(out)
    }

    pub(super) fn gqa_attention_t<T: Elem>(
        &self,
        qkv: &CudaTensor,
        s: GqaShape,
        key_mask: Option<&[u8]>,
    ) -> Result<CudaTensor> {
        let (rows, cols) = qkv.dims();
        let width = mul("attention", s.heads + 2 * s.kv_heads, s.head_dim)?;
        if s.kv_heads == 0
            || !s.heads.is_multiple_of(s.kv_heads)
            || rows != mul("attention", s.batch, s.seq)?
            || cols != width
        {
            return Err(Error::Backend(format!(
                "gqa_attention: qkv [{rows}, {cols}] for {s:?}"
            )));
        }
        if s.head_dim > DEC_MAX_HD {
            return Err(Error::Backend(format!(
                "gqa_attention: head_dim {} above the kernel's {DEC_MAX_HD}",
                s.head_dim
            )));
        }
        if s.batch > 65535 || s.heads > 65535 {
            return Err(Error::Backend(
                "gqa_attention: batch or heads above 65535".into(),
            ));
        }
        let d = mul("attention", s.heads, s.head_dim)?;
        let mut out = self.output::<T>(rows, d, "attention output")?;
        if rows == 0 || d == 0 {
            return Ok(out);
        }
        check_len("qkv", T::view(qkv)?.len(), rows * cols)?;
        let mask = match key_mask {
            Some(m) if m.len() != rows => {
                return Err(Error::Backend("gqa_attention: mask length".into()));
            }
            Some(m) => Some(self.mask_on_device(m)?),
            None => None,
        };
        let cfg = LaunchConfig {
            grid_dim: (
                c_int("seq", s.seq.div_ceil(DEC_BQ))? as u32,
                s.heads as u32,
                s.batch as u32,
            ),
            block_dim: (32 * DEC_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (seq, heads, kv, hd) = (
            c_int("seq", s.seq)?,
            c_int("heads", s.heads)?,
            c_int("kv_heads", s.kv_heads)?,
            c_int("head_dim", s.head_dim)?,
        );
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let null: u64 = 0;
        let f = self.kernel_in::<T>("decoder", "gqa_attention")?;
        let mut b = self.device().stream().launch_builder(&f);
        b.arg(T::view(qkv)?).arg(T::view_mut(&mut out)?);
        match &mask {
            Some(m) => b.arg(m.as_ref()),
            None => b.arg(&null),
        };
        b.arg(&seq).arg(&heads).arg(&kv).arg(&hd).arg(&scale);
        // SAFETY: (const T*, T*, const unsigned char*, int, int, int, int, float) as pushed;
        // qkv holds B·S·(H + 2·KV)·hd, out B·S·H·hd elements and the mask B·S bytes
        // (checked); H is a multiple of KV, hd ≤ DEC_MAX_HD, and the grid is
        // (ceil(S/DEC_BQ), H, B) with DEC_WARPS·32 threads, as the kernel's contract asks.
        // Every output row is written (fully masked rows as zeros), as `output` requires.
        unsafe { b.launch(cfg) }?;
        Ok(out)
    }
}
