//! Progress events of long work, so the library stays silent and the CLI decides how to show
//! them (bars, lines, nothing).

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
}

/// Ignores everything.
pub struct Silent;

impl Observer for Silent {
    fn event(&self, _: Event<'_>) {}
}
