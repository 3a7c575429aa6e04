//! The f32 CPU backend: the packed GEMM of cpu_gemm.rs (multi-threaded through rayon), faer
//! for the small per-head attention products, element-wise kernels
//! parallel over rows.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::cpu_gemm::{gemm, product, Lhs, Part};
use super::cpu_math::{
    gelu_new_gate, layer_norm_row, quick_gelu_gate, sigmoid_gated, softmax_row, with_avx2,
};
pub use super::cpu_tensor::CpuTensor;
use super::cpu_tensor::{check, written_zeros};
use super::{Activation, AttentionShape, Backend, GqaShape, GramUpdate};
use crate::error::{Error, Result};
use crate::profile::span;

#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

/// Elements per parallel task in element-wise loops: rayon's per-element splitting costs
/// more than the work itself.
const CHUNK: usize = 1 << 14;

impl Backend for CpuBackend {
    type Tensor = CpuTensor;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        check(data.len() == rows * cols, || {
            format!("upload of {} values as [{rows}, {cols}]", data.len())
        })?;
        Ok(CpuTensor::new(data.to_vec(), rows, cols))
    }

    fn upload_owned(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<CpuTensor> {
        check(data.len() == rows * cols, || {
            format!("upload of {} values as [{rows}, {cols}]", data.len())
        })?;
        Ok(CpuTensor::new(data, rows, cols))
    }

    fn download(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data.clone())
    }

    fn download_owned(&self, t: CpuTensor) -> Result<Vec<f32>> {
        Ok(t.data)
    }

    fn shape(&self, t: &CpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CpuTensor> {
        Ok(CpuTensor::new(written_zeros(rows * cols), rows, cols))
    }

    fn linear(&self, x: &CpuTensor, w: &CpuTensor, bias: Option<&CpuTensor>) -> Result<CpuTensor> {
        check(x.cols == w.rows, || {
            format!(
                "linear: x [{}, {}] · w [{}, {}]",
                x.rows, x.cols, w.rows, w.cols
            )
        })?;
        let mut out = span("cpu: linear GEMM", || {
            product(
                (x.rows, w.cols, x.cols),
                Lhs::RowMajor {
                    data: &x.data,
                    ld: x.cols,
                },
                &w.data,
                w.cols,
            )
        });
        if let Some(b) = bias {
            check(b.data.len() == w.cols, || {
                format!("linear: bias of {} for {} outputs", b.data.len(), w.cols)
            })?;
            span("cpu: bias", || {
                out.par_chunks_mut(w.cols * (CHUNK / w.cols).max(1))
                    .for_each(|rows| {
                        for row in rows.chunks_mut(w.cols) {
                            row.iter_mut().zip(&b.data).for_each(|(o, b)| *o += b);
                        }
                    })
            });
        }
        Ok(CpuTensor::new(out, x.rows, w.cols))
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        let d = x.cols;
        check(gamma.data.len() == d && beta.data.len() == d, || {
            "layer_norm: parameter size".into()
        })?;
        let mut out = vec![0.0f32; x.data.len()];
        span("cpu: layer norm", || {
            let rows_per_task = d * (CHUNK / d.max(1)).max(1);
            out.par_chunks_mut(rows_per_task)
                .zip(x.data.par_chunks(rows_per_task))
                .for_each(|(o, rows)| {
                    with_avx2!(for (o, row) in o.chunks_mut(d).zip(rows.chunks(d)) {
                        layer_norm_row(o, row, &gamma.data, &beta.data, eps)
                    })
                })
        });
        Ok(CpuTensor::new(out, x.rows, x.cols))
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        check(x.rows == y.rows && x.cols == y.cols, || {
            "add_assign: shapes differ".into()
        })?;
        span("cpu: residual add", || {
            x.data
                .par_chunks_mut(CHUNK)
                .zip(y.data.par_chunks(CHUNK))
                .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b))
        });
        Ok(())
    }

    fn activate(&self, x: &mut CpuTensor, act: Activation) -> Result<()> {
        span("cpu: activation", || match act {
            Activation::GeluNew => x
                .data
                .par_chunks_mut(CHUNK)
                .for_each(|chunk| with_avx2!(sigmoid_gated(chunk, gelu_new_gate))),
            Activation::QuickGelu => x
                .data
                .par_chunks_mut(CHUNK)
                .for_each(|chunk| with_avx2!(sigmoid_gated(chunk, quick_gelu_gate))),
        });
        Ok(())
    }

    fn attention(
        &self,
        qkv: &CpuTensor,
        s: AttentionShape,
        key_mask: Option<&[u8]>,
    ) -> Result<CpuTensor> {
        let d = s.heads * s.head_dim;
        check(qkv.rows == s.batch * s.seq && qkv.cols == 3 * d, || {
            format!("attention: qkv [{}, {}] for {s:?}", qkv.rows, qkv.cols)
        })?;
        let layout = QkvLayout {
            batch: s.batch,
            seq: s.seq,
            heads: s.heads,
            kv_heads: s.heads,
            head_dim: s.head_dim,
            causal: s.causal,
        };
        span("cpu: attention", || attend(qkv, layout, key_mask))
    }

    fn gqa_attention(
        &self,
        qkv: &CpuTensor,
        s: GqaShape,
        key_mask: Option<&[u8]>,
    ) -> Result<CpuTensor> {
        check(
            s.kv_heads > 0
                && s.heads.is_multiple_of(s.kv_heads)
                && qkv.rows == s.batch * s.seq
                && qkv.cols == (s.heads + 2 * s.kv_heads) * s.head_dim,
            || format!("gqa_attention: qkv [{}, {}] for {s:?}", qkv.rows, qkv.cols),
        )?;
        let layout = QkvLayout {
            batch: s.batch,
            seq: s.seq,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            causal: true,
        };
        span("cpu: attention", || attend(qkv, layout, key_mask))
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        super::cpu_decoder::rms_norm(x, weight, eps)
    }

    fn rms_norm_columns(
        &self,
        x: &mut CpuTensor,
        cols: std::ops::Range<usize>,
        weight: &CpuTensor,
        eps: f32,
    ) -> Result<()> {
        super::cpu_decoder::rms_norm_columns(x, cols, weight, eps)
    }

    fn rotary(
        &self,
        x: &mut CpuTensor,
        cols: std::ops::Range<usize>,
        head_dim: usize,
        seq: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        super::cpu_decoder::rotary(x, cols, head_dim, seq, inv_freq)
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        super::cpu_decoder::silu_mul(gate_up)
    }

    fn embed_tokens(
        &self,
        wte: &CpuTensor,
        wpe: &CpuTensor,
        ids: &[u32],
        seq: usize,
    ) -> Result<CpuTensor> {
        let d = wte.cols;
        check(seq <= wpe.rows, || {
            format!("embed: sequence of {seq} beyond {} positions", wpe.rows)
        })?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= wte.rows) {
            return Err(Error::Backend(format!(
                "embed: token id {bad} ≥ vocabulary size {}",
                wte.rows
            )));
        }
        let mut out = vec![0.0f32; ids.len() * d];
        out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
            let id = ids[r] as usize;
            let pos = r % seq;
            let (tok, posv) = (
                &wte.data[id * d..(id + 1) * d],
                &wpe.data[pos * d..(pos + 1) * d],
            );
            for ((o, t), p) in o.iter_mut().zip(tok).zip(posv) {
                *o = t + p;
            }
        });
        Ok(CpuTensor::new(out, ids.len(), d))
    }

    fn clip_tokens(
        &self,
        patches: &CpuTensor,
        class: &CpuTensor,
        pos: &CpuTensor,
        batch: usize,
    ) -> Result<CpuTensor> {
        let d = patches.cols;
        let n_patches = patches.rows / batch.max(1);
        let tokens = n_patches + 1;
        check(
            pos.rows == tokens && pos.cols == d && class.data.len() == d,
            || format!("clip_tokens: {} positions for {tokens} tokens", pos.rows),
        )?;
        let mut out = vec![0.0f32; batch * tokens * d];
        out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
            let (b, t) = (r / tokens, r % tokens);
            let src = if t == 0 {
                &class.data[..]
            } else {
                &patches.data[(b * n_patches + t - 1) * d..(b * n_patches + t) * d]
            };
            for i in 0..d {
                o[i] = src[i] + pos.data[t * d + i];
            }
        });
        Ok(CpuTensor::new(out, batch * tokens, d))
    }

    fn copy(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(x.clone())
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[usize]) -> Result<CpuTensor> {
        let mut out = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            check(r < x.rows, || format!("gather_rows: row {r} of {}", x.rows))?;
            out.extend_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(CpuTensor::new(out, rows.len(), x.cols))
    }

    fn gram_update(
        &self,
        acc: &mut CpuTensor,
        x: &CpuTensor,
        row_mask: Option<&[u8]>,
        update: GramUpdate,
    ) -> Result<()> {
        let d = x.cols;
        check(acc.rows == d && acc.cols == d, || {
            format!("gram_update: acc [{}, {}] for d {d}", acc.rows, acc.cols)
        })?;
        // Padding rows are dropped by a copy of the real rows (rows·d against the product's
        // rows·d²); X itself is read as both operands of the packed GEMM, Xᵀ transposed.
        if let Some(mask) = row_mask {
            check(mask.len() == x.rows, || "gram_update: mask length".into())?;
        }
        let real: Option<Vec<f32>> = match row_mask {
            // A mask without padding (every row real) selects nothing.
            Some(mask) if mask.contains(&0) => Some(span("cpu: Gram row selection", || {
                let mut real = Vec::with_capacity(x.data.len());
                for (r, &m) in mask.iter().enumerate() {
                    if m != 0 {
                        real.extend_from_slice(&x.data[r * d..(r + 1) * d]);
                    }
                }
                real
            })),
            _ => None,
        };
        let rows = real.as_deref().unwrap_or(&x.data);
        let n = rows.len() / d.max(1);
        let lower_gram = |dst: &mut [f32], accumulate: bool| {
            span("cpu: Gram triangle GEMM", || {
                gemm(
                    (d, d, n),
                    Lhs::Transposed { data: rows, ld: d },
                    rows,
                    d,
                    dst,
                    d,
                    Part::Lower,
                    accumulate,
                )
            })
        };
        match update {
            GramUpdate::Sum => lower_gram(&mut acc.data, true),
            GramUpdate::RunningMean { seen: 0 } => {
                if n == 0 {
                    return Ok(());
                }
                // FusionBench's (0·0 + XᵀX) / n is XᵀX / n exactly: no second buffer.
                lower_gram(&mut acc.data, false);
                let total_f = n as f32;
                acc.data
                    .par_chunks_mut(d)
                    .enumerate()
                    .for_each(|(i, a)| a[..=i].iter_mut().for_each(|v| *v /= total_f));
            }
            GramUpdate::RunningMean { seen } => {
                if n == 0 {
                    return Ok(());
                }
                let mut xtx = vec![0.0f32; d * d];
                lower_gram(&mut xtx, false);
                // The same f32 operations in the same order as FusionBench's hook.
                let (seen_f, total_f) = (seen as f32, (seen + n as u64) as f32);
                acc.data
                    .par_chunks_mut(d)
                    .zip(xtx.par_chunks(d))
                    .enumerate()
                    .for_each(|(i, (a, x))| {
                        for j in 0..=i {
                            a[j] = (a[j] * seen_f + x[j]) / total_f;
                        }
                    });
            }
        }
        Ok(())
    }
}

/// The fused q|k|v projection's layout: `heads` query heads, then `kv_heads` key and
/// `kv_heads` value heads of `head_dim` columns each (kv_heads = heads: plain multi-head).
#[derive(Clone, Copy, Debug)]
struct QkvLayout {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
}

/// Queries per block in [`attend`].
const QUERY_BLOCK: usize = 64;

/// Attention of every query head over its key/value head (query head h reads kv head
/// h / (heads / kv_heads)), masked keys and (when causal) later keys excluded, softmax in
/// f32: `[batch·seq, heads·head_dim]`. One sequence per task, its products single-threaded
/// in faer: at these shapes (64 queries × up to 256 keys × 64) its unpacked kernels beat
/// the packed GEMM, 8.6 against 11.0 ms for a batch of `llama-small` at 2 threads.
fn attend(qkv: &CpuTensor, s: QkvLayout, key_mask: Option<&[u8]>) -> Result<CpuTensor> {
    let hd = s.head_dim;
    let d = s.heads * hd;
    let stride = qkv.cols;
    let group = s.heads / s.kv_heads.max(1);
    let (k_start, v_start) = (d, d + s.kv_heads * hd);
    if let Some(m) = key_mask {
        check(m.len() == qkv.rows, || "attention: mask length".into())?;
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0.0f32; s.batch * s.seq * d];
    out.par_chunks_mut(s.seq * d)
        .enumerate()
        .for_each(|(b, out_b)| {
            let block = &qkv.data[b * s.seq * stride..(b + 1) * s.seq * stride];
            let mask = key_mask.map(|m| &m[b * s.seq..(b + 1) * s.seq]);
            let mut scores = vec![0.0f32; QUERY_BLOCK.min(s.seq) * s.seq];
            for h in 0..s.heads {
                let kv = (h / group) * hd;
                // Queries a block at a time: under a causal mask a block's queries see only
                // the keys up to its last one, so the masked half is never computed.
                for i0 in (0..s.seq).step_by(QUERY_BLOCK) {
                    let i1 = (i0 + QUERY_BLOCK).min(s.seq);
                    let keys = if s.causal { i1 } else { s.seq };
                    let scores = &mut scores[..(i1 - i0) * keys];
                    let view = |start: usize, rows: std::ops::Range<usize>| {
                        MatRef::from_row_major_slice_with_stride(
                            &block[rows.start * stride + start..],
                            rows.len(),
                            hd,
                            stride,
                        )
                    };
                    {
                        let q = view(h * hd, i0..i1);
                        let k = view(k_start + kv, 0..keys);
                        let dst = MatMut::from_row_major_slice_mut(scores, i1 - i0, keys);
                        matmul(dst, Accum::Replace, q, k.transpose(), scale, Par::Seq);
                    }
                    for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
                        // Under a causal mask query i sees keys 0..=i: the rest weigh 0.
                        let seen = if s.causal { i0 + r + 1 } else { keys };
                        let (live, later) = row.split_at_mut(seen);
                        later.fill(0.0);
                        if let Some(m) = mask {
                            for (x, &real) in live.iter_mut().zip(m) {
                                if real == 0 {
                                    *x = f32::NEG_INFINITY;
                                }
                            }
                        }
                        // Every key masked (an empty sequence): the output row is zero.
                        with_avx2!(softmax_row(live));
                    }
                    let v = view(v_start + kv, 0..keys);
                    // A strided row-major view built as the transpose of a column-major one:
                    // faer 0.24's `from_row_major_slice_with_stride_mut` swaps the strides.
                    let dst = MatMut::from_column_major_slice_with_stride_mut(
                        &mut out_b[i0 * d + h * hd..],
                        hd,
                        i1 - i0,
                        d,
                    )
                    .transpose_mut();
                    let p = MatRef::from_row_major_slice(scores, i1 - i0, keys);
                    matmul(dst, Accum::Replace, p, v, 1.0, Par::Seq);
                }
            }
        });
    Ok(CpuTensor::new(out, s.batch * s.seq, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn activations_match_their_f64_definitions() {
        let xs: Vec<f32> = (0..2001).map(|i| -20.0 + i as f32 * 0.02).collect();
        for act in [Activation::GeluNew, Activation::QuickGelu] {
            let mut t = CpuTensor::new(xs.clone(), 1, xs.len());
            CpuBackend.activate(&mut t, act).unwrap();
            for (&x, &got) in xs.iter().zip(&t.data) {
                let x = x as f64;
                let want = match act {
                    Activation::GeluNew => {
                        let c = (2.0 / std::f64::consts::PI).sqrt();
                        0.5 * x * (1.0 + (c * (x + 0.044715 * x.powi(3))).tanh())
                    }
                    Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
                };
                assert!(
                    (got as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "{act:?}({x}) = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn gram_lower_triangle_matches_f64_and_skips_masked_rows() {
        // d = 70 spans three 32-column strips of the transposing copy.
        for (n, d) in [(37, 19), (45, 70)] {
            let x = CpuTensor::new(rand_vec(n * d, 1), n, d);
            let mask: Vec<u8> = (0..n).map(|r| (r % 3 != 0) as u8).collect();
            let mut acc = CpuBackend.zeros(d, d).unwrap();
            CpuBackend
                .gram_update(&mut acc, &x, Some(&mask), GramUpdate::Sum)
                .unwrap();
            for i in 0..d {
                for j in 0..=i {
                    let want: f64 = (0..n)
                        .filter(|r| mask[*r] != 0)
                        .map(|r| x.data[r * d + i] as f64 * x.data[r * d + j] as f64)
                        .sum();
                    let got = acc.data[i * d + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "[{n}, {d}] ({i},{j}) {got} vs {want}"
                    );
                }
            }
            // A batch of padding only changes nothing, in either update.
            let before = acc.data.clone();
            let none = vec![0u8; n];
            for update in [GramUpdate::Sum, GramUpdate::RunningMean { seen: 0 }] {
                CpuBackend
                    .gram_update(&mut acc, &x, Some(&none), update)
                    .unwrap();
                assert_eq!(acc.data, before, "{update:?}");
            }
        }
    }

    #[test]
    fn running_mean_equals_mean_over_all_rows() {
        let d = 5;
        let a = CpuTensor::new(rand_vec(7 * d, 2), 7, d);
        let b = CpuTensor::new(rand_vec(4 * d, 3), 4, d);
        let mut acc = CpuBackend.zeros(d, d).unwrap();
        CpuBackend
            .gram_update(&mut acc, &a, None, GramUpdate::RunningMean { seen: 0 })
            .unwrap();
        CpuBackend
            .gram_update(&mut acc, &b, None, GramUpdate::RunningMean { seen: 7 })
            .unwrap();
        let mut sum = CpuBackend.zeros(d, d).unwrap();
        CpuBackend
            .gram_update(&mut sum, &a, None, GramUpdate::Sum)
            .unwrap();
        CpuBackend
            .gram_update(&mut sum, &b, None, GramUpdate::Sum)
            .unwrap();
        for i in 0..d {
            for j in 0..=i {
                let want = sum.data[i * d + j] / 11.0;
                assert!((acc.data[i * d + j] - want).abs() < 1e-6, "({i},{j})");
            }
        }
    }

    /// Several query blocks (seq past `QUERY_BLOCK`), GQA, causal and padded, against an
    /// f64 softmax attention written out directly.
    #[test]
    fn blocked_attention_matches_f64_past_one_query_block() {
        let (batch, seq, heads, kv_heads, hd) = (2, 2 * QUERY_BLOCK + 19, 4, 2, 8);
        let cols = (heads + 2 * kv_heads) * hd;
        let qkv = rand_vec(batch * seq * cols, 7);
        let mut mask = vec![1u8; batch * seq];
        mask[seq + seq - 30..].fill(0); // the second sequence right-padded
        for causal in [true, false] {
            let layout = QkvLayout {
                batch,
                seq,
                heads,
                kv_heads,
                head_dim: hd,
                causal,
            };
            let x = CpuTensor::new(qkv.clone(), batch * seq, cols);
            let out = attend(&x, layout, Some(&mask)).unwrap();
            let at = |b: usize, t: usize, c: usize| qkv[(b * seq + t) * cols + c] as f64;
            let mut worst = 0.0f64;
            for b in 0..batch {
                for h in 0..heads {
                    let (kc, vc) = (
                        heads * hd + (h / 2) * hd,
                        (heads + kv_heads) * hd + (h / 2) * hd,
                    );
                    for i in 0..seq {
                        let keys: Vec<usize> = (0..seq)
                            .filter(|&j| !(causal && j > i) && mask[b * seq + j] != 0)
                            .collect();
                        let logits: Vec<f64> = keys
                            .iter()
                            .map(|&j| {
                                (0..hd)
                                    .map(|c| at(b, i, h * hd + c) * at(b, j, kc + c))
                                    .sum::<f64>()
                                    / (hd as f64).sqrt()
                            })
                            .collect();
                        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let w: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                        let z: f64 = w.iter().sum();
                        for c in 0..hd {
                            let want: f64 = keys
                                .iter()
                                .zip(&w)
                                .map(|(&j, wj)| wj / z * at(b, j, vc + c))
                                .sum();
                            let got = out.data[(b * seq + i) * heads * hd + h * hd + c] as f64;
                            worst = worst.max((got - want).abs());
                        }
                    }
                }
            }
            assert!(worst < 1e-5, "causal {causal}: worst {worst:e}");
        }
    }

    #[test]
    fn attention_respects_causal_and_padding_masks() {
        // One head, head_dim 1, q = k = 0 so scores are equal: the output is the mean of
        // the allowed values, which exposes exactly which keys were allowed.
        let seq = 4;
        let mut qkv = vec![0.0f32; seq * 3];
        for t in 0..seq {
            qkv[t * 3 + 2] = (t + 1) as f32;
        }
        let x = CpuTensor::new(qkv, seq, 3);
        let shape = AttentionShape {
            batch: 1,
            seq,
            heads: 1,
            head_dim: 1,
            causal: true,
        };
        let mask = [1u8, 1, 0, 1];
        let out = CpuBackend.attention(&x, shape, Some(&mask)).unwrap();
        let want = [1.0, 1.5, 1.5, (1.0 + 2.0 + 4.0) / 3.0];
        for (g, w) in out.data.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{:?}", out.data);
        }
    }
}
