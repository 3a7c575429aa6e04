//! Opening the next task model while the current one runs: its stored pages read ahead for
//! a GPU merge.

use std::time::Duration;

use crate::config::ModelEntry;
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::Site;

/// Opens a task model; with `ahead` (on another thread, before its turn, for a GPU merge)
/// and when its forward pass will run (`forward`), reads through the stored bytes of its
/// linear weights so that the pages are in memory when they are copied to the device. Each model was checked against
/// the base by [`check_inputs`] before the first one ran.
pub(super) fn open_prepared(
    entry: &ModelEntry,
    sites: &[Site],
    forward: bool,
    ahead: bool,
) -> Result<Checkpoint> {
    let ckpt = Checkpoint::open(&entry.model)?;
    if forward && ahead {
        crate::profile::span("ahead: fault in stored weights", || {
            for m in sites.iter().flat_map(|s| &s.modules) {
                if let Ok(bytes) = ckpt.bytes(&m.weight) {
                    // One read per page maps it (and reads it from disk when it is not cached);
                    // the last byte too, as the tensor need not start on a page.
                    let touched = bytes
                        .iter()
                        .step_by(4096)
                        .chain(bytes.last())
                        .fold(0u8, |a, &b| a ^ b);
                    std::hint::black_box(touched);
                }
            }
        });
    }
    Ok(ckpt)
}

/// A test hook: holds each task model open (mapped, its header read) this long before its
/// weights are read, so that tests can change the file under the run.
pub(super) fn hold_for_tests() {
    if let Some(ms) = std::env::var("REGMEAN_TEST_MODEL_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

pub(super) fn join_prepared(
    handle: std::thread::ScopedJoinHandle<'_, Result<Checkpoint>>,
) -> Result<Checkpoint> {
    handle
        .join()
        .map_err(|_| Error::Backend("the thread reading the next model panicked".into()))?
}
