//! Accuracy of a (merged) model on labelled task data, as FusionBench measures it:
//! GPT-2 backbones with each task's classification head (`score`, pooled at the last
//! non-padding token), CLIP vision towers with zero-shot heads built by the base model's
//! text tower from class names and templates.

pub mod causal_lm;
pub mod request;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::Backend;
use crate::config::Parameters;
use crate::data::text::TextTokenizer;
use crate::data::{for_each_batch, open_labelled, Labelled, TextPadding};
use crate::error::{Error, Result};
use crate::io::{Arch, Checkpoint};
use crate::model::clip_text::ClipText;
use crate::model::gpt2::Gpt2Config;
use crate::model::{Batch, ForwardHooks, Model, ModelConfig};
use crate::progress::{Event, Observer};

/// Class names and prompt templates (`{}` stands for the class name) of a zero-shot task.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ZeroShotTask {
    pub classes: Vec<String>,
    pub templates: Vec<String>,
}

/// FusionBench's class names and templates (from open_clip) of its eight CLIP tasks.
const FUSIONBENCH_TASKS: &str = include_str!("fusionbench_tasks.json");

/// Names of the built-in zero-shot tasks.
pub const BUILTIN_TASKS: [&str; 8] = [
    "sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd",
];

impl ZeroShotTask {
    /// A built-in task by name: FusionBench's names, a Hugging Face repository name such as
    /// `tanganke/clip-vit-base-patch32_stanford-cars`, or a directory named like one.
    pub fn builtin(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        let last = lower
            .rsplit(['/', '_'])
            .next()
            .unwrap_or(&lower)
            .trim_start_matches("stanford-");
        let key = BUILTIN_TASKS.iter().find(|t| **t == last)?;
        let all: serde_json::Value =
            serde_json::from_str(FUSIONBENCH_TASKS).expect("embedded task table is valid JSON");
        serde_json::from_value(all[*key].clone()).ok()
    }

    /// A YAML or JSON file with `classes` and `templates`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let task: ZeroShotTask = serde_yaml::from_str(&text)
            .map_err(|e| Error::file(path, format!("expected `classes` and `templates`: {e}")))?;
        task.validate(path)?;
        Ok(task)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if self.classes.is_empty() || self.templates.is_empty() {
            return Err(Error::file(
                path,
                "`classes` and `templates` must not be empty",
            ));
        }
        if let Some(t) = self.templates.iter().find(|t| t.matches("{}").count() != 1) {
            return Err(Error::file(
                path,
                format!("template `{t}` must hold `{{}}` (the class name) exactly once"),
            ));
        }
        Ok(())
    }
}

/// One task's result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskAccuracy {
    pub task: String,
    pub correct: usize,
    pub n: usize,
    /// The predicted class of every example, in data order.
    #[serde(skip)]
    pub predictions: Vec<usize>,
    /// Logits `[n, classes]`, row-major.
    #[serde(skip)]
    pub logits: Vec<f32>,
}

impl TaskAccuracy {
    pub fn accuracy(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.correct as f64 / self.n as f64
        }
    }
}

/// What to evaluate on one task.
#[derive(Clone, Debug)]
pub struct EvalTask {
    pub name: String,
    /// Labelled data: JSON Lines with `label`, or an image folder with class sub-folders.
    pub data: PathBuf,
    /// GPT-2: the task's checkpoint, whose `score` head (and tokenizer) is used.
    pub head: Option<PathBuf>,
    /// CLIP: the zero-shot task (None: the built-in task named like `name`).
    pub zero_shot: Option<ZeroShotTask>,
}

/// Options shared by all tasks.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub batch_size: usize,
    pub max_length: usize,
    /// CLIP: the full `CLIPModel` that supplies the text tower, tokenizer, projections and
    /// logit scale (FusionBench's pretrained model).
    pub base: Option<PathBuf>,
}

fn argmax(row: &[f32]) -> usize {
    // The first maximum, as torch's argmax.
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// What the accuracy path says of a decoder LLM (`request::evaluate_model` and
/// `request::check_model_tasks` send decoders to `causal_lm` instead).
fn decoder_has_no_accuracy(model_dir: &Path) -> Error {
    Error::file(
        model_dir,
        "a decoder LLM is evaluated by its next-token loss, not accuracy",
    )
}

/// Where an evaluation reports: which task of how many, for [`Event::EvalStart`].
struct TaskProgress<'a> {
    index: usize,
    total: usize,
    observer: &'a dyn Observer,
}

impl<'a> TaskProgress<'a> {
    /// Task `index` of `total`.
    fn of(index: usize, total: usize, observer: &'a dyn Observer) -> Self {
        TaskProgress {
            index,
            total,
            observer,
        }
    }

    /// The task's data is being read (tokenising a large set takes seconds).
    fn reading(&self, task: &EvalTask) {
        self.observer.event(Event::EvalCheck {
            index: self.index,
            total: self.total,
            name: &task.name,
        });
    }

    fn start(&self, task: &EvalTask, examples: usize) {
        self.observer.event(Event::EvalStart {
            index: self.index,
            total: self.total,
            name: &task.name,
            examples,
        });
    }

    /// `done` examples are through; `Err(Interrupted)` when the caller asked to stop.
    fn examples(&self, done: usize) -> Result<()> {
        self.observer.event(Event::Examples { done });
        crate::progress::stop_point(self.observer)
    }
}

/// Evaluates the model in `model_dir` (a GPT-2 backbone or a CLIP vision tower) on every
/// task, reporting each task's start and its examples to `observer`.
pub fn evaluate<B: Backend>(
    backend: &B,
    model_dir: &Path,
    tasks: &[EvalTask],
    opts: &EvalOptions,
    observer: &dyn Observer,
) -> Result<Vec<TaskAccuracy>> {
    let ckpt = Checkpoint::open(model_dir)?;
    let config = ModelConfig::from_checkpoint(&ckpt)?;
    config.check_checkpoint(&ckpt)?;
    let model = Model::load(backend, &ckpt)?;
    let progress = |index| TaskProgress::of(index, tasks.len(), observer);
    match ckpt.arch() {
        Arch::Gpt2 => tasks
            .iter()
            .enumerate()
            .map(|(i, t)| eval_gpt2(backend, &model, &config, model_dir, t, opts, &progress(i)))
            .collect(),
        Arch::ClipVision => {
            let base_dir = clip_base(opts)?;
            let zs = ZeroShot::load(backend, base_dir)?;
            tasks
                .iter()
                .enumerate()
                .map(|(i, t)| zs.evaluate(backend, &model, model_dir, t, opts, &progress(i)))
                .collect()
        }
        Arch::CausalLm(_) => Err(decoder_has_no_accuracy(model_dir)),
    }
}

/// CLIP's base `CLIPModel`, which evaluation needs for the text tower.
fn clip_base(opts: &EvalOptions) -> Result<&Path> {
    opts.base.as_deref().ok_or_else(|| {
        Error::invalid(
            "CLIP evaluation needs the base CLIPModel (text tower and projections): give --base (or base_model in the config)",
        )
    })
}

/// A GPT-2 task checkpoint with its `score` head, and the head's [num_labels, d] shape.
fn score_head(head_dir: &Path) -> Result<(Checkpoint, usize, usize)> {
    let head_ckpt = Checkpoint::open_all(head_dir)?;
    let shape = head_ckpt
        .entry("score.weight")
        .map_err(|_| {
            Error::file(
                head_dir,
                "no `score.weight`: not a GPT2ForSequenceClassification checkpoint",
            )
        })?
        .shape
        .clone();
    let [num_labels, d] = shape[..] else {
        return Err(Error::file(
            head_dir,
            format!("`score.weight` has shape {shape:?}, expected [num_labels, d]"),
        ));
    };
    Ok((head_ckpt, num_labels, d))
}

fn labels_within(task: &EvalTask, labels: &[usize], num_labels: usize) -> Result<()> {
    match labels.iter().find(|&&l| l >= num_labels) {
        Some(l) => Err(Error::file(
            &task.data,
            format!("label {l} is out of range for the head's {num_labels} labels"),
        )),
        None => Ok(()),
    }
}

/// A GPT-2 task's own checkpoint, which holds its `score` head.
fn gpt2_head(task: &EvalTask) -> Result<&Path> {
    task.head.as_deref().ok_or_else(|| {
        Error::invalid(format!(
            "task `{}`: GPT-2 evaluation needs the task's checkpoint for its `score` head",
            task.name
        ))
    })
}

/// Parameters that check text data against a model and give its padding rule.
fn data_params(opts: &EvalOptions) -> Parameters {
    Parameters {
        max_length: opts.max_length,
        batch_size: opts.batch_size,
        ..Parameters::default()
    }
}

fn labels_of<'a>(l: &'a Labelled, task: &EvalTask) -> Result<&'a [usize]> {
    l.labels.as_deref().ok_or_else(|| {
        Error::file(
            &task.data,
            "evaluation needs a label for every example (`label` in each JSON line, or class sub-folders)",
        )
    })
}

fn eval_gpt2<B: Backend>(
    backend: &B,
    model: &Model<B>,
    config: &ModelConfig,
    model_dir: &Path,
    task: &EvalTask,
    opts: &EvalOptions,
    progress: &TaskProgress<'_>,
) -> Result<TaskAccuracy> {
    progress.reading(task);
    let head_dir = gpt2_head(task)?;
    let ModelConfig::Gpt2(gpt2) = config else {
        unreachable!("called for GPT-2 only")
    };
    let (head_ckpt, num_labels, hd) = score_head(head_dir)?;
    let head_path = head_ckpt.dir().join("config.json");
    let head_cfg = Gpt2Config::from_json(head_ckpt.config(), &head_path)?;
    let d = gpt2.n_embd;
    if hd != d || num_labels == 0 {
        return Err(Error::file(
            head_dir,
            format!("`score.weight` is [{num_labels}, {hd}], the backbone has d = {d}"),
        ));
    }
    let score = head_ckpt.f32_shaped("score.weight", &[num_labels, d])?;
    let labelled = open_labelled(&task.data, &[head_dir, model_dir], opts.max_length)?;
    let labels = labels_of(&labelled, task)?;
    labels_within(task, labels, num_labels)?;
    let padding = crate::regmean::gram::check_data(config, &labelled.data, &data_params(opts))?;
    // transformers pools with the classifier's own pad id.
    let pad = head_cfg.pad_token_id;
    let padding = TextPadding {
        pad_id: pad,
        ..padding
    };
    let indices: Vec<usize> = (0..labelled.data.len()).collect();
    let mut logits = Vec::with_capacity(indices.len() * num_labels);
    progress.start(task, indices.len());
    let mut done = 0;
    for_each_batch(
        &labelled.data,
        &indices,
        opts.batch_size,
        padding,
        |chunk, batch| {
            let out = model.forward(backend, &batch, ForwardHooks::default())?;
            let hidden = backend.download(&out.last_hidden)?;
            for h in last_token_states(&batch, &hidden, d, pad) {
                for k in 0..num_labels {
                    let w = &score[k * d..(k + 1) * d];
                    logits.push(h.iter().zip(w).map(|(a, b)| a * b).sum());
                }
            }
            done += chunk.len();
            progress.examples(done)
        },
    )?;
    Ok(finish(task, labels, logits, num_labels))
}

/// Each sequence's hidden state at its last non-padding token, which sequence classification
/// pools (transformers: argmax over positions of position · (id ≠ pad), the first maximum).
/// `hidden` is the batch's last hidden state `[batch·seq, d]`.
pub fn last_token_states<'a>(
    batch: &'a Batch,
    hidden: &'a [f32],
    d: usize,
    pad: u32,
) -> impl Iterator<Item = &'a [f32]> + 'a {
    let Batch::Tokens { ids, seq, .. } = batch else {
        unreachable!("text batches")
    };
    let seq = *seq;
    ids.chunks(seq.max(1)).enumerate().map(move |(b, row)| {
        let last = (0..seq).rev().find(|&p| row[p] != pad).unwrap_or(0);
        &hidden[(b * seq + last) * d..(b * seq + last + 1) * d]
    })
}

fn finish(task: &EvalTask, labels: &[usize], logits: Vec<f32>, classes: usize) -> TaskAccuracy {
    let predictions: Vec<usize> = logits.chunks(classes).map(argmax).collect();
    let correct = predictions
        .iter()
        .zip(labels)
        .filter(|(p, l)| p == l)
        .count();
    TaskAccuracy {
        task: task.name.clone(),
        correct,
        n: labels.len(),
        predictions,
        logits,
    }
}

/// The base CLIPModel's parts that zero-shot classification needs.
pub struct ZeroShot<B: Backend> {
    text: ClipText<B>,
    tokenizer: TextTokenizer,
    /// `visual_projection` as `[d_vision, proj]`.
    visual_projection: B::Tensor,
    vision_dim: usize,
    base_dir: PathBuf,
}

impl<B: Backend> ZeroShot<B> {
    pub fn load(backend: &B, base_dir: &Path) -> Result<Self> {
        let ckpt = Checkpoint::open_all(base_dir)?;
        let text = ClipText::load(backend, &ckpt)?;
        let vision = crate::model::clip::ClipVisionConfig::from_json(
            ckpt.config(),
            &base_dir.join("config.json"),
        )?;
        let (d, p) = (vision.hidden_size, text.config.projection_dim);
        let w = ckpt.f32_shaped("visual_projection.weight", &[p, d])?;
        Ok(ZeroShot {
            visual_projection: backend.upload(&crate::model::transpose(&w, p, d), d, p)?,
            tokenizer: TextTokenizer::from_model_dir(base_dir, None)?,
            text,
            vision_dim: d,
            base_dir: base_dir.to_path_buf(),
        })
    }

    /// Text features (`get_text_features`) of some texts, `[n, proj]`.
    pub fn text_features(&self, backend: &B, texts: &[String]) -> Result<(Vec<f32>, Vec<f32>)> {
        let seqs = texts
            .iter()
            .map(|t| self.tokenizer.encode(t, None))
            .collect::<Result<Vec<_>>>()?;
        let seq = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let pad = self.text.config.eos_token_id;
        let mut ids = vec![pad; seqs.len() * seq];
        let mut mask = vec![0u8; seqs.len() * seq];
        for (b, s) in seqs.iter().enumerate() {
            ids[b * seq..b * seq + s.len()].copy_from_slice(s);
            mask[b * seq..b * seq + s.len()].fill(1);
        }
        let out = self.text.forward(backend, &ids, &mask, seqs.len(), seq)?;
        Ok((out.pooled, out.embeds))
    }

    /// The zero-shot head `[classes, proj]`: per class, every template's text features
    /// normalised, averaged and normalised again (FusionBench / open_clip).
    pub fn head(&self, backend: &B, task: &ZeroShotTask) -> Result<Vec<f32>> {
        let p = self.text.config.projection_dim;
        let mut head = Vec::with_capacity(task.classes.len() * p);
        for class in &task.classes {
            let texts: Vec<String> = task
                .templates
                .iter()
                .map(|t| t.replacen("{}", class, 1))
                .collect();
            let (_, embeds) = self.text_features(backend, &texts)?;
            let mut mean = vec![0f32; p];
            for e in embeds.chunks(p) {
                let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
                for (m, x) in mean.iter_mut().zip(e) {
                    *m += x / norm;
                }
            }
            for m in &mut mean {
                *m /= texts.len() as f32;
            }
            let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
            head.extend(mean.iter().map(|m| m / norm));
        }
        Ok(head)
    }

    /// Zero-shot logits `[n, classes]` of every image of a data set, in order; `done` is told
    /// how many images are through after each batch.
    pub fn logits(
        &self,
        backend: &B,
        model: &Model<B>,
        data: &crate::data::Dataset,
        head: &[f32],
        batch_size: usize,
        done: &mut dyn FnMut(usize) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let p = self.text.config.projection_dim;
        let classes = head.len() / p;
        let scale = self.text.logit_scale.exp();
        let padding = TextPadding {
            pad_id: 0,
            max_length: 0,
            to_max_length: false,
        };
        let indices: Vec<usize> = (0..data.len()).collect();
        let mut logits = Vec::with_capacity(indices.len() * classes);
        let mut seen = 0;
        for_each_batch(data, &indices, batch_size, padding, |chunk, batch| {
            let out = model.forward(backend, &batch, ForwardHooks::default())?;
            let pooled = out.pooled.expect("the vision tower pools");
            if backend.shape(&pooled).1 != self.vision_dim {
                return Err(Error::invalid(format!(
                    "the vision tower's width {} differs from the base model's {}",
                    backend.shape(&pooled).1,
                    self.vision_dim
                )));
            }
            let embeds =
                backend.download(&backend.linear(&pooled, &self.visual_projection, None)?)?;
            for e in embeds.chunks(p) {
                let norm = e.iter().map(|x| x * x).sum::<f32>().sqrt();
                for k in 0..classes {
                    let w = &head[k * p..(k + 1) * p];
                    let cos: f32 = e.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() / norm;
                    logits.push(scale * cos);
                }
            }
            seen += chunk.len();
            done(seen)
        })?;
        Ok(logits)
    }

    fn evaluate(
        &self,
        backend: &B,
        model: &Model<B>,
        model_dir: &Path,
        task: &EvalTask,
        opts: &EvalOptions,
        progress: &TaskProgress<'_>,
    ) -> Result<TaskAccuracy> {
        progress.reading(task);
        let spec = zero_shot_spec(task)?;
        let labelled = open_labelled(&task.data, &[model_dir, &self.base_dir], opts.max_length)?;
        let Model::Clip(vision) = model else {
            unreachable!("a CLIP vision model")
        };
        crate::regmean::gram::check_data(
            &ModelConfig::Clip(vision.config.clone()),
            &labelled.data,
            &data_params(opts),
        )?;
        let folder_labels = labels_of(&labelled, task)?;
        let labels = class_labels(&labelled.classes, folder_labels, &spec, &task.data)?;
        progress.start(task, labelled.data.len());
        let head = self.head(backend, &spec)?;
        let logits = self.logits(
            backend,
            model,
            &labelled.data,
            &head,
            opts.batch_size,
            &mut |done| progress.examples(done),
        )?;
        Ok(finish(task, &labels, logits, spec.classes.len()))
    }
}

/// A CLIP task's class names and templates: its own, else the built-in task of its name.
fn zero_shot_spec(task: &EvalTask) -> Result<ZeroShotTask> {
    match &task.zero_shot {
        Some(s) => Ok(s.clone()),
        None => ZeroShotTask::builtin(&task.name).ok_or_else(|| {
            Error::invalid(format!(
                "task `{}` has no built-in class names ({}): give a classes file with `classes` and `templates`",
                task.name,
                BUILTIN_TASKS.join(", ")
            ))
        }),
    }
}

/// Checks every task's inputs before any is evaluated: its data opens (text tokenised, images
/// listed, with the files [`evaluate`] will use) with a label per example, a GPT-2 task has a
/// `score` head with room for every label, and a CLIP task has the base model and class
/// names that fit its class folders. A wrong path in the last task then fails at once.
/// `model_dir` is the model to evaluate; `merge --eval`, which checks before the merged model
/// exists, gives the base, whose tokenizer and preprocessor files the merged model gets.
/// Each task's turn is reported to `observer` (reading a large evaluation set takes seconds).
pub fn check_tasks(
    model_dir: &Path,
    tasks: &[EvalTask],
    opts: &EvalOptions,
    observer: &dyn Observer,
) -> Result<()> {
    let arch = Checkpoint::open(model_dir)?.arch();
    for (index, task) in tasks.iter().enumerate() {
        observer.event(Event::EvalCheck {
            index,
            total: tasks.len(),
            name: &task.name,
        });
        // Where evaluation reads tokenizer.json / preprocessor_config.json from.
        let dirs = match arch {
            Arch::Gpt2 => [gpt2_head(task)?, model_dir],
            Arch::ClipVision => [model_dir, clip_base(opts)?],
            Arch::CausalLm(_) => return Err(decoder_has_no_accuracy(model_dir)),
        };
        let labelled = open_labelled(&task.data, &dirs, opts.max_length)?;
        let labels = labels_of(&labelled, task)?;
        if arch == Arch::Gpt2 {
            let (_, num_labels, _) = score_head(gpt2_head(task)?)?;
            labels_within(task, labels, num_labels)?;
        }
        if arch == Arch::ClipVision {
            class_labels(
                &labelled.classes,
                labels,
                &zero_shot_spec(task)?,
                &task.data,
            )?;
        }
    }
    Ok(())
}

/// Maps folder labels onto the task's class order: by name when every sub-folder is named
/// after a class (case and `_`/space aside), else by position (sorted folder i = class i).
fn class_labels(
    folders: &[String],
    labels: &[usize],
    spec: &ZeroShotTask,
    root: &Path,
) -> Result<Vec<usize>> {
    let norm = |s: &str| s.to_lowercase().replace('_', " ");
    let by_name: Option<Vec<usize>> = folders
        .iter()
        .map(|f| spec.classes.iter().position(|c| norm(c) == norm(f)))
        .collect();
    if let Some(map) = by_name {
        return Ok(labels.iter().map(|&l| map[l]).collect());
    }
    if folders.len() != spec.classes.len() {
        return Err(Error::file(
            root,
            format!(
                "{} class sub-folders for {} classes: name the folders after the classes, or give one folder per class in class order",
                folders.len(),
                spec.classes.len()
            ),
        ));
    }
    Ok(labels.to_vec())
}

/// FusionBench-style table: one row per task, accuracy in percent, then the average.
/// `columns` are (heading, results) pairs over the same tasks.
pub fn format_table(columns: &[(&str, &[TaskAccuracy])]) -> String {
    use std::fmt::Write as _;
    let Some((_, first)) = columns.first() else {
        return String::new();
    };
    let width = first.iter().map(|t| t.task.len()).max().unwrap_or(4).max(7);
    let mut s = format!("  {:<width$} {:>6}", "task", "n");
    for (h, _) in columns {
        let _ = write!(s, "  {h:>14}");
    }
    s.push('\n');
    for (i, t) in first.iter().enumerate() {
        let _ = write!(s, "  {:<width$} {:>6}", t.task, t.n);
        for (_, r) in columns {
            let _ = write!(s, "  {:>14.2}", 100.0 * r[i].accuracy());
        }
        s.push('\n');
    }
    let _ = write!(s, "  {:<width$} {:>6}", "average", "");
    for (_, r) in columns {
        let _ = write!(s, "  {:>14.2}", 100.0 * average(r));
    }
    s.push('\n');
    s
}

/// The unweighted mean accuracy over tasks (FusionBench's average).
pub fn average(results: &[TaskAccuracy]) -> f64 {
    if results.is_empty() {
        return 0.0;
    }
    results.iter().map(TaskAccuracy::accuracy).sum::<f64>() / results.len() as f64
}

/// `--json`: per task `accuracy` (a fraction) and `n`, and the average.
pub fn to_json(results: &[TaskAccuracy]) -> serde_json::Value {
    let tasks: serde_json::Map<String, serde_json::Value> = results
        .iter()
        .map(|t| {
            (
                t.task.clone(),
                serde_json::json!({"accuracy": t.accuracy(), "n": t.n, "correct": t.correct}),
            )
        })
        .collect();
    serde_json::json!({"tasks": tasks, "average_accuracy": average(results)})
}

/// The tasks of a merge config: every model entry with `eval_data`.
pub fn tasks_from_config(cfg: &crate::config::MergeConfig) -> Result<Vec<EvalTask>> {
    cfg.models
        .iter()
        .filter_map(|m| {
            let data = m.eval_data.clone()?;
            Some((|| {
                Ok(EvalTask {
                    name: m.display_name(),
                    data,
                    head: Some(m.model.clone()),
                    zero_shot: m
                        .classes
                        .as_deref()
                        .map(ZeroShotTask::from_file)
                        .transpose()?,
                })
            })())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_tasks_resolve_fusionbench_and_hub_names() {
        let sun = ZeroShotTask::builtin("sun397").unwrap();
        assert_eq!(sun.classes.len(), 397);
        assert_eq!(sun.templates, ["a photo of a {}.", "a photo of the {}."]);
        let cars = ZeroShotTask::builtin("tanganke/clip-vit-base-patch32_stanford-cars").unwrap();
        assert_eq!(cars.classes.len(), 196);
        assert_eq!(ZeroShotTask::builtin("stanford_cars").unwrap(), cars);
        for (name, n) in [
            ("resisc45", 45),
            ("eurosat", 10),
            ("svhn", 10),
            ("gtsrb", 43),
            ("MNIST", 10),
            ("dtd", 47),
        ] {
            let t = ZeroShotTask::builtin(name).unwrap();
            assert_eq!(t.classes.len(), n, "{name}");
            t.validate(Path::new(name)).unwrap();
        }
        assert!(ZeroShotTask::builtin("imagenet").is_none());
    }

    #[test]
    fn folder_labels_map_by_class_name_else_by_position() {
        let spec = ZeroShotTask {
            classes: vec!["cat".into(), "dog".into(), "red bird".into()],
            templates: vec!["{}".into()],
        };
        let folders = vec!["Red_bird".into(), "cat".into(), "dog".into()];
        let map = class_labels(&folders, &[0, 1, 2], &spec, Path::new("x")).unwrap();
        assert_eq!(map, [2, 0, 1]);
        let folders = vec!["000".into(), "001".into(), "002".into()];
        assert_eq!(
            class_labels(&folders, &[2, 0], &spec, Path::new("x")).unwrap(),
            [2, 0]
        );
        let e = class_labels(&folders[..2], &[0], &spec, Path::new("x")).unwrap_err();
        assert!(
            e.to_string().contains("2 class sub-folders for 3 classes"),
            "{e}"
        );
    }
}
