//! The per-layer RegMean solve W = (Σ G'ᵢ)⁻¹ Σ G'ᵢWᵢ, in f64 by Cholesky, with a fallback
//! for systems that are singular or too ill-conditioned to trust.
//!
//! Fallback (documented in the README): when the factorisation fails, or its reciprocal
//! condition estimate (min Lᵢᵢ / max Lᵢᵢ)² is below 1e-12, or the solution is not finite,
//! the system is damped towards the simple average W̄ of the task weights:
//! (ΣG' + λI) W = ΣG'W + λW̄ with λ = ε·mean(diag ΣG'), ε = 1e-8, 1e-7, … 1e-1 (the first
//! that factorises). A feature no example ever activated then takes the average weights
//! instead of garbage. If even that fails (a zero or non-finite ΣG'), the layer is the plain
//! average.

/// How a layer was solved.
#[derive(Clone, Debug, PartialEq)]
pub enum SolveOutcome {
    Cholesky,
    /// Damped towards the average with λ = `epsilon` · mean(diag ΣG').
    Damped {
        epsilon: f64,
        reason: String,
    },
    /// The plain average of the task weights.
    Average {
        reason: String,
    },
}

impl SolveOutcome {
    pub fn is_fallback(&self) -> bool {
        !matches!(self, SolveOutcome::Cholesky)
    }
}

pub(crate) const MIN_RCOND: f64 = 1e-12;

/// Solves for W `[d_in, d_out]` given Σ G' `[d_in, d_in]` (symmetric), Σ G'W and the average
/// weights W̄ (both `[d_in, d_out]`), all row-major f32.
pub fn solve_layer(
    gram_sum: &[f32],
    gw_sum: &[f32],
    w_mean: &[f32],
    d_in: usize,
    d_out: usize,
) -> (Vec<f32>, SolveOutcome) {
    // Factorised in place: the fallback converts again (rarely needed, so not kept).
    let reason = match try_solve(to_f64(gram_sum), to_f64(gw_sum), d_in, d_out) {
        Ok(x) => return (x, SolveOutcome::Cholesky),
        Err(reason) => reason,
    };
    let (a, b) = (to_f64(gram_sum), to_f64(gw_sum));
    let mean_diag = (0..d_in).map(|i| a[i * d_in + i]).sum::<f64>() / d_in as f64;
    if mean_diag.is_finite() && mean_diag > 0.0 {
        let mut epsilon = 1e-8;
        while epsilon <= 0.1 + 1e-12 {
            let lambda = epsilon * mean_diag;
            let mut ad = a.clone();
            (0..d_in).for_each(|i| ad[i * d_in + i] += lambda);
            let bd: Vec<f64> = b
                .iter()
                .zip(w_mean)
                .map(|(b, w)| b + lambda * *w as f64)
                .collect();
            if let Ok(x) = try_solve(ad, bd, d_in, d_out) {
                return (x, SolveOutcome::Damped { epsilon, reason });
            }
            epsilon *= 10.0;
        }
    }
    (w_mean.to_vec(), SolveOutcome::Average { reason })
}

fn to_f64(values: &[f32]) -> Vec<f64> {
    use rayon::prelude::*;
    values.par_iter().map(|&v| v as f64).collect()
}

/// Cholesky of `a` `[d_in, d_in]` in place, then `a⁻¹·b` in place in `b` `[d_in, d_out]`,
/// both row-major f64.
///
/// Every Gram sum is exactly symmetric (each Gram is mirrored from its lower triangle before
/// it is added), so the row-major buffer read as column-major is the same matrix: no
/// transposing copy. The right-hand side is solved as the row-major view it is.
fn try_solve(
    mut a: Vec<f64>,
    mut b: Vec<f64>,
    d_in: usize,
    d_out: usize,
) -> Result<Vec<f32>, String> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::cholesky::llt;
    use faer::{MatMut, Par};
    let par = Par::rayon(0);
    let mut l = MatMut::from_column_major_slice_mut(&mut a, d_in, d_in);
    let mut scratch = MemBuffer::new(llt::factor::cholesky_in_place_scratch::<f64>(
        d_in,
        par,
        Default::default(),
    ));
    llt::factor::cholesky_in_place(
        l.as_mut(),
        Default::default(),
        par,
        MemStack::new(&mut scratch),
        Default::default(),
    )
    .map_err(|e| format!("Cholesky failed ({e:?}): the summed Gram is not positive definite"))?;
    let (lo, hi) = (0..d_in)
        .map(|i| l[(i, i)])
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let rcond = (lo / hi).powi(2);
    // NaN compares false: a NaN estimate is rejected too.
    if rcond.is_nan() || rcond < MIN_RCOND {
        return Err(format!(
            "the summed Gram is near-singular (reciprocal condition ≈ {rcond:.1e})"
        ));
    }
    let rhs = MatMut::from_row_major_slice_mut(&mut b, d_in, d_out);
    let mut scratch = MemBuffer::new(llt::solve::solve_in_place_scratch::<f64>(d_in, d_out, par));
    llt::solve::solve_in_place(l.as_ref(), rhs, par, MemStack::new(&mut scratch));
    let out: Vec<f32> = {
        use rayon::prelude::*;
        b.par_iter().map(|&v| v as f32).collect()
    };
    if out.iter().any(|v| !v.is_finite()) {
        return Err("the solution is not finite".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_a_well_conditioned_system_exactly() {
        // A = [[4, 1], [1, 3]], X = [[1, 2], [3, 4]] → B = A·X.
        let a = [4.0, 1.0, 1.0, 3.0];
        let b = [7.0, 12.0, 10.0, 14.0];
        let (x, how) = solve_layer(&a, &b, &[0.0; 4], 2, 2);
        assert_eq!(how, SolveOutcome::Cholesky);
        for (g, w) in x.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((g - w).abs() < 1e-6, "{x:?}");
        }
    }

    #[test]
    fn a_dead_feature_takes_the_average_weights() {
        // Feature 1 never fires: its row and column of ΣG' are zero.
        let a = [2.0, 0.0, 0.0, 0.0];
        let b = [4.0, 6.0, 0.0, 0.0];
        let w_mean = [1.0, 1.0, 5.0, 7.0];
        let (x, how) = solve_layer(&a, &b, &w_mean, 2, 2);
        assert!(matches!(how, SolveOutcome::Damped { .. }), "{how:?}");
        assert!(
            (x[0] - 2.0).abs() < 1e-3 && (x[1] - 3.0).abs() < 1e-3,
            "{x:?}"
        );
        assert!(
            (x[2] - 5.0).abs() < 1e-6 && (x[3] - 7.0).abs() < 1e-6,
            "{x:?}"
        );
    }

    #[test]
    fn a_zero_system_falls_back_to_the_average() {
        let (x, how) = solve_layer(&[0.0; 4], &[0.0; 4], &[1.0, 2.0, 3.0, 4.0], 2, 2);
        assert!(matches!(how, SolveOutcome::Average { .. }));
        assert_eq!(x, vec![1.0, 2.0, 3.0, 4.0]);
    }
}
