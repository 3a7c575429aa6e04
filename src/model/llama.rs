//! Decoder LLMs of the Llama family (`LlamaForCausalLM`, `MistralForCausalLM`,
//! `Qwen2ForCausalLM`, `Qwen3ForCausalLM`): pre-RMSNorm layers with causal grouped-query
//! attention under RoPE and a SiLU-gated MLP, a final RMSNorm and the language-model head.
//!
//! Every `nn.Linear` is fed by one of five sites per layer and model: q/k/v share the
//! attention input, gate/up the MLP input; o_proj and down_proj have their own; `lm_head`
//! (when not tied to the embeddings) reads the final norm's output.

use super::llama_config::LlamaConfig;
use super::{Batch, ForwardHooks, ForwardOutput, GramSink, ParamSource, Site};
use crate::backend::{Backend, GqaShape};
use crate::error::{Error, Result};
use crate::io::Checkpoint;

/// Sites per decoder layer: q|k|v, o_proj, gate|up, down_proj.
pub const SITES_PER_LAYER: usize = 4;

impl LlamaConfig {
    fn layer(&self, l: usize) -> String {
        format!("model.layers.{l}")
    }

    pub fn sites(&self) -> Vec<Site> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let (qw, kw) = self.qkv_widths();
        let mut sites = Vec::with_capacity(SITES_PER_LAYER * self.num_hidden_layers + 1);
        for l in 0..self.num_hidden_layers {
            let p = self.layer(l);
            let qkv = [("q_proj", qw), ("k_proj", kw), ("v_proj", kw)]
                .map(|(m, w)| (format!("{p}.self_attn.{m}"), w));
            sites.push(Site::nn_linears(format!("{p}.self_attn.qkv"), d, &qkv));
            sites.push(Site::nn_linear(format!("{p}.self_attn.o_proj"), qw, d));
            let gate_up = ["gate_proj", "up_proj"].map(|m| (format!("{p}.mlp.{m}"), f));
            sites.push(Site::nn_linears(format!("{p}.mlp.gate_up"), d, &gate_up));
            sites.push(Site::nn_linear(format!("{p}.mlp.down_proj"), f, d));
        }
        if !self.tie_word_embeddings {
            sites.push(Site::nn_linear("lm_head".into(), d, self.vocab_size));
        }
        sites
    }

    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (qw, kw) = self.qkv_widths();
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, d],
        )];
        for l in 0..self.num_hidden_layers {
            let p = |s: &str| format!("{}.{s}", self.layer(l));
            v.push((p("input_layernorm.weight"), vec![d]));
            for (proj, out) in [("q_proj", qw), ("k_proj", kw), ("v_proj", kw)] {
                v.push((p(&format!("self_attn.{proj}.weight")), vec![out, d]));
                if self.qkv_bias {
                    v.push((p(&format!("self_attn.{proj}.bias")), vec![out]));
                }
            }
            if self.qk_norm {
                v.push((p("self_attn.q_norm.weight"), vec![hd]));
                v.push((p("self_attn.k_norm.weight"), vec![hd]));
            }
            v.push((p("self_attn.o_proj.weight"), vec![d, qw]));
            if self.o_bias {
                v.push((p("self_attn.o_proj.bias"), vec![d]));
            }
            v.extend([
                (p("post_attention_layernorm.weight"), vec![d]),
                (p("mlp.gate_proj.weight"), vec![f, d]),
                (p("mlp.up_proj.weight"), vec![f, d]),
                (p("mlp.down_proj.weight"), vec![d, f]),
            ]);
        }
        v.push(("model.norm.weight".into(), vec![d]));
        if !self.tie_word_embeddings {
            v.push(("lm_head.weight".into(), vec![self.vocab_size, d]));
        }
        v
    }
}

/// A vector parameter on the backend, `[1, n]`.
fn vector<B: Backend>(
    backend: &B,
    src: &dyn ParamSource<B>,
    name: &str,
    n: usize,
) -> Result<B::Tensor> {
    backend.upload_owned(src.tensor(name, &[n])?, 1, n)
}

/// The biases of a site's modules, concatenated in the fused weight's column order.
fn site_bias<B: Backend>(backend: &B, src: &dyn ParamSource<B>, site: &Site) -> Result<B::Tensor> {
    let mut b = Vec::new();
    for m in &site.modules {
        let name = format!("{}.bias", m.weight.trim_end_matches(".weight"));
        b.extend(src.tensor(&name, &[m.out_dim])?);
    }
    let n = b.len();
    backend.upload_owned(b, 1, n)
}

struct DecoderLayer<B: Backend> {
    input_norm: B::Tensor,
    qkv: B::Tensor,
    qkv_bias: Option<B::Tensor>,
    /// Qwen3's q and k norms (over head_dim).
    qk_norm: Option<(B::Tensor, B::Tensor)>,
    o: B::Tensor,
    o_bias: Option<B::Tensor>,
    post_norm: B::Tensor,
    gate_up: B::Tensor,
    down: B::Tensor,
}

pub struct Llama<B: Backend> {
    pub config: LlamaConfig,
    embed: B::Tensor,
    layers: Vec<DecoderLayer<B>>,
    norm: B::Tensor,
    inv_freq: Vec<f32>,
}

impl<B: Backend> Llama<B> {
    pub fn load(backend: &B, ckpt: &dyn ParamSource<B>, config: LlamaConfig) -> Result<Self> {
        let (d, hd) = (config.hidden_size, config.head_dim);
        let sites = config.sites();
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let s = &sites[SITES_PER_LAYER * l..SITES_PER_LAYER * (l + 1)];
                let p = |leaf: &str| format!("model.layers.{l}.{leaf}");
                Ok(DecoderLayer {
                    input_norm: vector(backend, ckpt, &p("input_layernorm.weight"), d)?,
                    qkv: ckpt.site_weight(backend, &s[0])?,
                    qkv_bias: config
                        .qkv_bias
                        .then(|| site_bias(backend, ckpt, &s[0]))
                        .transpose()?,
                    qk_norm: match config.qk_norm {
                        true => Some((
                            vector(backend, ckpt, &p("self_attn.q_norm.weight"), hd)?,
                            vector(backend, ckpt, &p("self_attn.k_norm.weight"), hd)?,
                        )),
                        false => None,
                    },
                    o: ckpt.site_weight(backend, &s[1])?,
                    o_bias: config
                        .o_bias
                        .then(|| site_bias(backend, ckpt, &s[1]))
                        .transpose()?,
                    post_norm: vector(backend, ckpt, &p("post_attention_layernorm.weight"), d)?,
                    gate_up: ckpt.site_weight(backend, &s[2])?,
                    down: ckpt.site_weight(backend, &s[3])?,
                })
            })
            .collect::<Result<_>>()?;
        let embed = ckpt.tensor("model.embed_tokens.weight", &[config.vocab_size, d])?;
        Ok(Llama {
            embed: backend.upload_owned(embed, config.vocab_size, d)?,
            layers,
            norm: vector(backend, ckpt, "model.norm.weight", d)?,
            inv_freq: config.rope.inv_freq(hd),
            config,
        })
    }

    /// The language-model head as `[d, vocab]` on the backend: `lm_head`, or the embeddings
    /// when tied. Loaded on demand (a large vocabulary's head is not needed for Grams).
    pub fn load_lm_head(&self, backend: &B, ckpt: &Checkpoint) -> Result<B::Tensor> {
        let (d, v) = (self.config.hidden_size, self.config.vocab_size);
        let name = if self.config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        backend.upload_owned(ckpt.f32_transposed(name, v, d)?, d, v)
    }

    /// Logits `[rows, vocab]` of final hidden states.
    pub fn logits(&self, backend: &B, head: &B::Tensor, hidden: &B::Tensor) -> Result<B::Tensor> {
        backend.linear(hidden, head, None)
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
            return Err(Error::invalid(
                "a decoder LLM takes token ids, not pixel values",
            ));
        };
        let c = &self.config;
        if *seq > c.max_position_embeddings {
            return Err(Error::invalid(format!(
                "sequence length {seq} exceeds max_position_embeddings {}",
                c.max_position_embeddings
            )));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} ≥ vocab_size {}",
                c.vocab_size
            )));
        }
        let (qw, kw) = c.qkv_widths();
        let shape = GqaShape {
            batch: *batch,
            seq: *seq,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        let mask = Some(&mask[..]);
        let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let mut h = backend.gather_rows(&self.embed, &rows)?;
        hooks.record(backend, &h)?;
        let eps = c.rms_norm_eps;
        for (l, layer) in self.layers.iter().enumerate() {
            let site = SITES_PER_LAYER * l;
            let x = backend.rms_norm(&h, &layer.input_norm, eps)?;
            observe(&mut hooks.grams, site, &x, mask)?;
            let mut qkv = backend.linear(&x, &layer.qkv, layer.qkv_bias.as_ref())?;
            drop(x);
            if let Some((qn, kn)) = &layer.qk_norm {
                backend.rms_norm_columns(&mut qkv, 0..qw, qn, eps)?;
                backend.rms_norm_columns(&mut qkv, qw..qw + kw, kn, eps)?;
            }
            backend.rotary(&mut qkv, 0..qw + kw, c.head_dim, *seq, &self.inv_freq)?;
            let att = backend.gqa_attention(&qkv, shape, mask)?;
            drop(qkv);
            observe(&mut hooks.grams, site + 1, &att, mask)?;
            backend.add_assign(
                &mut h,
                &backend.linear(&att, &layer.o, layer.o_bias.as_ref())?,
            )?;
            drop(att);
            let x = backend.rms_norm(&h, &layer.post_norm, eps)?;
            observe(&mut hooks.grams, site + 2, &x, mask)?;
            let act = backend.silu_mul(&backend.linear(&x, &layer.gate_up, None)?)?;
            drop(x);
            observe(&mut hooks.grams, site + 3, &act, mask)?;
            backend.add_assign(&mut h, &backend.linear(&act, &layer.down, None)?)?;
            // transformers lists the input of every layer, then the final norm's output.
            if l + 1 < self.layers.len() {
                hooks.record(backend, &h)?;
            }
        }
        let out = backend.rms_norm(&h, &self.norm, eps)?;
        hooks.record(backend, &out)?;
        if !c.tie_word_embeddings {
            observe(
                &mut hooks.grams,
                SITES_PER_LAYER * self.layers.len(),
                &out,
                mask,
            )?;
        }
        Ok(ForwardOutput {
            last_hidden: out,
            pooled: None,
        })
    }
}

fn observe<B: Backend>(
    grams: &mut Option<&mut dyn GramSink<B>>,
    site: usize,
    x: &B::Tensor,
    mask: Option<&[u8]>,
) -> Result<()> {
    match grams.as_deref_mut() {
        Some(g) => g.observe(site, x, mask),
        None => Ok(()),
    }
}
