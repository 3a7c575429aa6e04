//! An evaluation as the `eval` command and the Python package ask for it: a model, and
//! either a merge config (every entry with `eval_data`) or one task's data; the tasks are
//! checked before any is run, and the result is accuracy per task (GPT-2, CLIP) or the
//! next-token loss per task (decoder LLMs).

use std::path::{Path, PathBuf};

use super::causal_lm::{self, TaskLoss};
use super::ZeroShotTask;
use super::{check_tasks, evaluate, tasks_from_config, EvalOptions, EvalTask, TaskAccuracy};
use crate::backend::Backend;
use crate::config::MergeConfig;
use crate::error::{Error, Result};
use crate::progress::{Event, Observer};

/// What to evaluate, and on what.
#[derive(Clone, Debug, Default)]
pub struct EvalRequest {
    /// A GPT-2 backbone, a CLIP vision tower or a decoder LLM (e.g. a merge output).
    pub model: PathBuf,
    /// A merge config: every model entry with `eval_data` is a task.
    pub config: Option<PathBuf>,
    /// Or one task's labelled data.
    pub data: Option<PathBuf>,
    /// That task's name (CLIP: picks the built-in classes and templates).
    pub task: Option<String>,
    /// GPT-2: the task checkpoint whose `score` head is used.
    pub head: Option<PathBuf>,
    /// CLIP: a file with `classes` and `templates`.
    pub classes: Option<PathBuf>,
    /// CLIP: the base CLIPModel (default: the config's base_model).
    pub base: Option<PathBuf>,
    /// Default: the config's, else 32.
    pub batch_size: Option<usize>,
    /// Default: the config's, else 512.
    pub max_length: Option<usize>,
}

/// The result of an evaluation.
pub enum EvalOutcome {
    Accuracy(Vec<TaskAccuracy>),
    Loss(Vec<TaskLoss>),
}

impl EvalOutcome {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            EvalOutcome::Accuracy(r) => super::to_json(r),
            EvalOutcome::Loss(r) => causal_lm::to_json(r),
        }
    }

    /// The table the `eval` command prints.
    pub fn table(&self) -> String {
        match self {
            EvalOutcome::Accuracy(r) => super::format_table(&[("accuracy (%)", r)]),
            EvalOutcome::Loss(r) => causal_lm::format_table(r),
        }
    }
}

/// The tasks of `req`, and the options they run with.
fn plan(req: &EvalRequest) -> Result<(Vec<EvalTask>, EvalOptions)> {
    let cfg = req.config.as_deref().map(MergeConfig::load).transpose()?;
    let params = cfg
        .as_ref()
        .map(|c| c.parameters.clone())
        .unwrap_or_default();
    let tasks = match (&cfg, &req.data) {
        (Some(cfg), _) => tasks_from_config(cfg)?,
        (None, Some(data)) => vec![EvalTask {
            name: req.task.clone().unwrap_or_else(|| {
                data.file_stem()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "task".into())
            }),
            data: data.clone(),
            head: req.head.clone(),
            zero_shot: req
                .classes
                .as_deref()
                .map(ZeroShotTask::from_file)
                .transpose()?,
        }],
        (None, None) => {
            return Err(Error::invalid(
                "give --config (a merge config with eval_data per model) or --data",
            ))
        }
    };
    if tasks.is_empty() {
        return Err(Error::invalid(
            "no model entry of the config has `eval_data`: nothing to evaluate",
        ));
    }
    let opts = EvalOptions {
        batch_size: req.batch_size.unwrap_or(params.batch_size).max(1),
        max_length: req.max_length.unwrap_or(params.max_length).max(1),
        base: req
            .base
            .clone()
            .or_else(|| cfg.as_ref().map(|c| c.base_model.clone())),
    };
    Ok((tasks, opts))
}

/// Runs the evaluation `req` asks for on `backend`.
pub fn run_eval<B: Backend>(
    backend: &B,
    req: &EvalRequest,
    observer: &dyn Observer,
) -> Result<EvalOutcome> {
    let (tasks, opts) = plan(req)?;
    let model: &Path = &req.model;
    if !crate::model::llama_config::is_decoder_dir(model) {
        check_tasks(model, &tasks, &opts, observer)?;
    }
    let n = tasks.len();
    observer.event(Event::Note(format!(
        "evaluating {} on {n} task{}",
        model.display(),
        if n == 1 { "" } else { "s" }
    )));
    evaluate_model(backend, model, &tasks, &opts, observer)
}

/// Checks every task's data against the model in `model_dir` (`merge --eval` gives the base)
/// before anything runs: labels and heads for GPT-2 and CLIP, tokens for a decoder LLM.
pub fn check_model_tasks(
    model_dir: &Path,
    tasks: &[EvalTask],
    opts: &EvalOptions,
    observer: &dyn Observer,
) -> Result<()> {
    if crate::model::llama_config::is_decoder_dir(model_dir) {
        causal_lm::check_tasks(model_dir, tasks, opts, observer)
    } else {
        check_tasks(model_dir, tasks, opts, observer)
    }
}

/// Evaluates the model in `model_dir` on every task: accuracy for GPT-2 and CLIP, the
/// next-token loss for a decoder LLM (whose data is checked on the way).
pub fn evaluate_model<B: Backend>(
    backend: &B,
    model_dir: &Path,
    tasks: &[EvalTask],
    opts: &EvalOptions,
    observer: &dyn Observer,
) -> Result<EvalOutcome> {
    if crate::model::llama_config::is_decoder_dir(model_dir) {
        causal_lm::evaluate(backend, model_dir, tasks, opts, observer).map(EvalOutcome::Loss)
    } else {
        evaluate(backend, model_dir, tasks, opts, observer).map(EvalOutcome::Accuracy)
    }
}

/// `merge --eval`'s table of several models' outcomes over the same tasks (heading,
/// outcome): accuracy per task, or loss and perplexity per task.
pub fn comparison_table(columns: &[(&str, &EvalOutcome)]) -> String {
    let accuracy: Option<Vec<(&str, &[TaskAccuracy])>> = columns
        .iter()
        .map(|(h, o)| match o {
            EvalOutcome::Accuracy(r) => Some((*h, r.as_slice())),
            EvalOutcome::Loss(_) => None,
        })
        .collect();
    if let Some(view) = accuracy {
        return super::format_table(&view);
    }
    let loss: Vec<(&str, &[TaskLoss])> = columns
        .iter()
        .filter_map(|(h, o)| match o {
            EvalOutcome::Loss(r) => Some((*h, r.as_slice())),
            EvalOutcome::Accuracy(_) => None,
        })
        .collect();
    causal_lm::format_comparison(&loss)
}
