//! Text data: JSON Lines with raw text (or a sentence pair) tokenised with a model
//! directory's own `tokenizer.json`, as transformers' tokenizer does it (special tokens added,
//! `longest_first` truncation to `max_length`); pre-tokenised `input_ids` lines pass through.

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{Error, Result};

/// Field names of a sentence pair, in the order they are looked for: our own, then GLUE's.
pub const PAIR_FIELDS: [(&str, &str); 5] = [
    ("text_a", "text_b"),
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question1", "question2"),
];

/// A model's tokenizer (its `tokenizer.json`).
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
}

impl TextTokenizer {
    /// Reads `tokenizer.json`; `max_length` truncates every encoding (pairs `longest_first`).
    pub fn from_file(path: &Path, max_length: Option<usize>) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::file(
                path,
                "no tokenizer.json: text needs the model's tokenizer (or give pre-tokenised `input_ids`)",
            ));
        }
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| Error::file(path, format!("cannot read the tokenizer: {e}")))?;
        // Padding is ours to do (per batch); a padding rule saved in the file must not apply.
        tokenizer.with_padding(None);
        let truncation = max_length.map(|max_length| TruncationParams {
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        });
        tokenizer
            .with_truncation(truncation)
            .map_err(|e| Error::file(path, format!("cannot set truncation: {e}")))?;
        Ok(TextTokenizer {
            tokenizer,
            path: path.to_path_buf(),
        })
    }

    /// The tokenizer of a model directory.
    pub fn from_model_dir(dir: &Path, max_length: Option<usize>) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"), max_length)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of a text or a pair, with the tokenizer's special tokens.
    pub fn encode(&self, a: &str, b: Option<&str>) -> Result<Vec<u32>> {
        let encoding = match b {
            None => self.tokenizer.encode(a, true),
            Some(b) => self.tokenizer.encode((a, b), true),
        }
        .map_err(|e| Error::file(&self.path, format!("tokenisation failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of a text that already holds its special tokens (a rendered chat
    /// template): none are added.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::file(&self.path, format!("tokenisation failed: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

/// The text of one JSON line: `text`, the first sentence pair found, or a lone `sentence`
/// (GLUE's CoLA and SST-2).
pub fn text_fields(
    v: &serde_json::Value,
) -> Option<std::result::Result<(&str, Option<&str>), String>> {
    let field = |k: &str| -> std::result::Result<&str, String> {
        v[k].as_str()
            .ok_or_else(|| format!("`{k}` is not a string"))
    };
    if v.get("text").is_some() {
        return Some(field("text").map(|t| (t, None)));
    }
    for (fa, fb) in PAIR_FIELDS {
        if v.get(fa).is_some() {
            if v.get(fb).is_none() {
                return Some(Err(format!("`{fa}` without its pair field `{fb}`")));
            }
            return Some(field(fa).and_then(|a| Ok((a, Some(field(fb)?)))));
        }
    }
    if v.get("sentence").is_some() {
        return Some(field("sentence").map(|t| (t, None)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_fields_follow_glue_names() {
        let f = |s: &str| {
            let v: serde_json::Value = serde_json::from_str(s).unwrap();
            text_fields(&v).map(|r| r.map(|(a, b)| (a.to_string(), b.map(str::to_string))))
        };
        assert_eq!(
            f(r#"{"text": "a", "label": 1}"#),
            Some(Ok(("a".into(), None)))
        );
        assert_eq!(
            f(r#"{"question": "q", "sentence": "s"}"#),
            Some(Ok(("q".into(), Some("s".into()))))
        );
        // CoLA / SST-2: a lone `sentence`.
        assert_eq!(f(r#"{"sentence": "s"}"#), Some(Ok(("s".into(), None))));
        assert_eq!(
            f(r#"{"premise": "p"}"#),
            Some(Err("`premise` without its pair field `hypothesis`".into()))
        );
        assert_eq!(
            f(r#"{"text": 3}"#),
            Some(Err("`text` is not a string".into()))
        );
        assert_eq!(f(r#"{"input": "x"}"#), None);
    }
}
