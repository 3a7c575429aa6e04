//! The running state of a model-by-model merge: Σ G'ᵢ per site, Σ G'ᵢWᵢ and Σ Wᵢ per solved
//! module (held by the backend, where it will solve them), the sums of every averaged
//! parameter, and the solve at the end. [`add_grams`], one model's Grams folded into the
//! sums, is shared with the layer-wise schedule.

use std::collections::BTreeMap;

use super::gram::{BackendGrams, ModelGrams};
use super::model_weights::ModelWeights;
use crate::backend::solve::SolveOutcome;
use crate::backend::{written_zeros_small_pages, MergeArithmetic};
use crate::config::ExcludeSet;
use crate::error::Result;
use crate::io::Checkpoint;
use crate::model::{LinearModule, ModelConfig, Site};

/// A linear weight merged by RegMean.
pub(super) struct SolvedModule {
    pub(super) module: LinearModule,
    pub(super) site: usize,
}

/// The running state of a merge: everything a model contributes, summed.
pub(super) struct RunningSums<B: MergeArithmetic> {
    pub(super) modules: Vec<SolvedModule>,
    /// Σ G' per site (none for the simple average).
    sites: Vec<B::SiteSums>,
    /// Σ G'W and Σ W per solved module, in the order of `modules`.
    module_sums: Vec<B::ModuleSums>,
    pub(super) mean_sum: BTreeMap<String, Vec<f32>>,
    pub(super) count: usize,
}

impl<B: MergeArithmetic> RunningSums<B> {
    pub(super) fn new(
        backend: &B,
        model_cfg: &ModelConfig,
        sites: &[Site],
        exclude: &ExcludeSet,
        regmean: bool,
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
        let site_sums = if regmean {
            sites
                .iter()
                .map(|s| backend.site_sums(s.dim))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let module_sums = modules
            .iter()
            .map(|m| backend.module_sums(m.module.in_dim, m.module.out_dim))
            .collect::<Result<_>>()?;
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
            .map(|(name, shape)| (name, written_zeros_small_pages(shape.iter().product())))
            .collect();
        Ok(RunningSums {
            modules,
            sites: site_sums,
            module_sums,
            mean_sum,
            count: 0,
        })
    }

    /// Adds one model's reduced Grams G' and products G'W.
    pub(super) fn add_regmean(
        &mut self,
        backend: &B,
        weights: &ModelWeights<B>,
        grams: Grams<B>,
        ratio: f32,
        diag_mult: f32,
    ) -> Result<()> {
        let solved: Vec<(usize, &LinearModule)> =
            self.modules.iter().map(|m| (m.site, &m.module)).collect();
        add_grams(
            backend,
            &mut self.sites,
            &solved,
            &mut self.module_sums,
            grams,
            weights,
            (ratio, diag_mult),
        )
    }

    /// Solves module `index` (its site `site`): the merged weights `[in, out]` and how.
    pub(super) fn solve(
        &self,
        backend: &B,
        index: usize,
        site: usize,
    ) -> Result<(Vec<f32>, SolveOutcome)> {
        let (x, outcome) =
            backend.solve(&self.sites[site], &self.module_sums[index], self.count)?;
        Ok((backend.solved_to_host(x)?, outcome))
    }

    pub(super) fn add_means(&mut self, ckpt: &Checkpoint) -> Result<()> {
        for (name, sum) in &mut self.mean_sum {
            let v = ckpt.f32(name)?;
            sum.iter_mut().zip(&v).for_each(|(s, x)| *s += x);
        }
        Ok(())
    }
}

/// Folds one model's Grams into the sums, site by site: Σ G' += G' (G' = the Gram with its
/// off-diagonal times `reduce.0`, its diagonal times `reduce.1`), then Σ G'W += G'·W and
/// Σ W += W for each module `solved[j] = (its site's index in sites, module)`, whose sums
/// are `module_sums[j]`, with the model's `weights`. Site by site: a site's G' is reused by the next one (on a GPU) or
/// dropped (on the host).
pub(super) fn add_grams<B: MergeArithmetic>(
    backend: &B,
    sites: &mut [B::SiteSums],
    solved: &[(usize, &LinearModule)],
    module_sums: &mut [B::ModuleSums],
    grams: Grams<B>,
    weights: &ModelWeights<B>,
    (ratio, diag_mult): (f32, f32),
) -> Result<()> {
    let mut add_products = |si: usize, site: &mut B::SiteSums| -> Result<()> {
        for ((_, m), sums) in solved
            .iter()
            .zip(module_sums.iter_mut())
            .filter(|((s, _), _)| *s == si)
        {
            let weight = weights.take(backend, m)?;
            backend.add_weighted(sums, site, &weight)?;
        }
        backend.model_added(site);
        Ok(())
    };
    match grams {
        Grams::Backend(g) => {
            for (si, ((gram, _rows), site)) in g.sites.into_iter().zip(sites.iter_mut()).enumerate()
            {
                backend.add_gram(site, gram, ratio, diag_mult)?;
                add_products(si, site)?;
            }
        }
        Grams::Host(g) => {
            for (si, (gram, site)) in g.sites.into_iter().zip(sites.iter_mut()).enumerate() {
                backend.add_host_gram(site, gram.gram, ratio, diag_mult)?;
                add_products(si, site)?;
            }
        }
    }
    Ok(())
}

/// One model's Grams: on the host (finished there, or read from a file), or where the
/// backend finished them.
pub(super) enum Grams<B: MergeArithmetic> {
    Host(ModelGrams),
    Backend(BackendGrams<B>),
}

impl<B: MergeArithmetic> Grams<B> {
    /// Examples that went through the forward pass.
    pub(super) fn examples(&self) -> usize {
        match self {
            Grams::Host(g) => g.examples,
            Grams::Backend(g) => g.examples,
        }
    }

    /// Rows the first site counted.
    pub(super) fn first_rows(&self) -> Option<u64> {
        match self {
            Grams::Host(g) => g.sites.first().map(|s| s.rows),
            Grams::Backend(g) => g.sites.first().map(|s| s.1),
        }
    }

    /// The most device memory in use while the forward pass ran (GPU backends only).
    pub(super) fn peak_device_bytes(&self) -> Option<u64> {
        match self {
            Grams::Host(g) => g.peak_device_bytes,
            Grams::Backend(g) => g.peak_device_bytes,
        }
    }
}
