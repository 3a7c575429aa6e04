//! A merge's report as JSON (phase times, rows per model, fallbacks, peak memory): what
//! `merge --report-json FILE` writes and what the Python package's `merge` returns.

use std::path::Path;
use std::time::Duration;

use super::merge::MergeReport;
use crate::error::{Error, Result};
use crate::io::{Inputs, StagedOutput};

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
        "activation_cache_bytes": r.activation_cache.map(|c| serde_json::json!({"in_memory": c.in_memory_bytes, "spilled": c.spilled_bytes})),
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
