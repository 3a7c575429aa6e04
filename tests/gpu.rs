//! GPU checks: every kernel against its CPU twin (through `doctor`), the CUDA forward
//! against the CPU engine and transformers layer by layer, and `merge` on the GPU against
//! the CPU engine, in float32 and float16. They need an NVIDIA GPU, so `cargo test` reports
//! them as ignored; `scripts/gpu_check.sh` runs them with `--include-ignored` and
//! `REGMEAN_REQUIRE_GPU=1`, under which a missing GPU fails them instead of skipping them.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_gpu_matches, assert_mentions, assert_model_matches, copy_dir, fixtures,
    gpu_merges_match_the_cpu, gpu_or_skip, i64_tensor, rel_err, rewrite_safetensors, Pool,
};
use regmean_gpu::backend::cuda::{self, CudaDevice};
use regmean_gpu::backend::{Backend, CpuBackend, CudaBackend, Precision};
use regmean_gpu::config::MergeConfig;
use regmean_gpu::io::{Checkpoint, Dtype, SafetensorsFile};
use regmean_gpu::model::{linear_in_out, Batch, ForwardHooks, Model, ModelConfig};
use regmean_gpu::progress::Silent;
use regmean_gpu::regmean::{merge, MergeOptions};

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
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
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
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
        // The sums and the solve live on the backend: the GPU's, in float32.
        let backend = CudaBackend::new(dev.clone(), Precision::Float32);
        let report = merge(&backend, &cfg, &gpu, &MergeOptions::default(), &Silent).unwrap();
        assert!(report.fallbacks.is_empty());
        assert_model_matches(&gpu, &cpu.join("model.safetensors"), 1e-4);
    }
}

/// A fixture's batch and model, as tests/forward.rs builds them.
fn forward_fixture(name: &str) -> (Checkpoint, Batch, SafetensorsFile) {
    let dir = fixtures().join(name);
    let want = SafetensorsFile::open(dir.join("expected.safetensors")).unwrap();
    let batch = if name.starts_with("gpt2") {
        let ids = i64_tensor(&want, "input_ids");
        let mask = i64_tensor(&want, "attention_mask");
        let shape = want.entry("input_ids").unwrap().shape.clone();
        Batch::Tokens {
            ids: ids.iter().map(|&v| v as u32).collect(),
            mask: mask.iter().map(|&v| v as u8).collect(),
            batch: shape[0],
            seq: shape[1],
        }
    } else {
        let px = SafetensorsFile::open(dir.join("pixel_values.safetensors")).unwrap();
        Batch::Pixels {
            values: px.to_f32("pixel_values").unwrap(),
            batch: px.entry("pixel_values").unwrap().shape[0],
        }
    };
    (Checkpoint::open(dir.join("model")).unwrap(), batch, want)
}

fn hidden_states<B: Backend>(backend: &B, ckpt: &Checkpoint, batch: &Batch) -> Vec<Vec<f32>> {
    let model = Model::load(backend, ckpt).unwrap();
    let mut hidden = Vec::new();
    model
        .forward(
            backend,
            batch,
            ForwardHooks {
                grams: None,
                hidden_states: Some(&mut hidden),
            },
        )
        .unwrap();
    hidden
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn cuda_forward_matches_the_cpu_engine_layer_by_layer() {
    if !gpu_or_skip("cuda_forward_matches_the_cpu_engine_layer_by_layer") {
        return;
    }
    let dev = CudaDevice::open(0).unwrap();
    for fixture in ["gpt2_forward", "clip_forward"] {
        let (ckpt, batch, want) = forward_fixture(fixture);
        let cpu = hidden_states(&CpuBackend, &ckpt, &batch);
        for (precision, tol) in [(Precision::Float32, 1e-4), (Precision::Float16, 1e-2)] {
            let gpu = hidden_states(&CudaBackend::new(dev.clone(), precision), &ckpt, &batch);
            assert_eq!(gpu.len(), cpu.len());
            for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
                let name = format!("hidden_states.{i}");
                let label = format!("{fixture} {} {name}", precision.name());
                assert_gpu_matches(&label, g, c, &want.to_f32(&name).unwrap(), tol);
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn merge_on_cuda_matches_the_cpu_engine() {
    if !gpu_or_skip("merge_on_cuda_matches_the_cpu_engine") {
        return;
    }
    let dev = CudaDevice::open(0).unwrap();
    for (pool, config) in [
        ("gpt2_pool", "compat.yaml"),
        ("gpt2_pool", "default.yaml"),
        ("gpt2_pool", "exclude.yaml"),
        ("clip_pool", "compat.yaml"),
        ("clip_pool", "default.yaml"),
    ] {
        let cfg = MergeConfig::load(&fixtures().join(pool).join(config)).unwrap();
        gpu_merges_match_the_cpu(&dev, cfg, &format!("{pool}/{config}"), None, |report| {
            assert!(report.peak_device_bytes.is_some())
        });
    }
}

/// The layer-wise engine (RegMean++, and RegMean with `schedule: layer`) with its forward
/// passes on the GPU against the same merge on the CPU.
#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn layerwise_merge_on_cuda_matches_the_cpu_engine() {
    if !gpu_or_skip("layerwise_merge_on_cuda_matches_the_cpu_engine") {
        return;
    }
    let dev = CudaDevice::open(0).unwrap();
    let layer = |path: &Path| {
        let mut cfg = MergeConfig::load(path).unwrap();
        cfg.parameters.schedule = regmean_gpu::config::Schedule::Layer;
        cfg
    };
    let pp = |kind: &str, config: &str| fixtures().join("regmeanpp").join(kind).join(config);
    for cfg in [
        MergeConfig::load(&pp("clip", "compat.yaml")).unwrap(),
        MergeConfig::load(&pp("gpt2", "compat.yaml")).unwrap(),
        MergeConfig::load(&pp("gpt2", "default.yaml")).unwrap(),
        layer(&fixtures().join("gpt2_pool/default.yaml")),
        layer(&fixtures().join("clip_pool/compat.yaml")),
    ] {
        let label = format!("{:?}", cfg.merge_method);
        gpu_merges_match_the_cpu(&dev, cfg, &label, None, |report| {
            let cache = report.activation_cache.expect("ran layer by layer");
            assert!(
                cache.on_device_bytes > 0,
                "no activation cache on the device: {cache:?}"
            )
        });
    }
}

/// A copy of the checkpoint directory `model` with every float tensor stored as `dtype`.
fn stored_as(model: &Path, dtype: Dtype, to: &Path) {
    copy_dir(model, to);
    rewrite_safetensors(&to.join("model.safetensors"), |_, _, s, v| {
        Some((dtype.clone(), s, v))
    });
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn linear_weights_made_on_the_gpu_equal_the_host_decode() {
    if !gpu_or_skip("linear_weights_made_on_the_gpu_equal_the_host_decode") {
        return;
    }
    // GPT-2's Conv1D weights are stored [in, out], CLIP's nn.Linear [out, in] (transposed
    // on the device); each in the three float types a checkpoint may use. The GPU must give
    // the host's values bit for bit: the f32 copy for G'W, and the fused site weight in
    // both precisions (the host path converts to f16 with the same rounding).
    let dev = CudaDevice::open(0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for pool in ["gpt2_pool", "clip_pool"] {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let dir = tmp.path().join(format!("{pool}-{}", dtype.name()));
            stored_as(&fixtures().join(pool).join("task_a"), dtype.clone(), &dir);
            let ckpt = Checkpoint::open(&dir).unwrap();
            let sites = ModelConfig::from_checkpoint(&ckpt).unwrap().sites();
            for site in &sites {
                for m in &site.modules {
                    let host = linear_in_out(&ckpt, m).unwrap();
                    let gpu = cuda::weights::linear_in_out(&dev, &ckpt, m).unwrap();
                    let gpu = dev.download(&gpu).unwrap();
                    assert!(
                        bits(&gpu) == bits(&host),
                        "{pool} {} {}: GPU weight differs from the host decode",
                        dtype.name(),
                        m.weight
                    );
                }
                let fused = CpuBackend.site_weight(&ckpt, site).unwrap();
                let (rows, cols) = CpuBackend.shape(&fused);
                let fused = CpuBackend.download(&fused).unwrap();
                for precision in [Precision::Float32, Precision::Float16] {
                    let gpu = CudaBackend::new(dev.clone(), precision);
                    let got = gpu
                        .download(&gpu.site_weight(&ckpt, site).unwrap())
                        .unwrap();
                    let want = gpu
                        .download(&gpu.upload(&fused, rows, cols).unwrap())
                        .unwrap();
                    assert!(
                        bits(&got) == bits(&want),
                        "{pool} {} {} {}: fused weight differs",
                        dtype.name(),
                        site.name,
                        precision.name()
                    );
                }
            }
            eprintln!("{pool} {}: {} sites equal", dtype.name(), sites.len());
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn a_non_finite_weight_is_named_as_stored_on_the_gpu_too() {
    if !gpu_or_skip("a_non_finite_weight_is_named_as_stored_on_the_gpu_too") {
        return;
    }
    // The device check finds it; the message is the host's (file, tensor, first element in
    // the file's order).
    let pool = Pool::of("clip_pool");
    let expected = pool.poison_transposed_weight();
    let cfg = MergeConfig::load(&pool.path("compat.yaml")).unwrap();
    let dev = CudaDevice::open(0).unwrap();
    let out = pool.path("merged");
    let backend = CudaBackend::new(dev, Precision::Float16);
    let Err(err) = merge(&backend, &cfg, &out, &MergeOptions::default(), &Silent) else {
        panic!("the merge must refuse a non-finite weight");
    };
    let err = err.to_string();
    assert_mentions(&err, &expected);
    assert!(!out.exists(), "a failed merge left {}", out.display());
}

/// Copies through the page-locked ring while the GPU is busy, so that the host runs ahead
/// of its copies and comes back to each buffer while copies out of it are queued: a buffer
/// rewritten before its copy ran (the withdrawn third GPU run) shows up as wrong bytes, and
/// a refill that did not wait is seen directly, as the queued GEMMs still running.
#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn staged_copies_arrive_whole_while_the_gpu_is_busy() {
    if !gpu_or_skip("staged_copies_arrive_whole_while_the_gpu_is_busy") {
        return;
    }
    use cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
    use cudarc::cublas::{Gemm, GemmConfig};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dev = CudaDevice::open(0).unwrap();
    let n = 4096usize;
    let a = dev.zeros::<f32>(n * n, "a").unwrap();
    let mut c = dev.zeros::<f32>(n * n, "c").unwrap();
    let cfg = GemmConfig {
        transa: CUBLAS_OP_N,
        transb: CUBLAS_OP_N,
        m: n as i32,
        n: n as i32,
        k: n as i32,
        alpha: 1.0f32,
        lda: n as i32,
        ldb: n as i32,
        beta: 0.0,
        ldc: n as i32,
    };
    let len = (100 << 20) + 12_345;
    let pattern: Vec<u8> = (0..len).map(|i| (i * 31 + i / 4099) as u8).collect();
    let values: Vec<f32> = (0..len / 4).map(|i| (i as f32 * 0.013).sin()).collect();
    for round in 0..2 {
        // About 0.1 s of queued work ahead of the copies.
        let t = std::time::Instant::now();
        for _ in 0..40 {
            // SAFETY: a and c hold n·n f32 values, column-major with leading dimension n.
            unsafe { dev.blas().gemm(cfg, &a, &a, &mut c) }.unwrap();
        }
        let gemms = dev.stream().record_event(None).unwrap();
        // Pieces filled while the GEMMs still ran: before the ring came round (the host
        // running ahead, as wanted) and after it (a refill that did not wait: wrong).
        let (ahead, unwaited) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let bytes = dev
            .upload_staged::<u8>(len, "pattern", |first, dst| {
                dev.bind().unwrap();
                if !gemms.is_complete() {
                    let seen = if first < cuda::STAGED_AHEAD {
                        &ahead
                    } else {
                        &unwaited
                    };
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                dst.copy_from_slice(&pattern[first..first + dst.len()])
            })
            .unwrap();
        let halves = dev
            .upload_staged::<half::f16>(values.len(), "values", |first, dst| {
                for (d, &v) in dst.iter_mut().zip(&values[first..]) {
                    *d = half::f16::from_f32(v);
                }
            })
            .unwrap();
        let queued = t.elapsed();
        let back = dev.download(&bytes).unwrap();
        let halves = dev.download(&halves).unwrap();
        let (ahead, unwaited) = (ahead.into_inner(), unwaited.into_inner());
        eprintln!(
            "round {round}: queued in {queued:?}, all done after {:?}; pieces filled while \
             the GEMMs ran: {ahead} ahead of the copies, {unwaited} on a buffer not waited for",
            t.elapsed()
        );
        assert!(ahead > 0, "the GPU was not busy: the test checked nothing");
        assert_eq!(unwaited, 0, "a buffer was refilled before its copy ran");
        let wrong = back.iter().zip(&pattern).filter(|(a, b)| a != b).count();
        assert_eq!(wrong, 0, "round {round}: {wrong} of {len} bytes differ");
        let wrong = halves
            .iter()
            .zip(&values)
            .filter(|(h, &v)| h.to_bits() != half::f16::from_f32(v).to_bits())
            .count();
        assert_eq!(wrong, 0, "round {round}: {wrong} f16 values differ");
    }
}

/// The probe keeps cuBLAS and cuSOLVER mapped once it found them, so that cudarc finds them
/// loaded instead of loading them again, and probes once per process.
#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn the_probe_keeps_the_libraries_it_found_loaded() {
    if !gpu_or_skip("the_probe_keeps_the_libraries_it_found_loaded") {
        return;
    }
    let p = cuda::probe();
    assert!(p.cublas_present, "a usable GPU without cuBLAS");
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(maps.contains("libcublas.so"), "cuBLAS was unloaded");
    assert_eq!(p.cusolver_present, maps.contains("libcusolver.so"));
    // Probed once: the second call loads nothing.
    let t = std::time::Instant::now();
    let again = cuda::probe();
    assert!(t.elapsed() < std::time::Duration::from_millis(5));
    assert_eq!(again.cublas_present, p.cublas_present);
}

// GPU faults. Each merge here runs as a child process: a device fault leaves the context of
// the process it happened in unusable, and the memory held below must belong to another
// process than the merge, as when another program holds the GPU. (Held in this process,
// it also starves other GPU tests running at the same time: scripts/gpu_check.sh runs them
// one at a time.)

/// A merge on the GPU through the command line, into `out`, with `env` set.
fn cli_merge_on_gpu(config: &Path, out: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(common::bin());
    cmd.arg("merge")
        .arg(config)
        .arg(out)
        .args(["--device", "cuda"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The run failed with exit 1 and one error line, no panic and no cudarc dump, and left
/// nothing beside its output; returns the error line.
fn one_clean_failure(o: &std::process::Output, out_parent: &Path) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{:?}: {stderr}", o.status);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("DriverError"),
        "{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let left: Vec<_> = std::fs::read_dir(out_parent)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    errors[0].to_string()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn out_of_device_memory_ends_the_merge_with_one_line_that_says_what_lowers_it() {
    if !gpu_or_skip("out_of_device_memory_ends_the_merge_with_one_line_that_says_what_lowers_it") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A pool of GPT-2 small width (2 layers, 180 MB a model): its merge needs more device
    // memory than the least left free below.
    let pool = tmp.path().join("pool");
    let synth = std::process::Command::new(common::bin())
        .args([
            "synth",
            "--layers",
            "2",
            "--models",
            "2",
            "--examples",
            "32",
        ])
        .arg("--out")
        .arg(&pool)
        .output()
        .unwrap();
    assert!(synth.status.success(), "{synth:?}");
    let dev = CudaDevice::open(0).unwrap();
    let out_parent = tmp.path().join("out");
    std::fs::create_dir(&out_parent).unwrap();
    // How much the child's context, handles and merge need is the driver's business: the
    // memory left free goes from little to more, and every run that fails must fail cleanly,
    // out of memory, with the step and the option named; at least one must fail in the merge
    // itself (not while opening the GPU).
    let mut in_the_merge = 0;
    for keep_mb in [128usize, 384, 1024, 2048] {
        let (free, total) = dev.stream().context().mem_get_info().unwrap();
        let held = dev
            .zeros::<u8>(
                free.saturating_sub(keep_mb << 20),
                "memory held by the test",
            )
            .unwrap();
        eprintln!(
            "holding {} of {} MB, {} MB left free",
            held.len() >> 20,
            total >> 20,
            dev.stream().context().mem_get_info().unwrap().0 >> 20
        );
        let o = cli_merge_on_gpu(&pool.join("merge.yaml"), &out_parent.join("merged"), &[]);
        drop(held);
        if o.status.success() {
            eprintln!("{keep_mb} MB free: the merge fitted");
            std::fs::remove_dir_all(out_parent.join("merged")).unwrap();
            continue;
        }
        let line = one_clean_failure(&o, &out_parent);
        eprintln!("{keep_mb} MB free: {line}");
        assert_mentions(&line, &["error: out of GPU memory in ", " was free: "]);
        assert!(line.contains("--device cpu"), "{line}");
        if !line.contains("in opening GPU") {
            assert_mentions(&line, &[" needed "]);
            in_the_merge += 1;
        }
    }
    assert!(
        in_the_merge > 0,
        "no run ran out of memory in the merge itself"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn a_kernel_fault_mid_merge_names_the_step_and_removes_the_partial_output() {
    if !gpu_or_skip("a_kernel_fault_mid_merge_names_the_step_and_removes_the_partial_output") {
        return;
    }
    // fault.cu's kernels, launched by the test hook at the second model's forward pass.
    for (kernel, status) in [
        ("write_through", "CUDA_ERROR_ILLEGAL_ADDRESS"),
        ("trap", "CUDA_ERROR_"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let out_parent = tmp.path().join("out");
        std::fs::create_dir(&out_parent).unwrap();
        let spec = format!("{kernel}:1");
        let o = cli_merge_on_gpu(
            &fixtures().join("gpt2_pool/compat.yaml"),
            &out_parent.join("merged"),
            &[("REGMEAN_TEST_GPU_FAULT", &spec)],
        );
        let line = one_clean_failure(&o, &out_parent);
        assert_mentions(
            &line,
            &[
                "the GPU failed in the forward pass of task_b: ",
                status,
                "--device cpu",
            ],
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn merges_sharing_one_gpu_at_once_all_match_the_cpu_merge() {
    if !gpu_or_skip("merges_sharing_one_gpu_at_once_all_match_the_cpu_merge") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let configs = [
        fixtures().join("gpt2_pool/compat.yaml"),
        fixtures().join("clip_pool/compat.yaml"),
    ];
    // Two of each at once, started together.
    let runs: Vec<(usize, PathBuf, std::process::Child)> = (0..4)
        .map(|i| {
            let out = tmp.path().join(format!("gpu{i}"));
            let child = std::process::Command::new(common::bin())
                .arg("merge")
                .arg(&configs[i % 2])
                .arg(&out)
                .args(["--device", "cuda", "-q"])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (i % 2, out, child)
        })
        .collect();
    let cpu: Vec<PathBuf> = configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let out = tmp.path().join(format!("cpu{i}"));
            let cfg = MergeConfig::load(c).unwrap();
            merge(&CpuBackend, &cfg, &out, &MergeOptions::default(), &Silent).unwrap();
            out
        })
        .collect();
    for (config, out, child) in runs {
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            out.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_model_matches(&out, &cpu[config].join("model.safetensors"), 1e-4);
    }
}

/// `n` values in [−1, 1], a fixed pseudo-random pattern (a Weyl sequence).
fn patterned_rows(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn the_accumulator_on_a_callers_stream_matches_the_cpu_accumulator() {
    use regmean_gpu::accumulator::{
        cuda_device_on_stream, Accumulator, AccumulatorDevice, HostRows, RowType,
    };
    if !gpu_or_skip("the_accumulator_on_a_callers_stream_matches_the_cpu_accumulator") {
        return;
    }
    // The caller's own stream, made outside the accumulator.
    let ctx = cudarc::driver::CudaContext::new(0).unwrap();
    let own = ctx.new_stream().unwrap();
    // SAFETY: `own` is a live stream of device 0's primary context and outlives `dev`.
    let dev = unsafe { cuda_device_on_stream(0, own.cu_stream()) }.unwrap();
    let (dim, stride, rows) = (200, 208, 300);
    let x = patterned_rows(rows * stride, 3);
    let mask: Vec<u8> = (0..rows).map(|r| (r % 5 != 2) as u8).collect();
    for dtype in [RowType::F32, RowType::F16, RowType::BF16] {
        // The CPU reference sees the values the device sees (rounded to the type); the
        // device buffer is kept alive (boxed) until the Gram is read back.
        let (host_rows, device_rows): (Vec<f32>, Box<dyn std::any::Any>) = match dtype {
            RowType::F32 => (x.clone(), Box::new(own.clone_htod(&x).unwrap())),
            RowType::F16 => {
                let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
                let w = h.iter().map(|v| v.to_f32()).collect();
                (w, Box::new(own.clone_htod(&h).unwrap()))
            }
            RowType::BF16 => {
                let b: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
                let w = b.iter().map(|v| v.to_f32()).collect();
                (w, Box::new(own.clone_htod(&b).unwrap()))
            }
        };
        let ptr = device_ptr_of(device_rows.as_ref(), &own);
        let dmask = own.clone_htod(&mask).unwrap();
        let mptr = device_ptr_of(&dmask, &own);
        let mut gpu = Accumulator::new(&AccumulatorDevice::Cuda(dev.clone()), dim, false).unwrap();
        // SAFETY: both buffers hold what update_device reads (rows·stride values, rows
        // bytes), live in device 0's context, were written on `own`, and outlive the sync
        // in finish.
        unsafe { gpu.update_device(ptr, dtype, rows, stride, Some(mptr)) }.unwrap();
        let got = gpu.finish().unwrap();
        let mut cpu = Accumulator::new(&AccumulatorDevice::Cpu, dim, false).unwrap();
        cpu.update(HostRows::F32(&host_rows), rows, stride, Some(&mask))
            .unwrap();
        let want = cpu.finish().unwrap();
        assert_eq!(got.rows, want.rows, "{dtype:?}");
        // f16 rows go through the tensor cores (f32 accumulation in another order).
        let e = rel_err(&got.gram, &want.gram);
        assert!(e < 1e-5, "{dtype:?}: {e:.2e}");
    }
    // Host rows on the GPU accumulator: the same Gram.
    let mut gpu = Accumulator::new(&AccumulatorDevice::Cuda(dev.clone()), dim, false).unwrap();
    gpu.update(HostRows::F32(&x), rows, stride, Some(&mask))
        .unwrap();
    let mut cpu = Accumulator::new(&AccumulatorDevice::Cpu, dim, false).unwrap();
    cpu.update(HostRows::F32(&x), rows, stride, Some(&mask))
        .unwrap();
    let e = rel_err(&gpu.finish().unwrap().gram, &cpu.finish().unwrap().gram);
    assert!(e < 1e-5, "host rows: {e:.2e}");
}

/// The raw device pointer of a `CudaSlice` the test keeps alive.
fn device_ptr_of(buffer: &dyn std::any::Any, stream: &cudarc::driver::CudaStream) -> u64 {
    use cudarc::driver::{CudaSlice, DevicePtr};
    macro_rules! try_type {
        ($($t:ty),*) => {$(
            if let Some(s) = buffer.downcast_ref::<CudaSlice<$t>>() {
                let (p, _sync) = s.device_ptr(stream);
                return p;
            }
        )*};
    }
    try_type!(f32, half::f16, half::bf16, u8);
    panic!("not a device buffer of a known type")
}
