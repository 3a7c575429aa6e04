//! Gram accumulation during the forward pass, and the host-side Gram matrices it produces.

use rayon::prelude::*;

use crate::backend::{Backend, GramUpdate, MergeArithmetic};
use crate::config::Parameters;
use crate::data::{make_batch, select, Dataset, TextPadding};
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::{Batch, ForwardHooks, GramSink, Model, ModelConfig, ParamSource, Site};
use crate::progress::{stop_point, Event, Observer};

/// The normalised Gram matrix of one site: G = Σ XᵀX / rows, full `[dim, dim]`, f32.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteGram {
    pub name: String,
    pub dim: usize,
    pub rows: u64,
    pub gram: Vec<f32>,
}

/// Every site's Gram of one model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelGrams {
    pub sites: Vec<SiteGram>,
    /// Examples that went through the forward pass.
    pub examples: usize,
    /// The most device memory in use while they did (GPU backends only).
    pub peak_device_bytes: Option<u64>,
}

/// One model's normalised, full Grams `[d, d]` f32 where the backend finished them (on its
/// device), with the rows each counted.
pub struct BackendGrams<B: MergeArithmetic> {
    pub sites: Vec<(B::Gram, u64)>,
    pub examples: usize,
    pub peak_device_bytes: Option<u64>,
}

/// A Gram holding inf or NaN: the activations overflowed (or the weights are broken). Left
/// alone, the solve would see it only as a failed factorisation and fall back to averaging.
fn non_finite(site: &str) -> Error {
    Error::Numerical(format!(
        "site `{site}`: the forward pass produced non-finite activations (inf or NaN); on a GPU in float16 a value above 65504 overflows: set `precision: float32` in the config's parameters (or pass --precision float32)"
    ))
}

fn no_rows(site: &str) -> Error {
    Error::invalid(format!(
        "site `{site}` saw no rows: the data has no real tokens"
    ))
}

/// Accumulates one model's Grams on the backend; FusionBench's running mean in compat mode,
/// a plain sum over non-padding rows otherwise.
pub struct GramAccumulator<'b, B: Backend> {
    backend: &'b B,
    sites: Vec<Site>,
    acc: Vec<B::Tensor>,
    rows: Vec<u64>,
    compat: bool,
    peak_device_bytes: Option<u64>,
    /// Time spent reading the model's weights onto the backend.
    pub load_time: std::time::Duration,
}

impl<'b, B: Backend> GramAccumulator<'b, B> {
    pub fn new(backend: &'b B, sites: Vec<Site>, compat: bool) -> Result<Self> {
        let acc = sites
            .iter()
            .map(|s| backend.gram_accumulator(s.dim))
            .collect::<Result<_>>()?;
        let rows = vec![0; sites.len()];
        Ok(GramAccumulator {
            backend,
            sites,
            acc,
            rows,
            compat,
            peak_device_bytes: backend.memory_in_use(),
            load_time: std::time::Duration::ZERO,
        })
    }

    /// Rows counted so far, per site.
    pub fn rows(&self) -> &[u64] {
        &self.rows
    }

    /// Downloads, normalises and symmetrises the accumulators.
    pub fn finish(self, examples: usize) -> Result<ModelGrams> {
        let mut out = Vec::with_capacity(self.sites.len());
        for ((site, acc), rows) in self.sites.into_iter().zip(self.acc).zip(self.rows) {
            if rows == 0 {
                return Err(no_rows(&site.name));
            }
            let mut g = self.backend.download_owned(acc)?;
            let d = site.dim;
            // The lower triangle is what the accumulator defines.
            let finite = g
                .par_chunks(d.max(1))
                .enumerate()
                .all(|(i, row)| row[..=i].iter().all(|v| v.is_finite()));
            if !finite {
                return Err(non_finite(&site.name));
            }
            mirror_lower_in_place(&mut g, d);
            if !self.compat {
                let n = rows as f32;
                g.par_chunks_mut(1 << 14)
                    .for_each(|c| c.iter_mut().for_each(|v| *v /= n));
            }
            out.push(SiteGram {
                name: site.name,
                dim: d,
                rows,
                gram: g,
            });
        }
        Ok(ModelGrams {
            sites: out,
            examples,
            peak_device_bytes: self.peak_device_bytes,
        })
    }
}

impl<B: MergeArithmetic> GramAccumulator<'_, B> {
    /// Normalises and symmetrises the accumulators where they are (on the backend's
    /// device) when the backend finishes Grams there; gives the accumulator back otherwise,
    /// to be finished on the host ([`GramAccumulator::finish`]).
    pub fn finish_on_backend(
        mut self,
        examples: usize,
    ) -> Result<std::result::Result<BackendGrams<B>, Self>> {
        if let Some(site) = self.sites.iter().zip(&self.rows).find(|(_, &r)| r == 0) {
            return Err(no_rows(&site.0.name));
        }
        let mut accs = std::mem::take(&mut self.acc).into_iter();
        let mut out = Vec::with_capacity(self.sites.len());
        for (site, rows) in self.sites.iter().zip(&self.rows) {
            let t = accs.next().expect("one accumulator per site");
            let scale = if self.compat { 1.0 } else { 1.0 / *rows as f32 };
            let g = match self.backend.finish_gram(t, site.dim, scale)? {
                Ok(g) => g,
                Err(t) => {
                    // Finished on the host (the first one decides: all come from one backend).
                    self.acc = std::iter::once(t).chain(accs).collect();
                    return Ok(Err(self));
                }
            };
            if !self.backend.gram_is_finite(&g)? {
                return Err(non_finite(&site.name));
            }
            out.push((g, *rows));
        }
        Ok(Ok(BackendGrams {
            sites: out,
            examples,
            peak_device_bytes: self.peak_device_bytes,
        }))
    }
}

/// Fills the upper triangle of the row-major `[d, d]` matrix `g` from its lower triangle, in
/// parallel over bands of 32 rows. Each `32 × 32` block of the band's upper part is read
/// from its mirror image below the diagonal (32 rows of 32 contiguous elements) into a tile,
/// then written from the tile as 32 rows of 32 contiguous elements. Element by element,
/// the writes went down a column, `d·4` bytes apart: for d a multiple of 1,024 they fell into
/// a few L1 sets and evicted each other, and this was 2% of a CLIP merge.
pub(crate) fn mirror_lower_in_place(g: &mut [f32], d: usize) {
    const BAND: usize = 32;
    assert_eq!(g.len(), d * d, "mirror_lower_in_place: [{d}, {d}]");
    struct Base(*mut f32);
    // SAFETY: shared between the bands below, which touch disjoint elements (see there).
    unsafe impl Sync for Base {}
    let base = Base(g.as_mut_ptr());
    (0..d.div_ceil(BAND)).into_par_iter().for_each(|band| {
        let base = &base;
        let (r0, r1) = (band * BAND, ((band + 1) * BAND).min(d));
        let mut tile = [[0.0f32; BAND]; BAND];
        for j0 in (r0..d).step_by(BAND) {
            let j1 = (j0 + BAND).min(d);
            // tile[i − r0][j − j0] = g[j][i] for the block's i < j.
            for j in j0..j1 {
                for i in r0..r1.min(j) {
                    // SAFETY: j, i < d. Row j > column i: the lower triangle, which no
                    // band writes.
                    tile[i - r0][j - j0] = unsafe { *base.0.add(j * d + i) };
                }
            }
            for i in r0..r1 {
                // Columns max(j0, i + 1)..j1 of row i: the strict upper triangle.
                let from = j0.max(i + 1);
                if from < j1 {
                    let part = &tile[i - r0][from - j0..j1 - j0];
                    // SAFETY: i < from ≤ j < j1 ≤ d: elements of the upper triangle (i < j) of
                    // this band's own rows r0..r1, which no other band touches; `part` is
                    // the local tile, not `g`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            part.as_ptr(),
                            base.0.add(i * d + from),
                            part.len(),
                        )
                    };
                }
            }
        }
    });
}

impl<B: Backend> GramSink<B> for GramAccumulator<'_, B> {
    fn observe(&mut self, site: usize, x: &B::Tensor, row_mask: Option<&[u8]>) -> Result<()> {
        let (n, _) = self.backend.shape(x);
        // Sampled at each block's last site (the MLP's wide activation is live then), not
        // at every site: the query is a driver call.
        if site % 4 == 3 {
            if let Some(used) = self.backend.memory_in_use() {
                self.peak_device_bytes = Some(self.peak_device_bytes.unwrap_or(0).max(used));
            }
        }
        if self.compat {
            // FusionBench counts every row, padding included.
            let seen = self.rows[site];
            self.backend.gram_update(
                &mut self.acc[site],
                x,
                None,
                GramUpdate::RunningMean { seen },
            )?;
            self.rows[site] += n as u64;
        } else {
            self.backend
                .gram_update(&mut self.acc[site], x, row_mask, GramUpdate::Sum)?;
            self.rows[site] += row_mask.map_or(n, |m| m.iter().filter(|&&v| v != 0).count()) as u64;
        }
        Ok(())
    }
}

/// Runs a model over its task data and returns its Grams.
pub fn compute_grams<B: Backend>(
    backend: &B,
    ckpt: &Checkpoint,
    config: &ModelConfig,
    data: &Dataset,
    params: &Parameters,
    observer: &dyn Observer,
) -> Result<ModelGrams> {
    let (acc, examples) = accumulate_grams(backend, ckpt, ckpt, config, data, params, observer)?;
    acc.finish(examples)
}

/// Runs a model over its task data, its parameters read from `src`; returns the
/// accumulators, still on the backend, and the number of examples that went through.
pub fn accumulate_grams<'b, B: Backend>(
    backend: &'b B,
    ckpt: &Checkpoint,
    src: &dyn ParamSource<B>,
    config: &ModelConfig,
    data: &Dataset,
    params: &Parameters,
    observer: &dyn Observer,
) -> Result<(GramAccumulator<'b, B>, usize)> {
    let (indices, warning) = select(data.len(), &params.sampling());
    if let Some(w) = warning {
        observer.event(Event::Warning(format!("{}: {w}", data.path().display())));
    }
    let padding = check_data(config, data, params)?;
    let batch_size = params.batch_size;
    let acc = std::thread::scope(|scope| -> Result<GramAccumulator<'b, B>> {
        // Batches are made ahead on another thread (from the start: the first ones while
        // the model loads), two at most waiting, so the forward pass never waits for them.
        let (ready, batches) = std::sync::mpsc::sync_channel::<Result<(usize, Batch)>>(2);
        let indices = &indices;
        let producer = scope.spawn(move || {
            for chunk in indices.chunks(batch_size) {
                let batch = crate::profile::span("data: make_batch (ahead)", || {
                    make_batch(data, chunk, padding)
                });
                let failed = batch.is_err();
                // A closed channel means the forward pass stopped (an error): stop too.
                if ready.send(batch.map(|b| (chunk.len(), b))).is_err() || failed {
                    break;
                }
            }
        });
        let run = || -> Result<GramAccumulator<'b, B>> {
            let loading = std::time::Instant::now();
            let model = Model::load_from(backend, ckpt, src)?;
            let mut acc = GramAccumulator::new(backend, config.sites(), params.fusionbench_compat)?;
            acc.load_time = loading.elapsed();
            let mut done = 0;
            for next in batches {
                let (n, batch) = next?;
                crate::profile::span("forward + Grams (enqueue)", || {
                    model.forward(
                        backend,
                        &batch,
                        ForwardHooks {
                            grams: Some(&mut acc),
                            hidden_states: None,
                        },
                    )
                })?;
                done += n;
                observer.event(Event::Examples { done });
                stop_point(observer)?;
            }
            Ok(acc)
        };
        let result = run();
        // Joined here, not by the scope: a panic while making batches becomes an error
        // (the channel then closes early, which `run` alone would take for the end).
        let producer = producer
            .join()
            .map_err(|_| Error::Backend("the thread preparing input batches panicked".into()));
        let acc = result?;
        producer?;
        Ok(acc)
    })?;
    if crate::profile::enabled() {
        // Waits for the queued GPU work, so that the span above plus this one is its time.
        crate::profile::span("forward + Grams (wait)", || backend.download(&acc.acc[0]))?;
    }
    Ok((acc, indices.len()))
}

/// Checks that the data fits the model (kind, token ids, lengths, image size) and returns
/// the text padding rule.
pub fn check_data(
    config: &ModelConfig,
    data: &Dataset,
    params: &Parameters,
) -> Result<TextPadding> {
    match (config, data) {
        (ModelConfig::Gpt2(c), Dataset::Tokens { path, sequences }) => {
            let limit = params.max_length.min(c.n_positions);
            if params.fusionbench_compat && params.max_length > c.n_positions {
                return Err(Error::invalid(format!(
                    "max_length {} exceeds the model's n_positions {}: lower parameters.max_length",
                    params.max_length, c.n_positions
                )));
            }
            for (i, s) in sequences.iter().enumerate() {
                if let Some(id) = s.iter().find(|&&id| id as usize >= c.vocab_size) {
                    return Err(Error::file(
                        path,
                        format!(
                            "example {}: token id {id} ≥ vocab_size {}",
                            i + 1,
                            c.vocab_size
                        ),
                    ));
                }
                if s.len() > c.n_positions && params.max_length > c.n_positions {
                    return Err(Error::file(
                        path,
                        format!("example {}: {} tokens exceed the model's n_positions {} (truncate them: parameters.max_length in a merge config, --max-length on the command line)", i + 1, s.len(), c.n_positions),
                    ));
                }
            }
            Ok(TextPadding {
                pad_id: c.pad_token_id,
                max_length: limit,
                to_max_length: params.fusionbench_compat,
            })
        }
        (ModelConfig::Clip(c), Dataset::Pixels { shape, .. } | Dataset::Images { shape, .. }) => {
            let want = [c.num_channels, c.image_size, c.image_size];
            if *shape != want {
                let what = match data {
                    Dataset::Images { .. } => "the preprocessor config makes images",
                    _ => "pixel_values images are",
                };
                return Err(Error::file(
                    data.path(),
                    format!("{what} {shape:?}, the model expects {want:?} (C, H, W)"),
                ));
            }
            Ok(TextPadding {
                pad_id: 0,
                max_length: 0,
                to_max_length: false,
            })
        }
        (ModelConfig::Llama(c), Dataset::Tokens { path, sequences }) => c.check_tokens(
            path,
            sequences,
            params.max_length,
            params.fusionbench_compat,
        ),
        (ModelConfig::Llama(_), d) => Err(Error::file(
            d.path(),
            "a decoder LLM needs text or token data (.jsonl), not images",
        )),
        (ModelConfig::Gpt2(_), d) => Err(Error::file(
            d.path(),
            "GPT-2 needs text or token data (.jsonl), not images",
        )),
        (ModelConfig::Clip(_), d) => Err(Error::file(
            d.path(),
            "a CLIP vision model needs images (a folder, or pixel_values in .safetensors), not text",
        )),
    }
}

/// `Batch` for the `forward` command and tests: the first examples, FusionBench-free padding.
pub fn batch_of(
    config: &ModelConfig,
    data: &Dataset,
    params: &Parameters,
    indices: &[usize],
) -> Result<Batch> {
    let padding = check_data(config, data, params)?;
    make_batch(data, indices, padding)
}

#[cfg(test)]
mod tests {
    use super::mirror_lower_in_place;

    #[test]
    fn mirroring_copies_the_lower_triangle_and_keeps_it() {
        for d in [0, 1, 31, 32, 33, 70] {
            let lower: Vec<f32> = (0..d * d)
                .map(|k| {
                    if k % d >= k / d.max(1) && k % d != k / d {
                        -1.0
                    } else {
                        k as f32
                    }
                })
                .collect();
            let mut g = lower.clone();
            mirror_lower_in_place(&mut g, d);
            for i in 0..d {
                for j in 0..d {
                    let want = if j <= i {
                        lower[i * d + j]
                    } else {
                        lower[j * d + i]
                    };
                    assert_eq!(g[i * d + j], want, "d {d} ({i}, {j})");
                }
            }
        }
    }
}
