//! AVX-512 building blocks shared by the CPU engine's kernels and the weight decoder.

/// The transpose of a 16 × 16 tile held as 16 rows: interleave pairs of rows, then pairs
/// of pairs (within 128-bit lanes), then 128-bit lanes twice; `out[j]` is column j.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose_16x16(
    r: [std::arch::x86_64::__m512; 16],
) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_ps(); 16];
    for q in 0..8 {
        t[2 * q] = _mm512_unpacklo_ps(r[2 * q], r[2 * q + 1]);
        t[2 * q + 1] = _mm512_unpackhi_ps(r[2 * q], r[2 * q + 1]);
    }
    // u[4g + c]: element c of each 128-bit lane of rows 4g..4g+4.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (lo, hi) = (4 * g, 4 * g + 1);
        u[4 * g] = _mm512_shuffle_ps::<0x44>(t[lo], t[lo + 2]);
        u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t[lo], t[lo + 2]);
        u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[hi], t[hi + 2]);
        u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t[hi], t[hi + 2]);
    }
    // v[c] (c < 4, groups 0 and 1; c ≥ 8 groups 2 and 3): lanes 0 and 2, or 1 and 3.
    let mut v = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        v[c] = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        v[4 + c] = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
        v[8 + c] = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        v[12 + c] = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..8 {
        out[c] = _mm512_shuffle_f32x4::<0x88>(v[c], v[8 + c]);
        out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(v[c], v[8 + c]);
    }
    out
}
