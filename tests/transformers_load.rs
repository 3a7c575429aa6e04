//! Models written by `regmean-gpu merge` load in Hugging Face transformers without
//! missing/unexpected keys and give the same hidden states as `regmean-gpu forward`.
//!
//! Runs `scripts/check_transformers_load.py` against this build's binary. The Python
//! interpreter is `$REGMEAN_PYTHON`, else `.venv/bin/python` (`.venv\Scripts\python.exe`
//! on Windows) in the crate root. It needs one that can `import torch, transformers`, so
//! `cargo test` reports it as ignored; run it, where such a Python exists, with:
//!
//! ```text
//! python -m venv .venv && .venv/bin/pip install torch transformers safetensors pyyaml numpy
//! cargo test --release --test transformers_load -- --ignored --nocapture
//! ```
//!
//! Run that way without a usable Python, it fails and says why.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const HOW_TO_ENABLE: &str = "how to enable: python -m venv .venv && \
     .venv/bin/pip install torch transformers safetensors pyyaml numpy";

fn find_python(root: &Path) -> Result<PathBuf, String> {
    if let Some(p) = env::var_os("REGMEAN_PYTHON").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let candidates = [
        root.join(".venv").join("bin").join("python"),
        root.join(".venv").join("Scripts").join("python.exe"),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or_else(|| {
            format!(
                "REGMEAN_PYTHON is not set and {} does not exist",
                candidates[0].display()
            )
        })
}

fn cannot_run(reason: &str) -> ! {
    panic!("transformers load check cannot run: {reason}; {HOW_TO_ENABLE}");
}

#[test]
#[ignore = "needs Python with torch and transformers: cargo test --release --test transformers_load -- --ignored"]
fn merged_models_load_in_transformers_and_match_our_forward() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = match find_python(root) {
        Ok(p) => p,
        Err(reason) => cannot_run(&reason),
    };
    match Command::new(&python)
        .args(["-c", "import torch, transformers"])
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or("").trim();
            cannot_run(&format!(
                "`{} -c \"import torch, transformers\"` failed ({}){}{last}",
                python.display(),
                out.status,
                if last.is_empty() { "" } else { ": " }
            ));
        }
        Err(e) => {
            cannot_run(&format!("cannot run {}: {e}", python.display()));
        }
    }

    let script = root.join("scripts").join("check_transformers_load.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg("--bin")
        .arg(env!("CARGO_BIN_EXE_regmean-gpu"))
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", python.display(), script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if !stderr.trim().is_empty() {
        eprintln!("{stderr}");
    }
    assert!(
        out.status.success(),
        "{} exited with {}:\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
}
