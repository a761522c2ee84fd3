//! The K-quant dot products with AVX2: the integer lanes as ggml's `vec_dot` kernels form
//! them (`maddubs` + `madd` over 32 bytes, so lane p holds bytes 4p..4p+3), the float sums
//! as `super::dot_row` does. One weight row is unpacked once per super-block and multiplied
//! with up to four activation rows.

use std::arch::x86_64::*;

use super::{scales_mins_k4, scales_q3k, KMatrix, KType, Sum, Q8K, QK_K, ROW_TILE};
use crate::quant::hsum8_m256;

/// Activation rows one weight row is multiplied with at a time.
const ROWS: usize = 4;

/// `super::KMatrix::span` with these kernels for activation rows `acts`; `sum_of(i)` is row
/// i's way of summing.
///
/// # Safety
/// The CPU has AVX2 and FMA; out holds the batch's rows times n values and no other thread
/// writes the columns `rows`; `act` holds the batch's rows of kb blocks.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn span(
    km: &KMatrix,
    sum_of: &dyn Fn(usize) -> Sum,
    act: &[Q8K],
    acts: std::ops::Range<usize>,
    rows: std::ops::Range<usize>,
    out: *mut f32,
) {
    let (t, n, kb) = (km.t, km.n, km.k / QK_K);
    assert!(rows.end <= n && act.len() >= acts.end * kb);
    let mut buf = Vec::new();
    let a = |i: usize| &act[i * kb..(i + 1) * kb];
    let sums: Vec<Sum> = acts.clone().map(sum_of).collect();
    let sum = |i: usize| sums[i - acts.start];
    for i0 in acts.clone().step_by(ROW_TILE) {
        let tile = i0..(i0 + ROW_TILE).min(acts.end);
        for j in rows.clone() {
            let wr = km.gguf_row(j, &mut buf);
            let mut i = tile.start;
            // SAFETY (the kernels): the CPU has AVX2 and FMA. (The stores): i < m, j < n, and
            // column j is this task's.
            while i < tile.end {
                let s = sum(i);
                if i + ROWS <= tile.end && (i..i + ROWS).all(|x| sum(x) == s) {
                    let v = unsafe { dots::<ROWS>(t, s, wr, [a(i), a(i + 1), a(i + 2), a(i + 3)]) };
                    for (r, v) in v.into_iter().enumerate() {
                        unsafe { *out.add((i + r) * n + j) = v };
                    }
                    i += ROWS;
                } else {
                    let [v] = unsafe { dots::<1>(t, s, wr, [a(i)]) };
                    unsafe { *out.add(i * n + j) = v };
                    i += 1;
                }
            }
        }
    }
}

/// `super::quantize_row_q8k`, compiled for AVX2, with the value of largest magnitude found
/// eight lanes at a time: the portable search is one dependent chain of compares (it keeps the
/// first of equal magnitudes), which a prompt's activations spent more time in than in
/// rounding. The largest magnitude is found first (exact: a maximum), then its first value.
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_row_q8k(x: &[f32], out: &mut [Q8K]) {
    let sign = _mm256_set1_ps(-0.0);
    for (xs, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let mut m = _mm256_setzero_ps();
        for c in xs.chunks_exact(8) {
            // SAFETY: eight values. NaN (whose compare is false in the portable search) is
            // passed over: `max_ps` gives its second operand when either is NaN.
            let v = _mm256_andnot_ps(sign, unsafe { _mm256_loadu_ps(c.as_ptr()) });
            m = _mm256_max_ps(v, m);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
        let first = xs.iter().position(|v| v.abs() == amax);
        let max = match first {
            Some(i) if amax > 0.0 => xs[i],
            _ => {
                y.d = 0.0;
                y.qs = [0; QK_K];
                y.bsums = [0; 16];
                continue;
            }
        };
        super::quantize_block_q8k(xs, max, y);
    }
}

/// A block's (d, dmin) (dmin 0 for the types without mins), widened by F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) fn block_scales(t: KType, b: &[u8]) -> (f32, f32) {
    let at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]) as i32;
    let (d, dmin) = t.scales_at();
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(at(d) | dmin.map_or(0, at) << 16));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
}

/// One weight row (GGUF blocks) against R activation rows, all summed as `sum`: the
/// integers as `super::dot_row` forms them, the floats in its order (`super::Cell`), kept in
/// registers.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots<const R: usize>(t: KType, sum: Sum, w: &[u8], ys: [&[Q8K]; R]) -> [f32; R] {
    let bb = t.block_bytes();
    let chunked = matches!(sum, Sum::Rows(c) if c < QK_K);
    let has_min = matches!(t, KType::Q2K | KType::Q4K | KType::Q5K);
    // Sum::Lanes: eight float lanes (and Q4_K's four of mins, Q5_K's one); the others: one
    // value and one of mins.
    let mut lanes = [_mm256_setzero_ps(); R];
    let mut mins4 = [_mm_setzero_ps(); R];
    // Sum::Rows: the value and the min term in lanes 0 and 1; Sum::Tiled: the value in 0.
    let mut st = [_mm_setzero_ps(); R];
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let y: [&Q8K; R] = std::array::from_fn(|r| &ys[r][b]);
        let (sc, mn) = if matches!(t, KType::Q4K | KType::Q5K) {
            scales_mins_k4(&blk[4..16])
        } else {
            ([0; 8], [0; 8])
        };
        // SAFETY: blk is one whole block of t; the CPU has AVX2 (this function's features).
        let (sumi, parts) = unsafe {
            match (t, chunked) {
                (KType::Q2K, false) => q2k::<R, false>(blk, y),
                (KType::Q2K, true) => q2k::<R, true>(blk, y),
                (KType::Q3K, _) => q3k::<R>(blk, y),
                (KType::Q4K, false) => q45k::<R, false, false>(blk, &sc, y),
                (KType::Q4K, true) => q45k::<R, false, true>(blk, &sc, y),
                (KType::Q5K, _) => q45k::<R, true, false>(blk, &sc, y),
                (KType::Q6K, _) => q6k::<R>(blk, y),
            }
        };
        let (d, dmin) = block_scales(t, blk);
        // The weights' side of the min term: a min per group of 16 (Q6_K: its scales, for
        // the offset of 32).
        let mins16 = match t {
            KType::Q2K => {
                // SAFETY: the 16 scale bytes.
                let v = unsafe { _mm_loadu_si128(blk.as_ptr().cast()) };
                _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0xF)))
            }
            KType::Q4K | KType::Q5K => {
                // Each min twice: for both groups of 16 of its 32.
                let m = _mm_cvtsi64_si128(i64::from_le_bytes(mn));
                _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m, m))
            }
            // SAFETY: the 16 scale bytes.
            KType::Q6K => {
                _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(blk[192..].as_ptr().cast()) })
            }
            KType::Q3K => _mm256_setzero_si256(),
        };
        for r in 0..R {
            // SAFETY: 16 sums.
            let bs = unsafe { _mm256_loadu_si256(y[r].bsums.as_ptr().cast()) };
            // Lane p: groups 2p and 2p+1, min (or Q6_K's scale) times the activations' sum.
            let gm = _mm256_madd_epi16(bs, mins16);
            let mut s = sumi[r];
            if t == KType::Q6K {
                s = _mm256_sub_epi32(s, _mm256_slli_epi32(gm, 5));
            }
            let dy = y[r].d;
            match sum {
                Sum::Lanes => {
                    let dyd = dy * d;
                    let dminy = -dy * dmin;
                    match t {
                        KType::Q2K => {
                            let m = _mm256_cvtepi32_ps(gm);
                            lanes[r] = _mm256_fmadd_ps(_mm256_set1_ps(dminy), m, lanes[r]);
                        }
                        KType::Q4K => {
                            // Lane q: sub-blocks 2q and 2q+1, i.e. lanes 2q and 2q+1 of gm.
                            let h = _mm256_hadd_epi32(gm, gm);
                            let q = _mm_unpacklo_epi64(
                                _mm256_castsi256_si128(h),
                                _mm256_extracti128_si256(h, 1),
                            );
                            mins4[r] =
                                _mm_fmadd_ps(_mm_set1_ps(dminy), _mm_cvtepi32_ps(q), mins4[r]);
                        }
                        KType::Q5K => {
                            let m = hsum_i32(gm) as f32;
                            let a = _mm_cvtss_f32(mins4[r]);
                            mins4[r] = _mm_set_ss(dminy.mul_add(m, a));
                        }
                        KType::Q3K | KType::Q6K => {}
                    }
                    lanes[r] =
                        _mm256_fmadd_ps(_mm256_set1_ps(dyd), _mm256_cvtepi32_ps(s), lanes[r]);
                }
                Sum::Tiled => {
                    let isum = hsum_i32(s) as f32;
                    let mut v = d * isum;
                    if has_min {
                        v = (-dmin).mul_add(hsum_i32(gm) as f32, v);
                    }
                    st[r] = _mm_fmadd_ss(_mm_set_ss(v), _mm_set_ss(dy), st[r]);
                }
                Sum::Rows(chunk) => {
                    let ddm = _mm_setr_ps(d * dy, dmin * dy, 0.0, 0.0);
                    if chunk == QK_K {
                        let v = _mm_cvtepi32_ps(_mm_setr_epi32(hsum_i32(s), hsum_i32(gm), 0, 0));
                        st[r] = _mm_fmadd_ps(v, ddm, st[r]);
                    } else {
                        // Chunks of 64 (Q4_K: two lanes of gm each) or 128 (Q2_K: four);
                        // each chunk's (sum, min) pair into lanes 0 and 1, in order.
                        let h = _mm256_hadd_epi32(gm, gm);
                        let pairs = _mm_unpacklo_epi64(
                            _mm256_castsi256_si128(h),
                            _mm256_extracti128_si256(h, 1),
                        );
                        let m = if chunk == 64 {
                            pairs
                        } else {
                            _mm_hadd_epi32(pairs, pairs)
                        };
                        let (is, im) = (_mm_cvtepi32_ps(parts[r]), _mm_cvtepi32_ps(m));
                        let lo = _mm_unpacklo_ps(is, im);
                        st[r] = _mm_fmadd_ps(lo, ddm, st[r]);
                        st[r] = _mm_fmadd_ps(_mm_movehl_ps(lo, lo), ddm, st[r]);
                        if chunk == 64 {
                            let hi = _mm_unpackhi_ps(is, im);
                            st[r] = _mm_fmadd_ps(hi, ddm, st[r]);
                            st[r] = _mm_fmadd_ps(_mm_movehl_ps(hi, hi), ddm, st[r]);
                        }
                    }
                }
            }
        }
    }
    std::array::from_fn(|r| match sum {
        Sum::Rows(_) => _mm_cvtss_f32(st[r]) - _mm_cvtss_f32(_mm_shuffle_ps(st[r], st[r], 1)),
        Sum::Tiled => _mm_cvtss_f32(st[r]),
        Sum::Lanes => {
            let mut m = [0f32; 4];
            // SAFETY: 4 floats; the CPU has AVX2 (this function's features).
            let l = unsafe {
                _mm_storeu_ps(m.as_mut_ptr(), mins4[r]);
                hsum8_m256(lanes[r])
            };
            match t {
                KType::Q4K => l + ((m[0] + m[2]) + (m[1] + m[3])),
                KType::Q5K => l + m[0],
                _ => l,
            }
        }
    })
}

#[target_feature(enable = "avx2")]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// The integer totals of four lane vectors, in order.
#[target_feature(enable = "avx2")]
fn hsum4_i32(v: [__m256i; 4]) -> __m128i {
    let a = _mm256_hadd_epi32(v[0], v[1]);
    let b = _mm256_hadd_epi32(v[2], v[3]);
    let c = _mm256_hadd_epi32(a, b);
    _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1))
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn q8(y: &Q8K, at: usize) -> __m256i {
    debug_assert!(at + 32 <= QK_K);
    // SAFETY: within y.qs.
    unsafe { _mm256_loadu_si256(y.qs.as_ptr().add(at).cast()) }
}

/// A scale per 16 bytes of a 32-byte product: `lo` for the first 16, `hi` for the rest.
#[target_feature(enable = "avx2")]
fn scale2(lo: i32, hi: i32) -> __m256i {
    _mm256_setr_m128i(_mm_set1_epi16(lo as i16), _mm_set1_epi16(hi as i16))
}

/// Per-row integer totals of each chunk of a block (`Sum::Rows`), where asked for, in
/// order in the lanes.
type Chunks<const R: usize> = [__m128i; R];

/// Q4_K / Q5_K (with `HIGH`, the fifth bits `qh`): values 64j..64j+32 and 64j+32..64j+64,
/// unsigned, from the block's nibbles `qs`.
///
/// # Safety
/// qs holds 128 bytes; j < 4.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn q45k_values<const HIGH: bool>(
    qs: &[u8],
    qh: __m256i,
    j: usize,
) -> (__m256i, __m256i) {
    debug_assert!(qs.len() >= 128 && j < 4);
    let m4 = _mm256_set1_epi8(0xF);
    // SAFETY: 32 bytes of qs (the caller's contract).
    let bits = unsafe { _mm256_loadu_si256(qs.as_ptr().add(32 * j).cast()) };
    let mut lo = _mm256_and_si256(bits, m4);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
    if HIGH {
        let one = _mm256_set1_epi8(1);
        let bit = |s: i32| {
            let v = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s));
            _mm256_slli_epi16(_mm256_and_si256(v, one), 4)
        };
        lo = _mm256_add_epi8(lo, bit(2 * j as i32));
        hi = _mm256_add_epi8(hi, bit(2 * j as i32 + 1));
    }
    (lo, hi)
}

/// Q6_K: values 128j..128j+128 as four vectors of 32, unsigned (6 bits; the offset of 32 is
/// the caller's).
///
/// # Safety
/// b is a whole Q6_K block; j < 2.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) unsafe fn q6k_values(b: &[u8], j: usize) -> [__m256i; 4] {
    debug_assert!(b.len() >= 210 && j < 2);
    let m15 = _mm256_set1_epi8(15);
    let m3 = _mm256_set1_epi8(3);
    // SAFETY: 32-byte runs of ql and qh (the caller's contract).
    let (l1, l2, h) = unsafe {
        (
            _mm256_loadu_si256(b.as_ptr().add(64 * j).cast()),
            _mm256_loadu_si256(b.as_ptr().add(64 * j + 32).cast()),
            _mm256_loadu_si256(b.as_ptr().add(128 + 32 * j).cast()),
        )
    };
    let high = |s: i32| {
        let v = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(s)), m3);
        _mm256_slli_epi16(v, 4)
    };
    [
        _mm256_or_si256(_mm256_and_si256(l1, m15), high(0)),
        _mm256_or_si256(_mm256_and_si256(l2, m15), high(2)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m15), high(4)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l2, 4), m15), high(6)),
    ]
}

/// Q2_K: values 128j + 32s.. of the two bytes planes `bits` (the block's qs[32j..]), 2 bits each.
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn q2k_values(bits: __m256i, s: usize) -> __m256i {
    _mm256_and_si256(
        _mm256_srl_epi16(bits, _mm_cvtsi32_si128(2 * s as i32)),
        _mm256_set1_epi8(3),
    )
}

/// Q3_K: the low two bits and the high bit of values 128j + 32s.. (`bits`: qs[32j..];
/// `hbits`: the hmask).
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn q3k_parts(bits: __m256i, hbits: __m256i, j: usize, s: usize) -> (__m256i, __m256i) {
    let low = q2k_values(bits, s);
    let bit = _mm256_and_si256(
        _mm256_srl_epi16(hbits, _mm_cvtsi32_si128((4 * j + s) as i32)),
        _mm256_set1_epi8(1),
    );
    (low, bit)
}

/// Q4_K / Q5_K (with `HIGH`): unsigned 4- or 5-bit values, one scale per 32. With `CH`, each
/// row's totals per 64 values too.
#[target_feature(enable = "avx2")]
unsafe fn q45k<const R: usize, const HIGH: bool, const CH: bool>(
    b: &[u8],
    sc: &[u8; 8],
    y: [&Q8K; R],
) -> ([__m256i; R], Chunks<R>) {
    let (qh, qs) = if HIGH {
        (
            // SAFETY: Q5_K's 32 high-bit bytes.
            unsafe { _mm256_loadu_si256(b[16..48].as_ptr().cast()) },
            &b[48..176],
        )
    } else {
        (_mm256_setzero_si256(), &b[16..144])
    };
    let mut sumi = [_mm256_setzero_si256(); R];
    let mut parts = [[_mm256_setzero_si256(); 4]; R];
    for j in 0..4 {
        // SAFETY: qs is the block's 128 bytes of nibbles.
        let (lo, hi) = unsafe { q45k_values::<HIGH>(qs, qh, j) };
        let sl = _mm256_set1_epi16(sc[2 * j] as i16);
        let sh = _mm256_set1_epi16(sc[2 * j + 1] as i16);
        for r in 0..R {
            // SAFETY: positions within the block.
            let (a, c) = unsafe { (q8(y[r], 64 * j), q8(y[r], 64 * j + 32)) };
            let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(lo, a));
            let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(hi, c));
            let p = _mm256_add_epi32(pl, ph);
            if CH {
                parts[r][j] = p;
            }
            sumi[r] = _mm256_add_epi32(sumi[r], p);
        }
    }
    let ch = if CH {
        std::array::from_fn(|r| hsum4_i32(parts[r]))
    } else {
        [_mm_setzero_si128(); R]
    };
    (sumi, ch)
}

/// Q6_K: unsigned 6-bit values (the 32 comes off through the sums), a signed scale per 16.
#[target_feature(enable = "avx2")]
unsafe fn q6k<const R: usize>(b: &[u8], y: [&Q8K; R]) -> ([__m256i; R], Chunks<R>) {
    let sc = |g: usize| b[192 + g] as i8 as i32;
    let mut sumi = [_mm256_setzero_si256(); R];
    for j in 0..2 {
        // SAFETY: b is a whole block (the caller's contract).
        let w = unsafe { q6k_values(b, j) };
        for (t, w) in w.iter().enumerate() {
            let s = scale2(sc(8 * j + 2 * t), sc(8 * j + 2 * t + 1));
            for r in 0..R {
                // SAFETY: within the block.
                let a = unsafe { q8(y[r], 128 * j + 32 * t) };
                let p = _mm256_madd_epi16(s, _mm256_maddubs_epi16(*w, a));
                sumi[r] = _mm256_add_epi32(sumi[r], p);
            }
        }
    }
    (sumi, [_mm_setzero_si128(); R])
}

/// Q2_K: unsigned 2-bit values, a 4-bit scale (and min) per 16. With `CH`, each row's
/// totals per 128 values too.
#[target_feature(enable = "avx2")]
unsafe fn q2k<const R: usize, const CH: bool>(b: &[u8], y: [&Q8K; R]) -> ([__m256i; R], Chunks<R>) {
    let sc = |g: usize| (b[g] & 0xF) as i32;
    let mut sumi = [_mm256_setzero_si256(); R];
    let mut halves = [[_mm256_setzero_si256(); 4]; R];
    for j in 0..2 {
        // SAFETY: 32 bytes of qs.
        let bits = unsafe { _mm256_loadu_si256(b[16 + 32 * j..].as_ptr().cast()) };
        for s in 0..4 {
            let w = q2k_values(bits, s);
            let scale = scale2(sc(8 * j + 2 * s), sc(8 * j + 2 * s + 1));
            for r in 0..R {
                // SAFETY: within the block.
                let a = unsafe { q8(y[r], 128 * j + 32 * s) };
                let p = _mm256_madd_epi16(scale, _mm256_maddubs_epi16(w, a));
                if CH {
                    halves[r][j] = _mm256_add_epi32(halves[r][j], p);
                }
                sumi[r] = _mm256_add_epi32(sumi[r], p);
            }
        }
    }
    let ch = if CH {
        std::array::from_fn(|r| hsum4_i32(halves[r]))
    } else {
        [_mm_setzero_si128(); R]
    };
    (sumi, ch)
}

/// Q3_K: signed 3-bit values (-4..3), a signed 6-bit scale per 16. `maddubs` wants an
/// unsigned operand: |w| times q8 with w's sign, the same pair sums.
#[target_feature(enable = "avx2")]
unsafe fn q3k<const R: usize>(b: &[u8], y: [&Q8K; R]) -> ([__m256i; R], Chunks<R>) {
    let one = _mm256_set1_epi8(1);
    let scales = scales_q3k(&b[96..108]);
    // SAFETY: the 32 hmask bytes.
    let hbits = unsafe { _mm256_loadu_si256(b.as_ptr().cast()) };
    let mut sumi = [_mm256_setzero_si256(); R];
    for j in 0..2 {
        // SAFETY: 32 bytes of qs.
        let bits = unsafe { _mm256_loadu_si256(b[32 + 32 * j..].as_ptr().cast()) };
        for s in 0..4 {
            let (low, bit) = q3k_parts(bits, hbits, j, s);
            // 4 where the high bit is clear.
            let four = _mm256_slli_epi16(_mm256_xor_si256(bit, one), 2);
            let w = _mm256_sub_epi8(low, four);
            let aw = _mm256_sign_epi8(w, w);
            let scale = scale2(
                scales[8 * j + 2 * s] as i32,
                scales[8 * j + 2 * s + 1] as i32,
            );
            for r in 0..R {
                // SAFETY: within the block.
                let a = unsafe { q8(y[r], 128 * j + 32 * s) };
                let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w));
                sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(scale, p));
            }
        }
    }
    (sumi, [_mm_setzero_si128(); R])
}
