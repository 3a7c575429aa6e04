//! What the command line shows while it works: progress bars on stderr when it is a
//! terminal, one plain line per stage otherwise. `-q` shows only errors and the final line;
//! `-v` adds each layer's solve outcome and the time of each model, layer and phase.

use std::cell::RefCell;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::progress::{Event, Observer};
use crate::regmean::{self, MergeReport};

pub struct Ui {
    pub quiet: bool,
    pub verbose: u8,
    bar: RefCell<Option<ProgressBar>>,
    /// The model whose Grams are under way and when it started, for `-v`.
    model: RefCell<Option<(String, Instant)>>,
}

/// What a bar counts.
#[derive(Clone, Copy)]
enum Unit {
    Items,
    Bytes,
}

impl Ui {
    pub fn new(quiet: bool, verbose: u8) -> Self {
        Ui {
            quiet,
            verbose,
            bar: RefCell::new(None),
            model: RefCell::new(None),
        }
    }

    /// A bar for the next stage; where stderr is no terminal, the stage's name as a line.
    fn new_bar(&self, len: u64, position: u64, msg: String, unit: Unit) {
        self.clear();
        if self.quiet {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        if bar.is_hidden() {
            eprintln!("{msg}");
            return;
        }
        let counts = match unit {
            Unit::Items => "{pos}/{len}",
            Unit::Bytes => "{bytes}/{total_bytes}",
        };
        bar.set_style(
            ProgressStyle::with_template(&format!("{{msg:<32}} [{{bar:30}}] {counts} {{elapsed}}"))
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_message(msg);
        bar.set_position(position);
        // The elapsed time moves on while one long batch or file runs.
        bar.enable_steady_tick(Duration::from_millis(250));
        *self.bar.borrow_mut() = Some(bar);
    }

    fn set_position(&self, pos: u64) {
        if let Some(b) = self.bar.borrow().as_ref() {
            b.set_position(pos);
        }
    }

    pub fn clear(&self) {
        if let Some(b) = self.bar.borrow_mut().take() {
            b.finish_and_clear();
        }
    }

    pub fn info(&self, msg: &str) {
        if !self.quiet {
            self.line(msg);
        }
    }

    /// Detail shown with `-v`.
    fn detail(&self, msg: &str) {
        if self.verbose > 0 && !self.quiet {
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
    pub fn result(&self, msg: &str) {
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
                *self.model.borrow_mut() = Some((name.to_string(), Instant::now()));
                if examples == 0 {
                    self.info(&format!("[{}/{total}] {name}: Grams from file", index + 1));
                } else {
                    let msg = format!("[{}/{total}] {name}", index + 1);
                    self.new_bar(examples as u64, 0, msg, Unit::Items);
                }
            }
            Event::Examples { done } => self.set_position(done as u64),
            Event::ModelDone { .. } => {
                self.clear();
                if let Some((name, started)) = self.model.borrow_mut().take() {
                    let seconds = started.elapsed().as_secs_f64();
                    self.detail(&format!("  {name}: forward + Grams {seconds:.2}s"));
                }
            }
            Event::SolveStart { layers } => {
                if layers > 0 {
                    self.new_bar(
                        layers as u64,
                        0,
                        "solving linear layers".into(),
                        Unit::Items,
                    );
                }
            }
            Event::Solved {
                done,
                layer,
                how,
                seconds,
            } => {
                self.set_position(done as u64);
                self.detail(&format!("  {layer}: {how} in {seconds:.3}s"));
            }
            Event::WriteStart { written, total } => {
                if written < total {
                    self.new_bar(total, written, "writing the output".into(), Unit::Bytes);
                }
            }
            Event::Written { written } => self.set_position(written),
            Event::Writing { path } => {
                self.clear();
                self.detail(&format!(
                    "flushing to disk and finishing {}",
                    path.display()
                ));
            }
            Event::EvalCheck { index, total, name } => {
                let msg = format!("reading evaluation data: {name}");
                self.new_bar(total as u64, index as u64, msg, Unit::Items);
            }
            Event::EvalStart {
                index,
                total,
                name,
                examples,
            } => {
                let msg = format!("[{}/{total}] evaluating {name}", index + 1);
                self.new_bar(examples as u64, 0, msg, Unit::Items);
            }
            Event::Warning(w) => {
                if !self.quiet {
                    self.line(&format!("warning: {w}"));
                }
            }
            Event::Note(n) => self.info(&n),
        }
    }
}

impl crate::demo::Say for Ui {
    fn say(&self, msg: &str) {
        self.info(msg);
    }
}

/// "1 model", "4 models".
pub fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else {
        format!("{:.0} MB", b / 1e6)
    }
}

/// The merge's summary (per model, per phase) and its final line.
pub fn print_summary(r: &MergeReport, out: &Path, ui: &Ui) {
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
        let t = &r.timings;
        let solve = if r.layers_solved > 0 {
            format!(
                "solve {:.2}s ({}) · write {:.2}s after the solve",
                t.solve.as_secs_f64(),
                count(r.layers_solved, "layer"),
                t.write.as_secs_f64()
            )
        } else {
            format!("write {:.2}s", (t.solve + t.write).as_secs_f64())
        };
        eprintln!(
            "\n  forward + Grams {:.2}s · {solve} · peak memory {}",
            t.grams.as_secs_f64(),
            crate::peak_rss_bytes().map_or("n/a".into(), human_bytes)
        );
        // The writer runs alongside the solve: its own time is not a phase of the merge.
        eprintln!(
            "  the writer worked {:.2}s on {} of tensors{}",
            t.writer_busy.as_secs_f64(),
            human_bytes(r.tensor_bytes),
            if r.layers_solved > 0 {
                ", alongside the solve and after it"
            } else {
                ""
            }
        );
        if let Some(c) = r.activation_cache {
            let on_device = if c.on_device_bytes > 0 {
                format!("{} on the device, ", human_bytes(c.on_device_bytes))
            } else {
                String::new()
            };
            eprintln!(
                "  merged layer by layer · activation caches {on_device}{} in memory, {} spilled to disk",
                human_bytes(c.in_memory_bytes),
                human_bytes(c.spilled_bytes)
            );
        }
        if ui.verbose > 0 {
            eprintln!(
                "  of the forward + Grams: loading weights {:.2}s, adding to the sums {:.2}s",
                t.model_load.as_secs_f64(),
                t.sums.as_secs_f64()
            );
        }
        if !r.fallbacks.is_empty() {
            eprintln!(
                "  {} needed the fallback solve:",
                count(r.fallbacks.len(), "layer")
            );
            for (name, how) in &r.fallbacks {
                eprintln!("    {name}: {}", regmean::describe(how));
            }
        }
        if ui.verbose > 0 {
            eprintln!("  files: {}", r.files.join(", "));
        }
    }
    ui.result(&format!(
        "merged {} ({}) into {}",
        count(r.models.len(), &format!("{} model", r.arch.title())),
        r.method.title(),
        out.display()
    ));
}
