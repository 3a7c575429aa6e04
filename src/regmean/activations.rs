//! The activation caches of a layer-wise merge: every task's inputs of the current layer,
//! one buffer per batch. Each is kept where the first tier with room puts it:
//!
//! 1. on the backend, as its own tensor (on a GPU: device memory, so a layer's inputs are
//!    never copied to the host and back), up to the backend's budget;
//! 2. in host memory, up to the merge's memory cap (on the CPU, whose tensors are host
//!    memory, tier 1 is this tier, under the same cap);
//! 3. in a temporary file next to the output, which is removed when the merge ends, fails or
//!    is interrupted (it is registered with the writer's interrupt cleanup).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::pending::{register_scratch, Registered};

/// How much the caches hold, and where.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Kept on a device backend (a GPU), not counting host memory.
    pub on_device_bytes: u64,
    pub in_memory_bytes: u64,
    pub spilled_bytes: u64,
}

impl CacheStats {
    pub fn total_bytes(&self) -> u64 {
        self.on_device_bytes + self.in_memory_bytes + self.spilled_bytes
    }
}

enum Slot<T> {
    /// The backend's tensor; `None` while taken out ([`ActivationStore::take`]).
    Backend(Option<T>),
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

/// A buffer's `(rows, cols)`.
type Dims = (usize, usize);

/// Fixed-size `[rows, cols]` buffers, each on the backend, in host memory or in the spill
/// file.
pub struct ActivationStore<'b, B: Backend> {
    backend: &'b B,
    /// Each buffer and its `(rows, cols)`.
    slots: Vec<(Slot<B::Tensor>, Dims)>,
    /// Bytes the backend's own tensors may hold, and whether they are host memory (counted
    /// against `budget` with the host tier, which then has no room of its own).
    backend_budget: u64,
    backend_is_host: bool,
    budget: u64,
    stats: CacheStats,
    spill_path: PathBuf,
    spill: Option<SpillFile>,
}

impl<'b, B: Backend> ActivationStore<'b, B> {
    /// Buffers stay on `backend` up to `on_backend` bytes (its
    /// [`Backend::activation_cache_budget`]; `None`: its tensors are host memory, under
    /// `budget`), then in host memory while those total at most `budget` bytes; the rest go to
    /// a file at `spill_path`, created when first needed.
    pub fn new(backend: &'b B, on_backend: Option<u64>, budget: u64, spill_path: PathBuf) -> Self {
        let (backend_budget, backend_is_host) = match on_backend {
            Some(device) => (device, false),
            None => (budget, true),
        };
        ActivationStore {
            backend,
            slots: Vec::new(),
            backend_budget,
            backend_is_host,
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
    pub fn push(&mut self, t: B::Tensor) -> Result<usize> {
        let dims = self.backend.shape(&t);
        let bytes = 4 * (dims.0 * dims.1) as u64;
        let on_backend = if self.backend_is_host {
            &mut self.stats.in_memory_bytes
        } else {
            &mut self.stats.on_device_bytes
        };
        let slot = if *on_backend + bytes <= self.backend_budget {
            *on_backend += bytes;
            Slot::Backend(Some(t))
        } else {
            let values = self.backend.download_owned(t)?;
            if !self.backend_is_host && self.stats.in_memory_bytes + bytes <= self.budget {
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
            }
        };
        self.slots.push((slot, dims));
        Ok(self.slots.len() - 1)
    }

    /// Buffer `id`, taken out for a pass that [`put`](Self::put)s its output back: a tensor
    /// on the backend moves out without a copy.
    pub fn take(&mut self, id: usize) -> Result<B::Tensor> {
        let (slot, dims) = &mut self.slots[id];
        match slot {
            Slot::Backend(t) => t.take().ok_or_else(|| taken(id)),
            _ => {
                let dims = *dims;
                self.upload(id, dims)
            }
        }
    }

    /// A copy of buffer `id`, on the backend, for a pass that does not replace it.
    pub fn copy(&self, id: usize) -> Result<B::Tensor> {
        let (slot, dims) = &self.slots[id];
        match slot {
            Slot::Backend(Some(t)) => self.backend.copy(t),
            Slot::Backend(None) => Err(taken(id)),
            _ => self.upload(id, *dims),
        }
    }

    /// Replaces buffer `id` (taken or not) with a tensor of the same shape.
    pub fn put(&mut self, id: usize, t: B::Tensor) -> Result<()> {
        let (slot, dims) = &mut self.slots[id];
        if self.backend.shape(&t) != *dims {
            return Err(Error::Backend(format!(
                "internal: activation buffer {id} changed shape"
            )));
        }
        match slot {
            Slot::Backend(held) => *held = Some(t),
            Slot::Memory(v) => *v = self.backend.download_owned(t)?,
            Slot::File { offset, .. } => {
                let spill = self.spill.as_ref().expect("a spilled slot has a file");
                write_at(spill, *offset, &self.backend.download_owned(t)?)?;
            }
        }
        Ok(())
    }

    /// Buffer `id` from host memory or the spill file, uploaded.
    fn upload(&self, id: usize, (rows, cols): (usize, usize)) -> Result<B::Tensor> {
        match &self.slots[id].0 {
            Slot::Memory(v) => self.backend.upload(v, rows, cols),
            Slot::File { offset, len } => {
                let spill = self.spill.as_ref().expect("a spilled slot has a file");
                let mut bytes = vec![0u8; 4 * len];
                spill
                    .file
                    .read_exact_at(&mut bytes, *offset)
                    .map_err(|e| Error::io(&spill.path, e))?;
                let values: Vec<f32> = bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                self.backend.upload_owned(values, rows, cols)
            }
            Slot::Backend(_) => unreachable!("a tensor on the backend is not uploaded"),
        }
    }
}

fn taken(id: usize) -> Error {
    Error::Backend(format!(
        "internal: activation buffer {id} was taken and not put back"
    ))
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
    use crate::backend::{CpuBackend, CpuTensor};

    fn t(values: &[f32]) -> CpuTensor {
        CpuTensor::new(values.to_vec(), 1, values.len())
    }

    #[test]
    fn buffers_over_the_budget_spill_and_read_back_and_the_file_goes_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".spill");
        let mut store = ActivationStore::new(&CpuBackend, None, 8, path.clone());
        let a = store.push(t(&[1.0, 2.0])).unwrap();
        let b = store.push(t(&[3.0, 4.0, 5.0])).unwrap();
        assert_eq!(
            store.stats(),
            CacheStats {
                on_device_bytes: 0,
                in_memory_bytes: 8,
                spilled_bytes: 12
            }
        );
        assert!(path.exists());
        // A taken buffer comes back through `put`, a spilled one is rewritten in its place.
        let taken = store.take(b).unwrap();
        assert_eq!(taken.data, [3.0, 4.0, 5.0]);
        store.put(b, t(&[6.0, 7.0, 8.0])).unwrap();
        let taken = store.take(a).unwrap();
        assert_eq!(taken.data, [1.0, 2.0]);
        assert!(store.copy(a).is_err(), "a taken buffer was copied");
        store.put(a, t(&[0.5, 0.25])).unwrap();
        assert_eq!(store.copy(a).unwrap().data, [0.5, 0.25]);
        assert_eq!(
            store.copy(a).unwrap().data,
            [0.5, 0.25],
            "copy left the buffer"
        );
        assert_eq!(store.copy(b).unwrap().data, [6.0, 7.0, 8.0]);
        assert_eq!(store.take(b).unwrap().data, [6.0, 7.0, 8.0]);
        assert!(store.put(b, t(&[1.0])).is_err());
        assert!(
            store.put(a, CpuTensor::new(vec![0.0; 2], 2, 1)).is_err(),
            "a transposed shape was taken"
        );
        drop(store);
        assert!(!path.exists(), "the spill file outlived the store");
    }

    #[test]
    fn a_device_holds_buffers_up_to_its_budget_then_host_memory_then_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".spill");
        // A device budget of 8 bytes (the CPU's tensors standing in for a GPU's).
        let mut store = ActivationStore::new(&CpuBackend, Some(8), 12, path.clone());
        let ids: Vec<usize> = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]
            .iter()
            .map(|v| store.push(t(v)).unwrap())
            .collect();
        assert_eq!(
            store.stats(),
            CacheStats {
                on_device_bytes: 8,
                in_memory_bytes: 8,
                spilled_bytes: 24
            }
        );
        assert_eq!(store.stats().total_bytes(), 40);
        for (i, &id) in ids.iter().enumerate() {
            let v = store.take(id).unwrap();
            let x = 2.0 * i as f32 + 1.0;
            assert_eq!(v.data, [x, x + 1.0]);
            store.put(id, t(&[-x, -x - 1.0])).unwrap();
            assert_eq!(store.copy(id).unwrap().data, [-x, -x - 1.0]);
        }
    }
}
