//! The whole merge, streaming over task models: each model is opened, its Grams computed
//! (or read), folded into running sums, and dropped before the next, so memory does not
//! grow with the number of models. Then every linear layer is solved, every other float
//! parameter averaged, and the result written as a transformers model directory: a second
//! thread writes each tensor into its planned place as soon as it is ready, while the
//! solve goes on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::card::ModelCard;
use super::gram::accumulate_grams;
use super::model_weights::ModelWeights;
use super::options::MergeOptions;
use super::output::{output_plan, write_merged, write_sidecars, Ready, WriteProgress};
use super::prefetch::{hold_for_tests, join_prepared, open_prepared};
use super::prepare::{open_data, Prepared};
use super::report::{describe, MergeReport, ModelReport, Timings};
use super::running::{Grams, RunningSums};
use super::stats::{self, GramFileInfo};
use crate::backend::{MergeArithmetic, LOWER_FORWARD, LOWER_SUMS};
use crate::config::{MergeConfig, ModelEntry, Schedule};
use crate::error::Result;
use crate::io::mapped::FileStamp;
use crate::io::writer::{ModelWriter, PlannedTensor};
use crate::model::{ModelConfig, Site};
use crate::progress::{stop_point, Event, Observer};

/// The merge one model at a time (`schedule: model`).
pub(super) fn merge_by_model<B: MergeArithmetic>(
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

    let mut sums = crate::profile::span("sums: allocate", || {
        RunningSums::new(backend, &model_cfg, &sites, &exclude, regmean)
    })
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
    let ahead = backend.reads_ahead();
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
                    // Each linear weight is made once, for the forward pass and the sums.
                    let weights = ModelWeights::new(&ckpt);
                    let grams = model_grams(
                        backend,
                        cfg,
                        &weights,
                        &model_cfg,
                        &sites,
                        entry,
                        index,
                        &mut model_load,
                        observer,
                    )
                    .map_err(|e| e.during(format!("the forward pass of {name}"), LOWER_FORWARD))?;
                    report.examples = grams.examples();
                    report.rows = grams.first_rows().unwrap_or(0);
                    peak_device = peak_device.max(grams.peak_device_bytes());
                    let t = Instant::now();
                    sums.add_regmean(backend, &weights, grams, ratio, diag_mult)
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
                stop_point(observer)?;
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
                let (w, outcome) = sums.solve(backend, done, m.site).map_err(|e| {
                    e.during(format!("the solve of {}", m.module.weight), LOWER_SUMS)
                })?;
                let seconds = started.elapsed().as_secs_f64();
                observer.event(Event::Solved {
                    done: done + 1,
                    layer: &m.module.weight,
                    how: &describe(&outcome),
                    seconds,
                });
                stop_point(observer)?;
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

#[allow(clippy::too_many_arguments)]
fn model_grams<B: MergeArithmetic>(
    backend: &B,
    cfg: &MergeConfig,
    weights: &ModelWeights<B>,
    model_cfg: &ModelConfig,
    sites: &[Site],
    entry: &ModelEntry,
    index: usize,
    load_time: &mut Duration,
    observer: &dyn Observer,
) -> Result<Grams<B>> {
    let name = entry.display_name();
    let ckpt = weights.checkpoint();
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
    backend.inject_test_fault(index)?;
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
    let (acc, examples) = accumulate_grams(
        backend,
        ckpt,
        weights,
        model_cfg,
        &data,
        &cfg.parameters,
        observer,
    )?;
    *load_time += acc.load_time;
    let acc = match acc.finish_on_backend(examples)? {
        Ok(on_backend) => return Ok(Grams::Backend(on_backend)),
        Err(acc) => acc,
    };
    crate::profile::span("grams: finish (host)", || acc.finish(examples)).map(Grams::Host)
}
