//! What every schedule starts from, checked before any work: the base model and its
//! architecture, every task model and data or Gram file opened and matched against it, the
//! exclude patterns tried on the model's names, and the output location made usable.

use std::path::Path;

use super::options::MergeOptions;
use super::stats;
use crate::config::{ExcludeSet, MergeConfig};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::io::mapped::FileStamp;
use crate::io::OutputDir;
use crate::io::{Arch, Checkpoint, Dtype};
use crate::model::{ModelConfig, Site};
use crate::progress::{Event, Observer};

/// What every schedule starts from: the base model and its architecture, the solve's
/// options, and the output location, all checked (with every input) before any work.
pub(super) struct Prepared {
    pub base: Checkpoint,
    pub model_cfg: ModelConfig,
    pub sites: Vec<Site>,
    pub out_dtype: Dtype,
    pub exclude: ExcludeSet,
    pub ratio: f32,
    /// The multiplier of the Grams' diagonals, FusionBench's `(1 − r) + r` in f32.
    pub diag_mult: f32,
    pub out_dir: OutputDir,
}

pub(super) fn prepare(
    cfg: &MergeConfig,
    out: &Path,
    opts: &MergeOptions,
    observer: &dyn Observer,
    watched: &mut Vec<FileStamp>,
) -> Result<Prepared> {
    let params = &cfg.parameters;
    let base = Checkpoint::open(&cfg.base_model)?;
    watched.extend(base.stamps().cloned());
    let model_cfg = ModelConfig::from_checkpoint(&base)?;
    model_cfg.check_checkpoint(&base)?;
    let out_dtype = cfg
        .out_dtype()?
        .unwrap_or_else(|| base.dominant_float_dtype());
    let exclude = ExcludeSet::new(&params.exclude_param_names_regex).map_err(Error::invalid)?;
    let ratio = params.ratio_for(model_cfg.arch()) as f32;
    // FusionBench builds the multiplier as diag(1 − r) + r in f32; keep its rounding.
    let diag_mult = (1.0f32 - ratio) + ratio;
    let sites = model_cfg.sites();
    warn_unmatched_excludes(&exclude, params, &model_cfg, observer);
    // Fail before hours of work, not after: the output location must be usable, and every
    // input must open and fit.
    let out_dir = OutputDir::create(out, opts.force, &cfg.inputs())?;
    crate::profile::span("inputs: open and check all", || {
        check_inputs(
            cfg,
            &base,
            &model_cfg,
            &sites,
            cfg.merge_method.uses_grams(),
            watched,
        )
    })?;
    Ok(Prepared {
        base,
        model_cfg,
        sites,
        out_dtype,
        exclude,
        ratio,
        diag_mult,
        out_dir,
    })
}

/// Warns of every `exclude_param_names_regex` pattern that matches no parameter, naming a few
/// names the model has: a pattern written for other names (FusionBench users write the
/// `transformer.`-prefixed names of a classifier checkpoint) would otherwise exclude nothing,
/// silently.
fn warn_unmatched_excludes(
    exclude: &ExcludeSet,
    params: &crate::config::Parameters,
    model_cfg: &ModelConfig,
    observer: &dyn Observer,
) {
    let names: Vec<String> = model_cfg
        .expected_shapes()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    // The same parameters as other checkpoints spell them.
    let respelled: Vec<String> = names
        .iter()
        .map(|n| match model_cfg.arch() {
            Arch::Gpt2 => format!("transformer.{n}"),
            Arch::ClipVision => n.strip_prefix("vision_model.").unwrap_or(n).to_string(),
            Arch::CausalLm(_) => n.strip_prefix("model.").unwrap_or(n).to_string(),
        })
        .collect();
    let examples: Vec<String> = names
        .iter()
        .step_by((names.len() / 4).max(1))
        .take(4)
        .map(|n| format!("`{n}`"))
        .collect();
    for i in exclude.unmatched(&names) {
        let pattern = &params.exclude_param_names_regex[i];
        let why = if exclude.unmatched(&respelled).contains(&i) {
            String::new()
        } else {
            match model_cfg.arch() {
                Arch::Gpt2 => " (it matches `transformer.`-prefixed names; the merged model's names have no prefix)".into(),
                Arch::ClipVision => " (it matches names without the `vision_model.` prefix; the merged model's names have it)".into(),
                Arch::CausalLm(_) => " (it matches names without the `model.` prefix; the merged model's names have it)".into(),
            }
        };
        observer.event(Event::Warning(format!(
            "exclude_param_names_regex `{pattern}` matches no parameter, so it excludes nothing{why}; the names are like {}",
            examples.join(", ")
        )));
    }
}

/// A task model must have the base model's architecture and sizes.
fn check_compatible(base: &Checkpoint, base_cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<()> {
    if ckpt.arch() != base.arch() {
        return Err(Error::file(
            ckpt.dir(),
            format!(
                "is a {} model but the base model {} is {}",
                ckpt.arch().title(),
                base.dir().display(),
                base.arch().title()
            ),
        ));
    }
    let cfg = ModelConfig::from_checkpoint(ckpt)?;
    if !cfg.same_shape(base_cfg) {
        return Err(Error::file(
            ckpt.dir().join("config.json"),
            format!(
                "architecture sizes differ from the base model {} ({})",
                base.dir().display(),
                cfg.differences(base_cfg)
            ),
        ));
    }
    base_cfg.check_checkpoint(ckpt)
}

/// Opens every task model and checks it against the base, opens every data set (text
/// tokenised) and checks every Gram file's header, in the config's order, before the first
/// forward pass: a wrong path or a malformed file in the last entry fails in seconds, not
/// after the other models have run. Nothing is kept: each is opened again at its turn, so
/// that memory does not grow with the number of models (a second parse of a few hundred
/// examples takes milliseconds). Adds the stamps of the files checked to `stamps`: the run
/// compares them before it commits its output, so that a file changed between this check and
/// its turn (or after it) is reported.
fn check_inputs(
    cfg: &MergeConfig,
    base: &Checkpoint,
    model_cfg: &ModelConfig,
    sites: &[Site],
    regmean: bool,
    stamps: &mut Vec<FileStamp>,
) -> Result<()> {
    let options = cfg.parameters.gram_options();
    for entry in &cfg.models {
        let ckpt = Checkpoint::open(&entry.model)?;
        stamps.extend(ckpt.stamps().cloned());
        check_compatible(base, model_cfg, &ckpt)?;
        let read = if regmean {
            entry.grams.as_ref().or(entry.data.as_ref())
        } else {
            None
        };
        // Stamped before it is read. An image folder has no stamp of its own: its images
        // are read once, at its turn.
        // (A missing one is reported by its reader, just below.)
        if let Some(stamp) = read
            .filter(|p| p.is_file())
            .and_then(|p| FileStamp::of(p).ok())
        {
            stamps.push(stamp);
        }
        match (&entry.grams, &entry.data) {
            _ if !regmean => {}
            (Some(path), _) => stats::check(path, model_cfg.arch(), &options, sites)?,
            (None, Some(path)) => drop(open_data(cfg, &ckpt, path)?),
            (None, None) => {}
        }
    }
    Ok(())
}

/// A task's data, text tokenised and images preprocessed with the task model's own files
/// (else the base's).
pub(super) fn open_data(cfg: &MergeConfig, ckpt: &Checkpoint, path: &Path) -> Result<Dataset> {
    Dataset::open_for_model(
        path,
        &[ckpt.dir(), &cfg.base_model],
        cfg.parameters.max_length,
    )
}
