//! The merge arithmetic a backend owns: finishing a model's Grams where the forward pass
//! left them, the running sums Σ G'ᵢ (per site), Σ G'ᵢWᵢ and Σ Wᵢ (per solved module), the
//! per-module solve, and reading the solved weights back as host f32.
//!
//! Why a second trait beside [`Backend`] and not more methods on it: the forward pass and
//! the sums have different storage (a forward tensor may be f16; every sum is f32, and on a
//! GPU the sums of a site keep a scratch G' next to Σ G'), and models are written against
//! [`Backend`] alone. [`MergeArithmetic`] extends it (a supertrait), so one value, the
//! backend a run chose, owns both and a merge is generic over that one type: both schedules
//! and both methods run on either device through one code path, and `regmean/` never names
//! a device. The CPU engine implements it in `cpu_arith.rs`, the GPU in `cuda/arith.rs`.
//!
//! Weights are passed explicitly, as the backend's [`MergeArithmetic::Weight`]: the merge
//! makes each module's weight once ([`MergeArithmetic::linear_weight`]), builds the forward
//! pass's fused site weights from them ([`MergeArithmetic::site_weight_from`]) and hands
//! them to [`MergeArithmetic::add_weighted`].

use crate::backend::solve::SolveOutcome;
use crate::error::Result;
use crate::io::Checkpoint;
use crate::model::site::{LinearModule, Site};

use super::Backend;

pub trait MergeArithmetic: Backend {
    /// Σ G' of one `[d, d]` site, with room for the G' of the model being added.
    type SiteSums;
    /// Σ G'W and Σ W of one solved `[d_in, d_out]` module.
    type ModuleSums;
    /// One model's finished Gram of one site (full, symmetric, normalised, f32 `[d, d]`),
    /// where the backend holds it.
    type Gram;
    /// A linear weight as row-major f32 `[in, out]`, where the backend's products read it.
    type Weight;
    /// A solved weight `[d_in, d_out]` f32, before it is read back.
    type Solved;

    /// Zeroed sums for a site of width `d`.
    fn site_sums(&self, d: usize) -> Result<Self::SiteSums>;
    /// Zeroed sums for a module `[d_in, d_out]`.
    fn module_sums(&self, d_in: usize, d_out: usize) -> Result<Self::ModuleSums>;

    /// Finishes a Gram accumulator of width `d` (its lower triangle, as
    /// [`Backend::gram_update`] leaves it) where it is: mirrored to the full matrix and
    /// multiplied by `scale`. `Err(acc)`, given back, when the backend finishes Grams on the
    /// host instead (then the caller downloads and finishes it there).
    fn finish_gram(
        &self,
        acc: Self::Tensor,
        d: usize,
        scale: f32,
    ) -> Result<std::result::Result<Self::Gram, Self::Tensor>>;
    /// Whether every value of a finished Gram is finite.
    fn gram_is_finite(&self, gram: &Self::Gram) -> Result<bool>;
    /// A finished Gram in host memory (read from a statistics file, or finished on the
    /// host) as the backend holds one.
    fn upload_gram(&self, gram: Vec<f32>) -> Result<Self::Gram>;

    /// G' = `ratio`·G off the diagonal and `diag_mult`·G on it (FusionBench's
    /// `reduce_non_diagonal`), kept in `sums` as this model's G', and Σ G' += G'.
    fn add_gram(
        &self,
        sums: &mut Self::SiteSums,
        gram: Self::Gram,
        ratio: f32,
        diag_mult: f32,
    ) -> Result<()>;
    /// [`MergeArithmetic::add_gram`] of a Gram in host memory.
    fn add_host_gram(
        &self,
        sums: &mut Self::SiteSums,
        gram: Vec<f32>,
        ratio: f32,
        diag_mult: f32,
    ) -> Result<()> {
        let gram = self.upload_gram(gram)?;
        self.add_gram(sums, gram, ratio, diag_mult)
    }
    /// The weight of module `m` of `ckpt` as the products read it, made now (decoded on
    /// the host, or on a GPU from the stored bytes).
    fn linear_weight(&self, ckpt: &Checkpoint, m: &LinearModule) -> Result<Self::Weight>;
    /// The forward pass's `[in, Σ out]` weight of `site` (see [`Backend::site_weight`])
    /// from the weights of its modules, `parts`, in the site's order.
    fn site_weight_from(&self, site: &Site, parts: &[&Self::Weight]) -> Result<Self::Tensor>;
    /// Σ G'W += G'·W and Σ W += W, with the G' of the site `sums` feeds (added by
    /// [`MergeArithmetic::add_gram`] for this model).
    fn add_weighted(
        &self,
        sums: &mut Self::ModuleSums,
        site: &Self::SiteSums,
        weight: &Self::Weight,
    ) -> Result<()>;
    /// Every module of the site has its product with this model's G': the G' may go.
    fn model_added(&self, _site: &mut Self::SiteSums) {}

    /// W = (Σ G')⁻¹ Σ G'W of a module over `k` models, in f64 by Cholesky, with the fallback
    /// towards the average Σ W / k of `backend::solve` when the system cannot be trusted.
    fn solve(
        &self,
        site: &Self::SiteSums,
        module: &Self::ModuleSums,
        k: usize,
    ) -> Result<(Self::Solved, SolveOutcome)>;
    /// A solved weight as host f32 `[d_in, d_out]`.
    fn solved_to_host(&self, solved: Self::Solved) -> Result<Vec<f32>>;

    /// Whether the layer-wise schedule has been verified on this backend's device (a merge
    /// says so when it has not).
    fn layerwise_verified(&self) -> bool {
        true
    }
    /// Whether a merge should read the next task model's stored weights ahead, on another
    /// thread, while this one computes (worth it where they are copied to a device).
    fn reads_ahead(&self) -> bool {
        false
    }
    /// The GPU fault tests' hook, before task model `model`'s forward pass: nothing happens
    /// unless the test asks for it.
    fn inject_test_fault(&self, _model: usize) -> Result<()> {
        Ok(())
    }
}
