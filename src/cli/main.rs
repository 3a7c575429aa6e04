//! The `regmean-gpu` command line: the commands and their arguments; each command's work
//! beyond a few lines lives in a file of its own beside this one.

mod alloc;
mod convert;
mod doctor;
mod eval;
mod inspect;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use regmean_gpu::backend::Precision;
use regmean_gpu::config::{MergeConfig, Parameters};
use regmean_gpu::device::select_device;
use regmean_gpu::io::{Inputs, StagedOutput};
use regmean_gpu::regmean::{self, MergeOptions};
use regmean_gpu::ui::{self, Ui};
use regmean_gpu::with_backend;
use regmean_gpu::{Error, Result};

#[derive(Parser)]
#[command(name = "regmean-gpu", version, about = "Merge fine-tuned transformer checkpoints with RegMean", long_about = None)]
struct Cli {
    /// Print only errors and the final summary line
    #[arg(short, long, global = true)]
    quiet: bool,
    /// More detail (per-layer solve outcomes, timings)
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Worker threads for the CPU engine, at least 1 (default: all cores)
    #[arg(long, global = true, value_parser = parse_threads)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge the models listed in a YAML config and write a transformers model directory
    Merge(MergeArgs),
    /// Compute one model's Gram statistics over its data and write them to a file
    Grams(GramsArgs),
    /// List the tensors (and metadata) of a checkpoint directory, safetensors or Gram file
    Inspect {
        /// A model directory, a .safetensors file or a Gram statistics file
        path: PathBuf,
    },
    /// Build a small synthetic pool, merge it by averaging and by RegMean, and compare
    Demo {
        /// Keep the pool, its merge config and both merged models in this directory
        #[arg(long)]
        keep: Option<PathBuf>,
    },
    /// Run a model's forward pass over data and save the outputs (for parity checks)
    Forward(ForwardArgs),
    /// Accuracy of a model on labelled task data: GPT-2 with each task's head, CLIP zero-shot
    Eval(EvalArgs),
    /// Report the GPU, drivers and libraries, and check every CUDA kernel against its CPU twin
    Doctor {
        /// Print one JSON object instead of text
        #[arg(long)]
        json: bool,
        /// Also benchmark the Gram kernel against cuBLAS and time the solve
        #[arg(long)]
        bench: bool,
    },
    /// Compare every tensor of two model directories (max |a − b| / max |b| per tensor)
    Compare {
        /// The model directory to check
        candidate: PathBuf,
        /// The model directory it should match
        reference: PathBuf,
        /// Fail when a tensor's relative error exceeds this
        #[arg(long, default_value_t = 1e-4)]
        tol: f64,
    },
    /// Turn a FusionBench method YAML plus a model-pool YAML into a merge config
    ConvertConfig(ConvertArgs),
    /// Write a synthetic pool of random-weight models of realistic size (for benchmarks)
    #[command(hide = true)]
    Synth(regmean_gpu::demo::SynthArgs),
}

#[derive(Args)]
struct ConvertArgs {
    /// FusionBench's method config (fusion_bench_config/method/regmean/clip_regmean.yaml, ...)
    method: PathBuf,
    /// FusionBench's model-pool config (fusion_bench_config/modelpool/...)
    pool: PathBuf,
    /// Write the merge config here (default: print it)
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Replace an existing output file (never an input of the run)
    #[arg(long)]
    force: bool,
    /// Where each task's data is expected, relative to the merge config
    #[arg(long, default_value = "./data")]
    data_dir: String,
}

#[derive(Args)]
struct DeviceArg {
    /// Compute device: auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(Args)]
struct MergeArgs {
    /// The merge config (YAML)
    config: PathBuf,
    /// Output directory (must not exist unless --force)
    #[arg(required_unless_present = "plan")]
    out_dir: Option<PathBuf>,
    /// Print the memory plan (per device and host), FLOPs and bytes read, and stop: decoder
    /// LLMs; CONFIG may be a merge config or a model's config.json alone
    #[arg(long)]
    plan: bool,
    #[command(flatten)]
    device: DeviceArg,
    /// Largest output shard, e.g. 2GB or 500MB
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    out_shard_size: u64,
    /// Replace an existing output directory
    #[arg(long)]
    force: bool,
    /// Memory cap of a layer-wise merge's activation caches (beyond it they spill to a
    /// temporary file next to the output), and of `schedule: auto`'s choice; e.g. 8GB.
    /// Default: half of the memory available at start
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Activations on a GPU, overriding the config's `precision`: float16 or float32
    #[arg(long, value_parser = parse_precision)]
    precision: Option<Precision>,
    /// Also write phase times, rows per model and peak memory as JSON to this file
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// Then evaluate the merged model on every model entry's `eval_data` and print a table
    #[arg(long)]
    eval: bool,
    /// With --eval: also merge by simple averaging and show its accuracy beside
    #[arg(long)]
    compare_average: bool,
}

impl MergeArgs {
    fn out(&self) -> &Path {
        self.out_dir
            .as_deref()
            .expect("clap requires the output directory without --plan")
    }
}

#[derive(Args)]
struct EvalArgs {
    /// The model to evaluate: a GPT-2 backbone or a CLIP vision tower (e.g. a merge output)
    model: PathBuf,
    /// Evaluate on every model entry of this merge config that has `eval_data`
    #[arg(long)]
    config: Option<PathBuf>,
    /// Labelled data of one task: JSON Lines with `label`, or an image folder with class sub-folders
    #[arg(long, conflicts_with = "config")]
    data: Option<PathBuf>,
    /// Name of that task (CLIP: picks the built-in classes and templates, e.g. sun397, cars, dtd)
    #[arg(long, requires = "data")]
    task: Option<String>,
    /// GPT-2: the task's checkpoint, whose `score` head (and tokenizer) is used
    #[arg(long, requires = "data")]
    head: Option<PathBuf>,
    /// CLIP: a YAML/JSON file with `classes` and `templates` (`{}` = the class name)
    #[arg(long, requires = "data")]
    classes: Option<PathBuf>,
    /// CLIP: the base CLIPModel with the text tower and projections (default: the config's base_model)
    #[arg(long)]
    base: Option<PathBuf>,
    /// Examples per forward pass (default: the config's batch_size, else 32)
    #[arg(long)]
    batch_size: Option<usize>,
    /// Truncate texts to this many tokens (default: the config's max_length, else 512)
    #[arg(long)]
    max_length: Option<usize>,
    /// Print one JSON object (per task `accuracy` and `n`) instead of the table
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArg,
    /// Activations on a GPU: float32 (default: predictions as transformers makes them) or
    /// float16
    #[arg(long, default_value = "float32", value_parser = parse_precision)]
    precision: Precision,
}

#[derive(Args)]
struct GramsArgs {
    /// The model directory
    #[arg(long)]
    model: PathBuf,
    /// Its task data: JSON Lines (`text`, a sentence pair, or `input_ids`), an image folder,
    /// or a .safetensors file with `pixel_values`
    #[arg(long)]
    data: PathBuf,
    /// Output file (e.g. task_a.grams.safetensors)
    #[arg(long, short)]
    out: PathBuf,
    /// Replace an existing output file (never an input of the run)
    #[arg(long)]
    force: bool,
    /// Take the parameters from this merge config (flags below override)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Examples to run (default: the config's, else 256)
    #[arg(long)]
    num_regmean_examples: Option<usize>,
    /// Examples per forward pass (default: the config's, else 32)
    #[arg(long)]
    batch_size: Option<usize>,
    /// Truncate texts to this many tokens (default: the config's, else 512)
    #[arg(long)]
    max_length: Option<usize>,
    /// Seed of the example shuffle (default: the config's, else 0)
    #[arg(long)]
    seed: Option<u64>,
    /// Take the examples in file order
    #[arg(long)]
    no_shuffle: bool,
    /// Count padding rows and pad to max_length, as FusionBench does
    #[arg(long)]
    fusionbench_compat: bool,
    #[command(flatten)]
    device: DeviceArg,
}

#[derive(Args)]
struct ForwardArgs {
    /// The model directory
    model: PathBuf,
    /// Its data: JSON Lines (`text`, a sentence pair, or `input_ids`), an image folder, or a
    /// .safetensors file with `pixel_values`
    data: PathBuf,
    /// Output safetensors: last_hidden_state [N, S, d] (and pooler_output, attention_mask)
    #[arg(long, short)]
    out: PathBuf,
    /// Use the first N examples (file order)
    #[arg(long, default_value_t = 8)]
    examples: usize,
    /// Replace an existing output file (never an input of the run)
    #[arg(long)]
    force: bool,
    /// Truncate texts to this many tokens
    #[arg(long, default_value_t = 512)]
    max_length: usize,
    #[command(flatten)]
    device: DeviceArg,
    /// Activations on a GPU: float16 or float32 (the CPU always runs float32)
    #[arg(long, default_value = "float16", value_parser = parse_precision)]
    precision: Precision,
}

fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    match s {
        "float16" | "fp16" => Ok(Precision::Float16),
        "float32" | "fp32" => Ok(Precision::Float32),
        _ => Err(format!("`{s}` is not a precision: float16 or float32")),
    }
}

fn parse_threads(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("give at least 1 thread (leave --threads out to use every core)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a number of threads")),
    }
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1.0)]
        .iter()
        .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((t.clone(), 1.0));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 5GB, 500MB or 1000000"))?;
    if v <= 0.0 {
        return Err("the size must be positive".into());
    }
    Ok((v * mult) as u64)
}

fn main() -> ExitCode {
    alloc::keep_freed_memory();
    let cli = Cli::parse();
    // The main thread, which runs the forward pass and calls every parallel loop, is one of
    // the pool's threads: from outside the pool each loop was handed to a sleeping worker
    // and waited for on a futex, thousands of times per merge.
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(cli.threads.unwrap_or(0))
        .use_current_thread()
        .build_global()
    {
        let n = cli.threads.unwrap_or(0);
        eprintln!("error: --threads {n}: {e}");
        return ExitCode::FAILURE;
    }
    regmean_gpu::io::pending::install_interrupt_cleanup();
    let ui = Ui::new(cli.quiet, cli.verbose);
    // A mapped input truncated during the run reads as zeros after the fault: whatever
    // was computed from it is not reported as a success.
    match run(cli.command, &ui).and_then(|()| regmean_gpu::io::mapped::check_no_fault()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            ui.clear();
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, ui: &Ui) -> Result<()> {
    match command {
        Command::Merge(a) if a.plan => {
            let plan = regmean_gpu::model::llama_plan::plan_for(&a.config)?;
            print!("{}", plan.report());
            Ok(())
        }
        Command::Merge(a) => {
            let mut cfg = MergeConfig::load(&a.config)?;
            let gpu = select_device(&a.device.device, &cfg.base_model, ui)?;
            if let Some(p) = a.precision {
                cfg.parameters.precision = p;
            }
            let opts = MergeOptions {
                out_shard_bytes: a.out_shard_size,
                force: a.force,
                max_memory: a.max_memory,
            };
            if let Some(path) = &a.report_json {
                regmean::report::check_report_path(path, &cfg.inputs())?;
            }
            // The evaluation's inputs are checked before the merge, not after it.
            let evaluation = (a.eval || a.compare_average)
                .then(|| eval::eval_plan(&cfg, &a, ui))
                .transpose()?;
            ui.clear();
            let (report, _) = with_backend!(&gpu, cfg.parameters.precision, |backend| {
                let report_json = a.report_json.as_deref();
                regmean::merge_on_device(&backend, &cfg, a.out(), &opts, report_json, ui)
            })?;
            ui.clear();
            ui::print_summary(&report, a.out(), ui);
            if regmean_gpu::profile::enabled() {
                eprint!("{}", regmean_gpu::profile::report());
            }
            if let Some((tasks, eval_opts)) = &evaluation {
                // Evaluation in float32 on a GPU too: its predictions are transformers' own.
                with_backend!(&gpu, Precision::Float32, |backend| {
                    eval::eval_after_merge(&backend, &opts, &cfg, &a, tasks, eval_opts, ui)
                })?;
            }
            Ok(())
        }
        Command::Eval(a) => eval::eval_command(&a, ui),
        Command::Grams(a) => {
            let gpu = select_device(&a.device.device, &a.model, ui)?;
            let mut params = match &a.config {
                Some(p) => MergeConfig::load(p)?.parameters,
                None => Parameters::default(),
            };
            if let Some(v) = a.num_regmean_examples {
                params.num_regmean_examples = v;
            }
            if let Some(v) = a.batch_size {
                params.batch_size = v;
            }
            if let Some(v) = a.max_length {
                params.max_length = v;
            }
            if let Some(v) = a.seed {
                params.seed = v;
            }
            params.shuffle &= !a.no_shuffle;
            params.fusionbench_compat |= a.fusionbench_compat;
            params.validate(a.config.as_deref().unwrap_or(Path::new("(command line)")))?;
            let mut inputs = Inputs::new();
            inputs.add("the model", &a.model);
            inputs.add("the data", &a.data);
            if let Some(c) = &a.config {
                inputs.add("the config", c);
            }
            let out = StagedOutput::create_file(&a.out, a.force, &inputs)?;
            let t = std::time::Instant::now();
            let grams = with_backend!(&gpu, params.precision, |backend| {
                regmean::stats::grams_to_file(&backend, &a.model, &a.data, &params, out, ui)?
            });
            ui.clear();
            ui.result(&format!(
                "wrote {} ({} sites, {} examples, {} rows per site) in {:.1}s",
                a.out.display(),
                grams.sites.len(),
                grams.examples,
                grams.sites.first().map_or(0, |s| s.rows),
                t.elapsed().as_secs_f64()
            ));
            Ok(())
        }
        Command::Inspect { path } => inspect::inspect(&path),
        Command::Demo { keep } => regmean_gpu::demo::run_demo(keep.as_deref(), ui),
        Command::Forward(a) => {
            let gpu = select_device(&a.device.device, &a.model, ui)?;
            let mut inputs = Inputs::new();
            inputs.add("the model", &a.model);
            inputs.add("the data", &a.data);
            let out = StagedOutput::create_file(&a.out, a.force, &inputs)?;
            with_backend!(&gpu, a.precision, |backend| {
                regmean_gpu::demo::forward_to_file(
                    &backend,
                    &a.model,
                    &a.data,
                    a.examples,
                    a.max_length,
                    out,
                )?
            });
            ui.result(&format!("wrote {}", a.out.display()));
            Ok(())
        }
        Command::ConvertConfig(a) => convert::convert_command(&a, ui),
        Command::Synth(a) => regmean_gpu::demo::synth(&a, ui),
        Command::Doctor { json, bench } => doctor::doctor(json, bench),
        Command::Compare {
            candidate,
            reference,
            tol,
        } => {
            let rows = regmean_gpu::compare::compare_dirs(&candidate, &reference)?;
            let worst = rows.first().map_or(0.0, |r| r.1);
            for (name, e) in rows
                .iter()
                .take(if ui.verbose > 0 { rows.len() } else { 5 })
            {
                ui.info(&format!("  {name:<60} {e:.2e}"));
            }
            let over = rows.iter().filter(|r| r.1 > tol).count();
            ui.result(&format!(
                "{} tensors, worst relative error {worst:.2e}, {over} above {tol:.0e}",
                rows.len()
            ));
            if over > 0 {
                return Err(Error::Numerical(format!(
                    "{over} tensors differ by more than {tol:.0e}"
                )));
            }
            Ok(())
        }
    }
}
