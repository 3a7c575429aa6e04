//! Next-token loss and perplexity of a decoder LLM on held-out text or token data, as
//! transformers' `labels` loss computes it: every real token after the first is predicted
//! from the ones before, the cross-entropy averaged over all predicted tokens of a task
//! (padding never predicted nor counted); perplexity = exp(mean loss).

use std::path::Path;

use super::{EvalOptions, EvalTask};
use crate::backend::Backend;
use crate::data::{for_each_batch, Dataset};
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::{Batch, ForwardHooks, Model, ModelConfig};

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

/// The mean next-token loss of the model in `model_dir` on every task's data.
pub fn evaluate<B: Backend>(
    backend: &B,
    model_dir: &Path,
    tasks: &[EvalTask],
    opts: &EvalOptions,
) -> Result<Vec<TaskLoss>> {
    let ckpt = Checkpoint::open(model_dir)?;
    let ModelConfig::Llama(config) = ModelConfig::from_checkpoint(&ckpt)? else {
        return Err(Error::file(model_dir, "not a decoder LLM"));
    };
    ModelConfig::Llama(config.clone()).check_checkpoint(&ckpt)?;
    // Every task's data is read and checked before the first forward pass.
    let data = tasks
        .iter()
        .map(|t| {
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
        .collect::<Result<Vec<_>>>()?;
    let Model::Llama(model) = Model::load(backend, &ckpt)? else {
        unreachable!("a decoder config loads a decoder model")
    };
    let head = model.load_lm_head(backend, &ckpt)?;
    let mut results = Vec::with_capacity(tasks.len());
    for (task, (data, padding)) in tasks.iter().zip(data) {
        let (mut sum, mut tokens) = (0.0f64, 0u64);
        let indices: Vec<usize> = (0..data.len()).collect();
        for_each_batch(&data, &indices, opts.batch_size, padding, |_, batch| {
            let out = model.forward(backend, &batch, ForwardHooks::default())?;
            let (s, n) = batch_loss(backend, &head, &out.last_hidden, &batch)?;
            sum += s;
            tokens += n;
            Ok(())
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
