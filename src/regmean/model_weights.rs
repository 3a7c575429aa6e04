//! One task model's linear weights, made once per merge step and read twice: by the forward
//! pass (fused per site, as [`ParamSource::site_weight`]) and by the sums (Σ G'W, Σ W).
//! Each is made by the backend on first use ([`MergeArithmetic::linear_weight`]: decoded on
//! the host, or on a GPU from the stored bytes), held here in the backend's own type, and
//! handed to the sums by [`ModelWeights::take`].

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::backend::MergeArithmetic;
use crate::error::Result;
use crate::io::Checkpoint;
use crate::model::{LinearModule, ParamSource, Site};

pub(super) struct ModelWeights<'a, B: MergeArithmetic> {
    ckpt: &'a Checkpoint,
    /// Made by the forward pass, not yet taken by the sums.
    made: Mutex<HashMap<String, B::Weight>>,
}

impl<'a, B: MergeArithmetic> ModelWeights<'a, B> {
    pub(super) fn new(ckpt: &'a Checkpoint) -> Self {
        ModelWeights {
            ckpt,
            made: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn checkpoint(&self) -> &'a Checkpoint {
        self.ckpt
    }

    /// The weight of `m` the forward pass made (forgotten here now), or a new one.
    pub(super) fn take(&self, backend: &B, m: &LinearModule) -> Result<B::Weight> {
        // Out of the lock before making one.
        let made = self.made().remove(&m.weight);
        match made {
            Some(w) => Ok(w),
            None => backend.linear_weight(self.ckpt, m),
        }
    }

    fn made(&self) -> MutexGuard<'_, HashMap<String, B::Weight>> {
        // Entries are inserted whole: a panic elsewhere cannot leave one half-made.
        self.made.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<B: MergeArithmetic> ParamSource<B> for ModelWeights<'_, B> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.ckpt.f32_shaped(name, shape)
    }

    fn site_weight(&self, backend: &B, site: &Site) -> Result<B::Tensor> {
        site.check_inputs()?;
        let mut made = self.made();
        for m in &site.modules {
            if !made.contains_key(&m.weight) {
                let w = backend.linear_weight(self.ckpt, m)?;
                made.insert(m.weight.clone(), w);
            }
        }
        let parts: Vec<&B::Weight> = site.modules.iter().map(|m| &made[&m.weight]).collect();
        backend.site_weight_from(site, &parts)
    }
}
