//! The merge arithmetic on a GPU ([`MergeArithmetic`] for [`CudaBackend`]): Grams finished
//! where the forward pass left them, the running sums on the device ([`gram`]'s
//! `DeviceSiteSums` and `DeviceModuleSums`), weights made there from the stored bytes
//! ([`weights`]), and the f64 Cholesky solve with cuSOLVER ([`solve`]). These are the calls
//! the merge made directly before; they are only reached through the trait now.

use cudarc::driver::CudaSlice;

use super::convert::any_nonfinite;
use super::forward::{CudaBackend, CudaTensor};
use super::gram::{mirror_scale, DeviceModuleSums, DeviceSiteSums};
use super::{solve, weights};
use crate::backend::arith::MergeArithmetic;
use crate::backend::solve::SolveOutcome;
use crate::error::Result;
use crate::io::Checkpoint;
use crate::model::site::{LinearModule, Site};
use crate::profile::span;

impl MergeArithmetic for CudaBackend {
    type SiteSums = DeviceSiteSums;
    type ModuleSums = DeviceModuleSums;
    type Gram = CudaSlice<f32>;
    type Weight = CudaSlice<f32>;
    type Solved = CudaSlice<f32>;

    fn site_sums(&self, d: usize) -> Result<DeviceSiteSums> {
        DeviceSiteSums::new(self.device(), d)
    }

    fn module_sums(&self, d_in: usize, d_out: usize) -> Result<DeviceModuleSums> {
        DeviceModuleSums::new(self.device(), d_in, d_out)
    }

    fn finish_gram(
        &self,
        acc: CudaTensor,
        d: usize,
        scale: f32,
    ) -> Result<std::result::Result<CudaSlice<f32>, CudaTensor>> {
        match self.take_device_f32(acc) {
            Ok(mut g) => {
                mirror_scale(self.device(), &mut g, d, scale)?;
                Ok(Ok(g))
            }
            Err(acc) => Ok(Err(acc)),
        }
    }

    fn gram_is_finite(&self, gram: &CudaSlice<f32>) -> Result<bool> {
        Ok(!any_nonfinite(self.device(), gram)?)
    }

    fn upload_gram(&self, gram: Vec<f32>) -> Result<CudaSlice<f32>> {
        self.device().upload(&gram, "Gram")
    }

    fn add_gram(
        &self,
        sums: &mut DeviceSiteSums,
        gram: CudaSlice<f32>,
        ratio: f32,
        diag_mult: f32,
    ) -> Result<()> {
        sums.add(self.device(), &gram, ratio, diag_mult)?;
        // The model's Gram is freed before its products: G' holds what they need.
        drop(gram);
        Ok(())
    }

    fn linear_weight(&self, ckpt: &Checkpoint, m: &LinearModule) -> Result<CudaSlice<f32>> {
        span("load: weights on the GPU", || {
            weights::linear_in_out(self.device(), ckpt, m)
        })
    }

    fn site_weight_from(&self, site: &Site, parts: &[&CudaSlice<f32>]) -> Result<CudaTensor> {
        self.site_weight_from_parts(site, parts)
    }

    fn add_weighted(
        &self,
        sums: &mut DeviceModuleSums,
        site: &DeviceSiteSums,
        weight: &CudaSlice<f32>,
    ) -> Result<()> {
        span("sums: G'W (enqueue)", || {
            sums.add(self.device(), &site.reduced, weight)
        })
    }

    fn solve(
        &self,
        site: &DeviceSiteSums,
        module: &DeviceModuleSums,
        k: usize,
    ) -> Result<(CudaSlice<f32>, SolveOutcome)> {
        solve::solve_layer(
            self.device(),
            &site.gram_sum,
            &module.gw_sum,
            &module.w_sum,
            k,
            module.d_in,
            module.d_out,
        )
    }

    fn solved_to_host(&self, solved: CudaSlice<f32>) -> Result<Vec<f32>> {
        self.device().download(&solved)
    }

    fn layerwise_verified(&self) -> bool {
        false
    }

    fn reads_ahead(&self) -> bool {
        true
    }

    fn inject_test_fault(&self, model: usize) -> Result<()> {
        self.device().inject_test_fault(model)
    }
}
