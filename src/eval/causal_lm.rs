//! Next-token loss and perplexity of a decoder LLM on held-out text or token data, as
//! transformers' `labels` loss computes it: every real token after the first is predicted
//! from the ones before, the cross-entropy averaged over all predicted tokens of a task
//! (padding never predicted nor counted); perplexity = exp(mean loss).

use std::path::Path;

use super::{EvalOptions, EvalTask, TaskProgress};
use crate::backend::Backend;
use crate::data::{for_each_batch, Dataset, TextPadding};
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::llama_config::LlamaConfig;
use crate::model::{Batch, ForwardHooks, Model, ModelConfig};
use crate::progress::Observer;

/// One task's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskLoss {
    pub task: String,
    pub sequences: usize,
    /// Tokens predicted (real tokens after the first of each sequence).
    pub tokens: u64,
    pub mean_loss: f64,
}

impl TaskLoss {
    pub fn perplexity(&self) -> f64 {
        self.mean_loss.exp()
    }
}

/// Rows scored per logits product: bounds the `[rows, vocab]` block in memory.
const LOGIT_ROWS: usize = 256;

/// Σ −log p(next token) over the predicted positions of a batch, and their number.
fn batch_loss<B: Backend>(
    backend: &B,
    head: &B::Tensor,
    hidden: &B::Tensor,
    batch: &Batch,
) -> Result<(f64, u64)> {
    let Batch::Tokens { ids, mask, seq, .. } = batch else {
        return Err(Error::invalid("a decoder LLM takes token ids"));
    };
    // Row r predicts token r + 1 of the same sequence, when both are real.
    let rows: Vec<usize> = (0..ids.len())
        .filter(|&r| (r + 1) % seq != 0 && mask[r] != 0 && mask[r + 1] != 0)
        .collect();
    let mut sum = 0.0f64;
    for chunk in rows.chunks(LOGIT_ROWS) {
        let x = backend.gather_rows(hidden, chunk)?;
        let logits = backend.download_owned(backend.linear(&x, head, None)?)?;
        let vocab = logits.len() / chunk.len();
        for (row, &r) in logits.chunks(vocab).zip(chunk) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            sum += lse - row[ids[r + 1] as usize] as f64;
        }
    }
    Ok((sum, rows.len() as u64))
}

/// Every task's data read and checked against the decoder in `model_dir` (its config, and
/// its tokenizer for text), before any forward pass. `merge --eval` checks against the base
/// model, whose config and tokenizer files the merged model gets.
fn read_tasks<'a>(
    model_dir: &Path,
    config: &LlamaConfig,
    tasks: &[EvalTask],
    opts: &EvalOptions,
    progress: &dyn Fn(usize) -> TaskProgress<'a>,
) -> Result<Vec<(Dataset, TextPadding)>> {
    tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            progress(i).reading(t);
            let data = Dataset::open_for_model(&t.data, &[model_dir], opts.max_length)?;
            let Dataset::Tokens { path, sequences } = &data else {
                return Err(Error::file(
                    &t.data,
                    "a decoder LLM needs text or token data (.jsonl), not images",
                ));
            };
            let padding = config.check_tokens(path, sequences, opts.max_length, false)?;
            Ok((data, padding))
        })
        .collect()
}

/// The decoder config of `model_dir`, checked against its weights.
fn decoder_config(ckpt: &Checkpoint, model_dir: &Path) -> Result<LlamaConfig> {
    let ModelConfig::Llama(config) = ModelConfig::from_checkpoint(ckpt)? else {
        return Err(Error::file(model_dir, "not a decoder LLM"));
    };
    ModelConfig::Llama(config.clone()).check_checkpoint(ckpt)?;
    Ok(config)
}

/// Checks every task's data as [`evaluate`] will read it, without running the model.
pub fn check_tasks(
    model_dir: &Path,
    tasks: &[EvalTask],
    opts: &EvalOptions,
    observer: &dyn Observer,
) -> Result<()> {
    let ckpt = Checkpoint::open(model_dir)?;
    let config = decoder_config(&ckpt, model_dir)?;
    let progress = |index| TaskProgress::of(index, tasks.len(), observer);
    read_tasks(model_dir, &config, tasks, opts, &progress).map(drop)
}

/// The mean next-token loss of the model in `model_dir` on every task's data, each task's
/// start and its sequences reported to `observer`.
pub fn evaluate<B: Backend>(
    backend: &B,
    model_dir: &Path,
    tasks: &[EvalTask],
    opts: &EvalOptions,
    observer: &dyn Observer,
) -> Result<Vec<TaskLoss>> {
    let ckpt = Checkpoint::open(model_dir)?;
    let config = decoder_config(&ckpt, model_dir)?;
    let progress = |index| TaskProgress::of(index, tasks.len(), observer);
    let data = read_tasks(model_dir, &config, tasks, opts, &progress)?;
    let Model::Llama(model) = Model::load(backend, &ckpt)? else {
        unreachable!("a decoder config loads a decoder model")
    };
    let head = model.load_lm_head(backend, &ckpt)?;
    let mut results = Vec::with_capacity(tasks.len());
    for (i, (task, (data, padding))) in tasks.iter().zip(data).enumerate() {
        let progress = progress(i);
        progress.start(task, data.len());
        let (mut sum, mut tokens, mut done) = (0.0f64, 0u64, 0usize);
        let indices: Vec<usize> = (0..data.len()).collect();
        for_each_batch(&data, &indices, opts.batch_size, padding, |chunk, batch| {
            let out = model.forward(backend, &batch, ForwardHooks::default())?;
            let (s, n) = batch_loss(backend, &head, &out.last_hidden, &batch)?;
            sum += s;
            tokens += n;
            done += chunk.len();
            progress.examples(done)
        })?;
        if tokens == 0 {
            return Err(Error::file(
                &task.data,
                "no sequence has two tokens: there is no next token to predict",
            ));
        }
        results.push(TaskLoss {
            task: task.name.clone(),
            sequences: data.len(),
            tokens,
            mean_loss: sum / tokens as f64,
        });
    }
    Ok(results)
}

/// `eval`'s table: one row per task, tokens predicted, mean loss and perplexity.
pub fn format_table(results: &[TaskLoss]) -> String {
    use std::fmt::Write as _;
    let width = results
        .iter()
        .map(|t| t.task.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut s = format!(
        "  {:<width$} {:>9} {:>10} {:>12}\n",
        "task", "tokens", "loss", "perplexity"
    );
    for t in results {
        let _ = writeln!(
            s,
            "  {:<width$} {:>9} {:>10.4} {:>12.3}",
            t.task,
            t.tokens,
            t.mean_loss,
            t.perplexity()
        );
    }
    s
}

/// `merge --eval`'s table: one row per task, then the unweighted mean over tasks; per
/// column (heading, results over the same tasks) the mean loss and the perplexity.
pub fn format_comparison(columns: &[(&str, &[TaskLoss])]) -> String {
    use std::fmt::Write as _;
    let Some((_, first)) = columns.first() else {
        return String::new();
    };
    let width = first.iter().map(|t| t.task.len()).max().unwrap_or(4).max(7);
    let mut s = format!("  {:<width$} {:>9}", "", "");
    for (h, _) in columns {
        let _ = write!(s, "  {h:>21.21}");
    }
    let _ = write!(s, "\n  {:<width$} {:>9}", "task", "tokens");
    for _ in columns {
        let _ = write!(s, "  {:>8} {:>12}", "loss", "perplexity");
    }
    s.push('\n');
    for (i, t) in first.iter().enumerate() {
        let _ = write!(s, "  {:<width$} {:>9}", t.task, t.tokens);
        for (_, r) in columns {
            let _ = write!(s, "  {:>8.4} {:>12.3}", r[i].mean_loss, r[i].perplexity());
        }
        s.push('\n');
    }
    let _ = write!(s, "  {:<width$} {:>9}", "average", "");
    for (_, r) in columns {
        let mean = r.iter().map(|t| t.mean_loss).sum::<f64>() / r.len().max(1) as f64;
        let _ = write!(s, "  {:>8.4} {:>12.3}", mean, mean.exp());
    }
    s.push('\n');
    s
}

pub fn to_json(results: &[TaskLoss]) -> serde_json::Value {
    let tasks: serde_json::Map<String, serde_json::Value> = results
        .iter()
        .map(|t| {
            (
                t.task.clone(),
                serde_json::json!({
                    "loss": t.mean_loss,
                    "perplexity": t.perplexity(),
                    "tokens": t.tokens,
                    "sequences": t.sequences,
                }),
            )
        })
        .collect();
    serde_json::json!({ "tasks": tasks })
}
