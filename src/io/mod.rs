//! Reading checkpoints and writing merged models: the first and last steps of the data flow.

pub mod arch;
pub mod checkpoint;
pub mod guard;
pub mod hub;
pub mod mapped;
pub mod output;
pub mod pending;
pub mod safetensors;
pub mod writer;

pub use arch::{Arch, DecoderFamily};
pub use checkpoint::Checkpoint;
pub use guard::Inputs;
pub use output::{OutputDir, StagedOutput};
pub use safetensors::{Dtype, SafetensorsFile};
