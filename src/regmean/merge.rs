//! The whole merge, streaming over task models: each model is opened, its Grams computed
//! (or read), folded into running sums, and dropped before the next, so memory does not
//! grow with the number of models. Then every linear layer is solved, every other float
//! parameter averaged, and the result written as a transformers model directory: a second
//! thread writes each tensor into its planned place as soon as it is ready, while the
//! solve goes on.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::gram::{accumulate_grams, DeviceGrams, ModelGrams};
use super::solve::{solve_layer, SolveOutcome};
use super::stats::{self, GramFileInfo};
use crate::backend::cuda::gram::{DeviceModuleSums, DeviceSiteSums};
use crate::backend::cuda::CudaDevice;
use crate::backend::Backend;
use crate::config::{ExcludeSet, MergeConfig, MergeMethod, ModelEntry};
use crate::data::Dataset;
use crate::error::{Error, Result};
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
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            device: None,
            out_shard_bytes: 5_000_000_000,
            force: false,
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
    /// What writing takes after the last layer is solved: the rest of the tensors, the flush
    /// to disk, config.json and the other files.
    pub write: Duration,
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
    /// The most device memory in use during the merge (GPU backends only).
    pub peak_device_bytes: Option<u64>,
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

/// Merges the models of `cfg` into `out`.
pub fn merge<B: Backend>(
    backend: &B,
    cfg: &MergeConfig,
    out: &Path,
    opts: &MergeOptions,
    observer: &dyn Observer,
) -> Result<MergeReport> {
    let params = &cfg.parameters;
    let base = Checkpoint::open(&cfg.base_model)?;
    let model_cfg = ModelConfig::from_checkpoint(&base)?;
    model_cfg.check_checkpoint(&base)?;
    let arch = model_cfg.arch();
    let out_dtype = cfg
        .out_dtype()?
        .unwrap_or_else(|| base.dominant_float_dtype());
    let exclude = ExcludeSet::new(&params.exclude_param_names_regex).map_err(Error::invalid)?;
    let ratio = params.ratio_for(arch) as f32;
    // FusionBench builds the multiplier as diag(1 − r) + r in f32; keep its rounding.
    let diag_mult = (1.0f32 - ratio) + ratio;

    let sites = model_cfg.sites();
    let regmean = cfg.merge_method == MergeMethod::Regmean;
    // Fail before hours of work, not after: the output location must be usable, and every
    // input must open and fit.
    let out_dir = OutputDir::create(out, opts.force, &cfg.inputs())?;
    crate::profile::span("inputs: open and check all", || {
        check_inputs(cfg, &base, &model_cfg, &sites, regmean)
    })?;

    let mut sums = RunningSums::new(&model_cfg, &sites, &exclude, regmean, opts.device.as_ref())?;
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
                    )?;
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
                    sums.add_regmean(&ckpt, grams, ratio, diag_mult)?;
                    sums_time += t.elapsed();
                }
                let t = Instant::now();
                crate::profile::span("sums: means", || sums.add_means(&ckpt))?;
                sums_time += t.elapsed();
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
    let plan = output_plan(&base, &model_cfg, &merged_names, &exclude, &out_dtype)?;
    let planned: Vec<PlannedTensor> = plan.iter().map(|(t, _)| t.clone()).collect();
    let mut writer = ModelWriter::create(out_dir.path(), &planned, opts.out_shard_bytes)?;
    observer.event(Event::SolveStart {
        layers: sums.modules.len(),
    });
    let k = sums.count as f32;
    let mut fallbacks = Vec::new();
    let mut solve_time = Duration::ZERO;
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<()> {
        // Bounded: solved layers wait here, not in memory, when the disk is the slower.
        let (ready, arrivals) = std::sync::mpsc::sync_channel::<Ready>(4);
        let means = std::mem::take(&mut sums.mean_sum);
        let (writer, base, plan, stop_ref) = (&mut writer, &base, &plan, &stop);
        let writing =
            scope.spawn(move || write_merged(writer, base, plan, means, k, arrivals, stop_ref));
        let mut solving = || -> Result<()> {
            for (done, m) in sums.modules.iter().enumerate() {
                let (d_in, d_out) = (m.module.in_dim, m.module.out_dim);
                let (w, outcome) = sums.solve(done, m.site, d_in, d_out)?;
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
                observer.event(Event::Solved { done: done + 1 });
            }
            Ok(())
        };
        let solved = solving();
        solve_time = t1.elapsed();
        if solved.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        drop(ready);
        let written = writing
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // A solve error comes first: the writer only stopped because of it.
        solved.and(written)
    })?;
    let layers_solved = sums.modules.len();
    peak_device = peak_device.max(backend.memory_in_use());
    drop(sums);

    let t2 = Instant::now();
    observer.event(Event::Writing { path: out });
    let mut files = writer.finish()?;
    files.extend(write_sidecars(&out_dir, &base, out_dtype, cfg)?);
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
            write: t2.elapsed(),
        },
        files,
        peak_device_bytes: peak_device,
    })
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
                ckpt.arch().name(),
                base.dir().display(),
                base.arch().name()
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
/// examples takes milliseconds).
fn check_inputs(
    cfg: &MergeConfig,
    base: &Checkpoint,
    model_cfg: &ModelConfig,
    sites: &[Site],
    regmean: bool,
) -> Result<()> {
    let options = cfg.parameters.gram_options();
    for entry in &cfg.models {
        let ckpt = Checkpoint::open(&entry.model)?;
        check_compatible(base, model_cfg, &ckpt)?;
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
fn open_data(cfg: &MergeConfig, ckpt: &Checkpoint, path: &Path) -> Result<Dataset> {
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
                let mut reduced: Vec<Vec<f32>> = Vec::with_capacity(grams.sites.len());
                for (site, sum) in grams.sites.into_iter().zip(gram.iter_mut()) {
                    let d = site.dim;
                    let mut g = site.gram;
                    g.par_chunks_mut(d.max(1))
                        .zip(sum.par_chunks_mut(d.max(1)))
                        .enumerate()
                        .for_each(|(i, (row, sum_row))| {
                            for (j, (v, s)) in row.iter_mut().zip(sum_row).enumerate() {
                                *v *= if i == j { diag_mult } else { ratio };
                                *s += *v;
                            }
                        });
                    reduced.push(g);
                }
                for ((m, gw_sum), w_sum) in self.modules.iter().zip(gw.iter_mut()).zip(w.iter_mut())
                {
                    let (d_in, d_out) = (m.module.in_dim, m.module.out_dim);
                    let weights = take_linear_in_out(ckpt, &m.module)?;
                    // Σ G'W accumulates in the product's own GEMM.
                    matmul(
                        MatMut::from_row_major_slice_mut(gw_sum, d_in, d_out),
                        Accum::Add,
                        MatRef::from_row_major_slice(&reduced[m.site], d_in, d_in),
                        MatRef::from_row_major_slice(&weights, d_in, d_out),
                        1.0,
                        Par::rayon(0),
                    );
                    w_sum
                        .par_chunks_mut(1 << 14)
                        .zip(weights.par_chunks(1 << 14))
                        .for_each(|(s, v)| s.iter_mut().zip(v).for_each(|(s, v)| *s += v));
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
enum Source {
    /// Solved or averaged by the merge: sent to the writer when ready.
    Merged,
    /// An excluded parameter: the base model's values, in the output dtype.
    Base,
    /// A buffer (position ids, causal masks): the base model's bytes as they are.
    Raw,
}

/// The output tensors, in the base model's order: merged and excluded parameters in
/// `out_dtype`, buffers as stored.
fn output_plan(
    base: &Checkpoint,
    model_cfg: &ModelConfig,
    merged: &HashSet<String>,
    exclude: &ExcludeSet,
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
        } else if params.contains(name) && exclude.excludes(name) {
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

/// Writes every output tensor: each solved layer as it arrives, first (the solve never waits
/// for the rest), and between them what the base model gives and the averages (Σ / k), until
/// `stop` says the solve failed.
fn write_merged(
    writer: &mut ModelWriter,
    base: &Checkpoint,
    plan: &[(PlannedTensor, Source)],
    means: BTreeMap<String, Vec<f32>>,
    k: f32,
    arrivals: std::sync::mpsc::Receiver<Ready>,
    stop: &AtomicBool,
) -> Result<()> {
    let write = |writer: &mut ModelWriter, name: &str, values: &[f32]| {
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            return Err(Error::Numerical(format!(
                "merged `{name}` has a non-finite value at element {i}; nothing was written"
            )));
        }
        writer.write_f32(name, values)
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
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        match own {
            Own::Base => write(writer, &name, &base.f32(&name)?)?,
            Own::Raw => writer.write_raw(&name, base.bytes(&name)?)?,
            Own::Mean(sum) => {
                let mean: Vec<f32> = sum.into_iter().map(|v| v / k).collect();
                write(writer, &name, &mean)?
            }
        }
    }
    for r in arrivals {
        write_arrival(writer, r)?;
    }
    Ok(())
}

/// The merged model's other files: config.json, the base model's tokenizer and
/// preprocessing files, and a model card.
fn write_sidecars(
    out_dir: &OutputDir,
    base: &Checkpoint,
    out_dtype: Dtype,
    cfg: &MergeConfig,
) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let config = output_config(base, out_dtype.torch_name());
    out_dir.write_text(
        "config.json",
        &serde_json::to_string_pretty(&config).expect("json"),
    )?;
    files.push("config.json".into());
    files.extend(copy_sidecars(base.dir(), out_dir.path())?);
    out_dir.write_text("README.md", &model_card(cfg, base.arch()))?;
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

fn model_card(cfg: &MergeConfig, arch: Arch) -> String {
    let models: Vec<String> = cfg
        .models
        .iter()
        .map(|m| {
            let src = m
                .data
                .as_ref()
                .map(|d| format!("data `{}`", d.display()))
                .or_else(|| m.grams.as_ref().map(|g| format!("grams `{}`", g.display())));
            format!(
                "- `{}` ({})",
                m.model.display(),
                src.unwrap_or_else(|| "no data".into())
            )
        })
        .collect();
    let p = &cfg.parameters;
    format!(
        "---\nlibrary_name: transformers\ntags:\n- merge\n- regmean\n---\n\n# Merged model\n\nMerged by regmean-gpu {version} with `{method:?}` from the base model `{base}` and:\n\n{models}\n\n## Parameters\n\n```yaml\n{params}reduce_non_diagonal_ratio_used: {ratio}\nout_dtype: {dtype}\n```\n",
        version = env!("CARGO_PKG_VERSION"),
        method = cfg.merge_method,
        base = cfg.base_model.display(),
        models = models.join("\n"),
        params = serde_yaml::to_string(p).unwrap_or_default(),
        ratio = p.ratio_for(arch),
        dtype = cfg.out_dtype.as_deref().unwrap_or("(base model's)"),
    )
}
