//! The layer-wise merge: one layer at a time over all task models, each task's inputs of the
//! current layer held in activation caches ([`ActivationStore`]). It runs
//!
//! - RegMean with `schedule: layer`: every task's own layer makes its next inputs, so the
//!   merge is the one a model at a time gives, with the memory of one layer's statistics
//!   plus the caches;
//! - RegMean++ (FusionBench `regmean_plusplus`): the embeddings are merged first and make
//!   every task's first inputs; each layer's Grams are taken while the task's own layer runs
//!   on them, and the *merged* layer then makes the next inputs.
//!
//! The forward passes, the statistics and the solve run on the backend (its
//! [`MergeArithmetic`]), through the steps the model-by-model merge uses
//! ([`super::running::add_grams`]); the activation caches stay on the backend where it has
//! room for them (a GPU's memory), else in host memory or a spill file.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::activations::ActivationStore;
use super::card::ModelCard;
use super::gram::{check_data, GramAccumulator};
use super::model_weights::ModelWeights;
use super::options::MergeOptions;
use super::output::{output_plan, write_finite, write_sidecars, Source};
use super::prepare::{open_data, Prepared};
use super::report::{describe, MergeReport, ModelReport, Timings};
use super::running::{add_grams, Grams};
use crate::backend::solve::SolveOutcome;
use crate::backend::sums::add_assign;
use crate::backend::MergeArithmetic;
use crate::config::{MergeConfig, MergeMethod, Schedule};
use crate::data::{for_each_batch, select};
use crate::error::{Error, Result};
use crate::io::mapped::FileStamp;
use crate::io::writer::{ModelWriter, PlannedTensor};
use crate::io::{Arch, Checkpoint};
use crate::model::{
    linear_in_out, transpose, Batch, GramSink, HostParams, LinearModule, ModelConfig, ParamGroup,
    Site,
};
use crate::progress::{stop_point, Event, Observer};

/// The memory a merge needs under each schedule, estimated before it starts (bytes).
#[derive(Clone, Copy, Debug)]
pub(super) struct MemoryEstimate {
    pub model: u64,
    pub layer: u64,
    /// Of `layer`: the activation caches.
    pub caches: u64,
}

/// Half of the memory available when the run starts (8 GB when it cannot be read).
pub fn default_max_memory() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    available.map_or(8 << 30, |b| b / 2)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// An upper bound of both schedules' memory: the running sums (Σ G', Σ G'W, Σ W and the
/// averaged parameters), one model's (or layer's) decoded weights and its widest activations,
/// and for `layer` every task's cached inputs at the requested number of examples and the
/// longest sequence allowed.
pub(super) fn estimate(cfg: &MergeConfig, model_cfg: &ModelConfig) -> MemoryEstimate {
    let p = &cfg.parameters;
    let sites = model_cfg.sites();
    let layers = model_cfg.num_layers().max(1) as u64;
    let gram: u64 = sites.iter().map(|s| (s.dim * s.dim) as u64).sum();
    let linear: u64 = sites
        .iter()
        .flat_map(|s| &s.modules)
        .map(|m| (m.in_dim * m.out_dim) as u64)
        .sum();
    let params: u64 = model_cfg
        .expected_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    let (seq, d, f) = match model_cfg {
        ModelConfig::Gpt2(c) => (p.max_length.min(c.n_positions), c.n_embd, c.n_inner),
        ModelConfig::Clip(c) => (c.num_patches() + 1, c.hidden_size, c.intermediate_size),
        ModelConfig::Llama(c) => (
            p.max_length.min(c.max_position_embeddings),
            c.hidden_size,
            c.intermediate_size,
        ),
    };
    let examples = if p.fusionbench_compat {
        p.num_regmean_examples.div_ceil(p.batch_size) * p.batch_size
    } else {
        p.num_regmean_examples
    } as u64;
    let activations = (p.batch_size * seq * (5 * d + 2 * f)) as u64;
    // Sums of every layer + one model's Grams and weights.
    let model = 4 * (2 * gram + 3 * linear + params + activations);
    let caches = 4 * cfg.models.len() as u64 * examples * (seq * d) as u64;
    let layer =
        4 * (2 * gram / layers + 3 * linear / layers + (params - linear) + activations) + caches;
    MemoryEstimate {
        model,
        layer,
        caches,
    }
}

/// The schedule a merge runs: RegMean++ always layer by layer, the simple average model by
/// model, RegMean as configured; `auto` takes `model` when its estimate fits under the cap
/// (and always where the layer-wise engine is not verified, a GPU), and says what it chose.
pub(super) fn choose_schedule<B: MergeArithmetic>(
    backend: &B,
    cfg: &MergeConfig,
    prepared: &Prepared,
    opts: &MergeOptions,
    observer: &dyn Observer,
) -> Result<Schedule> {
    let decoder = matches!(prepared.model_cfg, ModelConfig::Llama(_));
    match (cfg.merge_method, cfg.parameters.schedule) {
        (MergeMethod::SimpleAverage, _) => return Ok(Schedule::Model),
        (MergeMethod::RegmeanPlusplus, _) => return Ok(Schedule::Layer),
        (MergeMethod::Regmean, Schedule::Auto) => {}
        (MergeMethod::Regmean, s) => return Ok(s),
    }
    if cfg.models.iter().any(|m| m.grams.is_some()) {
        return Ok(Schedule::Model);
    }
    let est = estimate(cfg, &prepared.model_cfg);
    let cap = opts.max_memory.unwrap_or_else(default_max_memory);
    let (pick, why) = if est.model <= cap {
        (Schedule::Model, "it fits")
    } else if !backend.layerwise_verified() && !decoder {
        // (A decoder on a GPU has no verified path: the one that fits is taken.)
        (Schedule::Model, "the GPU path is the verified one")
    } else {
        (Schedule::Layer, "one model at a time does not fit")
    };
    observer.event(Event::Note(format!(
        "schedule auto: about {} one model at a time, {} one layer at a time (of which {} activation caches), cap {}: {} ({why})",
        human(est.model),
        human(est.layer),
        human(est.caches),
        human(cap),
        if pick == Schedule::Model { "model" } else { "layer" },
    )));
    Ok(pick)
}

/// One cached batch of a task: where its activations are and how its block runs.
struct CachedBatch {
    id: usize,
    batch: usize,
    seq: usize,
    /// GPT-2's attention mask (1 = real token).
    mask: Option<Vec<u8>>,
}

/// A task model. Its checkpoint is opened for each use and closed after: the pages of a
/// memory map stay resident while it is open, and a layer-wise merge goes through every
/// model at every layer.
struct Task {
    dir: PathBuf,
    report: ModelReport,
    batches: Vec<CachedBatch>,
}

/// Which parameters keep the base model's value. FusionBench's RegMean++ (compat mode)
/// matches `exclude_param_names_regex` against names relative to the layer
/// (`self_attn.q_proj.weight`), always averages the embeddings, and never merges CLIP's
/// `post_layernorm`; everywhere else the patterns match full names.
fn base_valued<'a>(cfg: &'a MergeConfig, prepared: &'a Prepared) -> impl Fn(&str) -> bool + 'a {
    let fusionbench_pp =
        cfg.merge_method == MergeMethod::RegmeanPlusplus && cfg.parameters.fusionbench_compat;
    let model_cfg = &prepared.model_cfg;
    move |name: &str| {
        if !fusionbench_pp {
            return prepared.exclude.excludes(name);
        }
        match model_cfg.group_of(name) {
            ParamGroup::Embeddings => false,
            ParamGroup::Layer(l) => {
                let prefix = model_cfg.layer_prefix(l);
                prepared
                    .exclude
                    .excludes(name.strip_prefix(&prefix).unwrap_or(name))
            }
            ParamGroup::Final => {
                model_cfg.arch() == Arch::ClipVision || prepared.exclude.excludes(name)
            }
        }
    }
}

/// The merge layer by layer (`schedule: layer`, and RegMean++).
pub(super) fn merge_by_layer<B: MergeArithmetic>(
    prepared: Prepared,
    backend: &B,
    cfg: &MergeConfig,
    opts: &MergeOptions,
    observer: &dyn Observer,
    watched: &[FileStamp],
) -> Result<MergeReport> {
    let plus_plus = cfg.merge_method == MergeMethod::RegmeanPlusplus;
    let params = &cfg.parameters;
    if !backend.layerwise_verified() {
        observer.event(Event::Note(
            "the layer-wise engine has not been verified on a GPU yet: compare its output with a CPU run before relying on it".into(),
        ));
    }
    let keeps_base = base_valued(cfg, &prepared);
    let Prepared {
        base,
        model_cfg,
        sites,
        out_dtype,
        ratio,
        diag_mult,
        out_dir,
        ..
    } = &prepared;

    // The output's layout, fixed up front: solved linear weights, averaged parameters.
    let solved: Vec<(usize, LinearModule)> = sites
        .iter()
        .enumerate()
        .flat_map(|(si, s)| s.modules.iter().map(move |m| (si, m.clone())))
        .filter(|(_, m)| !keeps_base(&m.weight))
        .collect();
    let solved_names: HashSet<&str> = solved.iter().map(|(_, m)| m.weight.as_str()).collect();
    let averaged: Vec<(String, Vec<usize>)> = model_cfg
        .expected_shapes()
        .into_iter()
        .filter(|(n, _)| !solved_names.contains(n.as_str()) && !keeps_base(n))
        .collect();
    let merged_names: HashSet<String> = solved
        .iter()
        .map(|(_, m)| m.weight.clone())
        .chain(averaged.iter().map(|(n, _)| n.clone()))
        .collect();
    let plan = output_plan(base, model_cfg, &merged_names, &keeps_base, out_dtype)?;
    let planned: Vec<PlannedTensor> = plan.iter().map(|(t, _)| t.clone()).collect();
    let mut writer = ModelWriter::create(out_dir.path(), &planned, opts.out_shard_bytes)?;

    let cap = opts.max_memory.unwrap_or_else(default_max_memory);
    let mut store = ActivationStore::new(
        backend,
        backend.activation_cache_budget(),
        cap,
        out_dir.path().join(SPILL_FILE),
    );
    let k = cfg.models.len() as f32;
    let mut timings = Timings::default();
    let mut peak_device = backend.memory_in_use();
    let t0 = Instant::now();

    // Embeddings: averaged first; they make every task's first inputs (RegMean++), or each
    // task's own do (RegMean).
    let mut tasks: Vec<Task> = cfg
        .models
        .iter()
        .map(|entry| {
            Ok(Task {
                dir: entry.model.clone(),
                report: ModelReport {
                    name: entry.display_name(),
                    examples: 0,
                    rows: 0,
                    from_grams_file: false,
                },
                batches: Vec::new(),
            })
        })
        .collect::<Result<_>>()?;
    let in_group = |g: ParamGroup| {
        averaged
            .iter()
            .filter(move |(n, _)| model_cfg.group_of(n) == g)
    };
    let mut merged = HostParams::default();
    for (name, mean) in average(&tasks, in_group(ParamGroup::Embeddings), k)? {
        write_timed(&mut writer, &mut timings.writer_busy, &name, &mean)?;
        merged.tensors.insert(name, mean);
    }
    let merged_embeddings = if plus_plus {
        add_base_values(
            &mut merged,
            base,
            model_cfg,
            ParamGroup::Embeddings,
            &keeps_base,
        )?;
        Some(model_cfg.load_embeddings(backend, &merged)?)
    } else {
        None
    };
    for (index, (task, entry)) in tasks.iter_mut().zip(&cfg.models).enumerate() {
        let path = entry
            .data
            .as_ref()
            .ok_or_else(|| Error::invalid(format!("{}: no `data`", task.report.name)))?;
        let ckpt = Checkpoint::open(&task.dir)?;
        let data = open_data(cfg, &ckpt, path)?;
        let (indices, warning) = select(data.len(), &params.sampling());
        if let Some(w) = warning {
            observer.event(Event::Warning(format!("{}: {w}", data.path().display())));
        }
        let padding = check_data(model_cfg, &data, params)?;
        observer.event(Event::ModelStart {
            index,
            total: cfg.models.len(),
            name: &task.report.name,
            examples: indices.len(),
        });
        let own;
        let embeddings = match &merged_embeddings {
            Some(e) => e,
            None => {
                own = model_cfg.load_embeddings(backend, &ckpt)?;
                &own
            }
        };
        let mut done = 0;
        for_each_batch(
            &data,
            &indices,
            params.batch_size,
            padding,
            |chunk, batch| {
                let h = embeddings.apply(backend, &batch)?;
                let (seq, mask) = match batch {
                    Batch::Tokens { seq, mask, .. } => (seq, Some(mask)),
                    Batch::Pixels { .. } => (backend.shape(&h).0 / chunk.len().max(1), None),
                };
                let id = store.push(h)?;
                task.batches.push(CachedBatch {
                    id,
                    batch: chunk.len(),
                    seq,
                    mask,
                });
                done += chunk.len();
                observer.event(Event::Examples { done });
                stop_point(observer)
            },
        )?;
        task.report.examples = indices.len();
        observer.event(Event::ModelDone { index });
    }
    drop(merged_embeddings);

    // Layer by layer.
    let layers = model_cfg.num_layers();
    let first_head_site = 4 * layers;
    // The sites after the layers (a decoder's untied lm_head), solved after the last layer.
    let head_solved: Vec<(usize, &LinearModule)> = solved
        .iter()
        .filter(|(si, _)| *si >= first_head_site)
        .map(|(si, m)| (si - first_head_site, m))
        .collect();
    observer.event(Event::SolveStart {
        layers: solved.len(),
    });
    let mut solving = Solving {
        backend,
        models: cfg.models.len(),
        observer,
        done: 0,
        fallbacks: Vec::new(),
    };
    let stats = GroupStats {
        backend,
        compat: params.fusionbench_compat,
        reduction: (*ratio, *diag_mult),
        observer,
    };
    for l in 0..layers {
        let layer_sites = &sites[4 * l..4 * l + 4];
        // Each solved module with its site's index among the layer's.
        let in_layer: Vec<(usize, &LinearModule)> = solved
            .iter()
            .filter(|(si, _)| (4 * l..4 * l + 4).contains(si))
            .map(|(si, m)| (si - 4 * l, m))
            .collect();
        let (site_sums, module_sums) = stats.collect(
            &mut tasks,
            &mut store,
            layer_sites,
            &in_layer,
            &mut timings,
            &mut peak_device,
            |weights, task, store, acc| {
                let block = model_cfg.load_block(backend, weights, l)?;
                for b in &task.batches {
                    let run = model_cfg.layer_run(b.batch, b.seq, b.mask.as_deref())?;
                    if plus_plus {
                        // Only the Grams: the merged layer makes the next inputs (from
                        // these, so the pass runs on a copy).
                        let mut h = store.copy(b.id)?;
                        block.observe_sites(acc, backend, &mut h, &run)?;
                    } else {
                        // The task's own layer makes its next inputs.
                        let mut h = store.take(b.id)?;
                        let mut sink: Option<&mut dyn GramSink<B>> = Some(acc);
                        block.forward(backend, &mut h, &run, 0, &mut sink)?;
                        store.put(b.id, h)?;
                    }
                }
                Ok(())
            },
        )?;

        let t = Instant::now();
        let mut merged = HostParams::default();
        solving.solve(
            &site_sums,
            &in_layer,
            &module_sums,
            &mut writer,
            &mut timings,
            &mut merged,
        )?;
        for (name, mean) in average(&tasks, in_group(ParamGroup::Layer(l)), k)? {
            write_timed(&mut writer, &mut timings.writer_busy, &name, &mean)?;
            merged.tensors.insert(name, mean);
        }
        timings.solve += t.elapsed();
        drop((site_sums, module_sums));

        if plus_plus && (l + 1 < layers || !head_solved.is_empty()) {
            // The merged layer makes every task's next inputs.
            add_base_values(
                &mut merged,
                base,
                model_cfg,
                ParamGroup::Layer(l),
                &keeps_base,
            )?;
            let block = model_cfg.load_block(backend, &merged, l)?;
            for task in &tasks {
                for b in &task.batches {
                    let mut h = store.take(b.id)?;
                    let run = model_cfg.layer_run(b.batch, b.seq, b.mask.as_deref())?;
                    block.forward(backend, &mut h, &run, 0, &mut None)?;
                    store.put(b.id, h)?;
                }
            }
        }
    }

    // The head: its Grams from each task's own final norm over the last layer's outputs.
    if !head_solved.is_empty() {
        let head_sites = &sites[first_head_site..];
        let (site_sums, module_sums) = stats.collect(
            &mut tasks,
            &mut store,
            head_sites,
            &head_solved,
            &mut timings,
            &mut peak_device,
            |weights, task, store, acc| {
                let head = model_cfg
                    .load_head_input(backend, weights)?
                    .ok_or_else(|| {
                        Error::Backend("internal: sites after the layers but no head input".into())
                    })?;
                for b in &task.batches {
                    // A copy, not take and put back: a spilled batch would be written again.
                    let h = store.copy(b.id)?;
                    acc.observe(0, &head.apply(backend, &h)?, b.mask.as_deref())?;
                }
                Ok(())
            },
        )?;
        let t = Instant::now();
        solving.solve(
            &site_sums,
            &head_solved,
            &module_sums,
            &mut writer,
            &mut timings,
            &mut HostParams::default(),
        )?;
        timings.solve += t.elapsed();
    }
    let fallbacks = solving.fallbacks;
    timings.grams = t0.elapsed() - timings.solve;
    let cache = store.stats();
    drop(store);

    let t2 = Instant::now();
    for (name, mean) in average(&tasks, in_group(ParamGroup::Final), k)? {
        write_timed(&mut writer, &mut timings.writer_busy, &name, &mean)?;
    }
    for (t, source) in &plan {
        match source {
            Source::Merged => {}
            Source::Base => write_timed(
                &mut writer,
                &mut timings.writer_busy,
                &t.name,
                &base.f32(&t.name)?,
            )?,
            Source::Raw => {
                let t0 = Instant::now();
                writer.write_raw(&t.name, base.bytes(&t.name)?)?;
                timings.writer_busy += t0.elapsed();
            }
        }
    }
    observer.event(Event::Writing {
        path: out_dir.final_path(),
    });
    let mut files = writer.finish()?;
    let arch = model_cfg.arch();
    let card = ModelCard {
        cfg,
        arch,
        precision: Some(backend.precision()),
        out_dtype,
    };
    files.extend(write_sidecars(out_dir, base, out_dtype.clone(), &card)?);
    let layers_solved = solved.len();
    drop(keeps_base);
    // Every input must still be as it was when first checked (see `io::mapped`).
    base.check_unchanged()?;
    watched.iter().try_for_each(FileStamp::check)?;
    prepared.out_dir.commit()?;
    timings.write = t2.elapsed();
    Ok(MergeReport {
        arch,
        method: cfg.merge_method,
        models: tasks.into_iter().map(|t| t.report).collect(),
        layers_solved,
        fallbacks,
        timings,
        files,
        tensor_bytes: planned.iter().map(|t| t.byte_len as u64).sum(),
        peak_device_bytes: peak_device,
        schedule: Schedule::Layer,
        activation_cache: Some(cache),
    })
}

/// Σ G' per site and Σ G'W per solved module of one group of sites.
type GroupSums<B> = (
    Vec<<B as MergeArithmetic>::SiteSums>,
    Vec<<B as MergeArithmetic>::ModuleSums>,
);

/// Collects one group of sites' statistics (a layer's, or the head's) over every task.
struct GroupStats<'a, B: MergeArithmetic> {
    backend: &'a B,
    compat: bool,
    reduction: (f32, f32),
    observer: &'a dyn Observer,
}

impl<B: MergeArithmetic> GroupStats<'_, B> {
    /// The sums of Σ G' per site and Σ G'W per solved module over the tasks: for each task,
    /// `run(weights, task, store, acc)` shows its cached batches to the Gram accumulator.
    #[allow(clippy::too_many_arguments)]
    fn collect(
        &self,
        tasks: &mut [Task],
        store: &mut ActivationStore<'_, B>,
        group_sites: &[Site],
        solved: &[(usize, &LinearModule)],
        timings: &mut Timings,
        peak_device: &mut Option<u64>,
        mut run: impl FnMut(
            &ModelWeights<'_, B>,
            &Task,
            &mut ActivationStore<'_, B>,
            &mut GramAccumulator<'_, B>,
        ) -> Result<()>,
    ) -> Result<GroupSums<B>> {
        let backend = self.backend;
        let mut site_sums: Vec<B::SiteSums> = group_sites
            .iter()
            .map(|s| backend.site_sums(s.dim))
            .collect::<Result<_>>()?;
        let mut module_sums: Vec<B::ModuleSums> = solved
            .iter()
            .map(|(_, m)| backend.module_sums(m.in_dim, m.out_dim))
            .collect::<Result<_>>()?;
        for task in tasks.iter_mut() {
            stop_point(self.observer)?;
            let t = Instant::now();
            let ckpt = Checkpoint::open(&task.dir)?;
            // Each linear weight is made once, for the forward pass and the sums.
            let weights = ModelWeights::new(&ckpt);
            timings.model_load += t.elapsed();
            let mut acc = GramAccumulator::new(backend, group_sites.to_vec(), self.compat)?;
            run(&weights, task, store, &mut acc)?;
            *peak_device = (*peak_device).max(backend.memory_in_use());
            let examples = task.report.examples;
            let grams = match acc.finish_on_backend(examples)? {
                Ok(on_backend) => Grams::Backend(on_backend),
                Err(acc) => Grams::Host(acc.finish(examples)?),
            };
            if task.report.rows == 0 {
                task.report.rows = grams.first_rows().unwrap_or(0);
            }
            let t = Instant::now();
            add_grams(
                backend,
                &mut site_sums,
                solved,
                &mut module_sums,
                grams,
                &weights,
                self.reduction,
            )?;
            timings.sums += t.elapsed();
        }
        Ok((site_sums, module_sums))
    }
}

/// Solves groups of modules one after the other, counting them and their fallbacks.
struct Solving<'a, B: MergeArithmetic> {
    backend: &'a B,
    models: usize,
    observer: &'a dyn Observer,
    done: usize,
    fallbacks: Vec<(String, SolveOutcome)>,
}

impl<B: MergeArithmetic> Solving<'_, B> {
    /// Solves each module of `solved` from its sums, writes it, and keeps it `[in, out]` in
    /// `merged`.
    fn solve(
        &mut self,
        site_sums: &[B::SiteSums],
        solved: &[(usize, &LinearModule)],
        module_sums: &[B::ModuleSums],
        writer: &mut ModelWriter,
        timings: &mut Timings,
        merged: &mut HostParams,
    ) -> Result<()> {
        for ((si, m), sums) in solved.iter().zip(module_sums) {
            let t_layer = Instant::now();
            let (w, outcome) = self.backend.solve(&site_sums[*si], sums, self.models)?;
            let w = self.backend.solved_to_host(w)?;
            let how = describe(&outcome);
            self.done += 1;
            self.observer.event(Event::Solved {
                done: self.done,
                layer: &m.weight,
                how: &how,
                seconds: t_layer.elapsed().as_secs_f64(),
            });
            stop_point(self.observer)?;
            if outcome.is_fallback() {
                self.observer
                    .event(Event::Warning(format!("{}: {how}", m.weight)));
                self.fallbacks.push((m.weight.clone(), outcome));
            }
            // The solve gives [in, out]; nn.Linear stores [out, in].
            let stored = if m.transposed {
                transpose(&w, m.in_dim, m.out_dim)
            } else {
                w.clone()
            };
            write_timed(writer, &mut timings.writer_busy, &m.weight, &stored)?;
            merged.linear_in_out.insert(m.weight.clone(), w);
        }
        Ok(())
    }
}

/// Writes one merged tensor, counting the time spent writing.
fn write_timed(
    writer: &mut ModelWriter,
    busy: &mut Duration,
    name: &str,
    values: &[f32],
) -> Result<()> {
    let t = Instant::now();
    let r = write_finite(writer, name, values);
    *busy += t.elapsed();
    r
}

/// The means over the tasks of the parameters `names`, summed in task order (each task's
/// checkpoint opened once).
fn average<'a>(
    tasks: &[Task],
    names: impl Iterator<Item = &'a (String, Vec<usize>)>,
    k: f32,
) -> Result<Vec<(String, Vec<f32>)>> {
    let names: Vec<&String> = names.map(|(n, _)| n).collect();
    let mut sums: Vec<Vec<f32>> = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        let ckpt = Checkpoint::open(&t.dir)?;
        for (j, name) in names.iter().enumerate() {
            let v = ckpt.f32(name)?;
            match i {
                0 => sums.push(v),
                _ => add_assign(&mut sums[j], &v),
            }
        }
    }
    Ok(names
        .into_iter()
        .cloned()
        .zip(sums)
        .map(|(n, mut sum)| {
            sum.iter_mut().for_each(|v| *v /= k);
            (n, sum)
        })
        .collect())
}

/// Adds the base model's values of the parameters of `group` that keep them, so that
/// `merged` holds the whole part as the merged model will have it.
fn add_base_values(
    merged: &mut HostParams,
    base: &Checkpoint,
    model_cfg: &ModelConfig,
    group: ParamGroup,
    keeps_base: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let linear: BTreeMap<String, LinearModule> = model_cfg
        .sites()
        .into_iter()
        .flat_map(|s: Site| s.modules)
        .map(|m| (m.weight.clone(), m))
        .collect();
    for (name, _) in model_cfg.expected_shapes() {
        if model_cfg.group_of(&name) != group || !keeps_base(&name) {
            continue;
        }
        match linear.get(&name) {
            Some(m) => {
                merged.linear_in_out.insert(name, linear_in_out(base, m)?);
            }
            None => {
                let v = base.f32(&name)?;
                merged.tensors.insert(name, v);
            }
        }
    }
    Ok(())
}

/// The spill file of the activation caches, inside the staged output: a run killed with it
/// leaves it in its partial output, which the next run into that output sweeps away; it is
/// dropped before the output is committed.
const SPILL_FILE: &str = ".activations.spill";
