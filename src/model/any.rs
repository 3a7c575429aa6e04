//! Any supported architecture: its config read from a checkpoint, its sites and parameter
//! groups, and the model on a backend, dispatched to gpt2, clip or llama.

use super::block::{BlockRun, PreLnBlock};
use super::hooks::{ForwardHooks, ForwardOutput, GramSink};
use super::llama::{DecoderLayer, DecoderRun, FinalNorm};
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
    Llama(llama::LlamaEmbeddings<B>),
}

impl<B: Backend> Embeddings<B> {
    /// The input of the first block, `[batch·seq, d]`.
    pub fn apply(&self, backend: &B, batch: &Batch) -> Result<B::Tensor> {
        match self {
            Embeddings::Gpt2(e) => e.apply(backend, batch),
            Embeddings::Clip(e) => e.apply(backend, batch),
            Embeddings::Llama(e) => e.apply(backend, batch),
        }
    }
}

/// A model loaded onto a backend.
pub enum Model<B: Backend> {
    Gpt2(gpt2::Gpt2<B>),
    Clip(clip::ClipVision<B>),
    Llama(llama::Llama<B>),
}

/// One layer of a model, run apart from the others (the layer-wise merge).
pub(crate) enum Block<B: Backend> {
    PreLn(PreLnBlock<B>),
    Decoder(DecoderLayer<B>),
}

/// How a layer runs on one batch: what it needs besides its weights.
pub(crate) enum LayerRun<'a> {
    PreLn(BlockRun<'a>),
    Decoder(DecoderRun<'a>),
}

impl<B: Backend> Block<B> {
    /// Runs the layer on `h` in place, showing its four site inputs (numbered from
    /// `first_site`) to the Gram sink.
    pub fn forward(
        &self,
        backend: &B,
        h: &mut B::Tensor,
        run: &LayerRun<'_>,
        first_site: usize,
        grams: &mut Option<&mut dyn GramSink<B>>,
    ) -> Result<()> {
        match (self, run) {
            (Block::PreLn(b), LayerRun::PreLn(r)) => b.forward(backend, h, r, first_site, grams),
            (Block::Decoder(b), LayerRun::Decoder(r)) => {
                b.forward(backend, h, r, first_site, grams)
            }
            _ => Err(Error::Backend(
                "internal: a layer run of another architecture".into(),
            )),
        }
    }

    /// Runs the layer only as far as its last site, for the Grams alone (`h` is left
    /// half-updated).
    pub fn observe_sites(
        &self,
        grams: &mut dyn GramSink<B>,
        backend: &B,
        h: &mut B::Tensor,
        run: &LayerRun<'_>,
    ) -> Result<()> {
        match (self, run) {
            (Block::PreLn(b), LayerRun::PreLn(r)) => b.observe_sites(grams, backend, h, r),
            (Block::Decoder(b), LayerRun::Decoder(r)) => b.observe_sites(grams, backend, h, r),
            _ => Err(Error::Backend(
                "internal: a layer run of another architecture".into(),
            )),
        }
    }
}

/// What turns the last layer's output into the input of the sites after the layers (a
/// decoder's untied `lm_head` reads the final norm's output).
pub(crate) enum HeadInput<B: Backend> {
    FinalNorm(FinalNorm<B>),
}

impl<B: Backend> HeadInput<B> {
    pub fn apply(&self, backend: &B, h: &B::Tensor) -> Result<B::Tensor> {
        match self {
            HeadInput::FinalNorm(n) => n.apply(backend, h),
        }
    }
}

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
            ModelConfig::Llama(c) => Ok(Embeddings::Llama(llama::LlamaEmbeddings::load(
                backend, src, c,
            )?)),
        }
    }

    /// Block `l` (its four sites are `sites()[4l..4l + 4]`).
    pub(crate) fn load_block<B: Backend>(
        &self,
        backend: &B,
        src: &dyn ParamSource<B>,
        l: usize,
    ) -> Result<Block<B>> {
        let (prefix, norms) = match self {
            ModelConfig::Gpt2(c) => c.block_names(l),
            ModelConfig::Clip(c) => c.block_names(l),
            ModelConfig::Llama(c) => {
                return Ok(Block::Decoder(DecoderLayer::load(backend, src, c, l)?))
            }
        };
        PreLnBlock::load(backend, src, &self.sites(), l, &prefix, norms).map(Block::PreLn)
    }

    /// How a layer runs on `batch` sequences of `seq` positions; `mask` marks the real
    /// tokens of text (1 = real).
    pub(crate) fn layer_run<'a>(
        &self,
        batch: usize,
        seq: usize,
        mask: Option<&'a [u8]>,
    ) -> Result<LayerRun<'a>> {
        match self {
            ModelConfig::Gpt2(c) => Ok(LayerRun::PreLn(c.block_run(batch, seq, mask))),
            ModelConfig::Clip(c) => Ok(LayerRun::PreLn(c.block_run(batch))),
            ModelConfig::Llama(_) => match mask {
                Some(mask) => Ok(LayerRun::Decoder(DecoderRun { batch, seq, mask })),
                None => Err(Error::Backend(
                    "internal: a decoder batch without its mask".into(),
                )),
            },
        }
    }

    /// What makes the input of the sites after the last layer from its output, with the
    /// parameters of `src`: `None` where no site follows the layers.
    pub(crate) fn load_head_input<B: Backend>(
        &self,
        backend: &B,
        src: &dyn ParamSource<B>,
    ) -> Result<Option<HeadInput<B>>> {
        match self {
            ModelConfig::Llama(c) if !c.tie_word_embeddings => Ok(Some(HeadInput::FinalNorm(
                FinalNorm::load(backend, src, c)?,
            ))),
            _ => Ok(None),
        }
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
