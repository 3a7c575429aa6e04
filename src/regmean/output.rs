//! Writing the merged model: the output plan (every tensor in the base's names and layout),
//! the writer thread that writes each tensor as soon as it is ready while the solve goes on,
//! and the files beside the tensors.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::card::{output_config, ModelCard};
use crate::error::{Error, Result};
use crate::io::writer::{copy_sidecars, ModelWriter, PlannedTensor};
use crate::io::OutputDir;
use crate::io::{Checkpoint, Dtype};
use crate::model::{transpose, ModelConfig};

/// Where each output tensor's values come from.
pub(super) enum Source {
    /// Solved or averaged by the merge: sent to the writer when ready.
    Merged,
    /// An excluded parameter: the base model's values, in the output dtype.
    Base,
    /// A buffer (position ids, causal masks): the base model's bytes as they are.
    Raw,
}

/// The output tensors, in the base model's order: merged parameters and those that keep the
/// base value (`keeps_base`: excluded ones) in `out_dtype`, buffers as stored.
pub(super) fn output_plan(
    base: &Checkpoint,
    model_cfg: &ModelConfig,
    merged: &HashSet<String>,
    keeps_base: &dyn Fn(&str) -> bool,
    out_dtype: &Dtype,
) -> Result<Vec<(PlannedTensor, Source)>> {
    let params: HashSet<String> = model_cfg
        .expected_shapes()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut plan = Vec::new();
    for name in base.names() {
        let e = base.entry(name)?;
        let source = if merged.contains(name) {
            Source::Merged
        } else if params.contains(name) && keeps_base(name) {
            Source::Base
        } else {
            Source::Raw
        };
        let (dtype, byte_len) = match source {
            Source::Raw => (e.dtype.clone(), base.bytes(name)?.len()),
            Source::Merged | Source::Base => {
                let elements: usize = e.shape.iter().product();
                let size = out_dtype.float_size().ok_or_else(|| {
                    Error::invalid(format!(
                        "cannot write merged tensors as {}",
                        out_dtype.name()
                    ))
                })?;
                (out_dtype.clone(), elements * size)
            }
        };
        plan.push((
            PlannedTensor {
                name: name.to_string(),
                dtype,
                shape: e.shape.clone(),
                byte_len,
            },
            source,
        ));
    }
    Ok(plan)
}

/// A merged tensor ready to be written.
pub(super) struct Ready {
    pub(super) name: String,
    pub(super) values: Vec<f32>,
    /// `[rows, cols]` when the values are the transpose of what is stored.
    pub(super) transpose_from: Option<(usize, usize)>,
}

impl Ready {
    pub(super) fn new(name: String, values: Vec<f32>) -> Self {
        Ready {
            name,
            values,
            transpose_from: None,
        }
    }
}

/// What the writer thread shares with the solve: a stop flag (the solve failed) and the
/// bytes written so far (for progress).
#[derive(Clone, Copy)]
pub(super) struct WriteProgress<'a> {
    pub(super) stop: &'a AtomicBool,
    pub(super) written: &'a AtomicU64,
}

/// Writes every output tensor: each solved layer as it arrives, first (the solve never waits
/// for the rest), and between them what the base model gives and the averages (Σ / k), until
/// `stop` says the solve failed. Returns the time spent writing.
pub(super) fn write_merged(
    writer: &mut ModelWriter,
    base: &Checkpoint,
    plan: &[(PlannedTensor, Source)],
    means: BTreeMap<String, Vec<f32>>,
    k: f32,
    arrivals: std::sync::mpsc::Receiver<Ready>,
    progress: WriteProgress<'_>,
) -> Result<Duration> {
    let busy = std::cell::Cell::new(Duration::ZERO);
    let timed = |f: &mut dyn FnMut() -> Result<()>, bytes: usize| {
        let t = Instant::now();
        let r = f();
        busy.set(busy.get() + t.elapsed());
        progress.written.fetch_add(bytes as u64, Ordering::Relaxed);
        r
    };
    let write = |writer: &mut ModelWriter, name: &str, values: &[f32]| {
        let bytes = writer.planned_len(name);
        timed(&mut || write_finite(writer, name, values), bytes)
    };
    let write_arrival = |writer: &mut ModelWriter, r: Ready| {
        let values = match r.transpose_from {
            Some((rows, cols)) => transpose(&r.values, rows, cols),
            None => r.values,
        };
        write(writer, &r.name, &values)
    };
    // What the writer has in hand: the base model's tensors, then the averages.
    enum Own {
        Base,
        Raw,
        Mean(Vec<f32>),
    }
    let from_base = plan.iter().filter_map(|(t, source)| match source {
        Source::Merged => None,
        Source::Base => Some((t.name.clone(), Own::Base)),
        Source::Raw => Some((t.name.clone(), Own::Raw)),
    });
    let averages = means.into_iter().map(|(name, sum)| (name, Own::Mean(sum)));
    for (name, own) in from_base.chain(averages) {
        while let Ok(r) = arrivals.try_recv() {
            write_arrival(writer, r)?;
        }
        if progress.stop.load(Ordering::Relaxed) {
            return Ok(busy.get());
        }
        match own {
            Own::Base => write(writer, &name, &base.f32(&name)?)?,
            Own::Raw => {
                let bytes = base.bytes(&name)?;
                timed(&mut || writer.write_raw(&name, bytes), bytes.len())?
            }
            Own::Mean(sum) => {
                let mean: Vec<f32> = sum.into_iter().map(|v| v / k).collect();
                write(writer, &name, &mean)?
            }
        }
    }
    for r in arrivals {
        write_arrival(writer, r)?;
    }
    Ok(busy.get())
}

/// Writes a merged tensor, refusing non-finite values.
pub(super) fn write_finite(writer: &mut ModelWriter, name: &str, values: &[f32]) -> Result<()> {
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        return Err(Error::Numerical(format!(
            "merged `{name}` has a non-finite value at element {i}; nothing was written"
        )));
    }
    writer.write_f32(name, values)
}

/// The merged model's other files: config.json, the base model's tokenizer and
/// preprocessing files, and a model card.
pub(super) fn write_sidecars(
    out_dir: &OutputDir,
    base: &Checkpoint,
    out_dtype: Dtype,
    card: &ModelCard<'_>,
) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let config = output_config(base, out_dtype.torch_name());
    out_dir.write_text(
        "config.json",
        &serde_json::to_string_pretty(&config).expect("json"),
    )?;
    files.push("config.json".into());
    files.extend(copy_sidecars(base.dir(), out_dir.path())?);
    out_dir.write_text("README.md", &card.render())?;
    files.push("README.md".into());
    Ok(files)
}
