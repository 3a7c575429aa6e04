//! What the command line tells a user besides errors: help for every flag, `-q` and `-v`,
//! user-facing names, warnings for settings that do nothing, the model card, and paths in
//! messages that are the user's own.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_mentions, bin, fixtures, Pool};

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(bin()).args(args).output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Flags and arguments of a `--help` text that have no description.
fn undescribed(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let indent = line.len() - t.len();
        let is_entry = (2..=6).contains(&indent) && (t.starts_with('-') || t.starts_with('<'));
        if !is_entry {
            continue;
        }
        // Either `--flag <X>   description` or the description on the next, deeper line.
        let same_line = t
            .split_once("  ")
            .is_some_and(|(_, d)| !d.trim().is_empty());
        let next_line = lines.get(i + 1).is_some_and(|n| {
            let nt = n.trim_start();
            n.len() - nt.len() > indent + 2 && !nt.is_empty()
        });
        if !same_line && !next_line {
            missing.push(t.to_string());
        }
    }
    missing
}

#[test]
fn every_flag_and_argument_is_described_in_help() {
    for sub in [
        "merge", "grams", "inspect", "demo", "forward", "eval", "doctor", "compare",
    ] {
        let (code, out, err) = run(&[sub, "--help"]);
        assert_eq!(code, Some(0), "{sub}: {err}");
        let missing = undescribed(&out);
        assert!(
            missing.is_empty(),
            "`{sub} --help` leaves {missing:?} undescribed:\n{out}"
        );
    }
    // The check itself finds a bare flag.
    assert_eq!(
        undescribed("Options:\n      --seed <SEED>\n          \n  -h, --help  Print help\n"),
        ["--seed <SEED>"]
    );
    let (_, out, _) = run(&["grams", "--help"]);
    assert_mentions(&out, &["JSON Lines", "image folder", "pixel_values"]);
}

#[test]
fn zero_threads_is_refused_with_a_clear_error() {
    let (code, _, err) = run(&["--threads", "0", "demo"]);
    assert_eq!(code, Some(2), "{err}");
    assert_mentions(&err, &["--threads", "at least 1 thread"]);
}

/// The pool's compat config with an exclude pattern written for prefixed names, and more
/// examples asked for than there are: two warnings.
fn config_with_warnings(pool: &Pool) -> &'static str {
    let cfg = std::fs::read_to_string(pool.path("compat.yaml"))
        .unwrap()
        .replace(
            "exclude_param_names_regex: []",
            "exclude_param_names_regex: ['transformer\\.h\\.0\\.mlp\\..*']",
        )
        .replace("num_regmean_examples: 10", "num_regmean_examples: 1000");
    std::fs::write(pool.path("warned.yaml"), cfg).unwrap();
    "warned.yaml"
}

#[test]
fn quiet_prints_only_the_final_line_and_warnings_name_the_model_own_names() {
    let pool = Pool::new();
    let config = config_with_warnings(&pool);
    let o = pool.merge(config, &pool.path("quiet"), &["-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "",
        "nothing but errors on stderr"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with("merged 3 GPT-2 models (RegMean) into "),
        "{out}"
    );

    let o = pool.merge(config, &pool.path("loud"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    let exclude = warnings
        .iter()
        .find(|w| w.contains("exclude_param_names_regex"))
        .unwrap_or_else(|| panic!("no warning for the unmatched pattern: {err}"));
    assert_mentions(
        exclude,
        &[
            "`transformer\\.h\\.0\\.mlp\\..*` matches no parameter",
            "`transformer.`-prefixed",
            "`h.0.",
        ],
    );
    assert!(warnings.iter().any(|w| w.contains("task_a.jsonl")), "{err}");
}

#[test]
fn verbose_shows_each_layer_how_it_was_solved_and_the_times() {
    let pool = Pool::new();
    let o = pool.merge("compat.yaml", &pool.path("v"), &["-v"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    for layer in ["h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight"] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("{layer}: solved by Cholesky in "))),
            "{layer}: {err}"
        );
    }
    assert_mentions(
        &err,
        &[
            "task_a: forward + Grams ",
            "loading weights",
            "files: model.safetensors",
        ],
    );
    let plain = pool.merge("compat.yaml", &pool.path("plain"), &[]);
    let plain = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.contains("solved by Cholesky"), "{plain}");
    // The summary times the write after the solve and the writer's whole work.
    assert_mentions(&plain, &["write ", "after the solve", "the writer worked "]);
}

#[test]
fn messages_use_the_names_users_know() {
    let pool = Pool::new();
    let cfg = std::fs::read_to_string(pool.path("compat.yaml")).unwrap();
    let single = cfg
        .replace("- model: ./task_b\n  data: ./data/task_b.jsonl\n", "")
        .replace("- model: ./task_c\n  data: ./data/task_c.jsonl\n", "");
    assert_ne!(single, cfg);
    std::fs::write(pool.path("single.yaml"), single).unwrap();
    let o = pool.merge("single.yaml", &pool.path("one"), &[]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        out.starts_with("merged 1 GPT-2 model (RegMean) into"),
        "{out}"
    );
    assert!(err.contains("merging 1 model (RegMean)"), "{err}");
    std::fs::write(
        pool.path("average.yaml"),
        cfg.replace("merge_method: regmean", "merge_method: simple_average"),
    )
    .unwrap();
    let o = pool.merge("average.yaml", &pool.path("avg"), &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("merged 3 GPT-2 models (simple average)"),
        "{out}"
    );
    let (_, _, err) = run(&["demo"]);
    assert!(err.contains("merging by simple average") && err.contains("merging by RegMean"));
    for leaked in ["SimpleAverage", "Regmean", "gpt2 models"] {
        assert!(!out.contains(leaked) && !err.contains(leaked), "{leaked}");
    }
    // A CLIP task model in a GPT-2 pool.
    common::copy_dir(
        &fixtures().join("clip_pool/task_a"),
        &pool.path("clip_task"),
    );
    std::fs::write(
        pool.path("mixed.yaml"),
        cfg.replace("- model: ./task_c", "- model: ./clip_task"),
    )
    .unwrap();
    assert_mentions(
        &pool.merge_fails("mixed.yaml"),
        &["clip_task", "is a CLIP vision model", "is GPT-2"],
    );
}

#[test]
fn the_model_card_names_its_inputs_without_local_paths_and_the_precision_used() {
    let pool = Pool::new();
    let out = pool.path("merged");
    let o = pool.merge("compat.yaml", &out, &["-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    let local = pool.dir.path().to_string_lossy().into_owned();
    assert!(!card.contains(&local), "local paths in the card:\n{card}");
    assert_mentions(
        &card,
        &[
            "with RegMean from the base model `base`",
            "- `task_a` (data `task_a.jsonl`)",
            "precision: float32",
            "reduce_non_diagonal_ratio: 0.6",
        ],
    );
    let cfg = std::fs::read_to_string(pool.path("compat.yaml")).unwrap();
    std::fs::write(
        pool.path("average.yaml"),
        cfg.replace("merge_method: regmean", "merge_method: simple_average"),
    )
    .unwrap();
    let avg = pool.path("avg");
    assert!(pool.merge("average.yaml", &avg, &["-q"]).status.success());
    let card = std::fs::read_to_string(avg.join("README.md")).unwrap();
    assert!(card.contains("with simple average"), "{card}");
    assert!(!card.contains("precision:"), "no forward pass ran:\n{card}");
}

#[test]
fn a_folder_given_as_the_config_is_named_as_such() {
    let pool = Pool::new();
    std::fs::copy(pool.path("compat.yaml"), pool.path("merge.yaml")).unwrap();
    let (code, _, err) = run(&[
        "merge",
        pool.dir.path().to_str().unwrap(),
        pool.path("out").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert_mentions(
        &err,
        &[
            "is a folder, not a merge config",
            "did you mean",
            "merge.yaml",
        ],
    );
    assert!(!err.contains("os error"), "{err}");
}

/// A failure while the output is being written names the output path the user gave, not the
/// hidden folder it is written in.
#[test]
fn write_errors_name_the_output_not_its_hidden_folder() {
    let pool = Pool::new();
    std::fs::create_dir(pool.path("out")).unwrap();
    let child = pool.spawn_slow_merge("compat.yaml", &pool.path("out/merged"), &[], 1500);
    // Where config.json is to go, a folder: its write fails.
    let start = Instant::now();
    loop {
        let partial = std::fs::read_dir(pool.path("out"))
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().contains(".partial-"));
        if let Some(p) = partial {
            std::fs::create_dir(p.path().join("config.json")).unwrap();
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no output folder appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_mentions(&err, &["out/merged/config.json"]);
    assert!(!err.contains(".partial-"), "{err}");
    assert_eq!(std::fs::read_dir(pool.path("out")).unwrap().count(), 0);
}

#[test]
fn doctor_bench_says_why_nothing_was_benchmarked() {
    let (_, json, _) = run(&["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let (_, out, err) = run(&["doctor", "--bench"]);
    if report["cuda_available"] == false {
        let reason = report["unavailable_reason"].as_str().unwrap();
        assert_mentions(&out, &["benchmark:", "not run:", reason]);
    } else {
        assert!(!out.contains("not run"), "{out}{err}");
    }
}

#[test]
fn forward_takes_the_max_length_its_hint_names() {
    let dir = fixtures().join("gpt2_forward");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("h.safetensors");
    // 40 tokens for a model of 32 positions: the hint names --max-length, which truncates.
    let long = tmp.path().join("long.jsonl");
    let ids: Vec<String> = (0..40).map(|i| (i % 90).to_string()).collect();
    std::fs::write(&long, format!("{{\"input_ids\": [{}]}}\n", ids.join(","))).unwrap();
    let forward = |max_length: &str| {
        run(&[
            "forward",
            dir.join("model").to_str().unwrap(),
            long.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--max-length",
            max_length,
        ])
    };
    let (code, _, err) = forward("100");
    assert_eq!(code, Some(1), "{err}");
    assert_mentions(
        &err,
        &[
            "40 tokens exceed the model's n_positions 32",
            "--max-length",
        ],
    );
    let (code, _, err) = forward("3");
    assert_eq!(code, Some(0), "{err}");
    let f = regmean_gpu::io::SafetensorsFile::open(&out).unwrap();
    let shape = &f.tensors()["last_hidden_state"].shape;
    assert_eq!(shape[1], 3, "{shape:?}");
}
