//! config.json of the decoder LLMs (`LlamaForCausalLM`, `MistralForCausalLM`,
//! `Qwen2ForCausalLM`, `Qwen3ForCausalLM`) in both dialects: transformers 4.x keeps RoPE in
//! `rope_theta` + `rope_scaling`, 5.x in `rope_parameters` (theta inside). What the engine
//! does not implement is refused here, naming what it does.

use std::path::Path;

use super::{field_f32, field_usize};
use crate::error::{Error, Result};
pub use crate::io::arch::{DecoderFamily, SUPPORTED_DECODERS};

/// RoPE types the forward pass implements.
pub const SUPPORTED_ROPE: &str = "default, llama3";

/// Whether `dir` holds a decoder LLM (by its config.json's `model_type`; false when the
/// file cannot be read, which the run itself then reports).
pub fn is_decoder_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("model_type")?.as_str().map(str::to_string))
        .is_some_and(|t| DecoderFamily::from_model_type(&t).is_some())
}

/// `llama3` scaling of the inverse frequencies (Llama 3.1 / 3.2).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub llama3: Option<Llama3Scaling>,
}

impl RopeConfig {
    /// The inverse frequencies of a head of `head_dim`, as transformers computes them
    /// (θ^(−2i/hd), then the `llama3` rescaling by wavelength), rounded to f32 at the end.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let f = 1.0 / self.theta.powf((2 * i) as f64 / head_dim as f64);
                let f = match &self.llama3 {
                    None => f,
                    Some(s) => {
                        let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
                        let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / s.factor
                        } else {
                            let smooth = (s.original_max_position_embeddings / wavelen
                                - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * f / s.factor + smooth * f
                        }
                    }
                };
                f as f32
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    pub family: DecoderFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub rope: RopeConfig,
    /// q, k and v carry biases (Qwen2 always; `attention_bias` elsewhere).
    pub qkv_bias: bool,
    /// o_proj carries a bias (`attention_bias` in Llama and Qwen3).
    pub o_bias: bool,
    /// Qwen3's per-head RMSNorm of q and k before RoPE.
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
    /// The attention window when sliding-window attention is on; the forward pass is exact
    /// for sequences up to it (full causal attention), longer ones are refused.
    pub sliding_window: Option<usize>,
    pub pad_token_id: u32,
}

fn field_bool(v: &serde_json::Value, key: &str, default: bool, path: &Path) -> Result<bool> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(x) => x
            .as_bool()
            .ok_or_else(|| Error::file(path, format!("`{key}` must be true or false, found {x}"))),
    }
}

/// The first id of a field that may be an id or a list of ids (`eos_token_id`).
fn first_id(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v.get(key)? {
        serde_json::Value::Array(a) => a.first()?.as_u64(),
        x => x.as_u64(),
    }
}

fn rope_number(p: &serde_json::Value, key: &str, path: &Path) -> Result<f64> {
    p.get(key)
        .and_then(|x| x.as_f64())
        .filter(|x| x.is_finite() && *x > 0.0)
        .ok_or_else(|| {
            Error::file(
                path,
                format!("RoPE parameter `{key}` must be a positive number"),
            )
        })
}

/// RoPE from `rope_parameters` (5.x) or `rope_theta` + `rope_scaling` (4.x).
fn rope_from_json(v: &serde_json::Value, default_theta: f64, path: &Path) -> Result<RopeConfig> {
    let (params, theta) = match v.get("rope_parameters").filter(|p| !p.is_null()) {
        Some(p) => {
            if !p.is_object() {
                return Err(Error::file(path, "`rope_parameters` must be an object"));
            }
            (Some(p), rope_number(p, "rope_theta", path)?)
        }
        None => {
            let theta = match v.get("rope_theta").filter(|t| !t.is_null()) {
                Some(_) => rope_number(v, "rope_theta", path)?,
                None => default_theta,
            };
            (v.get("rope_scaling").filter(|s| !s.is_null()), theta)
        }
    };
    let kind = params
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let llama3 = match kind {
        "default" => None,
        "llama3" => {
            let p = params.expect("a type was read from it");
            Some(Llama3Scaling {
                factor: rope_number(p, "factor", path)?,
                low_freq_factor: rope_number(p, "low_freq_factor", path)?,
                high_freq_factor: rope_number(p, "high_freq_factor", path)?,
                original_max_position_embeddings: rope_number(
                    p,
                    "original_max_position_embeddings",
                    path,
                )?,
            })
        }
        other => {
            return Err(Error::file(
                path,
                format!("RoPE type `{other}` is not supported (supported: {SUPPORTED_ROPE})"),
            ))
        }
    };
    if let Some(s) = &llama3 {
        if s.high_freq_factor <= s.low_freq_factor {
            return Err(Error::file(
                path,
                "llama3 RoPE scaling needs high_freq_factor > low_freq_factor",
            ));
        }
    }
    Ok(RopeConfig { theta, llama3 })
}

impl LlamaConfig {
    /// Reads config.json; absent keys take the defaults of the family's transformers config
    /// class (`save_pretrained` omits values equal to them).
    pub fn from_json(v: &serde_json::Value, family: DecoderFamily, path: &Path) -> Result<Self> {
        use DecoderFamily::*;
        let (d_default, ffn_default, layers_default, heads_default, theta_default) = match family {
            Llama => (4096, 11008, 32, 32, 10_000.0),
            Mistral => (4096, 14336, 32, 32, 10_000.0),
            Qwen2 => (4096, 22016, 32, 32, 10_000.0),
            Qwen3 => (4096, 22016, 32, 32, 10_000.0),
        };
        super::require_activation(v, "hidden_act", "hidden_act", "silu", family.name(), path)?;
        if field_bool(v, "mlp_bias", false, path)? {
            return Err(Error::file(path, "`mlp_bias: true` is not supported"));
        }
        let hidden_size = field_usize(v, "hidden_size", d_default, path)?;
        let heads = field_usize(v, "num_attention_heads", heads_default, path)?;
        let kv_heads = field_usize(v, "num_key_value_heads", heads, path)?;
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(Error::file(
                path,
                format!(
                    "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
                ),
            ));
        }
        let head_dim = match v.get("head_dim") {
            None | Some(serde_json::Value::Null) if hidden_size % heads == 0 => hidden_size / heads,
            None | Some(serde_json::Value::Null) => {
                return Err(Error::file(
                    path,
                    format!("hidden_size {hidden_size} is not divisible by num_attention_heads {heads} and no head_dim is given"),
                ))
            }
            Some(_) => field_usize(v, "head_dim", 0, path)?,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::file(
                path,
                format!("head_dim {head_dim} must be even (RoPE rotates halves)"),
            ));
        }
        let attention_bias = field_bool(v, "attention_bias", false, path)?;
        let (qkv_bias, o_bias) = match family {
            Qwen2 => (true, false),
            Mistral => (false, false),
            Llama | Qwen3 => (attention_bias, attention_bias),
        };
        let max_position_embeddings = field_usize(
            v,
            "max_position_embeddings",
            if family == Mistral { 131072 } else { 2048 },
            path,
        )?;
        let sliding_window = match family {
            Mistral => true,
            Qwen2 | Qwen3 => field_bool(v, "use_sliding_window", false, path)?,
            Llama => false,
        }
        .then(|| field_usize(v, "sliding_window", 0, path))
        .transpose()?
        .filter(|&w| w > 0);
        let eos = first_id(v, "eos_token_id").unwrap_or(0);
        let pad = first_id(v, "pad_token_id").unwrap_or(eos);
        let vocab_size = field_usize(v, "vocab_size", 32000, path)?;
        Ok(LlamaConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: field_usize(v, "intermediate_size", ffn_default, path)?,
            num_hidden_layers: field_usize(v, "num_hidden_layers", layers_default, path)?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: field_f32(v, "rms_norm_eps", 1e-6, path)?,
            max_position_embeddings,
            rope: rope_from_json(v, theta_default, path)?,
            qkv_bias,
            o_bias,
            qk_norm: family == Qwen3,
            tie_word_embeddings: field_bool(v, "tie_word_embeddings", false, path)?,
            sliding_window,
            // A pad id beyond the vocabulary (some tokenizers add one) pads with 0: padded
            // positions are masked out and never counted.
            pad_token_id: if (pad as usize) < vocab_size {
                pad as u32
            } else {
                0
            },
        })
    }

    /// Checks token data against the model (ids within the vocabulary, lengths within
    /// the positions and any sliding window) and returns the padding rule.
    pub fn check_tokens(
        &self,
        path: &Path,
        sequences: &[Vec<u32>],
        max_length: usize,
        fusionbench_compat: bool,
    ) -> Result<crate::data::TextPadding> {
        let positions = self.max_position_embeddings;
        let limit = max_length.min(positions);
        if fusionbench_compat && max_length > positions {
            return Err(Error::invalid(format!(
                "max_length {max_length} exceeds the model's max_position_embeddings {positions}: lower parameters.max_length"
            )));
        }
        for (i, s) in sequences.iter().enumerate() {
            if let Some(id) = s.iter().find(|&&id| id as usize >= self.vocab_size) {
                return Err(Error::file(
                    path,
                    format!(
                        "example {}: token id {id} ≥ vocab_size {}",
                        i + 1,
                        self.vocab_size
                    ),
                ));
            }
            if s.len() > positions && max_length > positions {
                return Err(Error::file(
                    path,
                    format!("example {}: {} tokens exceed the model's max_position_embeddings {positions} (set parameters.max_length to truncate)", i + 1, s.len()),
                ));
            }
            if let Some(w) = self.sliding_window {
                let used = s.len().min(limit);
                if used > w {
                    return Err(Error::file(
                        path,
                        format!("example {}: {used} tokens exceed the sliding window of {w} tokens, which is not implemented (full causal attention is exact up to {w}): set parameters.max_length to at most {w}", i + 1),
                    ));
                }
            }
        }
        Ok(crate::data::TextPadding {
            pad_id: self.pad_token_id,
            max_length: limit,
            to_max_length: fusionbench_compat,
        })
    }

    /// Query, key and value widths of the fused q|k|v projection.
    pub fn qkv_widths(&self) -> (usize, usize) {
        (
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<LlamaConfig> {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let family = DecoderFamily::from_model_type(v["model_type"].as_str().unwrap()).unwrap();
        LlamaConfig::from_json(&v, family, Path::new("config.json"))
    }

    #[test]
    fn both_rope_dialects_read_the_same_llama3_scaling() {
        let v4 = r#"{"model_type":"llama","hidden_size":64,"num_attention_heads":4,
            "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let v5 = r#"{"model_type":"llama","hidden_size":64,"num_attention_heads":4,
            "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let (a, b) = (parse(v4).unwrap(), parse(v5).unwrap());
        assert_eq!(a.rope, b.rope);
        assert_eq!(a.rope.theta, 500000.0);
        assert!(a.rope.llama3.is_some());
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn other_rope_types_and_activations_are_refused_naming_what_is_supported() {
        for (json, want) in [
            (
                r#"{"model_type":"llama","rope_scaling":{"type":"yarn","factor":4.0}}"#,
                "RoPE type `yarn` is not supported (supported: default, llama3)",
            ),
            (
                r#"{"model_type":"qwen2","rope_parameters":{"rope_type":"dynamic","rope_theta":1e6}}"#,
                "RoPE type `dynamic` is not supported",
            ),
            (
                r#"{"model_type":"mistral","hidden_act":"gelu"}"#,
                "hidden_act `gelu` is not supported",
            ),
            (
                r#"{"model_type":"llama","num_attention_heads":6,"num_key_value_heads":4}"#,
                "not a multiple of num_key_value_heads",
            ),
        ] {
            let e = parse(json).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn family_rules_for_biases_norms_and_windows() {
        let q2 = parse(r#"{"model_type":"qwen2","use_sliding_window":false,"sliding_window":8}"#)
            .unwrap();
        assert!(q2.qkv_bias && !q2.o_bias && !q2.qk_norm && q2.sliding_window.is_none());
        let q3 = parse(r#"{"model_type":"qwen3","head_dim":128,"hidden_size":1024}"#).unwrap();
        assert!(q3.qk_norm && !q3.qkv_bias && q3.head_dim == 128);
        let m = parse(r#"{"model_type":"mistral","sliding_window":4096}"#).unwrap();
        assert_eq!(m.sliding_window, Some(4096));
        let l =
            parse(r#"{"model_type":"llama","attention_bias":true,"eos_token_id":[7,8]}"#).unwrap();
        assert!(l.qkv_bias && l.o_bias);
        assert_eq!(l.pad_token_id, 7);
    }

    #[test]
    fn llama3_inv_freq_keeps_high_scales_low_and_smooths_between() {
        let rope = RopeConfig {
            theta: 10000.0,
            llama3: Some(Llama3Scaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 100.0,
            }),
        };
        let f = rope.inv_freq(8);
        // Wavelengths 2π·{1, 10, 100, 1000}: below 25 kept, above 100 divided by 8, between
        // interpolated with smooth = (100/62.83 − 1)/3.
        assert_eq!(f[0], 1.0);
        let smooth = (100.0 / (2.0 * std::f64::consts::PI * 10.0) - 1.0) / 3.0;
        let want = (1.0 - smooth) * 0.1 / 8.0 + smooth * 0.1;
        assert!((f[1] as f64 - want).abs() < 1e-8);
        assert!((f[2] as f64 - 0.01 / 8.0).abs() < 1e-9);
        assert!((f[3] as f64 - 0.001 / 8.0).abs() < 1e-10);
    }
}
