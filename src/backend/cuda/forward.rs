//! The [`Backend`] on a GPU: activations and weights on the device in fp16 (default) or
//! f32, GEMMs through cuBLAS (`cublasGemmEx`, f32 accumulation), everything else in
//! kernels/forward.cu (the decoder LLMs' own operations: decoder.rs, kernels/decoder.cu), and the Gram of every linear input taken from the activation buffer
//! in place. The CPU backend is its oracle (`doctor`, tests/gpu.rs).

use std::sync::Arc;

use cudarc::cublas::sys as bs;
use cudarc::driver::{
    CudaFunction, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use half::f16;

use super::device::CudaDevice;
use super::gram::{launch_gram, running_mean_step, Activations};
use super::launch::{c_int, check_len, elementwise, mul};
use super::weights;
use crate::backend::{Activation, AttentionShape, Backend, GqaShape, GramUpdate, Precision};
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::Site;

/// Mirrors of the launch contract in kernels/forward.cu.
const ATTN_WARPS: usize = 4;
const ATTN_MAX_HD: usize = 256;
const FWD_THREADS: u32 = 256;

/// A device buffer of either element type.
pub enum DeviceBuffer {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
}

/// A row-major `[rows, cols]` matrix on the GPU.
///
/// Invariant: the buffer holds at least rows·cols elements. Every constructor in this module
/// (uploads, op outputs, accumulators) allocates exactly that (at least one element), and the
/// fields are private; the launches' SAFETY comments rely on it when they check shapes.
pub struct CudaTensor {
    buf: DeviceBuffer,
    rows: usize,
    cols: usize,
}

impl CudaTensor {
    pub fn buffer(&self) -> &DeviceBuffer {
        &self.buf
    }

    /// (rows, cols).
    pub(super) fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
}

/// An element type the forward kernels come in.
pub(super) trait Elem: super::ring::Plain + ValidAsZeroBits + Unpin + 'static {
    const SUFFIX: &'static str;
    const CUDA_TYPE: bs::cudaDataType;
    fn view(t: &CudaTensor) -> Result<&CudaSlice<Self>>;
    fn view_mut(t: &mut CudaTensor) -> Result<&mut CudaSlice<Self>>;
    fn wrap(s: CudaSlice<Self>, rows: usize, cols: usize) -> CudaTensor;
    fn to_f32(data: Vec<Self>) -> Vec<f32>;
    /// `dst[i] = src[i]` converted (same lengths).
    fn convert_into(dst: &mut [Self], src: &[f32]);
    fn from_f32(data: &[f32]) -> Vec<Self> {
        use rayon::prelude::*;
        let mut out = vec![Self::default(); data.len()];
        out.par_chunks_mut(1 << 16)
            .zip(data.par_chunks(1 << 16))
            .for_each(|(d, s)| Self::convert_into(d, s));
        out
    }
}

fn wrong_type(want: &str) -> Error {
    Error::Backend(format!("cuda: expected a {want} tensor"))
}

/// `Elem`'s access to the `DeviceBuffer` variant of one element type.
macro_rules! buffer_access {
    ($variant:ident, $name:literal) => {
        fn view(t: &CudaTensor) -> Result<&CudaSlice<Self>> {
            match &t.buf {
                DeviceBuffer::$variant(s) => Ok(s),
                _ => Err(wrong_type($name)),
            }
        }
        fn view_mut(t: &mut CudaTensor) -> Result<&mut CudaSlice<Self>> {
            match &mut t.buf {
                DeviceBuffer::$variant(s) => Ok(s),
                _ => Err(wrong_type($name)),
            }
        }
        fn wrap(s: CudaSlice<Self>, rows: usize, cols: usize) -> CudaTensor {
            CudaTensor {
                buf: DeviceBuffer::$variant(s),
                rows,
                cols,
            }
        }
    };
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const CUDA_TYPE: bs::cudaDataType = bs::cudaDataType_t::CUDA_R_32F;
    buffer_access!(F32, "f32");
    fn from_f32(data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn convert_into(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn to_f32(data: Vec<f32>) -> Vec<f32> {
        data
    }
}

impl Elem for f16 {
    const SUFFIX: &'static str = "f16";
    const CUDA_TYPE: bs::cudaDataType = bs::cudaDataType_t::CUDA_R_16F;
    buffer_access!(F16, "f16");
    fn convert_into(dst: &mut [f16], src: &[f32]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &s)| *d = f16::from_f32(s));
    }
    fn to_f32(data: Vec<f16>) -> Vec<f32> {
        use rayon::prelude::*;
        data.into_par_iter()
            .with_min_len(1 << 16)
            .map(f16::to_f32)
            .collect()
    }
}

/// Runs `$self.$method::<T>(args)` with T the backend's activation type.
macro_rules! by_precision {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self.precision {
            Precision::Float32 => $self.$method::<f32>($($arg),*),
            Precision::Float16 => $self.$method::<f16>($($arg),*),
        }
    };
}

/// A host row mask and its copy on the device.
type UploadedMask = (Vec<u8>, Arc<CudaSlice<u8>>);

/// A RoPE (cos, sin) table on the device, for (seq, inv_freq) (decoder.rs fills it).
pub(super) type RopeTable = (usize, Vec<f32>, Arc<CudaSlice<f32>>);

/// The forward pass on one GPU.
pub struct CudaBackend {
    dev: Arc<CudaDevice>,
    precision: Precision,
    last_mask: std::sync::Mutex<Option<UploadedMask>>,
    pub(super) rope_table: std::sync::Mutex<Option<RopeTable>>,
}

impl CudaBackend {
    pub fn new(dev: Arc<CudaDevice>, precision: Precision) -> Self {
        CudaBackend {
            dev,
            precision,
            last_mask: std::sync::Mutex::new(None),
            rope_table: std::sync::Mutex::new(None),
        }
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    fn alloc<T: Elem>(&self, rows: usize, cols: usize, what: &str) -> Result<CudaTensor> {
        let n = mul(what, rows, cols)?;
        Ok(T::wrap(self.dev.zeros::<T>(n, what)?, rows, cols))
    }

    /// The forward kernel `name` for T (kernels/forward.cu: `{name}_f32`, `{name}_f16`).
    fn kernel<T: Elem>(&self, name: &str) -> Result<CudaFunction> {
        self.kernel_in::<T>("forward", name)
    }

    /// The kernel `name` for T in the kernels/`module`.cu that provides `{name}_f32` and
    /// `{name}_f16`.
    pub(super) fn kernel_in<T: Elem>(
        &self,
        module: &'static str,
        name: &str,
    ) -> Result<CudaFunction> {
        self.dev.function(module, &format!("{name}_{}", T::SUFFIX))
    }

    /// An op's output, left unset: every op below writes all of its output (cuBLAS with
    /// β = 0 does not read C), so zeroing it first would be a wasted pass.
    pub(super) fn output<T: Elem>(
        &self,
        rows: usize,
        cols: usize,
        what: &str,
    ) -> Result<CudaTensor> {
        let n = mul(what, rows, cols)?;
        // SAFETY: each caller launches a kernel (or GEMM) that writes every element before
        // the tensor is returned, or returns it empty (rows·cols = 0).
        let buf = unsafe { self.dev.uninit::<T>(n, what) }?;
        Ok(T::wrap(buf, rows, cols))
    }

    /// The mask on the device. A batch's mask is the same at every site and attention of
    /// its forward pass: it is uploaded once and reused while the host mask is unchanged.
    pub(super) fn mask_on_device(&self, mask: &[u8]) -> Result<Arc<CudaSlice<u8>>> {
        let mut last = self
            .last_mask
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((host, dev)) = last.as_ref() {
            if host.as_slice() == mask {
                return Ok(dev.clone());
            }
        }
        let dev = Arc::new(self.dev.upload(mask, "row mask")?);
        *last = Some((mask.to_vec(), dev.clone()));
        Ok(dev)
    }

    fn upload_t<T: Elem>(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        if data.len() != mul("upload", rows, cols)? {
            return Err(Error::Backend(format!(
                "upload of {} values as [{rows}, {cols}]",
                data.len()
            )));
        }
        let host = T::from_f32(data);
        Ok(T::wrap(self.dev.upload(&host, "tensor")?, rows, cols))
    }

    fn download_t<T: Elem>(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        let mut host = self.dev.download(T::view(t)?)?;
        // Empty tensors own a one-element buffer (no zero-size allocations).
        host.truncate(t.rows * t.cols);
        Ok(T::to_f32(host))
    }

    /// `y[rows, out] = x[rows, in] · w[in, out]` with cuBLAS, f32 accumulation.
    fn gemm<T: Elem>(&self, x: &CudaTensor, w: &CudaTensor) -> Result<CudaTensor> {
        if x.cols != w.rows {
            return Err(Error::Backend(format!(
                "linear: x [{}, {}] · w [{}, {}]",
                x.rows, x.cols, w.rows, w.cols
            )));
        }
        let (rows, k, n) = (x.rows, x.cols, w.cols);
        let mut y = self.output::<T>(rows, n, "linear output")?;
        if rows == 0 || n == 0 {
            return Ok(y);
        }
        check_len("x", T::view(x)?.len(), mul("x", rows, k)?)?;
        check_len("w", T::view(w)?.len(), mul("w", k, n)?)?;
        // Row-major [r, c] is column-major [c, r]: yᵀ[n, rows] = wᵀ[n, k] · xᵀ[k, rows],
        // so A = w's buffer (ld n), B = x's buffer (ld k), C = y's buffer (ld n).
        let (m_, n_, k_) = (c_int("out", n)?, c_int("rows", rows)?, c_int("in", k)?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.dev.bind()?;
        let stream = self.dev.stream();
        let y_buf = T::view_mut(&mut y)?;
        let (wp, _ws) = T::view(w)?.device_ptr(stream);
        let (xp, _xs) = T::view(x)?.device_ptr(stream);
        let (yp, _ys) = y_buf.device_ptr_mut(stream);
        // SAFETY: w holds k·n, x rows·k and y rows·n elements of T (checked above), exactly
        // the spans m, n, k and the leading dimensions address; alpha and beta are host f32
        // (CUBLAS_COMPUTE_32F's scalar type, default host pointer mode); the handle is bound
        // to this stream and the guards, dropped after the call is enqueued, order the
        // buffers on it.
        unsafe {
            bs::cublasGemmEx(
                *self.dev.blas().handle(),
                bs::cublasOperation_t::CUBLAS_OP_N,
                bs::cublasOperation_t::CUBLAS_OP_N,
                m_,
                n_,
                k_,
                &alpha as *const f32 as *const _,
                wp as *const _,
                T::CUDA_TYPE,
                m_,
                xp as *const _,
                T::CUDA_TYPE,
                k_,
                &beta as *const f32 as *const _,
                yp as *mut _,
                T::CUDA_TYPE,
                m_,
                bs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .result()?;
        drop((_ws, _xs, _ys));
        Ok(y)
    }

    fn bias_act<T: Elem>(
        &self,
        y: &mut CudaTensor,
        bias: Option<&CudaTensor>,
        act: Option<Activation>,
    ) -> Result<()> {
        if bias.is_none() && act.is_none() {
            return Ok(());
        }
        let (rows, cols) = (y.rows as i64, c_int("cols", y.cols)?);
        let n = mul("bias_act", y.rows, y.cols)?;
        let act_code: i32 = match act {
            None => 0,
            Some(Activation::GeluNew) => 1,
            Some(Activation::QuickGelu) => 2,
        };
        let f = self.kernel::<T>("bias_act")?;
        if let Some(bias) = bias {
            check_len("bias", T::view(bias)?.len(), y.cols)?;
        }
        let null: u64 = 0;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(T::view_mut(y)?);
        match bias {
            Some(bias) => b.arg(T::view(bias)?),
            None => b.arg(&null),
        };
        b.arg(&rows).arg(&cols).arg(&act_code);
        // SAFETY: (T*, const T*, long long, int, int) as pushed; y holds rows·cols and the
        // bias (or null) cols elements of T; the kernel is grid-stride over rows·cols.
        unsafe { b.launch(elementwise(n)) }?;
        Ok(())
    }

    fn linear_t<T: Elem>(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        act: Option<Activation>,
    ) -> Result<CudaTensor> {
        let mut y = self.gemm::<T>(x, w)?;
        self.bias_act::<T>(&mut y, bias, act)?;
        Ok(y)
    }

    fn norm_launch(&self, rows: usize, d: usize) -> Result<LaunchConfig> {
        let smem = mul("layer_norm", d, 4)?;
        // 48 KiB of shared memory per block without opting in; block_sum's own static
        // shared memory (36 bytes) takes some of it.
        if smem + 64 > 48 * 1024 {
            return Err(Error::Backend(format!(
                "layer_norm: rows of {d} values exceed the kernel's limit of 12272"
            )));
        }
        Ok(LaunchConfig {
            grid_dim: (rows.clamp(1, 65535) as u32, 1, 1),
            block_dim: (FWD_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        })
    }

    /// A LayerNorm's output for `x` (gamma and beta checked to hold one value per column),
    /// with the launch of its kernel: the configuration, rows and d; none when x has no rows.
    #[allow(clippy::type_complexity)]
    fn norm_output<T: Elem>(
        &self,
        x: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
    ) -> Result<(CudaTensor, Option<(LaunchConfig, i32, i32)>)> {
        if gamma.rows * gamma.cols != x.cols || beta.rows * beta.cols != x.cols {
            return Err(Error::Backend("layer_norm: parameter size".into()));
        }
        let out = self.output::<T>(x.rows, x.cols, "layer_norm output")?;
        if x.rows == 0 {
            return Ok((out, None));
        }
        let cfg = self.norm_launch(x.rows, x.cols)?;
        let (rows, d) = (c_int("rows", x.rows)?, c_int("d", x.cols)?);
        Ok((out, Some((cfg, rows, d))))
    }

    fn layer_norm_t<T: Elem>(
        &self,
        x: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        let (mut out, launch) = self.norm_output::<T>(x, gamma, beta)?;
        let Some((cfg, rows, d)) = launch else {
            return Ok(out);
        };
        let f = self.kernel::<T>("layer_norm")?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(T::view(x)?).arg(T::view(gamma)?).arg(T::view(beta)?);
        b.arg(T::view_mut(&mut out)?).arg(&rows).arg(&d).arg(&eps);
        // SAFETY: (const T*, const T*, const T*, T*, int, int, float) as pushed; x and out
        // hold rows·d, gamma and beta d elements (checked); d·4 bytes of dynamic shared
        // memory as the kernel's contract asks.
        unsafe { b.launch(cfg) }?;
        Ok(out)
    }

    fn add_layer_norm_t<T: Elem>(
        &self,
        h: &mut CudaTensor,
        y: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        if (h.rows, h.cols) != (y.rows, y.cols) {
            return Err(Error::Backend("add_layer_norm: shapes differ".into()));
        }
        let (mut out, launch) = self.norm_output::<T>(h, gamma, beta)?;
        let Some((cfg, rows, d)) = launch else {
            return Ok(out);
        };
        let f = self.kernel::<T>("add_layer_norm")?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(T::view_mut(h)?).arg(T::view(y)?);
        b.arg(T::view(gamma)?).arg(T::view(beta)?);
        b.arg(T::view_mut(&mut out)?).arg(&rows).arg(&d).arg(&eps);
        // SAFETY: (T*, const T*, const T*, const T*, T*, int, int, float) as pushed; h, y
        // and out hold rows·d, gamma and beta d elements (checked); d·4 bytes of dynamic
        // shared memory as the contract asks.
        unsafe { b.launch(cfg) }?;
        Ok(out)
    }

    fn add_t<T: Elem>(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        if (x.rows, x.cols) != (y.rows, y.cols) {
            return Err(Error::Backend("add_assign: shapes differ".into()));
        }
        let n = mul("add", x.rows, x.cols)?;
        let f = self.kernel::<T>("add")?;
        let ni = n as i64;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(T::view_mut(x)?).arg(T::view(y)?).arg(&ni);
        // SAFETY: (T*, const T*, long long) as pushed; both hold n elements.
        unsafe { b.launch(elementwise(n)) }?;
        Ok(())
    }

    fn attention_t<T: Elem>(
        &self,
        qkv: &CudaTensor,
        s: AttentionShape,
        key_mask: Option<&[u8]>,
    ) -> Result<CudaTensor> {
        let d = mul("attention", s.heads, s.head_dim)?;
        let rows = mul("attention", s.batch, s.seq)?;
        if qkv.rows != rows || qkv.cols != mul("attention", 3, d)? {
            return Err(Error::Backend(format!(
                "attention: qkv [{}, {}] for {s:?}",
                qkv.rows, qkv.cols
            )));
        }
        if s.head_dim > ATTN_MAX_HD {
            return Err(Error::Backend(format!(
                "attention: head_dim {} above the kernel's {ATTN_MAX_HD}",
                s.head_dim
            )));
        }
        let mut out = self.output::<T>(rows, d, "attention output")?;
        if rows == 0 || d == 0 {
            return Ok(out);
        }
        let mask = match key_mask {
            Some(m) if m.len() != rows => {
                return Err(Error::Backend("attention: mask length".into()));
            }
            Some(m) => Some(self.mask_on_device(m)?),
            None => None,
        };
        let cfg = LaunchConfig {
            grid_dim: (
                c_int("seq", s.seq.div_ceil(ATTN_WARPS))? as u32,
                c_int("heads", s.heads)? as u32,
                c_int("batch", s.batch)?.min(65535) as u32,
            ),
            block_dim: (32 * ATTN_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        if s.batch > 65535 || s.heads > 65535 {
            return Err(Error::Backend(
                "attention: batch or heads above 65535".into(),
            ));
        }
        let (seq, heads, hd) = (
            c_int("seq", s.seq)?,
            c_int("heads", s.heads)?,
            c_int("head_dim", s.head_dim)?,
        );
        let causal = s.causal as i32;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        let null: u64 = 0;
        let f = self.kernel::<T>("attention")?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(T::view(qkv)?).arg(T::view_mut(&mut out)?);
        match &mask {
            Some(m) => b.arg(m.as_ref()),
            None => b.arg(&null),
        };
        b.arg(&seq).arg(&heads).arg(&hd).arg(&causal).arg(&scale);
        // SAFETY: (const T*, T*, const unsigned char*, int, int, int, int, float) as pushed;
        // qkv holds B·S·3·H·hd, out B·S·H·hd elements and the mask B·S bytes (checked), the
        // grid is (ceil(S/ATTN_WARPS), H, B) with ATTN_WARPS·32 threads and hd ≤ ATTN_MAX_HD
        // as the kernel's contract asks.
        unsafe { b.launch(cfg) }?;
        Ok(out)
    }

    fn embed_tokens_t<T: Elem>(
        &self,
        wte: &CudaTensor,
        wpe: &CudaTensor,
        ids: &[u32],
        seq: usize,
    ) -> Result<CudaTensor> {
        let d = wte.cols;
        if seq == 0 || seq > wpe.rows || wpe.cols != d || !ids.len().is_multiple_of(seq) {
            return Err(Error::Backend(format!(
                "embed: {} ids in sequences of {seq}, {} positions",
                ids.len(),
                wpe.rows
            )));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= wte.rows) {
            return Err(Error::Backend(format!(
                "embed: token id {bad} ≥ vocabulary size {}",
                wte.rows
            )));
        }
        let mut out = self.output::<T>(ids.len(), d, "embeddings")?;
        if ids.is_empty() {
            return Ok(out);
        }
        let ids_dev = self.dev.upload(ids, "token ids")?;
        let (rows, seqi, di) = (ids.len() as i64, c_int("seq", seq)?, c_int("d", d)?);
        let f = self.kernel::<T>("embed_tokens")?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(T::view(wte)?)
            .arg(T::view(wpe)?)
            .arg(&ids_dev)
            .arg(T::view_mut(&mut out)?)
            .arg(&rows)
            .arg(&seqi)
            .arg(&di);
        // SAFETY: (const T*, const T*, const unsigned*, T*, long long, int, int) as pushed;
        // every id is below wte's rows and every position below wpe's (checked), out holds
        // rows·d elements.
        unsafe { b.launch(elementwise(ids.len() * d)) }?;
        Ok(out)
    }

    fn clip_tokens_t<T: Elem>(
        &self,
        patches: &CudaTensor,
        class: &CudaTensor,
        pos: &CudaTensor,
        batch: usize,
    ) -> Result<CudaTensor> {
        let d = patches.cols;
        let n_patches = patches.rows / batch.max(1);
        let tokens = n_patches + 1;
        if patches.rows != batch * n_patches
            || pos.rows != tokens
            || pos.cols != d
            || class.rows * class.cols != d
        {
            return Err(Error::Backend(format!(
                "clip_tokens: {} positions for {tokens} tokens",
                pos.rows
            )));
        }
        let mut out = self.output::<T>(batch * tokens, d, "embeddings")?;
        if batch == 0 {
            return Ok(out);
        }
        let (bi, ti, di) = (
            c_int("batch", batch)?,
            c_int("tokens", tokens)?,
            c_int("d", d)?,
        );
        let f = self.kernel::<T>("clip_tokens")?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(T::view(patches)?)
            .arg(T::view(class)?)
            .arg(T::view(pos)?)
            .arg(T::view_mut(&mut out)?)
            .arg(&bi)
            .arg(&ti)
            .arg(&di);
        // SAFETY: (const T*, const T*, const T*, T*, int, int, int) as pushed; the shapes
        // were checked above and bound every index the kernel forms.
        unsafe { b.launch(elementwise(batch * tokens * d)) }?;
        Ok(out)
    }

    fn patch_rows_t<T: Elem>(
        &self,
        pixels: &[f32],
        batch: usize,
        channels: usize,
        size: usize,
        patch: usize,
    ) -> Result<CudaTensor> {
        if patch == 0
            || !size.is_multiple_of(patch)
            || pixels.len() != batch * channels * size * size
        {
            return Err(Error::Backend(format!(
                "patchify: {} values for {batch} images of {channels}×{size}×{size}",
                pixels.len()
            )));
        }
        let g = size / patch;
        let k = channels * patch * patch;
        let mut out = self.output::<T>(batch * g * g, k, "patches")?;
        if pixels.is_empty() {
            return Ok(out);
        }
        let pix = self
            .dev
            .upload_staged::<T>(pixels.len(), "pixel values", |first, dst| {
                T::convert_into(dst, &pixels[first..first + dst.len()])
            })?;
        let (bi, ci) = (c_int("batch", batch)?, c_int("channels", channels)?);
        let (si, pi) = (c_int("image_size", size)?, c_int("patch_size", patch)?);
        let f = self.kernel::<T>("im2col")?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(&pix)
            .arg(T::view_mut(&mut out)?)
            .arg(&bi)
            .arg(&ci)
            .arg(&si)
            .arg(&pi);
        // SAFETY: (const T*, T*, int, int, int, int) as pushed; pixels hold B·C·S·S and out
        // B·(S/p)²·C·p·p elements (checked), the kernel reads and writes only those.
        unsafe { b.launch(elementwise(batch * g * g * k)) }?;
        Ok(out)
    }

    /// A site's fused `[in, Σ out]` weight, made on the device from each module's f32
    /// `[in, out]` copy, made from the stored bytes.
    fn site_weight_t<T: Elem>(&self, ckpt: &Checkpoint, site: &Site) -> Result<CudaTensor> {
        site.check_inputs()?;
        let parts = site
            .modules
            .iter()
            .map(|m| {
                crate::profile::span("load: weights on the GPU", || {
                    weights::linear_in_out(&self.dev, ckpt, m)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let parts: Vec<&CudaSlice<f32>> = parts.iter().collect();
        self.site_weight_from_t::<T>(site, &parts)
    }

    /// The fused weight of a site from its modules' f32 `[in, out]` copies on the device
    /// (`parts`, in the site's order); the merge makes those once for the forward pass and
    /// its sums.
    pub(super) fn site_weight_from_parts(
        &self,
        site: &Site,
        parts: &[&CudaSlice<f32>],
    ) -> Result<CudaTensor> {
        by_precision!(self.site_weight_from_t(site, parts))
    }

    fn site_weight_from_t<T: Elem>(
        &self,
        site: &Site,
        parts: &[&CudaSlice<f32>],
    ) -> Result<CudaTensor> {
        if parts.len() != site.modules.len() {
            return Err(Error::Backend(format!(
                "site {}: {} weights for {} modules",
                site.name,
                parts.len(),
                site.modules.len()
            )));
        }
        let out_dim: usize = site.modules.iter().map(|m| m.out_dim).sum();
        let mut w = self.output::<T>(site.dim, out_dim, "linear weight")?;
        let f = self
            .dev
            .function("weights", &format!("place_columns_{}", T::SUFFIX))?;
        let (rows, ld) = (c_int("in", site.dim)?, c_int("out", out_dim)?);
        site.check_inputs()?;
        let mut offset = 0usize;
        for (m, part) in site.modules.iter().zip(parts) {
            let n = mul("linear weight", site.dim, m.out_dim)?;
            check_len("linear weight", part.len(), n)?;
            if n > 0 {
                let (cols, off) = (c_int("out", m.out_dim)?, c_int("offset", offset)?);
                let mut b = self.dev.stream().launch_builder(&f);
                b.arg(*part)
                    .arg(T::view_mut(&mut w)?)
                    .arg(&rows)
                    .arg(&cols)
                    .arg(&ld)
                    .arg(&off);
                // SAFETY: (const float*, T*, int, int, int, int) as pushed; part holds
                // in·out values (checked), w in·Σout, and offset + out ≤ Σout: every write
                // r·ld + offset + c lies inside w.
                unsafe { b.launch(elementwise(n)) }?;
            }
            offset += m.out_dim;
        }
        // Every column of w was written above (the modules' widths sum to Σ out), as
        // `output` requires.
        Ok(w)
    }

    fn gather_rows_t<T: Elem>(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        if let Some(bad) = rows.iter().find(|&&r| r >= x.rows) {
            return Err(Error::Backend(format!(
                "gather_rows: row {bad} of {}",
                x.rows
            )));
        }
        let mut out = self.output::<T>(rows.len(), x.cols, "gathered rows")?;
        if rows.is_empty() || x.cols == 0 {
            return Ok(out);
        }
        let idx: Vec<i32> = rows
            .iter()
            .map(|&r| c_int("row", r))
            .collect::<Result<_>>()?;
        let idx = self.dev.upload(&idx, "row indices")?;
        let (n, cols) = (c_int("rows", rows.len())?, c_int("cols", x.cols)?);
        let f = self.kernel::<T>("gather_rows")?;
        let mut b = self.dev.stream().launch_builder(&f);
        b.arg(T::view(x)?)
            .arg(&idx)
            .arg(T::view_mut(&mut out)?)
            .arg(&n)
            .arg(&cols);
        // SAFETY: (const T*, const int*, T*, int, int) as pushed; every index is a row of x
        // (checked), out holds n·cols elements.
        unsafe { b.launch(elementwise(rows.len() * x.cols)) }?;
        Ok(out)
    }

    fn gram_update_t<T: Elem>(
        &self,
        acc: &mut CudaTensor,
        x: &CudaTensor,
        row_mask: Option<&[u8]>,
        update: GramUpdate,
    ) -> Result<()>
    where
        for<'a> Activations<'a>: From<cudarc::driver::CudaView<'a, T>>,
    {
        let d = x.cols;
        if (acc.rows, acc.cols) != (d, d) {
            return Err(Error::Backend(format!(
                "gram_update: acc [{}, {}] for d {d}",
                acc.rows, acc.cols
            )));
        }
        if x.rows == 0 {
            return Ok(());
        }
        let xs = T::view(x)?;
        let act: Activations<'_> = xs.slice(..).into();
        let mask = match row_mask {
            Some(m) if m.len() != x.rows => {
                return Err(Error::Backend("gram_update: mask length".into()));
            }
            Some(m) => Some(self.mask_on_device(m)?),
            None => None,
        };
        let acc_buf = f32::view_mut(acc)?;
        match update {
            GramUpdate::Sum => launch_gram(
                &self.dev,
                &act,
                x.rows,
                d,
                d,
                mask.as_ref().map(|m| m.slice(..)).as_ref(),
                acc_buf,
            ),
            GramUpdate::RunningMean { seen } => {
                // FusionBench's hook: this batch's XᵀX on its own, then the f32 running mean
                // (masks do not apply: compat mode counts every row).
                if x.rows == 0 {
                    return Ok(());
                }
                let mut batch = self.dev.zeros::<f32>(d * d, "Gram batch buffer")?;
                launch_gram(&self.dev, &act, x.rows, d, d, None, &mut batch)?;
                running_mean_step(&self.dev, acc_buf, &batch, d, seen, x.rows)
            }
        }
    }
}

impl<'a> From<cudarc::driver::CudaView<'a, f32>> for Activations<'a> {
    fn from(v: cudarc::driver::CudaView<'a, f32>) -> Self {
        Activations::F32(v)
    }
}

impl<'a> From<cudarc::driver::CudaView<'a, f16>> for Activations<'a> {
    fn from(v: cudarc::driver::CudaView<'a, f16>) -> Self {
        Activations::F16(v)
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;

    fn name(&self) -> String {
        let name = self.dev.name().unwrap_or_else(|_| "GPU".into());
        format!(
            "cuda:{} {name} ({})",
            self.dev.ordinal(),
            self.precision.name()
        )
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        by_precision!(self.upload_t(data, rows, cols))
    }

    fn site_weight(&self, ckpt: &Checkpoint, site: &Site) -> Result<CudaTensor> {
        by_precision!(self.site_weight_t(ckpt, site))
    }

    fn download(&self, t: &CudaTensor) -> Result<Vec<f32>> {
        match &t.buf {
            DeviceBuffer::F32(_) => self.download_t::<f32>(t),
            DeviceBuffer::F16(_) => self.download_t::<f16>(t),
        }
    }

    fn shape(&self, t: &CudaTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        by_precision!(self.alloc(rows, cols, "tensor"))
    }

    fn gram_accumulator(&self, d: usize) -> Result<CudaTensor> {
        self.alloc::<f32>(d, d, "Gram accumulator")
    }

    fn linear(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
    ) -> Result<CudaTensor> {
        by_precision!(self.linear_t(x, w, bias, None))
    }

    fn linear_act(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: Option<&CudaTensor>,
        act: Activation,
    ) -> Result<CudaTensor> {
        by_precision!(self.linear_t(x, w, bias, Some(act)))
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        by_precision!(self.layer_norm_t(x, gamma, beta, eps))
    }

    fn add_layer_norm(
        &self,
        h: &mut CudaTensor,
        y: &CudaTensor,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> Result<CudaTensor> {
        by_precision!(self.add_layer_norm_t(h, y, gamma, beta, eps))
    }

    fn add_assign(&self, x: &mut CudaTensor, y: &CudaTensor) -> Result<()> {
        by_precision!(self.add_t(x, y))
    }

    fn activate(&self, x: &mut CudaTensor, act: Activation) -> Result<()> {
        by_precision!(self.bias_act(x, None, Some(act)))
    }

    fn attention(
        &self,
        qkv: &CudaTensor,
        shape: AttentionShape,
        key_mask: Option<&[u8]>,
    ) -> Result<CudaTensor> {
        by_precision!(self.attention_t(qkv, shape, key_mask))
    }

    fn embed_tokens(
        &self,
        wte: &CudaTensor,
        wpe: &CudaTensor,
        ids: &[u32],
        seq: usize,
    ) -> Result<CudaTensor> {
        by_precision!(self.embed_tokens_t(wte, wpe, ids, seq))
    }

    fn clip_tokens(
        &self,
        patches: &CudaTensor,
        class: &CudaTensor,
        pos: &CudaTensor,
        batch: usize,
    ) -> Result<CudaTensor> {
        by_precision!(self.clip_tokens_t(patches, class, pos, batch))
    }

    fn patch_rows(
        &self,
        pixels: &[f32],
        batch: usize,
        channels: usize,
        size: usize,
        patch: usize,
    ) -> Result<CudaTensor> {
        by_precision!(self.patch_rows_t(pixels, batch, channels, size, patch))
    }

    fn gather_rows(&self, x: &CudaTensor, rows: &[usize]) -> Result<CudaTensor> {
        by_precision!(self.gather_rows_t(x, rows))
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaTensor, eps: f32) -> Result<CudaTensor> {
        by_precision!(self.rms_norm_t(x, weight, eps))
    }

    fn rms_norm_columns(
        &self,
        x: &mut CudaTensor,
        cols: std::ops::Range<usize>,
        weight: &CudaTensor,
        eps: f32,
    ) -> Result<()> {
        by_precision!(self.rms_norm_columns_t(x, cols, weight, eps))
    }

    fn rotary(
        &self,
        x: &mut CudaTensor,
        cols: std::ops::Range<usize>,
        head_dim: usize,
        seq: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        by_precision!(self.rotary_t(x, cols, head_dim, seq, inv_freq))
    }

    fn silu_mul(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        by_precision!(self.silu_mul_t(gate_up))
    }

    fn gqa_attention(
        &self,
        qkv: &CudaTensor,
        shape: GqaShape,
        key_mask: Option<&[u8]>,
    ) -> Result<CudaTensor> {
        by_precision!(self.gqa_attention_t(qkv, shape, key_mask))
    }

    fn gram_update(
        &self,
        acc: &mut CudaTensor,
        x: &CudaTensor,
        row_mask: Option<&[u8]>,
        update: GramUpdate,
    ) -> Result<()> {
        match &x.buf {
            DeviceBuffer::F32(_) => self.gram_update_t::<f32>(acc, x, row_mask, update),
            DeviceBuffer::F16(_) => self.gram_update_t::<f16>(acc, x, row_mask, update),
        }
    }

    fn memory_in_use(&self) -> Option<u64> {
        let (free, total) = self.dev.stream().context().mem_get_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    }

    fn copy(&self, x: &CudaTensor) -> Result<CudaTensor> {
        let stream = self.dev.stream();
        let buf = match &x.buf {
            DeviceBuffer::F32(s) => DeviceBuffer::F32(stream.clone_dtod(s)?),
            DeviceBuffer::F16(s) => DeviceBuffer::F16(stream.clone_dtod(s)?),
        };
        Ok(CudaTensor { buf, ..*x })
    }

    /// Half of the device memory free when the caches are set up: the other half is left
    /// to one layer's weights, statistics and working buffers (a layer of an 8B decoder over
    /// its batches needs about 1 GB of them; see `merge --plan`). None kept there when the
    /// free memory cannot be read.
    fn activation_cache_budget(&self) -> Option<u64> {
        let free = self
            .dev
            .stream()
            .context()
            .mem_get_info()
            .map_or(0, |(free, _)| free);
        Some(free as u64 / 2)
    }
}

impl CudaBackend {
    /// The tensor as its f32 device buffer, when that is what it is (Grams stay on the GPU
    /// between the forward pass and the solve); the tensor back otherwise.
    pub(crate) fn take_device_f32(
        &self,
        t: CudaTensor,
    ) -> std::result::Result<CudaSlice<f32>, CudaTensor> {
        match t.buf {
            DeviceBuffer::F32(s) => Ok(s),
            buf => Err(CudaTensor { buf, ..t }),
        }
    }
}
