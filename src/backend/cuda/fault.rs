//! GPU failures as the user reads them. Every error of the CUDA driver, cuBLAS and cuSOLVER
//! becomes a [`GpuError`] here, in one place, classified:
//! - out of memory (`CUDA_ERROR_OUT_OF_MEMORY`, `*_STATUS_ALLOC_FAILED`): the line says how
//!   much the step needed, what was free, and which option lowers the need;
//! - a fault that leaves the device unusable to this process (an illegal address, a failed
//!   launch, an uncorrectable ECC error, a device that fell off the bus): the line names the
//!   step that failed. The merge's ordinary error path then removes its partial output;
//! - anything else, by its status name.
//!
//! The step is added by the caller that knows it ([`crate::Error::during`]): a kernel fault is
//! reported by whichever later call synchronises, so only the phase of the run (the forward
//! pass of a model, the sums, the solve) names it truthfully.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::sys::CUresult;

/// Set once a probe found libcuda and kept it loaded: only then may the driver be asked
/// about an error (cudarc panics when the library is missing).
static DRIVER_LOADED: AtomicBool = AtomicBool::new(false);

/// Records that libcuda is loaded for the rest of the process (the probe calls this).
pub(crate) fn mark_driver_loaded() {
    DRIVER_LOADED.store(true, Ordering::Release);
}

/// Whether a probe already found libcuda loaded: the driver may then be asked about an
/// error (never waits for a probe under way, nor starts one).
pub(crate) fn driver_loaded() -> bool {
    DRIVER_LOADED.load(Ordering::Acquire)
}

/// What kind of failure a status is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuFailure {
    OutOfMemory,
    /// The context is lost: every later call on it fails too.
    DeviceFault,
    Other,
}

/// One GPU failure, with what is known of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuError {
    /// The status's name, e.g. `CUDA_ERROR_ILLEGAL_ADDRESS` or `CUBLAS_STATUS_ALLOC_FAILED`.
    pub code: String,
    pub kind: GpuFailure,
    /// The driver's own description, when it could be asked for one.
    pub detail: Option<String>,
    /// What the run was doing: "the forward pass of task_b".
    pub step: Option<String>,
    /// Out of memory: what the failed allocation was for, and its size in bytes.
    pub allocation: Option<(String, u64)>,
    /// Out of memory: free and total device memory, in bytes, right after the failure.
    pub memory: Option<(u64, u64)>,
    /// Out of memory: what lowers the step's need.
    pub lower_with: Option<String>,
}

/// What lowers the memory a forward pass needs: its activations scale with these.
pub const LOWER_FORWARD: &str = "lower parameters.batch_size (or parameters.max_length), set \
     parameters.precision: float16, or merge on the CPU with --device cpu";

/// What lowers the memory of the running sums and the solve: they scale with the model's
/// widths (d_in² per site, d_in·d_out per layer), not with the batch.
pub const LOWER_SUMS: &str = "the sums grow with the model's width, not with the batch: \
     free memory on the GPU (other processes), or merge on the CPU with --device cpu";

/// What helps when the GPU is short of memory before any work (its context, its handles).
pub const FREE_THE_GPU: &str =
    "free memory on the GPU (other processes), or run on the CPU with --device cpu";

impl GpuError {
    fn new(code: String, kind: GpuFailure) -> Self {
        GpuError {
            code,
            kind,
            detail: None,
            step: None,
            allocation: None,
            memory: None,
            lower_with: None,
        }
    }

    /// A CUDA driver status, classified.
    pub fn from_driver(status: CUresult) -> Self {
        use CUresult::*;
        let kind = match status {
            CUDA_ERROR_OUT_OF_MEMORY => GpuFailure::OutOfMemory,
            CUDA_ERROR_ILLEGAL_ADDRESS
            | CUDA_ERROR_LAUNCH_FAILED
            | CUDA_ERROR_LAUNCH_TIMEOUT
            | CUDA_ERROR_ASSERT
            | CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUDA_ERROR_MISALIGNED_ADDRESS
            | CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUDA_ERROR_INVALID_PC
            | CUDA_ERROR_ECC_UNCORRECTABLE
            | CUDA_ERROR_DEVICE_UNAVAILABLE
            | CUDA_ERROR_NO_DEVICE
            | CUDA_ERROR_CONTEXT_IS_DESTROYED
            | CUDA_ERROR_DEINITIALIZED => GpuFailure::DeviceFault,
            _ => GpuFailure::Other,
        };
        GpuError::new(format!("{status:?}"), kind)
    }

    /// A cuBLAS status, classified.
    pub fn from_cublas(status: cudarc::cublas::sys::cublasStatus_t) -> Self {
        use cudarc::cublas::sys::cublasStatus_t::*;
        Self::from_library(
            status,
            status == CUBLAS_STATUS_ALLOC_FAILED,
            status == CUBLAS_STATUS_EXECUTION_FAILED,
        )
    }

    /// A cuSOLVER status, classified.
    pub fn from_cusolver(status: cudarc::cusolver::sys::cusolverStatus_t) -> Self {
        use cudarc::cusolver::sys::cusolverStatus_t::*;
        Self::from_library(
            status,
            status == CUSOLVER_STATUS_ALLOC_FAILED,
            status == CUSOLVER_STATUS_EXECUTION_FAILED,
        )
    }

    /// A library's status: its allocation failed, a kernel of it failed, or something else.
    fn from_library(status: impl fmt::Debug, alloc_failed: bool, execution_failed: bool) -> Self {
        let kind = if alloc_failed {
            GpuFailure::OutOfMemory
        } else if execution_failed {
            GpuFailure::DeviceFault
        } else {
            GpuFailure::Other
        };
        GpuError::new(format!("{status:?}"), kind)
    }

    /// Names the step, and what lowers its memory, unless a step is named already (the
    /// innermost caller knows best).
    pub fn during(&mut self, step: &str, lower_with: &str) {
        if self.step.is_none() {
            self.step = Some(step.to_string());
            if self.lower_with.is_none() {
                self.lower_with = Some(lower_with.to_string());
            }
        }
    }

    /// What a device fault means, in a few words.
    fn meaning(&self) -> Option<&'static str> {
        Some(match self.code.as_str() {
            "CUDA_ERROR_ILLEGAL_ADDRESS" => "a kernel accessed memory outside its buffers",
            "CUDA_ERROR_LAUNCH_FAILED"
            | "CUBLAS_STATUS_EXECUTION_FAILED"
            | "CUSOLVER_STATUS_EXECUTION_FAILED" => "a kernel failed on the device",
            "CUDA_ERROR_ECC_UNCORRECTABLE" => "an uncorrectable memory error on the GPU",
            "CUDA_ERROR_DEVICE_UNAVAILABLE" | "CUDA_ERROR_NO_DEVICE" => "the GPU is gone",
            "CUDA_ERROR_LAUNCH_TIMEOUT" => "a kernel ran past the display watchdog",
            _ => return None,
        })
    }
}

fn mb(bytes: u64) -> String {
    if bytes >= 10_000_000_000 {
        format!("{:.1} GB", bytes as f64 / 1e9)
    } else {
        format!("{} MB", bytes.div_ceil(1_000_000))
    }
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = self.step.as_deref().map(|s| format!(" in {s}"));
        let step = step.as_deref().unwrap_or("");
        match self.kind {
            GpuFailure::OutOfMemory => {
                write!(f, "out of GPU memory{step}: ")?;
                match &self.allocation {
                    Some((what, bytes)) => write!(f, "{what} needed {} more", mb(*bytes))?,
                    None => write!(f, "{}", self.code)?,
                }
                if let Some((free, total)) = self.memory {
                    write!(f, ", and {} of the GPU's {} was free", mb(free), mb(total))?;
                }
                let lower = self.lower_with.as_deref().unwrap_or(LOWER_FORWARD);
                write!(f, ": {lower}")
            }
            GpuFailure::DeviceFault => {
                write!(f, "the GPU failed{step}: {}", self.code)?;
                if let Some(m) = self.meaning() {
                    write!(f, " ({m})")?;
                }
                write!(
                    f,
                    "; this process cannot use the GPU any more: run again, or on the CPU with --device cpu"
                )
            }
            GpuFailure::Other => {
                write!(f, "GPU error{step}: {}", self.code)?;
                match &self.detail {
                    Some(d) => write!(f, " ({d})"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The test hook behind the GPU fault tests: `REGMEAN_TEST_GPU_FAULT=KERNEL:MODEL` makes a
/// merge launch `fault_KERNEL` (kernels/fault.cu: `trap` or `write_through`) at the start of
/// task model MODEL's forward pass (0-based), and wait for it.
pub(crate) fn injected_fault(model: usize) -> Option<&'static str> {
    let spec = std::env::var("REGMEAN_TEST_GPU_FAULT").ok()?;
    let (kernel, at) = spec.split_once(':')?;
    if at.parse::<usize>().ok()? != model {
        return None;
    }
    match kernel {
        "trap" => Some("fault_trap"),
        "write_through" => Some("fault_write_through"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_says_what_was_needed_what_was_free_and_what_lowers_it() {
        let mut e = GpuError::from_driver(CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        e.allocation = Some(("linear output".into(), 402_653_184));
        e.memory = Some((120_000_000, 150_000_000_000));
        e.during("the forward pass of task_b", LOWER_FORWARD);
        // A second, outer step does not replace the inner one.
        e.during("the merge", LOWER_SUMS);
        assert_eq!(
            e.to_string(),
            "out of GPU memory in the forward pass of task_b: linear output needed 403 MB \
             more, and 120 MB of the GPU's 150.0 GB was free: lower parameters.batch_size \
             (or parameters.max_length), set parameters.precision: float16, or merge on the \
             CPU with --device cpu"
        );
        let mut sums = GpuError::from_cublas(CUBLAS_ALLOC_FAILED);
        assert_eq!(sums.kind, GpuFailure::OutOfMemory);
        sums.during("the solve of h.0.attn.c_attn.weight", LOWER_SUMS);
        let text = sums.to_string();
        assert!(
            text.starts_with(
                "out of GPU memory in the solve of h.0.attn.c_attn.weight: \
                 CUBLAS_STATUS_ALLOC_FAILED: the sums grow with the model's width"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_device_fault_names_the_failing_step_and_the_status() {
        for (status, meaning) in [
            (
                CUresult::CUDA_ERROR_ILLEGAL_ADDRESS,
                "a kernel accessed memory outside its buffers",
            ),
            (
                CUresult::CUDA_ERROR_LAUNCH_FAILED,
                "a kernel failed on the device",
            ),
            (CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE, "the GPU is gone"),
        ] {
            let mut e = GpuError::from_driver(status);
            assert_eq!(e.kind, GpuFailure::DeviceFault, "{status:?}");
            e.during("the forward pass of task_a", LOWER_FORWARD);
            assert_eq!(
                e.to_string(),
                format!(
                    "the GPU failed in the forward pass of task_a: {status:?} ({meaning}); \
                     this process cannot use the GPU any more: run again, or on the CPU with \
                     --device cpu"
                )
            );
        }
        let solver = GpuError::from_cusolver(
            cudarc::cusolver::sys::cusolverStatus_t::CUSOLVER_STATUS_EXECUTION_FAILED,
        );
        assert_eq!(solver.kind, GpuFailure::DeviceFault);
    }

    #[test]
    fn every_driver_error_becomes_a_classified_line_with_its_step() {
        // The conversion the `?` of every cudarc call goes through (no driver is asked
        // anything where none is loaded).
        let e: crate::Error =
            cudarc::driver::DriverError(CUresult::CUDA_ERROR_ILLEGAL_ADDRESS).into();
        let e = e.during("the forward pass of task_c", LOWER_FORWARD);
        assert!(
            e.to_string().starts_with(
                "the GPU failed in the forward pass of task_c: CUDA_ERROR_ILLEGAL_ADDRESS"
            ),
            "{e}"
        );
        let e: crate::Error = cudarc::cublas::result::CublasError(CUBLAS_ALLOC_FAILED).into();
        assert!(e
            .to_string()
            .starts_with("out of GPU memory: CUBLAS_STATUS_ALLOC_FAILED"));
        // Other errors pass `during` unchanged.
        let e = crate::Error::invalid("no").during("the solve", LOWER_SUMS);
        assert_eq!(e.to_string(), "no");
    }

    const CUBLAS_ALLOC_FAILED: cudarc::cublas::sys::cublasStatus_t =
        cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED;

    #[test]
    fn other_statuses_keep_their_name_and_the_drivers_words() {
        let mut e = GpuError::from_driver(CUresult::CUDA_ERROR_INVALID_VALUE);
        assert_eq!(e.kind, GpuFailure::Other);
        assert_eq!(e.to_string(), "GPU error: CUDA_ERROR_INVALID_VALUE");
        e.detail = Some("invalid argument".into());
        e.during("opening the GPU", LOWER_FORWARD);
        assert_eq!(
            e.to_string(),
            "GPU error in opening the GPU: CUDA_ERROR_INVALID_VALUE (invalid argument)"
        );
    }
}
