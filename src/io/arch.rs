//! The architectures a checkpoint can hold, as its config.json's `model_type` names them, and
//! the canonical backbone names of their stored tensors.

/// The decoder families, as their `model_type` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderFamily {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

/// What `--device` and error messages list.
pub const SUPPORTED_DECODERS: &str = "llama, mistral, qwen2, qwen3";

impl DecoderFamily {
    pub fn from_model_type(t: &str) -> Option<Self> {
        match t {
            "llama" => Some(DecoderFamily::Llama),
            "mistral" => Some(DecoderFamily::Mistral),
            "qwen2" => Some(DecoderFamily::Qwen2),
            "qwen3" => Some(DecoderFamily::Qwen3),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DecoderFamily::Llama => "llama",
            DecoderFamily::Mistral => "mistral",
            DecoderFamily::Qwen2 => "qwen2",
            DecoderFamily::Qwen3 => "qwen3",
        }
    }

    /// The family as users name it, for messages.
    pub fn title(self) -> &'static str {
        match self {
            DecoderFamily::Llama => "Llama",
            DecoderFamily::Mistral => "Mistral",
            DecoderFamily::Qwen2 => "Qwen2",
            DecoderFamily::Qwen3 => "Qwen3",
        }
    }

    /// The transformers class of a merged model.
    pub fn causal_lm_class(self) -> &'static str {
        match self {
            DecoderFamily::Llama => "LlamaForCausalLM",
            DecoderFamily::Mistral => "MistralForCausalLM",
            DecoderFamily::Qwen2 => "Qwen2ForCausalLM",
            DecoderFamily::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    ClipVision,
    /// A decoder LLM of the Llama family (`model.layers.N...` names).
    CausalLm(DecoderFamily),
}

impl Arch {
    /// The name recorded in files (Gram statistics, fingerprints, reports).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::ClipVision => "clip_vision",
            Arch::CausalLm(family) => family.name(),
        }
    }

    /// The architecture as users name it, for messages.
    pub fn title(self) -> &'static str {
        match self {
            Arch::Gpt2 => "GPT-2",
            Arch::ClipVision => "CLIP vision",
            Arch::CausalLm(family) => family.title(),
        }
    }

    /// The canonical backbone name of a stored tensor name, or None when the tensor is not
    /// part of the backbone (a classification head, a text tower).
    pub(crate) fn canonical(self, stored: &str) -> Option<String> {
        match self {
            Arch::Gpt2 => {
                let name = stored.strip_prefix("transformer.").unwrap_or(stored);
                ["wte.", "wpe.", "h.", "ln_f."]
                    .iter()
                    .any(|p| name.starts_with(p))
                    .then(|| name.to_string())
            }
            Arch::ClipVision => {
                if stored.starts_with("vision_model.") {
                    Some(stored.to_string())
                } else if [
                    "embeddings.",
                    "encoder.",
                    "pre_layrnorm.",
                    "post_layernorm.",
                ]
                .iter()
                .any(|p| stored.starts_with(p))
                {
                    Some(format!("vision_model.{stored}"))
                } else {
                    None
                }
            }
            // `LlamaForCausalLM` names; a bare `LlamaModel`'s keys get the `model.` prefix,
            // and other heads (`score`) are not backbone.
            Arch::CausalLm(_) => {
                if stored.starts_with("model.") || stored.starts_with("lm_head.") {
                    Some(stored.to_string())
                } else if ["embed_tokens.", "layers.", "norm."]
                    .iter()
                    .any(|p| stored.starts_with(p))
                {
                    Some(format!("model.{stored}"))
                } else {
                    None
                }
            }
        }
    }
}
