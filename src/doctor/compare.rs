//! One check's verdict: the worst error relative to the reference's largest magnitude,
//! against an explicit tolerance (NaN anywhere, or a length mismatch, fails).

use serde::Serialize;

#[derive(Serialize, Debug)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub worst_rel_err: f64,
    pub tolerance: f64,
}

pub(super) fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = got.iter().zip(want).fold(0.0f64, |m, (a, b)| {
        if a.is_nan() || b.is_nan() {
            f64::INFINITY
        } else {
            m.max((a - b).abs())
        }
    });
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    diff / scale.max(1e-30)
}

pub(super) fn check(name: String, got: &[f64], want: &[f64], tolerance: f64) -> Check {
    let e = rel_err(got, want);
    Check {
        name,
        pass: e <= tolerance,
        worst_rel_err: e,
        tolerance,
    }
}

pub(super) fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| *x as f64).collect()
}

/// One check per op: the GPU's output against the CPU engine's, named `{op} {label}`.
pub(super) fn compare_ops(
    gpu: Vec<(&str, Vec<f32>)>,
    cpu: Vec<(&str, Vec<f32>)>,
    label: &str,
    tol: f64,
) -> Vec<Check> {
    let f64s = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<_>>();
    gpu.into_iter()
        .zip(cpu)
        .map(|((name, got), (_, want))| {
            check(format!("{name} {label}"), &f64s(got), &f64s(want), tol)
        })
        .collect()
}
