//! `eval` of decoder LLMs: the mean next-token loss against transformers' `labels` loss on
//! the forward fixtures (tests/fixtures/llm/forward, scripts/gen_llm_fixtures.py), whatever
//! the batching.

mod common;

use common::{bin, fixtures};
use regmean_gpu::io::SafetensorsFile;

fn eval_loss(arch: &str, batch_size: &str) -> (f64, f64) {
    let dir = fixtures().join("llm/forward").join(arch);
    let o = std::process::Command::new(bin())
        .args([
            "eval",
            "--device",
            "cpu",
            "--json",
            "--batch-size",
            batch_size,
        ])
        .arg(dir.join("model"))
        .arg("--data")
        .arg(dir.join("inputs.jsonl"))
        .args(["--task", "held_out"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = &v["tasks"]["held_out"];
    let want = SafetensorsFile::open(dir.join("expected.safetensors"))
        .unwrap()
        .to_f32("loss")
        .unwrap()[0] as f64;
    let (loss, ppl) = (
        t["loss"].as_f64().unwrap(),
        t["perplexity"].as_f64().unwrap(),
    );
    assert!((ppl - loss.exp()).abs() <= 1e-9 * ppl);
    (loss, want)
}

#[test]
fn next_token_loss_matches_transformers_in_one_batch_or_several() {
    for arch in ["llama", "qwen2", "qwen3", "mistral"] {
        for batch_size in ["3", "2", "1"] {
            let (got, want) = eval_loss(arch, batch_size);
            let rel = (got - want).abs() / want.abs();
            assert!(
                rel <= 1e-4,
                "{arch} batch {batch_size}: loss {got} vs transformers {want} ({rel:.2e})"
            );
        }
    }
}

/// `eval MODEL --config CONFIG --json`: each task's mean loss.
fn eval_config_losses(model: &std::path::Path, config: &std::path::Path) -> Vec<f64> {
    let o = std::process::Command::new(bin())
        .args(["eval", "--device", "cpu", "--json"])
        .arg(model)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    ["task_a", "task_b", "task_c"]
        .iter()
        .map(|t| v["tasks"][t]["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn merge_eval_on_a_decoder_reports_the_loss_of_the_merge_and_of_the_average() {
    let pool = common::Pool::of("llm/llama_pool");
    // The pool's RegMean config, with each task's data as its held-out set too.
    let config = std::fs::read_to_string(pool.path("default.yaml"))
        .unwrap()
        .lines()
        .flat_map(|l| {
            let eval = l
                .trim_start()
                .strip_prefix("data: ")
                .map(|d| format!("  eval_data: {d}"));
            std::iter::once(l.to_string()).chain(eval)
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(pool.path("eval.yaml"), &config).unwrap();
    std::fs::write(
        pool.path("average.yaml"),
        config.replace("merge_method: regmean", "merge_method: simple_average"),
    )
    .unwrap();
    let out = pool.path("merged");
    let o = pool.merge("eval.yaml", &out, &["--eval", "--compare-average"]);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Rows: task, tokens, then loss and perplexity per column (RegMean, simple average).
    let rows: Vec<Vec<f64>> = ["task_a", "task_b", "task_c"]
        .iter()
        .map(|t| {
            let line = stdout
                .lines()
                .find(|l| l.split_whitespace().next() == Some(t))
                .unwrap_or_else(|| panic!("no row {t} in {stdout}"));
            line.split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap())
                .collect()
        })
        .collect();
    let average_out = pool.path("average");
    let a = pool.merge("average.yaml", &average_out, &[]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let merged = eval_config_losses(&out, &pool.path("eval.yaml"));
    let average = eval_config_losses(&average_out, &pool.path("eval.yaml"));
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), 5, "{stdout}");
        // The table prints 4 decimals of the loss and 3 of the perplexity.
        assert!((row[1] - merged[i]).abs() <= 6e-5, "{stdout} vs {merged:?}");
        assert!(
            (row[3] - average[i]).abs() <= 6e-5,
            "{stdout} vs {average:?}"
        );
        assert!(
            (row[2] - merged[i].exp()).abs() <= 6e-4 * row[2],
            "{stdout}"
        );
        assert!(
            (row[4] - average[i].exp()).abs() <= 6e-4 * row[4],
            "{stdout}"
        );
        // Two different models were evaluated.
        assert!(
            (merged[i] - average[i]).abs() > 1e-4,
            "{merged:?} {average:?}"
        );
    }
    assert!(
        stdout.contains("RegMean") && stdout.contains("simple average"),
        "{stdout}"
    );
}
