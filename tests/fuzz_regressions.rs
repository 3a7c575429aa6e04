//! Every fuzz entry point over its seed inputs (the test fixtures) and over the findings kept
//! in tests/fuzz_regressions/: each must return without panicking or exhausting memory.

mod common;

use common::{fixtures, repo};
use regmean_gpu::fuzzing;

fn run(target: &str, data: &[u8]) {
    match target {
        "safetensors_file" => fuzzing::safetensors_file(data),
        "shard_index" => fuzzing::shard_index(data),
        "model_config" => fuzzing::model_config(data),
        "merge_yaml" => fuzzing::merge_yaml(data),
        "gram_file" => fuzzing::gram_file(data),
        "jsonl_data" => fuzzing::jsonl_data(data),
        "image_file" => fuzzing::image_file(data),
        "preprocessor_config" => fuzzing::preprocessor_config(data),
        other => panic!("unknown fuzz target `{other}`"),
    }
}

#[test]
fn seed_inputs_and_their_truncations() {
    let f = fixtures();
    let seeds = [
        (
            "safetensors_file",
            f.join("gpt2_forward/expected.safetensors"),
        ),
        (
            "shard_index",
            f.join("clip_pool/task_c/model.safetensors.index.json"),
        ),
        ("model_config", f.join("clip_pool/base/config.json")),
        ("model_config", f.join("gpt2_pool/task_c/config.json")),
        ("merge_yaml", f.join("gpt2_pool/exclude.yaml")),
        ("jsonl_data", f.join("gpt2_pool/data/task_a.jsonl")),
    ];
    for (target, path) in seeds {
        let data = std::fs::read(&path).unwrap();
        // Every prefix of a valid input is a malformed one.
        for cut in (0..=data.len()).step_by((data.len() / 64).max(1)) {
            run(target, &data[..cut]);
        }
    }
}

/// Each finding once crashed or exhausted memory (see the README beside them): replayed, it
/// must now return an error instead.
#[test]
fn recorded_findings() {
    let dir = repo().join("tests/fuzz_regressions");
    let mut replayed = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some((target, _)) = name.split_once('-') {
            run(target, &std::fs::read(&path).unwrap());
            replayed.push(name);
        }
    }
    replayed.sort();
    assert_eq!(
        replayed,
        [
            "image_file-thin-1x100000.png",
            "model_config-huge-clip-sizes.json",
            "model_config-huge-n_embd.json"
        ],
        "every recorded finding is replayed"
    );
}

/// The thin-image finding: 1 × 100 000 pixels in 275 bytes, which a resize to a shortest edge
/// of 224 would have turned into 22 million rows of pixels.
#[test]
fn a_thin_image_is_refused_before_the_resize_allocates() {
    let path = repo().join("tests/fuzz_regressions/image_file-thin-1x100000.png");
    let err = regmean_gpu::data::image::ImageProcessor::default()
        .process_file(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("over the limit") && err.contains("1×100000"),
        "{err}"
    );
}

#[test]
fn config_sizes_are_bounded() {
    let huge = br#"{"model_type": "gpt2", "n_embd": 4294967296, "n_head": 1}"#;
    fuzzing::model_config(huge);
    let v: serde_json::Value = serde_json::from_slice(huge).unwrap();
    let e = regmean_gpu::model::gpt2::Gpt2Config::from_json(&v, "config.json".as_ref())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`n_embd` must be an integer from 0 to 1048576"),
        "{e}"
    );
    let clip = br#"{"model_type": "clip_vision_model", "num_channels": 1000000, "patch_size": 1000000, "image_size": 1000000, "hidden_size": 1000000, "num_attention_heads": 1}"#;
    let v: serde_json::Value = serde_json::from_slice(clip).unwrap();
    assert!(
        regmean_gpu::model::clip::ClipVisionConfig::from_json(&v, "config.json".as_ref()).is_err()
    );
}
