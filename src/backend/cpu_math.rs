//! Element-wise math of the CPU engine, written so that its loops vectorise: `exp` without
//! a libm call, the sigmoid-gated activations, the softmax's exponentials, LayerNorm's row
//! statistics, and the AVX2 + FMA dispatch they run under.

/// `exp(x)` for the activations and the softmax, written so that a loop of it vectorises:
/// glibc's `expf` is one call per element, which was a quarter of a CPU merge's time.
///
/// Range reduction x = n·ln 2 + r with |r| ≤ ln 2 / 2, Cephes' degree-6 polynomial for e^r
/// (relative error ≈ 2 ulp), and 2ⁿ built in the exponent bits. Arguments below −80 are
/// raised to −80: e⁻⁸⁰ ≈ 1.8e−35 is a normal float, and where `exp` is used (σ's denominator
/// 1 + eˣ, softmax weights beside a weight of 1) the difference is below f32's resolution.
/// Above ln(f32::MAX) ≈ 88.72 the result is +∞, as `expf` gives.
#[inline(always)]
pub(super) fn exp_vectorisable(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to an integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-80.0, 88.8);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    // 2ⁿ⁻¹·2, as n reaches 128 near the top of the range; past f32::MAX the product is +∞.
    let two_n_1 = f32::from_bits(n_bits.wrapping_add(126) << 23);
    if x > 88.8 {
        f32::INFINITY
    } else {
        e_r * two_n_1 * 2.0
    }
}

/// `x · σ(k·x)` over a slice: quick_gelu is k = 1.702, and gelu_new's
/// 0.5·x·(1 + tanh(u)) is exactly x·σ(2u), which avoids both `tanh` and its cancellation.
#[inline(always)]
pub(super) fn sigmoid_gated(values: &mut [f32], gate_arg: impl Fn(f32) -> f32) {
    for v in values {
        let x = *v;
        *v = x / (1.0 + exp_vectorisable(-gate_arg(x)));
    }
}

pub(super) fn gelu_new_gate(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    2.0 * SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
}

pub(super) fn quick_gelu_gate(x: f32) -> f32 {
    1.702 * x
}

/// Runs `body` compiled for AVX2 + FMA where the CPU has them (8 lanes instead of SSE2's 4),
/// else as built. The arithmetic is the same either way: Rust never contracts a·b + c.
macro_rules! with_avx2 {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the features were detected on this CPU just above.
                unsafe { avx2(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}
pub(super) use with_avx2;

/// `e^(x − max)` in place, with masked scores (−∞) exactly 0.
#[inline(always)]
pub(super) fn softmax_exp(row: &mut [f32], max: f32) {
    for x in row {
        let e = exp_vectorisable(*x - max);
        *x = if *x == f32::NEG_INFINITY { 0.0 } else { e };
    }
}

/// Softmax of one row of scores in place, masked scores (−∞) weighted exactly 0; a row
/// whose every score is masked becomes zeros. The max and the sum run in 16 independent
/// lanes: one running value is a chain of dependent operations that no compiler may
/// reorder, and it was most of a decoder's attention outside its products.
#[inline(always)]
pub(super) fn softmax_row(row: &mut [f32]) {
    let max = lanes_fold(row, f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    softmax_exp(row, max);
    let sum = lanes_fold(row, 0.0, |a, b| a + b);
    row.iter_mut().for_each(|x| *x /= sum);
}

/// `row` folded with `f` in 16 independent lanes, then the lanes and the tail.
#[inline(always)]
fn lanes_fold(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut acc = [init; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    let lanes = acc.into_iter().fold(init, &f);
    tail.iter().fold(lanes, |a, &v| f(a, v))
}

/// Σ f(v) over `row` in f64, in eight independent partial sums: one running f64 sum is a
/// chain of dependent adds (four cycles each) that no compiler may reorder, eight of them
/// fill two vector registers.
#[inline(always)]
fn sum_f64(row: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0.0f64; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v as f64);
        }
    }
    let tail: f64 = tail.iter().map(|&v| f(v as f64)).sum();
    acc.iter().sum::<f64>() + tail
}

/// LayerNorm of one row into `out`: mean and biased variance in f64 (two passes), then
/// `(x − mean)·rstd·gamma + beta`, the normalised value rounded to f32 before the affine
/// part, as torch's f32 kernel applies it.
#[inline(always)]
pub(super) fn layer_norm_row(out: &mut [f32], row: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = row.len() as f64;
    let mean = sum_f64(row, |v| v) / d;
    let var = sum_f64(row, |v| (v - mean) * (v - mean)) / d;
    let rstd = 1.0 / (var + eps as f64).sqrt();
    for ((o, &x), (&g, &b)) in out.iter_mut().zip(row).zip(gamma.iter().zip(beta)) {
        *o = ((x as f64 - mean) * rstd) as f32 * g + b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectorisable_exp_is_within_3_ulp_of_f64() {
        let mut worst = 0.0f64;
        for i in 0..=400_000 {
            let x = -80.0 + 168.72 * i as f32 / 400_000.0;
            let want = (x as f64).exp();
            let got = exp_vectorisable(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "relative error {worst:e}"
        );
        assert_eq!(exp_vectorisable(89.0), f32::INFINITY);
        assert_eq!(exp_vectorisable(f32::INFINITY), f32::INFINITY);
        assert!(exp_vectorisable(f32::NAN).is_nan());
        let below = exp_vectorisable(-200.0);
        assert!(
            below > 0.0 && below < 1e-34 && below.is_normal(),
            "{below:e}"
        );
    }

    #[test]
    fn layer_norm_row_matches_f64_definition_with_a_ragged_tail() {
        // 8 lanes of partial sums plus a tail of 3: every element must count once.
        let d = 19;
        let row: Vec<f32> = (0..d)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.5)
            .collect();
        let gamma: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 * 0.1).collect();
        let beta: Vec<f32> = (0..d).map(|i| i as f32 * -0.05).collect();
        let mut out = vec![0.0f32; d];
        layer_norm_row(&mut out, &row, &gamma, &beta, 1e-5);
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
        for i in 0..d {
            let want =
                (row[i] as f64 - mean) / (var + 1e-5).sqrt() * gamma[i] as f64 + beta[i] as f64;
            assert!(
                (out[i] as f64 - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                out[i]
            );
        }
    }
}
