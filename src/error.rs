//! One error type for the whole crate. Every variant that concerns a file names it, so
//! the CLI can print a single line a user can act on.

use std::path::{Path, PathBuf};

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

    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),

    #[error("cuBLAS: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),

    #[error("cuSOLVER: {0}")]
    Cusolver(#[from] cudarc::cusolver::result::CusolverError),

    #[error("out of GPU memory allocating {what} ({} MB): lower parameters.batch_size, or use --device cpu", bytes / 1_000_000)]
    OutOfMemory { what: String, bytes: usize },
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
}
