//! AVX2 kernels for the 32-blocks, in ggml's arithmetic (see the parent module): each cell
//! (weight row, activation row) keeps eight f32 lanes fed by `fma(d_w*d_x, lane, acc)` block
//! after block, reduced by `hsum8`, plus the offset term summed separately. That order is per
//! cell, so a tile of R weight rows by C activation rows can share every load: a weight block
//! is unpacked once for C activation rows and an activation block is loaded once for R rows.
//! Why by hand: candle's quantized kernels round differently (see the parent module) and
//! unpack the weights again for every activation row.

use super::{ActBlock, QK};
use std::arch::x86_64::*;

/// How one stored weight block becomes 32 bytes for `maddubs`.
pub(super) trait Block {
    const BYTES: usize;
    /// Values are signed: multiply |w| by sign(w)·x, as ggml does.
    const SIGNED: bool;
    /// The block has an offset `m` (Q4_1, Q5_1), paired with the activation block's sum.
    const OFFSET: bool;
    /// # Safety
    /// `p` points at `BYTES` readable bytes; the CPU has AVX2.
    unsafe fn values(p: *const u8) -> __m256i;
}

/// ggml's bytes_from_nibbles_32: low nibbles are values 0..15, high nibbles 16..31.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let tmp = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

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

pub(super) struct Q4_0;
pub(super) struct Q4_1;
pub(super) struct Q5_0;
pub(super) struct Q5_1;
pub(super) struct Q8_0;

impl Block for Q4_0 {
    const BYTES: usize = 18;
    const SIGNED: bool = true;
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> __m256i {
        _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8))
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> __m256i {
        nibbles(p.add(4))
    }
}

impl Block for Q5_0 {
    const BYTES: usize = 22;
    const SIGNED: bool = true;
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> __m256i {
        // A clear fifth bit means value - 16: set the high nibble (two's complement).
        let hi = _mm256_andnot_si256(bits(p.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles(p.add(6)), hi)
    }
}

impl Block for Q5_1 {
    const BYTES: usize = 24;
    const SIGNED: bool = false;
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> __m256i {
        let hi = _mm256_and_si256(bits(p.add(4)), _mm256_set1_epi8(0x10));
        _mm256_or_si256(nibbles(p.add(8)), hi)
    }
}

impl Block for Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn values(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p.add(2) as *const __m256i)
    }
}

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// `hsum_float_8`.
#[inline(always)]
unsafe fn hsum8(x: __m256) -> f32 {
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

/// One tile: weight rows `w + r * row_bytes` (r < R) against activation rows `act + c * nb`
/// (c < C); cell (r, c) goes to `out[c * ldo + r]`.
///
/// # Safety
/// The pointers cover R rows of `nb` blocks and C rows of `nb` activation blocks, `out` covers
/// the cells; the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<B: Block, const R: usize, const C: usize>(
    w: *const u8,
    row_bytes: usize,
    act: *const ActBlock,
    nb: usize,
    out: *mut f32,
    ldo: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut summs = [[0f32; C]; R];
    for b in 0..nb {
        let mut y = [_mm256_setzero_si256(); C];
        let mut dy = [0f32; C];
        let mut sy = [0f32; C];
        for c in 0..C {
            let ab = &*act.add(c * nb + b);
            y[c] = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            dy[c] = ab.d;
            sy[c] = ab.s;
        }
        for r in 0..R {
            let p = w.add(r * row_bytes + b * B::BYTES);
            if PREFETCH > 0 {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH * R * row_bytes) as *const i8);
            }
            let x = B::values(p);
            let dx = f16_at(p);
            let ux = if B::SIGNED { _mm256_sign_epi8(x, x) } else { x };
            for c in 0..C {
                let yc = if B::SIGNED {
                    _mm256_sign_epi8(y[c], x)
                } else {
                    y[c]
                };
                let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(ux, yc), ones);
                let d = _mm256_set1_ps(dx * dy[c]);
                acc[r][c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[r][c]);
            }
            if B::OFFSET {
                let m = f16_at(p.add(2));
                for c in 0..C {
                    summs[r][c] = m.mul_add(sy[c], summs[r][c]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            *out.add(c * ldo + r) = hsum8(acc[r][c]) + summs[r][c];
        }
    }
}

/// Activation rows per tile in a matrix product, weight rows per tile: two weight rows against
/// four activation rows keeps the 8 accumulators, the unpacked weights and the activations in
/// the 16 vector registers. A single activation row (decode) takes four weight rows a tile.
const GEMM_R: usize = 2;
const GEMM_C: usize = 4;
const GEMV_R: usize = 4;
const PREFETCH: usize = 2;

/// Weight rows `rows` of `w` against all `m` activation rows; cell (j, i) to `out[i * n + j]`.
///
/// # Safety
/// As `tile`, for every cell of the range; `out` holds m * n values.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows<B: Block>(
    w: &[u8],
    row_bytes: usize,
    act: &[ActBlock],
    nb: usize,
    m: usize,
    rows: std::ops::Range<usize>,
    out: *mut f32,
    n: usize,
) {
    let wp = |j: usize| w.as_ptr().add(j * row_bytes);
    let ap = |i: usize| act.as_ptr().add(i * nb);
    let op = |i: usize, j: usize| out.add(i * n + j);
    if m == 1 {
        let mut j = rows.start;
        while j + GEMV_R <= rows.end {
            tile::<B, GEMV_R, 1>(wp(j), row_bytes, ap(0), nb, op(0, j), n);
            j += GEMV_R;
        }
        for j in j..rows.end {
            tile::<B, 1, 1>(wp(j), row_bytes, ap(0), nb, op(0, j), n);
        }
        return;
    }
    // Activation rows in panels that stay in L2 while the thread's weight rows stream past.
    let panel = 64;
    for i0 in (0..m).step_by(panel) {
        let i1 = (i0 + panel).min(m);
        let mut j = rows.start;
        while j < rows.end {
            let full_r = j + GEMM_R <= rows.end;
            let mut i = i0;
            while i + GEMM_C <= i1 {
                if full_r {
                    tile::<B, GEMM_R, GEMM_C>(wp(j), row_bytes, ap(i), nb, op(i, j), n);
                } else {
                    tile::<B, 1, GEMM_C>(wp(j), row_bytes, ap(i), nb, op(i, j), n);
                }
                i += GEMM_C;
            }
            for i in i..i1 {
                if full_r {
                    tile::<B, GEMM_R, 1>(wp(j), row_bytes, ap(i), nb, op(i, j), n);
                } else {
                    tile::<B, 1, 1>(wp(j), row_bytes, ap(i), nb, op(i, j), n);
                }
            }
            j += if full_r { GEMM_R } else { 1 };
        }
    }
}

pub(super) type RowsFn =
    unsafe fn(&[u8], usize, &[ActBlock], usize, usize, std::ops::Range<usize>, *mut f32, usize);

/// The kernel for a block type, if this CPU has AVX2, FMA and F16C.
pub(super) fn kernel(t: super::BlockType) -> Option<RowsFn> {
    use super::BlockType as T;
    if !(is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c"))
    {
        return None;
    }
    Some(match t {
        T::Q4_0 => rows::<Q4_0>,
        T::Q4_1 => rows::<Q4_1>,
        T::Q5_0 => rows::<Q5_0>,
        T::Q5_1 => rows::<Q5_1>,
        T::Q8_0 => rows::<Q8_0>,
    })
}

const _: () = assert!(QK == 32);
