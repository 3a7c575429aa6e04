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
    pub(crate) fn layer(&self, l: usize) -> String {
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

/// The token embeddings, with the checks every input to a decoder gets.
pub struct LlamaEmbeddings<B: Backend> {
    embed: B::Tensor,
    vocab_size: usize,
    max_position_embeddings: usize,
}

impl<B: Backend> LlamaEmbeddings<B> {
    pub fn load(backend: &B, src: &dyn ParamSource<B>, c: &LlamaConfig) -> Result<Self> {
        let (v, d) = (c.vocab_size, c.hidden_size);
        Ok(LlamaEmbeddings {
            embed: backend.upload_owned(src.tensor("model.embed_tokens.weight", &[v, d])?, v, d)?,
            vocab_size: v,
            max_position_embeddings: c.max_position_embeddings,
        })
    }

    /// The input of the first layer, `[batch·seq, d]`.
    pub fn apply(&self, backend: &B, batch: &Batch) -> Result<B::Tensor> {
        let Batch::Tokens { ids, seq, .. } = batch else {
            return Err(Error::invalid(
                "a decoder LLM takes token ids, not pixel values",
            ));
        };
        if *seq > self.max_position_embeddings {
            return Err(Error::invalid(format!(
                "sequence length {seq} exceeds max_position_embeddings {}",
                self.max_position_embeddings
            )));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {bad} ≥ vocab_size {}",
                self.vocab_size
            )));
        }
        let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        backend.gather_rows(&self.embed, &rows)
    }
}

/// How a decoder layer runs on `batch` right-padded sequences of `seq` tokens.
#[derive(Clone, Copy)]
pub(crate) struct DecoderRun<'a> {
    pub batch: usize,
    pub seq: usize,
    /// Attention mask over keys, also the Gram row mask (1 = real token).
    pub mask: &'a [u8],
}

/// One decoder layer: h += o(attention(rope(qkv(norm h)))); h += down(silu(gate)·up(norm h)).
pub(crate) struct DecoderLayer<B: Backend> {
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
    eps: f32,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inv_freq: Vec<f32>,
}

impl<B: Backend> DecoderLayer<B> {
    /// Layer `l` of a model configured by `c`, its parameters read from `src`.
    pub fn load(backend: &B, src: &dyn ParamSource<B>, c: &LlamaConfig, l: usize) -> Result<Self> {
        let (d, hd) = (c.hidden_size, c.head_dim);
        let sites = c.sites();
        let s = &sites[SITES_PER_LAYER * l..SITES_PER_LAYER * (l + 1)];
        let p = |leaf: &str| format!("{}.{leaf}", c.layer(l));
        Ok(DecoderLayer {
            input_norm: vector(backend, src, &p("input_layernorm.weight"), d)?,
            qkv: src.site_weight(backend, &s[0])?,
            qkv_bias: c
                .qkv_bias
                .then(|| site_bias(backend, src, &s[0]))
                .transpose()?,
            qk_norm: match c.qk_norm {
                true => Some((
                    vector(backend, src, &p("self_attn.q_norm.weight"), hd)?,
                    vector(backend, src, &p("self_attn.k_norm.weight"), hd)?,
                )),
                false => None,
            },
            o: src.site_weight(backend, &s[1])?,
            o_bias: c
                .o_bias
                .then(|| site_bias(backend, src, &s[1]))
                .transpose()?,
            post_norm: vector(backend, src, &p("post_attention_layernorm.weight"), d)?,
            gate_up: src.site_weight(backend, &s[2])?,
            down: src.site_weight(backend, &s[3])?,
            eps: c.rms_norm_eps,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: hd,
            inv_freq: c.rope.inv_freq(hd),
        })
    }

    /// Runs the layer on `h` in place, showing its four site inputs (numbered from
    /// `first_site`) to the Gram sink.
    pub fn forward(
        &self,
        backend: &B,
        h: &mut B::Tensor,
        run: &DecoderRun<'_>,
        first_site: usize,
        grams: &mut Option<&mut dyn GramSink<B>>,
    ) -> Result<()> {
        let mut observe = |k: usize, x: &B::Tensor| observe(grams, first_site + k, x, run.mask);
        let act = self.run_to_last_site(&mut observe, backend, h, run)?;
        backend.add_assign(h, &backend.linear(&act, &self.down, None)?)
    }

    /// Runs the layer only as far as its last site (down_proj's input), for the Grams alone:
    /// `h` is left half-updated (after the attention's residual).
    pub fn observe_sites(
        &self,
        grams: &mut dyn GramSink<B>,
        backend: &B,
        h: &mut B::Tensor,
        run: &DecoderRun<'_>,
    ) -> Result<()> {
        let mut observe = |k: usize, x: &B::Tensor| grams.observe(k, x, Some(run.mask));
        self.run_to_last_site(&mut observe, backend, h, run)
            .map(drop)
    }

    /// Everything up to down_proj, each site input `k` (0..4) shown to `observe`: returns
    /// down_proj's input.
    fn run_to_last_site(
        &self,
        observe: &mut dyn FnMut(usize, &B::Tensor) -> Result<()>,
        backend: &B,
        h: &mut B::Tensor,
        run: &DecoderRun<'_>,
    ) -> Result<B::Tensor> {
        let (qw, kw) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let shape = GqaShape {
            batch: run.batch,
            seq: run.seq,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        };
        let x = backend.rms_norm(h, &self.input_norm, self.eps)?;
        observe(0, &x)?;
        let mut qkv = backend.linear(&x, &self.qkv, self.qkv_bias.as_ref())?;
        drop(x);
        if let Some((qn, kn)) = &self.qk_norm {
            backend.rms_norm_columns(&mut qkv, 0..qw, qn, self.eps)?;
            backend.rms_norm_columns(&mut qkv, qw..qw + kw, kn, self.eps)?;
        }
        backend.rotary(&mut qkv, 0..qw + kw, self.head_dim, run.seq, &self.inv_freq)?;
        let att = backend.gqa_attention(&qkv, shape, Some(run.mask))?;
        drop(qkv);
        observe(1, &att)?;
        backend.add_assign(h, &backend.linear(&att, &self.o, self.o_bias.as_ref())?)?;
        drop(att);
        let x = backend.rms_norm(h, &self.post_norm, self.eps)?;
        observe(2, &x)?;
        let act = backend.silu_mul(&backend.linear(&x, &self.gate_up, None)?)?;
        drop(x);
        observe(3, &act)?;
        Ok(act)
    }
}

/// The final RMSNorm, whose output the language-model head reads.
pub struct FinalNorm<B: Backend> {
    weight: B::Tensor,
    eps: f32,
}

impl<B: Backend> FinalNorm<B> {
    pub fn load(backend: &B, src: &dyn ParamSource<B>, c: &LlamaConfig) -> Result<Self> {
        Ok(FinalNorm {
            weight: vector(backend, src, "model.norm.weight", c.hidden_size)?,
            eps: c.rms_norm_eps,
        })
    }

    pub fn apply(&self, backend: &B, h: &B::Tensor) -> Result<B::Tensor> {
        backend.rms_norm(h, &self.weight, self.eps)
    }
}

pub struct Llama<B: Backend> {
    pub config: LlamaConfig,
    embeddings: LlamaEmbeddings<B>,
    layers: Vec<DecoderLayer<B>>,
    norm: FinalNorm<B>,
}

impl<B: Backend> Llama<B> {
    pub fn load(backend: &B, ckpt: &dyn ParamSource<B>, config: LlamaConfig) -> Result<Self> {
        let layers = (0..config.num_hidden_layers)
            .map(|l| DecoderLayer::load(backend, ckpt, &config, l))
            .collect::<Result<_>>()?;
        Ok(Llama {
            embeddings: LlamaEmbeddings::load(backend, ckpt, &config)?,
            layers,
            norm: FinalNorm::load(backend, ckpt, &config)?,
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
        let mut h = self.embeddings.apply(backend, batch)?;
        let Batch::Tokens {
            mask, batch, seq, ..
        } = batch
        else {
            unreachable!("the embeddings take token ids only");
        };
        let run = DecoderRun {
            batch: *batch,
            seq: *seq,
            mask,
        };
        hooks.record(backend, &h)?;
        for (l, layer) in self.layers.iter().enumerate() {
            layer.forward(backend, &mut h, &run, SITES_PER_LAYER * l, &mut hooks.grams)?;
            // transformers lists the input of every layer, then the final norm's output.
            if l + 1 < self.layers.len() {
                hooks.record(backend, &h)?;
            }
        }
        let out = self.norm.apply(backend, &h)?;
        hooks.record(backend, &out)?;
        if !self.config.tie_word_embeddings {
            let site = SITES_PER_LAYER * self.layers.len();
            observe(&mut hooks.grams, site, &out, mask)?;
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
    mask: &[u8],
) -> Result<()> {
    match grams.as_deref_mut() {
        Some(g) => g.observe(site, x, Some(mask)),
        None => Ok(()),
    }
}
