//! Sites: the places in a forward pass where one input feeds one or more linear layers, and
//! the linear weights they feed, read from a checkpoint as `[in, out]` host matrices.

use crate::error::{Error, Result};
use crate::io::Checkpoint;

/// One linear layer fed by a site.
#[derive(Clone, Debug)]
pub struct LinearModule {
    /// Canonical name of its weight, e.g. `h.0.attn.c_attn.weight`.
    pub weight: String,
    /// True when stored `[out, in]` (`nn.Linear`), false when `[in, out]` (GPT-2 `Conv1D`).
    pub transposed: bool,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// A place in the forward pass where one input feeds one or more linear layers (CLIP's
/// q, k and v share theirs, so their Gram is computed once).
#[derive(Clone, Debug)]
pub struct Site {
    /// Stable name used in Gram statistics files.
    pub name: String,
    pub dim: usize,
    pub modules: Vec<LinearModule>,
}

impl LinearModule {
    /// The `nn.Linear` named `name` (its weight `{name}.weight`, stored `[out, in]`).
    pub fn nn_linear(name: &str, in_dim: usize, out_dim: usize) -> Self {
        LinearModule {
            weight: format!("{name}.weight"),
            transposed: true,
            in_dim,
            out_dim,
        }
    }
}

impl Site {
    /// A site named `name` whose input of `dim` feeds the `nn.Linear` layers `modules`
    /// (name, output width).
    pub fn nn_linears(name: String, dim: usize, modules: &[(String, usize)]) -> Self {
        let modules = modules
            .iter()
            .map(|(m, out)| LinearModule::nn_linear(m, dim, *out))
            .collect();
        Site { name, dim, modules }
    }

    /// A site feeding one `nn.Linear` of its own name.
    pub fn nn_linear(name: String, dim: usize, out_dim: usize) -> Self {
        let module = LinearModule::nn_linear(&name, dim, out_dim);
        Site {
            name,
            dim,
            modules: vec![module],
        }
    }

    /// Every module a site feeds takes the site's input width.
    pub fn check_inputs(&self) -> Result<()> {
        match self.modules.iter().find(|m| m.in_dim != self.dim) {
            Some(m) => Err(Error::Backend(format!(
                "site {}: module {} takes {} inputs, the site has {}",
                self.name, m.weight, m.in_dim, self.dim
            ))),
            None => Ok(()),
        }
    }
}

/// The `[in, out]` weights of the modules `site` feeds, side by side: one `[in, Σ out]`
/// matrix, returned with Σ out.
pub fn fuse_in_out(site: &Site, parts: &[&[f32]]) -> (Vec<f32>, usize) {
    let out: usize = site.modules.iter().map(|m| m.out_dim).sum();
    let mut w = Vec::with_capacity(site.dim * out);
    for r in 0..site.dim {
        for (part, m) in parts.iter().zip(&site.modules) {
            w.extend_from_slice(&part[r * m.out_dim..(r + 1) * m.out_dim]);
        }
    }
    (w, out)
}

/// A linear weight as a row-major `[in, out]` host matrix, whatever its stored layout.
pub fn linear_in_out(ckpt: &Checkpoint, m: &LinearModule) -> Result<Vec<f32>> {
    if m.transposed {
        ckpt.f32_transposed(&m.weight, m.out_dim, m.in_dim)
    } else {
        ckpt.f32_shaped(&m.weight, &[m.in_dim, m.out_dim])
    }
}

/// Row-major `[rows, cols]` → `[cols, rows]` (see [`crate::io::safetensors::transpose_with`]).
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(a.len(), rows * cols, "transpose of [{rows}, {cols}]");
    crate::io::safetensors::transpose_with(a, rows, cols, |&v| v)
}
