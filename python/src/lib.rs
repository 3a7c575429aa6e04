//! `regmean_gpu._native`: the merge and the evaluation of the `regmean-gpu` command line,
//! called from Python. The Python side (`python/regmean_gpu/`) turns a config dict into
//! YAML text, the JSON results into dicts, and documents the functions; this module runs
//! the library's own entry points (`regmean::merge_on_device`, `eval::request::run_eval`)
//! exactly as the command line does: the same guards, staged outputs and messages.
//!
//! `GramAccumulator` and `solve` (`accumulator.rs`, over DLPack tensors: `dlpack.rs`) bind
//! the library's accumulator API for pipelines that compute their own activations.
//!
//! The work runs on a thread of its own while the calling thread waits without the GIL and
//! looks at Python's signals every few milliseconds: a Ctrl-C asks the run to stop (it
//! stops at its next batch, model or layer, and its partial output is removed), then the
//! `KeyboardInterrupt` is raised.

mod accumulator;
mod dlpack;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use regmean_gpu::backend::Precision;
use regmean_gpu::config::MergeConfig;
use regmean_gpu::device::select_device;
use regmean_gpu::eval::request::{run_eval, EvalRequest};
use regmean_gpu::progress::{Event, Observer};
use regmean_gpu::regmean::{self, report::check_report_path, MergeOptions};
use regmean_gpu::ui::{self, Ui};
use regmean_gpu::{with_backend, Error, Result};

pyo3::create_exception!(
    regmean_gpu,
    RegMeanError,
    PyException,
    "A regmean-gpu run failed; the message is the command line's one line."
);

/// The command line's progress display, and the flag a Ctrl-C in Python sets.
struct Progress<'a> {
    ui: Ui,
    stop: &'a AtomicBool,
}

impl Observer for Progress<'_> {
    fn event(&self, e: Event<'_>) {
        self.ui.event(e)
    }

    fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// How often the waiting thread looks at Python's signals.
const SIGNAL_POLL: Duration = Duration::from_millis(20);

/// Runs `job` on a thread of its own, without the GIL, until it ends; a Python signal
/// handler that raises (Ctrl-C: `KeyboardInterrupt`) asks the job to stop, and its
/// exception is what the call raises once the job has cleaned up.
fn interruptible<T: Send>(
    py: Python<'_>,
    job: impl FnOnce(&AtomicBool) -> Result<T> + Send,
) -> PyResult<T> {
    let stop = AtomicBool::new(false);
    let (result, raised) = std::thread::scope(|scope| {
        let worker = scope.spawn(|| job(&stop));
        let mut raised = None;
        while !worker.is_finished() {
            py.detach(|| std::thread::sleep(SIGNAL_POLL));
            if raised.is_none() {
                if let Err(e) = py.check_signals() {
                    stop.store(true, Ordering::Relaxed);
                    raised = Some(e);
                }
            }
        }
        let result = worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (result, raised)
    });
    if let Some(e) = raised {
        return Err(e);
    }
    // A mapped input truncated during the run reads as zeros after the fault: whatever was
    // computed from it is not reported as a success.
    let result = result.and_then(|v| regmean_gpu::io::mapped::check_no_fault().map(|()| v));
    result.map_err(to_py)
}

pub(crate) fn to_py(e: Error) -> PyErr {
    match e {
        Error::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err(e.to_string()),
        e => RegMeanError::new_err(e.to_string()),
    }
}

fn parse_precision(s: &str) -> PyResult<Precision> {
    match s {
        "float16" | "fp16" => Ok(Precision::Float16),
        "float32" | "fp32" => Ok(Precision::Float32),
        _ => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "`{s}` is not a precision: float16 or float32"
        ))),
    }
}

/// The config: read from `path`, or parsed from `text` (YAML or JSON) with relative paths
/// relative to the current directory; such a config is named `<dict>` in messages.
fn load_config(path: Option<&Path>, text: Option<&str>) -> Result<MergeConfig> {
    match (path, text) {
        (Some(p), _) => MergeConfig::load(p),
        (None, Some(t)) => {
            let mut cfg = MergeConfig::parse(t, Path::new("<dict>"))?;
            // Not a file: nothing on disk for the output guard to protect.
            cfg.path = PathBuf::new();
            Ok(cfg)
        }
        (None, None) => Err(Error::invalid("give a config: a path or a dict")),
    }
}

/// Merges as `regmean-gpu merge CONFIG OUT_DIR` does; returns the JSON report.
#[pyfunction]
#[pyo3(signature = (config_path, config_text, out_dir, device, force, quiet, verbose, out_shard_size, max_memory, precision, report_json))]
#[allow(clippy::too_many_arguments)]
fn merge(
    py: Python<'_>,
    config_path: Option<PathBuf>,
    config_text: Option<String>,
    out_dir: PathBuf,
    device: String,
    force: bool,
    quiet: bool,
    verbose: u8,
    out_shard_size: u64,
    max_memory: Option<u64>,
    precision: Option<String>,
    report_json: Option<PathBuf>,
) -> PyResult<String> {
    let precision = precision.as_deref().map(parse_precision).transpose()?;
    interruptible(py, move |stop| {
        let progress = Progress {
            ui: Ui::new(quiet, verbose),
            stop,
        };
        let mut cfg = load_config(config_path.as_deref(), config_text.as_deref())?;
        let gpu = select_device(&device, &cfg.base_model, &progress)?;
        if let Some(p) = precision {
            cfg.parameters.precision = p;
        }
        let opts = MergeOptions {
            out_shard_bytes: out_shard_size,
            force,
            max_memory,
        };
        if let Some(path) = &report_json {
            check_report_path(path, &cfg.inputs())?;
        }
        let (report, json) = with_backend!(&gpu, cfg.parameters.precision, |backend| {
            let report_json = report_json.as_deref();
            regmean::merge_on_device(&backend, &cfg, &out_dir, &opts, report_json, &progress)
        })
        .inspect_err(|_| progress.ui.clear())?;
        progress.ui.clear();
        if !quiet {
            ui::print_summary(&report, &out_dir, &progress.ui);
        }
        Ok(json.to_string())
    })
}

/// Evaluates as `regmean-gpu eval MODEL ...` does; returns the JSON result.
#[pyfunction]
#[pyo3(signature = (model, config, data, task, head, classes, base, batch_size, max_length, device, precision, quiet))]
#[allow(clippy::too_many_arguments)]
fn eval(
    py: Python<'_>,
    model: PathBuf,
    config: Option<PathBuf>,
    data: Option<PathBuf>,
    task: Option<String>,
    head: Option<PathBuf>,
    classes: Option<PathBuf>,
    base: Option<PathBuf>,
    batch_size: Option<usize>,
    max_length: Option<usize>,
    device: String,
    precision: String,
    quiet: bool,
) -> PyResult<String> {
    let precision = parse_precision(&precision)?;
    interruptible(py, move |stop| {
        let progress = Progress {
            ui: Ui::new(quiet, 0),
            stop,
        };
        let gpu = select_device(&device, &model, &progress)?;
        let req = EvalRequest {
            model,
            config,
            data,
            task,
            head,
            classes,
            base,
            batch_size,
            max_length,
        };
        let outcome = with_backend!(&gpu, precision, |backend| run_eval(
            &backend, &req, &progress
        ))
        .inspect_err(|_| progress.ui.clear())?;
        progress.ui.clear();
        Ok(outcome.to_json().to_string())
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(eval, m)?)?;
    m.add_function(wrap_pyfunction!(accumulator::solve, m)?)?;
    m.add_class::<accumulator::PyGramAccumulator>()?;
    m.add("RegMeanError", m.py().get_type::<RegMeanError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
