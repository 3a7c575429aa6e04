//! The CPU engine's f32 GEMM: a packed, cache-blocked AVX-512 kernel for the three products
//! a merge spends its time in: the linear layers (X·W), the lower triangle of the Grams
//! (XᵀX) and the solve's right-hand sides (G'·W). Where the CPU lacks AVX-512 it hands the
//! same product to faer.
//!
//! Why our own: on a 2-core AVX-512 Xeon faer's f32 GEMM ran at 94 GFLOP/s per core for
//! 2048³ and 53–60 for the Gram shapes, against the 172 GFLOP/s the FMA units give (two
//! 512-bit FMAs per cycle), and those GEMMs are nine tenths of a CPU merge.
//!
//! The scheme is the classic one (Goto; BLIS). For each block of `KC` along k, all threads
//! pack that block of B into `NR`-column micro-panels (`[k][NR]`, zero-padded), once, shared;
//! then C is cut into row chunks, a few per thread, and each task packs its rows of A into
//! `MR`-row micro-panels (`[k][MR]`, so the kernel broadcasts along them) and runs, per `NC`
//! columns, every A micro-panel against every B micro-panel. The `MR × NR` = 12 × 32
//! micro-kernel keeps 24 accumulators (two zmm per row) in registers, loads two vectors of B
//! and broadcasts 12 values of A per step of k: 24 FMAs against 14 loads. An A micro-panel
//! (12 × KC × 4 = 18 KB) stays in L1 while the block's B micro-panels (KC × NC × 4 = 768 KB)
//! stream from L2. A Gram's upper tiles are skipped, and its diagonal tiles written below the
//! diagonal only.

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

const MR: usize = 12;
const NR: usize = 32;
const KC: usize = 384;
const NC: usize = 512;
/// How far ahead in a B micro-panel the kernel prefetches: 24 steps of k (3 KB, about 300
/// cycles of FMAs), more than a load from L3 takes.
const B_AHEAD: usize = 24 * NR;

/// Whether the kernel prefetches B (on; `set_b_prefetch` turns it off for a comparison).
static B_PREFETCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the micro-kernel's prefetch of B on or off (on by default), for the benchmark that
/// measures what it gains.
pub fn set_b_prefetch(on: bool) {
    B_PREFETCH.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A GEMM operand A `[m, k]`: where its element (i, p) is in `data`.
#[derive(Clone, Copy, Debug)]
pub enum Lhs<'a> {
    /// `data[i·ld + p]`: a row-major matrix (activations, a Gram).
    RowMajor { data: &'a [f32], ld: usize },
    /// `data[p·ld + i]`: the transpose of a row-major matrix (Xᵀ of a Gram XᵀX).
    Transposed { data: &'a [f32], ld: usize },
}

/// Which part of C a product writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Full,
    /// Only C[i][j] with j ≤ i (C square): a Gram's lower triangle, the rest untouched.
    Lower,
}

/// `C = A·B` (`accumulate` false) or `C += A·B`, C `[m, n]` row-major with row stride `ldc`,
/// B `[k, n]` row-major with row stride `ldb`, on up to `threads` rayon tasks.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    (m, n, k): (usize, usize, usize),
    a: Lhs<'_>,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    part: Part,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    check_operands((m, n, k), a, b, ldb, c, ldc, part);
    if k == 0 {
        return empty_product((m, n), c, ldc, part, accumulate);
    }
    if !has_avx512() {
        return faer_gemm((m, n, k), a, b, ldb, c, ldc, part, accumulate);
    }
    gemm_split(
        chosen_split(m, part),
        (m, n, k),
        a,
        b,
        ldb,
        c,
        ldc,
        part,
        accumulate,
    )
}

/// `A·B` `[m, n]` into a fresh row-major buffer (`ldc` = n). Where the packed kernel runs,
/// the buffer is not zeroed first: the product stores every element before any is read
/// (zeroing a linear layer's output was a single-threaded memset, 1% of a decoder merge).
pub fn product((m, n, k): (usize, usize, usize), a: Lhs<'_>, b: &[f32], ldb: usize) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 || !has_avx512() {
        let mut c = vec![0.0f32; m * n];
        gemm((m, n, k), a, b, ldb, &mut c, n, Part::Full, false);
        return c;
    }
    check_inputs((m, n, k), a, b, ldb, n, Part::Full);
    let mut c = Vec::with_capacity(m * n);
    // SAFETY: AVX-512F was detected and the operands checked; `c` has room for m·n floats.
    // With `accumulate` false a full product's first block of k stores every element of
    // C's m rows × n columns without reading any (later blocks read what it stored), so
    // all m·n are initialised when it returns.
    unsafe {
        gemm_raw(
            chosen_split(m, Part::Full),
            (m, n, k),
            a,
            b,
            ldb,
            SharedC(c.as_mut_ptr()),
            n,
            Part::Full,
            false,
        );
        c.set_len(m * n);
    }
    c
}

/// The split `gemm` uses for a product with `m` rows.
fn chosen_split(m: usize, part: Part) -> Split {
    split().unwrap_or(match part {
        // Small triangles: their row chunks are uneven and each block of k is little work
        // between two barriers; independent slabs ran them 5–31% faster at d = 512–1,536
        // (`cargo bench --bench kernels gemm`, 2 threads), and slower at d = 3,072.
        Part::Lower if m <= 2048 => Split::Columns,
        _ => Split::Rows,
    })
}

/// A product over k = 0: C (its part) zeroed, or kept when accumulating.
fn empty_product((m, n): (usize, usize), c: &mut [f32], ldc: usize, part: Part, accumulate: bool) {
    if !accumulate {
        for i in 0..m {
            let cols = if part == Part::Lower { i + 1 } else { n };
            c[i * ldc..i * ldc + cols].fill(0.0);
        }
    }
}

/// Panics unless the operands hold the product's elements at their strides (m, n ≥ 1).
fn check_operands(
    (m, n, k): (usize, usize, usize),
    a: Lhs<'_>,
    b: &[f32],
    ldb: usize,
    c: &[f32],
    ldc: usize,
    part: Part,
) {
    check_inputs((m, n, k), a, b, ldb, ldc, part);
    assert!(c.len() >= (m - 1) * ldc + n);
}

/// `check_operands` but for C's length.
fn check_inputs(
    (m, n, k): (usize, usize, usize),
    a: Lhs<'_>,
    b: &[f32],
    ldb: usize,
    ldc: usize,
    part: Part,
) {
    assert!(
        part == Part::Full || m == n,
        "a lower triangle needs a square C"
    );
    assert!(ldb >= n && ldc >= n);
    match a {
        Lhs::RowMajor { data, ld } => {
            assert!(ld >= k && (k == 0 || data.len() >= (m - 1) * ld + k))
        }
        Lhs::Transposed { data, ld } => {
            assert!(ld >= m && (k == 0 || data.len() >= (k - 1) * ld + m))
        }
    }
    assert!(k == 0 || b.len() >= (k - 1) * ldb + n);
}

/// `gemm` with a given split between threads (the benchmark compares them), for k ≥ 1 on a
/// CPU with AVX-512F; it panics otherwise, or when the operands are too short.
#[allow(clippy::too_many_arguments)]
pub fn gemm_split(
    split: Split,
    (m, n, k): (usize, usize, usize),
    a: Lhs<'_>,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    part: Part,
    accumulate: bool,
) {
    assert!(has_avx512() && m > 0 && n > 0 && k > 0);
    check_operands((m, n, k), a, b, ldb, c, ldc, part);
    // SAFETY: AVX-512F and the operands were checked just above; C is `c`, borrowed
    // mutably for the call.
    unsafe {
        gemm_raw(
            split,
            (m, n, k),
            a,
            b,
            ldb,
            SharedC(c.as_mut_ptr()),
            ldc,
            part,
            accumulate,
        )
    }
}

/// The packed product into C at a raw pointer.
///
/// # Safety
/// The CPU must have AVX-512F; m, n, k ≥ 1 and the operands must pass `check_inputs`; `c`
/// must be valid for writes of `(m − 1)·ldc + n` floats that nothing else touches during
/// the call, and initialised where the product reads it (everywhere it writes when
/// `accumulate`; never otherwise: see `product`).
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn gemm_raw(
    split: Split,
    (m, n, k): (usize, usize, usize),
    a: Lhs<'_>,
    b: &[f32],
    ldb: usize,
    c: SharedC,
    ldc: usize,
    part: Part,
    accumulate: bool,
) {
    if split == Split::Columns && rayon::current_num_threads() > 1 {
        // SAFETY: the caller's contract is this function's.
        return unsafe { gemm_column_slabs((m, n, k), a, b, ldb, c, ldc, part, accumulate) };
    }
    let chunks = row_chunks(m, part, rayon::current_num_threads());
    let mut tasks: Vec<_> = chunks
        .iter()
        .map(|&(r0, r1)| (r0, r1, scratch((r1 - r0).div_ceil(MR) * MR * KC)))
        .collect();
    // B is packed once per block of k, by all threads, and shared: packing it per task
    // (its reads and writes are k·n each) cost as much as a fifth of a product at 2 threads.
    let panels = n.div_ceil(NR);
    let mut packed_b = scratch(panels * NR * KC);
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        packed_b[..panels * NR * kc]
            .par_chunks_mut(NR * kc)
            .enumerate()
            .for_each(|(t, panel)| pack_b(b, ldb, pc, kc, t * NR, NR.min(n - t * NR), panel));
        let packed_b = &packed_b[..panels * NR * kc];
        tasks.par_iter_mut().for_each(|(r0, r1, packed_a)| {
            // SAFETY: the CPU has AVX-512F (the caller's contract); each task writes only
            // its own rows r0..r1 of C, and every pointer the kernel is given is inside
            // `packed_a`, `packed_b` or those rows, as `block` sizes them.
            unsafe {
                pack_a(a, *r0, *r1 - *r0, pc, kc, packed_a);
                block(
                    (*r0, *r1, 0, n, kc),
                    packed_a,
                    packed_b,
                    c.at(*r0 * ldc),
                    ldc,
                    part,
                    accumulate || pc > 0,
                )
            }
        });
    }
    give_back(packed_b);
    tasks
        .into_iter()
        .for_each(|(.., packed_a)| give_back(packed_a));
}

thread_local! {
    /// Packing buffers kept for the next product on this thread: a fresh zeroed one per
    /// product cost a memset of megabytes (the packing writes every element anyway).
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of `len` floats (contents unspecified) from this thread's pool.
fn scratch(len: usize) -> Vec<f32> {
    let mut v = SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    v.resize(len, 0.0);
    v
}

/// Returns a buffer to this thread's pool (a few are kept).
fn give_back(v: Vec<f32>) {
    SCRATCH.with(|s| {
        let mut pool = s.borrow_mut();
        if pool.len() < 8 {
            pool.push(v);
        }
    });
}

/// Whether the packed kernel runs: AVX-512F detected, and `REGMEAN_CPU_GEMM` not `faer`
/// (which hands every product to faer, to compare the two on one machine).
fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static USE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *USE.get_or_init(|| {
            std::env::var_os("REGMEAN_CPU_GEMM").is_none_or(|v| v != "faer")
                && std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Row ranges of C, one per task, multiples of `MR`, of about equal work: equal rows for a
/// full product, equal triangle areas (boundaries at m·√(t/T)) for a lower one. Six times
/// the threads, so that a core slowed by other work (this machine's host takes cycles at
/// random) does not hold each block of k back: against twice the threads, 4–6% less time
/// over the linear and G'W shapes of a merge (2 threads, interleaved in one process).
fn row_chunks(m: usize, part: Part, threads: usize) -> Vec<(usize, usize)> {
    let tasks = if threads <= 1 { 1 } else { 6 * threads };
    let tasks = tasks.min(m.div_ceil(MR)).max(1);
    split_bounds(m, tasks, MR, |f| match part {
        Part::Full => f * m as f64,
        Part::Lower => f.sqrt() * m as f64,
    })
}

/// `tasks` ranges covering `0..len`, cut at `at(t / tasks)` rounded to multiples of `step`
/// (empty ranges dropped).
fn split_bounds(
    len: usize,
    tasks: usize,
    step: usize,
    at: impl Fn(f64) -> f64,
) -> Vec<(usize, usize)> {
    let mut bounds = vec![0usize];
    for t in 1..tasks {
        let cut = at(t as f64 / tasks as f64);
        let cut = ((cut / step as f64).round() as usize * step).min(len);
        if cut > *bounds.last().unwrap() {
            bounds.push(cut);
        }
    }
    if *bounds.last().unwrap() < len {
        bounds.push(len);
    }
    bounds.windows(2).map(|w| (w[0], w[1])).collect()
}

/// One block of k (`kc` deep) of rows `r0..r1` of C (`c` starts at row r0), from their
/// packed A and all of B packed, single-threaded: per `NC` columns of B (which stay in L2),
/// each A micro-panel (in L1) against each B micro-panel.
///
/// # Safety
/// The CPU must have AVX-512F; `c` must hold rows `r0..r1` of C with stride `ldc`;
/// `packed_a` holds the rows' micro-panels and `packed_b` every column's, `kc` deep.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn block(
    (r0, r1, col0, n, kc): (usize, usize, usize, usize, usize),
    packed_a: &[f32],
    packed_b: &[f32],
    c: *mut f32,
    ldc: usize,
    part: Part,
    add: bool,
) {
    let rows = r1 - r0;
    let lower = part == Part::Lower;
    let prefetch = B_PREFETCH.load(std::sync::atomic::Ordering::Relaxed);
    // A lower triangle's rows r0..r1 need only the columns below r1.
    let n_here = if lower {
        n.min(r1.saturating_sub(col0))
    } else {
        n
    };
    for jc in (0..n_here).step_by(NC) {
        let nc = NC.min(n_here - jc);
        let block_b = &packed_b[jc * kc..(jc + nc.div_ceil(NR) * NR) * kc];
        for (q, panel_a) in packed_a
            .chunks_exact(MR * kc)
            .take(rows.div_ceil(MR))
            .enumerate()
        {
            let i0 = q * MR;
            let mr = MR.min(rows - i0);
            // Global row of this tile's first row, for the triangle.
            let gi0 = r0 + i0;
            for (t, panel_b) in block_b.chunks_exact(NR * kc).enumerate() {
                let j0 = jc + t * NR;
                // Global column of this tile's first column, for the triangle.
                let gj0 = col0 + j0;
                let nr = NR.min(nc - t * NR);
                if lower && gj0 > gi0 + mr - 1 {
                    break; // this and every later tile wholly above the diagonal
                }
                let cut = lower && gj0 + nr - 1 > gi0;
                let tile = c.add(i0 * ldc + j0);
                let run = |c: *mut f32, ldc: usize, add: bool| {
                    let (a, b) = (panel_a.as_ptr(), panel_b.as_ptr());
                    if prefetch {
                        kernel::<true>(kc, a, b, c, ldc, add)
                    } else {
                        kernel::<false>(kc, a, b, c, ldc, add)
                    }
                };
                if mr == MR && nr == NR && !cut {
                    run(tile, ldc, add);
                } else {
                    let mut tmp = [0.0f32; MR * NR];
                    run(tmp.as_mut_ptr(), NR, false);
                    for i in 0..mr {
                        let cols = if lower {
                            nr.min((gi0 + i + 1).saturating_sub(gj0))
                        } else {
                            nr
                        };
                        let dst = tile.add(i * ldc);
                        for j in 0..cols {
                            let v = tmp[i * NR + j];
                            *dst.add(j) = if add { *dst.add(j) + v } else { v };
                        }
                    }
                }
            }
        }
    }
}

/// Rows `r0..r0+rows`, columns `pc..pc+kc` of A into `MR`-row micro-panels `[kc][MR]`, the
/// rows past the end zero.
///
/// # Safety
/// The CPU must have AVX-512F.
unsafe fn pack_a(a: Lhs<'_>, r0: usize, rows: usize, pc: usize, kc: usize, out: &mut [f32]) {
    for (q, panel) in out
        .chunks_exact_mut(MR * kc)
        .take(rows.div_ceil(MR))
        .enumerate()
    {
        let i0 = r0 + q * MR;
        let mr = MR.min(rows - q * MR);
        match a {
            Lhs::RowMajor { data, ld } => {
                // Bounds: rows i0..i0+mr < m and columns pc..pc+kc ≤ k, which `gemm`'s
                // checks hold within `data`; the panel holds kc·MR floats.
                assert!(mr >= 1 && (i0 + mr - 1) * ld + pc + kc <= data.len());
                assert!(panel.len() >= kc * MR);
                // SAFETY: AVX-512F is this function's contract, and the asserts above keep
                // every load inside `data` and every store inside `panel`.
                unsafe { pack_rows_transposed(&data[i0 * ld..], ld, mr, pc, kc, panel) }
            }
            Lhs::Transposed { data, ld } => {
                for p in 0..kc {
                    let at = (pc + p) * ld + i0;
                    let dst = &mut panel[p * MR..(p + 1) * MR];
                    if mr == MR {
                        let src: &[f32; MR] = data[at..at + MR].try_into().unwrap();
                        dst.copy_from_slice(src);
                    } else {
                        dst[..mr].copy_from_slice(&data[at..at + mr]);
                        dst[mr..].fill(0.0);
                    }
                }
            }
        }
    }
}

/// One A micro-panel from `mr` ≤ `MR` rows of a row-major A (`data` starts at its first
/// row, stride `ld`), columns `pc..pc+kc`: 16 columns at a time, the rows (and 16 − MR rows
/// of zeros) are loaded into registers and transposed there, and each column is stored as
/// one step of k. Element by element, this transpose was a twentieth of a decoder merge's
/// time (its `o_proj` and `down_proj` products are short in n, so packing A weighs).
///
/// # Safety
/// AVX-512F; `data` must hold `(mr − 1)·ld + pc + kc` floats and `panel` `kc·MR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows_transposed(
    data: &[f32],
    ld: usize,
    mr: usize,
    pc: usize,
    kc: usize,
    panel: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (src, dst) = (data.as_ptr(), panel.as_mut_ptr());
    for p0 in (0..kc).step_by(16) {
        let w = 16.min(kc - p0);
        let cols: __mmask16 = if w == 16 { 0xFFFF } else { (1u16 << w) - 1 };
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, row) in r.iter_mut().enumerate().take(mr) {
            *row = _mm512_maskz_loadu_ps(cols, src.add(i * ld + pc + p0));
        }
        let r = crate::simd::transpose_16x16(r);
        // Column pp of the tile is step p0 + pp of the panel: its MR rows, lanes 0..MR.
        let rows: __mmask16 = (1u16 << MR) - 1;
        for (pp, col) in r.iter().enumerate().take(w) {
            _mm512_mask_storeu_ps(dst.add((p0 + pp) * MR), rows, *col);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_rows_transposed(_: &[f32], _: usize, _: usize, _: usize, _: usize, _: &mut [f32]) {
    unreachable!("the packed kernel runs only where AVX-512F was detected")
}

/// Rows `pc..pc+kc`, columns `j0..j0+nr` of B into one micro-panel `[kc][NR]`, the columns
/// past `nr` zero.
fn pack_b(b: &[f32], ldb: usize, pc: usize, kc: usize, j0: usize, nr: usize, panel: &mut [f32]) {
    for p in 0..kc {
        let at = (pc + p) * ldb + j0;
        let dst = &mut panel[p * NR..(p + 1) * NR];
        // A fixed length where it can be: a copy of `nr` is a memmove call.
        if nr == NR {
            let src: &[f32; NR] = b[at..at + NR].try_into().unwrap();
            dst.copy_from_slice(src);
        } else {
            dst[..nr].copy_from_slice(&b[at..at + nr]);
            dst[nr..].fill(0.0);
        }
    }
}

/// The 12 × 32 micro-kernel: `C (+)= Σ_p a[p][0..12] ⊗ b[p][0..32]` over `kc` steps.
///
/// # Safety
/// AVX-512F; `a` holds `kc·MR` floats, `b` `kc·NR`, and `c` rows of `NR` floats at stride
/// `ldc` for 12 rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const PREFETCH: bool>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if add {
        // C's tile is read only at the end, and is rarely in cache (C is larger than L2):
        // fetching it now hides that latency behind the k loop.
        for i in 0..MR {
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.add(i * ldc + 16) as *const i8);
        }
    }
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        // B streams through the kernel once per A micro-panel, from L2 or, where the other
        // thread packed it, from L3: asking for it `B_AHEAD` ahead hides that latency
        // (`cargo bench --bench kernels gemm` compares). A prefetch never faults, so
        // running past the panel's end is harmless.
        if PREFETCH {
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(B_AHEAD) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(B_AHEAD + 16) as *const i8);
        }
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(i));
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    for (i, row) in acc.iter().enumerate() {
        let dst = c.add(i * ldc);
        if add {
            _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), row[0]));
            _mm512_storeu_ps(
                dst.add(16),
                _mm512_add_ps(_mm512_loadu_ps(dst.add(16)), row[1]),
            );
        } else {
            _mm512_storeu_ps(dst, row[0]);
            _mm512_storeu_ps(dst.add(16), row[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const PREFETCH: bool>(
    _: usize,
    _: *const f32,
    _: *const f32,
    _: *mut f32,
    _: usize,
    _: bool,
) {
    unreachable!("the packed kernel runs only where AVX-512F was detected")
}

/// C's base pointer, shared by tasks that write disjoint rows or column slabs of it.
#[derive(Clone, Copy)]
struct SharedC(*mut f32);
// SAFETY: only `gemm_split` and `product` make one, for `gemm_raw`, whose tasks write
// disjoint parts of C.
unsafe impl Send for SharedC {}
unsafe impl Sync for SharedC {}

impl SharedC {
    /// C's element `offset` (a method, so that closures capture the wrapper, not its
    /// pointer field).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Column ranges of C, one per task, multiples of `NR`, of about equal work: equal columns
/// for a full product; for a lower triangle equal areas of the part left of each boundary
/// (column c has m − c entries).
fn column_slabs(n: usize, m: usize, part: Part, threads: usize) -> Vec<(usize, usize)> {
    let tasks = threads.max(1).min(n.div_ceil(NR)).max(1);
    split_bounds(n, tasks, NR, |f| match part {
        Part::Full => f * n as f64,
        // Area left of column c: m·c − c²/2 = f·m²/2  ⇒  c = m·(1 − √(1 − f)).
        Part::Lower => m as f64 * (1.0 - (1.0 - f).sqrt()),
    })
}

/// Rows of A packed at a time in the column-slab scheme (its packed block stays in L2).
const MC: usize = 240;

/// The packed product with C cut into column slabs, one per thread, each an independent
/// single-threaded GEMM (its own packing of A and of its slab of B; no barrier between the
/// blocks of k). A is packed once per thread instead of once in all.
///
/// # Safety
/// As for `gemm_raw`.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn gemm_column_slabs(
    (m, n, k): (usize, usize, usize),
    a: Lhs<'_>,
    b: &[f32],
    ldb: usize,
    shared: SharedC,
    ldc: usize,
    part: Part,
    accumulate: bool,
) {
    let slabs = column_slabs(n, m, part, rayon::current_num_threads());
    slabs.par_iter().for_each(|&(j0, j1)| {
        let w = j1 - j0;
        let panels = w.div_ceil(NR);
        let mut packed_b = scratch(panels * NR * KC);
        let mut packed_a = scratch(MC.div_ceil(MR) * MR * KC);
        // A lower triangle's columns j0.. need only the rows from j0 on.
        let first_row = if part == Part::Lower { j0 / MR * MR } else { 0 };
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            for (t, panel) in packed_b[..panels * NR * kc]
                .chunks_exact_mut(NR * kc)
                .enumerate()
            {
                pack_b(b, ldb, pc, kc, j0 + t * NR, NR.min(w - t * NR), panel);
            }
            for r0 in (first_row..m).step_by(MC) {
                let r1 = (r0 + MC).min(m);
                // SAFETY: AVX-512F (the caller's contract); this task writes only columns
                // j0..j1 of rows r0..r1 of C, which no other task writes, and `block` stays
                // inside the packed buffers it is given.
                unsafe {
                    pack_a(a, r0, r1 - r0, pc, kc, &mut packed_a);
                    block(
                        (r0, r1, j0, w, kc),
                        &packed_a,
                        &packed_b[..panels * NR * kc],
                        shared.at(r0 * ldc + j0),
                        ldc,
                        part,
                        accumulate || pc > 0,
                    )
                }
            }
        }
        give_back(packed_a);
        give_back(packed_b);
    });
}

/// How `gemm` shares a product between threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Row chunks of C sharing each packed block of B (a barrier per block of k).
    Rows,
    /// Independent column slabs of C.
    Columns,
}

/// The split `REGMEAN_CPU_GEMM_SPLIT=rows|columns` forces on every product (for
/// comparisons); `None`: `gemm` picks per product.
fn split() -> Option<Split> {
    static SPLIT: std::sync::OnceLock<Option<Split>> = std::sync::OnceLock::new();
    *SPLIT.get_or_init(
        || match std::env::var("REGMEAN_CPU_GEMM_SPLIT").as_deref() {
            Ok("columns") => Some(Split::Columns),
            Ok("rows") => Some(Split::Rows),
            _ => None,
        },
    )
}

/// The same product through faer, for CPUs without AVX-512 (and the benchmark's baseline).
#[allow(clippy::too_many_arguments)]
pub fn faer_gemm(
    (m, n, k): (usize, usize, usize),
    a: Lhs<'_>,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    part: Part,
    accumulate: bool,
) {
    let a = match a {
        Lhs::RowMajor { data, ld } => {
            MatRef::from_row_major_slice_with_stride(&data[..(m - 1) * ld + k], m, k, ld)
        }
        Lhs::Transposed { data, ld } => {
            MatRef::from_row_major_slice_with_stride(&data[..(k - 1) * ld + m], k, m, ld)
                .transpose()
        }
    };
    let b = MatRef::from_row_major_slice_with_stride(&b[..(k - 1) * ldb + n], k, n, ldb);
    let c_len = (m - 1) * ldc + n;
    // C as the transpose of a column-major [n, m]: faer 0.24's
    // `from_row_major_slice_with_stride_mut` swaps the two strides.
    let dst =
        MatMut::from_column_major_slice_with_stride_mut(&mut c[..c_len], n, m, ldc).transpose_mut();
    let beta = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    match part {
        Part::Full => matmul(dst, beta, a, b, 1.0, Par::rayon(0)),
        Part::Lower => triangular::matmul(
            dst,
            BlockStructure::TriangularLower,
            beta,
            a,
            BlockStructure::Rectangular,
            b,
            BlockStructure::Rectangular,
            1.0,
            Par::rayon(0),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Checks C against an f64 product, element by element: within `tol` of the largest
    /// |C| where written, and exactly the old value where the part leaves C alone.
    #[allow(clippy::too_many_arguments)]
    fn check(
        (m, n, k): (usize, usize, usize),
        transposed: bool,
        (lda, ldb, ldc): (usize, usize, usize),
        part: Part,
        accumulate: bool,
        run: impl Fn(Lhs<'_>, &[f32], &mut [f32]),
    ) {
        let a = if transposed {
            values(k * lda, 1)
        } else {
            values(m * lda, 1)
        };
        let b = values(k * ldb, 2);
        let before = values(m * ldc, 3);
        let mut c = before.clone();
        let lhs = if transposed {
            Lhs::Transposed { data: &a, ld: lda }
        } else {
            Lhs::RowMajor { data: &a, ld: lda }
        };
        run(lhs, &b, &mut c);
        let at = |i: usize, p: usize| {
            if transposed {
                a[p * lda + i]
            } else {
                a[i * lda + p]
            }
        };
        let mut worst = 0.0f64;
        for i in 0..m {
            for j in 0..ldc {
                let old = before[i * ldc + j] as f64;
                let got = c[i * ldc + j] as f64;
                if j >= n || (part == Part::Lower && j > i) {
                    assert_eq!(got, old, "({i}, {j}) outside the product changed");
                    continue;
                }
                let mut want: f64 = (0..k)
                    .map(|p| at(i, p) as f64 * b[p * ldb + j] as f64)
                    .sum();
                if accumulate {
                    want += old;
                }
                worst = worst.max((got - want).abs());
            }
        }
        // Entries are sums of k products of values in [-0.5, 0.5): f32 rounding of the
        // partial sums grows as √k·ε; 1e-6·k bounds it with room and fails on any wrong term.
        let tol = 1e-6 * (k as f64).max(1.0);
        assert!(
            worst <= tol,
            "{m}x{n}x{k} {part:?} transposed={transposed}: error {worst:e} > {tol:e}"
        );
    }

    fn shapes() -> Vec<(usize, usize, usize)> {
        // Edges in every dimension: below a tile, between tiles, past KC and NC.
        vec![
            (1, 1, 1),
            (5, 7, 3),
            (12, 32, 16),
            (13, 33, 17),
            (40, 70, 400),
            (97, 545, 385),
            (200, 64, 800),
            (500, 130, 50),
        ]
    }

    #[test]
    fn products_match_f64_in_every_layout_part_and_edge() {
        // Both splits where the packed kernel runs (the faer fallback otherwise).
        let splits: &[Option<Split>] = if has_avx512() {
            &[Some(Split::Rows), Some(Split::Columns)]
        } else {
            &[None]
        };
        for &split in splits {
            #[allow(clippy::too_many_arguments)]
            fn run(
                split: Option<Split>,
                dims: (usize, usize, usize),
                a: Lhs<'_>,
                b: &[f32],
                ldb: usize,
                c: &mut [f32],
                ldc: usize,
                part: Part,
                accumulate: bool,
            ) {
                match split {
                    Some(s) => gemm_split(s, dims, a, b, ldb, c, ldc, part, accumulate),
                    None => gemm(dims, a, b, ldb, c, ldc, part, accumulate),
                }
            }
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    for (m, n, k) in shapes() {
                        for transposed in [false, true] {
                            for accumulate in [false, true] {
                                let lds = (if transposed { m + 3 } else { k + 3 }, n + 5, n + 2);
                                check(
                                    (m, n, k),
                                    transposed,
                                    lds,
                                    Part::Full,
                                    accumulate,
                                    |a, b, c| {
                                        run(
                                            split,
                                            (m, n, k),
                                            a,
                                            b,
                                            lds.1,
                                            c,
                                            lds.2,
                                            Part::Full,
                                            accumulate,
                                        )
                                    },
                                );
                                let sq = (m, m, k);
                                let lds = (if transposed { m + 1 } else { k + 1 }, m, m + 3);
                                check(sq, transposed, lds, Part::Lower, accumulate, |a, b, c| {
                                    run(split, sq, a, b, lds.1, c, lds.2, Part::Lower, accumulate)
                                });
                            }
                        }
                    }
                });
            }
        }
    }

    #[test]
    fn a_fresh_product_writes_every_element() {
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for (m, n, k) in shapes() {
                    // A freed block of NaNs of the product's size, which the allocator
                    // likely hands back: an element left unwritten stays NaN.
                    drop(vec![f32::NAN; m * n]);
                    let lds = (k + 1, n + 3, n);
                    check((m, n, k), false, lds, Part::Full, false, |a, b, c| {
                        let fresh = product((m, n, k), a, b, lds.1);
                        assert_eq!(fresh.len(), m * n);
                        c.copy_from_slice(&fresh);
                    });
                }
            });
        }
    }

    #[test]
    fn faer_fallback_computes_the_same_products() {
        for (m, n, k) in shapes() {
            for transposed in [false, true] {
                let lds = (if transposed { m } else { k }, n, n);
                check((m, n, k), transposed, lds, Part::Full, true, |a, b, c| {
                    faer_gemm((m, n, k), a, b, lds.1, c, lds.2, Part::Full, true)
                });
                let lds = (if transposed { m } else { k }, m, m);
                check((m, m, k), transposed, lds, Part::Lower, false, |a, b, c| {
                    faer_gemm((m, m, k), a, b, lds.1, c, lds.2, Part::Lower, false)
                });
            }
        }
    }

    #[test]
    fn an_empty_k_zeroes_or_keeps_c() {
        let empty = |c: &mut [f32], accumulate| {
            let none = Lhs::RowMajor { data: &[], ld: 0 };
            gemm((2, 3, 0), none, &[], 3, c, 3, Part::Full, accumulate)
        };
        let mut c = vec![1.0f32; 6];
        empty(&mut c, true);
        assert_eq!(c, vec![1.0; 6]);
        empty(&mut c, false);
        assert_eq!(c, vec![0.0; 6]);
    }

    #[test]
    fn lower_chunks_cover_the_rows_in_multiples_of_the_tile() {
        for m in [1, 11, 12, 768, 3072, 1601] {
            for part in [Part::Full, Part::Lower] {
                let c = row_chunks(m, part, 2);
                assert_eq!(c.first().unwrap().0, 0);
                assert_eq!(c.last().unwrap().1, m);
                for w in c.windows(2) {
                    assert_eq!(w[0].1, w[1].0);
                    assert_eq!(w[0].1 % MR, 0);
                }
            }
        }
    }
}
