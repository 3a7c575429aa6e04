//! The merge arithmetic on the CPU engine ([`MergeArithmetic`] for [`CpuBackend`]): the
//! sums in host memory, folded in by `backend::sums` and solved by `backend::solve` (f64
//! Cholesky with faer). Grams are finished on the host by the Gram accumulator itself.

use super::arith::MergeArithmetic;
use super::cpu::{CpuBackend, CpuTensor};
use super::cpu_tensor::written_zeros_small_pages;
use super::Backend;
use crate::backend::solve::{solve_layer, SolveOutcome};
use crate::backend::sums::{add_weighted, reduce_into};
use crate::error::Result;
use crate::io::Checkpoint;
use crate::model::site::{fuse_in_out, linear_in_out, LinearModule, Site};
use crate::profile::span;

/// Σ G' of one site `[d, d]`, and this model's G' while its products are added.
pub struct CpuSiteSums {
    d: usize,
    gram_sum: Vec<f32>,
    reduced: Vec<f32>,
}

/// Σ G'W and Σ W of one module, `[d_in, d_out]` row-major.
pub struct CpuModuleSums {
    d_in: usize,
    d_out: usize,
    gw_sum: Vec<f32>,
    w_sum: Vec<f32>,
}

impl MergeArithmetic for CpuBackend {
    type SiteSums = CpuSiteSums;
    type ModuleSums = CpuModuleSums;
    type Gram = Vec<f32>;
    type Weight = Vec<f32>;
    type Solved = Vec<f32>;

    fn site_sums(&self, d: usize) -> Result<CpuSiteSums> {
        Ok(CpuSiteSums {
            d,
            gram_sum: written_zeros_small_pages(d * d),
            reduced: Vec::new(),
        })
    }

    fn module_sums(&self, d_in: usize, d_out: usize) -> Result<CpuModuleSums> {
        Ok(CpuModuleSums {
            d_in,
            d_out,
            gw_sum: written_zeros_small_pages(d_in * d_out),
            w_sum: written_zeros_small_pages(d_in * d_out),
        })
    }

    fn finish_gram(
        &self,
        acc: CpuTensor,
        _d: usize,
        _scale: f32,
    ) -> Result<std::result::Result<Vec<f32>, CpuTensor>> {
        // The accumulator finishes host Grams itself (its checks and its division by rows).
        Ok(Err(acc))
    }

    fn gram_is_finite(&self, gram: &Vec<f32>) -> Result<bool> {
        Ok(gram.iter().all(|v| v.is_finite()))
    }

    fn upload_gram(&self, gram: Vec<f32>) -> Result<Vec<f32>> {
        Ok(gram)
    }

    fn add_gram(
        &self,
        sums: &mut CpuSiteSums,
        gram: Vec<f32>,
        ratio: f32,
        diag_mult: f32,
    ) -> Result<()> {
        sums.reduced = reduce_into(gram, &mut sums.gram_sum, sums.d, ratio, diag_mult);
        Ok(())
    }

    fn linear_weight(&self, ckpt: &Checkpoint, m: &LinearModule) -> Result<Vec<f32>> {
        span("load: decode + transpose", || linear_in_out(ckpt, m))
    }

    fn site_weight_from(&self, site: &Site, parts: &[&Vec<f32>]) -> Result<CpuTensor> {
        let views: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        let (w, out) = fuse_in_out(site, &views);
        span("load: upload", || self.upload_owned(w, site.dim, out))
    }

    fn add_weighted(
        &self,
        sums: &mut CpuModuleSums,
        site: &CpuSiteSums,
        weight: &Vec<f32>,
    ) -> Result<()> {
        add_weighted(
            &mut sums.gw_sum,
            &mut sums.w_sum,
            &site.reduced,
            weight,
            sums.d_in,
            sums.d_out,
        );
        Ok(())
    }

    fn model_added(&self, site: &mut CpuSiteSums) {
        site.reduced = Vec::new();
    }

    fn solve(
        &self,
        site: &CpuSiteSums,
        module: &CpuModuleSums,
        k: usize,
    ) -> Result<(Vec<f32>, SolveOutcome)> {
        let w_mean: Vec<f32> = module.w_sum.iter().map(|v| v / k as f32).collect();
        Ok(solve_layer(
            &site.gram_sum,
            &module.gw_sum,
            &w_mean,
            module.d_in,
            module.d_out,
        ))
    }

    fn solved_to_host(&self, solved: Vec<f32>) -> Result<Vec<f32>> {
        Ok(solved)
    }
}
