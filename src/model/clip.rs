//! The CLIP vision tower (`CLIPVisionModel`): patch embedding (a stride-p convolution,
//! computed as im2col + GEMM), class token, position embeddings, `pre_layrnorm`, pre-LN
//! encoder layers with `quick_gelu`, `post_layernorm` of the class token.

use std::path::Path;

use super::{
    field_f32, field_usize, linear_in_out, upload_linear, upload_vector, Batch, ForwardHooks,
    ForwardOutput, LinearModule, Site,
};
use crate::backend::{Activation, AttentionShape, Backend};
use crate::error::{Error, Result};
use crate::io::Checkpoint;

pub const PREFIX: &str = "vision_model.";

#[derive(Clone, Debug, PartialEq)]
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
        let act = v
            .get("hidden_act")
            .and_then(|a| a.as_str())
            .unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            return Err(Error::file(
                path,
                format!("hidden_act `{act}` is not supported (CLIP uses quick_gelu)"),
            ));
        }
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
        if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
            return Err(Error::file(
                path,
                "hidden_size is not divisible by num_attention_heads",
            ));
        }
        if c.patch_size == 0 || c.image_size % c.patch_size != 0 {
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
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let lin = |name: String, din, dout| LinearModule {
            weight: format!("{name}.weight"),
            transposed: true,
            in_dim: din,
            out_dim: dout,
        };
        let mut sites = Vec::with_capacity(4 * self.num_hidden_layers);
        for l in 0..self.num_hidden_layers {
            let p = format!("{PREFIX}encoder.layers.{l}");
            sites.push(Site {
                name: format!("{p}.self_attn.qkv"),
                dim: d,
                modules: ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .map(|m| lin(format!("{p}.self_attn.{m}"), d, d))
                    .collect(),
            });
            sites.push(Site {
                name: format!("{p}.self_attn.out_proj"),
                dim: d,
                modules: vec![lin(format!("{p}.self_attn.out_proj"), d, d)],
            });
            sites.push(Site {
                name: format!("{p}.mlp.fc1"),
                dim: d,
                modules: vec![lin(format!("{p}.mlp.fc1"), d, f)],
            });
            sites.push(Site {
                name: format!("{p}.mlp.fc2"),
                dim: f,
                modules: vec![lin(format!("{p}.mlp.fc2"), f, d)],
            });
        }
        sites
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

struct LayerNorm<B: Backend> {
    gamma: B::Tensor,
    beta: B::Tensor,
}

struct Linear<B: Backend> {
    w: B::Tensor,
    b: B::Tensor,
}

struct Layer<B: Backend> {
    ln1: LayerNorm<B>,
    /// q, k and v fused into one `[d, 3d]` GEMM: they share their input.
    qkv: Linear<B>,
    out_proj: Linear<B>,
    ln2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

pub struct ClipVision<B: Backend> {
    pub config: ClipVisionConfig,
    patch_w: B::Tensor,
    class: B::Tensor,
    pos: B::Tensor,
    pre_ln: LayerNorm<B>,
    layers: Vec<Layer<B>>,
    post_ln: LayerNorm<B>,
}

impl<B: Backend> ClipVision<B> {
    pub fn load(backend: &B, ckpt: &Checkpoint, config: ClipVisionConfig) -> Result<Self> {
        let (d, p, ch) = (config.hidden_size, config.patch_size, config.num_channels);
        let ln = |prefix: String| -> Result<LayerNorm<B>> {
            Ok(LayerNorm {
                gamma: upload_vector(backend, ckpt, &format!("{prefix}.weight"), d)?,
                beta: upload_vector(backend, ckpt, &format!("{prefix}.bias"), d)?,
            })
        };
        let bias_name = |m: &LinearModule| format!("{}.bias", m.weight.trim_end_matches(".weight"));
        let bias = |m: &LinearModule| upload_vector(backend, ckpt, &bias_name(m), m.out_dim);
        let sites = config.sites();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let s = &sites[4 * l..4 * l + 4];
            let (mut w, mut b) = (Vec::with_capacity(3 * d * d), Vec::with_capacity(3 * d));
            let qkv: Vec<Vec<f32>> = s[0]
                .modules
                .iter()
                .map(|m| linear_in_out(ckpt, m))
                .collect::<Result<_>>()?;
            for r in 0..d {
                for part in &qkv {
                    w.extend_from_slice(&part[r * d..(r + 1) * d]);
                }
            }
            for m in &s[0].modules {
                b.extend(ckpt.f32_shaped(&bias_name(m), &[d])?);
            }
            let linear = |site: &Site| -> Result<Linear<B>> {
                let m = &site.modules[0];
                Ok(Linear {
                    w: upload_linear(backend, ckpt, m)?,
                    b: bias(m)?,
                })
            };
            let pre = format!("{PREFIX}encoder.layers.{l}");
            layers.push(Layer {
                ln1: ln(format!("{pre}.layer_norm1"))?,
                qkv: Linear {
                    w: backend.upload(&w, d, 3 * d)?,
                    b: backend.upload(&b, 1, 3 * d)?,
                },
                out_proj: linear(&s[1])?,
                ln2: ln(format!("{pre}.layer_norm2"))?,
                fc1: linear(&s[2])?,
                fc2: linear(&s[3])?,
            });
        }
        // Conv weight [d, c, p, p] flattened per output channel is the [d, c·p·p] matrix
        // that multiplies an im2col row; the GEMM wants it as [c·p·p, d].
        let k = ch * p * p;
        let conv = ckpt.f32_shaped(
            &format!("{PREFIX}embeddings.patch_embedding.weight"),
            &[d, ch, p, p],
        )?;
        let patch_w = backend.upload(&super::transpose(&conv, d, k), k, d)?;
        let tokens = config.num_patches() + 1;
        let pos = ckpt.f32_shaped(
            &format!("{PREFIX}embeddings.position_embedding.weight"),
            &[tokens, d],
        )?;
        Ok(ClipVision {
            patch_w,
            class: upload_vector(
                backend,
                ckpt,
                &format!("{PREFIX}embeddings.class_embedding"),
                d,
            )?,
            pos: backend.upload(&pos, tokens, d)?,
            pre_ln: ln(format!("{PREFIX}pre_layrnorm"))?,
            layers,
            post_ln: ln(format!("{PREFIX}post_layernorm"))?,
            config,
        })
    }

    /// `[batch, c, H, W]` pixels → `[batch·patches, c·p·p]` rows in the conv weight's order.
    fn im2col(&self, values: &[f32], batch: usize) -> Vec<f32> {
        let c = &self.config;
        let (ch, s, p) = (c.num_channels, c.image_size, c.patch_size);
        let g = s / p;
        let mut out = Vec::with_capacity(batch * g * g * ch * p * p);
        for b in 0..batch {
            for gy in 0..g {
                for gx in 0..g {
                    for k in 0..ch {
                        for y in 0..p {
                            let row = ((b * ch + k) * s + gy * p + y) * s + gx * p;
                            out.extend_from_slice(&values[row..row + p]);
                        }
                    }
                }
            }
        }
        out
    }

    pub fn forward(
        &self,
        backend: &B,
        batch: &Batch,
        mut hooks: ForwardHooks<'_, B>,
    ) -> Result<ForwardOutput<B>> {
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
        let (d, tokens) = (c.hidden_size, c.num_patches() + 1);
        let eps = c.layer_norm_eps;
        let patches_in = backend.upload(
            &self.im2col(values, *batch),
            batch * c.num_patches(),
            c.num_channels * c.patch_size * c.patch_size,
        )?;
        let patches = backend.linear(&patches_in, &self.patch_w, None)?;
        let emb = backend.clip_tokens(&patches, &self.class, &self.pos, *batch)?;
        let mut h = backend.layer_norm(&emb, &self.pre_ln.gamma, &self.pre_ln.beta, eps)?;
        let mut record = |t: &B::Tensor| -> Result<()> {
            if let Some(hs) = hooks.hidden_states.as_deref_mut() {
                hs.push(backend.download(t)?);
            }
            Ok(())
        };
        record(&h)?;
        let mut grams = hooks.grams;
        let mut observe = |site: usize, x: &B::Tensor| -> Result<()> {
            match grams.as_deref_mut() {
                Some(g) => g.observe(site, x, None),
                None => Ok(()),
            }
        };
        let shape = AttentionShape {
            batch: *batch,
            seq: tokens,
            heads: c.num_attention_heads,
            head_dim: d / c.num_attention_heads,
            causal: false,
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let a = backend.layer_norm(&h, &layer.ln1.gamma, &layer.ln1.beta, eps)?;
            observe(4 * l, &a)?;
            let qkv = backend.linear(&a, &layer.qkv.w, Some(&layer.qkv.b))?;
            let att = backend.attention(&qkv, shape, None)?;
            observe(4 * l + 1, &att)?;
            backend.add_assign(
                &mut h,
                &backend.linear(&att, &layer.out_proj.w, Some(&layer.out_proj.b))?,
            )?;
            let m = backend.layer_norm(&h, &layer.ln2.gamma, &layer.ln2.beta, eps)?;
            observe(4 * l + 2, &m)?;
            let mut f = backend.linear(&m, &layer.fc1.w, Some(&layer.fc1.b))?;
            backend.activate(&mut f, Activation::QuickGelu)?;
            observe(4 * l + 3, &f)?;
            backend.add_assign(
                &mut h,
                &backend.linear(&f, &layer.fc2.w, Some(&layer.fc2.b))?,
            )?;
            record(&h)?;
        }
        let class_rows: Vec<usize> = (0..*batch).map(|b| b * tokens).collect();
        let cls = backend.gather_rows(&h, &class_rows)?;
        let pooled = backend.layer_norm(&cls, &self.post_ln.gamma, &self.post_ln.beta, eps)?;
        Ok(ForwardOutput {
            last_hidden: h,
            pooled: Some(pooled),
        })
    }
}
