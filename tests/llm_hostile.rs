//! Bad input to decoder-LLM merges: each fails with one line naming the file and the
//! problem (and what is supported), exits 1 and leaves no output behind.

mod common;

use common::{assert_mentions, copy_dir, fixtures, Pool};

fn llama_pool() -> Pool {
    Pool::of("llm/llama_pool")
}

fn edit_json(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn unsupported_model_type_is_named_with_the_supported_list() {
    let pool = llama_pool();
    edit_json(&pool.path("task_a/config.json"), |v| {
        v["model_type"] = "gemma2".into()
    });
    assert_mentions(
        &pool.merge_fails("default.yaml"),
        &[
            "task_a/config.json",
            "unsupported model_type `gemma2`",
            "llama, mistral, qwen2, qwen3",
        ],
    );
}

#[test]
fn unsupported_rope_type_is_named_with_the_supported_list() {
    let pool = llama_pool();
    edit_json(&pool.path("base/config.json"), |v| {
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0})
    });
    assert_mentions(
        &pool.merge_fails("default.yaml"),
        &[
            "base/config.json",
            "RoPE type `yarn` is not supported (supported: default, llama3)",
        ],
    );
}

#[test]
fn a_pool_mixing_architectures_is_refused() {
    let pool = llama_pool();
    std::fs::remove_dir_all(pool.path("task_b")).unwrap();
    copy_dir(
        &fixtures().join("llm/qwen2_pool/task_a"),
        &pool.path("task_b"),
    );
    assert_mentions(
        &pool.merge_fails("default.yaml"),
        &["task_b", "is a Qwen2 model but the base model", "is Llama"],
    );
}

#[test]
fn token_ids_beyond_the_vocabulary_are_refused() {
    let pool = llama_pool();
    let path = pool.path("data/task_c.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("{\"input_ids\": [5, 96, 7]}\n");
    std::fs::write(&path, text).unwrap();
    assert_mentions(
        &pool.merge_fails("default.yaml"),
        &[
            "data/task_c.jsonl",
            "example 11: token id 96 ≥ vocab_size 96",
        ],
    );
}

#[test]
fn sequences_beyond_max_position_embeddings_are_refused() {
    let pool = llama_pool();
    let yaml = std::fs::read_to_string(pool.path("default.yaml")).unwrap();
    std::fs::write(
        pool.path("default.yaml"),
        yaml.replace("max_length: 64", "max_length: 512"),
    )
    .unwrap();
    let long: Vec<String> = (0..130).map(|i| (3 + i % 90).to_string()).collect();
    std::fs::write(
        pool.path("data/task_a.jsonl"),
        format!("{{\"input_ids\": [{}]}}\n", long.join(", ")),
    )
    .unwrap();
    assert_mentions(
        &pool.merge_fails("default.yaml"),
        &[
            "data/task_a.jsonl",
            "example 1: 130 tokens exceed the model's max_position_embeddings 128",
        ],
    );
}

#[test]
fn sliding_windows_shorter_than_the_data_are_refused() {
    let pool = Pool::of("llm/qwen2_pool");
    for dir in ["base", "task_a", "task_b", "task_c"] {
        edit_json(&pool.path(&format!("{dir}/config.json")), |v| {
            v["use_sliding_window"] = true.into();
            v["sliding_window"] = 6.into();
        });
    }
    assert_mentions(
        &pool.merge_fails("default.yaml"),
        &[
            "data/task_a.jsonl",
            "exceed the sliding window of 6 tokens, which is not implemented",
        ],
    );
}

#[test]
fn cuda_for_a_decoder_llm_says_it_is_unverified_and_fails_cleanly_without_a_gpu() {
    if regmean_gpu::backend::cuda::probe()
        .unavailable_reason()
        .is_none()
    {
        // With a GPU the merge runs: tests/gpu_decoder.rs checks it against the CPU engine.
        return;
    }
    let pool = llama_pool();
    let out = pool.path("merged");
    let o = pool.merge("default.yaml", &out, &["--device", "cuda"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.matches("unverified on a GPU").count(),
        1,
        "one line says the CUDA decoder path is unverified: {stderr}"
    );
    assert_mentions(&stderr, &["--device cuda", "--device cpu"]);
    assert!(!out.exists());
}

#[test]
fn auto_keeps_a_decoder_llm_on_the_cpu_engine_and_says_so() {
    let pool = llama_pool();
    let out = pool.path("merged");
    let o = pool.merge("default.yaml", &out, &["--device", "auto"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(regmean_gpu::device::DECODER_AUTO_NOTE),
        "{stderr}"
    );
    assert!(out.join("model.safetensors").exists());
}
