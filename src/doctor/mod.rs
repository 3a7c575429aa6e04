//! `regmean-gpu doctor`: what this machine offers the GPU engine, and a check of every CUDA
//! kernel against its CPU twin on fresh random inputs (outputs poisoned first, every element
//! compared). `--bench` adds the kernel benchmark: the Gram kernel against cuBLAS GemmEx XᵀX,
//! and the solve, with TFLOP/s and the share of the fp16 tensor peak measured in the same run.

mod bench;
mod compare;
mod decoder;
mod forward;
mod kernels;

use serde::Serialize;

use crate::backend::cuda::{self, CudaDevice, Probe};
use crate::demo::Rng;
use crate::error::Result;
use bench::benchmark;
pub use bench::BenchRow;
pub use compare::Check;
use kernels::{check_device_gram, check_finalize, check_gram, check_sums_and_solve, check_weights};

#[derive(Serialize, Debug)]
pub struct Report {
    pub kernels_embedded: bool,
    pub cuda_available: bool,
    pub unavailable_reason: Option<String>,
    pub probe: Probe,
    pub cuda_bindings: &'static str,
    pub kernel_architectures: &'static [&'static str],
    pub nvcc: &'static str,
    pub device: Option<String>,
    pub compute_capability: Option<String>,
    pub libraries: Vec<String>,
    pub checks: Vec<Check>,
    pub all_passed: bool,
    pub bench: Vec<BenchRow>,
}

/// Runs the probe, the kernel checks (when a GPU is usable) and optionally the benchmark.
pub fn run(bench: bool, say: &dyn Fn(&str)) -> Result<Report> {
    let probe = cuda::probe();
    let reason = probe.unavailable_reason();
    let mut report = Report {
        kernels_embedded: probe.kernels_embedded,
        cuda_available: reason.is_none(),
        unavailable_reason: reason.clone(),
        probe,
        cuda_bindings: "CUDA 13.0 (cudarc, dynamic loading)",
        kernel_architectures: cuda::kernels::ARCHITECTURES,
        nvcc: cuda::kernels::NVCC_VERSION,
        device: None,
        compute_capability: None,
        libraries: Vec::new(),
        checks: Vec::new(),
        all_passed: false,
        bench: Vec::new(),
    };
    if reason.is_some() {
        return Ok(report);
    }
    let dev = CudaDevice::open(0)?;
    report.device = Some(dev.name()?);
    let (major, minor) = dev.compute_capability()?;
    report.compute_capability = Some(format!("sm_{major}{minor}"));
    let mut checks = Vec::new();
    let mut rng = Rng::new(0x5eed);
    for (d, rows, ldx, masked) in [
        (45, 37, 45, true),
        (67, 300, 72, false),
        (768, 4096, 768, true),
        (1000, 513, 1003, false),
    ] {
        checks.push(check_gram(&dev, &mut rng, d, rows, ldx, masked, true)?);
        checks.push(check_gram(&dev, &mut rng, d, rows, ldx, masked, false)?);
    }
    checks.extend(check_finalize(&dev, &mut rng)?);
    checks.extend(check_weights(&dev, &mut rng)?);
    checks.push(check_device_gram(&dev, &mut rng, true)?);
    checks.push(check_device_gram(&dev, &mut rng, false)?);
    checks.push(check_sums_and_solve(&dev, &mut rng)?);
    checks.extend(forward::check_forward_ops(&dev, &mut rng)?);
    checks.extend(decoder::check_decoder_ops(&dev, &mut rng)?);
    for c in &checks {
        say(&format!(
            "  {:<44} {}  worst rel err {:.2e} (tol {:.0e})",
            c.name,
            if c.pass { "pass" } else { "FAIL" },
            c.worst_rel_err,
            c.tolerance
        ));
    }
    report.all_passed = checks.iter().all(|c| c.pass);
    report.checks = checks;
    report.libraries = loaded_libraries();
    if bench {
        report.bench = benchmark(&dev, say)?;
    }
    Ok(report)
}

/// Where the CUDA libraries were loaded from (this process's memory map).
fn loaded_libraries() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            ["libcuda.so", "libcublas", "libcusolver", "libnvrtc"]
                .iter()
                .any(|n| p.contains(n))
        })
        .map(str::to_string)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}
