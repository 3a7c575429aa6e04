//! RegMean merges of decoder-LLM pools against the independent float64 RegMean of
//! scripts/gen_llm_fixtures.py (tests/fixtures/llm/*_pool/expected): every nn.Linear
//! solved with one Gram per distinct input, lm_head when untied, the rest averaged, tied
//! embeddings kept tied, excluded parameters the base model's.

mod common;

use common::{assert_model_matches, fixtures, rewrite_safetensors, Pool};
use std::collections::BTreeMap;

use regmean_gpu::io::safetensors::{write_file, OutTensor, TensorData};
use regmean_gpu::io::{Checkpoint, Dtype};

const TOL: f64 = 1e-4;

fn merged(pool: &str, config: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = std::process::Command::new(common::bin())
        .args(["merge", "--device", "cpu", "-q"])
        .arg(fixtures().join("llm").join(pool).join(config))
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (tmp, out)
}

#[test]
fn llama_gqa_untied_pool_matches_f64_regmean() {
    let (_tmp, out) = merged("llama_pool", "default.yaml");
    let expected = fixtures().join("llm/llama_pool/expected/default_f64.safetensors");
    assert_model_matches(&out, &expected, TOL);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
}

#[test]
fn llama_excluded_parameters_keep_the_base_values() {
    let (_tmp, out) = merged("llama_pool", "exclude.yaml");
    let expected = fixtures().join("llm/llama_pool/expected/exclude_f64.safetensors");
    assert_model_matches(&out, &expected, TOL);
}

#[test]
fn qwen2_bias_tied_pool_matches_f64_regmean_and_stays_tied() {
    let (_tmp, out) = merged("qwen2_pool", "default.yaml");
    let expected = fixtures().join("llm/qwen2_pool/expected/default_f64.safetensors");
    assert_model_matches(&out, &expected, TOL);
    let ckpt = Checkpoint::open_all(&out).unwrap();
    assert!(
        !ckpt.contains("lm_head.weight"),
        "a tied head is the embeddings, not a tensor of its own"
    );
}

#[test]
fn a_stored_copy_of_a_tied_head_is_not_merged_or_written() {
    let pool = Pool::of("llm/qwen2_pool");
    // Every model also stores lm_head.weight, as some tied checkpoints do: the base's holds
    // zeros, so were it passed through, the output would hold them.
    for dir in ["base", "task_a", "task_c"] {
        let path = pool.path(&format!("{dir}/model.safetensors"));
        let f = regmean_gpu::io::SafetensorsFile::open(&path).unwrap();
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = f
            .tensors()
            .iter()
            .map(|(n, e)| (n.clone(), e.shape.clone(), f.to_f32(n).unwrap()))
            .collect();
        drop(f);
        let zeros = vec![0.0f32; 96 * 32];
        let copy = if dir == "base" {
            zeros
        } else {
            tensors[0].2.clone()
        };
        tensors.push(("lm_head.weight".into(), vec![96, 32], copy));
        let out: Vec<OutTensor> = tensors
            .iter()
            .map(|(n, s, v)| OutTensor {
                name: n.clone(),
                dtype: Dtype::F32,
                shape: s.clone(),
                data: TensorData::F32(v),
            })
            .collect();
        write_file(&path, &out, &BTreeMap::new()).unwrap();
    }
    let out = pool.path("merged");
    let o = pool.merge("default.yaml", &out, &["--device", "cpu", "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!Checkpoint::open_all(&out)
        .unwrap()
        .contains("lm_head.weight"));
    let expected = fixtures().join("llm/qwen2_pool/expected/default_f64.safetensors");
    assert_model_matches(&out, &expected, TOL);
}

#[test]
fn output_takes_the_base_models_dtype_without_out_dtype() {
    let pool = Pool::of("llm/qwen2_pool");
    rewrite_safetensors(&pool.path("base/model.safetensors"), |_, _, s, v| {
        Some((Dtype::BF16, s, v))
    });
    let yaml = std::fs::read_to_string(pool.path("default.yaml")).unwrap();
    let yaml = yaml.replace("out_dtype: float32\n", "");
    std::fs::write(pool.path("default.yaml"), yaml).unwrap();
    let out = pool.path("merged");
    let o = pool.merge("default.yaml", &out, &["--device", "cpu", "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = Checkpoint::open(&out).unwrap();
    for name in ckpt.names() {
        assert_eq!(ckpt.entry(name).unwrap().dtype, Dtype::BF16, "{name}");
    }
    // bfloat16 keeps 8 bits of mantissa: half an ulp is 2⁻⁸ relative.
    let expected = fixtures().join("llm/qwen2_pool/expected/default_f64.safetensors");
    assert_model_matches(&out, &expected, 4e-3);
}

#[test]
fn gram_files_give_the_same_merge_as_data() {
    let pool = Pool::of("llm/llama_pool");
    let mut yaml = std::fs::read_to_string(pool.path("default.yaml")).unwrap();
    for task in ["task_a", "task_b", "task_c"] {
        let grams = pool.path(&format!("{task}.grams.safetensors"));
        let o = std::process::Command::new(common::bin())
            .args(["grams", "--device", "cpu", "-q", "--model"])
            .arg(pool.path(task))
            .arg("--data")
            .arg(pool.path(&format!("data/{task}.jsonl")))
            .arg("--config")
            .arg(pool.path("default.yaml"))
            .arg("-o")
            .arg(&grams)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        yaml = yaml.replace(
            &format!("data: ./data/{task}.jsonl"),
            &format!("grams: ./{task}.grams.safetensors"),
        );
    }
    assert_eq!(yaml.matches("grams:").count(), 3, "{yaml}");
    std::fs::write(pool.path("grams.yaml"), yaml).unwrap();
    let (from_data, from_grams) = (pool.path("from_data"), pool.path("from_grams"));
    for (config, out) in [("default.yaml", &from_data), ("grams.yaml", &from_grams)] {
        let o = pool.merge(config, out, &["--device", "cpu", "-q"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (a, b) = (
        Checkpoint::open(&from_data).unwrap(),
        Checkpoint::open(&from_grams).unwrap(),
    );
    for name in a.names() {
        assert_eq!(a.bytes(name).unwrap(), b.bytes(name).unwrap(), "{name}");
    }
    assert!(a.contains("lm_head.weight"));
}
