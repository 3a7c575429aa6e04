//! Input files that are memory-mapped, and what happens when another program truncates or
//! rewrites one while a run reads it.
//!
//! Reading a page of a mapping beyond the file's new end raises SIGBUS, whose default action
//! kills the process without a word (and leaves its partial output behind). Two choices were
//! open: read the files instead of mapping them, or keep the maps and handle the fault.
//! Measured on a CPU merge of a synthetic GPT-2 pool (`synth --layers 2 --models 3
//! --examples 32`: four checkpoints, 857 MB; 2 shared cores): reading would copy all 857 MB
//! (0.35 s from the page cache, before the heap's page faults) and hold the bytes in the heap
//! (the base's for the whole run, a task model's for its turn) on top of a peak of 1.16 GB,
//! where the page cache serves the maps for free; the guarded maps cost one `stat` per file
//! and one atomic load per tensor: median of 3 runs, 23.7 s before and 24.4 s after (user
//! CPU 9.27 s and 8.93 s; runs spread from 18 to 28 s on this shared machine), no difference
//! above the noise. So the maps stay, guarded:
//!
//! - every live mapping is registered (address range → slot) in a fixed table that the
//!   signal handler can search without locks or allocation;
//! - on SIGBUS at an address inside a registered mapping, the handler maps zero pages over
//!   the rest of that mapping (so that the faulting read, and every later one, completes),
//!   marks the slot as faulted and returns. It calls nothing but `mmap(2)`;
//! - the owner of the mapping checks the mark (and the file's size, modification time and
//!   inode against those seen when it was opened) after reading, and returns
//!   [`Error::InputChanged`] naming the file: the run then ends through its ordinary error
//!   path, whose `Drop`s remove the partial output, as for any other error.
//!
//! A fault outside every registered mapping is passed to the handler that was installed
//! before (the standard library's stack-overflow handler), or to the default action.
//! The zeros read after a fault never reach a committed output of `merge` or `grams`: both
//! check their inputs before they commit. For every command, `main` checks once more before
//! it reports success (so `forward` or `eval` on an input cut short end with the error line,
//! after what they printed or wrote).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use memmap2::Mmap;

use crate::error::{Error, Result};

/// A file's identity and size when it was opened, compared again after it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

impl FileStamp {
    /// The stamp of the file at `path` now.
    pub fn of(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        Ok(Self::from_metadata(path, &meta))
    }

    fn from_metadata(path: &Path, meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        FileStamp {
            path: path.to_path_buf(),
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error when the file is gone, or its size, modification time or inode differ from
    /// this stamp's.
    pub fn check(&self) -> Result<()> {
        match FileStamp::of(&self.path) {
            Ok(now) if now == *self => Ok(()),
            _ => Err(Error::InputChanged {
                path: self.path.clone(),
            }),
        }
    }
}

/// A read-only memory map of a whole file, registered with the SIGBUS handler.
pub struct MappedFile {
    map: Mmap,
    slot: Option<usize>,
    stamp: FileStamp,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self> {
        handler::install();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // The stamp of the file that is mapped (fstat on the open file, not the path).
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        let stamp = FileStamp::from_metadata(path, &meta);
        // SAFETY: the map is read-only and private to this process. Another program may
        // truncate the file while it is mapped: reading past its new end then raises SIGBUS,
        // which the registered handler turns into zero pages and a mark checked after reading
        // (this module's comment). A rewrite in place may change bytes under a borrowed
        // slice: the size and mtime checks report it, and only plain bytes are read from the
        // map (no invariant of a Rust type depends on them).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let slot = (!map.is_empty())
            .then(|| registry::register(map.as_ptr() as usize, map.len(), path))
            .flatten();
        Ok(MappedFile { map, slot, stamp })
    }

    pub fn path(&self) -> &Path {
        &self.stamp.path
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn stamp(&self) -> &FileStamp {
        &self.stamp
    }

    /// An error when a read of this map found the file shorter than when it was mapped. One
    /// atomic load: cheap enough after every tensor read.
    pub fn check_read(&self) -> Result<()> {
        match self.slot {
            Some(s) if registry::faulted(s) => Err(Error::InputChanged {
                path: self.stamp.path.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// [`MappedFile::check_read`], and the file's size, modification time and inode against
    /// those it had when it was mapped (a change of the same size, or one in a part not read
    /// yet). A `stat` call: for the end of a model or a run.
    pub fn check_unchanged(&self) -> Result<()> {
        self.check_read()?;
        self.stamp.check()
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if let Some(s) = self.slot {
            if registry::faulted(s) {
                remember_fault(&self.stamp.path);
            }
            // Before the map is unmapped (the fields drop after this body).
            registry::unregister(s);
        }
    }
}

/// Files whose maps faulted and were dropped since: `main` checks this before it reports
/// success, for readers that did not check their maps themselves.
static FAULTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn remember_fault(path: &Path) {
    FAULTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(path.to_path_buf());
}

/// An error naming the first mapped input of this process that was truncated while it was
/// read, if any did (live maps and dropped ones alike). For a command-line run, after its work:
/// in a library, use each reader's own checks.
pub fn check_no_fault() -> Result<()> {
    let dropped = FAULTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .first()
        .cloned();
    match dropped.or_else(registry::first_live_fault) {
        Some(path) => Err(Error::InputChanged { path }),
        None => Ok(()),
    }
}

/// The table of live mappings. The signal handler only loads atomics from it; registering
/// and unregistering take a lock among themselves (the handler never does), which also
/// keeps the paths of the live mappings for [`check_no_fault`].
mod registry {
    use super::*;

    /// Mappings live at once: a merge holds the base model, one or two task models and a
    /// data or Gram file, each possibly in shards. A mapping beyond this is not guarded (a
    /// truncation then kills the process, as without this module).
    pub(super) const SLOTS: usize = 1024;

    struct Slot {
        /// Address of the first byte; 0 when the slot is free.
        start: AtomicUsize,
        len: AtomicUsize,
        faulted: AtomicBool,
    }

    static TABLE: [Slot; SLOTS] = [const {
        Slot {
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            faulted: AtomicBool::new(false),
        }
    }; SLOTS];

    /// Which slots are taken, and by which file (for [`first_live_fault`]).
    static OWNERS: Mutex<Vec<Option<PathBuf>>> = Mutex::new(Vec::new());

    fn owners() -> std::sync::MutexGuard<'static, Vec<Option<PathBuf>>> {
        OWNERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers `[start, start + len)`; None when the table is full.
    pub(super) fn register(start: usize, len: usize, path: &Path) -> Option<usize> {
        let mut owners = owners();
        if owners.is_empty() {
            owners.resize(SLOTS, None);
        }
        let s = owners.iter().position(Option::is_none)?;
        owners[s] = Some(path.to_path_buf());
        let slot = &TABLE[s];
        slot.len.store(len, Ordering::Relaxed);
        slot.faulted.store(false, Ordering::Relaxed);
        // Last, with Release: a handler that sees `start` sees `len` too.
        slot.start.store(start, Ordering::Release);
        Some(s)
    }

    pub(super) fn unregister(s: usize) {
        let mut owners = owners();
        TABLE[s].start.store(0, Ordering::Release);
        owners[s] = None;
    }

    pub(super) fn faulted(s: usize) -> bool {
        TABLE[s].faulted.load(Ordering::Acquire)
    }

    pub(super) fn first_live_fault() -> Option<PathBuf> {
        let owners = owners();
        owners.iter().enumerate().find_map(|(s, owner)| {
            owner
                .as_ref()
                .filter(|_| TABLE[s].faulted.load(Ordering::Acquire))
                .cloned()
        })
    }

    /// The slot whose mapping holds `addr`, and that mapping's end. Async-signal-safe:
    /// atomic loads only.
    pub(super) fn find(addr: usize) -> Option<(usize, usize)> {
        TABLE.iter().enumerate().find_map(|(s, slot)| {
            let start = slot.start.load(Ordering::Acquire);
            let end = start.saturating_add(slot.len.load(Ordering::Relaxed));
            (start != 0 && (start..end).contains(&addr)).then_some((s, end))
        })
    }

    /// Async-signal-safe: an atomic store.
    pub(super) fn mark_faulted(s: usize) {
        TABLE[s].faulted.store(true, Ordering::Release);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod handler {
    use super::registry;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Once, OnceLock};

    static INSTALLED: Once = Once::new();
    /// The disposition of SIGBUS before ours, for faults that are not ours.
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
    /// The page size, read once outside the handler (sysconf is not async-signal-safe).
    static PAGE: AtomicUsize = AtomicUsize::new(4096);

    pub(super) fn install() {
        INSTALLED.call_once(|| {
            // SAFETY: sysconf only reads a system constant.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if page > 0 {
                PAGE.store(page as usize, Ordering::Relaxed);
            }
            // SAFETY: a sigaction is plain data, valid when zeroed; sigaction(2) with a null
            // new action only writes the current one into `previous`, which lives on this
            // stack for the call.
            let read = unsafe {
                let mut previous: libc::sigaction = std::mem::zeroed();
                (libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) == 0)
                    .then_some(previous)
            };
            let Some(previous) = read else {
                return;
            };
            // Stored before ours is installed: the handler never finds it unset.
            let _ = PREVIOUS.set(previous);
            // SAFETY: as above; `on_sigbus` has the signature SA_SIGINFO requires, and
            // SA_ONSTACK keeps it on the alternate stack the standard library gives each of
            // its threads (a stack overflow must still be reported by its handler).
            unsafe {
                let mut ours: libc::sigaction = std::mem::zeroed();
                ours.sa_sigaction = on_sigbus as *const () as usize;
                ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut ours.sa_mask);
                libc::sigaction(libc::SIGBUS, &ours, std::ptr::null_mut());
            }
        });
    }

    /// Runs in signal context: it touches only atomics and calls only mmap(2) and
    /// sigaction(2). (mmap is not on POSIX's list of async-signal-safe functions, but on
    /// Linux glibc's `mmap` is the bare system call, with no lock or user-space state; the
    /// only memory it writes is errno, which the handler does not depend on.)
    extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t; its si_addr is read
        // only for BUS_ADRERR, a fault code that sets it.
        let fault =
            unsafe { ((*info).si_code == libc::BUS_ADRERR).then(|| (*info).si_addr() as usize) };
        if let Some((addr, (slot, end))) = fault.and_then(|a| registry::find(a).map(|f| (a, f))) {
            let page = PAGE.load(Ordering::Relaxed);
            let from = addr & !(page - 1);
            let end = end.next_multiple_of(page);
            // SAFETY: [from, end) lies inside the registered mapping (its start is at or
            // before `from`, the map is page-aligned and its last page ends at `end`), which
            // its owner cannot unmap while this thread reads it (the read borrows the map).
            // MAP_FIXED replaces those pages with private zero pages, read-only like the map.
            let zeroed = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    end - from,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if zeroed != libc::MAP_FAILED {
                registry::mark_faulted(slot);
                // The faulting instruction runs again and reads zeros.
                return;
            }
        }
        pass_on(sig, info, ctx);
    }

    /// Hands a fault that is not ours to the previous handler, or restores the default
    /// action, so that the fault repeats on return and ends the process as it would have.
    fn pass_on(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        let previous = PREVIOUS.get();
        let handler = previous.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            // SAFETY: a zeroed sigaction is SIG_DFL with an empty mask; sigaction(2) is
            // async-signal-safe.
            unsafe {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &default, std::ptr::null_mut());
            }
            return;
        }
        let siginfo = previous.is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
        // SAFETY: `handler` is the address of the function that was installed for SIGBUS
        // before ours, with the signature its SA_SIGINFO flag says; it is called as the
        // kernel would have called it.
        unsafe {
            if siginfo {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(handler);
                f(sig, info, ctx);
            } else {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(handler);
                f(sig);
            }
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod handler {
    /// Elsewhere no handler is installed: a truncated input ends the process with SIGBUS,
    /// and the size and modification time checks still catch changes between reads.
    pub(super) fn install() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_truncated_under_its_map_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.bin");
        let len = 64 * 4096 + 100;
        let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&path, &content).unwrap();
        let map = MappedFile::open(&path).unwrap();
        assert_eq!(map.bytes()[..10], content[..10]);
        map.check_unchanged().unwrap();

        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(10 * 4096)
            .unwrap();
        // Without the handler this read would end the test process with SIGBUS.
        let past_end = map.bytes()[20 * 4096..]
            .iter()
            .map(|&b| b as u64)
            .sum::<u64>();
        assert_eq!(past_end, 0, "pages past the new end read as zeros");
        let err = map.check_read().unwrap_err().to_string();
        assert!(
            err.contains("input.bin") && err.contains("changed while being read"),
            "{err}"
        );
        assert!(check_no_fault().is_err());
        drop(map);
        assert!(check_no_fault().is_err());
        assert!(
            FAULTED.lock().unwrap().contains(&path),
            "remembered once dropped"
        );
    }

    #[test]
    fn a_rewrite_of_the_same_size_is_caught_by_the_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("same_size.bin");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let map = MappedFile::open(&path).unwrap();
        map.check_unchanged().unwrap();
        // A later modification time, as a rewrite a moment later has.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut &file, &[2u8; 16]).unwrap();
        file.set_modified(SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        map.check_read().unwrap();
        let err = map.check_unchanged().unwrap_err().to_string();
        assert!(
            err.contains("same_size.bin changed while being read"),
            "{err}"
        );
    }

    #[test]
    fn a_fault_marks_only_the_map_it_hit() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
        for p in [&a, &b] {
            std::fs::write(p, vec![7u8; 16 * 4096]).unwrap();
        }
        let (map_a, map_b) = (MappedFile::open(&a).unwrap(), MappedFile::open(&b).unwrap());
        let start = map_b.bytes().as_ptr() as usize;
        assert_eq!(
            registry::find(start + 5).map(|(s, _)| s),
            map_b.slot,
            "an address inside b is b's"
        );
        std::fs::File::options()
            .write(true)
            .open(&b)
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert_eq!(map_b.bytes()[8 * 4096], 0);
        assert!(map_b.check_read().is_err());
        map_a.check_unchanged().unwrap();
        assert_eq!(map_a.bytes()[8 * 4096], 7);
    }
}
