//! GPT-2 (`GPT2Model`, the backbone of `GPT2ForSequenceClassification`): pre-LN blocks,
//! causal attention with padded keys masked, `gelu_new` MLP, final `ln_f`.

use std::path::Path;

use super::{
    field_f32, field_usize, upload_linear, upload_vector, Batch, ForwardHooks, ForwardOutput,
    LinearModule, Site,
};
use crate::backend::{Activation, AttentionShape, Backend};
use crate::error::{Error, Result};
use crate::io::Checkpoint;

#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_inner: usize,
    pub layer_norm_epsilon: f32,
    /// The id used to pad sequences: `pad_token_id`, else `eos_token_id` (GPT-2's usual pad).
    pub pad_token_id: u32,
}

impl Gpt2Config {
    /// Reads config.json; absent keys take transformers' `GPT2Config` defaults, since
    /// `save_pretrained` omits values equal to the default.
    pub fn from_json(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let n_embd = field_usize(v, "n_embd", 768, path)?;
        let n_head = field_usize(v, "n_head", 12, path)?;
        let act = v
            .get("activation_function")
            .and_then(|a| a.as_str())
            .unwrap_or("gelu_new");
        if act != "gelu_new" {
            return Err(Error::file(
                path,
                format!("activation_function `{act}` is not supported (GPT-2 uses gelu_new)"),
            ));
        }
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(Error::file(
                path,
                format!("n_embd {n_embd} is not divisible by n_head {n_head}"),
            ));
        }
        let eos = field_usize(v, "eos_token_id", 50256, path)?;
        let pad = field_usize(v, "pad_token_id", eos, path)?;
        Ok(Gpt2Config {
            vocab_size: field_usize(v, "vocab_size", 50257, path)?,
            n_positions: field_usize(v, "n_positions", 1024, path)?,
            n_embd,
            n_layer: field_usize(v, "n_layer", 12, path)?,
            n_head,
            n_inner: field_usize(v, "n_inner", 4 * n_embd, path)?,
            layer_norm_epsilon: field_f32(v, "layer_norm_epsilon", 1e-5, path)?,
            pad_token_id: pad as u32,
        })
    }

    pub fn sites(&self) -> Vec<Site> {
        let (d, f) = (self.n_embd, self.n_inner);
        let mut sites = Vec::with_capacity(4 * self.n_layer);
        for l in 0..self.n_layer {
            for (module, din, dout) in [
                ("attn.c_attn", d, 3 * d),
                ("attn.c_proj", d, d),
                ("mlp.c_fc", d, f),
                ("mlp.c_proj", f, d),
            ] {
                let name = format!("h.{l}.{module}");
                sites.push(Site {
                    modules: vec![LinearModule {
                        weight: format!("{name}.weight"),
                        transposed: false,
                        in_dim: din,
                        out_dim: dout,
                    }],
                    name,
                    dim: din,
                });
            }
        }
        sites
    }

    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.n_embd, self.n_inner);
        let mut v = vec![
            ("wte.weight".to_string(), vec![self.vocab_size, d]),
            ("wpe.weight".to_string(), vec![self.n_positions, d]),
        ];
        for l in 0..self.n_layer {
            let p = |s: &str| format!("h.{l}.{s}");
            v.extend([
                (p("ln_1.weight"), vec![d]),
                (p("ln_1.bias"), vec![d]),
                (p("attn.c_attn.weight"), vec![d, 3 * d]),
                (p("attn.c_attn.bias"), vec![3 * d]),
                (p("attn.c_proj.weight"), vec![d, d]),
                (p("attn.c_proj.bias"), vec![d]),
                (p("ln_2.weight"), vec![d]),
                (p("ln_2.bias"), vec![d]),
                (p("mlp.c_fc.weight"), vec![d, f]),
                (p("mlp.c_fc.bias"), vec![f]),
                (p("mlp.c_proj.weight"), vec![f, d]),
                (p("mlp.c_proj.bias"), vec![d]),
            ]);
        }
        v.push(("ln_f.weight".into(), vec![d]));
        v.push(("ln_f.bias".into(), vec![d]));
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

struct Block<B: Backend> {
    ln_1: LayerNorm<B>,
    c_attn: Linear<B>,
    attn_proj: Linear<B>,
    ln_2: LayerNorm<B>,
    c_fc: Linear<B>,
    mlp_proj: Linear<B>,
}

pub struct Gpt2<B: Backend> {
    pub config: Gpt2Config,
    wte: B::Tensor,
    wpe: B::Tensor,
    blocks: Vec<Block<B>>,
    ln_f: LayerNorm<B>,
}

impl<B: Backend> Gpt2<B> {
    pub fn load(backend: &B, ckpt: &Checkpoint, config: Gpt2Config) -> Result<Self> {
        let d = config.n_embd;
        let ln = |prefix: &str| -> Result<LayerNorm<B>> {
            Ok(LayerNorm {
                gamma: upload_vector(backend, ckpt, &format!("{prefix}.weight"), d)?,
                beta: upload_vector(backend, ckpt, &format!("{prefix}.bias"), d)?,
            })
        };
        let sites = config.sites();
        let linear = |site: &Site| -> Result<Linear<B>> {
            let m = &site.modules[0];
            Ok(Linear {
                w: upload_linear(backend, ckpt, m)?,
                b: upload_vector(backend, ckpt, &format!("{}.bias", site.name), m.out_dim)?,
            })
        };
        let mut blocks = Vec::with_capacity(config.n_layer);
        for l in 0..config.n_layer {
            let s = &sites[4 * l..4 * l + 4];
            blocks.push(Block {
                ln_1: ln(&format!("h.{l}.ln_1"))?,
                c_attn: linear(&s[0])?,
                attn_proj: linear(&s[1])?,
                ln_2: ln(&format!("h.{l}.ln_2"))?,
                c_fc: linear(&s[2])?,
                mlp_proj: linear(&s[3])?,
            });
        }
        let wte = ckpt.f32_shaped("wte.weight", &[config.vocab_size, d])?;
        let wpe = ckpt.f32_shaped("wpe.weight", &[config.n_positions, d])?;
        Ok(Gpt2 {
            wte: backend.upload(&wte, config.vocab_size, d)?,
            wpe: backend.upload(&wpe, config.n_positions, d)?,
            blocks,
            ln_f: ln("ln_f")?,
            config,
        })
    }

    pub fn forward(
        &self,
        backend: &B,
        batch: &Batch,
        mut hooks: ForwardHooks<'_, B>,
    ) -> Result<ForwardOutput<B>> {
        let Batch::Tokens {
            ids,
            mask,
            batch,
            seq,
        } = batch
        else {
            return Err(Error::invalid("GPT-2 takes token ids, not pixel values"));
        };
        let c = &self.config;
        if *seq > c.n_positions {
            return Err(Error::invalid(format!(
                "sequence length {seq} exceeds n_positions {}",
                c.n_positions
            )));
        }
        let eps = c.layer_norm_epsilon;
        let shape = AttentionShape {
            batch: *batch,
            seq: *seq,
            heads: c.n_head,
            head_dim: c.n_embd / c.n_head,
            causal: true,
        };
        let mut record = |t: &B::Tensor| -> Result<()> {
            if let Some(h) = hooks.hidden_states.as_deref_mut() {
                h.push(backend.download(t)?);
            }
            Ok(())
        };
        let mut h = backend.embed_tokens(&self.wte, &self.wpe, ids, *seq)?;
        record(&h)?;
        let mut grams = hooks.grams;
        let mut observe = |site: usize, x: &B::Tensor| -> Result<()> {
            match grams.as_deref_mut() {
                Some(g) => g.observe(site, x, Some(mask)),
                None => Ok(()),
            }
        };
        for (l, b) in self.blocks.iter().enumerate() {
            let a = backend.layer_norm(&h, &b.ln_1.gamma, &b.ln_1.beta, eps)?;
            observe(4 * l, &a)?;
            let qkv = backend.linear(&a, &b.c_attn.w, Some(&b.c_attn.b))?;
            let att = backend.attention(&qkv, shape, Some(mask))?;
            observe(4 * l + 1, &att)?;
            backend.add_assign(
                &mut h,
                &backend.linear(&att, &b.attn_proj.w, Some(&b.attn_proj.b))?,
            )?;
            let m = backend.layer_norm(&h, &b.ln_2.gamma, &b.ln_2.beta, eps)?;
            observe(4 * l + 2, &m)?;
            let mut f = backend.linear(&m, &b.c_fc.w, Some(&b.c_fc.b))?;
            backend.activate(&mut f, Activation::GeluNew)?;
            observe(4 * l + 3, &f)?;
            backend.add_assign(
                &mut h,
                &backend.linear(&f, &b.mlp_proj.w, Some(&b.mlp_proj.b))?,
            )?;
            // transformers lists the input of every block, then the final ln_f output.
            if l + 1 < self.blocks.len() {
                record(&h)?;
            }
        }
        let out = backend.layer_norm(&h, &self.ln_f.gamma, &self.ln_f.beta, eps)?;
        record(&out)?;
        Ok(ForwardOutput {
            last_hidden: out,
            pooled: None,
        })
    }
}
