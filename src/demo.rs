//! The built-in default job (`regmean-gpu demo`), synthetic pools for benchmarks
//! (`regmean-gpu synth`), and `regmean-gpu forward`.
//!
//! The demo pool is a small random GPT-2 whose task models differ from the base only on
//! task-specific input subspaces: each task has its own tokens, and every linear layer of
//! task t is changed only along the directions in which task t's inputs carry more energy
//! than the other tasks' (top eigenvectors of Gₜ − mean of the other G). Averaging dilutes
//! each task's change K-fold; RegMean, which weighs each model by its own Gram, recovers
//! most of it. The demo measures exactly that on held-out task data: how far the merged
//! models' outputs are from each task model's, and the accuracy of each task's
//! classification head on them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use faer::{Mat, Side};

use crate::backend::{Backend, CpuBackend};
use crate::config::{MergeConfig, MergeMethod, Parameters};
use crate::data::{for_each_batch, Dataset, SplitMix64};
use crate::error::{Error, Result};
use crate::io::safetensors::{write_file, OutTensor, TensorData};
use crate::io::writer::write_model_tensors;
use crate::io::{Checkpoint, Dtype};
use crate::model::{Batch, ForwardHooks, Model, ModelConfig};
use crate::progress::Observer;
use crate::regmean::gram::{batch_of, check_data, compute_grams};
use crate::regmean::{merge, MergeOptions};

/// An observer that can also print plain lines.
pub trait Say: Observer {
    fn say(&self, msg: &str);
}

/// Normal random numbers from a seeded SplitMix64 (Box–Muller).
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64(seed))
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next()
    }

    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }

    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    pub fn normals(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }
}

/// A plausible random initialisation of one backbone tensor, by its role.
fn init_tensor(name: &str, shape: &[usize], gpt2: bool, rng: &mut Rng) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    if name.ends_with("class_embedding") {
        return rng.normals(n, 0.5);
    }
    if name.contains("wte") {
        return rng.normals(n, 0.5);
    }
    if name.contains("wpe") || name.contains("position_embedding") {
        return rng.normals(n, 0.1);
    }
    match shape.len() {
        1 if leaf == "weight" => rng.normals(n, 0.05).into_iter().map(|v| 1.0 + v).collect(),
        1 => rng.normals(n, 0.02),
        2 => {
            let fan_in = if gpt2 { shape[0] } else { shape[1] };
            rng.normals(n, 1.0 / (fan_in as f32).sqrt())
        }
        _ => {
            let fan_in: usize = shape[1..].iter().product();
            rng.normals(n, 1.0 / (fan_in as f32).sqrt())
        }
    }
}

/// Writes a model directory (config.json + safetensors) from f32 tensors.
pub fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let out: Vec<OutTensor<'_>> = tensors
        .iter()
        .map(|(name, (shape, data))| OutTensor {
            name: name.clone(),
            dtype: Dtype::F32,
            shape: shape.clone(),
            data: TensorData::F32(data),
        })
        .collect();
    write_model_tensors(dir, &out, 5_000_000_000)?;
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string_pretty(config).expect("json"))
        .map_err(|e| Error::io(&p, e))
}

fn random_model(cfg: &ModelConfig, rng: &mut Rng) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let gpt2 = matches!(cfg, ModelConfig::Gpt2(_));
    cfg.expected_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let v = init_tensor(&name, &shape, gpt2, rng);
            (name, (shape, v))
        })
        .collect()
}

/// Token-id examples as JSON Lines, each with its label when there are labels.
fn write_jsonl(path: &Path, seqs: &[Vec<u32>], labels: Option<&[usize]>) -> Result<()> {
    let text: String = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let line = match labels {
                Some(l) => serde_json::json!({ "input_ids": s, "label": l[i] }),
                None => serde_json::json!({ "input_ids": s }),
            };
            format!("{line}\n")
        })
        .collect();
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

const DEMO_TASKS: usize = 4;
const DEMO_TOKENS_PER_TASK: usize = 120;
const DEMO_WIDTH: usize = 64;
/// Examples per task: for the Grams, and held out for the comparisons.
const DEMO_EXAMPLES: usize = 128;
const DEMO_HELD_OUT: usize = 128;
/// The examples of one forward pass, in the demo and in its merge config.
const DEMO_BATCH: usize = 32;

fn demo_gpt2_config() -> serde_json::Value {
    serde_json::json!({
        "model_type": "gpt2", "architectures": ["GPT2Model"], "vocab_size": 512, "n_positions": 64,
        "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 256, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "bos_token_id": 511, "eos_token_id": 511, "pad_token_id": 511,
        "torch_dtype": "float32"
    })
}

fn task_sequences(task: usize, count: usize, rng: &mut Rng) -> Vec<Vec<u32>> {
    (0..count)
        .map(|_| {
            let len = 8 + rng.below(25);
            (0..len)
                .map(|_| (task * DEMO_TOKENS_PER_TASK + rng.below(DEMO_TOKENS_PER_TASK)) as u32)
                .collect()
        })
        .collect()
}

/// Builds the demo pool in `dir`: base/, task_i/, data/, merge.yaml.
pub fn build_demo_pool(dir: &Path) -> Result<PathBuf> {
    let mut rng = Rng::new(2023);
    let config = demo_gpt2_config();
    let base_dir = dir.join("base");
    let cfg = crate::model::gpt2::Gpt2Config::from_json(&config, &base_dir)?;
    let model_cfg = ModelConfig::Gpt2(cfg);
    let mut base = random_model(&model_cfg, &mut rng);
    // Each task's tokens embed mostly in a block of dimensions of its own, so tasks excite
    // different input directions throughout the network.
    let (_, wte) = base.get_mut("wte.weight").expect("wte");
    let (d, block) = (DEMO_WIDTH, DEMO_WIDTH / DEMO_TASKS);
    for (tok, row) in wte.chunks_mut(d).enumerate() {
        let task = tok / DEMO_TOKENS_PER_TASK;
        for (i, v) in row.iter_mut().enumerate() {
            let own = task < DEMO_TASKS && i / block == task;
            *v = rng.normal() * if own { 1.0 } else { 0.05 };
        }
    }
    write_checkpoint(&base_dir, &config, &base)?;
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(&data_dir, e))?;
    let mut held_out = Vec::with_capacity(DEMO_TASKS);
    for t in 0..DEMO_TASKS {
        write_jsonl(
            &data_dir.join(format!("task_{t}.jsonl")),
            &task_sequences(t, DEMO_EXAMPLES, &mut rng),
            None,
        )?;
        held_out.push(task_sequences(t, DEMO_HELD_OUT, &mut rng));
    }

    // The base model's Grams on each task's data locate each task's input subspaces.
    let params = Parameters {
        num_regmean_examples: DEMO_EXAMPLES,
        batch_size: DEMO_BATCH,
        shuffle: false,
        ..Parameters::default()
    };
    let base_ckpt = Checkpoint::open(&base_dir)?;
    let grams: Vec<_> = (0..DEMO_TASKS)
        .map(|t| {
            let data = Dataset::open(&data_dir.join(format!("task_{t}.jsonl")))?;
            compute_grams(
                &CpuBackend,
                &base_ckpt,
                &model_cfg,
                &data,
                &params,
                &crate::progress::Silent,
            )
        })
        .collect::<Result<_>>()?;
    let sites = model_cfg.sites();
    for t in 0..DEMO_TASKS {
        let mut task = base.clone();
        for (si, site) in sites.iter().enumerate() {
            let d = site.dim;
            let others = (DEMO_TASKS - 1) as f64;
            let contrast = Mat::<f64>::from_fn(d, d, |i, j| {
                let own = grams[t].sites[si].gram[i * d + j] as f64;
                let rest: f64 = (0..DEMO_TASKS)
                    .filter(|&s| s != t)
                    .map(|s| grams[s].sites[si].gram[i * d + j] as f64)
                    .sum();
                own - rest / others
            });
            let (u, order) = eigen_descending(&contrast)?;
            let rank = d / 8;
            for m in &site.modules {
                let (_, w) = task.get_mut(&m.weight).expect("backbone weight");
                // Δ = U Uᵀ N: a random change that only inputs in the task's subspace see.
                let noise = rng.normals(d * m.out_dim, 1.5 / (d as f32).sqrt());
                for &k in &order[..rank] {
                    let proj: Vec<f64> = (0..m.out_dim)
                        .map(|o| {
                            (0..d)
                                .map(|i| u[(i, k)] * noise[i * m.out_dim + o] as f64)
                                .sum()
                        })
                        .collect();
                    for i in 0..d {
                        for (o, p) in proj.iter().enumerate() {
                            w[i * m.out_dim + o] += (u[(i, k)] * p) as f32;
                        }
                    }
                }
            }
        }
        let task_dir = dir.join(format!("task_{t}"));
        write_checkpoint(&task_dir, &config, &task)?;
        make_classifier(
            &task_dir,
            &base_dir,
            &data_dir,
            t,
            &config,
            task,
            &held_out[t],
        )?;
    }
    let models: String = (0..DEMO_TASKS)
        .map(|t| {
            format!(
                "  - model: ./task_{t}\n    data: ./data/task_{t}.jsonl\n    eval_data: ./data/task_{t}.eval.jsonl\n"
            )
        })
        .collect();
    let yaml = format!(
        "# A synthetic pool built by `regmean-gpu demo --keep`: merge it, and compare the\n# accuracy of its task heads on the merge and on the simple average, with\n#   regmean-gpu merge merge.yaml merged --eval --compare-average\nmerge_method: regmean\nbase_model: ./base\nmodels:\n{models}parameters:\n  num_regmean_examples: {DEMO_EXAMPLES}\n  batch_size: {DEMO_BATCH}\n  reduce_non_diagonal_ratio: 0.9\n  exclude_param_names_regex: []\n  fusionbench_compat: false\n  max_length: 64\n  seed: 0\n  shuffle: true\nout_dtype: float32\n"
    );
    let cfg_path = dir.join("merge.yaml");
    std::fs::write(&cfg_path, yaml).map_err(|e| Error::io(&cfg_path, e))?;
    Ok(cfg_path)
}

/// Makes the task model in `task_dir` a classifier, as FusionBench's GPT-2 task models are:
/// a `GPT2ForSequenceClassification` checkpoint (`transformer.`-prefixed names) with a
/// two-class `score` head, and labelled held-out data. The head tells apart the task's
/// examples along the direction in which the task model's pooled states moved away from the
/// base model's the most, against the base's own spread there; the labels are the task
/// model's own predictions, so the task model is the reference a merge should keep (100% by
/// construction) and the base model, blind to the change, is near chance.
fn make_classifier(
    task_dir: &Path,
    base_dir: &Path,
    data_dir: &Path,
    t: usize,
    config: &serde_json::Value,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    held_out: &[Vec<u32>],
) -> Result<()> {
    let d = DEMO_WIDTH;
    let train = Dataset::open(&data_dir.join(format!("task_{t}.jsonl")))?;
    let task_states = pooled_states(task_dir, &train)?;
    let base_states = pooled_states(base_dir, &train)?;
    let u = head_direction(&task_states, &base_states, d)?;
    // Class 0 reads +u, class 1 reads −u: the sign of u·h decides.
    let score: Vec<f32> = u
        .iter()
        .map(|&v| v as f32)
        .chain(u.iter().map(|&v| -v as f32))
        .collect();

    let eval_path = data_dir.join(format!("task_{t}.eval.jsonl"));
    write_jsonl(&eval_path, held_out, None)?;
    let states = pooled_states(task_dir, &Dataset::open(&eval_path)?)?;
    // As evaluation computes the logits and takes their first maximum.
    let labels: Vec<usize> = states
        .chunks(d)
        .map(|h| {
            let logit = |k: usize| -> f32 {
                h.iter()
                    .zip(&score[k * d..(k + 1) * d])
                    .map(|(a, b)| a * b)
                    .sum()
            };
            usize::from(logit(1) > logit(0))
        })
        .collect();
    write_jsonl(&eval_path, held_out, Some(&labels))?;

    let mut classifier: BTreeMap<String, (Vec<usize>, Vec<f32>)> = tensors
        .into_iter()
        .map(|(name, v)| (format!("transformer.{name}"), v))
        .collect();
    classifier.insert("score.weight".into(), (vec![2, d], score));
    let mut config = config.clone();
    config["architectures"] = serde_json::json!(["GPT2ForSequenceClassification"]);
    config["id2label"] = serde_json::json!({"0": "LABEL_0", "1": "LABEL_1"});
    config["label2id"] = serde_json::json!({"LABEL_0": 0, "LABEL_1": 1});
    // Rewrites the backbone-only files written above.
    write_checkpoint(task_dir, &config, &classifier)
}

/// The unit direction, orthogonal to the task model's mean pooled state (so that the two
/// classes come out about even), along which the task model's change of the pooled states
/// varies the most against the base model's own variation (the top eigenvector of the
/// difference of their covariances). States are `[n, d]`.
fn head_direction(task: &[f32], base: &[f32], d: usize) -> Result<Vec<f64>> {
    let n = task.len() / d;
    let change: Vec<f64> = task.iter().zip(base).map(|(a, b)| (a - b) as f64).collect();
    let base: Vec<f64> = base.iter().map(|&v| v as f64).collect();
    let mean = |x: &[f64]| -> Vec<f64> {
        (0..d)
            .map(|j| x.chunks(d).map(|r| r[j]).sum::<f64>() / n as f64)
            .collect()
    };
    let covariance = |x: &[f64]| -> Mat<f64> {
        let m = mean(x);
        Mat::from_fn(d, d, |i, j| {
            x.chunks(d)
                .map(|r| (r[i] - m[i]) * (r[j] - m[j]))
                .sum::<f64>()
                / n as f64
        })
    };
    let (c_change, c_base) = (covariance(&change), covariance(&base));
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    // The part of `v` orthogonal to `others` (unit vectors), at unit length.
    let orthogonal = |mut v: Vec<f64>, others: &[&[f64]]| {
        for o in others {
            let p = dot(&v, o);
            v.iter_mut().zip(o.iter()).for_each(|(x, y)| *x -= p * y);
        }
        let norm = dot(&v, &v).sqrt().max(1e-30);
        v.iter_mut().for_each(|x| *x /= norm);
        v
    };
    let task_states: Vec<f64> = task.iter().map(|&v| v as f64).collect();
    let centre = orthogonal(mean(&task_states), &[]);
    let (u, order) = eigen_descending(&(&c_change - &c_base))?;
    let top = (0..d).map(|i| u[(i, order[0])]).collect();
    Ok(orthogonal(top, &[&centre]))
}

/// The eigenvectors of a symmetric matrix (columns) and their order by descending eigenvalue.
fn eigen_descending(m: &Mat<f64>) -> Result<(Mat<f64>, Vec<usize>)> {
    let eig = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Numerical(format!("demo eigendecomposition: {e:?}")))?;
    let s = eig.S().column_vector();
    let mut order: Vec<usize> = (0..m.nrows()).collect();
    order.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap_or(std::cmp::Ordering::Equal));
    Ok((eig.U().to_owned(), order))
}

/// The pooled (last real token) final hidden state of every example of a data set, `[n, d]`,
/// batched as evaluation batches them.
fn pooled_states(model_dir: &Path, data: &Dataset) -> Result<Vec<f32>> {
    let ckpt = Checkpoint::open(model_dir)?;
    let cfg = ModelConfig::from_checkpoint(&ckpt)?;
    let model = Model::load(&CpuBackend, &ckpt)?;
    let params = Parameters {
        batch_size: DEMO_BATCH,
        ..Parameters::default()
    };
    let padding = check_data(&cfg, data, &params)?;
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut states = Vec::with_capacity(data.len() * DEMO_WIDTH);
    for_each_batch(data, &indices, DEMO_BATCH, padding, |_, batch| {
        let out = model.forward(&CpuBackend, &batch, ForwardHooks::default())?;
        let hidden = CpuBackend.download(&out.last_hidden)?;
        let d = CpuBackend.shape(&out.last_hidden).1;
        for h in crate::eval::last_token_states(&batch, &hidden, d, padding.pad_id) {
            states.extend_from_slice(h);
        }
        Ok(())
    })?;
    Ok(states)
}

/// Final hidden states of the real (non-padding) tokens of every example of a data file.
fn hidden_of(model_dir: &Path, data: &Dataset) -> Result<Vec<f32>> {
    let ckpt = Checkpoint::open(model_dir)?;
    let cfg = ModelConfig::from_checkpoint(&ckpt)?;
    let model = Model::load(&CpuBackend, &ckpt)?;
    let indices: Vec<usize> = (0..data.len()).collect();
    let batch = batch_of(&cfg, data, &Parameters::default(), &indices)?;
    let out = model.forward(&CpuBackend, &batch, ForwardHooks::default())?;
    let Batch::Tokens { mask, .. } = &batch else {
        unreachable!("text data")
    };
    let d = CpuBackend.shape(&out.last_hidden).1;
    Ok(out
        .last_hidden
        .data
        .chunks(d)
        .zip(mask)
        .filter(|(_, &m)| m != 0)
        .flat_map(|(r, _)| r.iter().copied())
        .collect())
}

fn dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// A pool is written only into a new or empty directory: never over existing files.
fn require_new_dir(d: &Path, flag: &str) -> Result<()> {
    if d.exists()
        && std::fs::read_dir(d)
            .map_err(|e| Error::io(d, e))?
            .next()
            .is_some()
    {
        return Err(Error::file(
            d,
            format!("{flag} directory exists and is not empty; choose a new path"),
        ));
    }
    Ok(())
}

/// `regmean-gpu demo`.
pub fn run_demo(keep: Option<&Path>, ui: &dyn Say) -> Result<()> {
    let tmp;
    let dir = match keep {
        Some(d) => {
            require_new_dir(d, "--keep")?;
            d.to_path_buf()
        }
        None => {
            tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
            tmp.path().to_path_buf()
        }
    };
    let t0 = std::time::Instant::now();
    ui.say(&format!(
        "building a synthetic GPT-2 pool ({DEMO_TASKS} task models, d=64, 2 layers) in {}",
        dir.display()
    ));
    let cfg_path = build_demo_pool(&dir)?;
    let cfg = MergeConfig::load(&cfg_path)?;
    let mut results = Vec::new();
    for method in [MergeMethod::SimpleAverage, MergeMethod::Regmean] {
        let out = dir.join(match method {
            MergeMethod::Regmean => "merged_regmean",
            MergeMethod::RegmeanPlusplus => "merged_regmean_plusplus",
            MergeMethod::SimpleAverage => "merged_average",
        });
        let cfg = MergeConfig {
            merge_method: method,
            ..cfg.clone()
        };
        ui.say(&format!("merging by {}", method.title()));
        merge(&CpuBackend, &cfg, &out, &MergeOptions::default(), ui)?;
        results.push(out);
    }
    ui.say("\nHow far each model's outputs on held-out task data are from the task model's own,");
    ui.say("as a fraction of the distance between the base and the task model (0 = reproduces the task model):\n");
    println!(
        "  {:<8} {:>8} {:>16} {:>10}",
        "task", "base", "simple average", "RegMean"
    );
    let (mut sum_avg, mut sum_reg) = (0.0, 0.0);
    for t in 0..DEMO_TASKS {
        let data = Dataset::open(&dir.join(format!("data/task_{t}.eval.jsonl")))?;
        let task = hidden_of(&dir.join(format!("task_{t}")), &data)?;
        let base = hidden_of(&dir.join("base"), &data)?;
        let gap = dist(&base, &task);
        let avg = dist(&hidden_of(&results[0], &data)?, &task) / gap;
        let reg = dist(&hidden_of(&results[1], &data)?, &task) / gap;
        sum_avg += avg;
        sum_reg += reg;
        println!("  task_{t:<3} {:>8.3} {:>16.3} {:>10.3}", 1.0, avg, reg);
    }
    let k = DEMO_TASKS as f64;
    println!(
        "  {:<8} {:>8.3} {:>16.3} {:>10.3}",
        "mean",
        1.0,
        sum_avg / k,
        sum_reg / k
    );
    ui.say("\nAccuracy (%) of each task's classification head on held-out labelled data");
    ui.say("(the labels are the task model's own predictions: the task model scores 100):\n");
    let tasks = crate::eval::tasks_from_config(&cfg)?;
    let opts = crate::eval::EvalOptions {
        batch_size: cfg.parameters.batch_size,
        max_length: cfg.parameters.max_length,
        base: None,
    };
    let silent = &crate::progress::Silent;
    let accuracy = |model: &Path| crate::eval::evaluate(&CpuBackend, model, &tasks, &opts, silent);
    let (base, average, regmean) = (
        accuracy(&cfg.base_model)?,
        accuracy(&results[0])?,
        accuracy(&results[1])?,
    );
    print!(
        "{}",
        crate::eval::format_table(&[
            ("base", &base),
            (MergeMethod::SimpleAverage.title(), &average),
            (MergeMethod::Regmean.title(), &regmean),
        ])
    );
    ui.say(&format!("\ndone in {:.1}s", t0.elapsed().as_secs_f64()));
    if keep.is_some() {
        ui.say(&format!(
            "the pool, merge.yaml and both merged models are in {}; try:\n  regmean-gpu merge {} {} --eval --compare-average",
            dir.display(),
            cfg_path.display(),
            dir.join("merged_again").display()
        ));
    }
    Ok(())
}

/// `regmean-gpu forward`: final hidden states (and pooled output, mask) of the first examples.
pub fn forward_to_file<B: Backend>(
    backend: &B,
    model_dir: &Path,
    data_path: &Path,
    examples: usize,
    max_length: usize,
    out: crate::io::StagedOutput,
) -> Result<()> {
    let ckpt = Checkpoint::open(model_dir)?;
    let cfg = ModelConfig::from_checkpoint(&ckpt)?;
    let params = Parameters {
        max_length,
        ..Parameters::default()
    };
    if max_length == 0 {
        return Err(Error::invalid("--max-length must be at least 1"));
    }
    let data = Dataset::open_for_model(data_path, &[model_dir], max_length)?;
    let indices: Vec<usize> = (0..examples.min(data.len())).collect();
    let batch = batch_of(&cfg, &data, &params, &indices)?;
    let model = Model::load(backend, &ckpt)?;
    let o = model.forward(backend, &batch, ForwardHooks::default())?;
    let hidden = backend.download(&o.last_hidden)?;
    let d = backend.shape(&o.last_hidden).1;
    let n = batch.len();
    let seq = hidden.len() / d / n.max(1);
    let pooled = o.pooled.as_ref().map(|p| backend.download(p)).transpose()?;
    let mut tensors = vec![OutTensor {
        name: "last_hidden_state".into(),
        dtype: Dtype::F32,
        shape: vec![n, seq, d],
        data: TensorData::F32(&hidden),
    }];
    if let Some(p) = &pooled {
        tensors.push(OutTensor {
            name: "pooler_output".into(),
            dtype: Dtype::F32,
            shape: vec![n, d],
            data: TensorData::F32(p),
        });
    }
    let ints;
    if let Batch::Tokens { ids, mask, .. } = &batch {
        ints = [
            ids.iter().map(|&v| v as i64).collect::<Vec<_>>(),
            mask.iter().map(|&v| v as i64).collect(),
        ]
        .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        tensors.push(OutTensor {
            name: "input_ids".into(),
            dtype: Dtype::Other("I64".into()),
            shape: vec![n, seq],
            data: TensorData::Raw(&ints[0]),
        });
        tensors.push(OutTensor {
            name: "attention_mask".into(),
            dtype: Dtype::Other("I64".into()),
            shape: vec![n, seq],
            data: TensorData::Raw(&ints[1]),
        });
    }
    write_file(out.path(), &tensors, &BTreeMap::new())?;
    out.commit()
}

/// `regmean-gpu synth`: random-weight pools of realistic size for benchmarks.
#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// gpt2 (GPT-2 small) or clip (ViT-B/32)
    #[arg(long, default_value = "gpt2")]
    pub arch: String,
    /// Shrink the architecture: layers to keep (default: all)
    #[arg(long)]
    pub layers: Option<usize>,
    /// Number of task models
    #[arg(long, default_value_t = 2)]
    pub models: usize,
    /// Examples per task
    #[arg(long, default_value_t = 32)]
    pub examples: usize,
    /// Token sequences' length range (GPT-2)
    #[arg(long, default_value_t = 16)]
    pub min_len: usize,
    #[arg(long, default_value_t = 128)]
    pub max_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory
    #[arg(long)]
    pub out: PathBuf,
}

pub fn synth(a: &SynthArgs, ui: &dyn Say) -> Result<()> {
    require_new_dir(&a.out, "--out")?;
    let mut rng = Rng::new(a.seed);
    let (config, is_gpt2) = match a.arch.as_str() {
        "gpt2" => (
            serde_json::json!({"model_type": "gpt2", "architectures": ["GPT2Model"], "n_layer": a.layers.unwrap_or(12), "pad_token_id": 50256, "torch_dtype": "float32"}),
            true,
        ),
        "clip" => (
            serde_json::json!({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], "num_hidden_layers": a.layers.unwrap_or(12), "patch_size": 32, "image_size": 224, "torch_dtype": "float32"}),
            false,
        ),
        other => {
            return Err(Error::invalid(format!(
                "--arch {other}: expected gpt2 or clip"
            )))
        }
    };
    let probe = a.out.join("base");
    let model_cfg = if is_gpt2 {
        ModelConfig::Gpt2(crate::model::gpt2::Gpt2Config::from_json(&config, &probe)?)
    } else {
        ModelConfig::Clip(crate::model::clip::ClipVisionConfig::from_json(
            &config, &probe,
        )?)
    };
    let base = random_model(&model_cfg, &mut rng);
    write_checkpoint(&probe, &config, &base)?;
    let data_dir = a.out.join("data");
    std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(&data_dir, e))?;
    let mut models = String::new();
    for t in 0..a.models {
        ui.say(&format!("writing task model {}/{}", t + 1, a.models));
        let task: BTreeMap<_, _> = base
            .iter()
            .map(|(n, (s, v))| {
                let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32)
                    .sqrt()
                    .max(1e-3);
                (
                    n.clone(),
                    (
                        s.clone(),
                        v.iter().map(|x| x + rng.normal() * 0.1 * std).collect(),
                    ),
                )
            })
            .collect();
        write_checkpoint(&a.out.join(format!("task_{t}")), &config, &task)?;
        let data = if let ModelConfig::Gpt2(c) = &model_cfg {
            let p = data_dir.join(format!("task_{t}.jsonl"));
            let seqs: Vec<Vec<u32>> = (0..a.examples)
                .map(|_| {
                    let len = a.min_len + rng.below(a.max_len.saturating_sub(a.min_len) + 1);
                    (0..len)
                        .map(|_| rng.below(c.vocab_size - 1) as u32)
                        .collect()
                })
                .collect();
            write_jsonl(&p, &seqs, None)?;
            p
        } else {
            let p = data_dir.join(format!("task_{t}.safetensors"));
            let px = rng.normals(a.examples * 3 * 224 * 224, 1.0);
            let t = [OutTensor {
                name: "pixel_values".into(),
                dtype: Dtype::F32,
                shape: vec![a.examples, 3, 224, 224],
                data: TensorData::F32(&px),
            }];
            write_file(&p, &t, &BTreeMap::new())?;
            p
        };
        models.push_str(&format!(
            "  - model: ./task_{t}\n    data: ./data/{}\n",
            data.file_name().expect("file").to_string_lossy()
        ));
    }
    let yaml = format!(
        "merge_method: regmean\nbase_model: ./base\nmodels:\n{models}parameters:\n  num_regmean_examples: {}\n  batch_size: 32\n  max_length: 512\n",
        a.examples
    );
    let p = a.out.join("merge.yaml");
    std::fs::write(&p, yaml).map_err(|e| Error::io(&p, e))?;
    ui.say(&format!("wrote {}", p.display()));
    Ok(())
}
