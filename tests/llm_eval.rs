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
