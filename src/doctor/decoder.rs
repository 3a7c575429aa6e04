//! The decoder-LLM kernels (kernels/decoder.cu) against their CPU twins: RMSNorm over whole
//! rows and per-head column groups, RoPE, the SiLU-gated MLP and causal grouped-query
//! attention, in both precisions, on small awkward shapes and at the sizes of real models
//! (1,024 tokens, head_dim 64 and 128, 32 query heads over 8 key/value heads), to the
//! tolerances of the forward ops (doctor/forward.rs). In float16 the inputs are first
//! rounded to fp16, so only the kernel's own error is measured.

use std::sync::Arc;

use super::compare::{compare_ops, Check};
use super::forward::{representable, tolerance};
use crate::backend::cuda::CudaDevice;
use crate::backend::{Backend, CpuBackend, CudaBackend, GqaShape, Precision};
use crate::demo::Rng;
use crate::error::Result;

/// One decoder layer's shapes: the q|k|v projection of `shape`, a hidden size and an
/// intermediate size, `rows` = batch·seq rows.
struct Case {
    label: &'static str,
    shape: GqaShape,
    hidden: usize,
    intermediate: usize,
    /// Padding per sequence: sequence b has its last `pad·b` keys masked.
    pad: usize,
    /// Attention without a mask too (the CPU twin of a 1,024-token case takes seconds).
    unmasked_too: bool,
}

const CASES: &[Case] = &[
    // Awkward: head_dim 40 (not a multiple of 32), a sequence shorter than one key tile,
    // rows not a multiple of the query tile, groups of 3 query heads per kv head.
    Case {
        label: "small",
        shape: GqaShape {
            batch: 3,
            seq: 19,
            heads: 6,
            kv_heads: 2,
            head_dim: 40,
        },
        hidden: 45,
        intermediate: 67,
        pad: 5,
        unmasked_too: true,
    },
    // Llama-3.2-1B's attention: head_dim 64, 32 query heads over 8 kv heads.
    Case {
        label: "1024 tokens, hd 64, 32/8 heads",
        shape: GqaShape {
            batch: 1,
            seq: 1024,
            heads: 32,
            kv_heads: 8,
            head_dim: 64,
        },
        hidden: 2048,
        intermediate: 2048,
        pad: 0,
        unmasked_too: false,
    },
    // Llama-3.1-8B's (and Qwen3's) head_dim 128, two sequences, the second padded.
    Case {
        label: "2×1024 tokens, hd 128, 32/8 heads, padded",
        shape: GqaShape {
            batch: 2,
            seq: 1024,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
        },
        hidden: 4096,
        intermediate: 1024,
        pad: 300,
        unmasked_too: false,
    },
];

struct Inputs {
    x: Vec<f32>,
    norm: Vec<f32>,
    head_norm: Vec<f32>,
    qkv: Vec<f32>,
    gate_up: Vec<f32>,
    inv_freq: Vec<f32>,
    mask: Vec<u8>,
}

impl Inputs {
    fn new(rng: &mut Rng, c: &Case, precision: Precision) -> Self {
        let mut v = |n: usize, std: f32| representable(rng, n, std, precision);
        let s = &c.shape;
        let rows = s.batch * s.seq;
        let width = (s.heads + 2 * s.kv_heads) * s.head_dim;
        let half = s.head_dim / 2;
        Inputs {
            x: v(rows * c.hidden, 1.0),
            norm: v(c.hidden, 1.0),
            head_norm: v(s.head_dim, 1.0),
            qkv: v(rows * width, 1.0),
            gate_up: v(rows * 2 * c.intermediate, 2.0),
            // Llama's frequencies, base 500000.
            inv_freq: (0..half)
                .map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / s.head_dim as f32))
                .collect(),
            mask: (0..rows)
                .map(|r| ((r % s.seq) + c.pad * (r / s.seq) < s.seq) as u8)
                .collect(),
        }
    }
}

/// Every decoder op of one case on one backend, outputs downloaded, in a fixed order.
fn run_ops<B: Backend>(b: &B, c: &Case, i: &Inputs) -> Result<Vec<(&'static str, Vec<f32>)>> {
    let s = c.shape;
    let rows = s.batch * s.seq;
    let (qw, kw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let width = qw + 2 * kw;
    let mut out = Vec::new();
    let x = b.upload(&i.x, rows, c.hidden)?;
    let norm = b.upload(&i.norm, 1, c.hidden)?;
    out.push(("rms_norm (row)", b.download(&b.rms_norm(&x, &norm, 1e-5)?)?));
    let head_norm = b.upload(&i.head_norm, 1, s.head_dim)?;
    let mut qkv = b.upload(&i.qkv, rows, width)?;
    b.rms_norm_columns(&mut qkv, 0..qw, &head_norm, 1e-6)?;
    b.rms_norm_columns(&mut qkv, qw..qw + kw, &head_norm, 1e-6)?;
    out.push(("rms_norm (q, k heads, in place)", b.download(&qkv)?));
    let mut qkv = b.upload(&i.qkv, rows, width)?;
    b.rotary(&mut qkv, 0..qw + kw, s.head_dim, s.seq, &i.inv_freq)?;
    out.push(("rotary (q, k heads, in place)", b.download(&qkv)?));
    let gate_up = b.upload(&i.gate_up, rows, 2 * c.intermediate)?;
    out.push(("silu_mul", b.download(&b.silu_mul(&gate_up)?)?));
    out.push((
        "gqa_attention (causal, key mask)",
        b.download(&b.gqa_attention(&qkv, s, Some(&i.mask))?)?,
    ));
    if c.unmasked_too {
        out.push((
            "gqa_attention (causal, no mask)",
            b.download(&b.gqa_attention(&qkv, s, None)?)?,
        ));
    }
    Ok(out)
}

/// Every decoder op of the CUDA backend against the CPU engine, in both precisions.
pub fn check_decoder_ops(dev: &Arc<CudaDevice>, rng: &mut Rng) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for c in CASES {
        for precision in [Precision::Float32, Precision::Float16] {
            let inputs = Inputs::new(rng, c, precision);
            let gpu = run_ops(&CudaBackend::new(dev.clone(), precision), c, &inputs)?;
            let cpu = run_ops(&CpuBackend, c, &inputs)?;
            checks.extend(compare_ops(
                gpu,
                cpu,
                &format!("{} [{}]", c.label, precision.name()),
                tolerance(precision),
            ));
        }
    }
    Ok(checks)
}
