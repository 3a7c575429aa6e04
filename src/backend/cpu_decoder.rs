//! The CPU engine's decoder-LLM operations (RMSNorm, RoPE, the SiLU-gated MLP), f32 as
//! transformers computes them; their attention is the shared kernel in `cpu.rs`.

use std::ops::Range;

use rayon::prelude::*;

use super::cpu_math::{exp_vectorisable, with_avx2};
use super::cpu_tensor::{check, CpuTensor};
use crate::error::Result;

/// `v·rsqrt(mean(v²) + eps)·w` over one group, in place.
#[inline]
fn rms_group(v: &mut [f32], w: &[f32], eps: f32) {
    let mean_sq = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    v.iter_mut().zip(w).for_each(|(x, w)| *x = w * (*x * inv));
}

fn check_columns(x: &CpuTensor, cols: &Range<usize>, group: usize, op: &str) -> Result<()> {
    check(
        cols.start <= cols.end
            && cols.end <= x.cols
            && group > 0
            && (cols.end - cols.start).is_multiple_of(group),
        || {
            format!(
                "{op}: columns {cols:?} in groups of {group} of a [{}, {}] tensor",
                x.rows, x.cols
            )
        },
    )
}

/// RMSNorm of every group of `weight.len()` columns of every row.
pub fn rms_norm(x: &CpuTensor, weight: &CpuTensor, eps: f32) -> Result<CpuTensor> {
    let mut out = x.clone();
    rms_norm_columns(&mut out, 0..x.cols, weight, eps)?;
    Ok(out)
}

pub fn rms_norm_columns(
    x: &mut CpuTensor,
    cols: Range<usize>,
    weight: &CpuTensor,
    eps: f32,
) -> Result<()> {
    let g = weight.data.len();
    check_columns(x, &cols, g, "rms_norm")?;
    let width = x.cols;
    x.data.par_chunks_mut(width.max(1)).for_each(|row| {
        for group in row[cols.clone()].chunks_mut(g) {
            rms_group(group, &weight.data, eps);
        }
    });
    Ok(())
}

/// The `[seq, inv_freq.len()]` (cos, sin) of RoPE's angles `inv_freq[i]·position`, formed
/// in f32 as transformers forms them, their cosine and sine taken in f64 and rounded. The
/// CUDA backend uploads the same table, so both engines rotate by the same angles.
pub(crate) fn rope_table(seq: usize, inv_freq: &[f32]) -> Vec<(f32, f32)> {
    (0..seq)
        .flat_map(|p| {
            inv_freq.iter().map(move |&f| {
                let angle = (f * p as f32) as f64;
                (angle.cos() as f32, angle.sin() as f32)
            })
        })
        .collect()
}

/// RoPE on the heads within columns `cols`, by the angles of [`rope_table`].
pub fn rotary(
    x: &mut CpuTensor,
    cols: Range<usize>,
    head_dim: usize,
    seq: usize,
    inv_freq: &[f32],
) -> Result<()> {
    check_columns(x, &cols, head_dim, "rotary")?;
    let half = head_dim / 2;
    check(
        inv_freq.len() == half && seq > 0 && x.rows.is_multiple_of(seq),
        || {
            format!(
                "rotary: {} frequencies for head_dim {head_dim}, {} rows of sequences of {seq}",
                inv_freq.len(),
                x.rows
            )
        },
    )?;
    let table = rope_table(seq, inv_freq);
    let width = x.cols;
    x.data
        .par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let cs = &table[(r % seq) * half..(r % seq + 1) * half];
            for head in row[cols.clone()].chunks_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for ((x1, x2), &(cos, sin)) in a.iter_mut().zip(b.iter_mut()).zip(cs) {
                    let (u, v) = (*x1, *x2);
                    *x1 = u * cos - v * sin;
                    *x2 = v * cos + u * sin;
                }
            }
        });
    Ok(())
}

/// `[rows, 2f]` gate|up → `[rows, f]` silu(gate)·up, silu(x) = x·σ(x).
pub fn silu_mul(gate_up: &CpuTensor) -> Result<CpuTensor> {
    check(gate_up.cols.is_multiple_of(2), || {
        format!("silu_mul: {} columns is not gate|up", gate_up.cols)
    })?;
    let f = gate_up.cols / 2;
    let mut out = vec![0.0f32; gate_up.rows * f];
    out.par_chunks_mut(f.max(1))
        .zip(gate_up.data.par_chunks(gate_up.cols.max(1)))
        .for_each(|(o, gu)| {
            let (gate, up) = gu.split_at(f);
            with_avx2!(for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + exp_vectorisable(-g)) * u;
            })
        });
    Ok(CpuTensor::new(out, gate_up.rows, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_groups_and_rotary_match_their_definitions() {
        let x = CpuTensor::new((0..12).map(|i| i as f32 - 5.0).collect(), 2, 6);
        let w = CpuTensor::new(vec![1.0, 2.0, 0.5], 1, 3);
        let y = rms_norm(&x, &w, 1e-6).unwrap();
        for r in 0..2 {
            for g in 0..2 {
                let v: Vec<f64> = (0..3).map(|i| x.data[r * 6 + g * 3 + i] as f64).collect();
                let rms = (v.iter().map(|a| a * a).sum::<f64>() / 3.0 + 1e-6).sqrt();
                for (i, (v, w)) in v.iter().zip(&w.data).enumerate() {
                    let want = v / rms * *w as f64;
                    assert!((y.data[r * 6 + g * 3 + i] as f64 - want).abs() < 1e-6);
                }
            }
        }
        // Position 0 leaves a head unchanged; position 1 rotates each pair by inv_freq.
        let mut t = CpuTensor::new(vec![1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0], 2, 4);
        rotary(&mut t, 0..4, 4, 2, &[0.5, 0.25]).unwrap();
        assert_eq!(&t.data[..4], &[1.0, 0.0, 0.0, 1.0]);
        let (c0, s0, c1, s1) = (0.5f32.cos(), 0.5f32.sin(), 0.25f32.cos(), 0.25f32.sin());
        let want = [c0, -s1, s0, c1];
        for (g, w) in t.data[4..].iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{:?}", &t.data[4..]);
        }
    }

    #[test]
    fn silu_mul_gates_up_by_silu_of_gate() {
        let gu = CpuTensor::new(vec![-2.0, 0.0, 3.0, 0.5, 2.0, -1.0], 1, 6);
        let y = silu_mul(&gu).unwrap();
        for i in 0..3 {
            let g = gu.data[i] as f64;
            let want = g / (1.0 + (-g).exp()) * gu.data[3 + i] as f64;
            assert!((y.data[i] as f64 - want).abs() < 1e-6);
        }
    }
}
