//! `cargo bench --bench kernels`: the compute kernels a merge spends its time in, each as
//! GFLOP/s (TFLOP/s on a GPU) and as a share of a peak this program measures itself with a
//! large GEMM on the same device, so the numbers mean the same on any machine.
//!
//! - CPU (always): the lower-triangle Gram of `CpuBackend` against a full faer GEMM XᵀX, the
//!   activation kernels, and the f64 per-layer solve.
//! - GPU (where CUDA is usable; otherwise SKIPPED with the reason): `doctor --bench`'s table,
//!   the fp16 Gram kernel against `cublasGemmEx` XᵀX and the cuSOLVER solve.
//!
//! Timings are the median of several runs after one warm-up run.

use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use regmean_gpu::backend::{Activation, Backend, CpuBackend, CpuTensor, GramUpdate};
use regmean_gpu::regmean::solve::solve_layer;

fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

/// Deterministic pseudo-random values in [-1, 1) (a hash of the index): the timings do not
/// depend on them, and a Gram of such rows is well conditioned, as the solve needs.
fn values(n: usize, seed: u64) -> Vec<f32> {
    // splitmix64's finaliser.
    let hash = |i: u64| {
        let mut z = i.wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    (0..n as u64).map(hash).collect()
}

fn full_gram(x: &[f32], rows: usize, d: usize, out: &mut [f32]) {
    let x = MatRef::from_row_major_slice(x, rows, d);
    matmul(
        MatMut::from_row_major_slice_mut(out, d, d),
        Accum::Replace,
        x.transpose(),
        x,
        1.0,
        Par::rayon(0),
    );
}

fn cpu() {
    let threads = rayon::current_num_threads();
    println!("CPU ({threads} threads; set RAYON_NUM_THREADS to change)");

    let n = 2048;
    let a = values(n * n, 1);
    let mut c = vec![0.0f32; n * n];
    let secs = median_secs(3, || {
        matmul(
            MatMut::from_row_major_slice_mut(&mut c, n, n),
            Accum::Replace,
            MatRef::from_row_major_slice(&a, n, n),
            MatRef::from_row_major_slice(&a, n, n),
            1.0,
            Par::rayon(0),
        )
    });
    let peak = 2.0 * (n as f64).powi(3) / secs / 1e9;
    println!("  measured f32 peak (faer GEMM {n}³): {peak:.1} GFLOP/s");

    // GF/s counted as a full XᵀX (2·rows·d²) for both, so the columns compare directly (the
    // triangle does half the work: up to 2× is the ideal); % of peak counts the FLOPs the
    // triangle actually does.
    println!(
        "  {:>5} {:>6} {:>16} {:>16} {:>7} {:>8}",
        "d", "rows", "GEMM XᵀX GF/s", "Gram GF/s", "ratio", "% peak"
    );
    for (d, rows) in [
        (768usize, 1600usize),
        (768, 8192),
        (3072, 1600),
        (3072, 8192),
    ] {
        let x = values(rows * d, 2);
        let flops = 2.0 * rows as f64 * (d * d) as f64;
        let mut full = vec![0.0f32; d * d];
        let gemm = median_secs(3, || full_gram(&x, rows, d, &mut full));
        let xt = CpuTensor::new(x, rows, d);
        let mut acc = CpuBackend.gram_accumulator(d).expect("accumulator");
        let ours = median_secs(3, || {
            CpuBackend
                .gram_update(&mut acc, &xt, None, GramUpdate::Sum)
                .expect("gram")
        });
        println!(
            "  {d:>5} {rows:>6} {:>16.1} {:>16.1} {:>6.2}× {:>7.1}%",
            flops / gemm / 1e9,
            flops / ours / 1e9,
            gemm / ours,
            100.0 * flops / 2.0 / ours / 1e9 / peak
        );
    }

    // The activations: one exp and one division per element; ns per element.
    let len = 1600 * 3072;
    let mut t = CpuTensor::new(values(len, 3), 1600, 3072);
    for act in [Activation::QuickGelu, Activation::GeluNew] {
        let secs = median_secs(5, || CpuBackend.activate(&mut t, act).expect("activate"));
        println!(
            "  {act:?} over [1600, 3072]: {:.2} ms, {:.2} ns per element",
            secs * 1e3,
            secs * 1e9 / len as f64
        );
    }

    // The per-layer solve: f64 Cholesky of Σ G' and two triangular solves, for ViT-B/GPT-2
    // shapes. FLOPs: d_in³/3 + 2·d_in²·d_out.
    for (d_in, d_out) in [(768usize, 3072usize), (3072, 768)] {
        let x = values(2 * d_in * d_in, 4);
        let mut gram = vec![0.0f32; d_in * d_in];
        full_gram(&x, 2 * d_in, d_in, &mut gram);
        let gw = values(d_in * d_out, 5);
        let secs = median_secs(3, || {
            let (_, how) = solve_layer(&gram, &gw, &gw, d_in, d_out);
            assert!(!how.is_fallback(), "{how:?}");
        });
        let flops = (d_in as f64).powi(3) / 3.0 + 2.0 * (d_in * d_in * d_out) as f64;
        println!(
            "  solve d_in={d_in} d_out={d_out}: {:.1} ms, {:.1} GFLOP/s f64 ({:.0}% of the f32 peak's half)",
            secs * 1e3,
            flops / secs / 1e9,
            100.0 * flops / secs / 1e9 / (peak / 2.0)
        );
    }
}

fn gpu() {
    println!("GPU");
    let say = |line: &str| println!("{line}");
    match regmean_gpu::doctor::run(true, &say) {
        Ok(report) => match report.unavailable_reason {
            Some(reason) => println!("  SKIPPED: no usable CUDA device: {reason}"),
            None if !report.all_passed => {
                println!("  FAILED: a kernel check failed (above); the timings are not trusted");
                std::process::exit(1);
            }
            None => {}
        },
        Err(e) => {
            println!("  FAILED: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a name filter selects one part.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |part: &str| filter.as_deref().is_none_or(|f| part.contains(f));
    if wants("cpu") {
        cpu();
    }
    if wants("gpu") {
        gpu();
    }
}
