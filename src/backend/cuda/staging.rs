//! Host → device copies through a few reused page-locked buffers.
//!
//! A copy from pageable memory holds the calling thread for the whole transfer (the driver
//! stages it through its own buffers). Here the host fills a page-locked buffer, queues an
//! asynchronous copy out of it and goes on; the next fill of that buffer first waits for
//! the fence recorded right after its last copy. That fence is recorded here, on every
//! use: cudarc records a page-locked buffer's own event only when the context runs more
//! than one stream, and a buffer rewritten before its copy ran once merged wrongly
//! (BENCHMARKS.md, the withdrawn third GPU run). The ring logic is written against
//! (BENCHMARKS.md, the withdrawn third GPU run). The ring itself is in `ring.rs`.

use cudarc::driver::{result, CudaEvent, CudaSlice, DevicePtrMut, PinnedHostSlice};
use rayon::prelude::*;

use super::device::CudaDevice;
use super::launch::{mul, oom};
use super::ring::{Plain, Ring, Staging, SLOTS, SLOT_BYTES};
use crate::error::Result;

/// Bytes `fill` is handed at a time, in parallel.
const PIECE_BYTES: usize = 1 << 20;

impl Staging for CudaDevice {
    type Buffer = PinnedHostSlice<u8>;
    type Fence = CudaEvent;

    fn new_slot(&self, bytes: usize) -> Result<(PinnedHostSlice<u8>, CudaEvent)> {
        let ctx = self.stream.context();
        // SAFETY: a buffer is only copied from after `fill` has written the bytes copied.
        let buffer = unsafe { ctx.alloc_pinned::<u8>(bytes) }?;
        Ok((buffer, ctx.new_event(None)?))
    }

    fn host_mut<'a>(&self, buffer: &'a mut PinnedHostSlice<u8>) -> Result<&'a mut [u8]> {
        Ok(buffer.as_mut_slice()?)
    }

    // The fences are recorded and waited for with the driver's own calls: cudarc's wrappers
    // first report (and clear) any error an earlier call left behind, and then neither
    // record nor wait.
    fn record(&self, fence: &CudaEvent) -> Result<()> {
        self.make_current()?;
        // SAFETY: a live event and stream of this device's context, current on this thread.
        Ok(unsafe { result::event::record(fence.cu_event(), self.stream.cu_stream()) }?)
    }

    fn wait(&self, fence: &CudaEvent) -> Result<()> {
        self.make_current()?;
        // SAFETY: a live event of this device's context, current on this thread.
        Ok(unsafe { result::event::synchronize(fence.cu_event()) }?)
    }

    fn wait_all(&self) -> Result<()> {
        self.make_current()?;
        // SAFETY: this device's live stream, its context current on this thread.
        Ok(unsafe { result::stream::synchronize(self.stream.cu_stream()) }?)
    }
}

impl CudaDevice {
    /// Makes this device's context current on the calling thread without first reporting
    /// errors cudarc recorded (unlike [`CudaDevice::bind`]).
    fn make_current(&self) -> Result<()> {
        // SAFETY: the context outlives this device (the stream holds it).
        Ok(unsafe { result::ctx::set_current(self.stream.context().cu_ctx()) }?)
    }
}

/// False when `REGMEAN_STAGING` is `0`, `off`, `false` or `no` (any case): every upload then
/// takes the pageable path, so one binary can measure the ring against plain copies, and
/// check that both merge alike.
fn staging_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("REGMEAN_STAGING").map_or(true, |v| {
            !matches!(
                v.to_ascii_lowercase().as_str(),
                "0" | "off" | "false" | "no"
            )
        })
    })
}

impl CudaDevice {
    /// `len` values of T, written by `fill(first, values)` (in parallel pieces: `first` is
    /// the index of `values[0]`), copied to a new device buffer through the page-locked
    /// ring: the thread goes on while the copy runs, and returns once the last piece is
    /// queued. Without page-locked memory (or with [`staging_enabled`] false), through a
    /// pageable copy. `fill` must write every value it is given: the buffers are reused,
    /// and what it leaves is an earlier upload's.
    pub fn upload_staged<T: Plain>(
        &self,
        len: usize,
        what: &str,
        fill: impl Fn(usize, &mut [T]) + Sync,
    ) -> Result<CudaSlice<T>> {
        let size = std::mem::size_of::<T>();
        let total = mul(what, len, size)?;
        // The raw copies below do not make the context current themselves (as_slice,
        // right before each, does too: rayon's fill may run on this thread in between).
        self.bind()?;
        if len == 0 {
            // SAFETY: no elements to write.
            return unsafe { self.uninit::<T>(len, what) };
        }
        let pageable = || -> Result<CudaSlice<T>> {
            let piece = PIECE_BYTES / size;
            let mut host = vec![T::default(); len];
            host.par_chunks_mut(piece)
                .enumerate()
                .for_each(|(i, v)| fill(i * piece, v));
            self.upload(&host, what)
        };
        if !staging_enabled() {
            return pageable();
        }
        // Busy (another thread's upload, or this thread's own from inside `fill`, which
        // rayon can run here while it waits): the pageable way rather than a deadlock.
        let mut ring = match self.staging.try_lock() {
            Ok(ring) => ring,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return pageable(),
        };
        // SAFETY: every element is written by the copies below before anything reads it.
        let mut dst = unsafe { self.uninit::<T>(len, what) }?;
        let ring = ring.get_or_insert_with(|| Ring::new(SLOT_BYTES, SLOTS));
        let fill_bytes = |offset: usize, chunk: &mut [u8]| {
            assert_eq!(chunk.as_ptr().align_offset(std::mem::align_of::<T>()), 0);
            // SAFETY: every chunk starts at the start of a page-locked buffer (page-aligned,
            // so aligned for T, as asserted) and holds whole elements (total is a multiple of
            // size_of::<T>(), every chunk but the last SLOT_BYTES, a multiple of 8); every
            // bit pattern is a T (Plain), and the view lives only while `chunk` is borrowed.
            let values = unsafe {
                std::slice::from_raw_parts_mut(chunk.as_mut_ptr().cast::<T>(), chunk.len() / size)
            };
            let first = offset / size;
            let piece = PIECE_BYTES / size;
            values
                .par_chunks_mut(piece)
                .enumerate()
                .for_each(|(i, v)| fill(first + i * piece, v));
        };
        let stream = self.stream.clone();
        let staged = ring.pass(self, total, fill_bytes, |buffer, n, offset| {
            let (ptr, _record) = dst.device_ptr_mut(&stream);
            let host = &buffer.as_slice()?[..n];
            // SAFETY: dst holds `total` bytes and offset + n ≤ total; the copy is queued on
            // dst's stream, after dst's allocation, and before any kernel that reads it; the
            // ring keeps `host` unwritten until the fence recorded after this copy has passed.
            unsafe { result::memcpy_htod_async(ptr + offset as u64, host, stream.cu_stream()) }
                .map_err(|e| oom(e, what, n))
        });
        match staged {
            Ok(()) => Ok(dst),
            // No page-locked memory to be had (a first buffer failed): the pageable way.
            Err(_) if !ring.has_buffers() => pageable(),
            Err(e) => Err(e),
        }
    }
}
