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
    /// `done` of the model's examples have been through the forward pass.
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
    Solved {
        done: usize,
    },
    Writing {
        path: &'a std::path::Path,
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
