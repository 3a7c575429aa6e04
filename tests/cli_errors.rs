//! Bad input through the CLI: one clear message naming the file and the problem, a non-zero
//! exit without a panic, and nothing left at (or beside) the output path.

mod common;

use std::process::Command;

use common::{assert_mentions, bin, Pool};

#[test]
fn truncated_safetensors() {
    let pool = Pool::new();
    let p = pool.path("task_a/model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(
        &pool.merge_fails("compat.yaml"),
        &["task_a/model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn header_length_beyond_the_file() {
    let pool = Pool::new();
    let p = pool.path("task_b/model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    assert_mentions(
        &pool.merge_fails("compat.yaml"),
        &["task_b/model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn missing_tensor() {
    let pool = Pool::new();
    pool.edit("task_b/model.safetensors", |n, s, v| {
        (n != "transformer.h.1.mlp.c_fc.bias").then_some((s, v))
    });
    assert_mentions(
        &pool.merge_fails("compat.yaml"),
        &["task_b", "missing tensor `h.1.mlp.c_fc.bias`"],
    );
}

#[test]
fn shape_mismatch_with_the_base() {
    let pool = Pool::new();
    pool.edit("task_a/model.safetensors", |n, s, v| {
        Some(if n == "transformer.h.0.attn.c_proj.weight" {
            (vec![45, 44], v[..45 * 44].to_vec())
        } else {
            (s, v)
        })
    });
    assert_mentions(
        &pool.merge_fails("compat.yaml"),
        &[
            "task_a/model.safetensors",
            "h.0.attn.c_proj.weight",
            "[45, 44]",
            "[45, 45]",
        ],
    );
}

#[test]
fn different_architecture_than_the_base() {
    let pool = Pool::new();
    let p = pool.path("task_c/config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"n_layer\": 2", "\"n_layer\": 3");
    std::fs::write(&p, text).unwrap();
    assert_mentions(
        &pool.merge_fails("compat.yaml"),
        &["task_c/config.json", "differ from the base model"],
    );
}

#[test]
fn nan_in_a_weight() {
    let pool = Pool::new();
    pool.edit("task_a/model.safetensors", |n, s, mut v| {
        if n == "transformer.h.1.mlp.c_fc.weight" {
            v[7] = f32::NAN;
        }
        Some((s, v))
    });
    assert_mentions(
        &pool.merge_fails("compat.yaml"),
        &[
            "task_a/model.safetensors",
            "transformer.h.1.mlp.c_fc.weight",
            "non-finite",
        ],
    );
}

#[test]
fn nan_in_an_averaged_tensor() {
    // An averaged tensor (not a linear weight): named as stored, whichever read meets it
    // first (loading the model, or adding it to the sums).
    let pool = Pool::new();
    pool.edit("task_b/model.safetensors", |n, s, mut v| {
        if n == "transformer.ln_f.weight" {
            v[3] = f32::NAN;
        }
        Some((s, v))
    });
    assert_mentions(
        &pool.merge_fails("compat.yaml"),
        &[
            "task_b/model.safetensors",
            "transformer.ln_f.weight",
            "non-finite value (NaN) at element 3",
        ],
    );
}

#[test]
fn empty_data() {
    let pool = Pool::new();
    std::fs::write(pool.path("data/task_b.jsonl"), "").unwrap();
    assert_mentions(
        &pool.merge_fails("compat.yaml"),
        &["data/task_b.jsonl", "no examples"],
    );
}

#[test]
fn token_id_beyond_the_vocabulary() {
    let pool = Pool::new();
    let p = pool.path("data/task_a.jsonl");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, format!("{text}{{\"input_ids\": [1, 2, 500]}}\n")).unwrap();
    // Put the bad example among those used: take the file in order and use everything.
    let cfg = std::fs::read_to_string(pool.path("compat.yaml"))
        .unwrap()
        .replace("num_regmean_examples: 10", "num_regmean_examples: 100");
    std::fs::write(pool.path("all.yaml"), cfg).unwrap();
    assert_mentions(
        &pool.merge_fails("all.yaml"),
        &["data/task_a.jsonl", "token id 500", "vocab_size 97"],
    );
}

#[test]
fn unknown_config_key() {
    let pool = Pool::new();
    let cfg = std::fs::read_to_string(pool.path("compat.yaml"))
        .unwrap()
        .replace("  seed: 0", "  seed: 0\n  reduce_ratio: 0.5");
    std::fs::write(pool.path("bad.yaml"), cfg).unwrap();
    assert_mentions(
        &pool.merge_fails("bad.yaml"),
        &["bad.yaml", "unknown field `reduce_ratio`"],
    );
}

#[test]
fn existing_output_is_refused_without_force() {
    let pool = Pool::new();
    let out = pool.path("merged");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = pool.merge("compat.yaml", &out, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_mentions(
        &String::from_utf8_lossy(&o.stderr),
        &["already exists", "--force"],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn unavailable_device_is_an_error_not_a_panic() {
    let pool = Pool::new();
    let o = pool.merge("compat.yaml", &pool.path("m"), &["--device", "cuda"]);
    assert_eq!(o.status.code(), Some(1));
    assert_mentions(
        &String::from_utf8_lossy(&o.stderr),
        &["--device cuda", "--device cpu"],
    );
}

#[test]
fn cli_merge_and_grams_round_trip() {
    let pool = Pool::new();
    let grams = pool.path("a.grams.safetensors");
    let o = Command::new(bin())
        .args([
            "grams",
            "--model",
            pool.path("task_a").to_str().unwrap(),
            "--data",
            pool.path("data/task_a.jsonl").to_str().unwrap(),
        ])
        .args([
            "--config",
            pool.path("compat.yaml").to_str().unwrap(),
            "-o",
            grams.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("12 examples, 288 rows per site"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // A Gram file used for the wrong model is refused by fingerprint.
    let cfg = std::fs::read_to_string(pool.path("compat.yaml"))
        .unwrap()
        .replace(
            "- model: ./task_b\n  data: ./data/task_b.jsonl",
            "- model: ./task_b\n  grams: ./a.grams.safetensors",
        );
    assert!(cfg.contains("a.grams"), "{cfg}");
    std::fs::write(pool.path("wrong.yaml"), cfg).unwrap();
    assert_mentions(
        &pool.merge_fails("wrong.yaml"),
        &["a.grams.safetensors", "different model"],
    );
    // ... and with different options.
    let cfg = std::fs::read_to_string(pool.path("compat.yaml"))
        .unwrap()
        .replace(
            "- model: ./task_a\n  data: ./data/task_a.jsonl",
            "- model: ./task_a\n  grams: ./a.grams.safetensors",
        );
    std::fs::write(
        pool.path("opts.yaml"),
        cfg.replace("fusionbench_compat: true", "fusionbench_compat: false"),
    )
    .unwrap();
    assert_mentions(
        &pool.merge_fails("opts.yaml"),
        &[
            "a.grams.safetensors",
            "different options",
            "fusionbench_compat",
        ],
    );
    // The right use merges.
    std::fs::write(pool.path("ok.yaml"), cfg).unwrap();
    let o = pool.merge("ok.yaml", &pool.path("merged"), &["-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(pool.path("merged/model.safetensors").is_file());
}

#[test]
fn undecodable_image_in_an_image_folder() {
    let pool = Pool::of("eval/clip");
    std::fs::write(
        pool.path("images_task_b/red circle/broken.jpg"),
        b"\xff\xd8\xff\xe0 not really a JPEG",
    )
    .unwrap();
    assert_mentions(
        &pool.merge_fails("merge_folder.yaml"),
        &[
            "images_task_b/red circle/broken.jpg",
            "cannot decode the image",
        ],
    );
}

#[test]
fn text_data_without_a_tokenizer() {
    let pool = Pool::of("eval/gpt2");
    for dir in ["base", "task_a", "task_b"] {
        std::fs::remove_file(pool.path(&format!("{dir}/tokenizer.json"))).unwrap();
    }
    assert_mentions(
        &pool.merge_fails("merge_text.yaml"),
        &["task_a/tokenizer.json", "no tokenizer.json"],
    );
}

#[test]
fn a_thin_image_is_refused_before_its_resize_allocates() {
    // 200 000 × 1 pixels is a small PNG, but resized to a shortest edge of 224 it would be
    // 44.8 million × 224 pixels: refused with the file named, not an out-of-memory abort.
    let pool = Pool::of("eval/clip");
    image::RgbImage::new(200_000, 1)
        .save(pool.path("images_task_b/red circle/thin.png"))
        .unwrap();
    assert_mentions(
        &pool.merge_fails("merge_folder.yaml"),
        &[
            "images_task_b/red circle/thin.png",
            "cannot preprocess the image",
            "over the limit",
        ],
    );
}

#[test]
fn activations_that_overflow_are_refused_not_averaged() {
    // Finite weights large enough that the MLP's output overflows f32: the Gram of the next
    // site holds inf/NaN, which must stop the merge with the site named (not fall back to a
    // plain average, as a failed factorisation would).
    let pool = Pool::new();
    pool.edit("task_a/model.safetensors", |n, s, v| {
        let huge = n == "transformer.h.0.mlp.c_fc.weight";
        Some((s, if huge { vec![3e38; v.len()] } else { v }))
    });
    assert_mentions(
        &pool.merge_fails("compat.yaml"),
        &["h.0.mlp.c_proj", "non-finite activations", "float32"],
    );
}
