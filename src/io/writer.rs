//! Output directories that `transformers` loads, written so that nothing incomplete ever
//! sits at the output path: everything goes into a hidden sibling `.NAME.partial-PID`, which
//! is renamed into place only after every file was written and synced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::safetensors::{write_file, OutTensor};
use crate::error::{Error, Result};

/// Temporary outputs of this process, removed if it is interrupted (Ctrl-C, SIGTERM).
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub(crate) fn register_pending(path: &Path) {
    PENDING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path.to_path_buf());
}

pub(crate) fn unregister_pending(path: &Path) {
    PENDING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| p != path);
}

/// On SIGINT/SIGTERM: delete this process's temporary outputs and exit with status 130, so
/// an interrupted run leaves nothing behind. (A SIGKILL cannot be caught: its leftovers are
/// hidden `.NAME.partial-PID` entries, removed by the next run that writes the same output.)
pub fn install_interrupt_cleanup() {
    let _ = ctrlc::set_handler(|| {
        let pending = PENDING.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for p in &pending {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
        }
        eprintln!("\ninterrupted: removed the partial output; nothing was written");
        std::process::exit(130);
    });
}

/// Removes `.NAME.partial-PID` siblings left by processes that no longer run (killed runs).
fn remove_stale_partials(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

pub struct OutputDir {
    final_path: PathBuf,
    tmp_path: PathBuf,
    committed: bool,
}

impl OutputDir {
    /// Prepares a temporary sibling of `out`. Refuses an existing `out` unless `force`.
    pub fn create(out: &Path, force: bool) -> Result<Self> {
        if out.exists() && !force {
            return Err(Error::file(
                out,
                "output already exists; choose another path or pass --force to replace it",
            ));
        }
        let name = out
            .file_name()
            .ok_or_else(|| Error::file(out, "output path has no directory name"))?
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
        remove_stale_partials(&parent, &name);
        let tmp_path = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if tmp_path.exists() {
            std::fs::remove_dir_all(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
        }
        std::fs::create_dir(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
        register_pending(&tmp_path);
        Ok(OutputDir {
            final_path: out.to_path_buf(),
            tmp_path,
            committed: false,
        })
    }

    /// Where files go until `commit`.
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

    /// Moves the finished directory into place (replacing an old one when forced).
    pub fn commit(mut self) -> Result<()> {
        let old = if self.final_path.exists() {
            let name = self
                .final_path
                .file_name()
                .expect("checked")
                .to_string_lossy()
                .into_owned();
            let old = self
                .tmp_path
                .with_file_name(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&self.final_path, &old).map_err(|e| Error::io(&self.final_path, e))?;
            Some(old)
        } else {
            None
        };
        std::fs::rename(&self.tmp_path, &self.final_path)
            .map_err(|e| Error::io(&self.final_path, e))?;
        self.committed = true;
        unregister_pending(&self.tmp_path);
        if let Some(old) = old {
            let is_dir = old.is_dir();
            let r = if is_dir {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            r.map_err(|e| Error::io(&old, e))?;
        }
        Ok(())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp_path);
            unregister_pending(&self.tmp_path);
        }
    }
}

/// Writes tensors as `model.safetensors`, or as `model-0000i-of-0000N.safetensors` shards of
/// at most `shard_bytes` each plus `model.safetensors.index.json`, with `{"format": "pt"}`
/// metadata as transformers expects. Returns the file names written.
pub fn write_model_tensors(
    dir: &Path,
    tensors: &[OutTensor<'_>],
    shard_bytes: u64,
) -> Result<Vec<String>> {
    let mut shards: Vec<Vec<&OutTensor<'_>>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let len = t.byte_len() as u64;
        if current > 0 && current + len > shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        shards.last_mut().expect("non-empty").push(t);
        current += len;
    }
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    if shards.len() == 1 {
        let owned: Vec<OutTensor<'_>> = shards[0].iter().map(|t| reborrow(t)).collect();
        write_file(&dir.join("model.safetensors"), &owned, &meta)?;
        return Ok(vec!["model.safetensors".into()]);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut names = Vec::new();
    let mut total = 0u64;
    // A test hook: slows writing down so that tests can interrupt it mid-way.
    let delay = std::env::var("REGMEAN_TEST_WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis);
    for (i, shard) in shards.iter().enumerate() {
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let owned: Vec<OutTensor<'_>> = shard.iter().map(|t| reborrow(t)).collect();
        write_file(&dir.join(&file), &owned, &meta)?;
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone());
            total += t.byte_len() as u64;
        }
        names.push(file);
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let p = dir.join("model.safetensors.index.json");
    std::fs::write(&p, serde_json::to_string_pretty(&index).expect("json"))
        .map_err(|e| Error::io(&p, e))?;
    names.push("model.safetensors.index.json".into());
    Ok(names)
}

fn reborrow<'a>(t: &'a OutTensor<'_>) -> OutTensor<'a> {
    use super::safetensors::TensorData;
    OutTensor {
        name: t.name.clone(),
        dtype: t.dtype.clone(),
        shape: t.shape.clone(),
        data: match &t.data {
            TensorData::F32(v) => TensorData::F32(v),
            TensorData::Raw(b) => TensorData::Raw(b),
        },
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
    fn uncommitted_output_leaves_nothing_behind() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("merged");
        {
            let dir = OutputDir::create(&out, false).unwrap();
            dir.write_text("config.json", "{}").unwrap();
        }
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn existing_output_needs_force_and_is_replaced_whole() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("merged");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("stale.txt"), "x").unwrap();
        let err = OutputDir::create(&out, false).err().unwrap().to_string();
        assert!(err.contains("--force"), "{err}");
        let dir = OutputDir::create(&out, true).unwrap();
        dir.write_text("config.json", "{}").unwrap();
        dir.commit().unwrap();
        assert!(out.join("config.json").exists() && !out.join("stale.txt").exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

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
}
