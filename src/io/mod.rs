//! Reading checkpoints and writing merged models: the first and last steps of the data flow.

pub mod checkpoint;
pub mod mapped;
pub mod pending;
pub mod safetensors;
pub mod writer;

pub use checkpoint::{Arch, Checkpoint};
pub use safetensors::{Dtype, SafetensorsFile};
