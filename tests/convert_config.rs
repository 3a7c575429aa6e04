//! `regmean-gpu convert-config` on copies of FusionBench 0.2.33's own configs
//! (tests/fixtures/fusionbench, each file says where it came from): the merge configs it
//! writes (the reviewed `*.expected.yaml`), that they load as merge configs, and that what
//! it cannot map is named on stderr, one line each.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_mentions, bin, fixtures};
use regmean_gpu::config::{MergeConfig, MergeMethod};
use regmean_gpu::convert::convert;

fn fb(name: &str) -> PathBuf {
    fixtures().join("fusionbench").join(name)
}

/// Loads a converted config from `dir`, where a local directory stands in for every model
/// it names (a local directory wins over a hub id, so the cache is never consulted).
fn load_beside_local_models(yaml: &str, dir: &Path) -> MergeConfig {
    let cfg: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let mut names = vec![cfg["base_model"].as_str().unwrap().to_string()];
    for m in cfg["models"].as_sequence().unwrap() {
        names.push(m["model"].as_str().unwrap().to_string());
    }
    for n in &names {
        std::fs::create_dir_all(dir.join(n)).unwrap();
    }
    let path = dir.join("merge.yaml");
    std::fs::write(&path, yaml).unwrap();
    MergeConfig::load(&path).unwrap()
}

#[test]
fn fusionbench_configs_convert_to_the_reviewed_merge_configs() {
    for (method, pool, expected, how, ratio, tasks) in [
        (
            "clip_regmean.yaml",
            "clip-vit-base-patch32_TA8.yaml",
            "clip_ta8.expected.yaml",
            MergeMethod::Regmean,
            0.95,
            8,
        ),
        (
            "clip_regmean_plusplus.yaml",
            "clip-vit-base-patch32_TA8.yaml",
            "clip_ta8_plusplus.expected.yaml",
            MergeMethod::RegmeanPlusplus,
            0.95,
            8,
        ),
        (
            "gpt2_regmean.yaml",
            "gpt-2_glue.yaml",
            "gpt2_glue.expected.yaml",
            MergeMethod::Regmean,
            0.6,
            7,
        ),
    ] {
        let got = convert(&fb(method), &fb(pool), "./data").unwrap();
        let want = std::fs::read_to_string(fb(expected)).unwrap();
        assert_eq!(got.yaml, want, "{method} + {pool}");
        let tmp = tempfile::tempdir().unwrap();
        let cfg = load_beside_local_models(&got.yaml, tmp.path());
        assert_eq!(cfg.merge_method, how);
        assert_eq!(cfg.models.len(), tasks);
        assert_eq!(cfg.parameters.reduce_non_diagonal_ratio, Some(ratio));
        assert_eq!(cfg.parameters.num_regmean_examples, 256);
        assert_eq!(cfg.parameters.batch_size, 32);
        assert!(cfg.parameters.fusionbench_compat);
    }
    let clip = std::fs::read_to_string(fb("clip_ta8.expected.yaml")).unwrap();
    assert_mentions(
        &clip,
        &[
            "base_model: openai/clip-vit-base-patch32",
            "model: tanganke/clip-vit-base-patch32_stanford-cars",
            "data: ./data/stanford_cars/train",
            "eval_data: ./data/dtd/test",
        ],
    );
    let gpt2 = std::fs::read_to_string(fb("gpt2_glue.expected.yaml")).unwrap();
    assert_mentions(
        &gpt2,
        &[
            "base_model: openai-community/gpt2",
            "model: tanganke/gpt2_rte",
            "data: ./data/rte.train.jsonl",
        ],
    );
}

#[test]
fn what_cannot_be_mapped_is_named_one_line_each_and_the_file_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gpt2.yaml");
    let o = Command::new(bin())
        .arg("convert-config")
        .arg(fb("gpt2_regmean.yaml"))
        .arg(fb("gpt-2_glue.yaml"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let notes: Vec<&str> = err.lines().collect();
    for item in [
        "`cache_dir`",
        "`num_workers`",
        "weight_transpose",
        "`gpt2`",
        "datasets",
    ] {
        assert_eq!(
            notes.iter().filter(|l| l.contains(item)).count(),
            1,
            "{item}: {err}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(fb("gpt2_glue.expected.yaml")).unwrap()
    );
    // The output is never an input, and an existing one needs --force.
    let again = |target: &Path| {
        Command::new(bin())
            .arg("convert-config")
            .arg(fb("gpt2_regmean.yaml"))
            .arg(fb("gpt-2_glue.yaml"))
            .arg("-o")
            .arg(target)
            .output()
            .unwrap()
    };
    assert!(!again(&out).status.success());
    let o = again(&fb("gpt-2_glue.yaml"));
    assert!(!o.status.success());
    assert_mentions(
        &String::from_utf8_lossy(&o.stderr),
        &["refusing to write here"],
    );
}

#[test]
fn a_method_that_is_not_regmean_is_refused_in_one_line() {
    // FusionBench's base regmean.yaml leaves `_target_: ???` for a concrete class to fill.
    let o = Command::new(bin())
        .arg("convert-config")
        .arg(fb("regmean.yaml"))
        .arg(fb("gpt-2_glue.yaml"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_mentions(&err, &["regmean.yaml", "`_target_: ???`"]);
    assert!(o.stdout.is_empty());
}
