//! Decoder LLMs on the GPU: the CUDA forward pass of tiny Llama, Mistral, Qwen2 and Qwen3
//! models (tests/fixtures/llm/forward) against the CPU engine and transformers layer by
//! layer, and `merge` of the tiny Llama and Qwen2 pools on cuda against the CPU engine and
//! the f64 reference, in float32 and float16. They need an NVIDIA GPU, so `cargo test`
//! reports them as ignored; `scripts/gpu_check.sh` runs them with `--include-ignored` and
//! `REGMEAN_REQUIRE_GPU=1`, under which a missing GPU fails them instead of skipping them.

mod common;

use std::process::Command;

use common::{
    assert_gpu_matches, bin, fixtures, gpu_merges_match_the_cpu, gpu_or_skip, token_batch,
};
use regmean_gpu::backend::cuda::CudaDevice;
use regmean_gpu::backend::{Backend, CpuBackend, CudaBackend, Precision};
use regmean_gpu::config::MergeConfig;
use regmean_gpu::io::{Checkpoint, SafetensorsFile};
use regmean_gpu::model::{ForwardHooks, Model};

/// The tolerances of the GPT-2 and CLIP GPU tests (tests/gpu.rs).
const PRECISIONS: [(Precision, f64); 2] = [(Precision::Float32, 1e-4), (Precision::Float16, 1e-2)];

/// Every hidden state of the fixture's model on its batch, then the logits.
fn hidden_states_and_logits<B: Backend>(
    backend: &B,
    ckpt: &Checkpoint,
    arch: &str,
) -> Vec<Vec<f32>> {
    let dir = fixtures().join("llm/forward").join(arch);
    let want = SafetensorsFile::open(dir.join("expected.safetensors")).unwrap();
    let batch = token_batch(&want);
    let model = Model::load(backend, ckpt).unwrap();
    let mut hidden = Vec::new();
    let out = model
        .forward(
            backend,
            &batch,
            ForwardHooks {
                grams: None,
                hidden_states: Some(&mut hidden),
            },
        )
        .unwrap();
    let Model::Llama(llama) = &model else {
        panic!("{arch} did not load as a decoder LLM")
    };
    let head = llama.load_lm_head(backend, ckpt).unwrap();
    let logits = llama.logits(backend, &head, &out.last_hidden).unwrap();
    hidden.push(backend.download(&logits).unwrap());
    hidden
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn cuda_decoder_forward_matches_the_cpu_engine_and_transformers_layer_by_layer() {
    if !gpu_or_skip("cuda_decoder_forward_matches_the_cpu_engine_and_transformers_layer_by_layer") {
        return;
    }
    let dev = CudaDevice::open(0).unwrap();
    // Llama: GQA and llama3 RoPE scaling, untied head; Qwen2: q/k/v biases, tied
    // embeddings; Qwen3: per-head q/k norms, explicit head_dim; Mistral.
    for arch in ["llama", "qwen2", "qwen3", "mistral"] {
        let dir = fixtures().join("llm/forward").join(arch);
        let want = SafetensorsFile::open(dir.join("expected.safetensors")).unwrap();
        let ckpt = Checkpoint::open(dir.join("model")).unwrap();
        let cpu = hidden_states_and_logits(&CpuBackend, &ckpt, arch);
        for (precision, tol) in PRECISIONS {
            let backend = CudaBackend::new(dev.clone(), precision);
            let gpu = hidden_states_and_logits(&backend, &ckpt, arch);
            assert_eq!(gpu.len(), cpu.len());
            let last = gpu.len() - 1;
            for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
                let name = if i == last {
                    "logits".to_string()
                } else {
                    format!("hidden_states.{i}")
                };
                let label = format!("{arch} {} {name}", precision.name());
                assert_gpu_matches(&label, g, c, &want.to_f32(&name).unwrap(), tol);
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn decoder_merges_on_cuda_match_the_cpu_engine_and_the_f64_reference() {
    if !gpu_or_skip("decoder_merges_on_cuda_match_the_cpu_engine_and_the_f64_reference") {
        return;
    }
    let dev = CudaDevice::open(0).unwrap();
    for pool in ["llama_pool", "qwen2_pool"] {
        let dir = fixtures().join("llm").join(pool);
        let cfg = MergeConfig::load(&dir.join("default.yaml")).unwrap();
        let reference = dir.join("expected/default_f64.safetensors");
        gpu_merges_match_the_cpu(&dev, cfg, pool, Some(&reference), |report| {
            assert!(report.peak_device_bytes.is_some(), "ran on the GPU")
        });
    }
}

/// The layer-wise engine on decoders: RegMean++ and RegMean with `schedule: layer`, its
/// forward passes on the GPU, against the CPU engine and the f64 references.
#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn layerwise_decoder_merges_on_cuda_match_the_cpu_engine_and_the_f64_reference() {
    if !gpu_or_skip("layerwise_decoder_merges_on_cuda_match_the_cpu_engine_and_the_f64_reference") {
        return;
    }
    let dev = CudaDevice::open(0).unwrap();
    for pool in ["llama_pool", "qwen2_pool"] {
        let dir = fixtures().join("llm").join(pool);
        let pp = MergeConfig::load(&dir.join("regmeanpp.yaml")).unwrap();
        let mut by_layer = MergeConfig::load(&dir.join("default.yaml")).unwrap();
        by_layer.parameters.schedule = regmean_gpu::config::Schedule::Layer;
        for (cfg, reference) in [(pp, "regmeanpp_f64"), (by_layer, "default_f64")] {
            let reference = dir.join(format!("expected/{reference}.safetensors"));
            let label = format!("{pool} {:?}", cfg.merge_method);
            gpu_merges_match_the_cpu(&dev, cfg, &label, Some(&reference), |report| {
                let cache = report.activation_cache.expect("ran layer by layer");
                assert!(
                    cache.on_device_bytes > 0,
                    "no activation cache on the device: {cache:?}"
                )
            });
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run scripts/gpu_check.sh"]
fn merge_device_cuda_on_a_decoder_says_once_that_it_is_unverified() {
    if !gpu_or_skip("merge_device_cuda_on_a_decoder_says_once_that_it_is_unverified") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = Command::new(bin())
        .arg("merge")
        .arg(fixtures().join("llm/llama_pool/default.yaml"))
        .arg(&out)
        .args(["--device", "cuda"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(
        stderr
            .matches(regmean_gpu::device::DECODER_CUDA_NOTE)
            .count(),
        1,
        "{stderr}"
    );
    assert!(out.join("model.safetensors").exists());
}
