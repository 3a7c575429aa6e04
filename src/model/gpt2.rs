//! GPT-2 (`GPT2Model`, the backbone of `GPT2ForSequenceClassification`): pre-LN blocks,
//! causal attention with padded keys masked, `gelu_new` MLP, final `ln_f`.

use std::path::Path;

use super::block::{BlockRun, LayerNorm, PreLnBlock};
use super::{
    field_f32, field_usize, Batch, ForwardHooks, ForwardOutput, LinearModule, ParamSource, Site,
};
use crate::backend::{Activation, AttentionShape, Backend};
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
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
        super::require_activation(
            v,
            "activation_function",
            "activation_function",
            "gelu_new",
            "GPT-2",
            path,
        )?;
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

/// `wte[ids] + wpe[position]`.
pub struct Gpt2Embeddings<B: Backend> {
    wte: B::Tensor,
    wpe: B::Tensor,
    n_positions: usize,
}

impl<B: Backend> Gpt2Embeddings<B> {
    pub fn load(backend: &B, src: &dyn ParamSource<B>, c: &Gpt2Config) -> Result<Self> {
        let d = c.n_embd;
        let wte = src.tensor("wte.weight", &[c.vocab_size, d])?;
        let wpe = src.tensor("wpe.weight", &[c.n_positions, d])?;
        // Handed over, not copied: wte alone is 154 MB at GPT-2's vocabulary.
        Ok(Gpt2Embeddings {
            wte: backend.upload_owned(wte, c.vocab_size, d)?,
            wpe: backend.upload_owned(wpe, c.n_positions, d)?,
            n_positions: c.n_positions,
        })
    }

    pub fn apply(&self, backend: &B, batch: &Batch) -> Result<B::Tensor> {
        let Batch::Tokens { ids, seq, .. } = batch else {
            return Err(Error::invalid("GPT-2 takes token ids, not pixel values"));
        };
        if *seq > self.n_positions {
            return Err(Error::invalid(format!(
                "sequence length {seq} exceeds n_positions {}",
                self.n_positions
            )));
        }
        backend.embed_tokens(&self.wte, &self.wpe, ids, *seq)
    }
}

impl Gpt2Config {
    /// The name prefix of block `l` and the leaf names of its two LayerNorms.
    pub(crate) fn block_names(&self, l: usize) -> (String, [&'static str; 2]) {
        (format!("h.{l}."), ["ln_1", "ln_2"])
    }

    /// How a block runs on `batch` sequences of `seq` tokens: causal attention, padded keys
    /// masked out by `mask`.
    pub(crate) fn block_run<'a>(
        &self,
        batch: usize,
        seq: usize,
        mask: Option<&'a [u8]>,
    ) -> BlockRun<'a> {
        BlockRun {
            eps: self.layer_norm_epsilon,
            shape: AttentionShape {
                batch,
                seq,
                heads: self.n_head,
                head_dim: self.n_embd / self.n_head,
                causal: true,
            },
            mask,
            act: Activation::GeluNew,
        }
    }
}

pub struct Gpt2<B: Backend> {
    pub config: Gpt2Config,
    embeddings: Gpt2Embeddings<B>,
    blocks: Vec<PreLnBlock<B>>,
    ln_f: LayerNorm<B>,
}

impl<B: Backend> Gpt2<B> {
    pub fn load(backend: &B, ckpt: &dyn ParamSource<B>, config: Gpt2Config) -> Result<Self> {
        let sites = config.sites();
        let blocks = (0..config.n_layer)
            .map(|l| {
                let (prefix, norms) = config.block_names(l);
                PreLnBlock::load(backend, ckpt, &sites, l, &prefix, norms)
            })
            .collect::<Result<_>>()?;
        Ok(Gpt2 {
            embeddings: Gpt2Embeddings::load(backend, ckpt, &config)?,
            blocks,
            ln_f: LayerNorm::load(backend, ckpt, "ln_f", config.n_embd)?,
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
            mask,
            batch: n,
            seq,
            ..
        } = batch
        else {
            return Err(Error::invalid("GPT-2 takes token ids, not pixel values"));
        };
        let run = self.config.block_run(*n, *seq, Some(mask));
        let mut h = self.embeddings.apply(backend, batch)?;
        hooks.record(backend, &h)?;
        for (l, block) in self.blocks.iter().enumerate() {
            block.forward(backend, &mut h, &run, 4 * l, &mut hooks.grams)?;
            // transformers lists the input of every block, then the final ln_f output.
            if l + 1 < self.blocks.len() {
                hooks.record(backend, &h)?;
            }
        }
        let out = self.ln_f.apply(backend, &h, run.eps)?;
        hooks.record(backend, &out)?;
        Ok(ForwardOutput {
            last_hidden: out,
            pooled: None,
        })
    }
}
