//! Reading config.json fields: sizes bounded, types checked, activations refused by name.

use crate::error::{Error, Result};

/// The largest size a config.json field may hold (2²⁰: vocabularies, widths, lengths).
pub const MAX_CONFIG_SIZE: u64 = 1 << 20;

/// Refuses a config whose activation field `key` (absent: transformers' default, `expected`)
/// names another function than `expected`, the one `model` is built with; `label` names the
/// field in the message.
pub(crate) fn require_activation(
    v: &serde_json::Value,
    key: &str,
    label: &str,
    expected: &str,
    model: &str,
    path: &std::path::Path,
) -> Result<()> {
    let act = v.get(key).and_then(|a| a.as_str()).unwrap_or(expected);
    if act != expected {
        return Err(Error::file(
            path,
            format!("{label} `{act}` is not supported ({model} uses {expected})"),
        ));
    }
    Ok(())
}

/// Reads an optional field with a default, checking its type.
pub(crate) fn field_usize(
    v: &serde_json::Value,
    key: &str,
    default: usize,
    path: &std::path::Path,
) -> Result<usize> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        // Sizes are bounded so that no product of them can overflow, whatever the file says;
        // real tensors are then checked against the checkpoint's bytes.
        Some(x) => x
            .as_u64()
            .filter(|&x| x <= MAX_CONFIG_SIZE)
            .map(|x| x as usize)
            .ok_or_else(|| {
                Error::file(
                    path,
                    format!("`{key}` must be an integer from 0 to {MAX_CONFIG_SIZE}, found {x}"),
                )
            }),
    }
}

pub(crate) fn field_f32(
    v: &serde_json::Value,
    key: &str,
    default: f32,
    path: &std::path::Path,
) -> Result<f32> {
    match v.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| Error::file(path, format!("`{key}` must be a number, found {x}"))),
    }
}
