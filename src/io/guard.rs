//! The inputs of a run, and the rule that keeps every output away from them: an output may
//! not be an input, contain one (replacing it with `--force` would delete it) or lie inside
//! one (writing there would change a model directory or a data folder). Paths are compared
//! after symlinks and `..` are resolved, so a link or a detour cannot get around the rule.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The files and folders a run reads, each with what it is to the run (for messages).
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    items: Vec<Input>,
}

#[derive(Clone, Debug)]
struct Input {
    /// "the base model", "the data of models[1]", ...
    role: String,
    /// As the user gave it, for messages.
    shown: PathBuf,
    resolved: PathBuf,
}

impl Inputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an input; `role` says what it is to the run ("the base model").
    pub fn add(&mut self, role: impl Into<String>, path: &Path) {
        self.items.push(Input {
            role: role.into(),
            shown: path.to_path_buf(),
            resolved: resolve(path),
        });
    }

    /// Refuses `out` when it is, contains or lies inside an input, or contains the current or
    /// home directory. The error names the output and the input it would destroy.
    pub fn check_output(&self, out: &Path) -> Result<()> {
        let o = resolve(out);
        for i in &self.items {
            let how = if o == i.resolved {
                "is"
            } else if i.resolved.starts_with(&o) {
                "contains"
            } else if o.starts_with(&i.resolved) {
                "lies inside"
            } else {
                continue;
            };
            return Err(Error::file(
                out,
                format!(
                    "refusing to write here: this path {how} {} ({}), an input of this run; inputs are never replaced or changed, --force included: choose an output outside them",
                    i.shown.display(),
                    i.role
                ),
            ));
        }
        let protected = [
            ("the current directory", std::env::current_dir().ok()),
            (
                "your home directory",
                std::env::var_os("HOME").map(PathBuf::from),
            ),
        ];
        for (what, dir) in protected {
            if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty()) {
                if resolve(&dir).starts_with(&o) {
                    return Err(Error::file(
                        out,
                        format!("refusing to write here: this path is or contains {what}; choose a new directory for the output"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `path` made absolute with every symlink and `..` resolved, as far as it exists; the part
/// that does not exist yet is appended as written (it can hold no link).
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = PathBuf::new();
    let mut exists = true;
    for c in abs.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => out.push(c.as_os_str()),
            Component::CurDir => {}
            // `out` is canonical while it exists, so its parent is the real parent.
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if exists {
                    match std::fs::canonicalize(&out) {
                        Ok(real) => out = real,
                        Err(_) => exists = false,
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> (tempfile::TempDir, Inputs) {
        let root = tempfile::tempdir().unwrap();
        let p = root.path();
        std::fs::create_dir_all(p.join("pool/task_a")).unwrap();
        std::fs::write(p.join("pool/merge.yaml"), "x").unwrap();
        std::fs::write(p.join("pool/a.jsonl"), "x").unwrap();
        let mut inputs = Inputs::new();
        inputs.add("the config", &p.join("pool/merge.yaml"));
        inputs.add("the model of models[0]", &p.join("pool/task_a"));
        inputs.add("the data of models[0]", &p.join("pool/a.jsonl"));
        (root, inputs)
    }

    #[test]
    fn outputs_on_around_or_inside_inputs_are_refused() {
        let (root, inputs) = pool();
        let p = root.path();
        for (out, how) in [
            ("pool/task_a", "is"),
            ("pool/merge.yaml", "is"),
            ("pool", "contains"),
            ("pool/task_a/merged", "lies inside"),
            ("pool/task_a/../task_a", "is"),
            ("pool/a.jsonl/x", "lies inside"),
        ] {
            let err = inputs.check_output(&p.join(out)).unwrap_err().to_string();
            assert!(
                err.contains(how) && err.contains("an input of this run"),
                "{out}: {err}"
            );
        }
        for out in [
            "pool/merged",
            "merged",
            "pool/task_ab",
            "pool/nothing/../merged",
        ] {
            inputs.check_output(&p.join(out)).unwrap();
        }
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_resolved_on_both_sides() {
        let (root, inputs) = pool();
        let p = root.path();
        std::os::unix::fs::symlink(p.join("pool/task_a"), p.join("link")).unwrap();
        std::os::unix::fs::symlink(p.join("pool"), p.join("pool_link")).unwrap();
        for out in ["link", "link/merged", "pool_link", "pool_link/task_a/x"] {
            let err = inputs.check_output(&p.join(out)).unwrap_err().to_string();
            assert!(err.contains("an input of this run"), "{out}: {err}");
        }
        // An input given through a link is found through its target too.
        let mut via_link = Inputs::new();
        via_link.add("the base model", &p.join("link"));
        assert!(via_link.check_output(&p.join("pool/task_a")).is_err());
        assert!(via_link.check_output(&p.join("pool_link/merged")).is_ok());
    }

    #[test]
    fn the_current_directory_is_never_an_output() {
        let inputs = Inputs::new();
        let cwd = std::env::current_dir().unwrap();
        assert!(inputs.check_output(&cwd).is_err());
        assert!(inputs.check_output(Path::new(".")).is_err());
        assert!(inputs.check_output(Path::new("/")).is_err());
        assert!(inputs.check_output(&cwd.join("some-new-output")).is_ok());
    }
}
