//! `regmean-gpu convert-config`: a FusionBench method YAML (`fusion_bench_config/method/
//! regmean/*.yaml`, `.../regmean_plusplus/*.yaml`) plus a model-pool YAML
//! (`fusion_bench_config/modelpool/...`) → our merge YAML, in FusionBench compat mode.
//!
//! Models keep their names as FusionBench writes them: hub ids (`openai/clip-vit-base-patch32`,
//! `tanganke/gpt2_rte`) stay hub ids (a bare `gpt2`, `gpt2-medium`, ... becomes its hub id
//! under `openai-community/`), anything else is a path. FusionBench's datasets are Hydra
//! references or Python loaders that this crate cannot read: each task's `data` and
//! `eval_data` point where the README's export snippets put them (under `data_dir`), and
//! that is said on stderr. Every key that has no counterpart here is named, one line each;
//! Hydra's own keys (`_recursive_`, `_model_loader`, ...) are machinery and skipped quietly.

use std::path::Path;

use serde_yaml::{Mapping, Value};

use crate::error::{Error, Result};

/// The converted config and a line per thing that was not mapped (or mapped by a guess).
#[derive(Clone, Debug, PartialEq)]
pub struct Converted {
    pub yaml: String,
    pub notes: Vec<String>,
}

/// The architecture a model pool holds, from its `_target_`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PoolKind {
    Clip,
    Gpt2,
    Other,
}

fn read_yaml(path: &Path) -> Result<Mapping> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_yaml::from_str::<Value>(&text) {
        Ok(Value::Mapping(m)) => Ok(m),
        Ok(_) => Err(Error::file(path, "is not a YAML mapping")),
        Err(e) => Err(Error::file(path, format!("not valid YAML: {e}"))),
    }
}

fn str_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// The method's `_target_` → our `merge_method`.
fn method_of(target: &str) -> Option<&'static str> {
    let class = target.rsplit('.').next().unwrap_or(target);
    match class {
        "RegMeanAlgorithmForCLIP" | "RegMeanAlgorithmForGPT2" | "RegMeanAlgorithm" => {
            Some("regmean")
        }
        "RegMeanAlgorithmForCLIPPlusPlus" | "RegMeanAlgorithmPlusPlus" => Some("regmean_plusplus"),
        "SimpleAverageAlgorithm" => Some("simple_average"),
        _ => None,
    }
}

/// A model name as FusionBench gives it → a model path of ours, noting a rewrite.
fn model_id(name: &str, notes: &mut Vec<String>) -> String {
    const GPT2_FAMILY: [&str; 5] = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"];
    if GPT2_FAMILY.contains(&name) {
        let id = format!("openai-community/{name}");
        notes.push(format!(
            "model `{name}` is written as its hub id `{id}` (hub ids here always name an organisation)"
        ));
        id
    } else {
        name.to_string()
    }
}

/// A pool entry: a string, or a mapping with `pretrained_model_name_or_path` (the loader's
/// `_target_` aside).
fn pool_model(key: &str, v: &Value, notes: &mut Vec<String>) -> Result<String> {
    let name = match v {
        Value::String(s) => s.clone(),
        Value::Mapping(m) => m
            .get("pretrained_model_name_or_path")
            .or_else(|| m.get("path"))
            .and_then(str_of)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "model pool: models.{key} names no `pretrained_model_name_or_path`"
                ))
            })?,
        _ => {
            return Err(Error::invalid(format!(
                "model pool: models.{key} is neither a model name nor a mapping"
            )))
        }
    };
    Ok(model_id(&name, notes))
}

/// Whether a key is Hydra's or OmegaConf's machinery rather than a setting.
fn hydra_key(k: &str) -> bool {
    k.starts_with('_') && k != "_target_" && k != "_pretrained_"
}

/// Converts `method` + `pool` (FusionBench YAML files) into our merge config; task data is
/// expected under `data_dir` (relative to the config written).
pub fn convert(method: &Path, pool: &Path, data_dir: &str) -> Result<Converted> {
    let m = read_yaml(method)?;
    let p = read_yaml(pool)?;
    let mut notes = Vec::new();
    let mut params = Mapping::new();

    let target = m.get("_target_").and_then(str_of).unwrap_or_default();
    let merge_method = method_of(&target).ok_or_else(|| {
        Error::file(
            method,
            format!("`_target_: {target}` is not a RegMean method this crate runs (RegMeanAlgorithmForCLIP, RegMeanAlgorithmForGPT2, RegMeanAlgorithmForCLIPPlusPlus)"),
        )
    })?;
    for (k, v) in &m {
        let Some(k) = k.as_str() else { continue };
        match k {
            "_target_" => {}
            "num_regmean_examples"
            | "reduce_non_diagonal_ratio"
            | "exclude_param_names_regex"
            | "batch_size" => {
                params.insert(k.into(), v.clone());
            }
            "dataloader_kwargs" => {
                for (dk, dv) in v.as_mapping().into_iter().flatten() {
                    match dk.as_str() {
                        Some("batch_size") => {
                            params.insert("batch_size".into(), dv.clone());
                        }
                        Some(other) => notes.push(format!(
                            "method: dataloader_kwargs.{other} is not mapped (data loading is this crate's own)"
                        )),
                        None => {}
                    }
                }
            }
            "weight_transpose" => notes.push(
                "method: weight_transpose is not needed (the layout follows from the architecture)"
                    .into(),
            ),
            k if hydra_key(k) => {}
            other => notes.push(format!("method: `{other}` is not mapped")),
        }
    }
    params.insert("fusionbench_compat".into(), Value::Bool(true));

    let pool_target = p.get("_target_").and_then(str_of).unwrap_or_default();
    let kind = if pool_target.contains("CLIPVision") {
        PoolKind::Clip
    } else if pool_target.contains("GPT2") {
        PoolKind::Gpt2
    } else {
        notes.push(format!(
            "model pool: `_target_: {pool_target}` is neither a CLIP vision nor a GPT-2 pool; models are converted as they are"
        ));
        PoolKind::Other
    };
    let models = p
        .get("models")
        .and_then(Value::as_mapping)
        .ok_or_else(|| Error::file(pool, "has no `models` mapping"))?;
    let mut base = None;
    let mut tasks = Vec::new();
    for (k, v) in models {
        let Some(k) = k.as_str() else { continue };
        let name = pool_model(k, v, &mut notes).map_err(|e| Error::file(pool, e.to_string()))?;
        if k == "_pretrained_" {
            base = Some(name);
        } else if !hydra_key(k) {
            tasks.push((k.to_string(), name));
        }
    }
    let base = base.ok_or_else(|| {
        Error::file(
            pool,
            "has no `models._pretrained_`: the base model is needed",
        )
    })?;
    if tasks.is_empty() {
        return Err(Error::file(
            pool,
            "lists no task models besides `_pretrained_`",
        ));
    }
    for (k, v) in &p {
        let Some(k) = k.as_str() else { continue };
        match k {
            "_target_" | "models" | "platform" => {}
            "defaults" | "train_datasets" | "test_datasets" | "val_datasets" => {}
            "processor" | "tokenizer" => {
                let named = match v {
                    Value::Mapping(m) => m.get("pretrained_model_name_or_path").and_then(str_of),
                    v => str_of(v),
                };
                let named = named.map(|n| model_id(&n, &mut Vec::new()));
                if named.as_deref() != Some(base.as_str()) {
                    notes.push(format!(
                        "model pool: {k} `{}` is not mapped: the base model's (or task model's) own files are used",
                        named.unwrap_or_default()
                    ));
                }
            }
            k if hydra_key(k) => {}
            other => notes.push(format!("model pool: `{other}` is not mapped")),
        }
    }
    notes.push(format!(
        "model pool: FusionBench's datasets are not read here: each task's data is expected in {}",
        match kind {
            PoolKind::Gpt2 => format!("{data_dir}/<task>.train.jsonl and {data_dir}/<task>.validation.jsonl (JSON Lines, see the README)"),
            _ => format!("{data_dir}/<task>/train and {data_dir}/<task>/test (image folders, see the README)"),
        }
    ));

    let entries: Vec<Value> = tasks
        .iter()
        .map(|(task, model)| {
            let folder = task.replace('-', "_");
            let (data, eval) = match kind {
                PoolKind::Gpt2 => (
                    format!("{data_dir}/{folder}.train.jsonl"),
                    format!("{data_dir}/{folder}.validation.jsonl"),
                ),
                _ => (
                    format!("{data_dir}/{folder}/train"),
                    format!("{data_dir}/{folder}/test"),
                ),
            };
            let mut e = Mapping::new();
            e.insert("model".into(), model.clone().into());
            e.insert("name".into(), task.clone().into());
            e.insert("data".into(), data.into());
            e.insert("eval_data".into(), eval.into());
            Value::Mapping(e)
        })
        .collect();
    let mut out = Mapping::new();
    out.insert("merge_method".into(), merge_method.into());
    out.insert("base_model".into(), base.into());
    out.insert("models".into(), Value::Sequence(entries));
    out.insert("parameters".into(), Value::Mapping(params));
    let body = serde_yaml::to_string(&Value::Mapping(out))
        .map_err(|e| Error::invalid(format!("writing the converted config: {e}")))?;
    let name = |f: &Path| {
        f.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let yaml = format!(
        "# Converted by regmean-gpu convert-config from FusionBench's {} and {}\n{body}",
        name(method),
        name(pool)
    );
    Ok(Converted { yaml, notes })
}
