//! Hugging Face model directories: `config.json` plus `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Tensor names are mapped to one canonical backbone layout
//! per architecture, so that checkpoints saved by different heads and transformers versions
//! merge together:
//! - GPT-2: `GPT2Model` names (`h.0.attn.c_attn.weight`); a `transformer.` prefix (from
//!   `GPT2ForSequenceClassification`) is stripped and heads such as `score` are not backbone.
//! - CLIP vision: `CLIPVisionModel` names of transformers 4.x (`vision_model.encoder...`);
//!   bare keys (`encoder.layers...`) get the prefix, and a full `CLIPModel`'s text tower and
//!   projections are not backbone.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::arch::{Arch, DecoderFamily, SUPPORTED_DECODERS};
use super::mapped::FileStamp;
use super::safetensors::{Dtype, SafetensorsFile, TensorEntry};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// A value [`Checkpoint::keep`] holds: a host decode, or a weight's copy on a GPU.
type Kept = Arc<dyn Any + Send + Sync>;

pub struct Checkpoint {
    dir: PathBuf,
    config: serde_json::Value,
    arch: Arch,
    files: Vec<SafetensorsFile>,
    /// canonical name → (index into `files`, name as stored)
    backbone: BTreeMap<String, (usize, String)>,
    /// Values derived from tensors, kept between their first and last use in a merge (a
    /// linear weight is read for the forward pass, then again for G'W): host decodes, or a
    /// weight's copy on a GPU. Each is made once.
    kept: Mutex<HashMap<String, Kept>>,
    keeping: AtomicBool,
}

impl Checkpoint {
    /// From now on, [`Checkpoint::keep`] keeps what it makes (a merge turns this on: it
    /// reads each linear weight twice).
    pub fn set_keeping(&self, on: bool) {
        self.keeping.store(on, Ordering::Relaxed);
    }

    /// A derived tensor under `key`, computed by `make` the first time and, when keeping is
    /// on, kept for a later [`Checkpoint::take_kept`]. The host decode and the GPU's copy of
    /// a weight are both kept this way, under different keys.
    pub fn keep<T: Any + Send + Sync>(
        &self,
        key: &str,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        if !self.keeping.load(Ordering::Relaxed) {
            return make().map(Arc::new);
        }
        if let Some(v) = self.kept().get(key).cloned() {
            if let Ok(v) = v.downcast::<T>() {
                return Ok(v);
            }
        }
        let v = Arc::new(make()?);
        self.kept().insert(key.to_string(), v.clone());
        Ok(v)
    }

    /// The value kept under `key` (then forgotten), or `make`'s when none of type T was kept.
    pub fn take_kept<T: Any + Send + Sync>(
        &self,
        key: &str,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        // Out of the lock before `make`, which may read this checkpoint's kept values too.
        let kept = self.kept().remove(key);
        match kept.map(|v| v.downcast::<T>()) {
            Some(Ok(v)) => Ok(v),
            _ => make().map(Arc::new),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, HashMap<String, Kept>> {
        // Entries are inserted whole: a panic elsewhere cannot leave one half-made.
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_view(dir.as_ref(), false)
    }

    /// Every tensor of the directory under its stored name, heads and other towers included
    /// (a `CLIPModel`'s text tower, a classifier's `score`), for evaluation.
    pub fn open_all(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_view(dir.as_ref(), true)
    }

    fn open_view(dir: &Path, all: bool) -> Result<Self> {
        let dir = dir.to_path_buf();
        if !dir.is_dir() {
            return Err(Error::file(
                &dir,
                "not a model directory (expected a folder with config.json and model.safetensors)",
            ));
        }
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&config_path, format!("invalid JSON: {e}")))?;
        let arch = match config.get("model_type").and_then(|v| v.as_str()) {
            Some("gpt2") => Arch::Gpt2,
            Some("clip") | Some("clip_vision_model") => Arch::ClipVision,
            Some(other) => match DecoderFamily::from_model_type(other) {
                Some(family) => Arch::CausalLm(family),
                None => {
                    return Err(Error::file(
                        &config_path,
                        format!(
                            "unsupported model_type `{other}` (supported: gpt2, clip, clip_vision_model, {SUPPORTED_DECODERS})"
                        ),
                    ))
                }
            },
            None => return Err(Error::file(&config_path, "no `model_type` field")),
        };

        let files = open_weight_files(&dir)?;
        let mut backbone = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for stored in f.tensors().keys() {
                let name = if all {
                    Some(stored.clone())
                } else {
                    arch.canonical(stored)
                };
                if let Some(canonical) = name {
                    if let Some((_, prev)) = backbone.insert(canonical.clone(), (i, stored.clone()))
                    {
                        return Err(Error::file(
                            f.path(),
                            format!("tensors `{prev}` and `{stored}` both map to `{canonical}`"),
                        ));
                    }
                }
            }
        }
        // A tied head is the embeddings: a copy some checkpoints also store is not a
        // parameter of its own (merged, it would keep one model's values beside the average).
        let tied = config.get("tie_word_embeddings").and_then(|t| t.as_bool()) == Some(true);
        if matches!(arch, Arch::CausalLm(_)) && tied && !all {
            backbone.remove("lm_head.weight");
        }
        if backbone.is_empty() {
            return Err(Error::file(
                &dir,
                format!("no {} backbone tensors found", arch.title()),
            ));
        }
        Ok(Checkpoint {
            dir,
            config,
            arch,
            files,
            backbone,
            kept: Mutex::new(HashMap::new()),
            keeping: AtomicBool::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The raw config.json.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Canonical backbone tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.backbone.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.backbone.contains_key(name)
    }

    fn locate(&self, name: &str) -> Result<(&SafetensorsFile, &str)> {
        let (i, stored) = self
            .backbone
            .get(name)
            .ok_or_else(|| Error::file(&self.dir, format!("missing tensor `{name}`")))?;
        Ok((&self.files[*i], stored))
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        let (f, stored) = self.locate(name)?;
        f.entry(stored)
    }

    /// The file holding a tensor, for error messages.
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.locate(name)
            .map(|(f, _)| f.path().to_path_buf())
            .unwrap_or_else(|_| self.dir.clone())
    }

    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let (f, stored) = self.locate(name)?;
        f.bytes(stored)
    }

    /// A float tensor as f32, checked for NaN and Inf (a merge must never propagate them).
    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let (f, stored) = self.locate(name)?;
        let v = f.to_f32(stored)?;
        check_finite(f, stored, &v, |i| i)?;
        Ok(v)
    }

    /// A 2-D float tensor stored `[rows, cols]`, as f32 `[cols, rows]` (converted and
    /// transposed in one pass), checked for NaN and Inf like [`Checkpoint::f32`].
    pub fn f32_transposed(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        self.expect_shape(name, &[rows, cols])?;
        let (f, stored) = self.locate(name)?;
        let v = f.to_f32_transposed(stored, rows, cols)?;
        // Name the element as stored, not as transposed.
        check_finite(f, stored, &v, |i| (i % rows) * cols + i / rows)?;
        Ok(v)
    }

    /// A float tensor with an expected shape.
    pub fn f32_shaped(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.expect_shape(name, shape)?;
        self.f32(name)
    }

    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(Error::file(
                self.file_of(name),
                format!(
                    "tensor `{name}` has shape {:?}, expected {:?} from config.json",
                    e.shape, shape
                ),
            ));
        }
        Ok(())
    }

    /// An error naming the first weight file that was truncated while mapped, or whose size,
    /// modification time or inode changed since the checkpoint was opened: for the end of
    /// reading it (bytes borrowed from a truncated map read as zeros).
    pub fn check_unchanged(&self) -> Result<()> {
        self.files
            .iter()
            .try_for_each(SafetensorsFile::check_unchanged)
    }

    /// Its weight files as they were when opened.
    pub fn stamps(&self) -> impl Iterator<Item = &FileStamp> {
        self.files.iter().map(SafetensorsFile::stamp)
    }

    /// A content fingerprint of the backbone: names, dtypes, shapes and bytes of every tensor.
    /// Two checkpoints with the same backbone weights in different key layouts agree.
    pub fn fingerprint(&self) -> Result<String> {
        let mut h = Sha256::new();
        h.update(self.arch.name().as_bytes());
        for name in self.backbone.keys() {
            let e = self.entry(name)?;
            h.update(name.as_bytes());
            h.update(e.dtype.name().as_bytes());
            for d in &e.shape {
                h.update((*d as u64).to_le_bytes());
            }
            h.update(self.bytes(name)?);
        }
        self.check_unchanged()?;
        Ok(format!("sha256:{:x}", h.finalize()))
    }

    /// The float dtype most backbone tensors are stored in (the default output dtype).
    pub fn dominant_float_dtype(&self) -> Dtype {
        let mut counts: BTreeMap<&str, (usize, Dtype)> = BTreeMap::new();
        for name in self.backbone.keys() {
            if let Ok(e) = self.entry(name) {
                if e.dtype.is_float() {
                    counts
                        .entry(e.dtype.name())
                        .or_insert((0, e.dtype.clone()))
                        .0 += e.numel();
                }
            }
        }
        counts
            .into_values()
            .max_by_key(|(n, _)| *n)
            .map(|(_, d)| d)
            .unwrap_or(Dtype::F32)
    }
}

fn open_weight_files(dir: &Path) -> Result<Vec<SafetensorsFile>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![SafetensorsFile::open(&single)?]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        let hint = if dir.join("pytorch_model.bin").exists() {
            " (pytorch_model.bin is not read: re-save the model with save_pretrained(..., safe_serialization=True))"
        } else {
            ""
        };
        return Err(Error::file(
            dir,
            format!("no model.safetensors or model.safetensors.index.json{hint}"),
        ));
    }
    let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&index_path, format!("invalid JSON: {e}")))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::file(&index_path, "no `weight_map` object"))?;
    let mut shard_names: Vec<&str> = Vec::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            Error::file(
                &index_path,
                format!("weight_map entry `{tensor}` is not a file name"),
            )
        })?;
        if shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(Error::file(
                &index_path,
                format!("shard name `{shard}` is not a plain file name"),
            ));
        }
        if !shard_names.contains(&shard) {
            shard_names.push(shard);
        }
    }
    shard_names.sort_unstable();
    let files = shard_names
        .iter()
        .map(|s| SafetensorsFile::open(dir.join(s)))
        .collect::<Result<Vec<_>>>()?;
    // The index must agree with the shards: every listed tensor is where it says.
    for (tensor, shard) in map {
        let shard = shard.as_str().unwrap_or_default();
        let i = shard_names.binary_search(&shard).expect("listed above");
        if !files[i].tensors().contains_key(tensor) {
            return Err(Error::file(
                files[i].path(),
                format!(
                    "missing tensor `{tensor}` that {} places in this shard",
                    index_path.display()
                ),
            ));
        }
    }
    Ok(files)
}

/// An error naming the first NaN or ±Inf of tensor `stored` in the file's order (decoded
/// as `v`; `stored_index` maps a position in `v` to the element's index in the file).
fn check_finite(
    f: &SafetensorsFile,
    stored: &str,
    v: &[f32],
    stored_index: impl Fn(usize) -> usize + Sync,
) -> Result<()> {
    if first_non_finite(v).is_none() {
        return Ok(());
    }
    // Only on the way to an error: in a transposed `v` the first bad value found need not
    // be the first stored.
    let (at, value) = v
        .par_iter()
        .enumerate()
        .filter(|(_, x)| !x.is_finite())
        .map(|(i, x)| (stored_index(i), *x))
        .min_by_key(|(at, _)| *at)
        .expect("a non-finite value was found");
    Err(Error::file(
        f.path(),
        format!("tensor `{stored}` holds a non-finite value ({value}) at element {at}"),
    ))
}

/// The index of the first NaN or ±Inf in `v`. Chunks are tested with a branch-free fold that
/// vectorises (a per-element `position` did not, and cost more than decoding the tensor).
pub(crate) fn first_non_finite(v: &[f32]) -> Option<usize> {
    const CHUNK: usize = 1 << 14;
    let has_non_finite = |c: &[f32]| {
        c.iter().fold(false, |bad, x| {
            bad | ((x.to_bits() & 0x7fff_ffff) >= 0x7f80_0000)
        })
    };
    let chunk = v.par_chunks(CHUNK).position_first(has_non_finite)?;
    let start = chunk * CHUNK;
    v[start..]
        .iter()
        .position(|x| !x.is_finite())
        .map(|i| start + i)
}

#[cfg(test)]
mod tests {
    use super::{first_non_finite, Checkpoint};
    use crate::error::Error;

    #[test]
    fn kept_values_are_typed_and_made_without_the_lock_held() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gpt2_pool/task_a");
        let ckpt = Checkpoint::open(dir).unwrap();
        ckpt.set_keeping(true);
        let a = ckpt.keep("a", || Ok(vec![1.0f32, 2.0])).unwrap();
        assert!(std::sync::Arc::ptr_eq(
            &a,
            &ckpt.keep("a", || Ok(vec![9.0f32])).unwrap()
        ));
        // A make that reads another kept value (a weight made from staged bytes would) must
        // not find the map locked; a value asked for as another type is not handed out.
        let ckpt = std::sync::Arc::new(ckpt);
        let (done, finished) = std::sync::mpsc::channel();
        let shared = ckpt.clone();
        // On a thread of its own: were `make` run under the lock, it would block for good,
        // and the test must fail rather than hang.
        std::thread::spawn(move || {
            let b = shared.take_kept("b", || {
                let inner = shared.take_kept::<Vec<f32>>("a", || Err(Error::invalid("gone")))?;
                Ok(inner.iter().sum::<f32>())
            });
            let _ = done.send(b.map(|b| *b).ok());
        });
        let b = finished
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("take_kept deadlocked: `make` ran with the map locked");
        assert_eq!(b, Some(3.0));
        ckpt.keep("c", || Ok(5u32)).unwrap();
        let c = ckpt.take_kept::<Vec<f32>>("c", || Ok(vec![7.0])).unwrap();
        assert_eq!(*c, vec![7.0]);
    }

    #[test]
    fn first_non_finite_finds_the_first_nan_or_inf_anywhere() {
        let n = 3 * (1 << 14) + 5;
        assert_eq!(first_non_finite(&vec![1.5f32; n]), None);
        assert_eq!(first_non_finite(&[]), None);
        let edge = [f32::MAX, f32::MIN, f32::MIN_POSITIVE, -0.0, 1e-45];
        assert_eq!(first_non_finite(&edge), None);
        let nans = [
            0x7fc0_0000u32,
            0xffc0_0000,
            0x7f80_0001,
            0xff80_0001,
            0x7fff_ffff,
        ];
        let bad_values = [f32::INFINITY, f32::NEG_INFINITY]
            .into_iter()
            .chain(nans.map(f32::from_bits));
        for bad in bad_values {
            for at in [
                0,
                1,
                (1 << 14) - 1,
                1 << 14,
                2 * (1 << 14) + 3,
                n - 2,
                n - 1,
            ] {
                let mut v = vec![0.25f32; n];
                v[at] = bad;
                assert_eq!(first_non_finite(&v), Some(at), "{bad} at {at}");
                // A later one must not hide the first.
                if at < n - 1 {
                    v[n - 1] = f32::NAN;
                    assert_eq!(first_non_finite(&v), Some(at), "{bad} at {at}, NaN last");
                }
            }
        }
    }
}
