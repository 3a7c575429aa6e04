//! The pieces GPT-2 and the CLIP encoder share: LayerNorm, a linear layer (optionally fused
//! over the modules of a site), and the pre-LN transformer block with its four Gram sites.

use super::{GramSink, ParamSource, Site};
use crate::backend::{Activation, AttentionShape, Backend};
use crate::error::Result;

pub(crate) struct LayerNorm<B: Backend> {
    gamma: B::Tensor,
    beta: B::Tensor,
}

impl<B: Backend> LayerNorm<B> {
    pub fn load(backend: &B, src: &dyn ParamSource<B>, prefix: &str, d: usize) -> Result<Self> {
        let vector = |leaf: &str| -> Result<B::Tensor> {
            backend.upload(&src.tensor(&format!("{prefix}.{leaf}"), &[d])?, 1, d)
        };
        Ok(LayerNorm {
            gamma: vector("weight")?,
            beta: vector("bias")?,
        })
    }

    pub fn apply(&self, backend: &B, x: &B::Tensor, eps: f32) -> Result<B::Tensor> {
        backend.layer_norm(x, &self.gamma, &self.beta, eps)
    }

    /// `h += y`, then the norm of the new `h`.
    pub fn add_apply(
        &self,
        backend: &B,
        h: &mut B::Tensor,
        y: &B::Tensor,
        eps: f32,
    ) -> Result<B::Tensor> {
        backend.add_layer_norm(h, y, &self.gamma, &self.beta, eps)
    }
}

/// `x · W + b` with W `[in, out]` on the backend.
pub(crate) struct Linear<B: Backend> {
    w: B::Tensor,
    b: B::Tensor,
}

impl<B: Backend> Linear<B> {
    /// The linear layer(s) a site feeds, fused along the output when there are several
    /// ([`ParamSource::site_weight`]), with their biases.
    pub fn load_site(backend: &B, src: &dyn ParamSource<B>, site: &Site) -> Result<Self> {
        let w = src.site_weight(backend, site)?;
        let out: usize = site.modules.iter().map(|m| m.out_dim).sum();
        let mut b = Vec::with_capacity(out);
        for m in &site.modules {
            let name = format!("{}.bias", m.weight.trim_end_matches(".weight"));
            b.extend(src.tensor(&name, &[m.out_dim])?);
        }
        Ok(Linear {
            w,
            b: backend.upload_owned(b, 1, out)?,
        })
    }

    pub fn apply(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        backend.linear(x, &self.w, Some(&self.b))
    }

    pub fn apply_act(&self, backend: &B, x: &B::Tensor, act: Activation) -> Result<B::Tensor> {
        backend.linear_act(x, &self.w, Some(&self.b), act)
    }
}

/// A pre-LN transformer block: h += out(attention(qkv(ln1 h))); h += fc2(act(fc1(ln2 h))).
pub(crate) struct PreLnBlock<B: Backend> {
    ln1: LayerNorm<B>,
    qkv: Linear<B>,
    attn_out: Linear<B>,
    ln2: LayerNorm<B>,
    fc1: Linear<B>,
    fc2: Linear<B>,
}

/// What a block needs to run besides its weights.
pub(crate) struct BlockRun<'a> {
    pub eps: f32,
    pub shape: AttentionShape,
    /// Attention mask over keys, also the Gram row mask (1 = real token).
    pub mask: Option<&'a [u8]>,
    pub act: Activation,
}

impl<B: Backend> PreLnBlock<B> {
    /// Block `l` of a model whose blocks have four sites each (`sites` lists every site of
    /// the model, in order: qkv, attention output, fc1, fc2 per block), with the LayerNorms
    /// `{prefix}{norms[0]}` before attention and `{prefix}{norms[1]}` before the MLP.
    pub fn load(
        backend: &B,
        src: &dyn ParamSource<B>,
        sites: &[Site],
        l: usize,
        prefix: &str,
        norms: [&str; 2],
    ) -> Result<Self> {
        let sites = &sites[4 * l..4 * l + 4];
        let d = sites[0].dim;
        let norm = |leaf: &str| LayerNorm::load(backend, src, &format!("{prefix}{leaf}"), d);
        Ok(PreLnBlock {
            ln1: norm(norms[0])?,
            qkv: Linear::load_site(backend, src, &sites[0])?,
            attn_out: Linear::load_site(backend, src, &sites[1])?,
            ln2: norm(norms[1])?,
            fc1: Linear::load_site(backend, src, &sites[2])?,
            fc2: Linear::load_site(backend, src, &sites[3])?,
        })
    }

    /// Runs the block on `h` in place, showing the four site inputs (numbered from
    /// `first_site`) to the Gram sink.
    pub fn forward(
        &self,
        backend: &B,
        h: &mut B::Tensor,
        run: &BlockRun<'_>,
        first_site: usize,
        grams: &mut Option<&mut dyn GramSink<B>>,
    ) -> Result<()> {
        let mut observe = |k: usize, x: &B::Tensor| -> Result<()> {
            match grams.as_deref_mut() {
                Some(g) => g.observe(first_site + k, x, run.mask),
                None => Ok(()),
            }
        };
        let f = self.run_to_last_site(&mut observe, backend, h, run)?;
        backend.add_assign(h, &self.fc2.apply(backend, &f)?)
    }

    /// Runs the block only as far as its last site (fc2's input), for the Grams alone: `h` is
    /// left half-updated (after the attention's residual), and fc2 never runs.
    pub fn observe_sites(
        &self,
        grams: &mut dyn GramSink<B>,
        backend: &B,
        h: &mut B::Tensor,
        run: &BlockRun<'_>,
    ) -> Result<()> {
        let mut observe = |k: usize, x: &B::Tensor| grams.observe(k, x, run.mask);
        self.run_to_last_site(&mut observe, backend, h, run)
            .map(drop)
    }

    /// Everything up to fc2, each site input `k` (0..4) shown to `observe`: returns fc2's input.
    fn run_to_last_site(
        &self,
        observe: &mut dyn FnMut(usize, &B::Tensor) -> Result<()>,
        backend: &B,
        h: &mut B::Tensor,
        run: &BlockRun<'_>,
    ) -> Result<B::Tensor> {
        let a = self.ln1.apply(backend, h, run.eps)?;
        observe(0, &a)?;
        let att = backend.attention(&self.qkv.apply(backend, &a)?, run.shape, run.mask)?;
        observe(1, &att)?;
        let m = self
            .ln2
            .add_apply(backend, h, &self.attn_out.apply(backend, &att)?, run.eps)?;
        observe(2, &m)?;
        let f = self.fc1.apply_act(backend, &m, run.act)?;
        observe(3, &f)?;
        Ok(f)
    }
}
