//! Gram statistics files: one model's Grams as safetensors (f32 `[d, d]` per site), with
//! the metadata needed to merge later without the data: rows per site, examples, the options
//! the Grams depend on, and a fingerprint of the model they were computed with.

use std::collections::BTreeMap;
use std::path::Path;

use super::gram::{compute_grams, ModelGrams, SiteGram};
use crate::backend::Backend;
use crate::config::{GramOptions, Parameters};
use crate::data::{select, Dataset};
use crate::error::{Error, Result};
use crate::io::safetensors::{write_file, OutTensor, TensorData};
use crate::io::{Arch, Checkpoint, Dtype, SafetensorsFile};
use crate::model::{ModelConfig, Site};
use crate::progress::{Event, Observer};

pub const FORMAT: &str = "regmean-gpu/grams-v1";

pub struct GramFileInfo<'a> {
    pub arch: Arch,
    pub fingerprint: &'a str,
    pub options: &'a GramOptions,
    pub sites: &'a [Site],
}

/// Writes the file at `path` (a staged output's path: see `io::output`).
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
    write_file(path, &tensors, &meta)
}

/// A Gram file whose metadata and tensor shapes were checked against a merge.
struct CheckedFile {
    file: SafetensorsFile,
    rows: BTreeMap<String, u64>,
    examples: usize,
}

/// Checks a Gram file against a merge's architecture, options and sites from its header
/// alone (the fingerprint needs the model's weights hashed, the values a full read): what a
/// merge checks of every file before its first forward pass.
pub fn check(path: &Path, arch: Arch, options: &GramOptions, sites: &[Site]) -> Result<()> {
    open_checked(path, arch, None, options, sites).map(|_| ())
}

/// The checks of [`check`], and the model's fingerprint when given (right after the
/// architecture: a file made for another model is named as such, whatever else differs).
fn open_checked(
    path: &Path,
    arch: Arch,
    fingerprint: Option<&str>,
    want: &GramOptions,
    sites: &[Site],
) -> Result<CheckedFile> {
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
    let stored_arch = get("arch")?;
    if stored_arch != arch.name() {
        return Err(Error::file(
            path,
            format!(
                "Grams of a {stored_arch} model, but the model is {}",
                arch.name()
            ),
        ));
    }
    if let Some(model) = fingerprint {
        let stored = get("fingerprint")?;
        if stored != model {
            return Err(Error::file(
                path,
                format!("computed with a different model (fingerprint {stored}, the model has {model}): recompute with `regmean-gpu grams`"),
            ));
        }
    }
    let options: GramOptions = serde_json::from_str(get("options")?)
        .map_err(|e| Error::file(path, format!("metadata `options` is malformed: {e}")))?;
    if &options != want {
        let differs = diff_options(&options, want);
        return Err(Error::file(path, format!("computed with different options ({differs}): recompute, or set the merge config's parameters to match")));
    }
    let rows: BTreeMap<String, u64> = serde_json::from_str(get("rows")?)
        .map_err(|e| Error::file(path, format!("metadata `rows` is malformed: {e}")))?;
    let examples: usize = get("examples")?
        .parse()
        .map_err(|_| Error::file(path, "metadata `examples` is not a number"))?;
    for site in sites {
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
        if !rows.contains_key(&site.name) {
            return Err(Error::file(
                path,
                format!("metadata `rows` lacks `{}`", site.name),
            ));
        }
    }
    Ok(CheckedFile {
        file,
        rows,
        examples,
    })
}

/// Reads a Gram file and checks it against the model and options of the merge.
pub fn read(path: &Path, info: &GramFileInfo<'_>) -> Result<ModelGrams> {
    let CheckedFile {
        file,
        rows,
        examples,
    } = open_checked(
        path,
        info.arch,
        Some(info.fingerprint),
        info.options,
        info.sites,
    )?;
    let mut sites = Vec::with_capacity(info.sites.len());
    for site in info.sites {
        let gram = file.to_f32(&site.name)?;
        if gram.iter().any(|v| !v.is_finite()) {
            return Err(Error::file(
                path,
                format!("`{}` holds non-finite values", site.name),
            ));
        }
        sites.push(SiteGram {
            name: site.name.clone(),
            dim: site.dim,
            rows: rows[&site.name],
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

/// Computes one model's Grams over its data and writes them as a statistics file
/// (`regmean-gpu grams`) into `out`, staged beforehand so that a bad output path fails
/// before the forward passes, not after.
pub fn grams_to_file<B: Backend>(
    backend: &B,
    model_dir: &Path,
    data_path: &Path,
    params: &Parameters,
    out: crate::io::StagedOutput,
    observer: &dyn Observer,
) -> Result<ModelGrams> {
    let ckpt = Checkpoint::open(model_dir)?;
    let config = ModelConfig::from_checkpoint(&ckpt)?;
    config.check_checkpoint(&ckpt)?;
    let data_stamp = data_path
        .is_file()
        .then(|| crate::io::mapped::FileStamp::of(data_path))
        .transpose()?;
    let data = Dataset::open_for_model(data_path, &[model_dir], params.max_length)?;
    let name = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let examples = select(data.len(), &params.sampling()).0.len();
    observer.event(Event::ModelStart {
        index: 0,
        total: 1,
        name: &name,
        examples,
    });
    let grams = compute_grams(backend, &ckpt, &config, &data, params, observer)?;
    // The fingerprint reads the whole model and checks it is unchanged; the data is checked
    // here: neither may have changed while the Grams were computed.
    let fingerprint = ckpt.fingerprint()?;
    data_stamp.as_ref().map_or(Ok(()), |s| s.check())?;
    let sites = config.sites();
    let info = GramFileInfo {
        arch: config.arch(),
        fingerprint: &fingerprint,
        options: &params.gram_options(),
        sites: &sites,
    };
    write(out.path(), &grams, &info)?;
    out.commit()?;
    observer.event(Event::ModelDone { index: 0 });
    Ok(grams)
}
