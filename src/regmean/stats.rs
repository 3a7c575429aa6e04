//! Gram statistics files: one model's Grams as safetensors (f32 `[d, d]` per site), with
//! the metadata needed to merge later without the data: rows per site, examples, the options
//! the Grams depend on, and a fingerprint of the model they were computed with.

use std::collections::BTreeMap;
use std::path::Path;

use super::gram::{ModelGrams, SiteGram};
use crate::config::GramOptions;
use crate::error::{Error, Result};
use crate::io::safetensors::{write_file, OutTensor, TensorData};
use crate::io::{Arch, Dtype, SafetensorsFile};
use crate::model::Site;

pub const FORMAT: &str = "regmean-gpu/grams-v1";

pub struct GramFileInfo<'a> {
    pub arch: Arch,
    pub fingerprint: &'a str,
    pub options: &'a GramOptions,
    pub sites: &'a [Site],
}

/// Writes the file atomically (a temporary sibling renamed into place).
pub fn write(path: &Path, grams: &ModelGrams, info: &GramFileInfo<'_>) -> Result<()> {
    let rows: BTreeMap<&str, u64> = grams
        .sites
        .iter()
        .map(|s| (s.name.as_str(), s.rows))
        .collect();
    let modules: BTreeMap<&str, Vec<&str>> = info
        .sites
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.modules.iter().map(|m| m.weight.as_str()).collect(),
            )
        })
        .collect();
    let meta = BTreeMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("arch".to_string(), info.arch.name().to_string()),
        ("fingerprint".to_string(), info.fingerprint.to_string()),
        ("examples".to_string(), grams.examples.to_string()),
        (
            "rows".to_string(),
            serde_json::to_string(&rows).expect("json"),
        ),
        (
            "modules".to_string(),
            serde_json::to_string(&modules).expect("json"),
        ),
        (
            "options".to_string(),
            serde_json::to_string(info.options).expect("json"),
        ),
    ]);
    let tensors: Vec<OutTensor<'_>> = grams
        .sites
        .iter()
        .map(|s| OutTensor {
            name: s.name.clone(),
            dtype: Dtype::F32,
            shape: vec![s.dim, s.dim],
            data: TensorData::F32(&s.gram),
        })
        .collect();
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file path"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    crate::io::writer::register_pending(&tmp);
    let written = write_file(&tmp, &tensors, &meta)
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    crate::io::writer::unregister_pending(&tmp);
    written
}

/// Reads a Gram file and checks it against the model and options of the merge.
pub fn read(path: &Path, info: &GramFileInfo<'_>) -> Result<ModelGrams> {
    let file = SafetensorsFile::open(path)?;
    let meta = file.metadata();
    let get = |k: &str| {
        meta.get(k).ok_or_else(|| {
            Error::file(
                path,
                format!("not a Gram statistics file: metadata has no `{k}`"),
            )
        })
    };
    let format = get("format")?;
    if format != FORMAT {
        return Err(Error::file(
            path,
            format!("unsupported Gram file format `{format}` (this build reads {FORMAT})"),
        ));
    }
    let arch = get("arch")?;
    if arch != info.arch.name() {
        return Err(Error::file(
            path,
            format!(
                "Grams of a {arch} model, but the model is {}",
                info.arch.name()
            ),
        ));
    }
    let fingerprint = get("fingerprint")?;
    if fingerprint != info.fingerprint {
        return Err(Error::file(
            path,
            format!("computed with a different model (fingerprint {fingerprint}, the model has {}): recompute with `regmean-gpu grams`", info.fingerprint),
        ));
    }
    let options: GramOptions = serde_json::from_str(get("options")?)
        .map_err(|e| Error::file(path, format!("metadata `options` is malformed: {e}")))?;
    if &options != info.options {
        let differs = diff_options(&options, info.options);
        return Err(Error::file(path, format!("computed with different options ({differs}): recompute, or set the merge config's parameters to match")));
    }
    let rows: BTreeMap<String, u64> = serde_json::from_str(get("rows")?)
        .map_err(|e| Error::file(path, format!("metadata `rows` is malformed: {e}")))?;
    let examples: usize = get("examples")?
        .parse()
        .map_err(|_| Error::file(path, "metadata `examples` is not a number"))?;
    let mut sites = Vec::with_capacity(info.sites.len());
    for site in info.sites {
        let e = file.entry(&site.name)?;
        if e.shape != [site.dim, site.dim] || e.dtype != Dtype::F32 {
            return Err(Error::file(
                path,
                format!(
                    "`{}` is {} {:?}, expected F32 [{}, {}]",
                    site.name,
                    e.dtype.name(),
                    e.shape,
                    site.dim,
                    site.dim
                ),
            ));
        }
        let gram = file.to_f32(&site.name)?;
        if gram.iter().any(|v| !v.is_finite()) {
            return Err(Error::file(
                path,
                format!("`{}` holds non-finite values", site.name),
            ));
        }
        let rows = *rows
            .get(&site.name)
            .ok_or_else(|| Error::file(path, format!("metadata `rows` lacks `{}`", site.name)))?;
        sites.push(SiteGram {
            name: site.name.clone(),
            dim: site.dim,
            rows,
            gram,
        });
    }
    Ok(ModelGrams {
        sites,
        examples,
        peak_device_bytes: None,
    })
}

fn diff_options(file: &GramOptions, want: &GramOptions) -> String {
    let a = serde_json::to_value(file).expect("json");
    let b = serde_json::to_value(want).expect("json");
    let (a, b) = (
        a.as_object().expect("object"),
        b.as_object().expect("object"),
    );
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: file {v}, merge {}", b[k]))
        .collect::<Vec<_>>()
        .join("; ")
}
