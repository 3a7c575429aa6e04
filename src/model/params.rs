//! Where a model part's parameters come from: a checkpoint, or the tensors a layer-wise
//! merge has made so far; and which part of the model a parameter belongs to.

use std::collections::HashMap;

use super::site::{fuse_in_out, Site};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::io::Checkpoint;

/// Where a model part's parameters come from: a checkpoint, or tensors a merge made.
pub trait ParamSource<B: Backend> {
    /// A float tensor (canonical name) in its stored layout, checked against `shape`.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    /// The `[in, Σ out]` weight of the linear layer(s) `site` feeds, on the backend.
    fn site_weight(&self, backend: &B, site: &Site) -> Result<B::Tensor>;
}

impl<B: Backend> ParamSource<B> for Checkpoint {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.f32_shaped(name, shape)
    }

    fn site_weight(&self, backend: &B, site: &Site) -> Result<B::Tensor> {
        backend.site_weight(self, site)
    }
}

/// Parameters held in memory (what a layer-wise merge has merged so far): tensors in their
/// stored layout, and linear weights as `[in, out]`.
#[derive(Default)]
pub struct HostParams {
    pub tensors: HashMap<String, Vec<f32>>,
    pub linear_in_out: HashMap<String, Vec<f32>>,
}

impl HostParams {
    fn get<'a>(map: &'a HashMap<String, Vec<f32>>, name: &str, len: usize) -> Result<&'a [f32]> {
        match map.get(name) {
            Some(v) if v.len() == len => Ok(v),
            Some(v) => Err(Error::Backend(format!(
                "internal: merged `{name}` has {} values, expected {len}",
                v.len()
            ))),
            None => Err(Error::Backend(format!("internal: `{name}` was not merged"))),
        }
    }
}

impl<B: Backend> ParamSource<B> for HostParams {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Self::get(&self.tensors, name, shape.iter().product()).map(<[f32]>::to_vec)
    }

    fn site_weight(&self, backend: &B, site: &Site) -> Result<B::Tensor> {
        let parts = site
            .modules
            .iter()
            .map(|m| Self::get(&self.linear_in_out, &m.weight, m.in_dim * m.out_dim))
            .collect::<Result<Vec<_>>>()?;
        let (w, out) = fuse_in_out(site, &parts);
        backend.upload_owned(w, site.dim, out)
    }
}

/// Which part of the model a parameter belongs to, in the order a layer-wise merge runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamGroup {
    /// Before the first block (GPT-2 `wte`, `wpe`; CLIP `embeddings.*`, `pre_layrnorm`).
    Embeddings,
    Layer(usize),
    /// After the last block (GPT-2 `ln_f`, CLIP `post_layernorm`).
    Final,
}
