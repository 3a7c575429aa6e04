//! GPU checks: every kernel against its CPU twin (through `doctor`), and `merge` with the
//! solve on the GPU against the CPU engine. Without a usable GPU each test prints why it was
//! skipped and returns.

mod common;

use common::{assert_model_matches, fixtures};
use regmean_gpu::backend::cuda::{self, CudaDevice};
use regmean_gpu::backend::CpuBackend;
use regmean_gpu::config::MergeConfig;
use regmean_gpu::progress::Silent;
use regmean_gpu::regmean::{merge, MergeOptions};

fn gpu_or_skip(test: &str) -> bool {
    match cuda::probe().unavailable_reason() {
        Some(why) => {
            // Written straight to stderr: the test harness captures eprintln! of passing tests.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
            false
        }
        None => true,
    }
}

#[test]
fn every_kernel_matches_its_cpu_twin() {
    if !gpu_or_skip("every_kernel_matches_its_cpu_twin") {
        return;
    }
    let report = regmean_gpu::doctor::run(false, &|m| eprintln!("{m}")).unwrap();
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.pass).collect();
    assert!(
        !report.checks.is_empty() && failed.is_empty(),
        "failed: {failed:?}"
    );
}

#[test]
fn merge_with_the_solve_on_the_gpu_matches_the_cpu() {
    if !gpu_or_skip("merge_with_the_solve_on_the_gpu_matches_the_cpu") {
        return;
    }
    let dev = CudaDevice::open(0).unwrap();
    for (pool, config) in [
        ("gpt2_pool", "compat.yaml"),
        ("gpt2_pool", "exclude.yaml"),
        ("clip_pool", "compat.yaml"),
    ] {
        let cfg = MergeConfig::load(&fixtures().join(pool).join(config)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (cpu, gpu) = (tmp.path().join("cpu"), tmp.path().join("gpu"));
        merge(&CpuBackend, &cfg, &cpu, &MergeOptions::default(), &Silent).unwrap();
        let opts = MergeOptions {
            device: Some(dev.clone()),
            ..MergeOptions::default()
        };
        let report = merge(&CpuBackend, &cfg, &gpu, &opts, &Silent).unwrap();
        assert!(report.fallbacks.is_empty());
        assert_model_matches(&gpu, &cpu.join("model.safetensors"), 1e-4);
    }
}
