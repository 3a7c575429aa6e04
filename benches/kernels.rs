//! `cargo bench --bench kernels`: the compute kernels a merge spends its time in, each as
//! GFLOP/s (TFLOP/s on a GPU) and as a share of a peak this program measures itself with a
//! large GEMM on the same device, so the numbers mean the same on any machine.
//!
//! - gemm (always): the CPU engine's packed AVX-512 GEMM against faer on the shapes of a
//!   ViT-B/32 merge (linear layers, Gram triangles, G'·W) and 2048³, interleaved, with the
//!   FMA peak of this machine (two 512-bit FMAs per cycle, timed with a register-only loop).
//! - CPU (always): the lower-triangle Gram of `CpuBackend` against a full faer GEMM XᵀX, the
//!   activation kernels, and the f64 per-layer solve.
//! - forward (always): one ViT-B/32 task model's forward pass and Grams over 32 images (the
//!   work of one clip8-small model, synthesised once under target/bench-kernels/) against
//!   its GEMM-bound floor, its FLOPs at the measured peak. With `REGMEAN_PROFILE=1` it also
//!   prints where that time went, per CPU kernel.
//! - GPU (where CUDA is usable; otherwise SKIPPED with the reason): `doctor --bench`'s table,
//!   the fp16 Gram kernel against `cublasGemmEx` XᵀX and the cuSOLVER solve.
//!
//! Timings are the median of several runs after one warm-up run.

use std::path::Path;
use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use regmean_gpu::backend::cpu_gemm::{
    faer_gemm, gemm, gemm_split, set_b_prefetch, Lhs, Part, Split,
};
use regmean_gpu::backend::solve::solve_layer;
use regmean_gpu::backend::{Activation, Backend, CpuBackend, CpuTensor, GramUpdate};
use regmean_gpu::config::Parameters;
use regmean_gpu::data::{make_batch, Dataset, TextPadding};
use regmean_gpu::io::Checkpoint;
use regmean_gpu::model::{ForwardHooks, Model, ModelConfig};
use regmean_gpu::progress::{Event, Observer, Silent};

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

/// The f32 GEMM rate of this machine at the current thread count: a 2048³ faer GEMM, GFLOP/s.
fn measured_peak() -> f64 {
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
    peak
}

/// The f32 FMA peak of this machine at the current thread count, GFLOP/s: each thread runs
/// 16 independent chains of 512-bit FMAs (no memory traffic), as many as two FMA units with a
/// 4-cycle latency need to stay busy. The ceiling no GEMM can pass.
fn fma_peak() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[target_feature(enable = "avx512f")]
        fn chains(steps: usize) -> f32 {
            use std::arch::x86_64::*;
            let mut acc = [_mm512_set1_ps(0.5); 16];
            let (m, a) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            for _ in 0..steps {
                for x in acc.iter_mut() {
                    *x = _mm512_fmadd_ps(*x, m, a);
                }
            }
            acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
        }
        use rayon::prelude::*;
        let threads = rayon::current_num_threads();
        let steps = 20_000_000;
        let secs = median_secs(3, || {
            // SAFETY: AVX-512F was detected above.
            let s: f32 = (0..threads)
                .into_par_iter()
                .map(|_| unsafe { chains(steps) })
                .sum();
            std::hint::black_box(s);
        });
        return (threads * steps * 16 * 16 * 2) as f64 / secs / 1e9;
    }
    f64::NAN
}

fn gemm_bench() {
    let threads = rayon::current_num_threads();
    let peak = fma_peak();
    println!("gemm: the packed AVX-512 GEMM against faer ({threads} threads), GFLOP/s; FMA peak {peak:.1}");
    println!("  (split: row chunks sharing B, or independent column slabs; `gemm` takes columns for triangles up to 2,048, rows otherwise)");
    println!("  (no prefetch / gemm: the split `gemm` picks, without and with the kernel's prefetch of B)");
    println!(
        "  {:<40} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>9} {:>7}",
        "product [m, n, k]",
        "rows",
        "faer",
        "ratio",
        "% peak",
        "columns",
        "no pf",
        "gemm",
        "pf gain"
    );
    let (mut total_picked, mut total_unfetched) = (0.0, 0.0);
    // (what, m, n, k, lhs transposed (a Gram), lower triangle): ViT-B/32's, then llama-small's
    let shapes: [(&str, usize, usize, usize, bool, bool); 14] = [
        ("linear q|k|v", 1600, 2304, 768, false, false),
        ("linear out_proj", 1600, 768, 768, false, false),
        ("linear fc1", 1600, 3072, 768, false, false),
        ("linear fc2", 1600, 768, 3072, false, false),
        ("Gram 768 (1600 rows)", 768, 768, 1600, true, true),
        ("Gram 3072 (1600 rows)", 3072, 3072, 1600, true, true),
        ("G'W 768 -> 3072", 768, 3072, 768, false, false),
        ("G'W 3072 -> 768", 3072, 768, 3072, false, false),
        ("square 2048", 2048, 2048, 2048, false, false),
        ("llama q|k|v", 2048, 1024, 512, false, false),
        ("llama gate|up", 2048, 3072, 512, false, false),
        ("llama down", 2048, 512, 1536, false, false),
        ("Gram 512 (2048 rows)", 512, 512, 2048, true, true),
        ("Gram 1536 (2048 rows)", 1536, 1536, 2048, true, true),
    ];
    for (what, m, n, k, transposed, lower) in shapes {
        let a = values(m * k, 1);
        let b = if transposed {
            a.clone()
        } else {
            values(k * n, 2)
        };
        let lhs = if transposed {
            Lhs::Transposed { data: &a, ld: m }
        } else {
            Lhs::RowMajor { data: &a, ld: k }
        };
        let part = if lower { Part::Lower } else { Part::Full };
        let mut c = vec![0.0f32; m * n];
        // Interleaved: rows, faer, columns, … so that a change of load hits all.
        let (mut ours, mut theirs, mut columns) = (Vec::new(), Vec::new(), Vec::new());
        let (mut picked, mut unfetched) = (Vec::new(), Vec::new());
        for round in 0..6 {
            let t = Instant::now();
            gemm_split(Split::Rows, (m, n, k), lhs, &b, n, &mut c, n, part, false);
            let t_ours = t.elapsed().as_secs_f64();
            let t = Instant::now();
            faer_gemm((m, n, k), lhs, &b, n, &mut c, n, part, false);
            let t_faer = t.elapsed().as_secs_f64();
            let t = Instant::now();
            gemm_split(
                Split::Columns,
                (m, n, k),
                lhs,
                &b,
                n,
                &mut c,
                n,
                part,
                false,
            );
            let t_columns = t.elapsed().as_secs_f64();
            // The split `gemm` picks, without and with the kernel's prefetch of B.
            set_b_prefetch(false);
            let t = Instant::now();
            gemm((m, n, k), lhs, &b, n, &mut c, n, part, false);
            let t_unfetched = t.elapsed().as_secs_f64();
            set_b_prefetch(true);
            let t = Instant::now();
            gemm((m, n, k), lhs, &b, n, &mut c, n, part, false);
            let t_picked = t.elapsed().as_secs_f64();
            if round > 0 {
                ours.push(t_ours);
                theirs.push(t_faer);
                columns.push(t_columns);
                picked.push(t_picked);
                unfetched.push(t_unfetched);
            }
        }
        for v in [
            &mut ours,
            &mut theirs,
            &mut columns,
            &mut picked,
            &mut unfetched,
        ] {
            v.sort_by(f64::total_cmp);
        }
        // FLOPs done: a triangle is half the full product (plus its diagonal).
        let flops = 2.0
            * (m * n * k) as f64
            * if lower {
                0.5 * (1.0 + 1.0 / m as f64)
            } else {
                1.0
            };
        let (o, f) = (flops / ours[2] / 1e9, flops / theirs[2] / 1e9);
        let col = flops / columns[2] / 1e9;
        let (p, u) = (flops / picked[2] / 1e9, flops / unfetched[2] / 1e9);
        println!(
            "  {:<40} {o:>7.1} {f:>7.1} {:>6.2}× {:>6.1}% {col:>9.1} {u:>9.1} {p:>9.1} {:>6.2}×",
            format!("{what} [{m}, {n}, {k}]"),
            o / f,
            100.0 * o / peak,
            p / u
        );
        (total_picked, total_unfetched) =
            (total_picked + picked[2], total_unfetched + unfetched[2]);
    }
    println!(
        "  all shapes, one product each: {:.1} ms without the prefetch of B, {:.1} ms with it ({:.2}×)",
        1e3 * total_unfetched,
        1e3 * total_picked,
        total_unfetched / total_picked
    );
}

fn cpu() {
    let threads = rayon::current_num_threads();
    println!("CPU ({threads} threads; set RAYON_NUM_THREADS to change)");

    let peak = measured_peak();

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

/// What `synth` needs to say: nothing.
struct Quiet;

impl Observer for Quiet {
    fn event(&self, _: Event<'_>) {}
}

impl regmean_gpu::demo::Say for Quiet {
    fn say(&self, _: &str) {}
}

/// One clip8-small task model (ViT-B/32, random weights) and its 32 images, made once.
fn vit_b32_pool() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-kernels/vit-b32");
    if !dir.join("merge.yaml").exists() {
        // A pool left half-made by an interrupted run: this benchmark's own directory.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).expect("remove the half-made pool");
        }
        std::fs::create_dir_all(dir.parent().expect("parent")).expect("target/bench-kernels");
        let args = regmean_gpu::demo::SynthArgs {
            arch: "clip".into(),
            layers: None,
            models: 1,
            examples: 32,
            min_len: 16,
            max_len: 128,
            seed: 0,
            out: dir.clone(),
        };
        regmean_gpu::demo::synth(&args, &Quiet).expect("synth");
    }
    dir
}

/// Forward + Grams of one ViT-B/32 over one batch of 32 images, as a compat-mode merge runs
/// it (clip8-small: 8 of these, then G'W and the solve), against its FLOPs at the peak.
fn forward() {
    let threads = rayon::current_num_threads();
    println!("forward + Grams, CPU ({threads} threads)");
    let peak = measured_peak();
    let dir = vit_b32_pool();
    let ckpt = Checkpoint::open(dir.join("task_0")).expect("checkpoint");
    let config = ModelConfig::from_checkpoint(&ckpt).expect("config");
    let data = Dataset::open(&dir.join("data/task_0.safetensors")).expect("pixels");
    let params = Parameters {
        num_regmean_examples: 32,
        batch_size: 32,
        fusionbench_compat: true,
        shuffle: false,
        ..Parameters::default()
    };
    let ModelConfig::Clip(c) = &config else {
        panic!("synth --arch clip made {config:?}")
    };
    // FLOPs: the GEMMs of the forward pass (patch embedding, q|k|v, attention's two
    // products, out_proj, fc1, fc2) and the lower triangles of the four Grams per layer.
    let (d, f, l) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.num_hidden_layers as f64,
    );
    let (images, tokens) = (32.0, (c.num_patches() + 1) as f64);
    let rows = images * tokens;
    let patch_in = (c.num_channels * c.patch_size * c.patch_size) as f64;
    let forward_flops = 2.0 * images * c.num_patches() as f64 * patch_in * d
        + l * (2.0 * rows * d * (3.0 * d + d + 2.0 * f) + 4.0 * images * tokens * tokens * d);
    let gram_flops = l * rows * (3.0 * d * (d + 1.0) + f * (f + 1.0));
    let secs = median_secs(3, || {
        regmean_gpu::regmean::compute_grams(&CpuBackend, &ckpt, &config, &data, &params, &Silent)
            .expect("forward + Grams");
    });
    let floor = (forward_flops + gram_flops) / peak / 1e9;
    println!(
        "  ViT-B/32, 32 images ({rows} rows): {secs:.2} s for {:.0} GFLOP forward + {:.0} GFLOP Grams; \
         floor at the peak {floor:.2} s: {:.2}× the floor, {:.1} GFLOP/s",
        forward_flops / 1e9,
        gram_flops / 1e9,
        secs / floor,
        (forward_flops + gram_flops) / secs / 1e9
    );
    // The forward pass alone, on the same batch (benches/pytorch_forward.py times
    // transformers' on it): the model loaded once, its batch made once.
    let model = Model::load(&CpuBackend, &ckpt).expect("model");
    let indices: Vec<usize> = (0..32).collect();
    let images = TextPadding {
        pad_id: 0,
        max_length: 0,
        to_max_length: false,
    };
    let batch = make_batch(&data, &indices, images).expect("batch");
    let alone = median_secs(3, || {
        model
            .forward(&CpuBackend, &batch, ForwardHooks::default())
            .expect("forward");
    });
    let floor = forward_flops / peak / 1e9;
    println!(
        "  forward alone: {alone:.3} s for {:.0} GFLOP; floor at the peak {floor:.2} s: {:.2}× the floor, {:.1} GFLOP/s",
        forward_flops / 1e9,
        alone / floor,
        forward_flops / alone / 1e9
    );
    if regmean_gpu::profile::enabled() {
        println!("  where the time went, summed over the 4 runs:");
        for line in regmean_gpu::profile::report().lines() {
            println!("    {line}");
        }
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

/// The binary's allocator setting (`keep_freed_memory` in main.rs): freed blocks stay in the
/// process, so each batch reuses the last one's buffers. Without it this benchmark would time
/// page faults and zeroing that a merge does not pay.
fn keep_freed_memory_as_the_binary_does() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    keep_freed_memory_as_the_binary_does();
    // `cargo bench` passes `--bench`; a name filter selects one part.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wants = |part: &str| filter.as_deref().is_none_or(|f| part.contains(f));
    if wants("gemm") {
        gemm_bench();
    }
    if wants("cpu") {
        cpu();
    }
    if wants("forward") {
        forward();
    }
    if wants("gpu") {
        gpu();
    }
}
