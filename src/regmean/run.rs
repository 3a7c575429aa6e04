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
use crate::backend::Backend;
use crate::config::{MergeConfig, Schedule};
use crate::error::Result;
use crate::io::mapped::FileStamp;
use crate::progress::Observer;

/// Merges the models of `cfg` into `out`.
pub fn merge<B: Backend>(
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

/// [`merge`], recording in `watched` the stamp of every input file as it is first opened;
/// all are checked again before the output is committed.
fn merge_watched<B: Backend>(
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
    match choose_schedule(cfg, &prepared, opts, observer)? {
        Schedule::Layer => merge_by_layer(prepared, backend, cfg, opts, observer, watched),
        _ => merge_by_model(backend, cfg, prepared, opts, observer, watched),
    }
    .map_err(|e| e.relocated(&staging, out))
}
