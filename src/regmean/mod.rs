//! RegMean: Gram accumulation (the merge's, and [`accumulator`] over a caller's own rows),
//! statistics files, the per-layer solve and the streaming merge.

pub mod accumulator;
pub mod activations;
mod card;
pub mod gram;
mod layerwise;
mod merge;
mod model_weights;
mod options;
mod output;
mod prefetch;
mod prepare;
pub mod report;
mod run;
mod running;
pub mod solve;
pub mod stats;
pub(crate) mod sums;

pub use gram::{compute_grams, BackendGrams, GramAccumulator, ModelGrams, SiteGram};
pub use options::MergeOptions;
pub use report::{describe, MergeReport, ModelReport, Timings};
pub use run::{merge, merge_on_device};
