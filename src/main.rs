//! The `regmean-gpu` command line.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use regmean_gpu::backend::cuda::{self, DeviceChoice};
use regmean_gpu::backend::{Backend, CpuBackend, CudaBackend, Precision};
use regmean_gpu::config::{MergeConfig, Parameters};
use regmean_gpu::progress::{Event, Observer};
use regmean_gpu::regmean::{self, MergeOptions, MergeReport};
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
    /// Worker threads for the CPU engine (default: all cores)
    #[arg(long, global = true)]
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
    Inspect { path: PathBuf },
    /// Build a small synthetic pool, merge it by averaging and by RegMean, and compare
    Demo {
        /// Keep the pool, its merge config and both merged models in this directory
        #[arg(long)]
        keep: Option<PathBuf>,
    },
    /// Run a model's forward pass over data and save the outputs (for parity checks)
    Forward(ForwardArgs),
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
        candidate: PathBuf,
        reference: PathBuf,
        /// Fail when a tensor's relative error exceeds this
        #[arg(long, default_value_t = 1e-4)]
        tol: f64,
    },
    /// Write a synthetic pool of random-weight models of realistic size (for benchmarks)
    #[command(hide = true)]
    Synth(regmean_gpu::demo::SynthArgs),
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
    out_dir: PathBuf,
    #[command(flatten)]
    device: DeviceArg,
    /// Largest output shard, e.g. 2GB or 500MB
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    out_shard_size: u64,
    /// Replace an existing output directory
    #[arg(long)]
    force: bool,
    /// Activations on a GPU, overriding the config's `precision`: float16 or float32
    #[arg(long, value_parser = parse_precision)]
    precision: Option<Precision>,
    /// Also write phase times, rows per model and peak memory as JSON to this file
    #[arg(long)]
    report_json: Option<PathBuf>,
}

#[derive(Args)]
struct GramsArgs {
    /// The model directory
    #[arg(long)]
    model: PathBuf,
    /// Its task data (.jsonl token ids or .safetensors pixel_values)
    #[arg(long)]
    data: PathBuf,
    /// Output file (e.g. task_a.grams.safetensors)
    #[arg(long, short)]
    out: PathBuf,
    /// Take the parameters from this merge config (flags below override)
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    num_regmean_examples: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    max_length: Option<usize>,
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
    model: PathBuf,
    data: PathBuf,
    /// Output safetensors: last_hidden_state [N, S, d] (and pooler_output, attention_mask)
    #[arg(long, short)]
    out: PathBuf,
    /// Use the first N examples (file order)
    #[arg(long, default_value_t = 8)]
    examples: usize,
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
    regmean_gpu::io::writer::install_interrupt_cleanup();
    let ui = Ui::new(cli.quiet, cli.verbose);
    match run(cli.command, &ui) {
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

fn run(command: Command, ui: &Ui) -> Result<()> {
    match command {
        Command::Merge(a) => {
            let gpu = cuda::select(a.device.device.parse::<DeviceChoice>()?)?;
            let mut cfg = MergeConfig::load(&a.config)?;
            if let Some(p) = a.precision {
                cfg.parameters.precision = p;
            }
            let opts = MergeOptions {
                device: gpu.clone(),
                out_shard_bytes: a.out_shard_size,
                force: a.force,
            };
            with_backend!(&gpu, cfg.parameters.precision, |backend| {
                ui.info(&format!(
                    "merging {} models into {} on {}",
                    cfg.models.len(),
                    a.out_dir.display(),
                    backend.name()
                ));
                let started = std::time::Instant::now();
                let report = regmean::merge(&backend, &cfg, &a.out_dir, &opts, ui)?;
                ui.clear();
                if let Some(path) = &a.report_json {
                    write_report_json(path, &report, started.elapsed())?;
                }
                print_summary(&report, &a.out_dir, ui);
                if regmean_gpu::profile::enabled() {
                    eprint!("{}", regmean_gpu::profile::report());
                }
                Ok(())
            })
        }
        Command::Grams(a) => {
            let gpu = cuda::select(a.device.device.parse::<DeviceChoice>()?)?;
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
            let t = std::time::Instant::now();
            let grams = with_backend!(&gpu, params.precision, |backend| {
                regmean::gram::grams_to_file(&backend, &a.model, &a.data, &params, &a.out, ui)?
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
            let gpu = cuda::select(a.device.device.parse::<DeviceChoice>()?)?;
            with_backend!(&gpu, a.precision, |backend| {
                regmean_gpu::demo::forward_to_file(&backend, &a.model, &a.data, a.examples, &a.out)?
            });
            ui.result(&format!("wrote {}", a.out.display()));
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

fn write_report_json(path: &Path, r: &MergeReport, total: std::time::Duration) -> Result<()> {
    let json = serde_json::json!({
        "arch": r.arch.name(),
        "method": format!("{:?}", r.method),
        "phases_s": {
            "forward_and_grams": r.timings.grams.as_secs_f64(),
            "of_which_model_load": r.timings.model_load.as_secs_f64(),
            "of_which_sums": r.timings.sums.as_secs_f64(),
            "solve": r.timings.solve.as_secs_f64(),
            "write": r.timings.write.as_secs_f64(),
        },
        "total_s": total.as_secs_f64(),
        "peak_rss_bytes": regmean_gpu::peak_rss_bytes(),
        "peak_device_bytes": r.peak_device_bytes,
        "layers_solved": r.layers_solved,
        "fallbacks": r.fallbacks.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "models": r.models.iter().map(|m| serde_json::json!({"name": m.name, "examples": m.examples, "rows": m.rows})).collect::<Vec<_>>(),
    });
    std::fs::write(path, serde_json::to_string_pretty(&json).expect("json"))
        .map_err(|e| Error::io(path, e))
}

fn print_summary(r: &MergeReport, out: &Path, ui: &Ui) {
    if !ui.quiet {
        eprintln!(
            "\n  model{:>28}  {:>8}  {:>10}",
            "", "examples", "rows/site"
        );
        for m in &r.models {
            let ex = if m.from_grams_file {
                "grams".to_string()
            } else {
                m.examples.to_string()
            };
            eprintln!("  {:<33}  {:>8}  {:>10}", m.name, ex, m.rows);
        }
        eprintln!(
            "\n  forward + Grams {:.2}s · solve {:.2}s ({} layers) · write {:.2}s · peak memory {}",
            r.timings.grams.as_secs_f64(),
            r.timings.solve.as_secs_f64(),
            r.layers_solved,
            r.timings.write.as_secs_f64(),
            regmean_gpu::peak_rss_bytes().map_or("n/a".into(), human_bytes)
        );
        if !r.fallbacks.is_empty() {
            eprintln!("  {} layers needed the fallback solve:", r.fallbacks.len());
            for (name, how) in &r.fallbacks {
                eprintln!("    {name}: {}", regmean::merge::describe(how));
            }
        }
        if ui.verbose > 0 {
            eprintln!("  files: {}", r.files.join(", "));
        }
    }
    ui.result(&format!(
        "merged {} {} models with {:?} into {}",
        r.models.len(),
        r.arch.name(),
        r.method,
        out.display()
    ));
}

pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.0} MB", b / 1e6)
    }
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
            ckpt.arch().name()
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

/// Terminal output: progress bars on stderr when it is a terminal, plain lines otherwise.
struct Ui {
    quiet: bool,
    verbose: u8,
    bar: RefCell<Option<ProgressBar>>,
}

impl Ui {
    fn new(quiet: bool, verbose: u8) -> Self {
        Ui {
            quiet,
            verbose,
            bar: RefCell::new(None),
        }
    }

    fn new_bar(&self, len: u64, msg: String) {
        self.clear();
        if self.quiet {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{msg:<32} [{bar:30}] {pos}/{len} {elapsed}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_message(msg);
        *self.bar.borrow_mut() = Some(bar);
    }

    fn clear(&self) {
        if let Some(b) = self.bar.borrow_mut().take() {
            b.finish_and_clear();
        }
    }

    fn info(&self, msg: &str) {
        if !self.quiet {
            self.line(msg);
        }
    }

    fn line(&self, msg: &str) {
        match self.bar.borrow().as_ref() {
            Some(b) if !b.is_hidden() => b.println(msg),
            _ => eprintln!("{msg}"),
        }
    }

    /// The one line printed even with --quiet.
    fn result(&self, msg: &str) {
        let _ =
            std::io::Write::write_all(&mut std::io::stdout().lock(), format!("{msg}\n").as_bytes());
    }
}

impl Observer for Ui {
    fn event(&self, e: Event<'_>) {
        match e {
            Event::ModelStart {
                index,
                total,
                name,
                examples,
            } => {
                if examples == 0 {
                    self.info(&format!("[{}/{total}] {name}: Grams from file", index + 1));
                } else {
                    self.new_bar(examples as u64, format!("[{}/{total}] {name}", index + 1));
                }
            }
            Event::Examples { done } => {
                if let Some(b) = self.bar.borrow().as_ref() {
                    b.set_position(done as u64);
                }
            }
            Event::ModelDone { .. } => self.clear(),
            Event::SolveStart { layers } => {
                if layers > 0 {
                    self.new_bar(layers as u64, "solving linear layers".into());
                }
            }
            Event::Solved { done } => {
                if let Some(b) = self.bar.borrow().as_ref() {
                    b.set_position(done as u64);
                }
            }
            Event::Writing { path } => {
                self.clear();
                if self.verbose > 0 {
                    self.info(&format!("writing {}", path.display()));
                }
            }
            Event::Warning(w) => self.line(&format!("warning: {w}")),
        }
    }
}

impl regmean_gpu::demo::Say for Ui {
    fn say(&self, msg: &str) {
        self.info(msg);
    }
}
