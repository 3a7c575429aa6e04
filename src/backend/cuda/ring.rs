//! A ring of a few reused page-locked buffers for host → device copies: the host fills a
//! buffer, queues an asynchronous copy out of it and goes on; the next fill of that buffer
//! first waits for the fence recorded right after its last copy. Written against
//! [`Staging`] so that a CPU test can check it with copies that lag on purpose; the CUDA
//! device's side is in `staging.rs`.

use cudarc::driver::DeviceRepr;
use half::f16;

use crate::error::Result;

/// Bytes per buffer and buffers per ring: a base-size model's largest linear weight (9.4 MB
/// in f32) takes two, a CLIP pixel batch of 32 in fp16 (9.6 MB) two. Page-locked memory
/// cannot be swapped, so the ring stays small.
pub(crate) const SLOT_BYTES: usize = 8 << 20;
pub(crate) const SLOTS: usize = 4;
/// How many bytes the host can fill ahead of the copies the GPU has made.
pub const STAGED_AHEAD: usize = SLOT_BYTES * SLOTS;

/// What the ring needs from a device: page-locked buffers, each with a fence that says when
/// the copies queued out of it so far have run.
pub(crate) trait Staging {
    type Buffer;
    type Fence;
    fn new_slot(&self, bytes: usize) -> Result<(Self::Buffer, Self::Fence)>;
    fn host_mut<'a>(&self, buffer: &'a mut Self::Buffer) -> Result<&'a mut [u8]>;
    /// Marks everything queued so far (the copy just queued out of the buffer included).
    fn record(&self, fence: &Self::Fence) -> Result<()>;
    /// Returns once the work the fence marks has run (at once if it marks nothing).
    fn wait(&self, fence: &Self::Fence) -> Result<()>;
    /// Returns once everything queued has run: when a fence could not be recorded or
    /// waited for, no buffer may be reused or freed before this.
    fn wait_all(&self) -> Result<()>;
}

/// Up to [`SLOTS`] buffers of [`SLOT_BYTES`], made when first needed and used in turn.
pub(crate) struct Ring<S: Staging> {
    slots: Vec<(S::Buffer, S::Fence)>,
    next: usize,
    slot_bytes: usize,
    count: usize,
}

impl<S: Staging> Ring<S> {
    pub(crate) fn new(slot_bytes: usize, count: usize) -> Self {
        assert!(slot_bytes > 0 && slot_bytes.is_multiple_of(8) && count > 0);
        Ring {
            slots: Vec::new(),
            next: 0,
            slot_bytes,
            count,
        }
    }

    /// Passes `total` bytes through the ring, one buffer at a time: `fill(offset, chunk)`
    /// writes bytes `offset..offset + chunk.len()` into the start of a buffer, then
    /// `send(buffer, len, offset)` queues the asynchronous copy of its first `len` bytes to
    /// `offset`. Every chunk but the last is a whole buffer (a multiple of 8 bytes), so
    /// elements of up to 8 bytes never straddle two chunks.
    pub(crate) fn pass(
        &mut self,
        device: &S,
        total: usize,
        mut fill: impl FnMut(usize, &mut [u8]),
        mut send: impl FnMut(&S::Buffer, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let mut offset = 0;
        while offset < total {
            let len = self.slot_bytes.min(total - offset);
            if self.next == self.slots.len() {
                match device.new_slot(self.slot_bytes) {
                    Ok(slot) => self.slots.push(slot),
                    Err(e) if self.slots.is_empty() => return Err(e),
                    // Out of page-locked memory: the buffers made so far will do.
                    Err(_) => {
                        self.count = self.slots.len();
                        self.next = 0;
                    }
                }
            }
            let (buffer, fence) = &mut self.slots[self.next];
            // The copy that last read this buffer must have run before it is rewritten.
            if let Err(e) = device.wait(fence) {
                let _ = device.wait_all();
                return Err(e);
            }
            fill(offset, &mut device.host_mut(buffer)?[..len]);
            send(buffer, len, offset)?;
            if let Err(e) = device.record(fence) {
                // The fence still marks an older copy: let this one finish before anyone
                // can reuse the buffer.
                let _ = device.wait_all();
                return Err(e);
            }
            offset += len;
            self.next = (self.next + 1) % self.count;
        }
        Ok(())
    }

    /// Whether the ring has made a buffer yet (none: page-locked memory was not to be had).
    pub(crate) fn has_buffers(&self) -> bool {
        !self.slots.is_empty()
    }

    /// Waits for every copy queued out of the ring (before its buffers are freed): for each
    /// fence, and for everything queued if any wait fails.
    pub(crate) fn drain(&self, device: &S) -> Result<()> {
        let mut first_error = None;
        for (_, fence) in &self.slots {
            if let Err(e) = device.wait(fence) {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => {
                let _ = device.wait_all();
                Err(e)
            }
        }
    }
}

/// Element types whose every bit pattern is a value, so that a byte buffer can be filled
/// through a typed view of it.
///
/// # Safety
/// Implement only for types without padding or invalid bit patterns.
pub unsafe trait Plain: DeviceRepr + Copy + Default + Send + Sync {}
// SAFETY: integers and IEEE floats: no padding, every bit pattern a value.
unsafe impl Plain for u8 {}
// SAFETY: as above.
unsafe impl Plain for f32 {}
// SAFETY: as above.
unsafe impl Plain for f16 {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A device whose copies run only when a fence is waited for, reading the buffer
    /// through a pointer as a DMA engine would, as it is then: a buffer rewritten before
    /// its copy ran shows up as wrong bytes.
    #[derive(Default)]
    struct LaggingDevice {
        queued: RefCell<Vec<(*const u8, usize, usize)>>,
        ran: Cell<usize>,
        dst: RefCell<Vec<u8>>,
        /// Buffers it can make before page-locked memory runs out.
        slot_limit: Option<usize>,
        made: Cell<usize>,
    }

    impl LaggingDevice {
        fn run_until(&self, upto: usize) {
            while self.ran.get() < upto {
                let (src, len, offset) = self.queued.borrow()[self.ran.get()];
                // SAFETY: src points into a buffer of the ring, which outlives every call
                // of this in the tests, and len is within it (Ring::pass).
                let bytes = unsafe { std::slice::from_raw_parts(src, len) };
                self.dst.borrow_mut()[offset..offset + len].copy_from_slice(bytes);
                self.ran.set(self.ran.get() + 1);
            }
        }

        fn send(&self, buffer: &RawBuffer, len: usize, offset: usize) -> Result<()> {
            self.queued
                .borrow_mut()
                .push((buffer.ptr.cast_const(), len, offset));
            Ok(())
        }
    }

    /// Host memory that copies read through a pointer while the ring also writes it, as
    /// page-locked memory is: every access derives from the one raw pointer.
    struct RawBuffer {
        ptr: *mut u8,
        len: usize,
    }

    impl RawBuffer {
        fn new(len: usize) -> Self {
            let ptr = Box::into_raw(vec![0u8; len].into_boxed_slice()).cast::<u8>();
            RawBuffer { ptr, len }
        }
    }

    impl Drop for RawBuffer {
        fn drop(&mut self) {
            // SAFETY: ptr and len are those of the boxed slice made in `new`.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
        }
    }

    impl Staging for LaggingDevice {
        type Buffer = RawBuffer;
        type Fence = Cell<usize>;
        fn new_slot(&self, bytes: usize) -> Result<(RawBuffer, Cell<usize>)> {
            if self.slot_limit.is_some_and(|n| self.made.get() >= n) {
                return Err(crate::error::Error::Backend(
                    "out of page-locked memory".into(),
                ));
            }
            self.made.set(self.made.get() + 1);
            Ok((RawBuffer::new(bytes), Cell::new(0)))
        }
        fn host_mut<'a>(&self, buffer: &'a mut RawBuffer) -> Result<&'a mut [u8]> {
            // SAFETY: the buffer's own allocation; the lagging copies read it only inside
            // `wait`/`run_until`, never while this slice is in use.
            Ok(unsafe { std::slice::from_raw_parts_mut(buffer.ptr, buffer.len) })
        }
        fn record(&self, fence: &Cell<usize>) -> Result<()> {
            fence.set(self.queued.borrow().len());
            Ok(())
        }
        fn wait(&self, fence: &Cell<usize>) -> Result<()> {
            self.run_until(fence.get());
            Ok(())
        }
        fn wait_all(&self) -> Result<()> {
            self.run_until(self.queued.borrow().len());
            Ok(())
        }
    }

    /// The same device with fences that never wait.
    struct Forgetful(LaggingDevice);

    impl Staging for Forgetful {
        type Buffer = RawBuffer;
        type Fence = Cell<usize>;
        fn new_slot(&self, bytes: usize) -> Result<(RawBuffer, Cell<usize>)> {
            self.0.new_slot(bytes)
        }
        fn host_mut<'a>(&self, buffer: &'a mut RawBuffer) -> Result<&'a mut [u8]> {
            self.0.host_mut(buffer)
        }
        fn record(&self, fence: &Cell<usize>) -> Result<()> {
            self.0.record(fence)
        }
        fn wait(&self, _: &Cell<usize>) -> Result<()> {
            Ok(())
        }
        fn wait_all(&self) -> Result<()> {
            Ok(())
        }
    }

    fn source() -> Vec<u8> {
        (0..1000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Passes `source()` through a ring on `device`; the bytes the lagging copies left.
    fn pass_through<S: Staging<Buffer = RawBuffer>>(
        device: &S,
        lagging: &LaggingDevice,
        slot_bytes: usize,
        count: usize,
    ) -> (Vec<u8>, Vec<(usize, usize)>) {
        let source = source();
        *lagging.dst.borrow_mut() = vec![0; source.len()];
        let mut ring = Ring::new(slot_bytes, count);
        let mut filled = Vec::new();
        ring.pass(
            device,
            source.len(),
            |offset, chunk| {
                filled.push((offset, chunk.len()));
                chunk.copy_from_slice(&source[offset..offset + chunk.len()]);
            },
            |buffer, len, offset| lagging.send(buffer, len, offset),
        )
        .unwrap();
        assert!(ring.slots.len() <= count);
        // Whatever is still queued runs now, while the ring's buffers are alive.
        lagging.run_until(lagging.queued.borrow().len());
        let dst = lagging.dst.borrow().clone();
        (dst, filled)
    }

    #[test]
    fn a_buffer_is_rewritten_only_after_its_lagging_copy_has_run() {
        for (slot_bytes, count) in [(64, 2), (64, 1), (128, 3), (2048, 4)] {
            let device = LaggingDevice::default();
            let (dst, filled) = pass_through(&device, &device, slot_bytes, count);
            assert!(dst == source(), "slots of {slot_bytes} × {count}");
            assert_eq!(filled.len(), source().len().div_ceil(slot_bytes));
            assert!(filled.iter().all(|&(o, _)| o % 8 == 0));
        }
    }

    #[test]
    fn out_of_page_locked_memory_the_buffers_made_so_far_go_round() {
        let device = LaggingDevice {
            slot_limit: Some(2),
            ..LaggingDevice::default()
        };
        let (dst, filled) = pass_through(&device, &device, 64, 4);
        assert!(dst == source());
        assert_eq!(device.made.get(), 2);
        assert_eq!(filled.len(), source().len().div_ceil(64));
        let none = LaggingDevice {
            slot_limit: Some(0),
            ..LaggingDevice::default()
        };
        let mut ring = Ring::new(64, 4);
        let failed = ring.pass(&none, 100, |_, _| {}, |_, _, _| Ok(()));
        assert!(failed.is_err() && ring.slots.is_empty());
    }

    #[test]
    fn without_waiting_for_the_fence_the_copies_read_rewritten_buffers() {
        // The check above can fail: a ring that did not wait would be caught.
        let device = Forgetful(LaggingDevice::default());
        let (dst, _) = pass_through(&device, &device.0, 64, 2);
        assert!(dst != source());
    }
}
