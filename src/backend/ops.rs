//! What every backend provides: the operations the models are written against
//! ([`Backend`]), their shapes and options. The CPU engine (`cpu.rs`) and the GPU
//! (`cuda/forward.rs`) implement them.

use crate::error::Result;
use crate::io::Checkpoint;
use crate::model::site::{fuse_in_out, linear_in_out, Site};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// GPT-2's tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    GeluNew,
    /// CLIP's x·σ(1.702·x).
    QuickGelu,
}

#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

/// Causal grouped-query attention over a fused `[batch·seq, (heads + 2·kv_heads)·head_dim]`
/// q|k|v projection: query head h reads key/value head h / (heads / kv_heads).
#[derive(Clone, Copy, Debug)]
pub struct GqaShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The error of a decoder-LLM operation on a backend that does not have it yet.
pub fn decoder_ops_unsupported(backend: &str, op: &str) -> crate::error::Error {
    crate::error::Error::invalid(format!(
        "decoder LLMs ({}) run on --device cpu for now: {op} is not implemented on {backend}",
        crate::io::arch::SUPPORTED_DECODERS
    ))
}

/// The element type of activations and weights on a GPU (the CPU always runs f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp16 activations and weights, f32 accumulation (GEMMs, Grams, norms, softmax).
    #[default]
    Float16,
    /// f32 throughout: FusionBench-level agreement at a fraction of the speed.
    Float32,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float16 => "float16",
            Precision::Float32 => "float32",
        }
    }
}

/// `[batch, c, S, S]` pixels → `[batch·(S/p)², c·p·p]` rows in a patch-embedding conv
/// weight's order (channel, then row, then column within the patch).
pub fn im2col(
    values: &[f32],
    batch: usize,
    channels: usize,
    size: usize,
    patch: usize,
) -> Vec<f32> {
    let g = size / patch;
    let mut out = Vec::with_capacity(batch * g * g * channels * patch * patch);
    for b in 0..batch {
        for gy in 0..g {
            for gx in 0..g {
                for k in 0..channels {
                    for y in 0..patch {
                        let row = ((b * channels + k) * size + gy * patch + y) * size + gx * patch;
                        out.extend_from_slice(&values[row..row + patch]);
                    }
                }
            }
        }
    }
    out
}

/// How a Gram accumulator absorbs XᵀX of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GramUpdate {
    /// acc += XᵀX (normalised by the caller at the end).
    Sum,
    /// FusionBench's running mean: acc = (acc·seen + XᵀX) / (seen + rows), in f32.
    RunningMean { seen: u64 },
}

pub trait Backend {
    /// A row-major f32 matrix resident on the backend's device.
    type Tensor;

    fn name(&self) -> String;
    /// What the forward pass computes activations in (the CPU engine: always float32).
    fn precision(&self) -> Precision {
        Precision::Float32
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// [`Backend::upload`] of a buffer the caller gives up (no copy where it can stay put).
    fn upload_owned(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.upload(&data, rows, cols)
    }
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// The `[in, Σ out]` weight of the linear layer(s) `site` feeds, read from `ckpt` and
    /// fused along the output (CLIP's q, k and v become one `[d, 3d]` matrix, the layout of
    /// GPT-2's c_attn). Decoded on the host here; a GPU makes it from the stored bytes.
    fn site_weight(&self, ckpt: &Checkpoint, site: &Site) -> Result<Self::Tensor> {
        site.check_inputs()?;
        let parts: Vec<Vec<f32>> = crate::profile::span("load: decode + transpose", || {
            site.modules
                .iter()
                .map(|m| linear_in_out(ckpt, m))
                .collect::<Result<_>>()
        })?;
        let views: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        let (w, out) = fuse_in_out(site, &views);
        crate::profile::span("load: upload", || self.upload_owned(w, site.dim, out))
    }
    /// The tensor's values on the host, giving the tensor up (no copy where it is there).
    fn download_owned(&self, t: Self::Tensor) -> Result<Vec<f32>> {
        self.download(&t)
    }
    fn shape(&self, t: &Self::Tensor) -> (usize, usize);
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// A copy of `x`, on the backend.
    fn copy(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// How many bytes of a layer-wise merge's activation caches may stay as this backend's
    /// own tensors between layers, beyond the merge's host memory cap: `None` where its
    /// tensors are host memory already (the cap is their budget).
    fn activation_cache_budget(&self) -> Option<u64> {
        None
    }

    /// `x[rows, in] · w[in, out] + bias[out]`.
    fn linear(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    /// `act(x · w + bias)`: the GEMM with its epilogue, fused where the backend can.
    fn linear_act(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        act: Activation,
    ) -> Result<Self::Tensor> {
        let mut y = self.linear(x, w, bias)?;
        self.activate(&mut y, act)?;
        Ok(y)
    }
    /// `h += y`, then LayerNorm of the new `h`: the residual add fused with the next norm.
    fn add_layer_norm(
        &self,
        h: &mut Self::Tensor,
        y: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.add_assign(h, y)?;
        self.layer_norm(h, gamma, beta, eps)
    }
    /// A zeroed `[d, d]` Gram accumulator (f32 whatever the activations are).
    fn gram_accumulator(&self, d: usize) -> Result<Self::Tensor> {
        self.zeros(d, d)
    }
    /// Host pixels `[batch, c, S, S]` → the patch rows of a stride-p convolution on the
    /// backend, `[batch·(S/p)², c·p·p]`.
    fn patch_rows(
        &self,
        pixels: &[f32],
        batch: usize,
        channels: usize,
        size: usize,
        patch: usize,
    ) -> Result<Self::Tensor> {
        let g = size / patch.max(1);
        self.upload(
            &im2col(pixels, batch, channels, size, patch),
            batch * g * g,
            channels * patch * patch,
        )
    }
    /// Device memory in use (bytes), where the backend has a device.
    fn memory_in_use(&self) -> Option<u64> {
        None
    }
    /// Row-wise LayerNorm with biased variance, as torch computes it.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    fn activate(&self, x: &mut Self::Tensor, act: Activation) -> Result<()>;
    /// Multi-head attention over a fused `[batch·seq, 3·heads·head_dim]` q|k|v projection:
    /// scores scaled by 1/√head_dim, keys whose `key_mask` is 0 and (when causal) later
    /// keys masked out, softmax in f32. Returns `[batch·seq, heads·head_dim]`.
    fn attention(
        &self,
        qkv: &Self::Tensor,
        shape: AttentionShape,
        key_mask: Option<&[u8]>,
    ) -> Result<Self::Tensor>;
    /// GPT-2 input embeddings `wte[ids] + wpe[position]`, ids laid out `[batch·seq]`.
    fn embed_tokens(
        &self,
        wte: &Self::Tensor,
        wpe: &Self::Tensor,
        ids: &[u32],
        seq: usize,
    ) -> Result<Self::Tensor>;
    /// CLIP tokens: per image `[class; patches] + position`, patches `[batch·n_patches, d]`.
    fn clip_tokens(
        &self,
        patches: &Self::Tensor,
        class: &Self::Tensor,
        pos: &Self::Tensor,
        batch: usize,
    ) -> Result<Self::Tensor>;
    /// RMSNorm `x·rsqrt(mean(x²) + eps)·weight` over each group of `weight.len()` columns
    /// (the whole row for a layer's norm).
    fn rms_norm(
        &self,
        _x: &Self::Tensor,
        _weight: &Self::Tensor,
        _eps: f32,
    ) -> Result<Self::Tensor> {
        Err(decoder_ops_unsupported(&self.name(), "RMSNorm"))
    }
    /// [`Backend::rms_norm`] in place on the columns `cols` of `x`, in groups of
    /// `weight.len()` (Qwen3's per-head q and k norms inside the fused q|k|v projection).
    fn rms_norm_columns(
        &self,
        _x: &mut Self::Tensor,
        _cols: std::ops::Range<usize>,
        _weight: &Self::Tensor,
        _eps: f32,
    ) -> Result<()> {
        Err(decoder_ops_unsupported(&self.name(), "RMSNorm"))
    }
    /// Rotary position embedding in place on the columns `cols` of `x`, heads of `head_dim`
    /// (non-interleaved halves: x' = x·cos + rotate_half(x)·sin), row r at position r % seq.
    fn rotary(
        &self,
        _x: &mut Self::Tensor,
        _cols: std::ops::Range<usize>,
        _head_dim: usize,
        _seq: usize,
        _inv_freq: &[f32],
    ) -> Result<()> {
        Err(decoder_ops_unsupported(&self.name(), "RoPE"))
    }
    /// The SiLU-gated MLP activation: `[rows, 2f]` gate|up → `[rows, f]` silu(gate)·up.
    fn silu_mul(&self, _gate_up: &Self::Tensor) -> Result<Self::Tensor> {
        Err(decoder_ops_unsupported(&self.name(), "the SiLU-gated MLP"))
    }
    /// Causal grouped-query attention, keys whose `key_mask` is 0 masked, scale
    /// 1/√head_dim, softmax in f32. Returns `[batch·seq, heads·head_dim]`.
    fn gqa_attention(
        &self,
        _qkv: &Self::Tensor,
        _shape: GqaShape,
        _key_mask: Option<&[u8]>,
    ) -> Result<Self::Tensor> {
        Err(decoder_ops_unsupported(
            &self.name(),
            "grouped-query attention",
        ))
    }
    /// Rows of `x` picked by index.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;
    /// Updates the lower triangle (diagonal included) of the `[d, d]` accumulator with XᵀX
    /// over the rows of `x` whose `row_mask` entry is non-zero (every row when None).
    fn gram_update(
        &self,
        acc: &mut Self::Tensor,
        x: &Self::Tensor,
        row_mask: Option<&[u8]>,
        update: GramUpdate,
    ) -> Result<()>;
}
