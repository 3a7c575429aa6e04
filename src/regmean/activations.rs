//! The activation caches of a layer-wise merge: every task's inputs of the current layer,
//! one buffer per batch. They live in host memory up to a budget; beyond it they spill to a
//! temporary file next to the output, which is removed when the merge ends, fails or is
//! interrupted (it is registered with the writer's interrupt cleanup).

use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::pending::{register_scratch, Registered};

/// How much the caches hold, and where.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub in_memory_bytes: u64,
    pub spilled_bytes: u64,
}

impl CacheStats {
    pub fn total_bytes(&self) -> u64 {
        self.in_memory_bytes + self.spilled_bytes
    }
}

enum Slot {
    Memory(Vec<f32>),
    /// `len` f32 values at byte `offset` of the spill file.
    File {
        offset: u64,
        len: usize,
    },
}

/// A temporary file that removes itself when dropped.
struct SpillFile {
    file: File,
    path: PathBuf,
    len: u64,
    /// Removed on interrupt too, while this lives.
    _registered: Registered,
}

impl SpillFile {
    fn create(path: &Path) -> Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(SpillFile {
            file,
            path: path.to_path_buf(),
            len: 0,
            _registered: register_scratch(path, "the activation caches' spill file"),
        })
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Fixed-size f32 buffers, each in memory or in the spill file.
pub struct ActivationStore {
    slots: Vec<Slot>,
    budget: u64,
    stats: CacheStats,
    spill_path: PathBuf,
    spill: Option<SpillFile>,
}

impl ActivationStore {
    /// Buffers stay in memory while they total at most `budget` bytes; the rest go to a file
    /// at `spill_path`, created when first needed.
    pub fn new(budget: u64, spill_path: PathBuf) -> Self {
        ActivationStore {
            slots: Vec::new(),
            budget,
            stats: CacheStats::default(),
            spill_path,
            spill: None,
        }
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Stores a new buffer and returns its id.
    pub fn push(&mut self, values: Vec<f32>) -> Result<usize> {
        let bytes = 4 * values.len() as u64;
        let slot = if self.stats.in_memory_bytes + bytes <= self.budget {
            self.stats.in_memory_bytes += bytes;
            Slot::Memory(values)
        } else {
            let spill = match &mut self.spill {
                Some(s) => s,
                None => self.spill.insert(SpillFile::create(&self.spill_path)?),
            };
            let offset = spill.len;
            write_at(spill, offset, &values)?;
            spill.len += bytes;
            self.stats.spilled_bytes += bytes;
            Slot::File {
                offset,
                len: values.len(),
            }
        };
        self.slots.push(slot);
        Ok(self.slots.len() - 1)
    }

    /// Replaces buffer `id` with values of the same length.
    pub fn replace(&mut self, id: usize, values: Vec<f32>) -> Result<()> {
        match &mut self.slots[id] {
            Slot::Memory(v) if v.len() == values.len() => *v = values,
            Slot::File { offset, len } if *len == values.len() => {
                let spill = self.spill.as_ref().expect("a spilled slot has a file");
                write_at(spill, *offset, &values)?;
            }
            _ => {
                return Err(Error::Backend(format!(
                    "internal: activation buffer {id} changed size"
                )))
            }
        }
        Ok(())
    }

    /// The values of buffer `id`.
    pub fn read(&self, id: usize) -> Result<Cow<'_, [f32]>> {
        match &self.slots[id] {
            Slot::Memory(v) => Ok(Cow::Borrowed(v)),
            Slot::File { offset, len } => {
                let spill = self.spill.as_ref().expect("a spilled slot has a file");
                let mut bytes = vec![0u8; 4 * len];
                spill
                    .file
                    .read_exact_at(&mut bytes, *offset)
                    .map_err(|e| Error::io(&spill.path, e))?;
                Ok(Cow::Owned(
                    bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ))
            }
        }
    }
}

fn write_at(spill: &SpillFile, offset: u64, values: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    spill
        .file
        .write_all_at(&bytes, offset)
        .map_err(|e| Error::io(&spill.path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_over_the_budget_spill_and_read_back_and_the_file_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".spill");
        let mut store = ActivationStore::new(8, path.clone());
        let a = store.push(vec![1.0, 2.0]).unwrap();
        let b = store.push(vec![3.0, 4.0, 5.0]).unwrap();
        assert_eq!(
            store.stats(),
            CacheStats {
                in_memory_bytes: 8,
                spilled_bytes: 12
            }
        );
        assert!(path.exists());
        store.replace(b, vec![6.0, 7.0, 8.0]).unwrap();
        store.replace(a, vec![0.5, 0.25]).unwrap();
        assert_eq!(&*store.read(a).unwrap(), &[0.5, 0.25]);
        assert_eq!(&*store.read(b).unwrap(), &[6.0, 7.0, 8.0]);
        assert!(store.replace(b, vec![1.0]).is_err());
        drop(store);
        assert!(!path.exists(), "the spill file outlived the store");
    }
}
