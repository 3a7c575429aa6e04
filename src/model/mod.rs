//! Native forward passes, written once against the [`Backend`](crate::backend::Backend)
//! trait, with a hook at every linear layer's input ("site") where the Gram accumulator
//! observes the activations.
//!
//! From the bottom up: `site` (linear layers and their weights), `fields` (config.json),
//! `batch`, `params`, `hooks`, `block` (the pre-LN transformer block), the architectures
//! (`gpt2`, `clip`, `clip_text`, `llama`), and `any` (whichever a checkpoint holds).

mod any;
mod batch;
mod block;
pub mod clip;
pub mod clip_text;
mod fields;
pub mod gpt2;
mod hooks;
pub mod llama;
pub mod llama_config;
pub mod llama_plan;
mod params;
pub mod site;

pub use any::{Embeddings, Model, ModelConfig};
pub use batch::Batch;
pub use fields::MAX_CONFIG_SIZE;
pub(crate) use fields::{field_f32, field_usize, require_activation};
pub use hooks::{ForwardHooks, ForwardOutput, GramSink};
pub use params::{HostParams, ParamGroup, ParamSource};
pub use site::{fuse_in_out, linear_in_out, transpose, LinearModule, Site};
