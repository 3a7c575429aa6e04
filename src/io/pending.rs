//! What this process has on disk that is not finished yet, and what an interrupt does with
//! it. Every temporary output (a hidden `.NAME.partial-PID-N` sibling, a scratch folder) is
//! registered while it exists, and every output finished in this run is recorded. On SIGINT
//! or SIGTERM the registered entries are removed and one line says what was removed and
//! which finished outputs are kept, so that a user never has to guess whether a folder on
//! disk is complete. (A SIGKILL cannot be caught: its leftovers are hidden
//! `.NAME.partial-PID` entries, removed by the next run that writes the same output.)
//!
//! An error return removes its temporary outputs itself (their owners' `Drop`), and
//! unregisters them here: the registry is only read when the process is interrupted.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A temporary entry on disk and the words that name it to the user.
struct Pending {
    path: PathBuf,
    what: String,
}

static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());
/// Outputs finished (renamed into place) by this process.
static COMPLETE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Entries are pushed and removed whole: a panic elsewhere cannot leave one half-made.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Registers a temporary output, removed on interrupt. A hidden `.NAME.partial-PID` entry
/// is named to the user as the output it will become (`DIR/NAME`).
pub(crate) fn register_pending(path: &Path) {
    register_described(
        path,
        format!("the partial output {}", output_of(path).display()),
    );
}

fn register_described(path: &Path, what: String) {
    lock(&PENDING).push(Pending {
        path: path.to_path_buf(),
        what,
    });
}

/// Registers a scratch folder (or file), named to the user as `what` and its path, for
/// removal on interrupt, until the returned value is dropped: keep that value alive at
/// least as long as the folder, and drop it first.
pub fn register_scratch(path: &Path, what: &str) -> Registered {
    register_described(path, format!("{what} ({})", path.display()));
    Registered(path.to_path_buf())
}

/// A scratch entry's registration; dropping it unregisters the entry.
pub struct Registered(PathBuf);

impl Drop for Registered {
    fn drop(&mut self) {
        unregister_pending(&self.0);
    }
}

pub fn unregister_pending(path: &Path) {
    lock(&PENDING).retain(|p| p.path != path);
}

/// Records an output this run finished: an interrupt afterwards says it is kept.
pub fn record_complete(path: &Path) {
    lock(&COMPLETE).push(path.to_path_buf());
}

/// The output a hidden temporary `DIR/.NAME.partial-PID` stands for: `DIR/NAME`.
fn output_of(tmp: &Path) -> PathBuf {
    let name = tmp.file_name().map(|n| n.to_string_lossy().into_owned());
    let output = name.as_deref().and_then(|n| {
        // `.NAME.partial-PID-N` (or `.NAME.partial-PID`, as older runs named it).
        let (stem, tag) = n.strip_prefix('.')?.rsplit_once(".partial-")?;
        let pid = tag.split('-').next()?;
        pid.parse::<u32>().ok().map(|_| stem.to_string())
    });
    match output {
        Some(stem) => tmp.with_file_name(stem),
        None => tmp.to_path_buf(),
    }
}

/// On SIGINT/SIGTERM: removes every registered entry, says in one line what was removed and
/// which finished outputs are kept, and exits with status 130.
pub fn install_interrupt_cleanup() {
    // ctrlc runs this on a thread of its own, not in the signal handler: it may allocate
    // and take locks.
    let _ = ctrlc::set_handler(|| {
        let pending: Vec<(PathBuf, String)> = lock(&PENDING)
            .iter()
            .map(|p| (p.path.clone(), p.what.clone()))
            .collect();
        let mut removed = Vec::new();
        for (path, what) in &pending {
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            // An entry inside another (a merge's partial output in a scratch folder) goes
            // with it, and is not named on its own.
            let inside = pending
                .iter()
                .any(|(p, _)| p != path && path.starts_with(p));
            if (gone.is_ok() || !path.exists()) && !inside {
                removed.push(what.clone());
            }
        }
        // An output finished inside a removed scratch folder is gone with it.
        let kept: Vec<PathBuf> = lock(&COMPLETE)
            .iter()
            .filter(|c| !pending.iter().any(|(p, _)| c.starts_with(p)) && c.exists())
            .cloned()
            .collect();
        eprintln!("\n{}", interrupt_message(&removed, &kept));
        std::process::exit(130);
    });
}

/// The line an interrupt prints: what was removed, and what is kept.
fn interrupt_message(removed: &[String], kept: &[PathBuf]) -> String {
    let mut line = "interrupted".to_string();
    if !removed.is_empty() {
        line += &format!(": removed {}", removed.join(" and "));
    }
    line += if removed.is_empty() { ": " } else { "; " };
    if kept.is_empty() {
        line += "nothing was written";
    } else {
        let names: Vec<String> = kept.iter().map(|k| k.display().to_string()).collect();
        let (was, is) = if kept.len() == 1 {
            ("was", "is")
        } else {
            ("were", "are")
        };
        line += &format!("{} {was} already complete and {is} kept", names.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_output_is_named_as_the_output_it_becomes() {
        assert_eq!(
            output_of(Path::new("runs/.merged.partial-4242")),
            Path::new("runs/merged")
        );
        assert_eq!(
            output_of(Path::new(".a.b.partial-7")),
            Path::new("a.b"),
            "dots in the name"
        );
        // Not a partial output: named as it is.
        for other in [
            "runs/.regmean-average-x1",
            "runs/.m.partial-x",
            "m.partial-1",
        ] {
            assert_eq!(output_of(Path::new(other)), Path::new(other));
        }
    }

    #[test]
    fn the_interrupt_line_says_what_was_removed_and_what_is_kept() {
        let partial = "the partial output out/merged".to_string();
        assert_eq!(
            interrupt_message(std::slice::from_ref(&partial), &[]),
            "interrupted: removed the partial output out/merged; nothing was written"
        );
        assert_eq!(
            interrupt_message(&[], &[]),
            "interrupted: nothing was written"
        );
        let scratch = "the scratch folder of the simple-average comparison".to_string();
        assert_eq!(
            interrupt_message(&[scratch], &[PathBuf::from("out/merged")]),
            "interrupted: removed the scratch folder of the simple-average comparison; \
             out/merged was already complete and is kept"
        );
        assert_eq!(
            interrupt_message(&[], &[PathBuf::from("a"), PathBuf::from("b")]),
            "interrupted: a, b were already complete and are kept"
        );
    }
}
