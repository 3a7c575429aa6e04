//! Native forward passes, written once against the [`Backend`] trait, with a hook at every
//! linear layer's input ("site") where the Gram accumulator observes the activations.

mod block;
pub mod clip;
pub mod clip_text;
pub mod gpt2;
pub mod llama;
pub mod llama_config;
pub mod llama_plan;

use std::collections::HashMap;
use std::sync::Arc;

pub(crate) use block::{BlockRun, PreLnBlock};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::{Arch, Checkpoint};

/// One linear layer fed by a site.
#[derive(Clone, Debug)]
pub struct LinearModule {
    /// Canonical name of its weight, e.g. `h.0.attn.c_attn.weight`.
    pub weight: String,
    /// True when stored `[out, in]` (`nn.Linear`), false when `[in, out]` (GPT-2 `Conv1D`).
    pub transposed: bool,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// A place in the forward pass where one input feeds one or more linear layers (CLIP's
/// q, k and v share theirs, so their Gram is computed once).
#[derive(Clone, Debug)]
pub struct Site {
    /// Stable name used in Gram statistics files.
    pub name: String,
    pub dim: usize,
    pub modules: Vec<LinearModule>,
}

impl Site {
    /// Every module a site feeds takes the site's input width.
    pub fn check_inputs(&self) -> Result<()> {
        match self.modules.iter().find(|m| m.in_dim != self.dim) {
            Some(m) => Err(crate::error::Error::Backend(format!(
                "site {}: module {} takes {} inputs, the site has {}",
                self.name, m.weight, m.in_dim, self.dim
            ))),
            None => Ok(()),
        }
    }
}

/// Where a model part's parameters come from: a checkpoint, or tensors a merge made.
pub trait ParamSource<B: Backend> {
    /// A float tensor (canonical name) in its stored layout, checked against `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// The `[in, Σ out]` weight of the linear layer(s) `site` feeds, on the backend.
    fn site_weight(&self, backend: &B, site: &Site) -> Result<B::Tensor>;
}

impl<B: Backend> ParamSource<B> for Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.f32_shaped(name, shape)
    }

    fn site_weight(&self, backend: &B, site: &Site) -> Result<B::Tensor> {
        backend.site_weight(self, site)
    }
}

/// Parameters held in memory (what a layer-wise merge has merged so far): tensors in their
/// stored layout, and linear weights as `[in, out]`.
#[derive(Default)]
pub struct HostParams {
    pub tensors: HashMap<String, Vec<f32>>,
    pub linear_in_out: HashMap<String, Vec<f32>>,
}

impl HostParams {
    fn get<'a>(map: &'a HashMap<String, Vec<f32>>, name: &str, len: usize) -> Result<&'a [f32]> {
        match map.get(name) {
            Some(v) if v.len() == len => Ok(v),
            Some(v) => Err(Error::Backend(format!(
                "internal: merged `{name}` has {} values, expected {len}",
                v.len()
            ))),
            None => Err(Error::Backend(format!("internal: `{name}` was not merged"))),
        }
    }
}

impl<B: Backend> ParamSource<B> for HostParams {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Self::get(&self.tensors, name, shape.iter().product()).map(<[f32]>::to_vec)
    }

    fn site_weight(&self, backend: &B, site: &Site) -> Result<B::Tensor> {
        let parts = site
            .modules
            .iter()
            .map(|m| Self::get(&self.linear_in_out, &m.weight, m.in_dim * m.out_dim))
            .collect::<Result<Vec<_>>>()?;
        let (w, out) = crate::backend::fuse_in_out(site, &parts);
        backend.upload_owned(w, site.dim, out)
    }
}

/// Which part of the model a parameter belongs to, in the order a layer-wise merge runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamGroup {
    /// Before the first block (GPT-2 `wte`, `wpe`; CLIP `embeddings.*`, `pre_layrnorm`).
    Embeddings,
    Layer(usize),
    /// After the last block (GPT-2 `ln_f`, CLIP `post_layernorm`).
    Final,
}

/// The input embeddings of a model, run apart from its blocks.
pub enum Embeddings<B: Backend> {
    Gpt2(gpt2::Gpt2Embeddings<B>),
    Clip(clip::ClipEmbeddings<B>),
}

impl<B: Backend> Embeddings<B> {
    /// The input of the first block, `[batch·seq, d]`.
    pub fn apply(&self, backend: &B, batch: &Batch) -> Result<B::Tensor> {
        match self {
            Embeddings::Gpt2(e) => e.apply(backend, batch),
            Embeddings::Clip(e) => e.apply(backend, batch),
        }
    }
}

/// Receives the input of every site during a forward pass.
pub trait GramSink<B: Backend> {
    /// `row_mask` marks real (non-padding) rows; None when every row is real.
    fn observe(&mut self, site: usize, x: &B::Tensor, row_mask: Option<&[u8]>) -> Result<()>;
}

/// A batch of model inputs on the host.
#[derive(Clone, Debug)]
pub enum Batch {
    /// Token ids `[batch·seq]`, right-padded, with the attention mask (1 real, 0 padding).
    Tokens {
        ids: Vec<u32>,
        mask: Vec<u8>,
        batch: usize,
        seq: usize,
    },
    /// Pixel values `[batch, 3, H, W]`.
    Pixels { values: Vec<f32>, batch: usize },
}

impl Batch {
    pub fn len(&self) -> usize {
        match self {
            Batch::Tokens { batch, .. } | Batch::Pixels { batch, .. } => *batch,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a forward pass returns.
pub struct ForwardOutput<B: Backend> {
    /// GPT-2: after `ln_f`; CLIP: the encoder's last hidden state (`last_hidden_state`).
    pub last_hidden: B::Tensor,
    /// CLIP: `post_layernorm` of the class token (`pooler_output`).
    pub pooled: Option<B::Tensor>,
}

/// Options of one forward pass.
pub struct ForwardHooks<'a, B: Backend> {
    pub grams: Option<&'a mut dyn GramSink<B>>,
    /// Receives every hidden state as transformers' `output_hidden_states` lists them.
    pub hidden_states: Option<&'a mut Vec<Vec<f32>>>,
}

impl<B: Backend> ForwardHooks<'_, B> {
    /// Hands a hidden state to `hidden_states`, when asked for.
    fn record(&mut self, backend: &B, t: &B::Tensor) -> Result<()> {
        if let Some(h) = self.hidden_states.as_deref_mut() {
            h.push(backend.download(t)?);
        }
        Ok(())
    }
}

impl<B: Backend> Default for ForwardHooks<'_, B> {
    fn default() -> Self {
        ForwardHooks {
            grams: None,
            hidden_states: None,
        }
    }
}

/// A model loaded onto a backend.
pub enum Model<B: Backend> {
    Gpt2(gpt2::Gpt2<B>),
    Clip(clip::ClipVision<B>),
    Llama(llama::Llama<B>),
}

/// The architecture-level description of a checkpoint, without its weights on a backend.
/// What the layer-wise engine says of a decoder LLM.
pub const LAYERWISE_DECODERS: &str = "decoder LLMs are merged one model at a time for now: RegMean++ and `schedule: layer` run GPT-2 and CLIP vision towers; use merge_method: regmean with schedule: model (or auto)";

#[derive(Clone, Debug)]
pub enum ModelConfig {
    Gpt2(gpt2::Gpt2Config),
    Clip(clip::ClipVisionConfig),
    Llama(llama_config::LlamaConfig),
}

impl ModelConfig {
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        let path = ckpt.dir().join("config.json");
        match ckpt.arch() {
            Arch::Gpt2 => Ok(ModelConfig::Gpt2(gpt2::Gpt2Config::from_json(
                ckpt.config(),
                &path,
            )?)),
            Arch::ClipVision => Ok(ModelConfig::Clip(clip::ClipVisionConfig::from_json(
                ckpt.config(),
                &path,
            )?)),
            Arch::CausalLm(family) => Ok(ModelConfig::Llama(llama_config::LlamaConfig::from_json(
                ckpt.config(),
                family,
                &path,
            )?)),
        }
    }

    pub fn arch(&self) -> Arch {
        match self {
            ModelConfig::Gpt2(_) => Arch::Gpt2,
            ModelConfig::Clip(_) => Arch::ClipVision,
            ModelConfig::Llama(c) => Arch::CausalLm(c.family),
        }
    }

    /// Every site of the forward pass, in execution order.
    pub fn sites(&self) -> Vec<Site> {
        match self {
            ModelConfig::Gpt2(c) => c.sites(),
            ModelConfig::Clip(c) => c.sites(),
            ModelConfig::Llama(c) => c.sites(),
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_layer,
            ModelConfig::Clip(c) => c.num_hidden_layers,
            ModelConfig::Llama(c) => c.num_hidden_layers,
        }
    }

    /// The part of the model the backbone parameter `name` belongs to.
    pub fn group_of(&self, name: &str) -> ParamGroup {
        let (layers, fin): (&str, &[&str]) = match self {
            ModelConfig::Gpt2(_) => ("h.", &["ln_f."]),
            ModelConfig::Clip(_) => (
                "vision_model.encoder.layers.",
                &["vision_model.post_layernorm."],
            ),
            ModelConfig::Llama(_) => ("model.layers.", &["model.norm.", "lm_head."]),
        };
        if let Some(l) = name
            .strip_prefix(layers)
            .and_then(|rest| rest.split('.').next())
            .and_then(|l| l.parse().ok())
        {
            ParamGroup::Layer(l)
        } else if fin.iter().any(|f| name.starts_with(f)) {
            ParamGroup::Final
        } else {
            ParamGroup::Embeddings
        }
    }

    /// The prefix of block `l`'s parameter names (`h.3.`).
    pub fn layer_prefix(&self, l: usize) -> String {
        match self {
            ModelConfig::Gpt2(_) => format!("h.{l}."),
            ModelConfig::Clip(_) => format!("{}encoder.layers.{l}.", clip::PREFIX),
            ModelConfig::Llama(_) => format!("model.layers.{l}."),
        }
    }

    pub fn load_embeddings<B: Backend>(
        &self,
        backend: &B,
        src: &dyn ParamSource<B>,
    ) -> Result<Embeddings<B>> {
        match self {
            ModelConfig::Gpt2(c) => Ok(Embeddings::Gpt2(gpt2::Gpt2Embeddings::load(
                backend, src, c,
            )?)),
            ModelConfig::Clip(c) => Ok(Embeddings::Clip(clip::ClipEmbeddings::load(
                backend, src, c,
            )?)),
            ModelConfig::Llama(_) => Err(Error::invalid(LAYERWISE_DECODERS)),
        }
    }

    /// Block `l` (its four sites are `sites()[4l..4l + 4]`).
    pub(crate) fn load_block<B: Backend>(
        &self,
        backend: &B,
        src: &dyn ParamSource<B>,
        l: usize,
    ) -> Result<PreLnBlock<B>> {
        let sites = self.sites();
        let p = self.layer_prefix(l);
        let (ln1, ln2) = match self {
            ModelConfig::Gpt2(_) => ("ln_1", "ln_2"),
            ModelConfig::Clip(_) => ("layer_norm1", "layer_norm2"),
            ModelConfig::Llama(_) => return Err(Error::invalid(LAYERWISE_DECODERS)),
        };
        PreLnBlock::load(
            backend,
            src,
            &sites[4 * l..4 * l + 4],
            &format!("{p}{ln1}"),
            &format!("{p}{ln2}"),
        )
    }

    /// Every backbone tensor with its expected shape.
    pub fn expected_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            ModelConfig::Gpt2(c) => c.expected_shapes(),
            ModelConfig::Clip(c) => c.expected_shapes(),
            ModelConfig::Llama(c) => c.expected_shapes(),
        }
    }

    /// Checks that a checkpoint holds every tensor this architecture needs, in its shape.
    pub fn check_checkpoint(&self, ckpt: &Checkpoint) -> Result<()> {
        for (name, shape) in self.expected_shapes() {
            if !ckpt.contains(&name) {
                return Err(Error::file(ckpt.dir(), format!("missing tensor `{name}`")));
            }
            ckpt.expect_shape(&name, &shape)?;
        }
        Ok(())
    }

    /// Two configs describe the same architecture and sizes (so their weights can merge).
    pub fn same_shape(&self, other: &ModelConfig) -> bool {
        self.expected_shapes() == other.expected_shapes()
    }

    /// The config fields that differ, as `field: self vs other`.
    pub fn differences(&self, other: &ModelConfig) -> String {
        let json = |c: &ModelConfig| {
            match c {
                ModelConfig::Gpt2(c) => serde_json::to_value(c),
                ModelConfig::Clip(c) => serde_json::to_value(c),
                ModelConfig::Llama(c) => serde_json::to_value(c),
            }
            .expect("config serialises")
        };
        let (a, b) = (json(self), json(other));
        match (a.as_object(), b.as_object()) {
            (Some(a), Some(b)) if self.arch() == other.arch() => a
                .iter()
                .filter(|(k, v)| b.get(*k) != Some(v))
                .map(|(k, v)| format!("{k}: {v} vs {}", b[k]))
                .collect::<Vec<_>>()
                .join(", "),
            _ => format!("{} vs {}", self.arch().title(), other.arch().title()),
        }
    }
}

impl<B: Backend> Model<B> {
    pub fn load(backend: &B, ckpt: &Checkpoint) -> Result<Self> {
        match ModelConfig::from_checkpoint(ckpt)? {
            ModelConfig::Gpt2(c) => Ok(Model::Gpt2(gpt2::Gpt2::load(backend, ckpt, c)?)),
            ModelConfig::Clip(c) => Ok(Model::Clip(clip::ClipVision::load(backend, ckpt, c)?)),
            ModelConfig::Llama(c) => Ok(Model::Llama(llama::Llama::load(backend, ckpt, c)?)),
        }
    }

    pub fn forward(
        &self,
        backend: &B,
        batch: &Batch,
        hooks: ForwardHooks<'_, B>,
    ) -> Result<ForwardOutput<B>> {
        match self {
            Model::Gpt2(m) => m.forward(backend, batch, hooks),
            Model::Clip(m) => m.forward(backend, batch, hooks),
            Model::Llama(m) => m.forward(backend, batch, hooks),
        }
    }
}

/// The largest size a config.json field may hold (2²⁰: vocabularies, widths, lengths).
pub const MAX_CONFIG_SIZE: u64 = 1 << 20;

/// Refuses a config whose activation field `key` (absent: transformers' default, `expected`)
/// names another function than `expected`, the one `model` is built with; `label` names the
/// field in the message.
pub(crate) fn require_activation(
    v: &serde_json::Value,
    key: &str,
    label: &str,
    expected: &str,
    model: &str,
    path: &std::path::Path,
) -> Result<()> {
    let act = v.get(key).and_then(|a| a.as_str()).unwrap_or(expected);
    if act != expected {
        return Err(Error::file(
            path,
            format!("{label} `{act}` is not supported ({model} uses {expected})"),
        ));
    }
    Ok(())
}

/// Reads an optional field with a default, checking its type.
pub(crate) fn field_usize(
    v: &serde_json::Value,
    key: &str,
    default: usize,
    path: &std::path::Path,
) -> Result<usize> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        // Sizes are bounded so that no product of them can overflow, whatever the file says;
        // real tensors are then checked against the checkpoint's bytes.
        Some(x) => x
            .as_u64()
            .filter(|&x| x <= MAX_CONFIG_SIZE)
            .map(|x| x as usize)
            .ok_or_else(|| {
                Error::file(
                    path,
                    format!("`{key}` must be an integer from 0 to {MAX_CONFIG_SIZE}, found {x}"),
                )
            }),
    }
}

pub(crate) fn field_f32(
    v: &serde_json::Value,
    key: &str,
    default: f32,
    path: &std::path::Path,
) -> Result<f32> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| Error::file(path, format!("`{key}` must be a number, found {x}"))),
    }
}

/// [`linear_in_out`], decoded once per checkpoint when it keeps decoded tensors (the
/// forward pass reads it first; [`take_linear_in_out`] hands it to the sums after).
pub fn shared_linear_in_out(ckpt: &Checkpoint, m: &LinearModule) -> Result<Arc<Vec<f32>>> {
    ckpt.keep(&m.weight, || linear_in_out(ckpt, m))
}

/// The weight [`shared_linear_in_out`] kept (forgotten by the checkpoint now), or decoded.
pub fn take_linear_in_out(ckpt: &Checkpoint, m: &LinearModule) -> Result<Arc<Vec<f32>>> {
    ckpt.take_kept(&m.weight, || linear_in_out(ckpt, m))
}

/// A linear weight as a row-major `[in, out]` host matrix, whatever its stored layout.
pub fn linear_in_out(ckpt: &Checkpoint, m: &LinearModule) -> Result<Vec<f32>> {
    if m.transposed {
        ckpt.f32_transposed(&m.weight, m.out_dim, m.in_dim)
    } else {
        ckpt.f32_shaped(&m.weight, &[m.in_dim, m.out_dim])
    }
}

/// Row-major `[rows, cols]` → `[cols, rows]` (see [`crate::io::safetensors::transpose_with`]).
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(a.len(), rows * cols, "transpose of [{rows}, {cols}]");
    crate::io::safetensors::transpose_with(a, rows, cols, |&v| v)
}
