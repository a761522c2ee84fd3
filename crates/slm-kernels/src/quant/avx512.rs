//! AVX-512 kernels (F, BW, VL and VNNI) for the grouped layout of `super::rows8`: the same
//! cells as `avx2`'s, bit for bit, with half the instructions.
//!
//! Each cell still keeps eight f32 lanes fed by `fma(d_w*d_x, lane, acc)` block after block,
//! so a 512-bit register carries two cells: one weight row against two activation rows in a
//! matrix product, two weight rows against the one activation row of a decode step. A lane's
//! integer sum of four byte products is one `vpdpbusd` instead of `maddubs` + `madd` (and
//! Q8_0's two sign instructions): the sums are exact integers either way, so the results do
//! not change. `vpdpbusd` multiplies unsigned by signed bytes; signed weights (Q8_0) are
//! shifted to unsigned (w + 128) and the surplus 128·sum(x) starts the sum negative, as does
//! Q4_0's 8·sum(x) for its nibbles q = w + 8.

use super::avx2::{self, Grouped};
use super::rows8::{Geometry, ROWS};
use super::{ActBlock, QK};
use std::arch::x86_64::*;

/// Two activation rows' block b, as the 512-bit tiles take it: the values of both rows and
/// their scales. Kept small (72 bytes for two 40-byte blocks): the pairs of a 512-token prompt
/// are megabytes, and what the tiles derive from them (a scale over eight lanes, Q4_0's and
/// Q8_0's starting sums) costs one or two instructions per block shared by eight weight rows.
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct PairBlock {
    y: [i8; 2 * QK],
    d: [f32; 2],
}

// SAFETY: numbers only; any bits are a block.
unsafe impl crate::scratch::Plain for PairBlock {}

/// Rows 2p and 2p + 1 of `act` (m rows of nb blocks) as pairs, block by block: pair p's block
/// b at `p * nb + b`, into `out`. An odd last row has no pair (the caller runs it alone).
pub(super) fn pairs(act: &[ActBlock], nb: usize, m: usize, out: &mut [PairBlock]) {
    assert!(out.len() == m / 2 * nb && act.len() >= m * nb);
    crate::pool::for_chunks(out, nb.max(1), |start, row| {
        let p = start / nb;
        for (b, pb) in row.iter_mut().enumerate() {
            for h in 0..2 {
                let a = &act[(2 * p + h) * nb + b];
                pb.y[h * QK..(h + 1) * QK].copy_from_slice(&a.qs);
                pb.d[h] = a.d;
            }
        }
    });
}

/// The integer lanes' starting values for block values `y` (pairs of rows or one row
/// broadcast): Q4_0's nibbles are w + 8, so -8·sum; Q8_0's shifted weights w + 128, so
/// -128·sum; zero for Q4_1.
#[inline(always)]
unsafe fn start<B: Grouped>(y: __m512i) -> __m512i {
    let zero = _mm512_setzero_si512();
    if B::MINUS != 0 || B::SIGNED {
        let shift = _mm512_set1_epi8(if B::MINUS != 0 {
            B::MINUS
        } else {
            0x80u8 as i8
        });
        _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, shift, y))
    } else {
        zero
    }
}

/// 32 bytes of weight values (the unit's block h of one row) as `vpdpbusd`'s unsigned
/// operand, in both halves of a 512-bit register; `fifth`: the 5-bit types' high bits of the
/// two halves' values (bit i for byte i).
#[inline(always)]
unsafe fn weights<B: Grouped>(raw: __m512i, h: usize, fifth: u64) -> __m512i {
    if B::NIBBLES {
        let mask = _mm512_set1_epi8(0x0F);
        let low = if h == 0 {
            _mm512_and_si512(raw, mask)
        } else {
            _mm512_and_si512(_mm512_srli_epi16::<4>(raw), mask)
        };
        if B::FIFTH {
            _mm512_or_si512(low, _mm512_maskz_mov_epi8(fifth, _mm512_set1_epi8(0x10)))
        } else {
            low
        }
    } else if B::SIGNED {
        _mm512_xor_si512(raw, _mm512_set1_epi8(0x80u8 as i8))
    } else {
        raw
    }
}

/// `hsum_float_8` of each half: the two cells of a register.
#[inline(always)]
unsafe fn hsum_halves(v: __m512) -> (f32, f32) {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    (avx2::hsum8(lo), avx2::hsum8(hi))
}

/// Rows r0..r0+R of one group against P pairs of activation rows (`pairs + p * nb`); cell
/// (r, c) to `out[c * ldo + r]`. `summs[c]` holds `offsets8` of activation row c (Q4_1).
///
/// # Safety
/// `grp` covers one group of `geo` for nb blocks, `pairs` P pairs of nb blocks, `out` the
/// cells; r0 + R <= 8; the CPU has AVX-512 F/BW/VL/VNNI, FMA and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline(never)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn gemm8<B: Grouped, const R: usize, const P: usize>(
    grp: *const u8,
    geo: &Geometry,
    r0: usize,
    pairs: *const PairBlock,
    nb: usize,
    summs: &[[f32; 8]],
    out: *mut f32,
    ldo: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let mut dw = [0f32; ROWS];
    // Value 0 over the low eight lanes, value 1 over the high eight.
    let halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for b in 0..nb {
        let (u, h) = (b / B::PER_UNIT, b % B::PER_UNIT);
        let unit = grp.add(u * geo.unit_bytes);
        let dv = _mm256_cvtph_ps(_mm_loadu_si128(
            unit.add(geo.d_off + h * 16) as *const __m128i
        ));
        // Scales broadcast from memory: a load each instead of a shuffle.
        _mm256_storeu_ps(dw.as_mut_ptr(), dv);
        let mut y = [_mm512_setzero_si512(); P];
        let mut da = [_mm512_setzero_ps(); P];
        let mut s0 = [_mm512_setzero_si512(); P];
        for p in 0..P {
            let pb = pairs.add(p * nb + b);
            y[p] = _mm512_loadu_si512((*pb).y.as_ptr() as *const __m512i);
            let d2 = _mm_castpd_ps(_mm_load_sd((*pb).d.as_ptr() as *const f64));
            da[p] = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(d2));
            s0[p] = start::<B>(y[p]);
        }
        for r in 0..R {
            let raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                unit.add(geo.qs_off + (r0 + r) * 32) as *const __m256i,
            ));
            let fifth = if B::FIFTH {
                let q = (unit.add(geo.h_off + (h * ROWS + r0 + r) * 4) as *const u32)
                    .read_unaligned() as u64;
                q | q << 32
            } else {
                0
            };
            let x = weights::<B>(raw, h, fifth);
            let d = _mm512_set1_ps(dw[r0 + r]);
            for p in 0..P {
                let lanes = _mm512_dpbusd_epi32(s0[p], x, y[p]);
                acc[r][p] = _mm512_fmadd_ps(
                    _mm512_mul_ps(d, da[p]),
                    _mm512_cvtepi32_ps(lanes),
                    acc[r][p],
                );
            }
        }
    }
    for r in 0..R {
        for p in 0..P {
            let (v0, v1) = hsum_halves(acc[r][p]);
            let (c0, c1) = (2 * p, 2 * p + 1);
            let (v0, v1) = if B::OFFSET {
                (v0 + summs[c0][r0 + r], v1 + summs[c1][r0 + r])
            } else {
                (v0, v1)
            };
            *out.add(c0 * ldo + r) = v0;
            *out.add(c1 * ldo + r) = v1;
        }
    }
}

/// The eight rows of one group against one activation row (decode), two rows a register;
/// row r to `out[r]`. The arithmetic per row is `avx2::gemv8`'s.
///
/// # Safety
/// As `avx2::gemv8`, and the CPU has AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[inline(never)]
unsafe fn gemv8<B: Grouped>(
    grp: *const u8,
    geo: &Geometry,
    act: *const ActBlock,
    nb: usize,
    out: *mut f32,
) {
    const PAIRS: usize = ROWS / 2;
    let mut acc = [_mm512_setzero_ps(); PAIRS];
    let mut sm = _mm256_setzero_ps();
    // Lane l of pair q takes row 2q's product in its low half, row 2q + 1's in its high half.
    let mut pick = [_mm512_setzero_si512(); PAIRS];
    for (q, p) in pick.iter_mut().enumerate() {
        let (a, b) = (2 * q as i32, 2 * q as i32 + 1);
        *p = _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
    }
    for b in 0..nb {
        let (u, h) = (b / B::PER_UNIT, b % B::PER_UNIT);
        let unit = grp.add(u * geo.unit_bytes);
        avx2::prefetch_ahead::<B>(grp, geo, b);
        let ab = &*act.add(b);
        let dp = _mm512_castps256_ps512(avx2::decode_scales::<B>(unit, geo, h, ab, &mut sm));
        let y = _mm512_broadcast_i64x4(_mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i));
        let s0 = start::<B>(y);
        for (q, a) in acc.iter_mut().enumerate() {
            let raw = _mm512_loadu_si512(unit.add(geo.qs_off + 2 * q * 32) as *const __m512i);
            // Rows 2q and 2q + 1: their fifth bits lie side by side.
            let fifth = if B::FIFTH {
                (unit.add(geo.h_off + (h * ROWS + 2 * q) * 4) as *const u64).read_unaligned()
            } else {
                0
            };
            let x = weights::<B>(raw, h, fifth);
            let lanes = _mm512_dpbusd_epi32(s0, x, y);
            let d = _mm512_permutexvar_ps(pick[q], dp);
            *a = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lanes), *a);
        }
    }
    let mut sm1 = [0f32; 8];
    _mm256_storeu_ps(sm1.as_mut_ptr(), sm);
    for (q, a) in acc.iter().enumerate() {
        let (v0, v1) = hsum_halves(*a);
        for (r, v) in [(2 * q, v0), (2 * q + 1, v1)] {
            *out.add(r) = if B::OFFSET { v + sm1[r] } else { v };
        }
    }
}

/// Weight rows per tile and pairs of activation rows per tile of the matrix product: a whole
/// group against four activation rows, which on k = 1536 outran four weight rows against
/// four pairs (the pairs of a tile, 72 bytes a block each, then stay in L1 for all 8 rows).
const GEMM_R: usize = 8;
const GEMM_P: usize = 2;

/// `avx2::groups` with the 512-bit tiles: groups `groups` of a grouped matrix of n rows
/// against all m activation rows (`act`, their sums and `pairs` of them, see `pairs`); cell (j, i) to
/// `out[i * n + j]`. An odd last activation row runs `avx2`'s one-row tile (the same cells).
///
/// # Safety
/// As `avx2::groups`; `pairs` holds `pairs(act, nb, m)`; the CPU has AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn groups<B: Grouped>(
    w: &[u8],
    geo: &Geometry,
    act: &[ActBlock],
    sums: &[f32],
    pairs: &[PairBlock],
    nb: usize,
    m: usize,
    groups: std::ops::Range<usize>,
    out: *mut f32,
    n: usize,
) {
    debug_assert_eq!(geo.per_unit, B::PER_UNIT);
    debug_assert!(pairs.len() >= m / 2 * nb);
    let gb = geo.group_bytes(nb);
    let mut summs = [[0f32; 8]; avx2::PANEL];
    for g in groups {
        let grp = w.as_ptr().add(g * gb);
        if m == 1 {
            avx2::decode_group(out, n, g, |o| gemv8::<B>(grp, geo, act.as_ptr(), nb, o));
            continue;
        }
        let j0 = g * ROWS;
        let valid = (n - j0).min(ROWS);
        // Panels start at even rows, so pair p of the matrix is rows 2p and 2p + 1.
        for i0 in (0..m).step_by(avx2::PANEL) {
            let i1 = (i0 + avx2::PANEL).min(m);
            if B::OFFSET {
                avx2::offsets_panel::<B>(grp, geo, &sums[i0 * nb..], nb, i1 - i0, &mut summs);
            }
            let mut i = i0;
            while i < i1 {
                let np = ((i1 - i) / 2).min(GEMM_P);
                let s = &summs[i - i0..];
                let o = out.add(i * n + j0);
                if np == 0 {
                    // The odd last row.
                    let a = act.as_ptr().add(i * nb);
                    for r in 0..valid {
                        avx2::gemm8_one::<B>(grp, geo, r, a, nb, s, o.add(r), n);
                    }
                    i += 1;
                    continue;
                }
                let pp = pairs.as_ptr().add(i / 2 * nb);
                let mut r0 = 0;
                while r0 < valid {
                    macro_rules! go {
                        ($r:literal) => {
                            match np {
                                2 => gemm8::<B, $r, 2>(grp, geo, r0, pp, nb, s, o.add(r0), n),
                                _ => gemm8::<B, $r, 1>(grp, geo, r0, pp, nb, s, o.add(r0), n),
                            }
                        };
                    }
                    if r0 + GEMM_R <= valid {
                        go!(8);
                        r0 += GEMM_R;
                    } else {
                        go!(1);
                        r0 += 1;
                    }
                }
                i += 2 * np;
            }
        }
    }
}

const _: () = assert!(GEMM_R == 8 && GEMM_P == 2 && ROWS == 8);
