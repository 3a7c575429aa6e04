//! What a merge reports: the models it ran, the layers it solved and how, its phases' times,
//! the files and bytes it wrote, and its memory; and that report as JSON (what `merge
//! --report-json FILE` writes and what the Python package's `merge` returns).

use std::path::Path;
use std::time::Duration;

use super::activations::CacheStats;
use crate::backend::solve::SolveOutcome;
use crate::config::{MergeMethod, Schedule};
use crate::error::{Error, Result};
use crate::io::{Arch, Inputs, StagedOutput};

#[derive(Clone, Debug)]
pub struct ModelReport {
    pub name: String,
    /// Examples run (0 when Grams came from a file).
    pub examples: usize,
    /// Rows of the first site's Gram (tokens or image tokens counted).
    pub rows: u64,
    pub from_grams_file: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Forward passes and Grams, model loading included.
    pub grams: Duration,
    /// Of which: reading task models' weights onto the backend.
    pub model_load: Duration,
    /// Of which: folding each model into the running sums (G', G'W, Σ W, means).
    pub sums: Duration,
    /// Until the last layer is solved. The output is written alongside, on another thread:
    /// this includes any wait for the writer (it takes at most a few solved layers ahead).
    pub solve: Duration,
    /// What the user waits for after the last layer is solved: the tensors the writer still
    /// has to write, the flush to disk, config.json and the other files, the rename.
    pub write: Duration,
    /// How long the writer spent writing tensors in all, alongside the solve and after it.
    pub writer_busy: Duration,
}

#[derive(Clone, Debug)]
pub struct MergeReport {
    pub arch: Arch,
    pub method: MergeMethod,
    pub models: Vec<ModelReport>,
    pub layers_solved: usize,
    /// Layers that needed the documented fallback, and how they were solved.
    pub fallbacks: Vec<(String, SolveOutcome)>,
    pub timings: Timings,
    pub files: Vec<String>,
    /// Bytes of tensors written.
    pub tensor_bytes: u64,
    /// The most device memory in use during the merge (GPU backends only).
    pub peak_device_bytes: Option<u64>,
    /// `model` or `layer`: the schedule the merge ran.
    pub schedule: Schedule,
    /// A layer-wise merge's activation caches: held in memory, and spilled to a file.
    pub activation_cache: Option<CacheStats>,
}

pub fn describe(outcome: &SolveOutcome) -> String {
    match outcome {
        SolveOutcome::Cholesky => "solved by Cholesky".into(),
        SolveOutcome::Damped { epsilon, reason } => {
            format!("{reason}; damped towards the average (λ = {epsilon:.0e}·mean diag)")
        }
        SolveOutcome::Average { reason } => format!("{reason}; used the simple average"),
    }
}

/// The report of a merge that took `total` in all.
pub fn report_json(r: &MergeReport, total: Duration) -> serde_json::Value {
    serde_json::json!({
        "arch": r.arch.name(),
        "method": r.method,
        "phases_s": {
            "forward_and_grams": r.timings.grams.as_secs_f64(),
            "of_which_model_load": r.timings.model_load.as_secs_f64(),
            "of_which_sums": r.timings.sums.as_secs_f64(),
            "solve": r.timings.solve.as_secs_f64(),
            "write": r.timings.write.as_secs_f64(),
            "writer_busy": r.timings.writer_busy.as_secs_f64(),
        },
        "tensor_bytes": r.tensor_bytes,
        "total_s": total.as_secs_f64(),
        "peak_rss_bytes": crate::peak_rss_bytes(),
        "peak_device_bytes": r.peak_device_bytes,
        "layers_solved": r.layers_solved,
        "schedule": format!("{:?}", r.schedule).to_lowercase(),
        "activation_cache_bytes": r.activation_cache.map(|c| serde_json::json!({"on_device": c.on_device_bytes, "in_memory": c.in_memory_bytes, "spilled": c.spilled_bytes})),
        "fallbacks": r.fallbacks.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "models": r.models.iter().map(|m| serde_json::json!({"name": m.name, "examples": m.examples, "rows": m.rows})).collect::<Vec<_>>(),
    })
}

/// A report file may replace an earlier report, never an input or another file: checked
/// before the merge, so that a bad path costs no merge.
pub fn check_report_path(path: &Path, inputs: &Inputs) -> Result<()> {
    inputs.check_output(path)?;
    if std::fs::symlink_metadata(path).is_ok() {
        let earlier = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        if !earlier.is_some_and(|v| v.is_object()) {
            return Err(Error::file(
                path,
                "--report-json: exists and is not an earlier JSON report; choose another path",
            ));
        }
    }
    Ok(())
}

/// Writes `json` to `path` (checked again, then staged like every output).
pub fn write_report_json(path: &Path, inputs: &Inputs, json: &serde_json::Value) -> Result<()> {
    check_report_path(path, inputs)?;
    let out = StagedOutput::create_file(path, true, inputs)?;
    std::fs::write(
        out.path(),
        serde_json::to_string_pretty(json).expect("json"),
    )
    .map_err(|e| Error::io(path, e))?;
    out.commit()
}
