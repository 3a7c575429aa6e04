//! Hugging Face model directories: `config.json` plus `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Tensor names are mapped to one canonical backbone layout
//! per architecture, so that checkpoints saved by different heads and transformers versions
//! merge together:
//! - GPT-2: `GPT2Model` names (`h.0.attn.c_attn.weight`); a `transformer.` prefix (from
//!   `GPT2ForSequenceClassification`) is stripped and heads such as `score` are not backbone.
//! - CLIP vision: `CLIPVisionModel` names of transformers 4.x (`vision_model.encoder...`);
//!   bare keys (`encoder.layers...`) get the prefix, and a full `CLIPModel`'s text tower and
//!   projections are not backbone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::arch::{Arch, DecoderFamily, SUPPORTED_DECODERS};
use super::mapped::FileStamp;
use super::safetensors::{Dtype, SafetensorsFile, TensorEntry};
use rayon::prelude::*;

use crate::error::{Error, Result};

pub struct Checkpoint {
    dir: PathBuf,
    config: serde_json::Value,
    arch: Arch,
    files: Vec<SafetensorsFile>,
    /// canonical name → (index into `files`, name as stored)
    backbone: BTreeMap<String, (usize, String)>,
}

impl Checkpoint {
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
    use super::first_non_finite;

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
