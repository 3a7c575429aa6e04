//! Compute backends. Models are written once against [`Backend`]; the CPU backend is the
//! f32 reference (and the oracle for the GPU one). Tensors are row-major 2-D matrices:
//! a batch of sequences is `[batch·seq, features]`. The merge's own arithmetic (running
//! sums, solve) is [`MergeArithmetic`], implemented by the same two backends; [`solve`] is
//! the f64 closed form and its fallback, [`sums`] the host-side sums the CPU keeps.

mod arith;
pub mod cpu;
mod cpu_arith;
mod cpu_decoder;
pub mod cpu_gemm;
mod cpu_math;
mod cpu_tensor;
pub mod cuda;
mod ops;
pub mod solve;
pub(crate) mod sums;

pub use arith::MergeArithmetic;
pub use cpu::{CpuBackend, CpuTensor};
pub use cpu_arith::{CpuModuleSums, CpuSiteSums};
pub(crate) use cpu_tensor::written_zeros_small_pages;
pub use cuda::fault::{LOWER_FORWARD, LOWER_SUMS};
pub use cuda::forward::{CudaBackend, CudaTensor};
pub use ops::{
    decoder_ops_unsupported, im2col, Activation, AttentionShape, Backend, GqaShape, GramUpdate,
    Precision,
};
