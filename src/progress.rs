//! Progress events of long work, so the library stays silent and the CLI decides how to show
//! them (bars, lines, nothing), and whether the caller asks it to stop.

use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub enum Event<'a> {
    /// Gram statistics of model `index` start: `examples` will be run.
    ModelStart {
        index: usize,
        total: usize,
        name: &'a str,
        examples: usize,
    },
    /// `done` of the examples announced by the last `ModelStart` or `EvalStart` have been
    /// through the forward pass.
    Examples {
        done: usize,
    },
    ModelDone {
        index: usize,
    },
    /// Solving `layers` linear layers.
    SolveStart {
        layers: usize,
    },
    /// The `done`-th layer is solved: its weight, how it was solved, and the solve's time.
    Solved {
        done: usize,
        layer: &'a str,
        how: &'a str,
        seconds: f64,
    },
    /// Every layer is solved; the writer, which ran alongside, still has tensors to write:
    /// `written` of `total` bytes are in the files.
    WriteStart {
        written: u64,
        total: u64,
    },
    /// `written` bytes of the tensors are in the files.
    Written {
        written: u64,
    },
    /// Every tensor is written; the files are being flushed to disk and the directory
    /// finished at `path`.
    Writing {
        path: &'a std::path::Path,
    },
    /// Evaluation: the data of task `index` (of `total`) is being read and checked, before
    /// any task is evaluated or as its evaluation starts.
    EvalCheck {
        index: usize,
        total: usize,
        name: &'a str,
    },
    /// Evaluation of task `index` (of `total`) starts: `examples` will be run.
    EvalStart {
        index: usize,
        total: usize,
        name: &'a str,
        examples: usize,
    },
    /// Something the user should know that does not stop the run.
    Warning(String),
    /// A choice the run made, or a caveat of the path it takes (one line).
    Note(String),
}

pub trait Observer {
    fn event(&self, e: Event<'_>);

    /// Whether the caller wants the run to stop. Long work asks between batches, models and
    /// layers (see [`stop_point`]) and then ends with [`Error::Interrupted`], its partial
    /// output removed as after any error. Used where the process lives on after the
    /// interrupt (the Python package); the command line never asks: its signal handler
    /// removes the partial outputs and exits.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// `Err(Error::Interrupted)` once `observer` asks the run to stop.
pub fn stop_point(observer: &dyn Observer) -> Result<()> {
    if observer.stop_requested() {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// Ignores everything.
pub struct Silent;

impl Observer for Silent {
    fn event(&self, _: Event<'_>) {}
}
