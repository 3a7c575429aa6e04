//! RegMean: Gram accumulation (the merge's, and [`accumulator`] over a caller's own rows),
//! statistics files, the per-layer solve and the streaming merge.

pub mod accumulator;
pub mod activations;
pub mod gram;
mod layerwise;
pub mod merge;
pub mod report;
mod run;
pub mod solve;
pub mod stats;
mod sums;

pub use gram::{compute_grams, GramAccumulator, ModelGrams, SiteGram};
pub use merge::{MergeOptions, MergeReport};
pub use run::{merge, merge_on_device};
