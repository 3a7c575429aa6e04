//! The CUDA side: device selection and probing, the embedded kernels (loaded lazily), and
//! the device pieces of RegMean — Gram accumulation on tensor cores ([`gram`]) and the
//! per-layer Cholesky solve with cuSOLVER ([`solve`]), and the model forward pass
//! ([`forward`]: the [`crate::backend::Backend`] on a GPU). The Gram and solve types are
//! also the library API for CUDA pipelines that own their activations.
//!
//! Everything here loads the CUDA libraries at run time (cudarc's dynamic loading): a binary
//! built anywhere runs everywhere, and touches libcuda only after [`probe`] found it.
//!
//! Files, from the bottom up: `fault` (errors as users read them), `launch` (argument
//! checks), `probe` (finding the GPU, `--device`), `ring` + `staging` (page-locked uploads),
//! `device` (one GPU), `convert` (element-wise device conversions), then `weights`, `gram`,
//! `solve`, `forward`, `decoder` (the decoder LLMs' operations of the forward pass) and
//! `arith` (the merge arithmetic of [`forward::CudaBackend`]).

mod arith;
mod convert;
mod decoder;
mod device;
pub mod fault;
pub mod forward;
pub mod gram;
mod launch;
mod probe;
mod ring;
pub mod solve;
mod staging;
pub mod weights;

pub use convert::any_nonfinite;
pub(crate) use convert::stored_to_f32;
pub use device::{select, CudaDevice};
pub(crate) use launch::{c_int, check_len, elementwise};
pub use probe::{kernels, kernels_embedded, probe, DeviceChoice, Probe};
pub use ring::{Plain, STAGED_AHEAD};
