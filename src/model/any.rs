//! Any supported architecture: its config read from a checkpoint, its sites and parameter
//! groups, and the model on a backend, dispatched to gpt2, clip or llama.

use super::block::PreLnBlock;
use super::hooks::{ForwardHooks, ForwardOutput};
use super::params::{ParamGroup, ParamSource};
use super::site::Site;
use super::{clip, gpt2, llama, llama_config, Batch};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::{Arch, Checkpoint};

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

/// A model loaded onto a backend.
pub enum Model<B: Backend> {
    Gpt2(gpt2::Gpt2<B>),
    Clip(clip::ClipVision<B>),
    Llama(llama::Llama<B>),
}

/// What the layer-wise engine says of a decoder LLM.
pub const LAYERWISE_DECODERS: &str = "decoder LLMs are merged one model at a time for now: RegMean++ and `schedule: layer` run GPT-2 and CLIP vision towers; use merge_method: regmean with schedule: model (or auto)";

/// The architecture-level description of a checkpoint, without its weights on a backend.
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
        let (prefix, norms) = match self {
            ModelConfig::Gpt2(c) => c.block_names(l),
            ModelConfig::Clip(c) => c.block_names(l),
            ModelConfig::Llama(_) => return Err(Error::invalid(LAYERWISE_DECODERS)),
        };
        PreLnBlock::load(backend, src, &self.sites(), l, &prefix, norms)
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
        Self::load_from(backend, ckpt, ckpt)
    }

    /// The model `ckpt` configures, its parameters read from `src` (a merge's source makes
    /// each linear weight once, for the forward pass and the sums).
    pub fn load_from(backend: &B, ckpt: &Checkpoint, src: &dyn ParamSource<B>) -> Result<Self> {
        match ModelConfig::from_checkpoint(ckpt)? {
            ModelConfig::Gpt2(c) => Ok(Model::Gpt2(gpt2::Gpt2::load(backend, src, c)?)),
            ModelConfig::Clip(c) => Ok(Model::Clip(clip::ClipVision::load(backend, src, c)?)),
            ModelConfig::Llama(c) => Ok(Model::Llama(llama::Llama::load(backend, src, c)?)),
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
