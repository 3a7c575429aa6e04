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

/// `n` zeros written one by one, for accumulators. `vec![0.0; n]` asks the allocator for
/// zeroed memory, which a fresh block is without writing it; the accumulator's first update
/// then reads each page (mapping the shared zero page) before writing it, which costs a
/// second fault, a page copy and a TLB shoot-down across the worker threads per page.
pub(crate) fn written_zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // Keeps the compiler from folding the allocation and the fill into one zeroed allocation.
    std::hint::black_box(v.as_mut_ptr());
    v.resize(n, 0.0f32);
    v
}

/// `Ok` when `cond` holds, else a backend error saying `what`.
pub(super) fn check(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Backend(what()))
    }
}
