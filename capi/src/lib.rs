//! The C ABI of regmean-gpu (`include/regmean_gpu.h`, generated from this file by cbindgen):
//! a Gram accumulator over a C, C++ or CUDA pipeline's own activations, on the CPU or on a
//! GPU on the caller's `CUstream`, and the per-layer RegMean solve from sums the caller
//! holds. It is a thin layer over `regmean_gpu::accumulator`, whose conventions
//! (row stride, mask, f32 accumulation, normalisation) it keeps.
//!
//! Every function returns a [`RegmeanStatus`]; [`regmean_error_message`] gives the message
//! of the last call on a handle (or, for a null handle, of the calling thread's last call
//! that had no valid handle: creation, the solve, an invalid handle). Null or invalid
//! arguments are errors, never undefined behaviour: handles are looked up in a table, so a
//! destroyed or made-up handle is refused; sizes are checked against the accumulator's
//! `dim`. Panics are caught at the boundary and reported as `REGMEAN_STATUS_INTERNAL`.
//! What cannot be checked is a pointer's extent: a buffer must hold what the call says.

// The exported functions take raw pointers from C, which has no `unsafe`: each one checks
// what can be checked (null, alignment, sizes) and documents what the caller promises.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use half::{bf16, f16};
use regmean_gpu::accumulator::{
    cuda_device_on_stream, solve, Accumulator, AccumulatorDevice, HostRows, RowType,
};
use regmean_gpu::backend::solve::SolveOutcome;
use regmean_gpu::Error;

/// What a call did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegmeanStatus {
    /// Success.
    Ok = 0,
    /// A null pointer, a size that does not fit, an unknown dtype, a finished accumulator.
    InvalidArgument = 1,
    /// A handle that was never created or was destroyed.
    InvalidHandle = 2,
    /// The rows made a non-finite Gram.
    Numerical = 3,
    /// A CUDA, cuBLAS or cuSOLVER failure.
    Gpu = 4,
    /// No usable GPU (driver, device, kernels or libraries missing).
    Unavailable = 5,
    /// A failure inside the library (a caught panic): a bug, please report it.
    Internal = 6,
}

/// Element type of the rows: 32-bit float.
pub const REGMEAN_DTYPE_F32: c_int = 0;
/// Element type of the rows: IEEE half precision.
pub const REGMEAN_DTYPE_F16: c_int = 1;
/// Element type of the rows: bfloat16.
pub const REGMEAN_DTYPE_BF16: c_int = 2;

/// `regmean_solve`'s outcome: solved by Cholesky.
pub const REGMEAN_SOLVE_CHOLESKY: c_int = 0;
/// `regmean_solve`'s outcome: damped towards the average weights (the reason is the
/// thread's message).
pub const REGMEAN_SOLVE_DAMPED: c_int = 1;
/// `regmean_solve`'s outcome: the plain average of the task weights (the reason is the
/// thread's message).
pub const REGMEAN_SOLVE_AVERAGE: c_int = 2;

/// An accumulator handle (opaque).
pub struct RegmeanGram {
    _opaque: [u8; 0],
}

/// A failed call: its status and message.
struct Failure(RegmeanStatus, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Invalid(_) | Error::File { .. } | Error::Config { .. } => {
                RegmeanStatus::InvalidArgument
            }
            Error::Numerical(_) => RegmeanStatus::Numerical,
            Error::Gpu(_) => RegmeanStatus::Gpu,
            _ => RegmeanStatus::Internal,
        };
        Failure(status, e.to_string())
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure(RegmeanStatus::InvalidArgument, msg.into())
}

/// One accumulator and the message of the last call on it.
struct Slot {
    /// None once finished.
    acc: Option<Accumulator>,
    dim: usize,
    message: CString,
}

/// Live handles by id. A handle given to C is its id as a pointer, never dereferenced.
struct Table {
    next: usize,
    slots: HashMap<usize, Arc<Mutex<Slot>>>,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| {
    Mutex::new(Table {
        next: 1,
        slots: HashMap::new(),
    })
});

fn table() -> std::sync::MutexGuard<'static, Table> {
    // The table only ever holds complete entries: a panic elsewhere leaves it usable.
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

thread_local! {
    /// The message of this thread's last call without a valid handle.
    static THREAD_MESSAGE: std::cell::RefCell<CString> = std::cell::RefCell::new(CString::default());
}

/// A message as a C string (an interior NUL, which no message has, becomes a space).
fn c_message(msg: &str) -> CString {
    CString::new(msg.replace('\0', " ")).unwrap_or_default()
}

fn set_thread_message(msg: &str) {
    THREAD_MESSAGE.with(|m| *m.borrow_mut() = c_message(msg));
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown".into());
    format!("internal error in regmean-gpu (please report it): {what}")
}

/// Runs a call that has no handle: its message goes to the thread.
fn without_handle(f: impl FnOnce() -> Result<Option<String>, Failure>) -> RegmeanStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(note)) => {
            set_thread_message(note.as_deref().unwrap_or(""));
            RegmeanStatus::Ok
        }
        Ok(Err(Failure(status, msg))) => {
            set_thread_message(&msg);
            status
        }
        Err(panic) => {
            set_thread_message(&panic_message(panic));
            RegmeanStatus::Internal
        }
    }
}

fn lookup(handle: *const RegmeanGram) -> Option<Arc<Mutex<Slot>>> {
    table().slots.get(&(handle as usize)).cloned()
}

/// Runs a call on a handle: its message goes to the handle (to the thread when the handle
/// is not a live one).
fn with_handle(
    handle: *const RegmeanGram,
    f: impl FnOnce(&mut Slot) -> Result<(), Failure>,
) -> RegmeanStatus {
    let Some(slot) = lookup(handle) else {
        set_thread_message(&format!(
            "{handle:p} is not a live accumulator handle (never created, or destroyed)"
        ));
        return RegmeanStatus::InvalidHandle;
    };
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut s)
    }));
    let (status, msg) = match outcome {
        Ok(Ok(())) => (RegmeanStatus::Ok, String::new()),
        Ok(Err(Failure(status, msg))) => (status, msg),
        Err(panic) => (RegmeanStatus::Internal, panic_message(panic)),
    };
    slot.lock().unwrap_or_else(PoisonError::into_inner).message = c_message(&msg);
    status
}

fn register(acc: Accumulator, out: *mut *mut RegmeanGram) -> Result<Option<String>, Failure> {
    let dim = acc.dim();
    let slot = Arc::new(Mutex::new(Slot {
        acc: Some(acc),
        dim,
        message: CString::default(),
    }));
    let mut t = table();
    let id = t.next;
    t.next += 1;
    t.slots.insert(id, slot);
    // SAFETY: `out` was checked to be non-null; the caller gives a writable pointer.
    unsafe { out.write(id as *mut RegmeanGram) };
    Ok(None)
}

fn check_out(out: *mut *mut RegmeanGram) -> Result<(), Failure> {
    if out.is_null() {
        return Err(invalid("`out` is null: pass the address of a RegmeanGram*"));
    }
    // SAFETY: non-null, and the caller gives a writable pointer: a failed creation leaves
    // NULL there.
    unsafe { out.write(std::ptr::null_mut()) };
    Ok(())
}

/// Creates an accumulator of the `dim`×`dim` Gram on the CPU. `fusionbench_compat` non-zero:
/// FusionBench's running mean over every row (masks are then refused); zero: Σ XᵀX over
/// the unmasked rows / their count. The handle is written to `*out` (NULL on failure).
#[no_mangle]
pub extern "C" fn regmean_gram_create_cpu(
    dim: usize,
    fusionbench_compat: c_int,
    out: *mut *mut RegmeanGram,
) -> RegmeanStatus {
    without_handle(|| {
        check_out(out)?;
        let acc = Accumulator::new(&AccumulatorDevice::Cpu, dim, fusionbench_compat != 0)?;
        register(acc, out)
    })
}

/// Creates an accumulator on CUDA device `device` whose work is queued on `stream` (a
/// `CUstream` / `cudaStream_t` of the device's primary context, the one the CUDA runtime
/// uses; NULL for the legacy default stream), which must outlive the handle. Unverified on
/// a GPU so far: it says so once on stderr. Without a usable GPU: `REGMEAN_STATUS_UNAVAILABLE`.
#[no_mangle]
pub extern "C" fn regmean_gram_create_cuda(
    device: c_int,
    stream: *mut c_void,
    dim: usize,
    fusionbench_compat: c_int,
    out: *mut *mut RegmeanGram,
) -> RegmeanStatus {
    without_handle(|| {
        check_out(out)?;
        let ordinal = usize::try_from(device)
            .map_err(|_| invalid(format!("device {device}: must be 0 or more")))?;
        if let Some(why) = regmean_gpu::backend::cuda::probe().unavailable_reason() {
            return Err(Failure(
                RegmeanStatus::Unavailable,
                format!("cannot use the GPU: {why}"),
            ));
        }
        // SAFETY: the stream's validity and lifetime are the caller's promise (above).
        let dev = unsafe { cuda_device_on_stream(ordinal, stream.cast()) }?;
        let acc = Accumulator::new(&AccumulatorDevice::Cuda(dev), dim, fusionbench_compat != 0)?;
        register(acc, out)
    })
}

/// Destroys an accumulator (NULL and unknown handles are ignored).
#[no_mangle]
pub extern "C" fn regmean_gram_destroy(gram: *mut RegmeanGram) {
    // Dropping frees device memory through cudarc, which records errors instead of
    // panicking; the guard is for anything else.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let slot = table().slots.remove(&(gram as usize));
        drop(slot);
    }));
}

fn row_type(dtype: c_int) -> Result<RowType, Failure> {
    match dtype {
        REGMEAN_DTYPE_F32 => Ok(RowType::F32),
        REGMEAN_DTYPE_F16 => Ok(RowType::F16),
        REGMEAN_DTYPE_BF16 => Ok(RowType::BF16),
        d => Err(invalid(format!(
            "dtype {d}: expected REGMEAN_DTYPE_F32 (0), REGMEAN_DTYPE_F16 (1) or REGMEAN_DTYPE_BF16 (2)"
        ))),
    }
}

fn active(slot: &mut Slot) -> Result<&mut Accumulator, Failure> {
    slot.acc
        .as_mut()
        .ok_or_else(|| invalid("the accumulator was already finished: create a new one"))
}

/// Elements a buffer of `rows` rows `row_stride` apart holds, checked to fit a slice of
/// `size`-byte elements.
fn extent(rows: usize, row_stride: usize, dim: usize, size: usize) -> Result<usize, Failure> {
    if row_stride < dim {
        return Err(invalid(format!(
            "row stride {row_stride} is smaller than dim {dim}"
        )));
    }
    let n = (rows - 1)
        .checked_mul(row_stride)
        .and_then(|n| n.checked_add(dim))
        .filter(|n| {
            n.checked_mul(size)
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(|| {
            invalid(format!(
                "{rows} rows of stride {row_stride}: the size overflows"
            ))
        })?;
    Ok(n)
}

/// # Safety
/// `ptr` is non-null, aligned for `T` and holds `n` values of `T` (the caller's promise).
unsafe fn host_slice<'a, T>(ptr: *const c_void, n: usize) -> &'a [T] {
    // SAFETY: as the function's contract says.
    unsafe { std::slice::from_raw_parts(ptr.cast::<T>(), n) }
}

/// A checked update's rows: their type and how many elements they span.
struct Rows {
    dtype: RowType,
    extent: usize,
}

/// The checks both updates share (handle, dtype, null, alignment, extent), then `add` with
/// the accumulator; no rows is a no-op.
fn update_call(
    gram: *mut RegmeanGram,
    rows: *const c_void,
    (dtype, n_rows, row_stride): (c_int, usize, usize),
    add: impl FnOnce(&mut Accumulator, Rows) -> Result<(), Failure>,
) -> RegmeanStatus {
    with_handle(gram, |slot| {
        let dim = slot.dim;
        let acc = active(slot)?;
        let dtype = row_type(dtype)?;
        if n_rows == 0 {
            return Ok(());
        }
        if rows.is_null() {
            return Err(invalid("`rows` is null"));
        }
        let size = match dtype {
            RowType::F32 => 4,
            RowType::F16 | RowType::BF16 => 2,
        };
        if !(rows as usize).is_multiple_of(size) {
            return Err(invalid(format!(
                "`rows` is not aligned for {} ({size} bytes)",
                dtype.name()
            )));
        }
        let extent = extent(n_rows, row_stride, dim, size)?;
        add(acc, Rows { dtype, extent })
    })
}

/// Adds `n_rows` rows in host memory: row r is the `dim` values at `rows + r·row_stride`
/// (elements of `dtype`); `mask` (NULL: every row) holds one byte per row, 0 to skip the
/// row (padding). The buffer must hold (n_rows − 1)·row_stride + dim elements. Works on a
/// CUDA accumulator too (the rows are copied to the device).
#[no_mangle]
pub extern "C" fn regmean_gram_update_host(
    gram: *mut RegmeanGram,
    rows: *const c_void,
    dtype: c_int,
    n_rows: usize,
    row_stride: usize,
    mask: *const u8,
) -> RegmeanStatus {
    update_call(gram, rows, (dtype, n_rows, row_stride), |acc, checked| {
        let n = checked.extent;
        // SAFETY (each slice): non-null and aligned (checked by update_call); the extent is
        // the caller's promise, documented above.
        let x = unsafe {
            match checked.dtype {
                RowType::F32 => HostRows::F32(host_slice::<f32>(rows, n)),
                RowType::F16 => HostRows::F16(host_slice::<f16>(rows, n)),
                RowType::BF16 => HostRows::BF16(host_slice::<bf16>(rows, n)),
            }
        };
        // SAFETY: `n_rows` bytes when non-null, the caller's promise.
        let mask = (!mask.is_null()).then(|| unsafe { host_slice::<u8>(mask.cast(), n_rows) });
        Ok(acc.update(x, n_rows, row_stride, mask)?)
    })
}

/// Adds `n_rows` rows in device memory (a CUDA accumulator only), queued on its stream
/// after the caller's work there: `rows` and `mask` (NULL: every row; one byte per row, 0 to
/// skip it) are device pointers of the accumulator's device, in the layout of
/// `regmean_gram_update_host`, and must stay valid until that work is done. A mask is read
/// back to count its rows, which waits for the stream.
#[no_mangle]
pub extern "C" fn regmean_gram_update_device(
    gram: *mut RegmeanGram,
    rows: *const c_void,
    dtype: c_int,
    n_rows: usize,
    row_stride: usize,
    mask: *const u8,
) -> RegmeanStatus {
    update_call(gram, rows, (dtype, n_rows, row_stride), |acc, checked| {
        if !acc.is_cuda() {
            return Err(invalid(
                "the accumulator is on the CPU: pass host rows to regmean_gram_update_host",
            ));
        }
        let mask = (!mask.is_null()).then_some(mask as u64);
        // SAFETY: the extent, context and lifetime of both buffers are the caller's
        // promise (documented above); the accumulator checks nothing is null.
        let dtype = checked.dtype;
        Ok(unsafe { acc.update_device(rows as u64, dtype, n_rows, row_stride, mask) }?)
    })
}

/// The rows counted so far (masked-out rows are not counted), into `*rows`.
#[no_mangle]
pub extern "C" fn regmean_gram_rows(gram: *const RegmeanGram, rows: *mut u64) -> RegmeanStatus {
    with_handle(gram, |slot| {
        if rows.is_null() {
            return Err(invalid("`rows` is null"));
        }
        let acc = active(slot)?;
        // SAFETY: non-null; the caller gives a writable u64.
        unsafe { rows.write(acc.rows()) };
        Ok(())
    })
}

/// Checks a finish's output size and takes the accumulator, which only then is finished:
/// a refused call leaves it usable.
fn take_for_finish(slot: &mut Slot, out_len: usize) -> Result<Accumulator, Failure> {
    let dim = slot.dim;
    let acc = active(slot)?;
    let need = dim * dim;
    if out_len != need {
        return Err(invalid(format!(
            "the output holds {out_len} values, the [{dim}, {dim}] Gram needs {need}"
        )));
    }
    if acc.rows() == 0 {
        return Err(invalid(
            "no rows were accumulated (every update was empty or masked out)",
        ));
    }
    Ok(slot.acc.take().expect("checked above"))
}

/// Writes the full, symmetric Gram (row-major `dim`×`dim` f32, `out_len` = dim²) into the
/// host buffer `out` and the rows it counted into `*rows` (may be NULL). The accumulator is
/// then finished (destroy it); a refused call (wrong size, no rows) leaves it usable.
#[no_mangle]
pub extern "C" fn regmean_gram_finish(
    gram: *mut RegmeanGram,
    out: *mut f32,
    out_len: usize,
    rows: *mut u64,
) -> RegmeanStatus {
    with_handle(gram, |slot| {
        if out.is_null() {
            return Err(invalid("`out` is null"));
        }
        if !(out as usize).is_multiple_of(4) {
            return Err(invalid("`out` is not aligned for float"));
        }
        let acc = take_for_finish(slot, out_len)?;
        let g = acc.finish()?;
        // SAFETY: non-null, aligned (checked), and `out_len` = dim² floats, the caller's
        // promise; the Gram has exactly dim² values.
        unsafe { std::ptr::copy_nonoverlapping(g.gram.as_ptr(), out, g.gram.len()) };
        if !rows.is_null() {
            // SAFETY: non-null; the caller gives a writable u64.
            unsafe { rows.write(g.rows) };
        }
        Ok(())
    })
}

/// `regmean_gram_finish` into the device buffer `out` (dim² f32 on the accumulator's
/// device), queued on its stream (a CUDA accumulator only).
#[no_mangle]
pub extern "C" fn regmean_gram_finish_device(
    gram: *mut RegmeanGram,
    out: *mut c_void,
    out_len: usize,
    rows: *mut u64,
) -> RegmeanStatus {
    with_handle(gram, |slot| {
        if out.is_null() {
            return Err(invalid("`out` is null"));
        }
        if !active(slot)?.is_cuda() {
            return Err(invalid(
                "the accumulator is on the CPU: its Gram is written by regmean_gram_finish",
            ));
        }
        let acc = take_for_finish(slot, out_len)?;
        // SAFETY: dim² f32 on the accumulator's device, the caller's promise (above).
        let counted = unsafe { acc.finish_into_device(out as u64) }?;
        if !rows.is_null() {
            // SAFETY: non-null; the caller gives a writable u64.
            unsafe { rows.write(counted) };
        }
        Ok(())
    })
}

/// One layer's RegMean closed form W = (Σ G'ᵢ)⁻¹ Σ G'ᵢWᵢ, in f64 by Cholesky, from sums the
/// caller holds (row-major f32): `gram_sum` Σ G'ᵢ `[d_in, d_in]` (symmetric), `gw_sum`
/// Σ G'ᵢWᵢ and `w_mean` the average weights (both `[d_in, d_out]`, weights as `[in, out]`).
/// Writes W (`[d_in, d_out]`) to `out` and how it was solved to `*outcome` (may be NULL):
/// `REGMEAN_SOLVE_CHOLESKY`, or a fallback (`_DAMPED`, `_AVERAGE`) whose reason is then
/// `regmean_error_message(NULL)`.
#[no_mangle]
pub extern "C" fn regmean_solve(
    gram_sum: *const f32,
    gw_sum: *const f32,
    w_mean: *const f32,
    d_in: usize,
    d_out: usize,
    out: *mut f32,
    outcome: *mut c_int,
) -> RegmeanStatus {
    without_handle(|| {
        let square = d_in.checked_mul(d_in);
        let rect = d_in.checked_mul(d_out);
        let (Some(square), Some(rect)) = (square, rect) else {
            return Err(invalid("d_in, d_out: the sizes overflow"));
        };
        if square.max(rect) > isize::MAX as usize / 4 {
            return Err(invalid("d_in, d_out: the sizes overflow"));
        }
        for (name, p) in [
            ("gram_sum", gram_sum),
            ("gw_sum", gw_sum),
            ("w_mean", w_mean),
            ("out", out.cast_const()),
        ] {
            if p.is_null() || !(p as usize).is_multiple_of(4) {
                return Err(invalid(format!(
                    "`{name}` is null or not aligned for float"
                )));
            }
        }
        // SAFETY: non-null and aligned (checked); the extents are the caller's promise.
        let (g, gw, w) = unsafe {
            (
                host_slice::<f32>(gram_sum.cast(), square),
                host_slice::<f32>(gw_sum.cast(), rect),
                host_slice::<f32>(w_mean.cast(), rect),
            )
        };
        let (x, how) = solve(g, gw, w, d_in, d_out)?;
        // SAFETY: `out` holds d_in·d_out floats (the caller's promise), x exactly that many.
        unsafe { std::ptr::copy_nonoverlapping(x.as_ptr(), out, x.len()) };
        let (code, note) = match how {
            SolveOutcome::Cholesky => (REGMEAN_SOLVE_CHOLESKY, None),
            SolveOutcome::Damped { epsilon, reason } => (
                REGMEAN_SOLVE_DAMPED,
                Some(format!(
                    "{reason}: damped towards the average, epsilon {epsilon:e}"
                )),
            ),
            SolveOutcome::Average { reason } => (
                REGMEAN_SOLVE_AVERAGE,
                Some(format!("{reason}: the average of the task weights")),
            ),
        };
        if !outcome.is_null() {
            // SAFETY: non-null; the caller gives a writable int.
            unsafe { outcome.write(code) };
        }
        Ok(note)
    })
}

/// The message of the last call on `gram` ("" when it succeeded), or with NULL (or a handle
/// that is not live) of the calling thread's last call without a valid handle. Valid until
/// the next call on the same handle (or thread), or the handle's destruction.
#[no_mangle]
pub extern "C" fn regmean_error_message(gram: *const RegmeanGram) -> *const c_char {
    let found = catch_unwind(AssertUnwindSafe(|| {
        lookup(gram).map(|slot| {
            // The CString's buffer stays where it is until the message is replaced.
            slot.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .message
                .as_ptr()
        })
    }));
    match found {
        Ok(Some(p)) => p,
        _ => THREAD_MESSAGE.with(|m| m.borrow().as_ptr()),
    }
}

/// The library's version, e.g. "0.1.0" (a static string).
#[no_mangle]
pub extern "C" fn regmean_gpu_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
