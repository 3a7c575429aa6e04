//! Chat data: `messages` (a list of `{role, content}` turns) rendered with the model's own
//! chat template (`chat_template.jinja`, else `chat_template` in `tokenizer_config.json`)
//! through minijinja, set up as transformers sets up Jinja (`trim_blocks`, `lstrip_blocks`,
//! `raise_exception`, Python string methods), then tokenised without adding special tokens
//! (the template writes them), as `apply_chat_template(..., tokenize=True)` does.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct ChatTemplate {
    source: String,
    /// Where the template was read from, for error messages.
    path: PathBuf,
    bos_token: String,
    eos_token: String,
}

/// A special token as tokenizer_config.json writes it: a string or `{"content": ...}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

impl ChatTemplate {
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::file(&config_path, format!("invalid JSON: {e}")))?,
            Err(_) => serde_json::Value::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        let (source, path) = if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            (text, jinja)
        } else {
            let source = match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // Named templates: the one called "default".
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
            let source = source.ok_or_else(|| {
                Error::file(
                    dir,
                    "`messages` need the model's chat template: no chat_template.jinja, and no `chat_template` in tokenizer_config.json",
                )
            })?;
            (source, config_path)
        };
        Ok(ChatTemplate {
            source,
            path,
            bos_token: token_text(config.get("bos_token")),
            eos_token: token_text(config.get("eos_token")),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The text of one conversation (no generation prompt).
    pub fn render(&self, messages: &serde_json::Value) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let fail = |e: minijinja::Error| {
            let line = e
                .line()
                .map(|l| format!(" at line {l}"))
                .unwrap_or_default();
            let what = e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            Error::file(
                &self.path,
                format!("the chat template failed to render{line}: {what}"),
            )
        };
        let template = env.template_from_str(&self.source).map_err(fail)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => false,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(fail)
    }
}
