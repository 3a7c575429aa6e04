//! The whole merge, streaming over task models: each model is opened, its Grams computed
//! (or read), folded into running sums, and dropped before the next, so memory does not
//! grow with the number of models. Then every linear layer is solved, every other float
//! parameter averaged, and the result written as a transformers model directory: a second
//! thread writes each tensor into its planned place as soon as it is ready, while the
//! solve goes on.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::gram::{accumulate_grams, DeviceGrams, ModelGrams};
use super::solve::{solve_layer, SolveOutcome};
use super::stats::{self, GramFileInfo};
use super::sums::{add_weighted, reduce_into};
use crate::backend::cuda::fault::{LOWER_FORWARD, LOWER_SUMS};
use crate::backend::cuda::gram::{DeviceModuleSums, DeviceSiteSums};
use crate::backend::cuda::CudaDevice;
use crate::backend::Backend;
use crate::config::{ExcludeSet, MergeConfig, MergeMethod, ModelEntry, Schedule};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::io::mapped::FileStamp;
use crate::io::writer::{copy_sidecars, ModelWriter, PlannedTensor};
use crate::io::OutputDir;
use crate::io::{Arch, Checkpoint, Dtype};
use crate::model::{take_linear_in_out, transpose, LinearModule, ModelConfig, Site};
use crate::progress::{Event, Observer};

pub struct MergeOptions {
    /// Solve on this GPU (Gram sums, G'W products and the Cholesky solve on the device).
    pub device: Option<Arc<CudaDevice>>,
    /// Largest shard written, in bytes.
    pub out_shard_bytes: u64,
    /// Replace an existing output directory.
    pub force: bool,
    /// Host memory the activation caches of a layer-wise merge may hold before they spill to
    /// a file, and the cap `schedule: auto` chooses by; None: half of what is available.
    pub max_memory: Option<u64>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            device: None,
            out_shard_bytes: 5_000_000_000,
            force: false,
            max_memory: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ModelReport {
    pub name: String,
    /// Examples run (0 when Grams came from a file).
    pub examples: usize,
    /// Rows of the first site's Gram (tokens or image tokens counted).
    pub rows: u64,
    pub from_grams_file: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Forward passes and Grams, model loading included.
    pub grams: Duration,
    /// Of which: reading task models' weights onto the backend.
    pub model_load: Duration,
    /// Of which: folding each model into the running sums (G', G'W, Σ W, means).
    pub sums: Duration,
    /// Until the last layer is solved. The output is written alongside, on another thread:
    /// this includes any wait for the writer (it takes at most a few solved layers ahead).
    pub solve: Duration,
    /// What the user waits for after the last layer is solved: the tensors the writer still
    /// has to write, the flush to disk, config.json and the other files, the rename.
    pub write: Duration,
    /// How long the writer spent writing tensors in all, alongside the solve and after it.
    pub writer_busy: Duration,
}

#[derive(Clone, Debug)]
pub struct MergeReport {
    pub arch: Arch,
    pub method: MergeMethod,
    pub models: Vec<ModelReport>,
    pub layers_solved: usize,
    /// Layers that needed the documented fallback, and how they were solved.
    pub fallbacks: Vec<(String, SolveOutcome)>,
    pub timings: Timings,
    pub files: Vec<String>,
    /// Bytes of tensors written.
    pub tensor_bytes: u64,
    /// The most device memory in use during the merge (GPU backends only).
    pub peak_device_bytes: Option<u64>,
    /// `model` or `layer`: the schedule the merge ran.
    pub schedule: Schedule,
    /// A layer-wise merge's activation caches: held in memory, and spilled to a file.
    pub activation_cache: Option<super::activations::CacheStats>,
}

/// A linear weight merged by RegMean.
struct SolvedModule {
    module: LinearModule,
    site: usize,
}

/// Σ G'ᵢ per site, and Σ G'ᵢWᵢ and Σ Wᵢ (for the fallback) per solved module, all
/// `[in, ·]` row-major f32: in host memory, or on the GPU that will solve them.
enum LinearSums {
    Host {
        gram: Vec<Vec<f32>>,
        gw: Vec<Vec<f32>>,
        w: Vec<Vec<f32>>,
    },
    Device {
        dev: Arc<CudaDevice>,
        sites: Vec<DeviceSiteSums>,
        modules: Vec<DeviceModuleSums>,
    },
}

/// The running state of a merge: everything a model contributes, summed.
struct RunningSums {
    modules: Vec<SolvedModule>,
    linear: LinearSums,
    mean_sum: BTreeMap<String, Vec<f32>>,
    count: usize,
}

/// What every schedule starts from: the base model and its architecture, the solve's
/// options, and the output location, all checked (with every input) before any work.
pub(super) struct Prepared {
    pub base: Checkpoint,
    pub model_cfg: ModelConfig,
    pub sites: Vec<Site>,
    pub out_dtype: Dtype,
    pub exclude: ExcludeSet,
    pub ratio: f32,
    /// The multiplier of the Grams' diagonals, FusionBench's `(1 − r) + r` in f32.
    pub diag_mult: f32,
    pub out_dir: OutputDir,
}

pub(super) fn prepare(
    cfg: &MergeConfig,
    out: &Path,
    opts: &MergeOptions,
    observer: &dyn Observer,
    watched: &mut Vec<FileStamp>,
) -> Result<Prepared> {
    let params = &cfg.parameters;
    let base = Checkpoint::open(&cfg.base_model)?;
    watched.extend(base.stamps().cloned());
    let model_cfg = ModelConfig::from_checkpoint(&base)?;
    model_cfg.check_checkpoint(&base)?;
    let out_dtype = cfg
        .out_dtype()?
        .unwrap_or_else(|| base.dominant_float_dtype());
    let exclude = ExcludeSet::new(&params.exclude_param_names_regex).map_err(Error::invalid)?;
    let ratio = params.ratio_for(model_cfg.arch()) as f32;
    // FusionBench builds the multiplier as diag(1 − r) + r in f32; keep its rounding.
    let diag_mult = (1.0f32 - ratio) + ratio;
    let sites = model_cfg.sites();
    warn_unmatched_excludes(&exclude, params, &model_cfg, observer);
    // Fail before hours of work, not after: the output location must be usable, and every
    // input must open and fit.
    let out_dir = OutputDir::create(out, opts.force, &cfg.inputs())?;
    crate::profile::span("inputs: open and check all", || {
        check_inputs(
            cfg,
            &base,
            &model_cfg,
            &sites,
            cfg.merge_method.uses_grams(),
            watched,
        )
    })?;
    Ok(Prepared {
        base,
        model_cfg,
        sites,
        out_dtype,
        exclude,
        ratio,
        diag_mult,
        out_dir,
    })
}

/// The merge one model at a time (`schedule: model`).
pub(super) fn merge_by_model<B: Backend>(
    backend: &B,
    cfg: &MergeConfig,
    prepared: Prepared,
    opts: &MergeOptions,
    observer: &dyn Observer,
    watched: &[FileStamp],
) -> Result<MergeReport> {
    let (base, model_cfg, sites) = (prepared.base, prepared.model_cfg, prepared.sites);
    let (exclude, out_dtype, out_dir) = (prepared.exclude, prepared.out_dtype, prepared.out_dir);
    let (ratio, diag_mult) = (prepared.ratio, prepared.diag_mult);
    let arch = model_cfg.arch();
    let regmean = cfg.merge_method.uses_grams();
    let out = out_dir.final_path().to_path_buf();
    let out = out.as_path();

    let mut sums = RunningSums::new(&model_cfg, &sites, &exclude, regmean, opts.device.as_ref())
        .map_err(|e| e.during("allocating the running sums on the GPU", LOWER_SUMS))?;
    let mut reports = Vec::with_capacity(cfg.models.len());
    let mut peak_device = backend.memory_in_use();
    let mut model_load = Duration::ZERO;
    let mut sums_time = Duration::ZERO;
    let t0 = Instant::now();
    // Linear weights are read for the forward pass and again for G'W: made once (decoded on
    // the host, or on a GPU from the stored bytes). On a GPU, the next model's pages are
    // read in on another thread while this one computes.
    let forward_runs = |entry: &ModelEntry| regmean && entry.grams.is_none();
    let ahead = opts.device.is_some();
    std::thread::scope(|scope| -> Result<()> {
        let mut next = None;
        let mut run = || -> Result<()> {
            for (index, entry) in cfg.models.iter().enumerate() {
                let name = entry.display_name();
                let ckpt = match next.take() {
                    Some(handle) => join_prepared(handle)?,
                    None => open_prepared(entry, &sites, forward_runs(entry), false)?,
                };
                hold_for_tests();
                if let Some(following) = cfg.models.get(index + 1).filter(|_| ahead) {
                    let sites = &sites;
                    let keep = forward_runs(following);
                    next = Some(scope.spawn(move || open_prepared(following, sites, keep, true)));
                }
                let mut report = ModelReport {
                    name: name.clone(),
                    examples: 0,
                    rows: 0,
                    from_grams_file: entry.grams.is_some(),
                };
                if regmean {
                    let grams = model_grams(
                        backend,
                        cfg,
                        &ckpt,
                        &model_cfg,
                        &sites,
                        entry,
                        index,
                        sums.device(),
                        &mut model_load,
                        observer,
                    )
                    .map_err(|e| e.during(format!("the forward pass of {name}"), LOWER_FORWARD))?;
                    let (examples, rows, peak) = match &grams {
                        Grams::Host(g) => (
                            g.examples,
                            g.sites.first().map(|s| s.rows),
                            g.peak_device_bytes,
                        ),
                        Grams::Device(g) => (
                            g.examples,
                            g.sites.first().map(|s| s.1),
                            g.peak_device_bytes,
                        ),
                    };
                    report.examples = examples;
                    report.rows = rows.unwrap_or(0);
                    peak_device = peak_device.max(peak);
                    let t = Instant::now();
                    sums.add_regmean(&ckpt, grams, ratio, diag_mult)
                        .map_err(|e| e.during(format!("adding {name} to the sums"), LOWER_SUMS))?;
                    sums_time += t.elapsed();
                }
                let t = Instant::now();
                crate::profile::span("sums: means", || sums.add_means(&ckpt))?;
                sums_time += t.elapsed();
                // Everything of this model was read: had another program truncated or
                // rewritten it meanwhile, the sums hold zeros or a mix, and the run ends here.
                ckpt.check_unchanged()?;
                sums.count += 1;
                observer.event(Event::ModelDone { index });
                reports.push(report);
            }
            Ok(())
        };
        let result = run();
        // After an error the next model may still be opening: wait for it here, so that
        // a panic there cannot replace the error (the scope would re-raise it).
        if let Some(handle) = next.take() {
            let _ = handle.join();
        }
        result
    })?;
    let grams_time = t0.elapsed();

    // The output's layout is fixed before the first layer is solved, and a second thread
    // writes every tensor as soon as it is ready: the write runs alongside the solve.
    let t1 = Instant::now();
    let merged_names: HashSet<String> = sums
        .modules
        .iter()
        .map(|m| m.module.weight.clone())
        .chain(sums.mean_sum.keys().cloned())
        .collect();
    let plan = output_plan(
        &base,
        &model_cfg,
        &merged_names,
        &|n| exclude.excludes(n),
        &out_dtype,
    )?;
    let planned: Vec<PlannedTensor> = plan.iter().map(|(t, _)| t.clone()).collect();
    // Paths in errors name the output the user gave, not its hidden temporary sibling.
    let mut writer = ModelWriter::create(out_dir.path(), &planned, opts.out_shard_bytes)?;
    let tensor_bytes: u64 = planned.iter().map(|t| t.byte_len as u64).sum();
    observer.event(Event::SolveStart {
        layers: sums.modules.len(),
    });
    let k = sums.count as f32;
    let mut fallbacks = Vec::new();
    let mut solve_time = Duration::ZERO;
    let mut writer_busy = Duration::ZERO;
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    std::thread::scope(|scope| -> Result<()> {
        // Bounded: solved layers wait here, not in memory, when the disk is the slower.
        let (ready, arrivals) = std::sync::mpsc::sync_channel::<Ready>(4);
        let means = std::mem::take(&mut sums.mean_sum);
        let (writer, base, plan) = (&mut writer, &base, &plan);
        let progress = WriteProgress {
            stop: &stop,
            written: &written,
        };
        let writing =
            scope.spawn(move || write_merged(writer, base, plan, means, k, arrivals, progress));
        let mut solving = || -> Result<()> {
            for (done, m) in sums.modules.iter().enumerate() {
                let (d_in, d_out) = (m.module.in_dim, m.module.out_dim);
                let started = Instant::now();
                let (w, outcome) = sums.solve(done, m.site, d_in, d_out).map_err(|e| {
                    e.during(format!("the solve of {}", m.module.weight), LOWER_SUMS)
                })?;
                let seconds = started.elapsed().as_secs_f64();
                observer.event(Event::Solved {
                    done: done + 1,
                    layer: &m.module.weight,
                    how: &describe(&outcome),
                    seconds,
                });
                if outcome.is_fallback() {
                    observer.event(Event::Warning(format!(
                        "{}: {}",
                        m.module.weight,
                        describe(&outcome)
                    )));
                    fallbacks.push((m.module.weight.clone(), outcome));
                }
                let mut r = Ready::new(m.module.weight.clone(), w);
                // The solve gives [in, out]; nn.Linear stores [out, in].
                r.transpose_from = m.module.transposed.then_some((d_in, d_out));
                if ready.send(r).is_err() {
                    // The writer stopped on an error, which join reports.
                    return Ok(());
                }
            }
            Ok(())
        };
        let solved = solving();
        solve_time = t1.elapsed();
        if solved.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        drop(ready);
        if solved.is_ok() {
            // What is left for the writer is the user's wait now: show it.
            observer.event(Event::WriteStart {
                written: written.load(Ordering::Relaxed),
                total: tensor_bytes,
            });
            while !writing.is_finished() {
                std::thread::sleep(Duration::from_millis(50));
                observer.event(Event::Written {
                    written: written.load(Ordering::Relaxed),
                });
            }
        }
        let wrote = writing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // A solve error comes first: the writer only stopped because of it.
        writer_busy = solved.and(wrote)?;
        Ok(())
    })?;
    let layers_solved = sums.modules.len();
    peak_device = peak_device.max(backend.memory_in_use());
    drop(sums);

    observer.event(Event::Writing { path: out });
    let mut files = writer.finish()?;
    let forward_ran = regmean && cfg.models.iter().any(|m| m.grams.is_none());
    let card = ModelCard {
        cfg,
        arch,
        precision: forward_ran.then(|| backend.precision()),
        out_dtype: &out_dtype,
    };
    files.extend(write_sidecars(&out_dir, &base, out_dtype.clone(), &card)?);
    // The base model was read until its last tensor was written; every other input was
    // read earlier, and must still be as it was when first checked.
    base.check_unchanged()?;
    watched.iter().try_for_each(FileStamp::check)?;
    out_dir.commit()?;
    Ok(MergeReport {
        arch,
        method: cfg.merge_method,
        models: reports,
        layers_solved,
        fallbacks,
        timings: Timings {
            grams: grams_time,
            model_load,
            sums: sums_time,
            solve: solve_time,
            write: t1.elapsed().saturating_sub(solve_time),
            writer_busy,
        },
        files,
        tensor_bytes,
        peak_device_bytes: peak_device,
        schedule: Schedule::Model,
        activation_cache: None,
    })
}

/// Warns of every `exclude_param_names_regex` pattern that matches no parameter, naming a few
/// names the model has: a pattern written for other names (FusionBench users write the
/// `transformer.`-prefixed names of a classifier checkpoint) would otherwise exclude nothing,
/// silently.
fn warn_unmatched_excludes(
    exclude: &ExcludeSet,
    params: &crate::config::Parameters,
    model_cfg: &ModelConfig,
    observer: &dyn Observer,
) {
    let names: Vec<String> = model_cfg
        .expected_shapes()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    // The same parameters as other checkpoints spell them.
    let respelled: Vec<String> = names
        .iter()
        .map(|n| match model_cfg.arch() {
            Arch::Gpt2 => format!("transformer.{n}"),
            Arch::ClipVision => n.strip_prefix("vision_model.").unwrap_or(n).to_string(),
            Arch::CausalLm(_) => n.strip_prefix("model.").unwrap_or(n).to_string(),
        })
        .collect();
    let examples: Vec<String> = names
        .iter()
        .step_by((names.len() / 4).max(1))
        .take(4)
        .map(|n| format!("`{n}`"))
        .collect();
    for i in exclude.unmatched(&names) {
        let pattern = &params.exclude_param_names_regex[i];
        let why = if exclude.unmatched(&respelled).contains(&i) {
            String::new()
        } else {
            match model_cfg.arch() {
                Arch::Gpt2 => " (it matches `transformer.`-prefixed names; the merged model's names have no prefix)".into(),
                Arch::ClipVision => " (it matches names without the `vision_model.` prefix; the merged model's names have it)".into(),
                Arch::CausalLm(_) => " (it matches names without the `model.` prefix; the merged model's names have it)".into(),
            }
        };
        observer.event(Event::Warning(format!(
            "exclude_param_names_regex `{pattern}` matches no parameter, so it excludes nothing{why}; the names are like {}",
            examples.join(", ")
        )));
    }
}

pub fn describe(outcome: &SolveOutcome) -> String {
    match outcome {
        SolveOutcome::Cholesky => "solved by Cholesky".into(),
        SolveOutcome::Damped { epsilon, reason } => {
            format!("{reason}; damped towards the average (λ = {epsilon:.0e}·mean diag)")
        }
        SolveOutcome::Average { reason } => format!("{reason}; used the simple average"),
    }
}

/// A task model must have the base model's architecture and sizes.
fn check_compatible(base: &Checkpoint, base_cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<()> {
    if ckpt.arch() != base.arch() {
        return Err(Error::file(
            ckpt.dir(),
            format!(
                "is a {} model but the base model {} is {}",
                ckpt.arch().title(),
                base.dir().display(),
                base.arch().title()
            ),
        ));
    }
    let cfg = ModelConfig::from_checkpoint(ckpt)?;
    if !cfg.same_shape(base_cfg) {
        return Err(Error::file(
            ckpt.dir().join("config.json"),
            format!(
                "architecture sizes differ from the base model {} ({})",
                base.dir().display(),
                cfg.differences(base_cfg)
            ),
        ));
    }
    base_cfg.check_checkpoint(ckpt)
}

/// Opens every task model and checks it against the base, opens every data set (text
/// tokenised) and checks every Gram file's header, in the config's order, before the first
/// forward pass: a wrong path or a malformed file in the last entry fails in seconds, not
/// after the other models have run. Nothing is kept: each is opened again at its turn, so
/// that memory does not grow with the number of models (a second parse of a few hundred
/// examples takes milliseconds). Adds the stamps of the files checked to `stamps`: the run
/// compares them before it commits its output, so that a file changed between this check and
/// its turn (or after it) is reported.
fn check_inputs(
    cfg: &MergeConfig,
    base: &Checkpoint,
    model_cfg: &ModelConfig,
    sites: &[Site],
    regmean: bool,
    stamps: &mut Vec<FileStamp>,
) -> Result<()> {
    let options = cfg.parameters.gram_options();
    for entry in &cfg.models {
        let ckpt = Checkpoint::open(&entry.model)?;
        stamps.extend(ckpt.stamps().cloned());
        check_compatible(base, model_cfg, &ckpt)?;
        let read = if regmean {
            entry.grams.as_ref().or(entry.data.as_ref())
        } else {
            None
        };
        // Stamped before it is read. An image folder has no stamp of its own: its images
        // are read once, at its turn.
        // (A missing one is reported by its reader, just below.)
        if let Some(stamp) = read
            .filter(|p| p.is_file())
            .and_then(|p| FileStamp::of(p).ok())
        {
            stamps.push(stamp);
        }
        match (&entry.grams, &entry.data) {
            _ if !regmean => {}
            (Some(path), _) => stats::check(path, model_cfg.arch(), &options, sites)?,
            (None, Some(path)) => drop(open_data(cfg, &ckpt, path)?),
            (None, None) => {}
        }
    }
    Ok(())
}

/// A task's data, text tokenised and images preprocessed with the task model's own files
/// (else the base's).
pub(super) fn open_data(cfg: &MergeConfig, ckpt: &Checkpoint, path: &Path) -> Result<Dataset> {
    Dataset::open_for_model(
        path,
        &[ckpt.dir(), &cfg.base_model],
        cfg.parameters.max_length,
    )
}

/// Opens a task model set to keep the linear weights it makes; with `ahead` (on another
/// thread, before its turn, for a GPU merge), reads through their stored bytes so that the
/// pages are in memory when they are copied to the device. Each model was checked against
/// the base by [`check_inputs`] before the first one ran.
fn open_prepared(
    entry: &ModelEntry,
    sites: &[Site],
    keep: bool,
    ahead: bool,
) -> Result<Checkpoint> {
    let ckpt = Checkpoint::open(&entry.model)?;
    ckpt.set_keeping(keep);
    if keep && ahead {
        crate::profile::span("ahead: fault in stored weights", || {
            for m in sites.iter().flat_map(|s| &s.modules) {
                if let Ok(bytes) = ckpt.bytes(&m.weight) {
                    // One read per page maps it (and reads it from disk when it is not cached);
                    // the last byte too, as the tensor need not start on a page.
                    let touched = bytes
                        .iter()
                        .step_by(4096)
                        .chain(bytes.last())
                        .fold(0u8, |a, &b| a ^ b);
                    std::hint::black_box(touched);
                }
            }
        });
    }
    Ok(ckpt)
}

/// A test hook: holds each task model open (mapped, its header read) this long before its
/// weights are read, so that tests can change the file under the run.
fn hold_for_tests() {
    if let Some(ms) = std::env::var("REGMEAN_TEST_MODEL_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

fn join_prepared(
    handle: std::thread::ScopedJoinHandle<'_, Result<Checkpoint>>,
) -> Result<Checkpoint> {
    handle
        .join()
        .map_err(|_| Error::Backend("the thread reading the next model panicked".into()))?
}

/// One model's Grams: on the host, or left on the GPU that holds the running sums.
enum Grams {
    Host(ModelGrams),
    Device(DeviceGrams),
}

#[allow(clippy::too_many_arguments)]
fn model_grams<B: Backend>(
    backend: &B,
    cfg: &MergeConfig,
    ckpt: &Checkpoint,
    model_cfg: &ModelConfig,
    sites: &[Site],
    entry: &ModelEntry,
    index: usize,
    sums_on: Option<&Arc<CudaDevice>>,
    load_time: &mut Duration,
    observer: &dyn Observer,
) -> Result<Grams> {
    let name = entry.display_name();
    let options = cfg.parameters.gram_options();
    if let Some(path) = &entry.grams {
        observer.event(Event::ModelStart {
            index,
            total: cfg.models.len(),
            name: &name,
            examples: 0,
        });
        let fingerprint = ckpt.fingerprint()?;
        return stats::read(
            path,
            &GramFileInfo {
                arch: model_cfg.arch(),
                fingerprint: &fingerprint,
                options: &options,
                sites,
            },
        )
        .map(Grams::Host);
    }
    if let Some(dev) = sums_on {
        dev.inject_test_fault(index)?;
    }
    let data = open_data(
        cfg,
        ckpt,
        entry.data.as_ref().expect("validated: data or grams"),
    )?;
    let expected = crate::data::select(data.len(), &cfg.parameters.sampling())
        .0
        .len();
    observer.event(Event::ModelStart {
        index,
        total: cfg.models.len(),
        name: &name,
        examples: expected,
    });
    let (acc, examples) =
        accumulate_grams(backend, ckpt, model_cfg, &data, &cfg.parameters, observer)?;
    *load_time += acc.load_time;
    let acc = match sums_on {
        Some(dev) => match acc.finish_on_device(dev, examples)? {
            Ok(on_device) => return Ok(Grams::Device(on_device)),
            Err(acc) => acc,
        },
        None => acc,
    };
    crate::profile::span("grams: finish (host)", || acc.finish(examples)).map(Grams::Host)
}

impl RunningSums {
    fn new(
        model_cfg: &ModelConfig,
        sites: &[Site],
        exclude: &ExcludeSet,
        regmean: bool,
        device: Option<&Arc<CudaDevice>>,
    ) -> Result<Self> {
        let mut modules = Vec::new();
        if regmean {
            for (si, s) in sites.iter().enumerate() {
                for m in s.modules.iter().filter(|m| !exclude.excludes(&m.weight)) {
                    modules.push(SolvedModule {
                        module: m.clone(),
                        site: si,
                    });
                }
            }
        }
        let site_dims: Vec<usize> = if regmean {
            sites.iter().map(|s| s.dim).collect()
        } else {
            Vec::new()
        };
        let linear = match device {
            None => LinearSums::Host {
                gram: site_dims.iter().map(|d| vec![0.0f32; d * d]).collect(),
                gw: modules
                    .iter()
                    .map(|m| vec![0.0f32; m.module.in_dim * m.module.out_dim])
                    .collect(),
                w: modules
                    .iter()
                    .map(|m| vec![0.0f32; m.module.in_dim * m.module.out_dim])
                    .collect(),
            },
            Some(dev) => LinearSums::Device {
                dev: dev.clone(),
                sites: site_dims
                    .iter()
                    .map(|&d| DeviceSiteSums::new(dev, d))
                    .collect::<Result<_>>()?,
                modules: modules
                    .iter()
                    .map(|m| DeviceModuleSums::new(dev, m.module.in_dim, m.module.out_dim))
                    .collect::<Result<_>>()?,
            },
        };
        let solved: Vec<&str> = sites
            .iter()
            .flat_map(|s| s.modules.iter().map(|m| m.weight.as_str()))
            .collect();
        let mean_sum = model_cfg
            .expected_shapes()
            .into_iter()
            .filter(|(name, _)| {
                let solved_here = regmean && solved.contains(&name.as_str());
                !(exclude.excludes(name) || solved_here)
            })
            .map(|(name, shape)| (name, vec![0.0f32; shape.iter().product()]))
            .collect();
        Ok(RunningSums {
            modules,
            linear,
            mean_sum,
            count: 0,
        })
    }

    /// The GPU holding the sums, if any.
    fn device(&self) -> Option<&Arc<CudaDevice>> {
        match &self.linear {
            LinearSums::Host { .. } => None,
            LinearSums::Device { dev, .. } => Some(dev),
        }
    }

    /// Adds one model's reduced Grams G' and products G'W.
    fn add_regmean(
        &mut self,
        ckpt: &Checkpoint,
        grams: Grams,
        ratio: f32,
        diag_mult: f32,
    ) -> Result<()> {
        let grams = match (grams, &mut self.linear) {
            (
                Grams::Device(g),
                LinearSums::Device {
                    dev,
                    sites,
                    modules,
                },
            ) => {
                for (si, (gram, _rows)) in g.sites.into_iter().enumerate() {
                    sites[si].add(dev, &gram, ratio, diag_mult)?;
                    drop(gram);
                    add_products(dev, &sites[si], &self.modules, modules, ckpt, si)?;
                }
                return Ok(());
            }
            (Grams::Device(_), LinearSums::Host { .. }) => {
                return Err(Error::Backend(
                    "internal: Grams on the GPU but the sums on the host".into(),
                ));
            }
            (Grams::Host(g), _) => g,
        };
        match &mut self.linear {
            LinearSums::Host { gram, gw, w } => {
                let reduced: Vec<Vec<f32>> = grams
                    .sites
                    .into_iter()
                    .zip(gram.iter_mut())
                    .map(|(site, sum)| reduce_into(site.gram, sum, site.dim, ratio, diag_mult))
                    .collect();
                for ((m, gw_sum), w_sum) in self.modules.iter().zip(gw.iter_mut()).zip(w.iter_mut())
                {
                    let (d_in, d_out) = (m.module.in_dim, m.module.out_dim);
                    let weights = take_linear_in_out(ckpt, &m.module)?;
                    add_weighted(gw_sum, w_sum, &reduced[m.site], &weights, d_in, d_out);
                }
            }
            LinearSums::Device {
                dev,
                sites,
                modules,
            } => {
                // Site by site: a site's G' buffer is reused by the next model.
                for (si, site) in grams.sites.into_iter().enumerate() {
                    let g = dev.upload(&site.gram, "Gram")?;
                    sites[si].add(dev, &g, ratio, diag_mult)?;
                    add_products(dev, &sites[si], &self.modules, modules, ckpt, si)?;
                }
            }
        }
        Ok(())
    }

    /// Solves module `index` (its site `site`): the merged weights `[in, out]` and how.
    fn solve(
        &self,
        index: usize,
        site: usize,
        d_in: usize,
        d_out: usize,
    ) -> Result<(Vec<f32>, SolveOutcome)> {
        let k = self.count;
        match &self.linear {
            LinearSums::Host { gram, gw, w } => {
                let w_mean: Vec<f32> = w[index].iter().map(|v| v / k as f32).collect();
                Ok(solve_layer(&gram[site], &gw[index], &w_mean, d_in, d_out))
            }
            LinearSums::Device {
                dev,
                sites,
                modules,
            } => {
                let m = &modules[index];
                let (x, outcome) = crate::backend::cuda::solve::solve_layer(
                    dev,
                    &sites[site].gram_sum,
                    &m.gw_sum,
                    &m.w_sum,
                    k,
                    d_in,
                    d_out,
                )?;
                Ok((dev.download(&x)?, outcome))
            }
        }
    }

    fn add_means(&mut self, ckpt: &Checkpoint) -> Result<()> {
        for (name, sum) in &mut self.mean_sum {
            let v = ckpt.f32(name)?;
            sum.iter_mut().zip(&v).for_each(|(s, x)| *s += x);
        }
        Ok(())
    }
}

/// Σ G'W += G'·W and Σ W += W on the device, for the modules site `si` feeds (its G'
/// already computed for this model).
fn add_products(
    dev: &CudaDevice,
    site: &DeviceSiteSums,
    solved: &[SolvedModule],
    sums: &mut [DeviceModuleSums],
    ckpt: &Checkpoint,
    si: usize,
) -> Result<()> {
    use crate::profile::span;
    for (m, sums) in solved
        .iter()
        .zip(sums.iter_mut())
        .filter(|(m, _)| m.site == si)
    {
        // Made by the forward pass (or now, for Grams read from a file).
        let weights = span("sums: weight on the GPU", || {
            crate::backend::cuda::weights::take_linear_in_out(dev, ckpt, &m.module)
        })?;
        span("sums: G'W (enqueue)", || {
            sums.add(dev, &site.reduced, &weights)
        })?;
    }
    Ok(())
}

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
struct Ready {
    name: String,
    values: Vec<f32>,
    /// `[rows, cols]` when the values are the transpose of what is stored.
    transpose_from: Option<(usize, usize)>,
}

impl Ready {
    fn new(name: String, values: Vec<f32>) -> Self {
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
struct WriteProgress<'a> {
    stop: &'a AtomicBool,
    written: &'a AtomicU64,
}

/// Writes every output tensor: each solved layer as it arrives, first (the solve never waits
/// for the rest), and between them what the base model gives and the averages (Σ / k), until
/// `stop` says the solve failed. Returns the time spent writing.
fn write_merged(
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

/// config.json of the merged model: the base model's, as the backbone class
/// (`GPT2Model` / `CLIPVisionModel`, the vision config of a `CLIPModel`), dtype updated.
pub fn output_config(base: &Checkpoint, torch_dtype: &str) -> serde_json::Value {
    let src = base.config();
    let mut c = match base.arch() {
        Arch::ClipVision if src.get("model_type").and_then(|m| m.as_str()) == Some("clip") => {
            let mut v = src
                .get("vision_config")
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}));
            v["model_type"] = "clip_vision_model".into();
            if let Some(tv) = src.get("transformers_version") {
                v["transformers_version"] = tv.clone();
            }
            v
        }
        _ => src.clone(),
    };
    c["architectures"] = serde_json::json!([match base.arch() {
        Arch::Gpt2 => "GPT2Model",
        Arch::ClipVision => "CLIPVisionModel",
        Arch::CausalLm(family) => family.causal_lm_class(),
    }]);
    // transformers 5 writes `dtype`, 4.x `torch_dtype`: update the one the base model uses.
    if let Some(obj) = c.as_object_mut() {
        let key = if src.get("dtype").is_some() || obj.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(key.into(), torch_dtype.into());
    }
    c
}

/// What the model card records: the config as run, and what the run actually used.
pub(super) struct ModelCard<'a> {
    pub cfg: &'a MergeConfig,
    pub arch: Arch,
    /// The forward pass's precision; None when no forward pass ran (Grams from files, or a
    /// simple average).
    pub precision: Option<crate::backend::Precision>,
    pub out_dtype: &'a Dtype,
}

/// A path as the model card shows it: its last component (the card travels with the model;
/// the local folders it was merged from do not).
fn card_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

impl ModelCard<'_> {
    fn render(&self) -> String {
        let cfg = self.cfg;
        let models: Vec<String> = cfg
            .models
            .iter()
            .map(|m| {
                let src = m
                    .data
                    .as_ref()
                    .map(|d| format!("data `{}`", card_name(d)))
                    .or_else(|| {
                        m.grams
                            .as_ref()
                            .map(|g| format!("grams `{}`", card_name(g)))
                    });
                format!(
                    "- `{}` ({})",
                    cfg.model_name(&m.model),
                    src.unwrap_or_else(|| "no data".into())
                )
            })
            .collect();
        let mut params = serde_yaml::to_value(&cfg.parameters).unwrap_or_default();
        if let Some(map) = params.as_mapping_mut() {
            match self.precision {
                Some(p) => map.insert("precision".into(), p.name().into()),
                None => map.remove("precision"),
            };
            map.insert(
                "reduce_non_diagonal_ratio".into(),
                cfg.parameters.ratio_for(self.arch).into(),
            );
        }
        format!(
            "---\nlibrary_name: transformers\ntags:\n- merge\n- regmean\n---\n\n# Merged model\n\nMerged by regmean-gpu {version} with {method} from the base model `{base}` and:\n\n{models}\n\n## Parameters\n\n```yaml\n{params}out_dtype: {dtype}\n```\n",
            version = env!("CARGO_PKG_VERSION"),
            method = cfg.merge_method.title(),
            base = cfg.model_name(&cfg.base_model),
            models = models.join("\n"),
            params = serde_yaml::to_string(&params).unwrap_or_default(),
            dtype = self.out_dtype.torch_name(),
        )
    }
}
