//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use regmean_gpu::io::SafetensorsFile;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// max |a − b| / max |b|: the per-tensor relative error used throughout the tests.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    diff / scale.max(1e-30)
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
