//! One error type for the whole crate. Every variant that concerns a file names it, so
//! the CLI can print a single line a user can act on.

use std::path::{Path, PathBuf};

use crate::backend::cuda::fault::GpuError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file (checkpoint, data, Gram statistics, config) is malformed or inconsistent.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },

    /// An input was truncated or rewritten by another program while this run read it.
    #[error("{} changed while being read (another program truncated or rewrote it during this run): run again once it is complete", path.display())]
    InputChanged { path: PathBuf },

    /// The operating system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The merge configuration is invalid.
    #[error("config {}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    /// Inputs that are individually fine but do not fit together, or a bad argument.
    #[error("{0}")]
    Invalid(String),

    /// A numerical failure that has no fallback.
    #[error("{0}")]
    Numerical(String),

    /// A failure inside a compute backend.
    #[error("backend: {0}")]
    Backend(String),

    /// A GPU failure (out of memory, a device fault, any CUDA, cuBLAS or cuSOLVER status),
    /// classified in one place: `backend/cuda/fault.rs`.
    #[error("{0}")]
    Gpu(Box<GpuError>),

    /// The caller asked the run to stop (see `progress::Observer::stop_requested`); its
    /// partial output is removed like that of any failed run.
    #[error("interrupted: nothing was written")]
    Interrupted,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn config(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// The same error, with a path inside `from` named as the same path inside `to`: work
    /// done in a hidden temporary folder is reported at the output path the user gave.
    pub fn relocated(self, from: &Path, to: &Path) -> Self {
        let moved = |path: PathBuf| match path.strip_prefix(from) {
            Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
            Ok(rest) => to.join(rest),
            Err(_) => path,
        };
        match self {
            Error::File { path, msg } => Error::File {
                path: moved(path),
                msg,
            },
            Error::Io { path, source } => Error::Io {
                path: moved(path),
                source,
            },
            other => other,
        }
    }

    /// Names the step of the run a GPU failure happened in, and what lowers that step's
    /// memory (`fault::LOWER_*`), unless an inner step was named already. Other errors pass.
    pub fn during(mut self, step: impl AsRef<str>, lower_with: &str) -> Self {
        if let Error::Gpu(e) = &mut self {
            e.during(step.as_ref(), lower_with);
        }
        self
    }
}

/// Free and total memory of the current device, asked for only on the way to an
/// out-of-memory error, and only when the driver library is loaded (cudarc panics otherwise).
fn device_memory() -> Option<(u64, u64)> {
    if !crate::backend::cuda::fault::driver_loaded() {
        return None;
    }
    cudarc::driver::result::mem_get_info()
        .ok()
        .map(|(free, total)| (free as u64, total as u64))
}

impl From<GpuError> for Error {
    fn from(mut e: GpuError) -> Self {
        if e.kind == crate::backend::cuda::fault::GpuFailure::OutOfMemory && e.memory.is_none() {
            e.memory = device_memory();
        }
        Error::Gpu(Box::new(e))
    }
}

impl From<cudarc::driver::DriverError> for Error {
    fn from(e: cudarc::driver::DriverError) -> Self {
        let mut gpu = GpuError::from_driver(e.0);
        if crate::backend::cuda::fault::driver_loaded() {
            gpu.detail = e
                .error_string()
                .ok()
                .map(|s| s.to_string_lossy().into_owned());
        }
        gpu.into()
    }
}

impl From<cudarc::cublas::result::CublasError> for Error {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        GpuError::from_cublas(e.0).into()
    }
}

impl From<cudarc::cusolver::result::CusolverError> for Error {
    fn from(e: cudarc::cusolver::result::CusolverError) -> Self {
        GpuError::from_cusolver(e.0).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relocated_names_the_path_inside_the_other_folder() {
        let tmp = Path::new("out/.merged.partial-12");
        let e = Error::io(tmp.join("config.json"), std::io::Error::other("disk full"));
        let shown = e.relocated(tmp, Path::new("out/merged")).to_string();
        assert_eq!(shown, "out/merged/config.json: disk full");
        let e = Error::file("elsewhere/x", "bad").relocated(tmp, Path::new("out/merged"));
        assert_eq!(e.to_string(), "elsewhere/x: bad");
        let e = Error::file(tmp, "bad").relocated(tmp, Path::new("out/merged"));
        assert_eq!(e.to_string(), "out/merged: bad");
    }
}
