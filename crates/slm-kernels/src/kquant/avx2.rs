//! The K-quant dot products with AVX2: the integer lanes as ggml's `vec_dot` kernels form
//! them (`maddubs` + `madd` over 32 bytes, so lane p holds bytes 4p..4p+3), the float sums
//! as `super::dot_row` does. One weight row is unpacked once per super-block and multiplied
//! with up to four activation rows.

use std::arch::x86_64::*;

use super::{
    block_scales, group_mins, offset_term, scales_mins_k4, scales_q3k, Cell, KType, Sum, Q8K, QK_K,
    ROW_TILE,
};

/// Activation rows one weight row is multiplied with at a time.
const ROWS: usize = 4;

/// `super::KMatrix::span` with these kernels; `sum_of(i)` is row i's way of summing.
///
/// # Safety
/// The CPU has AVX2 and FMA; out holds m * n values and no other thread writes the
/// columns `rows`; `w` holds n rows of kb blocks, `act` m rows of kb.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn span(
    t: KType,
    sum_of: &dyn Fn(usize) -> Sum,
    w: &[u8],
    kb: usize,
    act: &[Q8K],
    m: usize,
    rows: std::ops::Range<usize>,
    out: *mut f32,
    n: usize,
) {
    let rb = kb * t.block_bytes();
    assert!(w.len() >= rows.end * rb && act.len() >= m * kb);
    let a = |i: usize| &act[i * kb..(i + 1) * kb];
    let sums: Vec<Sum> = (0..m).map(sum_of).collect();
    for i0 in (0..m).step_by(ROW_TILE) {
        let tile = i0..(i0 + ROW_TILE).min(m);
        for j in rows.clone() {
            let wr = &w[j * rb..(j + 1) * rb];
            let mut i = tile.start;
            // SAFETY (the kernels): the CPU has AVX2 and FMA. (The stores): i < m, j < n, and
            // column j is this task's.
            while i < tile.end {
                let s = sums[i];
                if i + ROWS <= tile.end && sums[i..i + ROWS].iter().all(|&x| x == s) {
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

/// One weight row (GGUF blocks) against R activation rows, all summed as `sum`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dots<const R: usize>(t: KType, sum: Sum, w: &[u8], ys: [&[Q8K]; R]) -> [f32; R] {
    let bb = t.block_bytes();
    let chunk = match sum {
        Sum::Rows(c) => c,
        _ => QK_K,
    };
    let mut cells = [Cell::ZERO; R];
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let y: [&Q8K; R] = std::array::from_fn(|r| &ys[r][b]);
        // SAFETY: blk is one whole block of t; the CPU has AVX2 (this function's features).
        let (sumi, ch) = unsafe {
            match (t, chunk < QK_K) {
                (KType::Q2K, false) => q2k::<R, false>(blk, y, chunk),
                (KType::Q2K, true) => q2k::<R, true>(blk, y, chunk),
                (KType::Q3K, _) => q3k::<R>(blk, y),
                (KType::Q4K, false) => q45k::<R, false, false>(blk, y, chunk),
                (KType::Q4K, true) => q45k::<R, false, true>(blk, y, chunk),
                (KType::Q5K, _) => q45k::<R, true, false>(blk, y, chunk),
                (KType::Q6K, _) => q6k::<R>(blk, y),
            }
        };
        let scales = block_scales(t, blk);
        for r in 0..R {
            let y = y[r];
            let mut s = sumi[r];
            if t == KType::Q6K && sum == Sum::Lanes {
                let bs = _mm256_loadu_si256(y.bsums.as_ptr().cast());
                let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk[192..].as_ptr().cast()));
                s = _mm256_sub_epi32(s, _mm256_slli_epi32(_mm256_madd_epi16(bs, sc), 5));
            }
            let mut lanes = [0i32; 8];
            // SAFETY: 8 ints.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), s) };
            let offset = if t == KType::Q6K && sum != Sum::Lanes {
                offset_term(blk, y)
            } else {
                0
            };
            let total = [lanes.iter().fold(0i32, |a, &b| a.wrapping_add(b)) - offset];
            let chunks: &[i32] = if chunk < QK_K {
                &ch[r][..QK_K / chunk]
            } else {
                &total
            };
            cells[r].add(t, sum, scales, y, &lanes, chunks, &group_mins(t, blk, y));
        }
    }
    std::array::from_fn(|r| cells[r].value(t, sum))
}

#[target_feature(enable = "avx2")]
fn hsum_i32(v: __m256i) -> i32 {
    let mut l = [0i32; 8];
    // SAFETY: 8 ints.
    unsafe { _mm256_storeu_si256(l.as_mut_ptr().cast(), v) };
    l.iter().fold(0i32, |a, &b| a.wrapping_add(b))
}

/// 32 bytes of q8 values of row y from position `at`.
#[inline(always)]
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

/// Per-row integer totals of each chunk of a block (`Sum::Rows`), where asked for.
type Chunks<const R: usize> = [[i32; 4]; R];

/// Q4_K / Q5_K (with `HIGH`): unsigned 4- or 5-bit values, one scale per 32. With `CH`, each
/// row's totals per `chunk` values too.
#[target_feature(enable = "avx2")]
unsafe fn q45k<const R: usize, const HIGH: bool, const CH: bool>(
    b: &[u8],
    y: [&Q8K; R],
    chunk: usize,
) -> ([__m256i; R], Chunks<R>) {
    let (sc, _) = scales_mins_k4(&b[4..16]);
    let (qh, qs) = if HIGH {
        (
            // SAFETY: Q5_K's 32 high-bit bytes.
            unsafe { _mm256_loadu_si256(b[16..48].as_ptr().cast()) },
            &b[48..176],
        )
    } else {
        (_mm256_setzero_si256(), &b[16..144])
    };
    let m4 = _mm256_set1_epi8(0xF);
    let one = _mm256_set1_epi8(1);
    let mut sumi = [_mm256_setzero_si256(); R];
    let mut ch = [[0i32; 4]; R];
    for j in 0..4 {
        // SAFETY: 32 bytes of qs.
        let bits = unsafe { _mm256_loadu_si256(qs[32 * j..].as_ptr().cast()) };
        let mut lo = _mm256_and_si256(bits, m4);
        let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
        if HIGH {
            let bit = |s: i32| {
                let v = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s));
                _mm256_slli_epi16(_mm256_and_si256(v, one), 4)
            };
            lo = _mm256_add_epi8(lo, bit(2 * j as i32));
            hi = _mm256_add_epi8(hi, bit(2 * j as i32 + 1));
        }
        let sl = _mm256_set1_epi16(sc[2 * j] as i16);
        let sh = _mm256_set1_epi16(sc[2 * j + 1] as i16);
        for r in 0..R {
            // SAFETY: positions within the block.
            let (a, c) = unsafe { (q8(y[r], 64 * j), q8(y[r], 64 * j + 32)) };
            let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(lo, a));
            let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(hi, c));
            let p = _mm256_add_epi32(pl, ph);
            if CH {
                ch[r][64 * j / chunk] += hsum_i32(p);
            }
            sumi[r] = _mm256_add_epi32(sumi[r], p);
        }
    }
    (sumi, ch)
}

/// Q6_K: unsigned 6-bit values (the 32 comes off through the sums), a signed scale per 16.
#[target_feature(enable = "avx2")]
unsafe fn q6k<const R: usize>(b: &[u8], y: [&Q8K; R]) -> ([__m256i; R], Chunks<R>) {
    let m15 = _mm256_set1_epi8(15);
    let m3 = _mm256_set1_epi8(3);
    let sc = |g: usize| b[192 + g] as i8 as i32;
    let mut sumi = [_mm256_setzero_si256(); R];
    for j in 0..2 {
        // SAFETY: 32-byte runs of ql and qh.
        let (l1, l2, h) = unsafe {
            (
                _mm256_loadu_si256(b[64 * j..].as_ptr().cast()),
                _mm256_loadu_si256(b[64 * j + 32..].as_ptr().cast()),
                _mm256_loadu_si256(b[128 + 32 * j..].as_ptr().cast()),
            )
        };
        let high = |s: i32| {
            let v = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(s)), m3);
            _mm256_slli_epi16(v, 4)
        };
        let w = [
            _mm256_or_si256(_mm256_and_si256(l1, m15), high(0)),
            _mm256_or_si256(_mm256_and_si256(l2, m15), high(2)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m15), high(4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l2, 4), m15), high(6)),
        ];
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
    (sumi, [[0; 4]; R])
}

/// Q2_K: unsigned 2-bit values, a 4-bit scale (and min) per 16. With `CH`, each row's
/// totals per `chunk` values too.
#[target_feature(enable = "avx2")]
unsafe fn q2k<const R: usize, const CH: bool>(
    b: &[u8],
    y: [&Q8K; R],
    chunk: usize,
) -> ([__m256i; R], Chunks<R>) {
    let m3 = _mm256_set1_epi8(3);
    let sc = |g: usize| (b[g] & 0xF) as i32;
    let mut sumi = [_mm256_setzero_si256(); R];
    let mut ch = [[0i32; 4]; R];
    for j in 0..2 {
        // SAFETY: 32 bytes of qs.
        let bits = unsafe { _mm256_loadu_si256(b[16 + 32 * j..].as_ptr().cast()) };
        for s in 0..4 {
            let w = _mm256_and_si256(_mm256_srl_epi16(bits, _mm_cvtsi32_si128(2 * s as i32)), m3);
            let scale = scale2(sc(8 * j + 2 * s), sc(8 * j + 2 * s + 1));
            for r in 0..R {
                // SAFETY: within the block.
                let a = unsafe { q8(y[r], 128 * j + 32 * s) };
                let p = _mm256_madd_epi16(scale, _mm256_maddubs_epi16(w, a));
                if CH {
                    ch[r][(128 * j + 32 * s) / chunk] += hsum_i32(p);
                }
                sumi[r] = _mm256_add_epi32(sumi[r], p);
            }
        }
    }
    (sumi, ch)
}

/// Q3_K: signed 3-bit values (-4..3), a signed 6-bit scale per 16. `maddubs` wants an
/// unsigned operand: |w| times q8 with w's sign, the same pair sums.
#[target_feature(enable = "avx2")]
unsafe fn q3k<const R: usize>(b: &[u8], y: [&Q8K; R]) -> ([__m256i; R], Chunks<R>) {
    let m3 = _mm256_set1_epi8(3);
    let one = _mm256_set1_epi8(1);
    let scales = scales_q3k(&b[96..108]);
    // SAFETY: the 32 hmask bytes.
    let hbits = unsafe { _mm256_loadu_si256(b.as_ptr().cast()) };
    let mut sumi = [_mm256_setzero_si256(); R];
    for j in 0..2 {
        // SAFETY: 32 bytes of qs.
        let bits = unsafe { _mm256_loadu_si256(b[32 + 32 * j..].as_ptr().cast()) };
        for s in 0..4 {
            let low = _mm256_and_si256(_mm256_srl_epi16(bits, _mm_cvtsi32_si128(2 * s as i32)), m3);
            let bit = _mm256_and_si256(
                _mm256_srl_epi16(hbits, _mm_cvtsi32_si128((4 * j + s) as i32)),
                one,
            );
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
    (sumi, [[0; 4]; R])
}
