//! `eval`, and `merge --eval` / `--compare-average`: the evaluation's inputs checked before
//! the merge, then every task evaluated on the merged model (and on the simple average).

use std::path::Path;

use regmean_gpu::backend::{Backend, MergeArithmetic};
use regmean_gpu::config::MergeConfig;
use regmean_gpu::device::select_device;
use regmean_gpu::regmean::{self, MergeOptions};
use regmean_gpu::ui::{self, Ui};
use regmean_gpu::with_backend;
use regmean_gpu::{Error, Result};

use crate::{EvalArgs, MergeArgs};

pub fn eval_command(a: &EvalArgs, ui: &Ui) -> Result<()> {
    let gpu = select_device(&a.device.device, &a.model, ui)?;
    with_backend!(&gpu, a.precision, |backend| eval_on(&backend, a, ui))
}

pub fn eval_on<B: Backend>(backend: &B, a: &EvalArgs, ui: &Ui) -> Result<()> {
    use regmean_gpu::eval::request::{run_eval, EvalRequest};
    let req = EvalRequest {
        model: a.model.clone(),
        config: a.config.clone(),
        data: a.data.clone(),
        task: a.task.clone(),
        head: a.head.clone(),
        classes: a.classes.clone(),
        base: a.base.clone(),
        batch_size: a.batch_size,
        max_length: a.max_length,
    };
    let outcome = run_eval(backend, &req, ui)?;
    ui.clear();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome.to_json()).expect("json")
        );
    } else {
        print!("{}", outcome.table());
    }
    Ok(())
}

/// The tasks and options of `merge --eval`, each task's data checked.
pub fn eval_plan(
    cfg: &MergeConfig,
    a: &MergeArgs,
    ui: &Ui,
) -> Result<(
    Vec<regmean_gpu::eval::EvalTask>,
    regmean_gpu::eval::EvalOptions,
)> {
    use regmean_gpu::eval::{self, EvalOptions};
    let tasks = eval::tasks_from_config(cfg)?;
    if tasks.is_empty() {
        return Err(Error::invalid(format!(
            "--eval: no model entry of {} has `eval_data`",
            a.config.display()
        )));
    }
    let opts = EvalOptions {
        batch_size: cfg.parameters.batch_size,
        max_length: cfg.parameters.max_length,
        base: Some(cfg.base_model.clone()),
    };
    eval::request::check_model_tasks(&cfg.base_model, &tasks, &opts, ui)?;
    Ok((tasks, opts))
}

/// `merge --eval [--compare-average]`: the merged model's accuracy per task (a decoder's:
/// next-token loss and perplexity), and optionally that of the simple average of the same
/// models.
pub fn eval_after_merge<B: MergeArithmetic>(
    backend: &B,
    merge_opts: &MergeOptions,
    cfg: &MergeConfig,
    a: &MergeArgs,
    tasks: &[regmean_gpu::eval::EvalTask],
    opts: &regmean_gpu::eval::EvalOptions,
    ui: &Ui,
) -> Result<()> {
    use regmean_gpu::config::MergeMethod;
    use regmean_gpu::eval::request::{comparison_table, evaluate_model};
    ui.info(&format!(
        "evaluating the merged model on {}",
        ui::count(tasks.len(), "task")
    ));
    let merged = evaluate_model(backend, a.out(), tasks, opts, ui)?;
    ui.clear();
    let mut columns = vec![(cfg.merge_method.title(), merged)];
    if a.compare_average && cfg.merge_method != MergeMethod::SimpleAverage {
        let scratch = tempfile::Builder::new()
            .prefix(".regmean-average-")
            .tempdir_in(
                a.out()
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new(".")),
            )
            .map_err(|e| Error::io(a.out(), e))?;
        // Registered, so that an interrupt removes it too (and says so).
        let _registered = regmean_gpu::io::pending::register_scratch(
            scratch.path(),
            "the scratch folder of the simple-average comparison",
        );
        let avg_dir = scratch.path().join("average");
        let mut avg_cfg = cfg.clone();
        avg_cfg.merge_method = MergeMethod::SimpleAverage;
        ui.info("merging by simple averaging for comparison");
        let avg_opts = MergeOptions {
            out_shard_bytes: merge_opts.out_shard_bytes,
            ..MergeOptions::default()
        };
        regmean::merge(backend, &avg_cfg, &avg_dir, &avg_opts, ui)?;
        ui.clear();
        ui.info("evaluating the simple average");
        columns.push((
            MergeMethod::SimpleAverage.title(),
            evaluate_model(backend, &avg_dir, tasks, opts, ui)?,
        ));
        ui.clear();
    }
    let view: Vec<(&str, &_)> = columns.iter().map(|(h, r)| (*h, r)).collect();
    print!("{}", comparison_table(&view));
    Ok(())
}
