//! The merge's entry point: every input checked and the output staged (`merge::prepare`),
//! then the schedule chosen and run: one model at a time (`merge`) or one layer at a time
//! (`layerwise`). Every input file's stamp is taken as it is first opened and checked again
//! before the output is committed, so that an input changed under the run is what the user
//! is told.

use std::path::Path;

use super::layerwise::{choose_schedule, merge_by_layer};
use super::merge::merge_by_model;
use super::options::MergeOptions;
use super::prepare::prepare;
use super::report::MergeReport;
use crate::backend::MergeArithmetic;
use crate::config::{MergeConfig, Schedule};
use crate::error::Result;
use crate::io::mapped::FileStamp;
use crate::progress::{Event, Observer};

/// Merges the models of `cfg` into `out` on `backend` (forward passes, sums and solve).
pub fn merge<B: MergeArithmetic>(
    backend: &B,
    cfg: &MergeConfig,
    out: &Path,
    opts: &MergeOptions,
    observer: &dyn Observer,
) -> Result<MergeReport> {
    let mut watched = Vec::new();
    merge_watched(backend, cfg, out, opts, observer, &mut watched).map_err(|e| {
        // An input that changed under the run explains what failed after it (a model
        // truncated before its turn no longer parses): the change is what the user is told.
        watched
            .iter()
            .find_map(|stamp| stamp.check().err())
            .unwrap_or(e)
    })
}

/// A merge as the `merge` command and the Python package run it: on the backend the caller
/// chose for the device (`with_backend!`, in the config's precision), announced in a note;
/// returns the report and its JSON form, which is also written to `report_json` when given
/// (check that path with `report::check_report_path` before, to fail early).
pub fn merge_on_device<B: MergeArithmetic>(
    backend: &B,
    cfg: &MergeConfig,
    out: &Path,
    opts: &MergeOptions,
    report_json: Option<&Path>,
    observer: &dyn Observer,
) -> Result<(MergeReport, serde_json::Value)> {
    let models = cfg.models.len();
    observer.event(Event::Note(format!(
        "merging {models} model{} ({}) into {} on {}",
        if models == 1 { "" } else { "s" },
        cfg.merge_method.title(),
        out.display(),
        backend.name()
    )));
    let started = std::time::Instant::now();
    let report = merge(backend, cfg, out, opts, observer)?;
    let json = super::report::report_json(&report, started.elapsed());
    if let Some(path) = report_json {
        super::report::write_report_json(path, &cfg.inputs(), &json)?;
    }
    Ok((report, json))
}

/// [`merge`], recording in `watched` the stamp of every input file as it is first opened;
/// all are checked again before the output is committed.
fn merge_watched<B: MergeArithmetic>(
    backend: &B,
    cfg: &MergeConfig,
    out: &Path,
    opts: &MergeOptions,
    observer: &dyn Observer,
    watched: &mut Vec<FileStamp>,
) -> Result<MergeReport> {
    let prepared = prepare(cfg, out, opts, observer, watched)?;
    // Errors name the output path the user gave, not the hidden folder it is written in.
    let staging = prepared.out_dir.path().to_path_buf();
    match choose_schedule(backend, cfg, &prepared, opts, observer)? {
        Schedule::Layer => merge_by_layer(prepared, backend, cfg, opts, observer, watched),
        _ => merge_by_model(backend, cfg, prepared, opts, observer, watched),
    }
    .map_err(|e| e.relocated(&staging, out))
}
