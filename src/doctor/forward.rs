//! The forward kernels against their CPU twins: every op of [`CudaBackend`] runs on the
//! same inputs as [`CpuBackend`]'s, in both precisions. In float16 the inputs are first
//! rounded to fp16 so that only the kernel's own error (f32 arithmetic, one rounding of the
//! output) is measured.

use std::sync::Arc;

use half::f16;

use super::compare::{compare_ops, Check};
use crate::backend::cuda::CudaDevice;
use crate::backend::{
    Activation, AttentionShape, Backend, CpuBackend, CudaBackend, GramUpdate, Precision,
};
use crate::demo::Rng;
use crate::error::Result;

/// Tolerances, relative to the largest reference value: f32 kernels differ from the CPU
/// only in summation order; f16 outputs carry one fp16 rounding (2⁻¹¹ relative) on top.
const TOL_F32: f64 = 1e-5;
const TOL_F16: f64 = 3e-3;

/// The tolerance of an op's check in `precision`.
pub(super) fn tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::Float32 => TOL_F32,
        Precision::Float16 => TOL_F16,
    }
}

/// `n` normal values of deviation `std`, rounded to what `precision` can hold.
pub(super) fn representable(rng: &mut Rng, n: usize, std: f32, precision: Precision) -> Vec<f32> {
    let x = rng.normals(n, std);
    match precision {
        Precision::Float32 => x,
        Precision::Float16 => x.into_iter().map(|v| f16::from_f32(v).to_f32()).collect(),
    }
}

/// Random inputs for every op, already representable in the precision under test.
struct Inputs {
    x: Vec<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    qkv_causal: Vec<f32>,
    qkv_wide: Vec<f32>,
    mask: Vec<u8>,
    table: Vec<f32>,
    positions: Vec<f32>,
    ids: Vec<u32>,
    pixels: Vec<f32>,
}

const ROWS: usize = 37;
const D_IN: usize = 45;
const D_OUT: usize = 67;
/// GPT-2-like attention: causal, padded, head_dim a multiple of 32.
const CAUSAL: AttentionShape = AttentionShape {
    batch: 3,
    seq: 19,
    heads: 3,
    head_dim: 32,
    causal: true,
};
/// CLIP-like attention: 50 tokens, no mask, head_dim 80 (not a multiple of 32).
const WIDE: AttentionShape = AttentionShape {
    batch: 2,
    seq: 50,
    heads: 4,
    head_dim: 80,
    causal: false,
};
const VOCAB: usize = 23;
const SEQ: usize = 7;
/// Pixels: 2 images of 3×12×12, patches of 4 (9 patches, 48 values each).
const IMAGES: usize = 2;
const SIZE: usize = 12;
const PATCH: usize = 4;

impl Inputs {
    fn new(rng: &mut Rng, precision: Precision) -> Self {
        let mut v = |n: usize, std: f32| representable(rng, n, std, precision);
        let qkv = |s: &AttentionShape| s.batch * s.seq * 3 * s.heads * s.head_dim;
        let mut inputs = Inputs {
            x: v(ROWS * D_IN, 1.0),
            w: v(D_IN * D_OUT, 0.2),
            bias: v(D_OUT, 0.5),
            gamma: v(D_IN, 1.0),
            beta: v(D_IN, 0.5),
            qkv_causal: v(qkv(&CAUSAL), 1.0),
            qkv_wide: v(qkv(&WIDE), 1.0),
            table: v(VOCAB * D_IN, 1.0),
            positions: v(SEQ * D_IN, 1.0),
            pixels: v(IMAGES * 3 * SIZE * SIZE, 1.0),
            mask: Vec::new(),
            ids: Vec::new(),
        };
        // Right padding of different lengths, one sequence entirely real.
        inputs.mask = (0..CAUSAL.batch * CAUSAL.seq)
            .map(|r| ((r % CAUSAL.seq) < CAUSAL.seq - 5 * (r / CAUSAL.seq)) as u8)
            .collect();
        inputs.ids = (0..3 * SEQ).map(|_| rng.below(VOCAB) as u32).collect();
        inputs
    }
}

/// Every op on one backend, outputs downloaded, in a fixed order with their names.
fn run_ops<B: Backend>(b: &B, i: &Inputs) -> Result<Vec<(&'static str, Vec<f32>)>> {
    let x = b.upload(&i.x, ROWS, D_IN)?;
    let w = b.upload(&i.w, D_IN, D_OUT)?;
    let bias = b.upload(&i.bias, 1, D_OUT)?;
    let gamma = b.upload(&i.gamma, 1, D_IN)?;
    let beta = b.upload(&i.beta, 1, D_IN)?;
    let mut out = Vec::new();
    out.push((
        "linear + bias (cuBLAS)",
        b.download(&b.linear(&x, &w, Some(&bias))?)?,
    ));
    out.push(("linear, no bias", b.download(&b.linear(&x, &w, None)?)?));
    for (name, act) in [
        ("linear + bias + gelu_new", Activation::GeluNew),
        ("linear + bias + quick_gelu", Activation::QuickGelu),
    ] {
        out.push((name, b.download(&b.linear_act(&x, &w, Some(&bias), act)?)?));
    }
    out.push((
        "layer_norm",
        b.download(&b.layer_norm(&x, &gamma, &beta, 1e-5)?)?,
    ));
    let mut h = b.upload(&i.x, ROWS, D_IN)?;
    let y = b.upload(
        &i.x[..].iter().rev().copied().collect::<Vec<_>>(),
        ROWS,
        D_IN,
    )?;
    let normed = b.add_layer_norm(&mut h, &y, &gamma, &beta, 1e-5)?;
    out.push(("add_layer_norm (norm)", b.download(&normed)?));
    out.push(("add_layer_norm (residual)", b.download(&h)?));
    let mut sum = b.upload(&i.x, ROWS, D_IN)?;
    b.add_assign(&mut sum, &y)?;
    out.push(("add", b.download(&sum)?));
    let qkv = b.upload(&i.qkv_causal, CAUSAL.batch * CAUSAL.seq, 9 * 32)?;
    out.push((
        "attention (causal, padded, hd 32)",
        b.download(&b.attention(&qkv, CAUSAL, Some(&i.mask))?)?,
    ));
    let qkv = b.upload(&i.qkv_wide, WIDE.batch * WIDE.seq, 12 * 80)?;
    out.push((
        "attention (50 tokens, hd 80)",
        b.download(&b.attention(&qkv, WIDE, None)?)?,
    ));
    let wte = b.upload(&i.table, VOCAB, D_IN)?;
    let wpe = b.upload(&i.positions, SEQ, D_IN)?;
    out.push((
        "embed_tokens",
        b.download(&b.embed_tokens(&wte, &wpe, &i.ids, SEQ)?)?,
    ));
    let patches = b.patch_rows(&i.pixels, IMAGES, 3, SIZE, PATCH)?;
    out.push(("patch_rows (im2col)", b.download(&patches)?));
    let n_patches = (SIZE / PATCH) * (SIZE / PATCH);
    let tokens_in = b.upload(&i.table[..IMAGES * n_patches * 5], IMAGES * n_patches, 5)?;
    let class = b.upload(&i.bias[..5], 1, 5)?;
    let pos = b.upload(&i.positions[..(n_patches + 1) * 5], n_patches + 1, 5)?;
    out.push((
        "clip_tokens",
        b.download(&b.clip_tokens(&tokens_in, &class, &pos, IMAGES)?)?,
    ));
    out.push((
        "gather_rows",
        b.download(&b.gather_rows(&x, &[36, 0, 5, 5])?)?,
    ));
    let mut acc = b.gram_accumulator(D_IN)?;
    let mask: Vec<u8> = (0..ROWS).map(|r| (r % 4 != 1) as u8).collect();
    b.gram_update(&mut acc, &x, Some(&mask), GramUpdate::Sum)?;
    b.gram_update(&mut acc, &x, None, GramUpdate::Sum)?;
    out.push(("gram_update (masked sum)", lower(&b.download(&acc)?, D_IN)));
    let mut acc = b.gram_accumulator(D_IN)?;
    b.gram_update(&mut acc, &x, None, GramUpdate::RunningMean { seen: 0 })?;
    b.gram_update(
        &mut acc,
        &y,
        None,
        GramUpdate::RunningMean { seen: ROWS as u64 },
    )?;
    out.push((
        "gram_update (running mean)",
        lower(&b.download(&acc)?, D_IN),
    ));
    Ok(out)
}

/// The lower triangle: the only part a Gram accumulator defines.
fn lower(g: &[f32], d: usize) -> Vec<f32> {
    (0..d)
        .flat_map(|i| (0..=i).map(move |j| g[i * d + j]))
        .collect()
}

/// Every forward op of the CUDA backend against the CPU engine, in both precisions.
pub fn check_forward_ops(dev: &Arc<CudaDevice>, rng: &mut Rng) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for precision in [Precision::Float32, Precision::Float16] {
        let inputs = Inputs::new(rng, precision);
        let gpu = run_ops(&CudaBackend::new(dev.clone(), precision), &inputs)?;
        let cpu = run_ops(&CpuBackend, &inputs)?;
        checks.extend(compare_ops(
            gpu,
            cpu,
            &format!("[{}]", precision.name()),
            tolerance(precision),
        ));
    }
    Ok(checks)
}
