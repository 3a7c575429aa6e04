//! The files of a model directory that `transformers` loads: safetensors shards laid out in
//! advance and written tensor by tensor, the index, and the sidecar files. They are written
//! into a staged output (`super::output`), which is renamed into place when complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::collections::HashMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

use super::safetensors::{check_f32_target, encode_f32, header_bytes, OutTensor, TensorData};
use super::Dtype;
use crate::error::{Error, Result};

/// Writes tensors as `model.safetensors`, or as `model-0000i-of-0000N.safetensors` shards of
/// at most `shard_bytes` each plus `model.safetensors.index.json`, with `{"format": "pt"}`
/// metadata as transformers expects. Returns the file names written.
pub fn write_model_tensors(
    dir: &Path,
    tensors: &[OutTensor<'_>],
    shard_bytes: u64,
) -> Result<Vec<String>> {
    let plan: Vec<PlannedTensor> = tensors.iter().map(PlannedTensor::from).collect();
    let mut writer = ModelWriter::create(dir, &plan, shard_bytes)?;
    for t in tensors {
        match &t.data {
            TensorData::F32(v) => writer.write_f32(&t.name, v)?,
            TensorData::Raw(b) => writer.write_raw(&t.name, b)?,
        }
    }
    writer.finish()
}

/// A tensor of a model being written: where it goes is known before its values are.
#[derive(Clone, Debug)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Its size in the file, in bytes.
    pub byte_len: usize,
}

impl From<&OutTensor<'_>> for PlannedTensor {
    fn from(t: &OutTensor<'_>) -> Self {
        PlannedTensor {
            name: t.name.clone(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            byte_len: t.byte_len(),
        }
    }
}

/// A model's safetensors files laid out in advance (headers written, every tensor's place
/// fixed), so that each tensor can be written as soon as it is ready, in any order: a merge
/// writes its averaged tensors and every solved layer while it still solves the rest. The
/// files are byte for byte those that writing the tensors in plan order would make.
pub struct ModelWriter {
    dir: PathBuf,
    files: Vec<PlannedFile>,
    tensors: Vec<Slot>,
    by_name: HashMap<String, usize>,
    encoded: Vec<u8>,
}

struct PlannedFile {
    name: String,
    file: File,
    /// Bytes written since this file was last flushed to disk.
    unsynced: u64,
}

/// A file is flushed to disk each time this much has been written to it, so that the disk
/// works while the merge still solves and the final flush finds little left.
const SYNC_EVERY: u64 = 64 << 20;

struct Slot {
    planned: PlannedTensor,
    file: usize,
    /// From the start of the file.
    offset: u64,
    written: bool,
}

impl ModelWriter {
    /// Creates the files of `plan` in `dir` (one, or shards of at most `shard_bytes`, split
    /// where plan order crosses the limit) and writes their headers.
    pub fn create(dir: &Path, plan: &[PlannedTensor], shard_bytes: u64) -> Result<Self> {
        let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
        let mut current = 0u64;
        for (i, t) in plan.iter().enumerate() {
            let len = t.byte_len as u64;
            if current > 0 && current + len > shard_bytes {
                shards.push(Vec::new());
                current = 0;
            }
            shards.last_mut().expect("non-empty").push(i);
            current += len;
        }
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let n = shards.len();
        let mut by_name = HashMap::with_capacity(plan.len());
        let mut tensors: Vec<Option<Slot>> = (0..plan.len()).map(|_| None).collect();
        let mut files = Vec::with_capacity(n);
        for (s, members) in shards.iter().enumerate() {
            let name = if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", s + 1, n)
            };
            let path = dir.join(&name);
            let header = header_bytes(
                members.iter().map(|&i| {
                    let t = &plan[i];
                    (t.name.as_str(), &t.dtype, t.shape.as_slice(), t.byte_len)
                }),
                &meta,
            );
            let mut file = File::create(&path).map_err(|e| Error::io(&path, e))?;
            file.write_all(&(header.len() as u64).to_le_bytes())
                .and_then(|()| file.write_all(&header))
                .map_err(|e| Error::io(&path, e))?;
            let mut offset = 8 + header.len() as u64;
            for &i in members {
                let t = &plan[i];
                if by_name.insert(t.name.clone(), i).is_some() {
                    return Err(Error::invalid(format!(
                        "tensor `{}` is planned twice for {}",
                        t.name,
                        dir.display()
                    )));
                }
                tensors[i] = Some(Slot {
                    planned: t.clone(),
                    file: s,
                    offset,
                    written: false,
                });
                offset += t.byte_len as u64;
            }
            files.push(PlannedFile {
                name,
                file,
                unsynced: 0,
            });
        }
        Ok(ModelWriter {
            dir: dir.to_path_buf(),
            files,
            tensors: tensors
                .into_iter()
                .map(|t| t.expect("every tensor is in a shard"))
                .collect(),
            by_name,
            encoded: Vec::new(),
        })
    }

    /// The planned size of tensor `name` in bytes (0 when it is not in the plan).
    pub fn planned_len(&self, name: &str) -> usize {
        self.by_name
            .get(name)
            .map_or(0, |&i| self.tensors[i].planned.byte_len)
    }

    /// The planned tensor `name`, checked to be unwritten and `byte_len` long.
    fn slot(&mut self, name: &str, byte_len: usize) -> Result<usize> {
        let i = *self
            .by_name
            .get(name)
            .ok_or_else(|| Error::invalid(format!("tensor `{name}` is not in the plan")))?;
        let slot = &self.tensors[i];
        if slot.written {
            return Err(Error::invalid(format!("tensor `{name}` is written twice")));
        }
        if slot.planned.byte_len != byte_len {
            return Err(Error::invalid(format!(
                "tensor `{name}`: {byte_len} bytes given, {} planned",
                slot.planned.byte_len
            )));
        }
        Ok(i)
    }

    /// Writes `bytes` into file `file` at `offset`.
    fn put(&mut self, file: usize, offset: u64, bytes: &[u8]) -> Result<()> {
        let f = &mut self.files[file];
        f.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| f.file.write_all(bytes))
            .map_err(|e| Error::io(self.dir.join(&f.name), e))?;
        f.unsynced += bytes.len() as u64;
        if f.unsynced >= SYNC_EVERY {
            f.file
                .sync_data()
                .map_err(|e| Error::io(self.dir.join(&f.name), e))?;
            f.unsynced = 0;
        }
        Ok(())
    }

    /// Writes f32 values as the planned tensor `name`, converted to its dtype.
    pub fn write_f32(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let dtype = match self.by_name.get(name) {
            Some(&i) => self.tensors[i].planned.dtype.clone(),
            None => {
                return Err(Error::invalid(format!(
                    "tensor `{name}` is not in the plan"
                )))
            }
        };
        check_f32_target(name, &dtype)?;
        let size = dtype.float_size().expect("checked");
        let i = self.slot(name, values.len() * size)?;
        let (file, mut offset) = (self.tensors[i].file, self.tensors[i].offset);
        // Converted a bounded chunk at a time: no second copy of a large tensor.
        const CHUNK: usize = 1 << 18;
        let mut encoded = std::mem::take(&mut self.encoded);
        let result = values.chunks(CHUNK).try_for_each(|chunk| -> Result<()> {
            encoded.clear();
            encode_f32(&dtype, chunk, &mut encoded);
            self.put(file, offset, &encoded)?;
            offset += encoded.len() as u64;
            Ok(())
        });
        self.encoded = encoded;
        result?;
        self.tensors[i].written = true;
        Ok(())
    }

    /// Writes the planned tensor `name` from its stored bytes, as they are.
    pub fn write_raw(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let i = self.slot(name, bytes.len())?;
        let (file, offset) = (self.tensors[i].file, self.tensors[i].offset);
        self.put(file, offset, bytes)?;
        self.tensors[i].written = true;
        Ok(())
    }

    /// Checks that every planned tensor was written, flushes every file to disk (so that a
    /// full disk surfaces here, not later) and writes `model.safetensors.index.json` when
    /// there are shards. Returns the file names written.
    pub fn finish(self) -> Result<Vec<String>> {
        if let Some(missing) = self.tensors.iter().find(|t| !t.written) {
            return Err(Error::invalid(format!(
                "tensor `{}` of {} was never written",
                missing.planned.name,
                self.dir.display()
            )));
        }
        // A test hook: slows writing down so that tests can interrupt it mid-way.
        let delay = std::env::var("REGMEAN_TEST_WRITE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis);
        let mut names = Vec::with_capacity(self.files.len() + 1);
        for f in &self.files {
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            let path = self.dir.join(&f.name);
            f.file.sync_all().map_err(|e| Error::io(&path, e))?;
            names.push(f.name.clone());
        }
        if self.files.len() > 1 {
            let mut weight_map = BTreeMap::new();
            let mut total = 0u64;
            for t in &self.tensors {
                weight_map.insert(t.planned.name.clone(), self.files[t.file].name.clone());
                total += t.planned.byte_len as u64;
            }
            let index =
                serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let p = self.dir.join("model.safetensors.index.json");
            std::fs::write(&p, serde_json::to_string_pretty(&index).expect("json"))
                .map_err(|e| Error::io(&p, e))?;
            names.push("model.safetensors.index.json".into());
        }
        Ok(names)
    }
}

/// Tokenizer and preprocessing files a merged model should carry from its base model.
pub const SIDECAR_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "preprocessor_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Copies the sidecar files present in `from` into `to`; returns those copied.
pub fn copy_sidecars(from: &Path, to: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in SIDECAR_FILES {
        let src = from.join(name);
        if src.is_file() {
            let dst = to.join(name);
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
            copied.push(name.to_string());
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::{Dtype, TensorData};

    #[test]
    fn shards_split_by_size_with_an_index() {
        let root = tempfile::tempdir().unwrap();
        let a = vec![1.0f32; 100];
        let ts: Vec<OutTensor> = (0..3)
            .map(|i| OutTensor {
                name: format!("t{i}"),
                dtype: Dtype::F32,
                shape: vec![100],
                data: TensorData::F32(&a),
            })
            .collect();
        let files = write_model_tensors(root.path(), &ts, 800).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        let idx: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.path().join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(idx["weight_map"]["t2"], "model-00002-of-00002.safetensors");
        assert_eq!(idx["metadata"]["total_size"], 1200);
    }

    fn planned(ts: &[OutTensor<'_>]) -> Vec<PlannedTensor> {
        ts.iter().map(PlannedTensor::from).collect()
    }

    /// Tensors of several dtypes and sizes, one of them raw bytes, some larger than a chunk.
    fn sample<'a>(values: &'a [Vec<f32>], raw: &'a [u8]) -> Vec<OutTensor<'a>> {
        let dtypes = [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64];
        let mut ts: Vec<OutTensor> = values
            .iter()
            .enumerate()
            .map(|(i, v)| OutTensor {
                name: format!("layer.{i}.weight"),
                dtype: dtypes[i % dtypes.len()].clone(),
                shape: vec![v.len()],
                data: TensorData::F32(v),
            })
            .collect();
        ts.insert(
            2,
            OutTensor {
                name: "position_ids".into(),
                dtype: Dtype::Other("I64".into()),
                shape: vec![raw.len() / 8],
                data: TensorData::Raw(raw),
            },
        );
        ts
    }

    fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).unwrap())
            })
            .collect()
    }

    #[test]
    fn tensors_written_in_any_order_make_the_files_of_a_sequential_write() {
        let values: Vec<Vec<f32>> = [5usize, 300_000, 7, 1, 70_000, 12]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (j as f32 * 0.37 - i as f32).sin()).collect())
            .collect();
        let raw: Vec<u8> = (0..8 * 9).map(|b| b as u8).collect();
        let ts = sample(&values, &raw);
        for shard_bytes in [u64::MAX, 400_000] {
            let one = tempfile::tempdir().unwrap();
            let mut meta = BTreeMap::new();
            meta.insert("format".to_string(), "pt".to_string());
            // Each file as the sequential writer makes it, from the tensors it should hold
            // (20 B | 600,000 B | the five others, 280,118 B, against a 400,000 B limit).
            let shards: Vec<(String, std::ops::Range<usize>)> = if shard_bytes == u64::MAX {
                vec![("model.safetensors".into(), 0..ts.len())]
            } else {
                [0..1, 1..2, 2..ts.len()]
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| (format!("model-{:05}-of-00003.safetensors", i + 1), r))
                    .collect()
            };
            for (file, range) in &shards {
                let group: Vec<OutTensor> = ts[range.clone()]
                    .iter()
                    .map(|t| OutTensor {
                        name: t.name.clone(),
                        dtype: t.dtype.clone(),
                        shape: t.shape.clone(),
                        data: match t.data {
                            TensorData::F32(v) => TensorData::F32(v),
                            TensorData::Raw(b) => TensorData::Raw(b),
                        },
                    })
                    .collect();
                crate::io::safetensors::write_file(&one.path().join(file), &group, &meta).unwrap();
            }
            let other = tempfile::tempdir().unwrap();
            let mut w = ModelWriter::create(other.path(), &planned(&ts), shard_bytes).unwrap();
            for t in ts.iter().rev() {
                match &t.data {
                    TensorData::F32(v) => w.write_f32(&t.name, v).unwrap(),
                    TensorData::Raw(b) => w.write_raw(&t.name, b).unwrap(),
                }
            }
            let names = w.finish().unwrap();
            let (want, mut got) = (files_of(one.path()), files_of(other.path()));
            if shards.len() > 1 {
                let index = got
                    .remove("model.safetensors.index.json")
                    .expect("an index");
                let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
                assert_eq!(
                    index["weight_map"]["position_ids"],
                    "model-00003-of-00003.safetensors"
                );
            }
            assert_eq!(
                want.keys().collect::<Vec<_>>(),
                got.keys().collect::<Vec<_>>()
            );
            for (name, bytes) in &want {
                assert!(got[name] == *bytes, "{name} differs");
            }
            assert_eq!(names.len(), want.len() + usize::from(shards.len() > 1));
        }
    }

    #[test]
    fn a_writer_refuses_what_breaks_its_plan_and_names_the_tensor() {
        let values = vec![vec![1.0f32; 4], vec![2.0f32; 3]];
        let raw = [0u8; 8];
        let ts = sample(&values, &raw);
        let dir = tempfile::tempdir().unwrap();
        let mut w = ModelWriter::create(dir.path(), &planned(&ts), u64::MAX).unwrap();
        let err = |r: Result<()>| r.unwrap_err().to_string();
        assert!(err(w.write_f32("nope", &[1.0])).contains("`nope` is not in the plan"));
        let e = err(w.write_f32("layer.0.weight", &[1.0; 5]));
        assert!(
            e.contains("`layer.0.weight`: 20 bytes given, 16 planned"),
            "{e}"
        );
        let e = err(w.write_f32("position_ids", &[1.0, 2.0]));
        assert!(e.contains("cannot write f32 data as"), "{e}");
        w.write_f32("layer.0.weight", &values[0]).unwrap();
        let e = err(w.write_f32("layer.0.weight", &values[0]));
        assert!(e.contains("`layer.0.weight` is written twice"), "{e}");
        w.write_raw("position_ids", &raw).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(
            e.contains("`layer.1.weight`") && e.contains("never written"),
            "{e}"
        );
    }
}
