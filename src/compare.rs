//! Tensor-by-tensor comparison of two model directories (`regmean-gpu compare`), with the
//! relative error used throughout the tests: max |a − b| / max |b|.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::Checkpoint;

/// max |a − b| / max |b| (infinite when the lengths differ or a value is NaN).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let mut diff = 0.0f64;
    for (a, b) in got.iter().zip(want) {
        let d = (*a as f64 - *b as f64).abs();
        if d.is_nan() {
            return f64::INFINITY;
        }
        diff = diff.max(d);
    }
    diff / scale.max(1e-30)
}

/// Every float backbone tensor of `reference` against the same tensor of `candidate`:
/// (name, relative error), worst first.
pub fn compare_dirs(candidate: &Path, reference: &Path) -> Result<Vec<(String, f64)>> {
    let a = Checkpoint::open(candidate)?;
    let b = Checkpoint::open(reference)?;
    let mut rows = Vec::new();
    for name in b.names() {
        if !b.entry(name)?.dtype.is_float() {
            continue;
        }
        if !a.contains(name) {
            return Err(Error::file(
                candidate,
                format!("missing tensor `{name}` that {} has", reference.display()),
            ));
        }
        rows.push((name.to_string(), rel_err(&a.f32(name)?, &b.f32(name)?)));
    }
    rows.sort_by(|x, y| y.1.total_cmp(&x.1));
    Ok(rows)
}
