//! `merge --plan` for decoder LLMs: a config.json alone (Llama-3.1-8B's shapes) gives the
//! plan without any weights; the published parameter count checks the shape arithmetic.

mod common;

use common::{bin, fixtures};

fn plan(path: &std::path::Path) -> std::process::Output {
    std::process::Command::new(bin())
        .args(["merge", "--plan"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn llama31_8b_config_alone_plans_a_merge_that_fits_one_80_gb_gpu() {
    let o = plan(&fixtures().join("llm/llama31_8b_config.json"));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for want in [
        "32 layers, d 4096, ffn 14336, 32 heads / 8 kv heads of 128, vocab 128256, untied head",
        "8,030,261,248 parameters",
        "weights stored in 2 bytes",
        // 2 models × 8.03e9 parameters × 2 bytes.
        "bytes read: 32.1 GB",
        "fits one 80 GB GPU: yes",
    ] {
        assert!(out.contains(want), "`{want}` not in:\n{out}");
    }
}

#[test]
fn a_merge_config_plans_its_own_workload() {
    let o = plan(&fixtures().join("llm/llama_pool/default.yaml"));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("3 models × 10 examples × ≤ 64 tokens, batch 4"),
        "{out}"
    );
    assert!(out.contains("21,664 parameters"), "{out}");
}

#[test]
fn other_architectures_are_refused_for_now() {
    let o = plan(&fixtures().join("gpt2_pool/base/config.json"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("merge --plan is for decoder LLMs (llama, mistral, qwen2, qwen3) for now"),
        "{err}"
    );
}
