//! `merge --plan` for decoder LLMs: the memory, FLOPs and bytes read of a merge, from the
//! shapes of config.json alone (no weights are opened), for both schedules: `model` (one
//! whole model at a time, on the CPU) and `layer` (one layer of one model at a time, each
//! task's activations cached between layers, on a GPU in its memory where they fit in half
//! of what is free; RegMean++ always runs so), on one GPU or on the CPU. Napkin math, stated with its assumptions; BENCHMARKS.md explains it.

use std::fmt::Write;
use std::path::Path;

use super::llama_config::{DecoderFamily, LlamaConfig};
use crate::config::{MergeConfig, Parameters};
use crate::error::{Error, Result};
use crate::io::Dtype;

/// The GPU the plan is checked against (an A100 / H100 80 GB).
pub const GPU_BYTES: f64 = 80e9;

/// What a merge is asked to do.
#[derive(Clone, Debug)]
pub struct Workload {
    pub models: usize,
    pub examples: usize,
    /// Tokens per example (max_length, within max_position_embeddings): an upper bound.
    pub tokens: usize,
    pub batch: usize,
    /// Bytes per stored weight (2 for bf16/f16 checkpoints).
    pub stored_bytes: usize,
    /// Where the numbers came from, for the report.
    pub assumed: bool,
}

/// Element counts of one architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct Shapes {
    pub params: u64,
    /// Linear weights of one decoder layer, and of the untied head.
    pub layer_linear: u64,
    pub head_linear: u64,
    /// Σ dim² over a layer's four Gram sites, and the head's.
    pub layer_gram: u64,
    pub head_gram: u64,
    /// Σ in²·out over a layer's linear modules (the G'W products), and the head's.
    pub layer_gw: u64,
    pub head_gw: u64,
    /// Σ in³ over a layer's sites (Cholesky), and the head's.
    pub layer_cube: u64,
    pub head_cube: u64,
    /// The widest activation a token has in a layer (q|k|v, gate|up ...), summed.
    pub layer_activation: u64,
}

impl Shapes {
    pub fn of(c: &LlamaConfig) -> Self {
        let (d, f, v) = (
            c.hidden_size as u64,
            c.intermediate_size as u64,
            c.vocab_size as u64,
        );
        let (qw, kw) = c.qkv_widths();
        let (qw, kw) = (qw as u64, kw as u64);
        let mut params = v * d + d;
        let mut layer_linear = 0;
        let mut layer_gw = 0;
        for site in c.sites().iter().take(super::llama::SITES_PER_LAYER) {
            for m in &site.modules {
                let (i, o) = (m.in_dim as u64, m.out_dim as u64);
                layer_linear += i * o;
                layer_gw += i * i * o;
            }
        }
        let layer_params: u64 = c
            .expected_shapes()
            .iter()
            .filter(|(n, _)| n.starts_with("model.layers.0."))
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum();
        params += c.num_hidden_layers as u64 * layer_params;
        let untied = !c.tie_word_embeddings;
        if untied {
            params += v * d;
        }
        let cube = |x: u64| x * x * x;
        Shapes {
            params,
            layer_linear,
            head_linear: if untied { v * d } else { 0 },
            layer_gram: 2 * d * d + qw * qw + f * f,
            head_gram: if untied { d * d } else { 0 },
            layer_gw,
            head_gw: if untied { d * d * v } else { 0 },
            layer_cube: 2 * cube(d) + cube(qw) + cube(f),
            head_cube: if untied { cube(d) } else { 0 },
            layer_activation: 3 * d + qw + 2 * kw + 3 * f,
        }
    }
}

/// The plan's numbers (bytes and FLOPs as f64: they only feed a report).
#[derive(Clone, Debug)]
pub struct Plan {
    pub config: LlamaConfig,
    pub workload: Workload,
    pub shapes: Shapes,
    pub engine_host_bytes: f64,
    pub layerwise_device_bytes: f64,
    pub layerwise_host_bytes: f64,
    /// Of `layerwise_host_bytes`: every task's activations at a layer boundary.
    pub layerwise_cache_bytes: f64,
    pub bytes_read: f64,
    pub forward_flops: f64,
    pub gram_flops: f64,
    pub gw_flops: f64,
    pub solve_flops: f64,
}

impl Plan {
    pub fn new(config: LlamaConfig, workload: Workload) -> Self {
        let s = Shapes::of(&config);
        let w = &workload;
        let (k, n_layers) = (w.models as f64, config.num_hidden_layers as f64);
        let d = config.hidden_size as f64;
        let tokens_per_model = (w.examples * w.tokens) as f64;
        let batch_tokens = (w.batch * w.tokens) as f64;
        let linear = n_layers * s.layer_linear as f64 + s.head_linear as f64;
        let grams = n_layers * s.layer_gram as f64 + s.head_gram as f64;
        let other = s.params as f64 - linear;
        const F32: f64 = 4.0;
        // Now: a model's weights decoded to f32 twice over for its linear layers (the fused
        // forward copy and the decode kept for G'W), all of its Gram accumulators, the
        // running sums (Σ G', Σ G'W, Σ W, Σ of the rest) and one batch's activations, with
        // one T×T score block per thread in attention.
        let attention_scores = 16.0 * (w.tokens * w.tokens) as f64;
        let engine_host_bytes = F32
            * ((2.0 * linear + other)
                + grams
                + (grams + 2.0 * linear + other)
                + batch_tokens * s.layer_activation as f64
                + attention_scores);
        // Layer-wise: one layer of one model on the device (stored bytes and their f32
        // conversion), its Gram accumulators, the layer's sums and a micro-batch's
        // activations in 16 bits (flash-style attention: no T×T scores), plus an f64
        // Cholesky factor of the widest site; the head as a last step of its own.
        let layer_step = F32 * (s.layer_linear as f64 * 3.0 + s.layer_gram as f64 * 2.0)
            + w.stored_bytes as f64 * s.layer_linear as f64
            + 2.0 * batch_tokens * s.layer_activation as f64;
        let head_step = F32 * (s.head_linear as f64 * 3.0 + s.head_gram as f64 * 2.0)
            + w.stored_bytes as f64 * s.head_linear as f64
            + 2.0 * batch_tokens * d;
        let widest = config.hidden_size.max(config.intermediate_size) as f64;
        let layerwise_device_bytes = layer_step.max(head_step) + 8.0 * widest * widest;
        // Host: every task's activations at a layer boundary in f32 (each batch replaced in
        // place by the layer's output), and the averages of the non-linear parameters (the
        // embeddings).
        let layerwise_cache_bytes = F32 * k * tokens_per_model * d;
        let layerwise_host_bytes = layerwise_cache_bytes + F32 * other;
        let attention = n_layers * 2.0 * (config.num_attention_heads * config.head_dim) as f64;
        let forward_flops = k
            * (2.0 * n_layers * s.layer_linear as f64 * tokens_per_model
                + attention * (w.examples * w.tokens * w.tokens) as f64);
        Plan {
            engine_host_bytes,
            layerwise_device_bytes,
            layerwise_host_bytes,
            layerwise_cache_bytes,
            bytes_read: k * s.params as f64 * w.stored_bytes as f64,
            forward_flops,
            gram_flops: k * grams * tokens_per_model,
            gw_flops: k * 2.0 * (n_layers * s.layer_gw as f64 + s.head_gw as f64),
            solve_flops: (n_layers * s.layer_cube as f64 + s.head_cube as f64) / 3.0
                + 2.0 * (n_layers * s.layer_gw as f64 + s.head_gw as f64),
            shapes: s,
            config,
            workload,
        }
    }

    pub fn fits_one_gpu(&self) -> bool {
        self.layerwise_device_bytes <= GPU_BYTES
    }

    pub fn report(&self) -> String {
        let (c, w) = (&self.config, &self.workload);
        let gb = |b: f64| match b {
            b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
            b => format!("{:.1} MB", b / 1e6),
        };
        let tf = |f: f64| format!("{:.2} TFLOP", f / 1e12);
        let mut r = String::new();
        let _ = writeln!(
            r,
            "plan for {} ({} layers, d {}, ffn {}, {} heads / {} kv heads of {}, vocab {}, {} head): {} parameters",
            c.family.name(),
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.vocab_size,
            if c.tie_word_embeddings { "tied" } else { "untied" },
            thousands(self.shapes.params),
        );
        let _ = writeln!(
            r,
            "workload{}: {} models × {} examples × ≤ {} tokens, batch {}, weights stored in {} bytes",
            if w.assumed { " (assumed: no merge config)" } else { "" },
            w.models,
            w.examples,
            w.tokens,
            w.batch,
            w.stored_bytes
        );
        let _ = writeln!(
            r,
            "schedule model (one whole model at a time, CPU): host memory {}",
            gb(self.engine_host_bytes)
        );
        let _ = writeln!(
            r,
            "schedule layer (one layer at a time, activations cached between layers; RegMean++ always): on one GPU device memory {} and host memory {} (of which the activation caches, {}, stay on the GPU instead where they fit in half its free memory); on the CPU host memory {}",
            gb(self.layerwise_device_bytes),
            gb(self.layerwise_host_bytes),
            gb(self.layerwise_cache_bytes),
            gb(self.layerwise_device_bytes + self.layerwise_host_bytes)
        );
        let _ = writeln!(
            r,
            "FLOPs: forward {}, Grams {}, G'W {}, solve {}",
            tf(self.forward_flops),
            tf(self.gram_flops),
            tf(self.gw_flops),
            tf(self.solve_flops)
        );
        let _ = writeln!(
            r,
            "bytes read: {} (every model's weights once)",
            gb(self.bytes_read)
        );
        let _ = writeln!(
            r,
            "fits one {:.0} GB GPU: {}",
            GPU_BYTES / 1e9,
            if self.fits_one_gpu() { "yes" } else { "no" }
        );
        r
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn stored_bytes(config: &serde_json::Value) -> usize {
    let name = config
        .get("dtype")
        .or_else(|| config.get("torch_dtype"))
        .and_then(|d| d.as_str())
        .unwrap_or("float32");
    Dtype::parse_float(name)
        .and_then(|d| d.float_size())
        .unwrap_or(4)
}

fn read_model_config(path: &Path) -> Result<(LlamaConfig, serde_json::Value)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
    let family = v
        .get("model_type")
        .and_then(|t| t.as_str())
        .and_then(DecoderFamily::from_model_type)
        .ok_or_else(|| {
            Error::file(
                path,
                format!(
                    "merge --plan is for decoder LLMs ({}) for now",
                    super::llama_config::SUPPORTED_DECODERS
                ),
            )
        })?;
    Ok((LlamaConfig::from_json(&v, family, path)?, v))
}

/// The plan of a merge config (its base model's config.json and its parameters), or of a
/// model's config.json alone (with the default parameters and two models).
pub fn plan_for(path: &Path) -> Result<Plan> {
    let is_json = path.extension().and_then(|e| e.to_str()) == Some("json");
    let (config_path, params, models) = if is_json {
        (path.to_path_buf(), Parameters::default(), None)
    } else {
        let cfg = MergeConfig::load(path)?;
        let models = cfg.models.len();
        (
            cfg.base_model.join("config.json"),
            cfg.parameters,
            Some(models),
        )
    };
    let (config, raw) = read_model_config(&config_path)?;
    let workload = Workload {
        models: models.unwrap_or(2),
        examples: params.num_regmean_examples,
        tokens: params.max_length.min(config.max_position_embeddings),
        batch: params.batch_size,
        stored_bytes: stored_bytes(&raw),
        assumed: models.is_none(),
    };
    Ok(Plan::new(config, workload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_count_is_the_sum_of_the_expected_tensors() {
        for (tied, family) in [(false, "llama"), (true, "qwen2"), (false, "qwen3")] {
            let v = serde_json::json!({
                "model_type": family, "hidden_size": 64, "intermediate_size": 96,
                "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 24, "vocab_size": 50, "tie_word_embeddings": tied,
            });
            let fam = DecoderFamily::from_model_type(family).unwrap();
            let c = LlamaConfig::from_json(&v, fam, Path::new("config.json")).unwrap();
            let want: usize = c
                .expected_shapes()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
            assert_eq!(Shapes::of(&c).params, want as u64, "{family}");
        }
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(8_030_261_248), "8,030,261,248");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }
}
