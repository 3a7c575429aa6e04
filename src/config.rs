//! The merge configuration: mergekit-style YAML with FusionBench's parameter names.

use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{Arch, Dtype, Inputs};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMethod {
    /// RegMean: the closed-form least-squares merge of every linear layer.
    Regmean,
    /// RegMean++ (FusionBench `regmean_plusplus`): layer by layer, each layer's Grams taken
    /// on the outputs of the layers merged before it.
    #[serde(alias = "regmean++")]
    RegmeanPlusplus,
    /// The plain mean of every parameter (FusionBench `simple_average`), for comparison.
    SimpleAverage,
}

impl MergeMethod {
    /// RegMean and RegMean++ solve the linear layers from Grams; the simple average does not.
    pub fn uses_grams(self) -> bool {
        self != MergeMethod::SimpleAverage
    }

    /// The method's name in messages and model cards.
    pub fn title(self) -> &'static str {
        match self {
            MergeMethod::Regmean => "RegMean",
            MergeMethod::RegmeanPlusplus => "RegMean++",
            MergeMethod::SimpleAverage => "simple average",
        }
    }
}

/// In which order a RegMean merge goes through the models and their layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// One model at a time, all its layers (memory flat in the number of models).
    Model,
    /// One layer at a time, over all models (memory of one layer's statistics plus every
    /// task's activations at that layer).
    Layer,
    /// `model` when its memory estimate fits under the cap, else `layer`.
    #[default]
    Auto,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub model: PathBuf,
    /// Task data: `.jsonl` token ids, or `.safetensors` with `pixel_values`.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// Precomputed Gram statistics (from `regmean-gpu grams`), in place of `data`.
    #[serde(default)]
    pub grams: Option<PathBuf>,
    /// A display name (defaults to the model directory's name).
    #[serde(default)]
    pub name: Option<String>,
    /// Held-out labelled data of the task for `merge --eval` / `eval --config`: JSON Lines
    /// with `label` (GPT-2), or an image folder with class sub-folders (CLIP).
    #[serde(default)]
    pub eval_data: Option<PathBuf>,
    /// CLIP: a YAML/JSON file with the task's `classes` and `templates` for its zero-shot
    /// head (default: the built-in FusionBench task named like `name` or the model directory).
    #[serde(default)]
    pub classes: Option<PathBuf>,
}

impl ModelEntry {
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.model.display().to_string())
        })
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Parameters {
    pub num_regmean_examples: usize,
    pub batch_size: usize,
    /// None: the architecture's FusionBench default (GPT-2 0.6, CLIP 0.95).
    pub reduce_non_diagonal_ratio: Option<f64>,
    pub exclude_param_names_regex: Vec<String>,
    pub fusionbench_compat: bool,
    pub max_length: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Activations on a GPU: float16 (default) or float32. The CPU always runs float32.
    pub precision: crate::backend::Precision,
    /// RegMean: `model` (one model at a time), `layer` (one layer at a time) or `auto`.
    /// RegMean++ always runs layer by layer.
    pub schedule: Schedule,
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            num_regmean_examples: 256,
            batch_size: 32,
            reduce_non_diagonal_ratio: None,
            exclude_param_names_regex: Vec::new(),
            fusionbench_compat: false,
            max_length: 512,
            seed: 0,
            shuffle: true,
            precision: crate::backend::Precision::Float16,
            schedule: Schedule::Auto,
        }
    }
}

impl Parameters {
    pub fn ratio_for(&self, arch: Arch) -> f64 {
        self.reduce_non_diagonal_ratio.unwrap_or(match arch {
            Arch::Gpt2 => 0.6,
            Arch::ClipVision => 0.95,
            // FusionBench has no decoder default: the RegMean paper's base setting.
            Arch::CausalLm(_) => 0.1,
        })
    }

    /// Which examples are drawn and how they are batched.
    pub fn sampling(&self) -> crate::data::Sampling {
        crate::data::Sampling {
            num_examples: self.num_regmean_examples,
            batch_size: self.batch_size,
            shuffle: self.shuffle,
            seed: self.seed,
            whole_batches: self.fusionbench_compat,
        }
    }

    /// The options that determine a model's Gram matrices (recorded in statistics files).
    pub fn gram_options(&self) -> GramOptions {
        GramOptions {
            fusionbench_compat: self.fusionbench_compat,
            num_regmean_examples: self.num_regmean_examples,
            batch_size: self.batch_size,
            max_length: self.max_length,
            seed: self.seed,
            shuffle: self.shuffle,
        }
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config(
                path,
                "parameters.batch_size must be at least 1",
            ));
        }
        if self.num_regmean_examples == 0 {
            return Err(Error::config(
                path,
                "parameters.num_regmean_examples must be at least 1",
            ));
        }
        if self.max_length == 0 {
            return Err(Error::config(
                path,
                "parameters.max_length must be at least 1",
            ));
        }
        if let Some(r) = self.reduce_non_diagonal_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(Error::config(
                    path,
                    format!("parameters.reduce_non_diagonal_ratio must lie in [0, 1], found {r}"),
                ));
            }
        }
        ExcludeSet::new(&self.exclude_param_names_regex).map_err(|m| Error::config(path, m))?;
        Ok(())
    }
}

/// The options a Gram matrix depends on.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct GramOptions {
    pub fusionbench_compat: bool,
    pub num_regmean_examples: usize,
    pub batch_size: usize,
    pub max_length: usize,
    pub seed: u64,
    pub shuffle: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeConfig {
    pub merge_method: MergeMethod,
    pub base_model: PathBuf,
    pub models: Vec<ModelEntry>,
    #[serde(default)]
    pub parameters: Parameters,
    /// float32, float16 or bfloat16; default: the base model's dtype.
    #[serde(default)]
    pub out_dtype: Option<String>,
    /// The file this config was read from (its paths are relative to it).
    #[serde(skip)]
    pub path: PathBuf,
    /// The models given as hub ids, resolved to snapshots of the Hugging Face cache.
    #[serde(skip)]
    pub hub_models: Vec<HubModel>,
}

/// A `base_model` or `model` given as a hub id (`org/name[@revision]`).
#[derive(Clone, Debug, PartialEq)]
pub struct HubModel {
    /// As written in the config.
    pub id: String,
    /// What it resolved to (the model directory, and the cache folder its files live in).
    pub resolved: crate::io::hub::Resolved,
}

impl MergeConfig {
    /// Reads and validates a config; relative paths are taken relative to the config file.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let hint = ["merge.yaml", "merge.yml"]
                .iter()
                .map(|f| path.join(f))
                .find(|p| p.is_file())
                .map(|p| format!(" (did you mean {}?)", p.display()))
                .unwrap_or_default();
            return Err(Error::file(
                path,
                format!("is a folder, not a merge config: give the YAML file{hint}"),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text that was read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        Self::parse_resolving(text, path, crate::io::hub::resolve)
    }

    /// [`MergeConfig::parse`] that never downloads a hub id (the fuzzers' entry point).
    pub fn parse_offline(text: &str, path: &Path) -> Result<Self> {
        Self::parse_resolving(text, path, crate::io::hub::resolve_cached)
    }

    fn parse_resolving(
        text: &str,
        path: &Path,
        hub: fn(&crate::io::hub::HubId) -> std::result::Result<crate::io::hub::Resolved, String>,
    ) -> Result<Self> {
        let mut cfg: MergeConfig =
            serde_yaml::from_str(text).map_err(|e| Error::config(path, yaml_message(text, &e)))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &Path| {
            // Drop `.` components so messages show `pool/task_a`, not `pool/./task_a`.
            let joined = if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            };
            joined
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .collect::<PathBuf>()
        };
        // A model may be a hub id; a local directory of the same name wins, as in
        // transformers (here: relative to the config, like every path of it).
        let mut hub_models = Vec::new();
        let mut resolve_model = |p: &Path, key: &str| -> Result<PathBuf> {
            let local = resolve(p);
            let id = (!local.exists() && p.is_relative())
                .then(|| p.to_str().and_then(crate::io::hub::HubId::parse))
                .flatten();
            let Some(id) = id else { return Ok(local) };
            let resolved = hub(&id).map_err(|e| Error::config(path, format!("{key}: {e}")))?;
            let snapshot = resolved.snapshot.clone();
            hub_models.push(HubModel {
                id: p.display().to_string(),
                resolved,
            });
            Ok(snapshot)
        };
        cfg.base_model = resolve_model(&cfg.base_model.clone(), "base_model")?;
        for (i, m) in cfg.models.iter_mut().enumerate() {
            let written = m.model.clone();
            m.model = resolve_model(&written, &format!("models[{i}].model"))?;
            if m.name.is_none() && m.model != resolve(&written) {
                // A snapshot folder is named by its commit: show the repository's name.
                m.name = written
                    .to_str()
                    .and_then(crate::io::hub::HubId::parse)
                    .and_then(|id| id.repo.split_once('/').map(|(_, n)| n.to_string()));
            }

            m.data = m.data.as_deref().map(resolve);
            m.grams = m.grams.as_deref().map(resolve);
            m.eval_data = m.eval_data.as_deref().map(resolve);
            m.classes = m.classes.as_deref().map(resolve);
        }
        cfg.path = path.to_path_buf();
        cfg.hub_models = hub_models;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// A model directory's name for the model card: its hub id when it was given as one,
    /// else its folder's name.
    pub fn model_name(&self, model: &Path) -> String {
        let hub = self
            .hub_models
            .iter()
            .find(|h| h.resolved.snapshot == model);
        match hub {
            Some(h) => h.id.clone(),
            None => model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| model.display().to_string()),
        }
    }

    /// Everything a merge with this config reads, which no output may touch: the config
    /// itself, the base model, and each entry's model, data, Gram file, eval data and classes.
    pub fn inputs(&self) -> Inputs {
        let mut inputs = Inputs::new();
        if !self.path.as_os_str().is_empty() {
            inputs.add("the merge config", &self.path);
        }
        inputs.add("the base model", &self.base_model);
        // A snapshot's files are links into the repository's blobs: the whole cache folder
        // of the repository is an input.
        for h in &self.hub_models {
            inputs.add(
                format!("the Hugging Face cache of `{}`", h.id),
                &h.resolved.repo_dir,
            );
        }
        for (i, m) in self.models.iter().enumerate() {
            inputs.add(format!("the model of models[{i}]"), &m.model);
            let files = [
                ("data", &m.data),
                ("Gram file", &m.grams),
                ("eval data", &m.eval_data),
                ("classes file", &m.classes),
            ];
            for (what, path) in files {
                if let Some(p) = path {
                    inputs.add(format!("the {what} of models[{i}]"), p);
                }
            }
        }
        inputs
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.models.is_empty() {
            return Err(Error::config(
                path,
                "`models` is empty: list at least one task model",
            ));
        }
        self.parameters.validate(path)?;
        self.out_dtype()?;
        if self.merge_method.uses_grams() {
            for (i, m) in self.models.iter().enumerate() {
                match (&m.data, &m.grams) {
                    (Some(_), Some(_)) => return Err(Error::config(path, format!("models[{i}] gives both `data` and `grams`: keep one"))),
                    (None, None) => return Err(Error::config(path, format!("models[{i}] needs `data` (task examples) or `grams` (a Gram statistics file)"))),
                    _ => {}
                }
            }
        }
        let layer_wise = match (self.merge_method, self.parameters.schedule) {
            (MergeMethod::RegmeanPlusplus, Schedule::Model) => {
                return Err(Error::config(path, "regmean_plusplus always runs layer by layer: remove `schedule: model`"))
            }
            (MergeMethod::RegmeanPlusplus, _) => Some("regmean_plusplus takes each layer's Grams on the outputs of the layers merged before it"),
            (MergeMethod::Regmean, Schedule::Layer) => Some("schedule: layer runs the forward pass layer by layer"),
            _ => None,
        };
        if let Some(why) = layer_wise {
            if let Some(i) = self.models.iter().position(|m| m.grams.is_some()) {
                return Err(Error::config(path, format!("models[{i}] gives precomputed `grams`, which cannot serve here: {why}; give the task's `data` instead")));
            }
        }
        Ok(())
    }

    pub fn out_dtype(&self) -> Result<Option<Dtype>> {
        match &self.out_dtype {
            None => Ok(None),
            Some(s) => Dtype::parse_float(s).map(Some).ok_or_else(|| {
                Error::invalid(format!(
                    "out_dtype `{s}` is not one of float32, float16, bfloat16"
                ))
            }),
        }
    }
}

/// A YAML parse error in the terms of the config file: the line, and a key without its `:`
/// named as such (serde reports a plain string where a mapping was expected, in terms of the
/// Rust types it was filling).
fn yaml_message(text: &str, e: &serde_yaml::Error) -> String {
    let msg = e.to_string();
    let line = e.location().map(|l| l.line());
    if let Some((field, rest)) = msg.split_once("invalid type: string \"") {
        if let Some((value, _)) = rest.split_once("\", expected struct ") {
            // A plain scalar that runs over several lines is folded into one string: the line
            // it starts on is the one missing its `:`.
            let line = line.or_else(|| {
                text.lines()
                    .position(|l| {
                        let l = l.trim().trim_start_matches("- ").trim();
                        !l.is_empty() && value.starts_with(l)
                    })
                    .map(|i| i + 1)
            });
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            let place = field.trim_end_matches(": ");
            let place = if place.is_empty() {
                String::new()
            } else {
                format!(" (in `{place}`)")
            };
            let shown: String = value.chars().take(40).collect();
            return format!(
                "{at}`{shown}` is a plain value where `key: value` pairs are expected{place}: is a `:` missing after the key?"
            );
        }
    }
    // `key value` where `key: value` was meant, inside a mapping: the scanner names the line.
    if let Some((_, rest)) = msg.split_once("while scanning a simple key at line ") {
        let line: String = rest.chars().take_while(char::is_ascii_digit).collect();
        return format!("line {line}: a key without its `:` ({msg})");
    }
    let named = [
        (
            "struct MergeConfig",
            "the config's keys (merge_method, base_model, models, ...)",
        ),
        (
            "struct ModelEntry",
            "a model entry (`model: PATH` with `data:` or `grams:`)",
        ),
        ("struct Parameters", "the `parameters` keys"),
    ]
    .iter()
    .fold(msg, |m, (from, to)| m.replace(from, to));
    match line {
        Some(l) if !named.contains(" at line ") => format!("line {l}: {named}"),
        _ => named,
    }
}

/// `exclude_param_names_regex` with Python `re.match` semantics: a pattern matches when it
/// matches at the start of the name (not necessarily the whole name).
#[derive(Clone, Debug, Default)]
pub struct ExcludeSet {
    patterns: Vec<Regex>,
}

impl ExcludeSet {
    pub fn new(patterns: &[String]) -> std::result::Result<Self, String> {
        let patterns = patterns
            .iter()
            .map(|p| {
                Regex::new(&format!("^(?:{p})")).map_err(|e| {
                    format!(
                        "exclude_param_names_regex `{p}` is not a valid regular expression: {e}"
                    )
                })
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(ExcludeSet { patterns })
    }

    pub fn excludes(&self, name: &str) -> bool {
        self.patterns.iter().any(|r| r.is_match(name))
    }

    /// The indices of the patterns that match none of `names`.
    pub fn unmatched(&self, names: &[String]) -> Vec<usize> {
        (0..self.patterns.len())
            .filter(|&i| !names.iter().any(|n| self.patterns[i].is_match(n)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_follows_python_re_match() {
        let set = ExcludeSet::new(&["h\\.1\\.".into(), ".*ln_".into()]).unwrap();
        assert!(set.excludes("h.1.mlp.c_fc.weight"));
        assert!(!set.excludes("h.11.mlp.c_fc.weight"));
        assert!(!set.excludes("xh.1.mlp"), "anchored at the start");
        assert!(
            set.excludes("h.0.ln_1.weight"),
            "prefix match, not full match"
        );
        assert!(ExcludeSet::new(&["(".into()])
            .unwrap_err()
            .contains("not a valid regular expression"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.yaml");
        std::fs::write(
            &p,
            "merge_method: regmean\nbase_model: b\nmodels: []\nparamters: {}\n",
        )
        .unwrap();
        let e = MergeConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `paramters`"), "{e}");
        std::fs::write(&p, "merge_method: regmean\nbase_model: b\nmodels:\n - model: a\n   data: d.jsonl\nparameters: {num_regmean_exampels: 3}\n").unwrap();
        let e = MergeConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field `num_regmean_exampels`"), "{e}");
    }

    #[test]
    fn yaml_mistakes_are_told_in_yaml_terms_with_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.yaml");
        let err = |text: &str| {
            std::fs::write(&p, text).unwrap();
            MergeConfig::load(&p).unwrap_err().to_string()
        };
        let e = err("merge_method regmean\nbase_model: b\nmodels:\n  - model: a\n");
        assert!(
            e.contains("line 1:") && e.contains("is a `:` missing"),
            "{e}"
        );
        assert!(!e.contains("struct"), "{e}");
        let e = err("merge_method: regmean\nbase_model: b\nmodels:\n  - model a\n    data: x\n");
        assert!(
            e.contains("line 4") && e.contains("is a `:` missing"),
            "{e}"
        );
        assert!(e.contains("models[0]") && !e.contains("struct"), "{e}");
        let e = err("merge_method: regmean\nbase_model: b\nmodels:\n  - model: a\n    data x\n");
        assert!(e.contains("line 5: a key without its `:`"), "{e}");
        let e = err("- a\n- b\n");
        assert!(
            e.contains("the config's keys") && !e.contains("struct"),
            "{e}"
        );
        let e = MergeConfig::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a folder, not a merge config"), "{e}");
        assert!(!e.contains("did you mean"), "{e}");
        std::fs::write(dir.path().join("merge.yaml"), "x").unwrap();
        let e = MergeConfig::load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("did you mean") && e.contains("merge.yaml"),
            "{e}"
        );
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.yaml");
        std::fs::write(&p, "merge_method: regmean\nbase_model: ./b\nmodels:\n - model: a\n   grams: g.safetensors\n").unwrap();
        let c = MergeConfig::load(&p).unwrap();
        assert_eq!(c.base_model, dir.path().join("b"));
        assert_eq!(
            c.models[0].grams.as_deref(),
            Some(dir.path().join("g.safetensors").as_path())
        );
    }
}
