//! Hugging Face hub ids (`org/name`, `org/name@revision`) as model paths: resolved from the
//! local cache in the layout `huggingface_hub` writes (`models--org--name/refs/<branch>`
//! naming a commit, `snapshots/<commit>/` holding links into `blobs/`), downloaded into it
//! with the `hf-hub` crate when they are missing, never when `HF_HUB_OFFLINE` is set.

use std::path::{Path, PathBuf};

/// A model repository on the hub and the revision asked for (None: `main`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubId {
    /// `org/name` or `org/name@revision`, with the hub's repository-name rules (letters,
    /// digits, `-`, `_`, `.`; no `--` or `..`; not starting or ending with `-` or `.`);
    /// None for anything else (a path such as `./x`, `a/b/c` or `/abs`).
    pub fn parse(s: &str) -> Option<HubId> {
        let (repo, revision) = match s.split_once('@') {
            Some((repo, rev))
                if !rev.is_empty()
                    && !rev.contains(char::is_whitespace)
                    && !rev.contains("..")
                    && !rev.starts_with('/') =>
            {
                (repo, Some(rev.to_string()))
            }
            Some(_) => return None,
            None => (s, None),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 96
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !p.contains("--")
                && !p.contains("..")
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
        };
        (part_ok(org) && part_ok(name)).then(|| HubId {
            repo: repo.to_string(),
            revision,
        })
    }

    fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }
}

/// A hub id found (or put) in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// `…/models--org--name/snapshots/<commit>`: the model directory.
    pub snapshot: PathBuf,
    /// `…/models--org--name`: the snapshot's links point into its `blobs/`.
    pub repo_dir: PathBuf,
}

/// The hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .unwrap_or_else(|| {
            var("HOME")
                .unwrap_or_default()
                .join(".cache/huggingface/hub")
        })
}

/// Whether `HF_HUB_OFFLINE` forbids downloads (`1`, `true`, `yes`, `on`, as huggingface_hub
/// reads it).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// The id's snapshot in the cache, downloading it first when it is not there and downloads
/// are allowed. The error is one line naming the id and the cache searched.
pub fn resolve(id: &HubId) -> Result<Resolved, String> {
    resolve_with(id, !offline())
}

/// [`resolve`] that never downloads, whatever `HF_HUB_OFFLINE` says (for the fuzzers).
pub fn resolve_cached(id: &HubId) -> Result<Resolved, String> {
    resolve_with(id, false)
}

fn resolve_with(id: &HubId, may_download: bool) -> Result<Resolved, String> {
    let cache = cache_dir();
    if let Some(found) = cached(&cache, id) {
        return Ok(found);
    }
    let repo_dir = cache.join(repo_folder(&id.repo));
    if !may_download {
        return Err(format!(
            "hub id `{}` (revision {}) is not in the Hugging Face cache (searched {}) and HF_HUB_OFFLINE is set: download it once online, or give a local directory",
            id.repo,
            id.revision(),
            repo_dir.display()
        ));
    }
    download(&cache, id).map_err(|e| {
        format!(
            "hub id `{}` (revision {}) is not in the Hugging Face cache ({}) and downloading it failed: {e}",
            id.repo,
            id.revision(),
            repo_dir.display()
        )
    })?;
    cached(&cache, id).ok_or_else(|| {
        format!(
            "hub id `{}`: downloaded, but no snapshot of revision {} appeared in {}",
            id.repo,
            id.revision(),
            repo_dir.display()
        )
    })
}

fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// The snapshot a revision names in `cache`: `refs/<revision>` holds a commit, or the
/// revision is a commit whose snapshot is there.
fn cached(cache: &Path, id: &HubId) -> Option<Resolved> {
    let repo_dir = cache.join(repo_folder(&id.repo));
    let rev = id.revision();
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(rev))
        .ok()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty() && !c.contains(['/', '\\']))
        .unwrap_or_else(|| rev.to_string());
    if commit.contains(['/', '\\']) || commit == ".." {
        return None;
    }
    let snapshot = repo_dir.join("snapshots").join(commit);
    snapshot.is_dir().then_some(Resolved { snapshot, repo_dir })
}

/// The files of a model directory this crate reads (weights, configs, tokenizer,
/// preprocessor, chat template); other formats (`pytorch_model.bin`, TF, Flax, ONNX) are
/// not downloaded.
fn wanted(file: &str) -> bool {
    let top_level = !file.contains('/');
    top_level
        && (file.ends_with(".safetensors")
            || file.ends_with(".json")
            || file.ends_with(".jinja")
            || file.ends_with(".txt")
            || file == "README.md")
}

/// Downloads the model's files into the cache (huggingface_hub's layout).
fn download(cache: &Path, id: &HubId) -> Result<(), String> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let api = ApiBuilder::from_env()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = api.repo(Repo::with_revision(
        id.repo.clone(),
        RepoType::Model,
        id.revision().to_string(),
    ));
    let info = repo.info().map_err(|e| e.to_string())?;
    let files: Vec<&str> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.as_str())
        .filter(|f| wanted(f))
        .collect();
    if !files.contains(&"config.json") {
        return Err("the repository has no config.json: not a transformers model".into());
    }
    for f in files {
        eprintln!("downloading {}/{f}", id.repo);
        repo.get(f).map_err(|e| format!("{f}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_told_from_paths() {
        let id = |s: &str| HubId::parse(s);
        assert_eq!(
            id("openai/clip-vit-base-patch32"),
            Some(HubId {
                repo: "openai/clip-vit-base-patch32".into(),
                revision: None
            })
        );
        assert_eq!(
            id("tanganke/clip-vit-base-patch32_dtd@v1.0")
                .unwrap()
                .revision,
            Some("v1.0".into())
        );
        for not_an_id in [
            "./task_a",
            "task_a",
            "/abs/path",
            "a/b/c",
            "../x",
            "a/..",
            "org/",
            "/name",
            "org/na me",
            "org/name@",
            "a--b/c",
            ".hidden/x",
            "x/y.",
            "o/n@../../x",
        ] {
            assert_eq!(id(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn a_ref_names_the_snapshot_and_a_commit_names_itself() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--org--name");
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/def456")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let at = |rev: Option<&str>| {
            let id = HubId {
                repo: "org/name".into(),
                revision: rev.map(String::from),
            };
            cached(cache.path(), &id).map(|r| r.snapshot)
        };
        assert_eq!(at(None), Some(repo.join("snapshots/abc123")));
        assert_eq!(at(Some("def456")), Some(repo.join("snapshots/def456")));
        assert_eq!(at(Some("dev")), None);
    }
}
