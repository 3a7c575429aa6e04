//! How the CLI's process allocates: freed memory kept for the next batch, and large blocks
//! backed by transparent huge pages.

/// glibc serves large blocks with fresh `mmap`s and returns them on free, so every
/// activation buffer of every batch was paid for again in page faults, page zeroing and,
/// with several threads, TLB shoot-downs: an eighth of a CPU merge's time went to the kernel.
/// Keeping freed memory in the process lets the next batch reuse it; the peak does not grow
/// (the same buffers are live at the same time), but it is not given back until exit.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The system allocator, with large blocks marked for transparent huge pages where the
/// kernel leaves that to the program (`madvise` mode): a merge touches gigabytes of fresh
/// heap, and with 4 KiB pages each page is a fault, a zeroing and, on a page first read as
/// zero, a TLB shoot-down across the worker threads.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
struct HugePageAllocator;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
impl HugePageAllocator {
    const HUGE_PAGE: usize = 2 << 20;

    fn advise(ptr: *mut u8, size: usize) {
        if ptr.is_null() || size < 2 * Self::HUGE_PAGE {
            return;
        }
        let start = (ptr as usize).next_multiple_of(Self::HUGE_PAGE);
        let end = (ptr as usize + size) / Self::HUGE_PAGE * Self::HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside the block just allocated; MADV_HUGEPAGE changes
            // how pages are backed, never their contents. A failure only loses the hint.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
// SAFETY: every call is forwarded to the system allocator with its own arguments; `advise`
// only adds a hint on the memory that allocator returned.
unsafe impl std::alloc::GlobalAlloc for HugePageAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        let ptr = unsafe { std::alloc::System.alloc(layout) };
        Self::advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { std::alloc::System.alloc_zeroed(layout) };
        Self::advise(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, that is from the system allocator.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`.
        let ptr = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        Self::advise(ptr, new_size);
        ptr
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: HugePageAllocator = HugePageAllocator;
