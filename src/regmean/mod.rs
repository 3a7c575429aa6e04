//! RegMean: the merge's Gram accumulation, statistics files, the per-layer solve and the
//! streaming merge (a caller's own rows are accumulated by [`crate::accumulator`]).

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
pub mod stats;

pub use gram::{compute_grams, BackendGrams, GramAccumulator, ModelGrams, SiteGram};
pub use options::MergeOptions;
pub use report::{describe, MergeReport, ModelReport, Timings};
pub use run::{merge, merge_on_device};
