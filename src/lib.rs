//! regmean-gpu: merge fine-tuned transformer checkpoints with RegMean (Jin et al., ICLR 2023).
//!
//! Data flows one way: [`io`] reads checkpoints → [`model`] runs the forward pass on a
//! [`backend`] → [`regmean`] accumulates Gram matrices, solves every linear layer and averages
//! the rest → [`io::writer`] writes a model directory that `transformers` loads. Beside the
//! merge, [`accumulator`] takes Grams of a caller's own activations (the Python package and
//! the C ABI use it), on the CPU or a GPU.
//!
//! ```no_run
//! use regmean_gpu::{backend::CpuBackend, config::MergeConfig, progress::Silent, regmean};
//! let cfg = MergeConfig::load("merge.yaml".as_ref())?;
//! let report = regmean::merge(&CpuBackend, &cfg, "merged".as_ref(), &Default::default(), &Silent)?;
//! println!("{} layers solved", report.layers_solved);
//! # Ok::<(), regmean_gpu::Error>(())
//! ```

pub mod accumulator;
pub mod backend;
pub mod compare;
pub mod config;
pub mod convert;
pub mod data;
pub mod demo;
pub mod device;
pub mod doctor;
pub mod error;
pub mod eval;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod model;
pub mod profile;
pub mod progress;
pub mod regmean;
pub(crate) mod simd;
pub mod ui;

pub use error::{Error, Result};

/// Peak resident memory of this process so far (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
