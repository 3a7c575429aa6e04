//! Outputs that appear whole or not at all, one writer at a time. A result (a merged model
//! directory, a Gram file) is written into a hidden sibling `.NAME.partial-PID-N` and renamed
//! into place only when complete. The sibling is locked for as long as its run lives, so a
//! second run that targets the same output sees the first and stops at once instead of
//! racing it; the final rename never replaces an output that appeared meanwhile, and with
//! `--force` it swaps the new output for the old one in one step, so the earlier output
//! survives until the new one is complete.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::guard::Inputs;
use super::pending::{record_complete, register_pending, unregister_pending};
use crate::error::{Error, Result};

/// Distinguishes the staged outputs of one process (`compare-average` writes two).
static SEQUENCE: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
}

/// A result being written: its final path, and the locked hidden sibling it is written to.
pub struct StagedOutput {
    final_path: PathBuf,
    tmp_path: PathBuf,
    /// Held until the output is committed or dropped: other runs read it as "being written".
    _lock: File,
    force: bool,
    committed: bool,
}

/// A model directory being written.
pub type OutputDir = StagedOutput;

impl StagedOutput {
    /// Prepares the hidden sibling of the directory `out`. Refuses an `out` that touches an
    /// input, one that exists (unless `force`, and then only an earlier model directory or
    /// an empty folder), and one another run is writing.
    pub fn create(out: &Path, force: bool, inputs: &Inputs) -> Result<Self> {
        Self::stage(out, force, inputs, Kind::Dir)
    }

    /// The same for a single file (a Gram file, a report); `force` replaces a file only.
    pub fn create_file(out: &Path, force: bool, inputs: &Inputs) -> Result<Self> {
        Self::stage(out, force, inputs, Kind::File)
    }

    fn stage(out: &Path, force: bool, inputs: &Inputs, kind: Kind) -> Result<Self> {
        inputs.check_output(out)?;
        check_replaceable(out, force, kind)?;
        let name = out
            .file_name()
            .ok_or_else(|| Error::file(out, "the output path has no file or directory name"))?
            .to_string_lossy()
            .into_owned();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if let Some(blocker) = parent
            .ancestors()
            .find(|a| a.exists())
            .filter(|a| !a.is_dir())
        {
            return Err(Error::file(
                blocker,
                "is a file, not a directory: the output must go inside a folder",
            ));
        }
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        // The parent's lock makes "nobody else is writing this" and "now I am" one step.
        let parent_lock = File::open(&parent).map_err(|e| Error::io(&parent, e))?;
        parent_lock.lock().map_err(|e| Error::io(&parent, e))?;
        let prefix = format!(".{name}.partial-");
        if let Some(pid) = other_writer(&parent, &prefix) {
            return Err(Error::file(
                out,
                format!("another run (process {pid}) is writing this output now; wait for it to finish, or choose another output"),
            ));
        }
        let tmp_path = parent.join(format!(
            "{prefix}{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        let lock = match kind {
            Kind::Dir => std::fs::create_dir(&tmp_path).and_then(|_| File::open(&tmp_path)),
            Kind::File => File::create_new(&tmp_path),
        }
        .map_err(|e| Error::io(out, e))?;
        register_pending(&tmp_path);
        let staged = StagedOutput {
            final_path: out.to_path_buf(),
            tmp_path,
            _lock: lock,
            force,
            committed: false,
        };
        staged._lock.lock().map_err(|e| Error::io(out, e))?;
        drop(parent_lock);
        Ok(staged)
    }

    /// Where the result goes until `commit`: a directory, or the file itself.
    pub fn path(&self) -> &Path {
        &self.tmp_path
    }

    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    pub fn write_text(&self, name: &str, text: &str) -> Result<()> {
        let p = self.tmp_path.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    }

    /// Moves the finished result into place. Without `force` an output that appeared in the
    /// meantime is kept and this result dropped; with it, the old output is swapped out in
    /// one step and then removed.
    pub fn commit(mut self) -> Result<()> {
        let replaced = if self.force {
            exchange(&self.tmp_path, &self.final_path)
                .map_err(|e| Error::io(&self.final_path, e))?
        } else {
            match rename_no_replace(&self.tmp_path, &self.final_path) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(Error::file(
                        &self.final_path,
                        "another run wrote this output while this one was running; it was kept, and this run's result was discarded (pass --force to replace it)",
                    ))
                }
                r => r.map_err(|e| Error::io(&self.final_path, e))?,
            }
            false
        };
        self.committed = true;
        // The old output now sits at the staging path: remove it.
        if replaced {
            remove_entry(&self.tmp_path).map_err(|e| Error::io(&self.tmp_path, e))?;
        }
        unregister_pending(&self.tmp_path);
        record_complete(&self.final_path);
        Ok(())
    }
}

impl Drop for StagedOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove_entry(&self.tmp_path);
            unregister_pending(&self.tmp_path);
        }
    }
}

/// An existing output needs `--force`, and even then only what a run of this tool could have
/// written is replaced: a model directory (with config.json), an empty folder, or a file in
/// place of a file.
fn check_replaceable(out: &Path, force: bool, kind: Kind) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !force {
        return Err(Error::file(
            out,
            "output already exists; choose another path or pass --force to replace it",
        ));
    }
    let is_dir = std::fs::metadata(out).is_ok_and(|m| m.is_dir());
    match kind {
        Kind::Dir if is_dir => {
            let empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_none());
            if empty || out.join("config.json").is_file() {
                Ok(())
            } else {
                Err(Error::file(
                    out,
                    "--force replaces only an earlier output (a model directory with config.json, or an empty folder); this folder holds other files: move it away yourself, or choose another path",
                ))
            }
        }
        Kind::Dir if meta.file_type().is_symlink() => Ok(()),
        Kind::Dir => Err(Error::file(
            out,
            "exists and is a file, not an earlier output directory: move it away yourself, or choose another path",
        )),
        Kind::File if is_dir => Err(Error::file(
            out,
            "is a directory; --force replaces a file only: choose a file path",
        )),
        Kind::File => Ok(()),
    }
}

/// The process id of a live run staging the same output under `parent`, if any. Partial
/// outputs of runs that died (their lock is free) are removed on the way.
fn other_writer(parent: &Path, prefix: &str) -> Option<u32> {
    let entries = std::fs::read_dir(parent).ok()?;
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let path = e.path();
        match File::open(&path).map(|f| f.try_lock()) {
            Ok(Ok(())) => {
                let _ = remove_entry(&path);
            }
            Ok(Err(std::fs::TryLockError::WouldBlock)) => return Some(pid),
            // Unreadable: leave it, and do not guess that someone is writing.
            _ => {}
        }
    }
    None
}

fn remove_entry(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Renames `from` to `to`, failing with `AlreadyExists` when `to` exists.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    match renameat2(from, to, libc::RENAME_NOREPLACE) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {}
        r => return r,
    }
    // Without renameat2 (another system, or a file system without it): check, then rename.
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    std::fs::rename(from, to)
}

/// Puts `from` in place of `to`. When `to` existed, its old content is left at `from` and
/// `true` returned; the two are swapped in one step where the system can.
fn exchange(from: &Path, to: &Path) -> std::io::Result<bool> {
    if std::fs::symlink_metadata(to).is_err() {
        rename_no_replace(from, to)?;
        return Ok(false);
    }
    #[cfg(target_os = "linux")]
    match renameat2(from, to, libc::RENAME_EXCHANGE) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {}
        r => return r.map(|()| true),
    }
    // Fallback: two renames, with a moment in which `to` is absent.
    let mut aside = from.as_os_str().to_owned();
    aside.push(".old");
    let aside = PathBuf::from(aside);
    std::fs::rename(to, &aside)?;
    std::fs::rename(from, to)?;
    std::fs::rename(&aside, from)?;
    Ok(true)
}

#[cfg(target_os = "linux")]
fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the call; renameat2 reads
    // them and touches no memory of ours otherwise. The raw syscall avoids depending on a
    // glibc recent enough to wrap it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> Inputs {
        Inputs::new()
    }

    #[test]
    fn uncommitted_output_leaves_nothing_behind() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("merged");
        {
            let dir = OutputDir::create(&out, false, &none()).unwrap();
            dir.write_text("config.json", "{}").unwrap();
        }
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn existing_output_needs_force_and_is_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("merged");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("config.json"), "old").unwrap();
        std::fs::write(out.join("stale.txt"), "x").unwrap();
        let err = OutputDir::create(&out, false, &none())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--force"), "{err}");
        let dir = OutputDir::create(&out, true, &none()).unwrap();
        dir.write_text("config.json", "{}").unwrap();
        // Until the commit the earlier output is whole.
        assert_eq!(
            std::fs::read_to_string(out.join("config.json")).unwrap(),
            "old"
        );
        dir.commit().unwrap();
        assert!(out.join("config.json").exists() && !out.join("stale.txt").exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn force_replaces_only_what_could_be_an_earlier_output() {
        let root = tempfile::tempdir().unwrap();
        let docs = root.path().join("docs");
        std::fs::create_dir(&docs).unwrap();
        std::fs::write(docs.join("notes.txt"), "mine").unwrap();
        let err = OutputDir::create(&docs, true, &none())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("only an earlier output"), "{err}");
        let file = root.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(OutputDir::create(&file, true, &none()).is_err());
        assert!(StagedOutput::create_file(&docs, true, &none()).is_err());
        assert_eq!(
            std::fs::read_to_string(docs.join("notes.txt")).unwrap(),
            "mine"
        );
        // A file replaces a file.
        let staged = StagedOutput::create_file(&file, true, &none()).unwrap();
        std::fs::write(staged.path(), "new").unwrap();
        staged.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new");
    }

    #[test]
    fn a_second_writer_of_the_same_output_is_refused_while_the_first_runs() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("merged");
        let first = OutputDir::create(&out, false, &none()).unwrap();
        for force in [false, true] {
            let err = OutputDir::create(&out, force, &none())
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("another run"), "{err}");
        }
        first.write_text("config.json", "{}").unwrap();
        first.commit().unwrap();
        // Once it is done, the output simply exists.
        let err = OutputDir::create(&out, false, &none())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
    }

    #[test]
    fn an_output_that_appeared_meanwhile_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("merged");
        let staged = OutputDir::create(&out, false, &none()).unwrap();
        staged.write_text("config.json", "mine").unwrap();
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("config.json"), "theirs").unwrap();
        let err = staged.commit().unwrap_err().to_string();
        assert!(err.contains("another run wrote this output"), "{err}");
        assert_eq!(
            std::fs::read_to_string(out.join("config.json")).unwrap(),
            "theirs"
        );
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn partial_outputs_of_dead_runs_are_removed() {
        let root = tempfile::tempdir().unwrap();
        // Unlocked: its run is gone (a SIGKILL leaves exactly this).
        let stale = root.path().join(".merged.partial-999999-0");
        std::fs::create_dir(&stale).unwrap();
        let staged = OutputDir::create(&root.path().join("merged"), false, &none()).unwrap();
        assert!(!stale.exists());
        drop(staged);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }
}
