//! AVX2 kernels for the 32-blocks, in ggml's arithmetic (see the parent module): each cell
//! (weight row, activation row) keeps eight f32 lanes fed by `fma(d_w*d_x, lane, acc)` block
//! after block, reduced by `hsum8`, plus the offset term summed separately. That order is per
//! cell, so a tile of R weight rows by C activation rows can share every load: a weight block
//! is unpacked once for C activation rows and an activation block is loaded once for R rows.
//! Why by hand: candle's quantized kernels round differently (see the parent module) and
//! unpack the weights again for every activation row.

use super::rows8::{Geometry, ROWS};
use super::{ActBlock, QK};
use std::arch::x86_64::*;

/// ggml's bytes_from_bits_32: byte j is 0xFF where bit j of `qh` is set.
#[inline(always)]
unsafe fn bits(p: *const u8) -> __m256i {
    let x32 = i32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32), shuf);
    let mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(bytes, mask), _mm256_set1_epi64x(-1))
}

/// `hsum_float_8`.
#[inline(always)]
pub(crate) unsafe fn hsum8(x: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)))
}

/// `super::quantize_row` eight lanes at a time, as ggml's AVX2 quantize_row_q8_1 does it
/// (the same values: the maximum is exact, the rest is per element).
///
/// # Safety
/// AVX2; `x` holds `out.len() * QK` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    debug_assert!(x.len() >= out.len() * QK);
    let sign = _mm256_set1_ps(-0.0);
    for (b, blk) in out.iter_mut().enumerate() {
        let p = x.as_ptr().add(b * QK);
        let v = [0, 8, 16, 24].map(|o| _mm256_loadu_ps(p.add(o)));
        let mut mx = _mm256_andnot_ps(sign, v[0]);
        for vi in &v[1..] {
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, *vi));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let max = _mm_cvtss_f32(m4);
        let d = max / 127.0;
        let id = _mm256_set1_ps(if max != 0.0 { 127.0 / max } else { 0.0 });
        let q = v.map(|vi| {
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm256_mul_ps(vi, id)))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_extracti128_si256(s, 1), _mm256_castsi256_si128(s));
        let s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32::<1>(s4)));
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let ordered =
            _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(blk.qs.as_mut_ptr() as *mut __m256i, ordered);
        blk.d = f16_round(d);
        blk.s = f16_round(d * sum as f32);
    }
}

#[inline(always)]
unsafe fn f16_round(x: f32) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
        _mm_set_ss(x),
    )))
}

/// Activation rows in panels that stay in L2 while the thread's weight rows stream past.
pub(super) const PANEL: usize = 64;

/// The grouped layout of `super::rows8`, per type.
pub(super) trait Grouped {
    /// 4-bit values, two blocks to a byte.
    const NIBBLES: bool;
    /// Signed values (Q8_0): |w| times sign(w)·x, as ggml does.
    const SIGNED: bool;
    /// Q4_0, Q5_0: values are q - 8 (q - 16). The lane sums are taken as sum(q·x) - sum(8·x),
    /// the same integers as ggml's sum((q-8)·x), without its two sign instructions per block.
    const MINUS: i8;
    /// Q5_0, Q5_1: a fifth bit per value, from the group's high bits.
    const FIFTH: bool;
    /// Q4_1, Q5_1: blocks carry an offset paired with the activation block's sum.
    const OFFSET: bool;
    /// Blocks per unit (`rows8::Geometry::per_unit`), known at compile time so that finding
    /// a block's unit is a shift, not a division.
    const PER_UNIT: usize;
}

pub(super) struct G4_0;
pub(super) struct G4_1;
pub(super) struct G5_0;
pub(super) struct G5_1;
pub(super) struct G8_0;

impl Grouped for G4_0 {
    const NIBBLES: bool = true;
    const SIGNED: bool = false;
    const MINUS: i8 = 8;
    const FIFTH: bool = false;
    const OFFSET: bool = false;
    const PER_UNIT: usize = 2;
}
impl Grouped for G4_1 {
    const NIBBLES: bool = true;
    const SIGNED: bool = false;
    const MINUS: i8 = 0;
    const FIFTH: bool = false;
    const OFFSET: bool = true;
    const PER_UNIT: usize = 2;
}
impl Grouped for G5_0 {
    const NIBBLES: bool = true;
    const SIGNED: bool = false;
    const MINUS: i8 = 16;
    const FIFTH: bool = true;
    const OFFSET: bool = false;
    const PER_UNIT: usize = 2;
}
impl Grouped for G5_1 {
    const NIBBLES: bool = true;
    const SIGNED: bool = false;
    const MINUS: i8 = 0;
    const FIFTH: bool = true;
    const OFFSET: bool = true;
    const PER_UNIT: usize = 2;
}
impl Grouped for G8_0 {
    const NIBBLES: bool = false;
    const SIGNED: bool = true;
    const MINUS: i8 = 0;
    const FIFTH: bool = false;
    const OFFSET: bool = false;
    const PER_UNIT: usize = 1;
}

/// The offsets' term of a Q4_1 group for activation rows c < C, whose block sums are
/// `sums + c * nb`: for each of the eight weight rows, `fma(m_w, s_x, acc)` block after block
/// (ggml's `summs`), the eight rows in one vector and C independent chains.
///
/// # Safety
/// As `gemm8`; `sums` covers C rows of nb values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn offsets8<B: Grouped, const C: usize>(
    grp: *const u8,
    geo: &Geometry,
    sums: *const f32,
    nb: usize,
    out: &mut [[f32; 8]],
) {
    let mut acc = [_mm256_setzero_ps(); C];
    for b in 0..nb {
        let (u, h) = (b / B::PER_UNIT, b % B::PER_UNIT);
        let p = grp.add(u * geo.unit_bytes + geo.m_off + h * 16);
        let mv = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(mv, _mm256_set1_ps(*sums.add(c * nb + b)), *a);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        _mm256_storeu_ps(o.as_mut_ptr(), a);
    }
}

/// `offsets8` of activation rows 0..rows, whose block sums are `sums` (rows of nb values),
/// into `summs[..rows]`. The sums come packed, apart from the blocks' values: read from the
/// blocks, they had pulled every activation block through the cache once per group of rows.
///
/// # Safety
/// As `gemm8`; `summs` holds at least `rows` rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn offsets_panel<B: Grouped>(
    grp: *const u8,
    geo: &Geometry,
    sums: &[f32],
    nb: usize,
    rows: usize,
    summs: &mut [[f32; 8]],
) {
    assert!(sums.len() >= rows * nb && summs.len() >= rows);
    let mut i = 0;
    while i < rows {
        let a = sums.as_ptr().add(i * nb);
        if i + 4 <= rows {
            offsets8::<B, 4>(grp, geo, a, nb, &mut summs[i..i + 4]);
            i += 4;
        } else {
            offsets8::<B, 1>(grp, geo, a, nb, &mut summs[i..i + 1]);
            i += 1;
        }
    }
}

/// The unpacked values of rows r0..r0+R of block `h` of a unit, for `maddubs`: the first
/// operand (unsigned: |w| for Q8_0) and the weights themselves (Q8_0's signs).
#[inline(always)]
unsafe fn unit_values<B: Grouped, const R: usize>(
    unit: *const u8,
    geo: &Geometry,
    r0: usize,
    h: usize,
) -> ([__m256i; R], [__m256i; R]) {
    let mask = _mm256_set1_epi8(0x0F);
    let mut x = [_mm256_setzero_si256(); R];
    let mut ux = [_mm256_setzero_si256(); R];
    for r in 0..R {
        let raw = _mm256_loadu_si256(unit.add(geo.qs_off + (r0 + r) * 32) as *const __m256i);
        x[r] = if !B::NIBBLES {
            raw
        } else if h == 0 {
            _mm256_and_si256(raw, mask)
        } else {
            _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask)
        };
        if B::FIFTH {
            let qh = unit.add(geo.h_off + (h * ROWS + r0 + r) * 4);
            let high = _mm256_and_si256(bits(qh), _mm256_set1_epi8(0x10));
            x[r] = _mm256_or_si256(x[r], high);
        }
        ux[r] = if B::SIGNED {
            _mm256_sign_epi8(x[r], x[r])
        } else {
            x[r]
        };
    }
    (ux, x)
}

/// How far ahead of block b a decode step asks for the weights. The hardware's prefetcher
/// alone left a Q4_1 decode step waiting on memory: 82-86 -> 115-145 tok/s on one thread,
/// 200 -> 225-258 on two (2, 4 and 8 KB measured alike within this VM's noise).
const DECODE_PREFETCH: usize = 4096;

/// Asks for the cache lines `DECODE_PREFETCH` bytes past block b's share of its group (the
/// group's blocks, then the next group's, lie in one sequential stream). Past the end of the
/// weights a prefetch is only a hint: it never faults.
#[inline(always)]
pub(super) unsafe fn prefetch_ahead<B: Grouped>(grp: *const u8, geo: &Geometry, b: usize) {
    let per_block = geo.unit_bytes / B::PER_UNIT;
    let p = grp.wrapping_add(b * per_block + DECODE_PREFETCH);
    let mut o = 0;
    while o < per_block {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8);
        o += 64;
    }
}

/// One decode block's scales: the offsets' chain `sm` advanced by this block (Q4_1: the
/// eight rows' `m_w` times the activation sum, the chain riding along in the main loop,
/// where the weights are already in cache) and the eight rows' products d_w * d_x, each
/// rounded once as ggml's scalar product.
#[inline(always)]
pub(super) unsafe fn decode_scales<B: Grouped>(
    unit: *const u8,
    geo: &Geometry,
    h: usize,
    ab: &ActBlock,
    sm: &mut __m256,
) -> __m256 {
    if B::OFFSET {
        let p = unit.add(geo.m_off + h * 16);
        let mv = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        *sm = _mm256_fmadd_ps(mv, _mm256_set1_ps(ab.s), *sm);
    }
    let dv = _mm256_cvtph_ps(_mm_loadu_si128(
        unit.add(geo.d_off + h * 16) as *const __m128i
    ));
    _mm256_mul_ps(dv, _mm256_set1_ps(ab.d))
}

/// Group `g`'s eight decode outputs through `gemv` (which writes eight values): straight into
/// `out` (n values), or, for a last group with padding rows, into a scratch tile of which
/// only the valid rows are kept.
#[inline(always)]
pub(super) unsafe fn decode_group(out: *mut f32, n: usize, g: usize, gemv: impl FnOnce(*mut f32)) {
    let j0 = g * ROWS;
    let valid = (n - j0).min(ROWS);
    if valid == ROWS {
        gemv(out.add(j0));
    } else {
        let mut tmp = [0f32; ROWS];
        gemv(tmp.as_mut_ptr());
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(j0), valid);
    }
}

/// The eight rows of one group against one activation row (decode); row r to `out[r]`.
/// The arithmetic per row is `super::dot_row`'s (ggml's); only the loads differ.
///
/// # Safety
/// `grp` covers one group of `geo` for nb blocks, `act` nb blocks, `out` 8 values; AVX2,
/// FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
unsafe fn gemv8<B: Grouped>(
    grp: *const u8,
    geo: &Geometry,
    act: *const ActBlock,
    nb: usize,
    out: *mut f32,
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); ROWS];
    let mut dp = [0f32; 8];
    let mut sm = _mm256_setzero_ps();
    for b in 0..nb {
        let (u, h) = (b / B::PER_UNIT, b % B::PER_UNIT);
        let unit = grp.add(u * geo.unit_bytes);
        prefetch_ahead::<B>(grp, geo, b);
        let ab = &*act.add(b);
        // The scale products reach the rows through a store and broadcasts.
        _mm256_storeu_ps(
            dp.as_mut_ptr(),
            decode_scales::<B>(unit, geo, h, ab, &mut sm),
        );
        let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
        let sa8 = if B::MINUS != 0 {
            _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(B::MINUS), y), ones)
        } else {
            _mm256_setzero_si256()
        };
        let (ux, x) = unit_values::<B, ROWS>(unit, geo, 0, h);
        for r in 0..ROWS {
            let yr = if B::SIGNED {
                _mm256_sign_epi8(y, x[r])
            } else {
                y
            };
            let mut lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(ux[r], yr), ones);
            if B::MINUS != 0 {
                lanes = _mm256_sub_epi32(lanes, sa8);
            }
            let d = _mm256_set1_ps(dp[r]);
            acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r]);
        }
    }
    let mut sm1 = [0f32; 8];
    _mm256_storeu_ps(sm1.as_mut_ptr(), sm);
    for r in 0..ROWS {
        let v = hsum8(acc[r]);
        *out.add(r) = if B::OFFSET { v + sm1[r] } else { v };
    }
}

/// Rows r0..r0+R of one group against C activation rows; cell (r, c) to `out[c * ldo + r]`.
/// The arithmetic per cell is `super::dot_row`'s (ggml's). The loop runs activation row by activation
/// row within a block, so only one row's values are live beside the R x C accumulators and
/// the R rows' weights (16 vector registers; spilled accumulators had cost a third).
/// `summs[c]` holds `offsets8` of activation row c (Q4_1 only).
///
/// # Safety
/// `grp` covers one group of `geo` for nb blocks, `act` C rows of nb blocks, `out` the
/// cells; r0 + R <= 8; AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn gemm8<B: Grouped, const R: usize, const C: usize>(
    grp: *const u8,
    geo: &Geometry,
    r0: usize,
    act: *const ActBlock,
    nb: usize,
    summs: &[[f32; 8]],
    out: *mut f32,
    ldo: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for b in 0..nb {
        let (u, h) = (b / B::PER_UNIT, b % B::PER_UNIT);
        let unit = grp.add(u * geo.unit_bytes);
        let dv = _mm256_cvtph_ps(_mm_loadu_si128(
            unit.add(geo.d_off + h * 16) as *const __m128i
        ));
        let mut dw = [_mm256_setzero_ps(); R];
        for (r, d) in dw.iter_mut().enumerate() {
            *d = _mm256_permutevar8x32_ps(dv, _mm256_set1_epi32((r0 + r) as i32));
        }
        let (ux, x) = unit_values::<B, R>(unit, geo, r0, h);
        for c in 0..C {
            let ab = &*act.add(c * nb + b);
            let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            let da = _mm256_set1_ps(ab.d);
            let sa8 = if B::MINUS != 0 {
                _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(B::MINUS), y), ones)
            } else {
                _mm256_setzero_si256()
            };
            for r in 0..R {
                let yr = if B::SIGNED {
                    _mm256_sign_epi8(y, x[r])
                } else {
                    y
                };
                let mut lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(ux[r], yr), ones);
                if B::MINUS != 0 {
                    lanes = _mm256_sub_epi32(lanes, sa8);
                }
                let d = _mm256_mul_ps(dw[r], da);
                acc[r][c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            let v = hsum8(acc[r][c]);
            *out.add(c * ldo + r) = if B::OFFSET { v + summs[c][r0 + r] } else { v };
        }
    }
}

/// Row r of one group against one activation row: `gemm8`'s one-cell tile.
///
/// # Safety
/// As `gemm8`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm8_one<B: Grouped>(
    grp: *const u8,
    geo: &Geometry,
    r: usize,
    act: *const ActBlock,
    nb: usize,
    summs: &[[f32; 8]],
    out: *mut f32,
    ldo: usize,
) {
    gemm8::<B, 1, 1>(grp, geo, r, act, nb, summs, out, ldo)
}

/// Groups `groups` of a grouped matrix of n rows against all m activation rows; cell (j, i)
/// to `out[i * n + j]`. `sums`: the activation blocks' sums `s`, packed (Q4_1 products of
/// more than one row; see `super::block_sums`).
///
/// # Safety
/// As `gemm8`, for every cell of the range; `out` holds m * n values.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn groups<B: Grouped, const R: usize, const C: usize>(
    w: &[u8],
    geo: &Geometry,
    act: &[ActBlock],
    sums: &[f32],
    nb: usize,
    m: usize,
    groups: std::ops::Range<usize>,
    out: *mut f32,
    n: usize,
) {
    debug_assert_eq!(geo.per_unit, B::PER_UNIT);
    let gb = geo.group_bytes(nb);
    let ap = |i: usize| act.as_ptr().add(i * nb);
    let mut summs = [[0f32; 8]; PANEL];
    for g in groups {
        let grp = w.as_ptr().add(g * gb);
        if m == 1 {
            decode_group(out, n, g, |o| gemv8::<B>(grp, geo, ap(0), nb, o));
            continue;
        }
        let j0 = g * ROWS;
        let valid = (n - j0).min(ROWS);
        for i0 in (0..m).step_by(PANEL) {
            let i1 = (i0 + PANEL).min(m);
            if B::OFFSET {
                offsets_panel::<B>(grp, geo, &sums[i0 * nb..], nb, i1 - i0, &mut summs);
            }
            // Activation rows outside, weight rows inside: a tile of activation rows stays in
            // L1 while the group's rows (also in L1) pass it.
            let mut i = i0;
            while i < i1 {
                let c = if i + C <= i1 { C } else { 1 };
                let s = &summs[i - i0..i - i0 + c];
                let (a, o) = (ap(i), out.add(i * n + j0));
                let mut r0 = 0;
                while r0 + R <= valid {
                    if c == C {
                        gemm8::<B, R, C>(grp, geo, r0, a, nb, s, o.add(r0), n);
                    } else {
                        gemm8::<B, R, 1>(grp, geo, r0, a, nb, s, o.add(r0), n);
                    }
                    r0 += R;
                }
                for r in r0..valid {
                    if c == C {
                        gemm8::<B, 1, C>(grp, geo, r, a, nb, s, o.add(r), n);
                    } else {
                        gemm8::<B, 1, 1>(grp, geo, r, a, nb, s, o.add(r), n);
                    }
                }
                i += c;
            }
        }
    }
}

pub(super) type GroupsFn = unsafe fn(
    &[u8],
    &Geometry,
    &[ActBlock],
    &[f32],
    usize,
    usize,
    std::ops::Range<usize>,
    *mut f32,
    usize,
);

/// The grouped-layout kernel for a block type, if it has one and this CPU has AVX2, FMA and
/// F16C.
pub(super) fn grouped_kernel(t: super::BlockType) -> Option<GroupsFn> {
    use super::BlockType as T;
    if !crate::ggml_math::has_avx2() {
        return None;
    }
    match t {
        // Tiles measured on SmolLM2's shapes (`examples/kernels`): one weight row against
        // eight activation rows keeps the most accumulators in registers; Q4_0's shared
        // `sum(8·x)` per activation block pays off over two weight rows.
        T::Q4_0 => Some(groups::<G4_0, 2, 4>),
        T::Q4_1 => Some(groups::<G4_1, 1, 8>),
        T::Q5_0 => Some(groups::<G5_0, 2, 4>),
        T::Q5_1 => Some(groups::<G5_1, 1, 8>),
        T::Q8_0 => Some(groups::<G8_0, 1, 8>),
    }
}

const _: () = assert!(QK == 32);
