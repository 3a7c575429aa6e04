//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use regmean_gpu::io::safetensors::{write_file, OutTensor, TensorData};

pub use regmean_gpu::compare::rel_err;

use regmean_gpu::io::{Dtype, SafetensorsFile};

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

/// The right-padded token batch (`input_ids`, `attention_mask`, I64 `[batch, seq]`) of a
/// forward fixture.
pub fn token_batch(f: &SafetensorsFile) -> regmean_gpu::model::Batch {
    let shape = &f.entry("input_ids").unwrap().shape;
    regmean_gpu::model::Batch::Tokens {
        ids: i64_tensor(f, "input_ids")
            .iter()
            .map(|&v| v as u32)
            .collect(),
        mask: i64_tensor(f, "attention_mask")
            .iter()
            .map(|&v| v as u8)
            .collect(),
        batch: shape[0],
        seq: shape[1],
    }
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

/// Path of the built CLI: `REGMEAN_BIN` when set (test binaries carried to another machine,
/// such as the GPU check), else the one cargo built with this test.
pub fn bin() -> PathBuf {
    std::env::var_os("REGMEAN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_regmean-gpu")))
}

/// A private copy of the GPT-2 pool to break.
pub struct Pool {
    pub dir: tempfile::TempDir,
}

impl Pool {
    pub fn new() -> Self {
        Self::of("gpt2_pool")
    }

    pub fn of(pool: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&fixtures().join(pool), dir.path());
        Pool { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Rewrites a safetensors file through `edit(name, shape, values)`; None drops a tensor.
    pub fn edit(
        &self,
        rel: &str,
        edit: impl Fn(&str, Vec<usize>, Vec<f32>) -> Option<(Vec<usize>, Vec<f32>)>,
    ) {
        rewrite_safetensors(&self.path(rel), |n, d, s, v| {
            edit(n, s, v).map(|(s, v)| (d, s, v))
        });
    }

    /// Puts -inf at row 7, column 3 and NaN at row 8, column 0 of task_a's
    /// `encoder.layers.0.mlp.fc1.weight` (a CLIP pool's; stored `[67, 45]`, `[out, in]`):
    /// the first non-finite value in the file's order is the -inf, in the transposed
    /// layout the NaN. Returns what the error must mention.
    pub fn poison_transposed_weight(&self) -> [&'static str; 3] {
        self.edit("task_a/model.safetensors", |n, s, mut v| {
            if n == "encoder.layers.0.mlp.fc1.weight" {
                v[7 * 45 + 3] = f32::NEG_INFINITY;
                v[8 * 45] = f32::NAN;
            }
            Some((s, v))
        });
        [
            "task_a/model.safetensors",
            "encoder.layers.0.mlp.fc1.weight",
            "non-finite value (-inf) at element 318",
        ]
    }

    /// Runs `regmean-gpu merge CONFIG OUT EXTRA...` on the pool.
    pub fn merge(&self, config: &str, out: &Path, extra: &[&str]) -> std::process::Output {
        Command::new(bin())
            .arg("merge")
            .arg(self.path(config))
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    }

    /// Starts `regmean-gpu merge -q CONFIG OUT EXTRA...` on the pool with its output files'
    /// final flush slowed down by `delay_ms` each (a test hook), stderr piped.
    pub fn spawn_slow_merge(
        &self,
        config: &str,
        out: &Path,
        extra: &[&str],
        delay_ms: u64,
    ) -> std::process::Child {
        Command::new(bin())
            .args(["merge", "-q"])
            .arg(self.path(config))
            .arg(out)
            .args(extra)
            .env("REGMEAN_TEST_WRITE_DELAY_MS", delay_ms.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs `merge` on the pool's compat config (or another) and returns the failure message.
    pub fn merge_fails(&self, config: &str) -> String {
        let out_parent = self.path("out");
        std::fs::create_dir_all(&out_parent).unwrap();
        let o = self.merge(config, &out_parent.join("merged"), &[]);
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(
            o.status.code(),
            Some(1),
            "expected a clean failure, got {:?}: {stderr}",
            o.status
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one error line expected: {stderr}");
        let left: Vec<_> = std::fs::read_dir(&out_parent)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        errors[0].to_string()
    }
}

/// Rewrites a safetensors file through `edit(name, dtype, shape, values)`: the values are
/// written in the dtype returned; None drops a tensor.
#[allow(clippy::type_complexity)]
pub fn rewrite_safetensors(
    path: &Path,
    edit: impl Fn(&str, Dtype, Vec<usize>, Vec<f32>) -> Option<(Dtype, Vec<usize>, Vec<f32>)>,
) {
    let f = SafetensorsFile::open(path).unwrap();
    let kept: Vec<(String, Dtype, Vec<usize>, Vec<f32>)> = f
        .tensors()
        .iter()
        .filter_map(|(n, e)| {
            edit(n, e.dtype.clone(), e.shape.clone(), f.to_f32(n).unwrap())
                .map(|(d, s, v)| (n.clone(), d, s, v))
        })
        .collect();
    drop(f);
    let out: Vec<OutTensor> = kept
        .iter()
        .map(|(n, d, s, v)| OutTensor {
            name: n.clone(),
            dtype: d.clone(),
            shape: s.clone(),
            data: TensorData::F32(v),
        })
        .collect();
    write_file(
        path,
        &out,
        &BTreeMap::from([("format".into(), "pt".into())]),
    )
    .unwrap();
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

pub fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "`{msg}` should mention `{p}`");
    }
}

/// Whether a GPU test can run here: false (with a SKIPPED line) without a usable GPU, a
/// panic instead when `REGMEAN_REQUIRE_GPU=1` (scripts/gpu_check.sh, where skipping is
/// failing).
pub fn gpu_or_skip(test: &str) -> bool {
    match regmean_gpu::backend::cuda::probe().unavailable_reason() {
        Some(why) if std::env::var("REGMEAN_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("{test}: REGMEAN_REQUIRE_GPU=1 but no GPU can be used: {why}")
        }
        Some(why) => {
            // Written straight to stderr: the test harness captures eprintln! of passing tests.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
            false
        }
        None => true,
    }
}

/// A GPU output within `tol` of the CPU engine's (`cpu`) and of the reference (`want`:
/// transformers'), both errors printed under `label`.
pub fn assert_gpu_matches(label: &str, gpu: &[f32], cpu: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(gpu, cpu);
    let t = rel_err(gpu, want);
    eprintln!("{label}: vs cpu {e:.2e}, vs transformers {t:.2e}");
    assert!(e <= tol, "{label} vs cpu: {e:.3e}");
    assert!(t <= tol, "{label} vs transformers: {t:.3e}");
}

/// Merges `cfg` on the CPU, then on the GPU in float32 (≤ 1e-4) and float16 (≤ 1e-2), and
/// compares each with the CPU's merge and, when given, with `reference` (a safetensors file
/// of the expected tensors); `check` looks at each GPU merge's report.
pub fn gpu_merges_match_the_cpu(
    dev: &std::sync::Arc<regmean_gpu::backend::cuda::CudaDevice>,
    mut cfg: regmean_gpu::config::MergeConfig,
    label: &str,
    reference: Option<&Path>,
    check: impl Fn(&regmean_gpu::regmean::MergeReport),
) {
    use regmean_gpu::backend::{CpuBackend, CudaBackend, Precision};
    use regmean_gpu::progress::Silent;
    use regmean_gpu::regmean::{merge, MergeOptions};
    let tmp = tempfile::tempdir().unwrap();
    let cpu = tmp.path().join("cpu");
    merge(&CpuBackend, &cfg, &cpu, &MergeOptions::default(), &Silent).unwrap();
    for (precision, tol) in [(Precision::Float32, 1e-4), (Precision::Float16, 1e-2)] {
        cfg.parameters.precision = precision;
        let gpu = tmp.path().join(precision.name());
        let backend = CudaBackend::new(dev.clone(), precision);
        let report = merge(&backend, &cfg, &gpu, &MergeOptions::default(), &Silent).unwrap();
        assert!(report.fallbacks.is_empty());
        check(&report);
        eprint!("{label} {}: ", precision.name());
        assert_model_matches(&gpu, &cpu.join("model.safetensors"), tol);
        if let Some(reference) = reference {
            eprint!(
                "{label} {} against {}: ",
                precision.name(),
                reference.display()
            );
            assert_model_matches(&gpu, reference, tol);
        }
    }
}
