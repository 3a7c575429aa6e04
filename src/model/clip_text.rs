//! The CLIP text tower (`CLIPModel.text_model` + `text_projection`), for zero-shot heads:
//! token + position embeddings, the same pre-LN encoder layers as the vision tower with
//! causal attention, `final_layer_norm`, pooled at the first end-of-text token, projected.

use std::path::Path;

use super::block::{BlockRun, LayerNorm, PreLnBlock};
use super::{field_f32, field_usize, Site};
use crate::backend::{Activation, AttentionShape, Backend};
use crate::error::{Error, Result};
use crate::io::Checkpoint;

pub const PREFIX: &str = "text_model.";

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub projection_dim: usize,
}

impl ClipTextConfig {
    /// Reads the `text_config` of a `CLIPConfig` (a full `CLIPModel`'s config.json); absent
    /// keys take transformers' defaults.
    pub fn from_json(v: &serde_json::Value, path: &Path) -> Result<Self> {
        if v.get("model_type").and_then(|m| m.as_str()) != Some("clip") {
            return Err(Error::file(
                path,
                "zero-shot heads need a full CLIPModel (model_type `clip`, with its text tower) as the base model",
            ));
        }
        let t = v.get("text_config").unwrap_or(&serde_json::Value::Null);
        super::require_activation(
            t,
            "hidden_act",
            "text hidden_act",
            "quick_gelu",
            "CLIP",
            path,
        )?;
        let c = ClipTextConfig {
            vocab_size: field_usize(t, "vocab_size", 49408, path)?,
            hidden_size: field_usize(t, "hidden_size", 512, path)?,
            intermediate_size: field_usize(t, "intermediate_size", 2048, path)?,
            num_attention_heads: field_usize(t, "num_attention_heads", 8, path)?,
            num_hidden_layers: field_usize(t, "num_hidden_layers", 12, path)?,
            max_position_embeddings: field_usize(t, "max_position_embeddings", 77, path)?,
            layer_norm_eps: field_f32(t, "layer_norm_eps", 1e-5, path)?,
            eos_token_id: field_usize(t, "eos_token_id", 49407, path)? as u32,
            pad_token_id: field_usize(t, "pad_token_id", 1, path)? as u32,
            projection_dim: field_usize(v, "projection_dim", 512, path)?,
        };
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::file(
                path,
                "text hidden_size is not divisible by num_attention_heads",
            ));
        }
        Ok(c)
    }

    fn sites(&self) -> Vec<Site> {
        super::clip::encoder_sites(
            PREFIX,
            self.num_hidden_layers,
            self.hidden_size,
            self.intermediate_size,
        )
    }
}

/// The text tower of a `CLIPModel` on a backend, with its projection and logit scale.
pub struct ClipText<B: Backend> {
    pub config: ClipTextConfig,
    token: B::Tensor,
    pos: B::Tensor,
    layers: Vec<PreLnBlock<B>>,
    final_ln: LayerNorm<B>,
    /// `text_projection` as `[d, proj]`.
    projection: B::Tensor,
    /// `logit_scale` (a log: logits are exp(logit_scale) · cos).
    pub logit_scale: f32,
}

/// What the text tower computes for a batch of token sequences.
pub struct TextOutput {
    /// `pooler_output`: `final_layer_norm` at the end-of-text token, `[batch, d]`.
    pub pooled: Vec<f32>,
    /// `text_embeds` (`get_text_features`): the pooled output projected, `[batch, proj]`.
    pub embeds: Vec<f32>,
}

impl<B: Backend> ClipText<B> {
    /// Loads the text tower from a checkpoint opened with [`Checkpoint::open_all`].
    pub fn load(backend: &B, ckpt: &Checkpoint) -> Result<Self> {
        let config = ClipTextConfig::from_json(ckpt.config(), &ckpt.dir().join("config.json"))?;
        let (d, p) = (config.hidden_size, config.projection_dim);
        let layers = super::clip::load_encoder(backend, ckpt, PREFIX, &config.sites())?;
        let token = ckpt.f32_shaped(
            &format!("{PREFIX}embeddings.token_embedding.weight"),
            &[config.vocab_size, d],
        )?;
        let pos = ckpt.f32_shaped(
            &format!("{PREFIX}embeddings.position_embedding.weight"),
            &[config.max_position_embeddings, d],
        )?;
        let projection = ckpt.f32_shaped("text_projection.weight", &[p, d])?;
        let logit_scale = ckpt.f32_shaped("logit_scale", &[])?[0];
        Ok(ClipText {
            token: backend.upload_owned(token, config.vocab_size, d)?,
            pos: backend.upload_owned(pos, config.max_position_embeddings, d)?,
            layers,
            final_ln: LayerNorm::load(backend, ckpt, &format!("{PREFIX}final_layer_norm"), d)?,
            projection: backend.upload_owned(super::transpose(&projection, p, d), d, p)?,
            logit_scale,
            config,
        })
    }

    /// Runs right-padded sequences (`ids [batch·seq]`, `mask` 1 = real token).
    pub fn forward(
        &self,
        backend: &B,
        ids: &[u32],
        mask: &[u8],
        batch: usize,
        seq: usize,
    ) -> Result<TextOutput> {
        let c = &self.config;
        if seq > c.max_position_embeddings {
            return Err(Error::invalid(format!(
                "a text of {seq} tokens exceeds the text tower's max_position_embeddings {}",
                c.max_position_embeddings
            )));
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::invalid(format!(
                "token id {id} ≥ the text tower's vocab_size {}: the tokenizer does not belong to this model",
                c.vocab_size
            )));
        }
        let run = BlockRun {
            eps: c.layer_norm_eps,
            shape: AttentionShape {
                batch,
                seq,
                heads: c.num_attention_heads,
                head_dim: c.hidden_size / c.num_attention_heads,
                causal: true,
            },
            mask: Some(mask),
            act: Activation::QuickGelu,
        };
        let mut h = backend.embed_tokens(&self.token, &self.pos, ids, seq)?;
        for (l, layer) in self.layers.iter().enumerate() {
            layer.forward(backend, &mut h, &run, 4 * l, &mut None)?;
        }
        let h = self.final_ln.apply(backend, &h, run.eps)?;
        let rows: Vec<usize> = (0..batch)
            .map(|b| b * seq + self.eos_position(&ids[b * seq..(b + 1) * seq]))
            .collect();
        let pooled = backend.gather_rows(&h, &rows)?;
        let embeds = backend.linear(&pooled, &self.projection, None)?;
        Ok(TextOutput {
            pooled: backend.download(&pooled)?,
            embeds: backend.download(&embeds)?,
        })
    }

    /// Where transformers pools: the first end-of-text token (legacy configs with
    /// `eos_token_id` 2: the largest id, as the original CLIP vocabulary puts it last).
    fn eos_position(&self, ids: &[u32]) -> usize {
        if self.config.eos_token_id == 2 {
            // torch's argmax returns the first maximum.
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&id| id == max).unwrap_or(0)
        } else {
            ids.iter()
                .position(|&id| id == self.config.eos_token_id)
                .unwrap_or(0)
        }
    }
}
