//! What a merge reports: the models it ran, the layers it solved and how, its phases' times,
//! the files and bytes it wrote, and its memory.

use std::time::Duration;

use super::activations::CacheStats;
use super::solve::SolveOutcome;
use crate::config::{MergeMethod, Schedule};
use crate::io::Arch;

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
