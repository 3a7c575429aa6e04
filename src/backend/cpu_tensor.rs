//! The CPU engine's tensor (a row-major f32 matrix in host memory) and its shape check, shared
//! by the backend's kernel files.

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "CpuTensor data length");
        CpuTensor { rows, cols, data }
    }
}

/// `Ok` when `cond` holds, else a backend error saying `what`.
pub(super) fn check(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Backend(what()))
    }
}
