//! What every launch and library call checks first: buffer lengths, C `int` arguments,
//! overflow-free sizes, allocation failures named by what they were for, and the launch
//! shape of the element-wise kernels.

use cudarc::driver::LaunchConfig;

use super::fault;
use crate::error::{Error, Result};

/// A failed allocation of `bytes` for `what`: out of memory says what it was for and its
/// size (the free memory is added by the conversion into [`Error`]).
pub(crate) fn oom(e: cudarc::driver::DriverError, what: &str, bytes: usize) -> Error {
    let mut gpu = fault::GpuError::from_driver(e.0);
    if gpu.kind == fault::GpuFailure::OutOfMemory {
        gpu.allocation = Some((what.to_string(), bytes as u64));
        gpu.into()
    } else {
        e.into()
    }
}

/// An error unless the device buffer `what` holds at least `need` elements: every unsafe
/// launch and library call checks its buffers with this first.
pub(crate) fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::invalid(format!(
            "{what}: device buffer of {have} values, {need} needed"
        )));
    }
    Ok(())
}

/// `n` as the C `int` of a kernel or library argument, or an error naming it.
pub(crate) fn c_int(what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::invalid(format!("{what} = {n} does not fit a C int")))
}

/// `a·b`, or an error when it overflows usize.
pub(crate) fn mul(what: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::invalid(format!("{what}: {a}·{b} overflows")))
}

/// Launch configuration of the grid-stride element-wise kernels in kernels/finalize.cu.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
