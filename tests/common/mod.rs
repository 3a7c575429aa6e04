//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub use regmean_gpu::compare::rel_err;

use regmean_gpu::io::SafetensorsFile;

/// The repository root: `REGMEAN_REPO` when set (test binaries carried to another machine,
/// such as the GPU check), else the crate directory this was built in.
pub fn repo() -> PathBuf {
    std::env::var_os("REGMEAN_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

pub fn i64_tensor(f: &SafetensorsFile, name: &str) -> Vec<i64> {
    f.bytes(name)
        .unwrap()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Every float tensor of `expected` matches the same tensor of the merged model directory
/// `out` within `tol`; returns the worst relative error.
pub fn assert_model_matches(out: &Path, expected: &Path, tol: f64) -> f64 {
    let want = SafetensorsFile::open(expected).unwrap();
    let got = regmean_gpu::io::Checkpoint::open(out).unwrap();
    let mut worst = (0.0, String::new());
    for name in want.tensors().keys() {
        let e = rel_err(
            &got.f32(name).unwrap_or_else(|e| panic!("{e}")),
            &want.to_f32(name).unwrap(),
        );
        assert!(
            e <= tol,
            "{}: `{name}` relative error {e:.3e} > {tol:.0e} against {}",
            out.display(),
            expected.display()
        );
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    eprintln!(
        "{} vs {}: worst {:.2e} ({})",
        out.display(),
        expected.file_name().unwrap().to_string_lossy(),
        worst.0,
        worst.1
    );
    worst.0
}

/// Path of the built CLI.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_regmean-gpu"))
}
