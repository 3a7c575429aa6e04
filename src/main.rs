//! The `regmean-gpu` command line.

mod ui;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use regmean_gpu::backend::cuda::{self, DeviceChoice};
use regmean_gpu::backend::{Backend, CpuBackend, CudaBackend, Precision};
use regmean_gpu::config::{MergeConfig, Parameters};
use regmean_gpu::io::{Inputs, StagedOutput};
use regmean_gpu::regmean::{self, MergeOptions, MergeReport};
use regmean_gpu::{Error, Result};
use ui::Ui;

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

/// glibc serves large blocks with fresh `mmap`s and returns them on free, so every
/// activation buffer of every batch was paid for again in page faults, page zeroing and,
/// with several threads, TLB shoot-downs: an eighth of a CPU merge's time went to the kernel.
/// Keeping freed memory in the process lets the next batch reuse it; the peak does not grow
/// (the same buffers are live at the same time), but it is not given back until exit.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The system allocator, with large blocks marked for transparent huge pages where the
/// kernel leaves that to the program (`madvise` mode): a merge touches gigabytes of fresh
/// heap, and with 4 KiB pages each page is a fault, a zeroing and, on a page first read as
/// zero, a TLB shoot-down across the worker threads.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
struct HugePageAllocator;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
impl HugePageAllocator {
    const HUGE_PAGE: usize = 2 << 20;

    fn advise(ptr: *mut u8, size: usize) {
        if ptr.is_null() || size < 2 * Self::HUGE_PAGE {
            return;
        }
        let start = (ptr as usize).next_multiple_of(Self::HUGE_PAGE);
        let end = (ptr as usize + size) / Self::HUGE_PAGE * Self::HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside the block just allocated; MADV_HUGEPAGE changes
            // how pages are backed, never their contents. A failure only loses the hint.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
// SAFETY: every call is forwarded to the system allocator with its own arguments; `advise`
// only adds a hint on the memory that allocator returned.
unsafe impl std::alloc::GlobalAlloc for HugePageAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        let ptr = unsafe { std::alloc::System.alloc(layout) };
        Self::advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { std::alloc::System.alloc_zeroed(layout) };
        Self::advise(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, that is from the system allocator.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`.
        let ptr = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        Self::advise(ptr, new_size);
        ptr
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: HugePageAllocator = HugePageAllocator;

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
        {
            eprintln!("error: --threads {n}: {e}");
            return ExitCode::FAILURE;
        }
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

/// Runs `$body` with `$backend` bound to the backend `--device` chose: the CPU engine, or
/// the CUDA one in the given precision. Evaluates to `$body`'s value.
macro_rules! with_backend {
    ($gpu:expr, $precision:expr, |$backend:ident| $body:expr) => {
        match $gpu {
            None => {
                let $backend = CpuBackend;
                $body
            }
            Some(dev) => {
                let $backend = CudaBackend::new(dev.clone(), $precision);
                $body
            }
        }
    };
}

/// The device `--device` names for a run on `model`; decoder LLMs run on the CPU engine
/// (`auto` says so, a GPU is refused).
fn select_device(
    device: &str,
    model: &Path,
    ui: &Ui,
) -> Result<Option<std::sync::Arc<cuda::CudaDevice>>> {
    let mut choice = device.parse::<DeviceChoice>()?;
    if regmean_gpu::model::llama_config::is_decoder_dir(model) {
        let (cpu, notice) = regmean_gpu::model::llama_config::decoder_device(choice)?;
        if let Some(n) = notice {
            ui.info(n);
        }
        choice = cpu;
    }
    cuda::select(choice)
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
                device: gpu.clone(),
                out_shard_bytes: a.out_shard_size,
                force: a.force,
                max_memory: a.max_memory,
            };
            if let Some(path) = &a.report_json {
                check_report_path(path, &cfg.inputs())?;
            }
            // The evaluation's inputs are checked before the merge, not after it.
            let evaluation = (a.eval || a.compare_average)
                .then(|| eval_plan(&cfg, &a, ui))
                .transpose()?;
            ui.clear();
            with_backend!(&gpu, cfg.parameters.precision, |backend| {
                ui.info(&format!(
                    "merging {} ({}) into {} on {}",
                    ui::count(cfg.models.len(), "model"),
                    cfg.merge_method.title(),
                    a.out().display(),
                    backend.name()
                ));
                let started = std::time::Instant::now();
                let report = regmean::merge(&backend, &cfg, a.out(), &opts, ui)?;
                ui.clear();
                if let Some(path) = &a.report_json {
                    write_report_json(path, &cfg.inputs(), &report, started.elapsed())?;
                }
                ui::print_summary(&report, a.out(), ui);
                if regmean_gpu::profile::enabled() {
                    eprint!("{}", regmean_gpu::profile::report());
                }
                Ok::<(), Error>(())
            })?;
            if let Some((tasks, eval_opts)) = &evaluation {
                // Evaluation in float32 on a GPU too: its predictions are transformers' own.
                with_backend!(&gpu, Precision::Float32, |backend| {
                    eval_after_merge(&backend, &opts, &cfg, &a, tasks, eval_opts, ui)
                })?;
            }
            Ok(())
        }
        Command::Eval(a) => eval_command(&a, ui),
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
        Command::Inspect { path } => inspect(&path),
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
        Command::ConvertConfig(a) => {
            let converted = regmean_gpu::convert::convert(&a.method, &a.pool, &a.data_dir)?;
            for note in &converted.notes {
                ui.info(&format!("note: {note}"));
            }
            match &a.out {
                None => print!("{}", converted.yaml),
                Some(out) => {
                    let mut inputs = Inputs::new();
                    inputs.add("the method config", &a.method);
                    inputs.add("the model-pool config", &a.pool);
                    let staged = StagedOutput::create_file(out, a.force, &inputs)?;
                    std::fs::write(staged.path(), &converted.yaml)
                        .map_err(|e| Error::io(out, e))?;
                    staged.commit()?;
                    ui.result(&format!("wrote {}", out.display()));
                }
            }
            Ok(())
        }
        Command::Synth(a) => regmean_gpu::demo::synth(&a, ui),
        Command::Doctor { json, bench } => doctor(json, bench),
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

fn eval_command(a: &EvalArgs, ui: &Ui) -> Result<()> {
    let gpu = select_device(&a.device.device, &a.model, ui)?;
    with_backend!(&gpu, a.precision, |backend| eval_on(&backend, a, ui))
}

fn eval_on<B: Backend>(backend: &B, a: &EvalArgs, ui: &Ui) -> Result<()> {
    use regmean_gpu::eval::{self, EvalOptions, EvalTask, ZeroShotTask};
    let cfg = a.config.as_deref().map(MergeConfig::load).transpose()?;
    let params = cfg
        .as_ref()
        .map(|c| c.parameters.clone())
        .unwrap_or_default();
    let tasks = match (&cfg, &a.data) {
        (Some(cfg), _) => eval::tasks_from_config(cfg)?,
        (None, Some(data)) => vec![EvalTask {
            name: a.task.clone().unwrap_or_else(|| {
                data.file_stem()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "task".into())
            }),
            data: data.clone(),
            head: a.head.clone(),
            zero_shot: a
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
        batch_size: a.batch_size.unwrap_or(params.batch_size).max(1),
        max_length: a.max_length.unwrap_or(params.max_length).max(1),
        base: a
            .base
            .clone()
            .or_else(|| cfg.as_ref().map(|c| c.base_model.clone())),
    };
    if regmean_gpu::model::llama_config::is_decoder_dir(&a.model) {
        return causal_lm_eval(backend, a, &tasks, &opts, ui);
    }
    eval::check_tasks(&a.model, &tasks, &opts, ui)?;
    ui.clear();
    ui.info(&format!(
        "evaluating {} on {}",
        a.model.display(),
        ui::count(tasks.len(), "task")
    ));
    let results = eval::evaluate(backend, &a.model, &tasks, &opts, ui)?;
    ui.clear();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&eval::to_json(&results)).expect("json")
        );
    } else {
        print!("{}", eval::format_table(&[("accuracy (%)", &results)]));
    }
    Ok(())
}

/// `eval` of a decoder LLM: the mean next-token loss and perplexity per task.
fn causal_lm_eval<B: Backend>(
    backend: &B,
    a: &EvalArgs,
    tasks: &[regmean_gpu::eval::EvalTask],
    opts: &regmean_gpu::eval::EvalOptions,
    ui: &Ui,
) -> Result<()> {
    use regmean_gpu::eval::causal_lm;
    ui.info(&format!(
        "next-token loss of {} on {} task(s)",
        a.model.display(),
        tasks.len()
    ));
    let results = causal_lm::evaluate(backend, &a.model, tasks, opts)?;
    if a.json {
        let json = causal_lm::to_json(&results);
        println!("{}", serde_json::to_string_pretty(&json).expect("json"));
    } else {
        print!("{}", causal_lm::format_table(&results));
    }
    Ok(())
}

/// The tasks and options of `merge --eval`, each task's data checked.
fn eval_plan(
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
    eval::check_tasks(&cfg.base_model, &tasks, &opts, ui)?;
    Ok((tasks, opts))
}

/// `merge --eval [--compare-average]`: the merged model's accuracy per task, and optionally
/// that of the simple average of the same models.
fn eval_after_merge<B: Backend>(
    backend: &B,
    merge_opts: &MergeOptions,
    cfg: &MergeConfig,
    a: &MergeArgs,
    tasks: &[regmean_gpu::eval::EvalTask],
    opts: &regmean_gpu::eval::EvalOptions,
    ui: &Ui,
) -> Result<()> {
    use regmean_gpu::config::MergeMethod;
    use regmean_gpu::eval;
    ui.info(&format!(
        "evaluating the merged model on {}",
        ui::count(tasks.len(), "task")
    ));
    let merged = eval::evaluate(backend, a.out(), tasks, opts, ui)?;
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
            device: merge_opts.device.clone(),
            ..MergeOptions::default()
        };
        regmean::merge(backend, &avg_cfg, &avg_dir, &avg_opts, ui)?;
        ui.clear();
        ui.info("evaluating the simple average");
        columns.push((
            MergeMethod::SimpleAverage.title(),
            eval::evaluate(backend, &avg_dir, tasks, opts, ui)?,
        ));
        ui.clear();
    }
    let view: Vec<(&str, &[eval::TaskAccuracy])> =
        columns.iter().map(|(h, r)| (*h, r.as_slice())).collect();
    print!("{}", eval::format_table(&view));
    Ok(())
}

fn doctor(json: bool, bench: bool) -> Result<()> {
    let say = |m: &str| {
        if !json {
            eprintln!("{m}");
        }
    };
    let r = regmean_gpu::doctor::run(bench, &say)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r).expect("json"));
    } else {
        let p = &r.probe;
        let driver = p.driver_version.as_deref().unwrap_or(if p.libcuda_present {
            "unknown"
        } else {
            "libcuda.so not found"
        });
        let nvcc = if r.nvcc.is_empty() {
            "no nvcc at build time"
        } else {
            r.nvcc
        };
        println!("CUDA bindings:     {}", r.cuda_bindings);
        println!("driver:            {driver}");
        println!("devices:           {}", p.devices);
        if r.kernels_embedded {
            println!(
                "kernels embedded:  yes ({}; {nvcc})",
                r.kernel_architectures.join(", ")
            );
        } else {
            println!("kernels embedded:  no ({nvcc})");
        }
        println!(
            "cuBLAS / cuSOLVER: {} / {}",
            found(p.cublas_present),
            found(p.cusolver_present)
        );
        if let Some(dev) = &r.device {
            println!(
                "GPU:               {dev} ({})",
                r.compute_capability.as_deref().unwrap_or("?")
            );
        }
        for lib in &r.libraries {
            println!("loaded:            {lib}");
        }
        match &r.unavailable_reason {
            Some(why) => println!("cuda available:    no: {why}"),
            None => {
                let passed = r.checks.iter().filter(|c| c.pass).count();
                println!(
                    "cuda available:    yes; {passed} of {} kernel checks passed",
                    r.checks.len()
                )
            }
        }
        if bench && r.bench.is_empty() {
            println!(
                "benchmark:         not run: {}",
                r.unavailable_reason
                    .as_deref()
                    .unwrap_or("there is no GPU to benchmark")
            );
        }
    }
    if r.cuda_available && !r.all_passed {
        return Err(Error::Numerical(
            "some kernel checks failed (see above)".into(),
        ));
    }
    Ok(())
}

fn found(present: bool) -> &'static str {
    if present {
        "found"
    } else {
        "not found"
    }
}

/// `--report-json FILE` may replace an earlier report, never an input or another file.
fn check_report_path(path: &Path, inputs: &Inputs) -> Result<()> {
    inputs.check_output(path)?;
    if std::fs::symlink_metadata(path).is_ok() {
        let earlier = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        if !earlier.is_some_and(|v| v.is_object()) {
            return Err(Error::file(
                path,
                "--report-json: exists and is not an earlier JSON report; choose another path",
            ));
        }
    }
    Ok(())
}

fn write_report_json(
    path: &Path,
    inputs: &Inputs,
    r: &MergeReport,
    total: std::time::Duration,
) -> Result<()> {
    let json = serde_json::json!({
        "arch": r.arch.name(),
        "method": r.method,
        "phases_s": {
            "forward_and_grams": r.timings.grams.as_secs_f64(),
            "of_which_model_load": r.timings.model_load.as_secs_f64(),
            "of_which_sums": r.timings.sums.as_secs_f64(),
            "solve": r.timings.solve.as_secs_f64(),
            "write": r.timings.write.as_secs_f64(),
            "writer_busy": r.timings.writer_busy.as_secs_f64(),
        },
        "tensor_bytes": r.tensor_bytes,
        "total_s": total.as_secs_f64(),
        "peak_rss_bytes": regmean_gpu::peak_rss_bytes(),
        "peak_device_bytes": r.peak_device_bytes,
        "layers_solved": r.layers_solved,
        "schedule": format!("{:?}", r.schedule).to_lowercase(),
        "activation_cache_bytes": r.activation_cache.map(|c| serde_json::json!({"in_memory": c.in_memory_bytes, "spilled": c.spilled_bytes})),
        "fallbacks": r.fallbacks.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "models": r.models.iter().map(|m| serde_json::json!({"name": m.name, "examples": m.examples, "rows": m.rows})).collect::<Vec<_>>(),
    });
    check_report_path(path, inputs)?;
    let out = StagedOutput::create_file(path, true, inputs)?;
    std::fs::write(
        out.path(),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .map_err(|e| Error::io(path, e))?;
    out.commit()
}

fn inspect(path: &Path) -> Result<()> {
    use regmean_gpu::io::{Checkpoint, SafetensorsFile};
    use std::fmt::Write as _;
    let mut text = String::new();
    if path.is_dir() {
        let ckpt = Checkpoint::open(path)?;
        let _ = writeln!(
            text,
            "{}: {} checkpoint, backbone tensors (canonical names):",
            path.display(),
            ckpt.arch().title()
        );
        for name in ckpt.names() {
            let e = ckpt.entry(name)?;
            let _ = writeln!(text, "  {name:<60} {:<5} {:?}", e.dtype.name(), e.shape);
        }
    } else {
        let f = SafetensorsFile::open(path)?;
        let mut meta: Vec<_> = f.metadata().iter().collect();
        meta.sort();
        for (k, v) in meta {
            let _ = writeln!(text, "{k}: {v}");
        }
        for (name, e) in f.tensors() {
            let _ = writeln!(text, "  {name:<60} {:<5} {:?}", e.dtype.name(), e.shape);
        }
    }
    // A closed pipe (`inspect ... | head`) is not an error worth reporting.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    Ok(())
}
