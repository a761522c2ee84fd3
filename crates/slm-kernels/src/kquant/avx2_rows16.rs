//! The `rows16` kernels for CPUs with AVX2 but not AVX-512: the weight rows of an interleaved
//! group in the lanes, the activations broadcast, as `avx512::rows16_*` do, eight rows to a
//! 256-bit register, so a group is taken in two halves (rows 8h..8h+8: bytes 32h.. of each of
//! its 64-byte vectors, see `rows16`).
//!
//! Without VNNI, four products are `maddubs` (pairs of unsigned weights times signed
//! activations, into 16 bits: every type's values here are unsigned and at most 63, so a pair
//! never saturates) and a scale is applied by `madd` against the scale in both halves of a
//! word (`pair`), which also adds the two pairs: one instruction where `avx512` has `vpdpbusd`
//! then `vpdpwssd`. The integers are `super::dot_row`'s (exact, in any order); the floats
//! round as `super::Cell` does, lane by lane, the same steps as the `avx512` kernel of each
//! type and sum.

use std::arch::x86_64::*;

use super::rows16::{self, q3k_step, q5k_step, q6k_step, word, Q3K_SCALES, Q6K_SCALES};
use super::{KType, Sum, Q8K, QK_K};

/// Rows in a register: half of a `rows16` group.
const HALF: usize = 8;

/// Half h of the vector of a group's super-block `g` whose row 0 word is at `at`.
///
/// # Safety
/// The vector lies within the super-block.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn vector(g: *const u8, at: usize, h: usize) -> __m256i {
    // SAFETY: the caller's.
    unsafe { _mm256_loadu_si256(g.add(at + 4 * HALF * h).cast()) }
}

/// Half h of the sixteen f16 at `at` of a group's super-block (its `d` or `dmin`), widened.
///
/// # Safety
/// The sixteen lie within the super-block.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16s(g: *const u8, at: usize, h: usize) -> __m256 {
    // SAFETY: the caller's.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(g.add(at + 2 * HALF * h).cast()) })
}

/// Values at..at + 4 of a block of activations, broadcast.
///
/// # Safety
/// at + 4 <= 256.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn act4(y: &Q8K, at: usize) -> __m256i {
    debug_assert!(at + 4 <= QK_K);
    // SAFETY: within the block (the caller's).
    _mm256_set1_epi32(unsafe { y.qs.as_ptr().add(at).cast::<i32>().read_unaligned() })
}

/// A value that fits in 16 bits (signed), in each half of its word: `madd` against it scales
/// both pairs of `maddubs` and adds them.
#[inline]
#[target_feature(enable = "avx2")]
fn pair(s: __m256i) -> __m256i {
    _mm256_or_si256(
        _mm256_and_si256(s, _mm256_set1_epi32(0xFFFF)),
        _mm256_slli_epi32::<16>(s),
    )
}

/// Four products of each row, scaled: `s` (see `pair`) times the sum of w's four bytes
/// (unsigned, at most 63) times a's.
#[inline]
#[target_feature(enable = "avx2")]
fn scaled4(w: __m256i, a: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), s)
}

/// An activation sum of 16 bits in the low half of each word, for `madd` against values in the
/// low halves (the other halves zero).
#[inline]
#[target_feature(enable = "avx2")]
fn low16(s: i32) -> __m256i {
    _mm256_set1_epi32(s as u16 as i32)
}

/// `avx512::hsum8x16` for eight cells.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum8x8(l: &[__m256; 8]) -> __m256 {
    let r: [__m256; 4] = std::array::from_fn(|k| _mm256_add_ps(l[k + 4], l[k]));
    _mm256_add_ps(_mm256_add_ps(r[0], r[2]), _mm256_add_ps(r[1], r[3]))
}

/// Byte u (< 8) of each of eight words split over two vectors, in the low byte of its lane.
#[inline]
#[target_feature(enable = "avx2")]
fn byte(v: &[__m256i; 2], u: usize) -> __m256i {
    let s = _mm256_srl_epi32(v[u / 4], _mm_cvtsi32_si128(8 * (u % 4) as i32));
    _mm256_and_si256(s, _mm256_set1_epi32(0xFF))
}

/// Stores eight cells of half h into a kernel's sixteen.
#[inline]
#[target_feature(enable = "avx2")]
fn store(out: &mut [f32; 16], h: usize, v: __m256) {
    // SAFETY: eight floats of sixteen, h < 2.
    unsafe { _mm256_storeu_ps(out[HALF * h..].as_mut_ptr(), v) }
}

/// Half h of a Q4_K or Q5_K group's super-block's scales: `d`, `dmin` and the 6-bit scales and
/// mins (byte u of lane r of `sc[u / 4]`: row r's scale u), as `avx512::Scales4`.
struct Scales8 {
    d: __m256,
    dmin: __m256,
    sc: [__m256i; 2],
    mn: [__m256i; 2],
}

impl Scales8 {
    /// # Safety
    /// g points at a whole Q4_K or Q5_K group's super-block; h < 2.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn of(g: *const u8, h: usize) -> Self {
        let (k1, k2, k3) = (
            _mm256_set1_epi32(0x3f3f3f3f),
            _mm256_set1_epi32(0x0f0f0f0f),
            _mm256_set1_epi32(0x03030303),
        );
        // SAFETY (the loads): within the group's super-block.
        let (d, dmin, u0, u1, u2) = unsafe {
            (
                f16s(g, 0, h),
                f16s(g, 2 * rows16::ROWS, h),
                vector(g, word(KType::Q4K, 0), h),
                vector(g, word(KType::Q4K, 1), h),
                vector(g, word(KType::Q4K, 2), h),
            )
        };
        let sc = [
            _mm256_and_si256(u0, k1),
            _mm256_or_si256(
                _mm256_and_si256(u2, k2),
                _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), k3), 4),
            ),
        ];
        let mn = [
            _mm256_and_si256(u1, k1),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi32(u2, 4), k2),
                _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), k3), 4),
            ),
        ];
        Self { d, dmin, sc, mn }
    }
}

/// `Sum::Rows` cells of one group of sixteen interleaved Q4_K rows against R activation rows,
/// as `avx512::rows16_q4k`. Eight products of 4-bit values fit in 16 bits, so a scale's 32
/// values are summed by `maddubs` and added before `madd` scales them.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; every sum is `Rows(64)` or `Rows(256)`; grp holds kb
/// groups' blocks and each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows16_q4k<const R: usize>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    sums: [Sum; R],
    out: &mut [[f32; 16]; R],
) {
    const GROUP_BYTES: usize = rows16::group_bytes(KType::Q4K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    debug_assert!(sums
        .iter()
        .all(|s| matches!(s, Sum::Rows(64) | Sum::Rows(QK_K))));
    let per_chunk = sums.map(|s| s == Sum::Rows(64));
    let m4 = _mm256_set1_epi8(0xF);
    for h in 0..2 {
        let mut row = [_mm256_setzero_ps(); R];
        let mut row_min = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
            // SAFETY: a Q4_K group's super-block.
            let Scales8 { d, dmin, sc, mn } = unsafe { Scales8::of(g, h) };
            let y = |i: usize| &ys[i][b];
            let dd: [__m256; R] = std::array::from_fn(|i| _mm256_mul_ps(d, _mm256_set1_ps(y(i).d)));
            let dm: [__m256; R] =
                std::array::from_fn(|i| _mm256_mul_ps(dmin, _mm256_set1_ps(y(i).d)));
            let mut isum = [_mm256_setzero_si256(); R];
            let mut imin = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let mut lo = [_mm256_setzero_si256(); R];
                let mut hi = [_mm256_setzero_si256(); R];
                for p in 0..8 {
                    // SAFETY: vector (j, p) of the group's quants.
                    let w = unsafe { vector(g, word(KType::Q4K, 3 + 8 * j + p), h) };
                    let wl = _mm256_and_si256(w, m4);
                    let wh = _mm256_and_si256(_mm256_srli_epi16::<4>(w), m4);
                    for i in 0..R {
                        // SAFETY: values of the block.
                        let (alo, ahi) = unsafe {
                            (act4(y(i), 64 * j + 4 * p), act4(y(i), 64 * j + 32 + 4 * p))
                        };
                        lo[i] = _mm256_add_epi16(lo[i], _mm256_maddubs_epi16(wl, alo));
                        hi[i] = _mm256_add_epi16(hi[i], _mm256_maddubs_epi16(wh, ahi));
                    }
                }
                let (sl, sh) = (pair(byte(&sc, 2 * j)), pair(byte(&sc, 2 * j + 1)));
                let (ml, mh) = (byte(&mn, 2 * j), byte(&mn, 2 * j + 1));
                for i in 0..R {
                    let bs = |u: usize| {
                        let s = &y(i).bsums;
                        low16(s[2 * u] as i32 + s[2 * u + 1] as i32)
                    };
                    let is = _mm256_add_epi32(
                        _mm256_madd_epi16(lo[i], sl),
                        _mm256_madd_epi16(hi[i], sh),
                    );
                    let im = _mm256_add_epi32(
                        _mm256_madd_epi16(ml, bs(2 * j)),
                        _mm256_madd_epi16(mh, bs(2 * j + 1)),
                    );
                    if per_chunk[i] {
                        row[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), dd[i], row[i]);
                        row_min[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(im), dm[i], row_min[i]);
                    } else {
                        isum[i] = _mm256_add_epi32(isum[i], is);
                        imin[i] = _mm256_add_epi32(imin[i], im);
                    }
                }
            }
            for i in 0..R {
                if !per_chunk[i] {
                    row[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), dd[i], row[i]);
                    row_min[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imin[i]), dm[i], row_min[i]);
                }
            }
        }
        for i in 0..R {
            store(&mut out[i], h, _mm256_sub_ps(row[i], row_min[i]));
        }
    }
}

/// `avx512::q5k_values` for half a group.
#[inline]
#[target_feature(enable = "avx2")]
fn q5k_values(w: __m256i, h: __m256i, j: usize) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0xF);
    // Bit `from` of every byte of h at bit 4, the rest clear.
    let fifth = |from: usize| {
        let h = match from {
            0 => _mm256_slli_epi16::<4>(h),
            1 => _mm256_slli_epi16::<3>(h),
            2 => _mm256_slli_epi16::<2>(h),
            3 => _mm256_slli_epi16::<1>(h),
            4 => h,
            5 => _mm256_srli_epi16::<1>(h),
            6 => _mm256_srli_epi16::<2>(h),
            _ => _mm256_srli_epi16::<3>(h),
        };
        _mm256_and_si256(h, _mm256_set1_epi8(0x10))
    };
    (
        _mm256_or_si256(_mm256_and_si256(w, m4), fifth(2 * j)),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(w), m4),
            fifth(2 * j + 1),
        ),
    )
}

/// `avx512::q5k_mins` for half a group.
#[inline]
#[target_feature(enable = "avx2")]
fn q5k_mins(mn: &[__m256i; 2], y: &Q8K) -> __m256i {
    let mut imin = _mm256_setzero_si256();
    for u in 0..8 {
        let s = y.bsums[2 * u] as i32 + y.bsums[2 * u + 1] as i32;
        imin = _mm256_add_epi32(imin, _mm256_madd_epi16(byte(mn, u), low16(s)));
    }
    imin
}

/// `Sum::Lanes` cells of one group of sixteen interleaved Q5_K rows against one activation
/// row, as `avx512::rows16_q5k_lanes`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; grp holds kb groups' blocks and y kb blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows16_q5k_lanes(grp: &[u8], y: &[Q8K], out: &mut [f32; 16]) {
    const GROUP_BYTES: usize = rows16::group_bytes(KType::Q5K);
    let kb = y.len();
    assert!(grp.len() >= kb * GROUP_BYTES);
    for h in 0..2 {
        let mut lanes = [_mm256_setzero_ps(); 8];
        let mut mins = _mm256_setzero_ps();
        for (b, y) in y.iter().enumerate() {
            let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
            // SAFETY: a Q5_K group's super-block.
            let Scales8 { d, dmin, sc, mn } = unsafe { Scales8::of(g, h) };
            let scales: [[__m256i; 2]; 4] =
                std::array::from_fn(|j| [pair(byte(&sc, 2 * j)), pair(byte(&sc, 2 * j + 1))]);
            let dy = _mm256_mul_ps(_mm256_set1_ps(y.d), d);
            for (p, lane) in lanes.iter_mut().enumerate() {
                // SAFETY: step p's high bits.
                let hb = unsafe { vector(g, q5k_step(p), h) };
                let mut acc = _mm256_setzero_si256();
                for (j, s) in scales.iter().enumerate() {
                    // SAFETY: step p's quants j; values of the block.
                    let (w, alo, ahi) = unsafe {
                        (
                            vector(g, q5k_step(p) + 64 * (1 + j), h),
                            act4(y, 64 * j + 4 * p),
                            act4(y, 64 * j + 32 + 4 * p),
                        )
                    };
                    let (wl, wh) = q5k_values(w, hb, j);
                    let two = _mm256_add_epi32(scaled4(wl, alo, s[0]), scaled4(wh, ahi, s[1]));
                    acc = _mm256_add_epi32(acc, two);
                }
                *lane = _mm256_fmadd_ps(dy, _mm256_cvtepi32_ps(acc), *lane);
            }
            let dminy = _mm256_mul_ps(_mm256_set1_ps(-y.d), dmin);
            mins = _mm256_fmadd_ps(dminy, _mm256_cvtepi32_ps(q5k_mins(&mn, y)), mins);
        }
        store(out, h, _mm256_add_ps(hsum8x8(&lanes), mins));
    }
}

/// `Sum::Tiled` cells of one group of sixteen interleaved Q5_K rows against R activation rows,
/// as `avx512::rows16_q5k_tiled`. Four products of 5-bit values' pairs fit in 16 bits: a
/// scale's values are summed four steps at a time before `madd` scales them.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; grp holds kb groups' blocks and each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows16_q5k_tiled<const R: usize>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    out: &mut [[f32; 16]; R],
) {
    const GROUP_BYTES: usize = rows16::group_bytes(KType::Q5K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    for h in 0..2 {
        let mut row = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
            // SAFETY: a Q5_K group's super-block.
            let Scales8 { d, dmin, sc, mn } = unsafe { Scales8::of(g, h) };
            let y = |i: usize| &ys[i][b];
            let mut isum = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let (sl, sh) = (pair(byte(&sc, 2 * j)), pair(byte(&sc, 2 * j + 1)));
                for p0 in [0, 4] {
                    let mut lo = [_mm256_setzero_si256(); R];
                    let mut hi = [_mm256_setzero_si256(); R];
                    for p in p0..p0 + 4 {
                        // SAFETY: step p's high bits and quants j.
                        let (hb, w) = unsafe {
                            (
                                vector(g, q5k_step(p), h),
                                vector(g, q5k_step(p) + 64 * (1 + j), h),
                            )
                        };
                        let (wl, wh) = q5k_values(w, hb, j);
                        for i in 0..R {
                            // SAFETY: values of the block.
                            let (alo, ahi) = unsafe {
                                (act4(y(i), 64 * j + 4 * p), act4(y(i), 64 * j + 32 + 4 * p))
                            };
                            lo[i] = _mm256_add_epi16(lo[i], _mm256_maddubs_epi16(wl, alo));
                            hi[i] = _mm256_add_epi16(hi[i], _mm256_maddubs_epi16(wh, ahi));
                        }
                    }
                    for i in 0..R {
                        let is = _mm256_add_epi32(
                            _mm256_madd_epi16(lo[i], sl),
                            _mm256_madd_epi16(hi[i], sh),
                        );
                        isum[i] = _mm256_add_epi32(isum[i], is);
                    }
                }
            }
            for i in 0..R {
                let imin = _mm256_cvtepi32_ps(q5k_mins(&mn, y(i)));
                let r = _mm256_fnmadd_ps(dmin, imin, _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum[i])));
                row[i] = _mm256_fmadd_ps(r, _mm256_set1_ps(y(i).d), row[i]);
            }
        }
        for i in 0..R {
            store(&mut out[i], h, row[i]);
        }
    }
}

/// `avx512::q6k_step_values` for half a group.
///
/// # Safety
/// at points at a step of a Q6_K group's super-block; h < 2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6k_step_values(at: *const u8, h: usize) -> [__m256i; 4] {
    let (m4, m3) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
    // SAFETY: the step's three vectors (the caller's).
    let (qa, qb, qh) = unsafe { (vector(at, 0, h), vector(at, 64, h), vector(at, 128, h)) };
    let high = |s: i32| {
        let h = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(s)), m3);
        _mm256_slli_epi16::<4>(h)
    };
    [
        _mm256_or_si256(_mm256_and_si256(qa, m4), high(0)),
        _mm256_or_si256(_mm256_and_si256(qb, m4), high(2)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(qa), m4), high(4)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(qb), m4), high(6)),
    ]
}

/// Half h of the sixteen rows' scale of group q (< 16) of a Q6_K group's super-block at g,
/// sign-extended.
///
/// # Safety
/// g points at a Q6_K group's super-block; h < 2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6k_scale(g: *const u8, q: usize, h: usize) -> __m256i {
    // SAFETY: the scales of group q (the caller's).
    _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(g.add(Q6K_SCALES + 16 * q + HALF * h).cast()) })
}

/// Q6_K's offset of 32 for the groups `qs` against y: 32 times the sum over them of scale
/// times the activations' sum (as `super::dot_row`).
///
/// # Safety
/// As `q6k_scale`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn q6k_offset(g: *const u8, h: usize, y: &Q8K, qs: std::ops::Range<usize>) -> __m256i {
    let mut o = _mm256_setzero_si256();
    for q in qs {
        // SAFETY: group q's scales (q < 16, the caller's).
        let s = _mm256_and_si256(unsafe { q6k_scale(g, q, h) }, _mm256_set1_epi32(0xFFFF));
        o = _mm256_add_epi32(o, _mm256_madd_epi16(s, low16(y.bsums[q] as i32)));
    }
    _mm256_slli_epi32::<5>(o)
}

/// The cells of one group of sixteen interleaved Q6_K rows against R activation rows, all
/// summed as `Sum::Lanes` (with `LANES`, one row) or `Sum::Tiled`, as `avx512::rows16_q6k_lanes`
/// and `rows16_q6k_tiled`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; grp holds kb groups' blocks and each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c")]
// p is a position in the block as well as a lane's index.
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn rows16_q6k<const R: usize, const LANES: bool>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    out: &mut [[f32; 16]; R],
) {
    const GROUP_BYTES: usize = rows16::group_bytes(KType::Q6K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    assert!(!LANES || R == 1);
    for h in 0..2 {
        let mut lanes = [_mm256_setzero_ps(); 8];
        let mut row = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
            // SAFETY (the loads): within the group's super-block.
            let d = unsafe { f16s(g, 0, h) };
            let y = |i: usize| &ys[i][b];
            let mut isum = [_mm256_setzero_si256(); R];
            let mut sc = [[_mm256_setzero_si256(); 4]; 2];
            for p in 0..8 {
                if p % 4 == 0 {
                    // Values 128j + 32t + 4p.. are in group 8j + 2t + p / 4.
                    // SAFETY: a group of 16's scales.
                    sc = std::array::from_fn(|j| {
                        std::array::from_fn(|t| {
                            pair(unsafe { q6k_scale(g, 8 * j + 2 * t + p / 4, h) })
                        })
                    });
                }
                let mut acc = [_mm256_setzero_si256(); R];
                for (j, sc) in sc.iter().enumerate() {
                    // SAFETY: step (j, p) of the group's super-block.
                    let w = unsafe { q6k_step_values(g.add(q6k_step(j, p)), h) };
                    for t in 0..4 {
                        for i in 0..R {
                            // SAFETY: values 128j + 32t + 4p.. of the block.
                            let a = unsafe { act4(y(i), 128 * j + 32 * t + 4 * p) };
                            acc[i] = _mm256_add_epi32(acc[i], scaled4(w[t], a, sc[t]));
                        }
                    }
                }
                if LANES {
                    // The offset of 32: lane p takes groups 2p and 2p + 1's.
                    // SAFETY: groups 2p and 2p + 1.
                    let o = unsafe { q6k_offset(g, h, y(0), 2 * p..2 * p + 2) };
                    let dy = _mm256_mul_ps(_mm256_set1_ps(y(0).d), d);
                    let l = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[0], o));
                    lanes[p] = _mm256_fmadd_ps(dy, l, lanes[p]);
                } else {
                    for i in 0..R {
                        isum[i] = _mm256_add_epi32(isum[i], acc[i]);
                    }
                }
            }
            if !LANES {
                for i in 0..R {
                    // SAFETY: the sixteen groups.
                    let o = unsafe { q6k_offset(g, h, y(i), 0..16) };
                    let r = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(isum[i], o)));
                    row[i] = _mm256_fmadd_ps(r, _mm256_set1_ps(y(i).d), row[i]);
                }
            }
        }
        for i in 0..R {
            store(&mut out[i], h, if LANES { hsum8x8(&lanes) } else { row[i] });
        }
    }
}

/// The cells of one group of sixteen interleaved Q3_K rows against R activation rows, all
/// summed as `Sum::Lanes` (with `LANES`, one row) or `Sum::Tiled`, as `avx512::rows16_q3k`: the
/// values unsigned (w + 4), each four products' pairs starting from minus 4 times the sum of
/// their activations' pairs, so that `madd` scales exact products of w.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; grp holds kb groups' blocks and each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c")]
// p is a position in the block as well as a lane's index.
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn rows16_q3k<const R: usize, const LANES: bool>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    out: &mut [[f32; 16]; R],
) {
    const GROUP_BYTES: usize = rows16::group_bytes(KType::Q3K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    assert!(!LANES || R == 1);
    let (m2, m4) = (_mm256_set1_epi8(3), _mm256_set1_epi8(4));
    let (k2, k4) = (_mm256_set1_epi32(0x03030303), _mm256_set1_epi32(0x0f0f0f0f));
    for h in 0..2 {
        let mut lanes = [_mm256_setzero_ps(); 8];
        let mut row = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
            // SAFETY (the loads): within the group's super-block.
            let (d, u) = unsafe {
                (
                    f16s(g, 0, h),
                    [0, 1, 2].map(|w| vector(g, Q3K_SCALES + 64 * w, h)),
                )
            };
            // `scales_q3k` for eight rows: scales 4v..4v+4 as the bytes of words v, minus 32.
            let low = [
                _mm256_and_si256(u[0], k4),
                _mm256_and_si256(u[1], k4),
                _mm256_and_si256(_mm256_srli_epi32::<4>(u[0]), k4),
                _mm256_and_si256(_mm256_srli_epi32::<4>(u[1]), k4),
            ];
            let high = [
                u[2],
                _mm256_srli_epi32::<2>(u[2]),
                _mm256_srli_epi32::<4>(u[2]),
                _mm256_srli_epi32::<6>(u[2]),
            ];
            let packed: [__m256i; 4] = std::array::from_fn(|v| {
                let h = _mm256_slli_epi32::<4>(_mm256_and_si256(high[v], k2));
                _mm256_sub_epi8(_mm256_or_si256(low[v], h), _mm256_set1_epi8(32))
            });
            // Scale q of the eight rows, signed, in both halves of each word.
            let scale = |q: usize| {
                let v = _mm256_sll_epi32(packed[q / 4], _mm_cvtsi32_si128(24 - 8 * (q % 4) as i32));
                pair(_mm256_srai_epi32::<24>(v))
            };
            // Minus 4 times the sum of each pair of activations, two pairs to a word of four
            // values, per row.
            let mut offs = [[0i32; 64]; R];
            for i in 0..R {
                for c in 0..8 {
                    // SAFETY: values 32c.. of the block, 8 words of offs[i].
                    unsafe {
                        let a = _mm256_loadu_si256(ys[i][b].qs.as_ptr().add(32 * c).cast());
                        let s = _mm256_maddubs_epi16(m4, a);
                        let s = _mm256_sub_epi16(_mm256_setzero_si256(), s);
                        _mm256_storeu_si256(offs[i].as_mut_ptr().add(8 * c).cast(), s);
                    }
                }
            }
            let mut isum = [_mm256_setzero_si256(); R];
            let mut sc = [_mm256_setzero_si256(); 8];
            for p in 0..8 {
                if p % 4 == 0 {
                    // Values 128j + 32s + 4p.. are in group 8j + 2s + p / 4.
                    sc = std::array::from_fn(|t| scale(8 * (t / 4) + 2 * (t % 4) + p / 4));
                }
                // SAFETY: step p's three vectors.
                let (hm, q) = unsafe {
                    let at = q3k_step(p);
                    (
                        vector(g, at, h),
                        [vector(g, at + 64, h), vector(g, at + 128, h)],
                    )
                };
                let mut acc = [_mm256_setzero_si256(); R];
                for j in 0..2 {
                    for s in 0..4 {
                        // Low bits 2s.., and hmask bit 4j + s as 4.
                        let lo = _mm256_and_si256(
                            _mm256_srl_epi16(q[j], _mm_cvtsi32_si128(2 * s as i32)),
                            m2,
                        );
                        let bit = 4 * j + s;
                        let hi = if bit >= 2 {
                            _mm256_srl_epi16(hm, _mm_cvtsi32_si128(bit as i32 - 2))
                        } else {
                            _mm256_sll_epi16(hm, _mm_cvtsi32_si128(2 - bit as i32))
                        };
                        let w = _mm256_or_si256(lo, _mm256_and_si256(hi, m4));
                        let word = 32 * j + 8 * s + p;
                        for i in 0..R {
                            // SAFETY: values 4 word.. of the block.
                            let a = unsafe { act4(&ys[i][b], 4 * word) };
                            let pairs = _mm256_add_epi16(
                                _mm256_maddubs_epi16(w, a),
                                _mm256_set1_epi32(offs[i][word]),
                            );
                            acc[i] =
                                _mm256_add_epi32(acc[i], _mm256_madd_epi16(pairs, sc[4 * j + s]));
                        }
                    }
                }
                if LANES {
                    let dy = _mm256_mul_ps(d, _mm256_set1_ps(ys[0][b].d));
                    lanes[p] = _mm256_fmadd_ps(dy, _mm256_cvtepi32_ps(acc[0]), lanes[p]);
                } else {
                    for i in 0..R {
                        isum[i] = _mm256_add_epi32(isum[i], acc[i]);
                    }
                }
            }
            if !LANES {
                for i in 0..R {
                    let r = _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum[i]));
                    row[i] = _mm256_fmadd_ps(r, _mm256_set1_ps(ys[i][b].d), row[i]);
                }
            }
        }
        for i in 0..R {
            store(&mut out[i], h, if LANES { hsum8x8(&lanes) } else { row[i] });
        }
    }
}

/// Half h of a Q2_K group's super-block's scales: `d`, `dmin`, and the packed 4-bit scales
/// and mins (`rows16::word` 0 to 3).
struct Q2Scales8 {
    d: __m256,
    dmin: __m256,
    u: [__m256i; 4],
}

impl Q2Scales8 {
    /// # Safety
    /// g points at a whole Q2_K group's super-block; h < 2.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn of(g: *const u8, h: usize) -> Self {
        // SAFETY (the loads): within the group's super-block.
        unsafe {
            Self {
                d: f16s(g, 0, h),
                dmin: f16s(g, 2 * rows16::ROWS, h),
                u: [0, 1, 2, 3].map(|w| vector(g, word(KType::Q2K, w), h)),
            }
        }
    }

    /// The scale (low nibble) or min of group q (< 16) of the eight rows.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn nibble(&self, q: usize, min: bool) -> __m256i {
        let at = 8 * (q % 4) + 4 * min as usize;
        let v = _mm256_srl_epi32(self.u[q / 4], _mm_cvtsi32_si128(at as i32));
        _mm256_and_si256(v, _mm256_set1_epi32(0xF))
    }

    /// The mins' integers of groups `qs` against y: min q times the sum of its sixteen
    /// activations, summed.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mins(&self, y: &Q8K, qs: std::ops::Range<usize>) -> __m256i {
        let mut v = _mm256_setzero_si256();
        for q in qs {
            let m = _mm256_madd_epi16(self.nibble(q, true), low16(y.bsums[q] as i32));
            v = _mm256_add_epi32(v, m);
        }
        v
    }
}

/// The cells of one group of sixteen interleaved Q2_K rows against R activation rows, all
/// summed as `Sum::Lanes` (with `LANES`, one row) or `Sum::Tiled`: llama.cpp's sums for Q2_K
/// where it does not repack it (CPUs without AVX-512). Lanes: each lane's mins first, then its
/// products, into the same float (as `super::Cell`); Tiled: the block's integer sum scaled, less
/// its mins, times the activations' scale.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; grp holds kb groups' blocks and each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c")]
// p is a position in the block as well as a lane's index.
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn rows16_q2k<const R: usize, const LANES: bool>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    out: &mut [[f32; 16]; R],
) {
    const GROUP_BYTES: usize = rows16::group_bytes(KType::Q2K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    assert!(!LANES || R == 1);
    let m2 = _mm256_set1_epi8(3);
    for h in 0..2 {
        let mut lanes = [_mm256_setzero_ps(); 8];
        let mut row = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
            // SAFETY: a Q2_K group's super-block.
            let sc8 = unsafe { Q2Scales8::of(g, h) };
            let (d, dmin) = (sc8.d, sc8.dmin);
            let y = |i: usize| &ys[i][b];
            let mut isum = [_mm256_setzero_si256(); R];
            let mut sc = [_mm256_setzero_si256(); 8];
            for p in 0..8 {
                if p % 4 == 0 {
                    // Values 128j + 32s + 4p.. are in group 8j + 2s + p / 4.
                    sc = std::array::from_fn(|t| {
                        pair(sc8.nibble(8 * (t / 4) + 2 * (t % 4) + p / 4, false))
                    });
                }
                let mut acc = [_mm256_setzero_si256(); R];
                for j in 0..2 {
                    // SAFETY: bits word 8j + p of the group's rows.
                    let q = unsafe { vector(g, word(KType::Q2K, 4 + 8 * j + p), h) };
                    for s in 0..4 {
                        let w = _mm256_and_si256(
                            _mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * s as i32)),
                            m2,
                        );
                        for i in 0..R {
                            // SAFETY: values of the block.
                            let a = unsafe { act4(y(i), 128 * j + 32 * s + 4 * p) };
                            acc[i] = _mm256_add_epi32(acc[i], scaled4(w, a, sc[4 * j + s]));
                        }
                    }
                }
                if LANES {
                    let dminy = _mm256_mul_ps(_mm256_set1_ps(-y(0).d), dmin);
                    let dy = _mm256_mul_ps(_mm256_set1_ps(y(0).d), d);
                    let m = _mm256_cvtepi32_ps(sc8.mins(y(0), 2 * p..2 * p + 2));
                    let l = _mm256_fmadd_ps(dminy, m, lanes[p]);
                    lanes[p] = _mm256_fmadd_ps(dy, _mm256_cvtepi32_ps(acc[0]), l);
                } else {
                    for i in 0..R {
                        isum[i] = _mm256_add_epi32(isum[i], acc[i]);
                    }
                }
            }
            if !LANES {
                for i in 0..R {
                    let imin = _mm256_cvtepi32_ps(sc8.mins(y(i), 0..16));
                    let r =
                        _mm256_fnmadd_ps(dmin, imin, _mm256_mul_ps(d, _mm256_cvtepi32_ps(isum[i])));
                    row[i] = _mm256_fmadd_ps(r, _mm256_set1_ps(y(i).d), row[i]);
                }
            }
        }
        for i in 0..R {
            store(&mut out[i], h, if LANES { hsum8x8(&lanes) } else { row[i] });
        }
    }
}

/// `Sum::Rows` cells of one group of sixteen interleaved Q2_K rows against R activation rows,
/// as `avx512::rows16_q2k` (llama.cpp's sums where it repacks Q2_K, which it does with
/// AVX-512: this kernel serves that CPU's AVX2 set). Four products of 2-bit values' pairs a
/// step, four steps to a group of 16, fit in 16 bits: a group is summed, then scaled once.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; every sum is `Rows(128)` or `Rows(256)`; grp holds kb
/// groups' blocks and each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c")]
// j and hh are positions in the block as well as indices.
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn rows16_q2k_rows<const R: usize>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    sums: [Sum; R],
    out: &mut [[f32; 16]; R],
) {
    const GROUP_BYTES: usize = rows16::group_bytes(KType::Q2K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    debug_assert!(sums
        .iter()
        .all(|s| matches!(s, Sum::Rows(128) | Sum::Rows(QK_K))));
    let per_chunk = sums.map(|s| s == Sum::Rows(128));
    let m2 = _mm256_set1_epi8(3);
    for h in 0..2 {
        let mut row = [_mm256_setzero_ps(); R];
        let mut row_min = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
            // SAFETY: a Q2_K group's super-block.
            let sc8 = unsafe { Q2Scales8::of(g, h) };
            let (d, dmin) = (sc8.d, sc8.dmin);
            let y = |i: usize| &ys[i][b];
            // Each 128 values' integer sum, per activation row.
            let mut isum = [[_mm256_setzero_si256(); 2]; R];
            for j in 0..2 {
                if R == 1 {
                    // One activation row: each bits vector loaded once for its four shifts,
                    // the eight sums of a chunk (s, half of p) in registers.
                    let mut acc = [[_mm256_setzero_si256(); 2]; 4];
                    for p in 0..8 {
                        // SAFETY: bits word 8j + p of the group's rows.
                        let q = unsafe { vector(g, word(KType::Q2K, 4 + 8 * j + p), h) };
                        for (s, acc) in acc.iter_mut().enumerate() {
                            let w = _mm256_and_si256(
                                _mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * s as i32)),
                                m2,
                            );
                            // SAFETY: values of the block.
                            let a = unsafe { act4(y(0), 128 * j + 32 * s + 4 * p) };
                            let hh = p / 4;
                            acc[hh] = _mm256_add_epi16(acc[hh], _mm256_maddubs_epi16(w, a));
                        }
                    }
                    for (s, acc) in acc.iter().enumerate() {
                        for (hh, acc) in acc.iter().enumerate() {
                            let sc = pair(sc8.nibble(8 * j + 2 * s + hh, false));
                            let v = _mm256_madd_epi16(*acc, sc);
                            isum[0][j] = _mm256_add_epi32(isum[0][j], v);
                        }
                    }
                    continue;
                }
                for s in 0..4 {
                    // Values 128j + 32s.., groups 8j + 2s and 8j + 2s + 1.
                    let mut acc = [[_mm256_setzero_si256(); 2]; R];
                    for p in 0..8 {
                        // SAFETY: bits word 8j + p of the group's rows.
                        let q = unsafe { vector(g, word(KType::Q2K, 4 + 8 * j + p), h) };
                        let w = _mm256_and_si256(
                            _mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * s as i32)),
                            m2,
                        );
                        for i in 0..R {
                            // SAFETY: values of the block.
                            let a = unsafe { act4(y(i), 128 * j + 32 * s + 4 * p) };
                            let hh = p / 4;
                            acc[i][hh] = _mm256_add_epi16(acc[i][hh], _mm256_maddubs_epi16(w, a));
                        }
                    }
                    for hh in 0..2 {
                        let sc = pair(sc8.nibble(8 * j + 2 * s + hh, false));
                        for i in 0..R {
                            let v = _mm256_madd_epi16(acc[i][hh], sc);
                            isum[i][j] = _mm256_add_epi32(isum[i][j], v);
                        }
                    }
                }
            }
            for i in 0..R {
                let imin: [__m256i; 2] = std::array::from_fn(|c| sc8.mins(y(i), 8 * c..8 * c + 8));
                let (dd, dm) = (
                    _mm256_mul_ps(d, _mm256_set1_ps(y(i).d)),
                    _mm256_mul_ps(dmin, _mm256_set1_ps(y(i).d)),
                );
                if per_chunk[i] {
                    for c in 0..2 {
                        row[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i][c]), dd, row[i]);
                        row_min[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(imin[c]), dm, row_min[i]);
                    }
                } else {
                    let is = _mm256_add_epi32(isum[i][0], isum[i][1]);
                    let im = _mm256_add_epi32(imin[0], imin[1]);
                    row[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is), dd, row[i]);
                    row_min[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(im), dm, row_min[i]);
                }
            }
        }
        for i in 0..R {
            store(&mut out[i], h, _mm256_sub_ps(row[i], row_min[i]));
        }
    }
}
