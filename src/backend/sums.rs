//! The host-side running sums of a RegMean solve: Σ G'ᵢ per site, Σ G'ᵢWᵢ and Σ Wᵢ per
//! solved module, each model folded in as it comes (both schedules share these steps).

use rayon::prelude::*;

use super::cpu_gemm::{gemm, Lhs, Part};

/// G' = r·G off the diagonal, `diag_mult`·G on it (FusionBench's `reduce_non_diagonal`),
/// in place in the `[d, d]` Gram `g`, and `sum += G'`. Returns G'.
pub(crate) fn reduce_into(
    mut g: Vec<f32>,
    sum: &mut [f32],
    d: usize,
    ratio: f32,
    diag_mult: f32,
) -> Vec<f32> {
    g.par_chunks_mut(d.max(1))
        .zip(sum.par_chunks_mut(d.max(1)))
        .enumerate()
        .for_each(|(i, (row, sum_row))| {
            // The whole row by `ratio` and then its diagonal element again (from the value
            // as it was) by `diag_mult`: the same products as choosing per element, without
            // a branch in the loop.
            let diag = row[i];
            row.iter_mut().for_each(|v| *v *= ratio);
            row[i] = diag * diag_mult;
            row.iter()
                .zip(sum_row.iter_mut())
                .for_each(|(v, s)| *s += v);
        });
    g
}

/// `gw_sum += G'·W` (in the product's own GEMM) and `w_sum += W`, W `[d_in, d_out]`.
pub(crate) fn add_weighted(
    gw_sum: &mut [f32],
    w_sum: &mut [f32],
    reduced: &[f32],
    weights: &[f32],
    d_in: usize,
    d_out: usize,
) {
    gemm(
        (d_in, d_out, d_in),
        Lhs::RowMajor {
            data: reduced,
            ld: d_in,
        },
        weights,
        d_out,
        gw_sum,
        d_out,
        Part::Full,
        true,
    );
    add_assign(w_sum, weights);
}

/// `sum += v`, element-wise.
pub(crate) fn add_assign(sum: &mut [f32], v: &[f32]) {
    sum.par_chunks_mut(1 << 14)
        .zip(v.par_chunks(1 << 14))
        .for_each(|(s, v)| s.iter_mut().zip(v).for_each(|(s, v)| *s += v));
}
