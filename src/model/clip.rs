//! The CLIP vision tower (`CLIPVisionModel`): patch embedding (a stride-p convolution,
//! computed as im2col + GEMM), class token, position embeddings, `pre_layrnorm`, pre-LN
//! encoder layers with `quick_gelu`, `post_layernorm` of the class token.

use std::path::Path;

use super::block::{BlockRun, LayerNorm, PreLnBlock};
use super::{field_f32, field_usize, Batch, ForwardHooks, ForwardOutput, ParamSource, Site};
use crate::backend::{Activation, AttentionShape, Backend};
use crate::error::{Error, Result};

pub const PREFIX: &str = "vision_model.";

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f32,
}

impl ClipVisionConfig {
    /// Reads a `CLIPVisionConfig`, or the `vision_config` of a `CLIPConfig`; absent keys take
    /// transformers' defaults.
    pub fn from_json(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let v = if v.get("model_type").and_then(|m| m.as_str()) == Some("clip") {
            v.get("vision_config").unwrap_or(&serde_json::Value::Null)
        } else {
            v
        };
        super::require_activation(v, "hidden_act", "hidden_act", "quick_gelu", "CLIP", path)?;
        let c = ClipVisionConfig {
            hidden_size: field_usize(v, "hidden_size", 768, path)?,
            intermediate_size: field_usize(v, "intermediate_size", 3072, path)?,
            num_attention_heads: field_usize(v, "num_attention_heads", 12, path)?,
            num_hidden_layers: field_usize(v, "num_hidden_layers", 12, path)?,
            num_channels: field_usize(v, "num_channels", 3, path)?,
            image_size: field_usize(v, "image_size", 224, path)?,
            patch_size: field_usize(v, "patch_size", 32, path)?,
            layer_norm_eps: field_f32(v, "layer_norm_eps", 1e-5, path)?,
        };
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::file(
                path,
                "hidden_size is not divisible by num_attention_heads",
            ));
        }
        if c.num_channels == 0 || c.num_channels > 16 || c.patch_size > 1024 {
            return Err(Error::file(
                path,
                "num_channels must be 1 to 16 and patch_size at most 1024",
            ));
        }
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            return Err(Error::file(
                path,
                "image_size is not a multiple of patch_size",
            ));
        }
        Ok(c)
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    pub fn sites(&self) -> Vec<Site> {
        encoder_sites(
            PREFIX,
            self.num_hidden_layers,
            self.hidden_size,
            self.intermediate_size,
        )
    }

    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, p, c) = (
            self.hidden_size,
            self.intermediate_size,
            self.patch_size,
            self.num_channels,
        );
        let n = |s: &str| format!("{PREFIX}{s}");
        let mut v = vec![
            (n("embeddings.class_embedding"), vec![d]),
            (n("embeddings.patch_embedding.weight"), vec![d, c, p, p]),
            (
                n("embeddings.position_embedding.weight"),
                vec![self.num_patches() + 1, d],
            ),
            (n("pre_layrnorm.weight"), vec![d]),
            (n("pre_layrnorm.bias"), vec![d]),
        ];
        for l in 0..self.num_hidden_layers {
            let q = |s: &str| n(&format!("encoder.layers.{l}.{s}"));
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                v.push((q(&format!("self_attn.{proj}.weight")), vec![d, d]));
                v.push((q(&format!("self_attn.{proj}.bias")), vec![d]));
            }
            v.extend([
                (q("layer_norm1.weight"), vec![d]),
                (q("layer_norm1.bias"), vec![d]),
                (q("mlp.fc1.weight"), vec![f, d]),
                (q("mlp.fc1.bias"), vec![f]),
                (q("mlp.fc2.weight"), vec![d, f]),
                (q("mlp.fc2.bias"), vec![d]),
                (q("layer_norm2.weight"), vec![d]),
                (q("layer_norm2.bias"), vec![d]),
            ]);
        }
        v.push((n("post_layernorm.weight"), vec![d]));
        v.push((n("post_layernorm.bias"), vec![d]));
        v
    }
}

/// The layers of a CLIP encoder (vision or text) under `prefix`, four sites each.
pub(crate) fn load_encoder<B: Backend>(
    backend: &B,
    ckpt: &dyn ParamSource<B>,
    prefix: &str,
    sites: &[Site],
) -> Result<Vec<PreLnBlock<B>>> {
    (0..sites.len() / 4)
        .map(|l| load_encoder_layer(backend, ckpt, prefix, sites, l))
        .collect()
}

/// Layer `l` of a CLIP encoder under `prefix`.
fn load_encoder_layer<B: Backend>(
    backend: &B,
    src: &dyn ParamSource<B>,
    prefix: &str,
    sites: &[Site],
    l: usize,
) -> Result<PreLnBlock<B>> {
    let (p, norms) = encoder_layer_names(prefix, l);
    PreLnBlock::load(backend, src, sites, l, &p, norms)
}

/// The name prefix of layer `l` of a CLIP encoder under `prefix`, and its LayerNorms' leaves.
fn encoder_layer_names(prefix: &str, l: usize) -> (String, [&'static str; 2]) {
    let p = format!("{prefix}encoder.layers.{l}.");
    (p, ["layer_norm1", "layer_norm2"])
}

/// The four sites of every layer of a CLIP encoder (vision or text) under `prefix`: q, k and
/// v share one input, then out_proj, fc1 and fc2.
pub(crate) fn encoder_sites(prefix: &str, layers: usize, d: usize, f: usize) -> Vec<Site> {
    let mut sites = Vec::with_capacity(4 * layers);
    for l in 0..layers {
        let p = format!("{prefix}encoder.layers.{l}");
        let qkv = ["q_proj", "k_proj", "v_proj"].map(|m| (format!("{p}.self_attn.{m}"), d));
        sites.push(Site::nn_linears(format!("{p}.self_attn.qkv"), d, &qkv));
        sites.push(Site::nn_linear(format!("{p}.self_attn.out_proj"), d, d));
        sites.push(Site::nn_linear(format!("{p}.mlp.fc1"), d, f));
        sites.push(Site::nn_linear(format!("{p}.mlp.fc2"), f, d));
    }
    sites
}

impl ClipVisionConfig {
    /// The name prefix of encoder layer `l` and the leaf names of its two LayerNorms.
    pub(crate) fn block_names(&self, l: usize) -> (String, [&'static str; 2]) {
        encoder_layer_names(PREFIX, l)
    }

    /// How an encoder layer runs on `batch` images: no mask, `quick_gelu`.
    pub(crate) fn block_run(&self, batch: usize) -> BlockRun<'static> {
        BlockRun {
            eps: self.layer_norm_eps,
            shape: AttentionShape {
                batch,
                seq: self.num_patches() + 1,
                heads: self.num_attention_heads,
                head_dim: self.hidden_size / self.num_attention_heads,
                causal: false,
            },
            mask: None,
            act: Activation::QuickGelu,
        }
    }
}

/// Patch embedding, class token, position embeddings and `pre_layrnorm`.
pub struct ClipEmbeddings<B: Backend> {
    config: ClipVisionConfig,
    patch_w: B::Tensor,
    class: B::Tensor,
    pos: B::Tensor,
    pre_ln: LayerNorm<B>,
}

impl<B: Backend> ClipEmbeddings<B> {
    pub fn load(backend: &B, src: &dyn ParamSource<B>, config: &ClipVisionConfig) -> Result<Self> {
        let (d, p, ch) = (config.hidden_size, config.patch_size, config.num_channels);
        // Conv weight [d, c, p, p] flattened per output channel is the [d, c·p·p] matrix
        // that multiplies an im2col row; the GEMM wants it as [c·p·p, d].
        let k = ch * p * p;
        let conv = src.tensor(
            &format!("{PREFIX}embeddings.patch_embedding.weight"),
            &[d, ch, p, p],
        )?;
        let tokens = config.num_patches() + 1;
        let pos = src.tensor(
            &format!("{PREFIX}embeddings.position_embedding.weight"),
            &[tokens, d],
        )?;
        let class = src.tensor(&format!("{PREFIX}embeddings.class_embedding"), &[d])?;
        Ok(ClipEmbeddings {
            patch_w: backend.upload_owned(super::transpose(&conv, d, k), k, d)?,
            class: backend.upload_owned(class, 1, d)?,
            pos: backend.upload_owned(pos, tokens, d)?,
            pre_ln: LayerNorm::load(backend, src, &format!("{PREFIX}pre_layrnorm"), d)?,
            config: config.clone(),
        })
    }

    /// `pre_layrnorm([class; patches] + position)` of a pixel batch.
    pub fn apply(&self, backend: &B, batch: &Batch) -> Result<B::Tensor> {
        let Batch::Pixels { values, batch } = batch else {
            return Err(Error::invalid(
                "the CLIP vision tower takes pixel values, not token ids",
            ));
        };
        let c = &self.config;
        let per_image = c.num_channels * c.image_size * c.image_size;
        if values.len() != batch * per_image {
            return Err(Error::invalid(format!(
                "pixel batch of {} values is not {batch} × {}×{}×{}",
                values.len(),
                c.num_channels,
                c.image_size,
                c.image_size
            )));
        }
        let patches_in = crate::profile::span("data: patch rows upload", || {
            backend.patch_rows(values, *batch, c.num_channels, c.image_size, c.patch_size)
        })?;
        let patches = backend.linear(&patches_in, &self.patch_w, None)?;
        let emb = backend.clip_tokens(&patches, &self.class, &self.pos, *batch)?;
        self.pre_ln.apply(backend, &emb, c.layer_norm_eps)
    }
}

pub struct ClipVision<B: Backend> {
    pub config: ClipVisionConfig,
    embeddings: ClipEmbeddings<B>,
    layers: Vec<PreLnBlock<B>>,
    post_ln: LayerNorm<B>,
}

impl<B: Backend> ClipVision<B> {
    pub fn load(backend: &B, ckpt: &dyn ParamSource<B>, config: ClipVisionConfig) -> Result<Self> {
        let layers = load_encoder(backend, ckpt, PREFIX, &config.sites())?;
        let post_ln = format!("{PREFIX}post_layernorm");
        let post_ln = LayerNorm::load(backend, ckpt, &post_ln, config.hidden_size)?;
        let embeddings = ClipEmbeddings::load(backend, ckpt, &config)?;
        Ok(ClipVision {
            config,
            embeddings,
            layers,
            post_ln,
        })
    }

    pub fn forward(
        &self,
        backend: &B,
        batch: &Batch,
        mut hooks: ForwardHooks<'_, B>,
    ) -> Result<ForwardOutput<B>> {
        let mut h = self.embeddings.apply(backend, batch)?;
        let n = batch.len();
        let run = self.config.block_run(n);
        hooks.record(backend, &h)?;
        for (l, layer) in self.layers.iter().enumerate() {
            layer.forward(backend, &mut h, &run, 4 * l, &mut hooks.grams)?;
            hooks.record(backend, &h)?;
        }
        let tokens = self.config.num_patches() + 1;
        let class_rows: Vec<usize> = (0..n).map(|b| b * tokens).collect();
        let pooled =
            self.post_ln
                .apply(backend, &backend.gather_rows(&h, &class_rows)?, run.eps)?;
        Ok(ForwardOutput {
            last_hidden: h,
            pooled: Some(pooled),
        })
    }
}
