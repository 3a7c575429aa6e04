//! Chat `messages` rendered with the model's chat template (minijinja) and tokenised as
//! transformers' `apply_chat_template(..., tokenize=True)` does (tests/fixtures/llm/chat,
//! scripts/gen_llm_fixtures.py); a template that fails names its line.

mod common;

use common::{copy_dir, fixtures};
use regmean_gpu::data::Dataset;

fn chat_dir() -> std::path::PathBuf {
    fixtures().join("llm/chat")
}

fn open(data: &std::path::Path, model: &std::path::Path) -> regmean_gpu::Result<Dataset> {
    Dataset::open_for_model(data, &[model], 512)
}

#[test]
fn messages_tokenise_as_apply_chat_template() {
    let dir = chat_dir();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(expected["input_ids"].clone()).unwrap();
    let Dataset::Tokens { sequences, .. } = open(&dir.join("data.jsonl"), &dir).unwrap() else {
        panic!("chat data is token data")
    };
    assert_eq!(sequences, want);
    // The template writes the BOS token; the tokenizer's own is not added again.
    assert_eq!(
        sequences.iter().filter(|s| s[0] == 0 && s[1] == 0).count(),
        0
    );
}

#[test]
fn a_template_that_fails_names_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&chat_dir(), tmp.path());
    std::fs::write(
        tmp.path().join("chat_template.jinja"),
        "{{ bos_token }}\n{{ messages[0]['content'] | no_such_filter }}\n",
    )
    .unwrap();
    let e = open(&tmp.path().join("data.jsonl"), tmp.path())
        .err()
        .expect("a broken template fails")
        .to_string();
    for want in [
        "data.jsonl",
        "line 1",
        "chat_template.jinja",
        "failed to render at line 2",
    ] {
        assert!(e.contains(want), "`{want}` not in: {e}");
    }
}

#[test]
fn raise_exception_in_a_template_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&chat_dir(), tmp.path());
    let data = tmp.path().join("data.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"tool\", \"content\": \"yes\"}]}\n",
    )
    .unwrap();
    let e = open(&data, tmp.path()).err().expect("fails").to_string();
    assert!(e.contains("unknown role tool"), "{e}");
    assert!(e.contains("failed to render at line"), "{e}");
}

#[test]
fn text_lines_tokenise_as_the_tokenizer_with_its_special_tokens() {
    let dir = chat_dir();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let want: Vec<Vec<u32>> = serde_json::from_value(expected["text_input_ids"].clone()).unwrap();
    let Dataset::Tokens { sequences, .. } = open(&dir.join("text.jsonl"), &dir).unwrap() else {
        panic!("text data is token data")
    };
    assert_eq!(sequences, want);
}
