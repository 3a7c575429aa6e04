//! The running state of a model-by-model merge: Σ G'ᵢ per site, Σ G'ᵢWᵢ and Σ Wᵢ per solved
//! module (in host memory or on the GPU that will solve them), the sums of every averaged
//! parameter, and the solve at the end.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::gram::{DeviceGrams, ModelGrams};
use super::solve::{solve_layer, SolveOutcome};
use super::sums::{add_weighted, reduce_into};
use crate::backend::cuda::gram::{DeviceModuleSums, DeviceSiteSums};
use crate::backend::cuda::CudaDevice;
use crate::config::ExcludeSet;
use crate::error::{Error, Result};
use crate::io::Checkpoint;
use crate::model::{take_linear_in_out, LinearModule, ModelConfig, Site};

/// A linear weight merged by RegMean.
pub(super) struct SolvedModule {
    pub(super) module: LinearModule,
    pub(super) site: usize,
}

/// Σ G'ᵢ per site, and Σ G'ᵢWᵢ and Σ Wᵢ (for the fallback) per solved module, all
/// `[in, ·]` row-major f32: in host memory, or on the GPU that will solve them.
pub(super) enum LinearSums {
    Host {
        gram: Vec<Vec<f32>>,
        gw: Vec<Vec<f32>>,
        w: Vec<Vec<f32>>,
    },
    Device {
        dev: Arc<CudaDevice>,
        sites: Vec<DeviceSiteSums>,
        modules: Vec<DeviceModuleSums>,
    },
}

/// The running state of a merge: everything a model contributes, summed.
pub(super) struct RunningSums {
    pub(super) modules: Vec<SolvedModule>,
    pub(super) linear: LinearSums,
    pub(super) mean_sum: BTreeMap<String, Vec<f32>>,
    pub(super) count: usize,
}

impl RunningSums {
    pub(super) fn new(
        model_cfg: &ModelConfig,
        sites: &[Site],
        exclude: &ExcludeSet,
        regmean: bool,
        device: Option<&Arc<CudaDevice>>,
    ) -> Result<Self> {
        let mut modules = Vec::new();
        if regmean {
            for (si, s) in sites.iter().enumerate() {
                for m in s.modules.iter().filter(|m| !exclude.excludes(&m.weight)) {
                    modules.push(SolvedModule {
                        module: m.clone(),
                        site: si,
                    });
                }
            }
        }
        let site_dims: Vec<usize> = if regmean {
            sites.iter().map(|s| s.dim).collect()
        } else {
            Vec::new()
        };
        let linear = match device {
            None => LinearSums::Host {
                gram: site_dims.iter().map(|d| vec![0.0f32; d * d]).collect(),
                gw: modules
                    .iter()
                    .map(|m| vec![0.0f32; m.module.in_dim * m.module.out_dim])
                    .collect(),
                w: modules
                    .iter()
                    .map(|m| vec![0.0f32; m.module.in_dim * m.module.out_dim])
                    .collect(),
            },
            Some(dev) => LinearSums::Device {
                dev: dev.clone(),
                sites: site_dims
                    .iter()
                    .map(|&d| DeviceSiteSums::new(dev, d))
                    .collect::<Result<_>>()?,
                modules: modules
                    .iter()
                    .map(|m| DeviceModuleSums::new(dev, m.module.in_dim, m.module.out_dim))
                    .collect::<Result<_>>()?,
            },
        };
        let solved: Vec<&str> = sites
            .iter()
            .flat_map(|s| s.modules.iter().map(|m| m.weight.as_str()))
            .collect();
        let mean_sum = model_cfg
            .expected_shapes()
            .into_iter()
            .filter(|(name, _)| {
                let solved_here = regmean && solved.contains(&name.as_str());
                !(exclude.excludes(name) || solved_here)
            })
            .map(|(name, shape)| (name, vec![0.0f32; shape.iter().product()]))
            .collect();
        Ok(RunningSums {
            modules,
            linear,
            mean_sum,
            count: 0,
        })
    }

    /// The GPU holding the sums, if any.
    pub(super) fn device(&self) -> Option<&Arc<CudaDevice>> {
        match &self.linear {
            LinearSums::Host { .. } => None,
            LinearSums::Device { dev, .. } => Some(dev),
        }
    }

    /// Adds one model's reduced Grams G' and products G'W.
    pub(super) fn add_regmean(
        &mut self,
        ckpt: &Checkpoint,
        grams: Grams,
        ratio: f32,
        diag_mult: f32,
    ) -> Result<()> {
        let grams = match (grams, &mut self.linear) {
            (
                Grams::Device(g),
                LinearSums::Device {
                    dev,
                    sites,
                    modules,
                },
            ) => {
                for (si, (gram, _rows)) in g.sites.into_iter().enumerate() {
                    sites[si].add(dev, &gram, ratio, diag_mult)?;
                    drop(gram);
                    add_products(dev, &sites[si], &self.modules, modules, ckpt, si)?;
                }
                return Ok(());
            }
            (Grams::Device(_), LinearSums::Host { .. }) => {
                return Err(Error::Backend(
                    "internal: Grams on the GPU but the sums on the host".into(),
                ));
            }
            (Grams::Host(g), _) => g,
        };
        match &mut self.linear {
            LinearSums::Host { gram, gw, w } => {
                let reduced: Vec<Vec<f32>> = grams
                    .sites
                    .into_iter()
                    .zip(gram.iter_mut())
                    .map(|(site, sum)| reduce_into(site.gram, sum, site.dim, ratio, diag_mult))
                    .collect();
                for ((m, gw_sum), w_sum) in self.modules.iter().zip(gw.iter_mut()).zip(w.iter_mut())
                {
                    let (d_in, d_out) = (m.module.in_dim, m.module.out_dim);
                    let weights = take_linear_in_out(ckpt, &m.module)?;
                    add_weighted(gw_sum, w_sum, &reduced[m.site], &weights, d_in, d_out);
                }
            }
            LinearSums::Device {
                dev,
                sites,
                modules,
            } => {
                // Site by site: a site's G' buffer is reused by the next model.
                for (si, site) in grams.sites.into_iter().enumerate() {
                    let g = dev.upload(&site.gram, "Gram")?;
                    sites[si].add(dev, &g, ratio, diag_mult)?;
                    add_products(dev, &sites[si], &self.modules, modules, ckpt, si)?;
                }
            }
        }
        Ok(())
    }

    /// Solves module `index` (its site `site`): the merged weights `[in, out]` and how.
    pub(super) fn solve(
        &self,
        index: usize,
        site: usize,
        d_in: usize,
        d_out: usize,
    ) -> Result<(Vec<f32>, SolveOutcome)> {
        let k = self.count;
        match &self.linear {
            LinearSums::Host { gram, gw, w } => {
                let w_mean: Vec<f32> = w[index].iter().map(|v| v / k as f32).collect();
                Ok(solve_layer(&gram[site], &gw[index], &w_mean, d_in, d_out))
            }
            LinearSums::Device {
                dev,
                sites,
                modules,
            } => {
                let m = &modules[index];
                let (x, outcome) = crate::backend::cuda::solve::solve_layer(
                    dev,
                    &sites[site].gram_sum,
                    &m.gw_sum,
                    &m.w_sum,
                    k,
                    d_in,
                    d_out,
                )?;
                Ok((dev.download(&x)?, outcome))
            }
        }
    }

    pub(super) fn add_means(&mut self, ckpt: &Checkpoint) -> Result<()> {
        for (name, sum) in &mut self.mean_sum {
            let v = ckpt.f32(name)?;
            sum.iter_mut().zip(&v).for_each(|(s, x)| *s += x);
        }
        Ok(())
    }
}

/// Σ G'W += G'·W and Σ W += W on the device, for the modules site `si` feeds (its G'
/// already computed for this model).
fn add_products(
    dev: &CudaDevice,
    site: &DeviceSiteSums,
    solved: &[SolvedModule],
    sums: &mut [DeviceModuleSums],
    ckpt: &Checkpoint,
    si: usize,
) -> Result<()> {
    use crate::profile::span;
    for (m, sums) in solved
        .iter()
        .zip(sums.iter_mut())
        .filter(|(m, _)| m.site == si)
    {
        // Made by the forward pass (or now, for Grams read from a file).
        let weights = span("sums: weight on the GPU", || {
            crate::backend::cuda::weights::take_linear_in_out(dev, ckpt, &m.module)
        })?;
        span("sums: G'W (enqueue)", || {
            sums.add(dev, &site.reduced, &weights)
        })?;
    }
    Ok(())
}

/// One model's Grams: on the host, or left on the GPU that holds the running sums.
pub(super) enum Grams {
    Host(ModelGrams),
    Device(DeviceGrams),
}
