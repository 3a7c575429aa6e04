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
    zeros_into(Vec::with_capacity(n), n)
}

/// `v` (empty, with room for `n`) filled with `n` zeros written one by one.
fn zeros_into(mut v: Vec<f32>, n: usize) -> Vec<f32> {
    // Keeps the compiler from folding the allocation and the fill into one zeroed allocation.
    std::hint::black_box(v.as_mut_ptr());
    v.resize(n, 0.0f32);
    v
}

/// [`written_zeros`] backed by small pages, for a running sum that a merge adds to once per
/// model: huge pages save such a buffer few TLB misses, and their first touch costs more.
/// On a VM whose host backs guest memory lazily, zeroing a fresh huge page ran at 0.5 GB/s
/// against 2 GB/s for small pages (`gpt2-7-small`'s 560 MB of sums took 1.04 s to set up,
/// 0.30 s this way). Where the kernel does not know the advice, this is `written_zeros`.
pub(crate) fn written_zeros_small_pages(n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE_PAGE: usize = 2 << 20;
        let ptr = v.as_mut_ptr() as usize;
        let start = ptr.next_multiple_of(HUGE_PAGE);
        let end = (ptr + n * std::mem::size_of::<f32>()) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside the block just allocated, which nothing has
            // touched yet; MADV_NOHUGEPAGE changes how its pages are backed, never their
            // contents. A failure only loses the advice.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    end - start,
                    libc::MADV_NOHUGEPAGE,
                )
            };
        }
    }
    zeros_into(v, n)
}

/// `Ok` when `cond` holds, else a backend error saying `what`.
pub(super) fn check(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Backend(what()))
    }
}
