//! The files that describe a merged model: its config.json (the base's, with the output
//! dtype) and its model card (the config as run, and what the run actually used).

use std::path::Path;

use crate::backend::Precision;
use crate::config::MergeConfig;
use crate::io::{Arch, Checkpoint, Dtype};

/// config.json of the merged model: the base model's, as the backbone class
/// (`GPT2Model` / `CLIPVisionModel`, the vision config of a `CLIPModel`), dtype updated.
pub(super) fn output_config(base: &Checkpoint, torch_dtype: &str) -> serde_json::Value {
    let src = base.config();
    let mut c = match base.arch() {
        Arch::ClipVision if src.get("model_type").and_then(|m| m.as_str()) == Some("clip") => {
            let mut v = src
                .get("vision_config")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}));
            v["model_type"] = "clip_vision_model".into();
            if let Some(tv) = src.get("transformers_version") {
                v["transformers_version"] = tv.clone();
            }
            v
        }
        _ => src.clone(),
    };
    c["architectures"] = serde_json::json!([match base.arch() {
        Arch::Gpt2 => "GPT2Model",
        Arch::ClipVision => "CLIPVisionModel",
        Arch::CausalLm(family) => family.causal_lm_class(),
    }]);
    // transformers 5 writes `dtype`, 4.x `torch_dtype`: update the one the base model uses.
    if let Some(obj) = c.as_object_mut() {
        let key = if src.get("dtype").is_some() || obj.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(key.into(), torch_dtype.into());
    }
    c
}

/// What the model card records: the config as run, and what the run actually used.
pub(super) struct ModelCard<'a> {
    pub cfg: &'a MergeConfig,
    pub arch: Arch,
    /// The forward pass's precision; None when no forward pass ran (Grams from files, or a
    /// simple average).
    pub precision: Option<Precision>,
    pub out_dtype: &'a Dtype,
}

/// A path as the model card shows it: its last component (the card travels with the model;
/// the local folders it was merged from do not).
fn card_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

impl ModelCard<'_> {
    pub(super) fn render(&self) -> String {
        let cfg = self.cfg;
        let models: Vec<String> = cfg
            .models
            .iter()
            .map(|m| {
                let src = m
                    .data
                    .as_ref()
                    .map(|d| format!("data `{}`", card_name(d)))
                    .or_else(|| {
                        m.grams
                            .as_ref()
                            .map(|g| format!("grams `{}`", card_name(g)))
                    });
                format!(
                    "- `{}` ({})",
                    cfg.model_name(&m.model),
                    src.unwrap_or_else(|| "no data".into())
                )
            })
            .collect();
        let mut params = serde_yaml::to_value(&cfg.parameters).unwrap_or_default();
        if let Some(map) = params.as_mapping_mut() {
            match self.precision {
                Some(p) => map.insert("precision".into(), p.name().into()),
                None => map.remove("precision"),
            };
            map.insert(
                "reduce_non_diagonal_ratio".into(),
                cfg.parameters.ratio_for(self.arch).into(),
            );
        }
        format!(
            "---\nlibrary_name: transformers\ntags:\n- merge\n- regmean\n---\n\n# Merged model\n\nMerged by regmean-gpu {version} with {method} from the base model `{base}` and:\n\n{models}\n\n## Parameters\n\n```yaml\n{params}out_dtype: {dtype}\n```\n",
            version = env!("CARGO_PKG_VERSION"),
            method = cfg.merge_method.title(),
            base = cfg.model_name(&cfg.base_model),
            models = models.join("\n"),
            params = serde_yaml::to_string(&params).unwrap_or_default(),
            dtype = self.out_dtype.torch_name(),
        )
    }
}
