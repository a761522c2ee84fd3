//! The K-quant matmul for groups of sixteen activation rows, with AVX-512 (F, BW and VNNI):
//! `Sum::Tiled` and `Sum::Rows`, the sums of batches of 8 rows or more (a batch's last
//! m % 16 rows take the dot products).
//!
//! Why a kernel of its own: a K-quant scale covers 16 or 32 values, so a dot product that
//! keeps one weight row's values in the lanes (`avx2::dots`) multiplies every 32 products by
//! a scale, which costs as much as the products. Here the sixteen rows of a group sit in the
//! lanes of a 512-bit register instead (`Q8Kx16`, interleaved once per matmul): one
//! `vpdpbusd` multiplies four weights, broadcast, by four values of each of the sixteen rows,
//! and a scale multiplies a whole unit's sums of sixteen rows at once. (Groups of eight in
//! 256-bit registers were slower: twice the broadcasts per product.) The weights keep GGUF's
//! layout; a pass unpacks a few weight rows to bytes once per tile of groups.
//!
//! The cells are `super::dot_row`'s, bit for bit: the integers are exact whatever their
//! order, and each cell's floats round as `super::Cell` does for these sums (the sixteen
//! lanes are sixteen cells). `vpdpbusd` multiplies unsigned by signed bytes: every type's
//! weights are unsigned here, Q3_K's as w + 4 (its offset of 4, like Q6_K's of 32, comes off
//! through the activation sums, as do the mins).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use super::avx2::{block_scales, q2k_values, q3k_parts, q45k_values, q6k_values};
use super::{scales_mins_k4, scales_q3k, KMatrix, KType, Sum, Q8K, QK_K};

/// Activation rows in a group (the lanes of a 512-bit register of i32 or f32).
pub(super) const GROUP: usize = 16;

/// One super-block of a group's sixteen activation rows, interleaved for `vpdpbusd`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct Q8Kx16 {
    /// Step s holds values 4s..4s+3 of row r at bytes 4r..4r+3.
    qs: [[i8; 4 * GROUP]; QK_K / 4],
    /// Pair q holds row r's sums of 16 number 2q and 2q + 1 at 2r and 2r + 1.
    bs: [[i16; 2 * GROUP]; 8],
    d: [f32; GROUP],
}

// SAFETY: numbers only; any bits are a block.
unsafe impl crate::scratch::Plain for Q8Kx16 {}

/// Rows 16g..16g+16 of `act` (rows of kb blocks) as group g, block b at `g * kb + b`, for the
/// first `groups` groups, into `out`.
pub(super) fn interleave(act: &[Q8K], kb: usize, groups: usize, out: &mut [Q8Kx16]) {
    assert!(out.len() == groups * kb && act.len() >= groups * GROUP * kb);
    crate::pool::for_chunks(out, kb, |start, row| {
        let g = start / kb;
        for (b, o) in row.iter_mut().enumerate() {
            for r in 0..GROUP {
                let y = &act[(GROUP * g + r) * kb + b];
                for (s, step) in o.qs.iter_mut().enumerate() {
                    step[4 * r..4 * r + 4].copy_from_slice(&y.qs[4 * s..4 * s + 4]);
                }
                for (q, pair) in o.bs.iter_mut().enumerate() {
                    pair[2 * r] = y.bsums[2 * q];
                    pair[2 * r + 1] = y.bsums[2 * q + 1];
                }
                o.d[r] = y.d;
            }
        }
    });
}

/// Whether these kernels compute `sum` for `t`: the tiled sum, and the repacked rows of the
/// types llama.cpp repacks (which have mins).
pub(super) fn takes(t: KType, sum: Sum) -> bool {
    match sum {
        Sum::Tiled => true,
        Sum::Rows(_) => matches!(t, KType::Q2K | KType::Q4K),
        Sum::Lanes => false,
    }
}

/// One weight row's super-block, unpacked for the kernel.
#[derive(Clone, Copy)]
struct Unpacked {
    /// The 256 values, unsigned.
    u: [u8; QK_K],
    /// The scale of each group of 16.
    sc: [i32; 16],
    /// The term the activations' sums carry (mins, or the offset that made the values
    /// unsigned), per pair of groups of 16: the two i16 weights of sums 2q and 2q + 1.
    pw: [i32; 8],
    d: f32,
    dmin: f32,
}

impl Unpacked {
    const ZERO: Unpacked = Unpacked {
        u: [0; QK_K],
        sc: [0; 16],
        pw: [0; 8],
        d: 0.0,
        dmin: 0.0,
    };
}

/// Two i16 as one word, the first in the low half (`madd_epi16`'s pairs).
fn pair(a: i32, b: i32) -> i32 {
    (a as i16 as u16 as u32 | (b as i16 as u16 as u32) << 16) as i32
}

/// Block `b` of type `t` unpacked into `o`.
///
/// # Safety
/// The CPU has AVX2 and F16C; b is one whole block of t.
#[target_feature(enable = "avx2,f16c")]
unsafe fn unpack(t: KType, b: &[u8], o: &mut Unpacked) {
    assert!(b.len() >= t.block_bytes());
    let put = |u: &mut [u8; QK_K], at: usize, v: __m256i| {
        // SAFETY: at + 32 <= 256.
        unsafe { _mm256_storeu_si256(u.as_mut_ptr().add(at).cast(), v) }
    };
    let load = |at: usize| {
        // SAFETY: within the block (asserted above).
        unsafe { _mm256_loadu_si256(b.as_ptr().add(at).cast()) }
    };
    (o.d, o.dmin) = block_scales(t, b);
    match t {
        KType::Q4K | KType::Q5K => {
            let (sc, mn) = scales_mins_k4(&b[4..16]);
            o.sc = std::array::from_fn(|g| sc[g / 2] as i32);
            o.pw = mn.map(|m| pair(m as i32, m as i32));
            for j in 0..4 {
                // SAFETY: the nibbles are 128 bytes.
                let (lo, hi) = unsafe {
                    if t == KType::Q5K {
                        q45k_values::<true>(&b[48..176], load(16), j)
                    } else {
                        q45k_values::<false>(&b[16..144], _mm256_setzero_si256(), j)
                    }
                };
                put(&mut o.u, 64 * j, lo);
                put(&mut o.u, 64 * j + 32, hi);
            }
        }
        KType::Q6K => {
            let sc = |g: usize| b[192 + g] as i8 as i32;
            o.sc = std::array::from_fn(sc);
            o.pw = std::array::from_fn(|q| pair(32 * sc(2 * q), 32 * sc(2 * q + 1)));
            for j in 0..2 {
                // SAFETY: a whole block.
                for (t, v) in unsafe { q6k_values(b, j) }.into_iter().enumerate() {
                    put(&mut o.u, 128 * j + 32 * t, v);
                }
            }
        }
        KType::Q2K => {
            o.sc = std::array::from_fn(|g| (b[g] & 0xF) as i32);
            o.pw =
                std::array::from_fn(|q| pair((b[2 * q] >> 4) as i32, (b[2 * q + 1] >> 4) as i32));
            for j in 0..2 {
                let bits = load(16 + 32 * j);
                for s in 0..4 {
                    put(&mut o.u, 128 * j + 32 * s, q2k_values(bits, s));
                }
            }
        }
        KType::Q3K => {
            let sc = scales_q3k(&b[96..108]);
            o.sc = sc.map(|s| s as i32);
            o.pw = std::array::from_fn(|q| pair(4 * sc[2 * q] as i32, 4 * sc[2 * q + 1] as i32));
            let hbits = load(0);
            for j in 0..2 {
                let bits = load(32 + 32 * j);
                for s in 0..4 {
                    let (low, high) = q3k_parts(bits, hbits, j, s);
                    // w + 4: the low bits, plus 4 where the high bit is set.
                    let u = _mm256_or_si256(low, _mm256_slli_epi16(high, 2));
                    put(&mut o.u, 128 * j + 32 * s, u);
                }
            }
        }
    }
}

/// Weight rows a pass unpacks and runs at once.
const PASS: usize = 8;
/// The activation bytes a tile of groups may span: what a pass's unpacked rows run
/// against, kept in L2 while the passes go by.
const TILE_BYTES: usize = 512 << 10;

/// Weight rows `rows` of `km` against the groups (`groups.len() / kb` of them), every cell
/// summed as `sum`; cell (row 16g + i, weight row j) to out[(16g + i) * n + j].
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F, BW, VL and VNNI; `takes(km.t, sum)`; out holds
/// the groups' rows times n values and no other thread writes the columns `rows`.
pub(super) unsafe fn span(
    km: &KMatrix,
    sum: Sum,
    groups: &[Q8Kx16],
    rows: std::ops::Range<usize>,
    out: *mut f32,
) {
    let (t, n, kb) = (km.t, km.n, km.k / QK_K);
    debug_assert!(takes(t, sum));
    assert!(rows.end <= n && groups.len().is_multiple_of(kb));
    let ng = groups.len() / kb;
    let mut unpacked = vec![Unpacked::ZERO; PASS * kb];
    let mut buf = Vec::new();
    let tile = (TILE_BYTES / (kb * std::mem::size_of::<Q8Kx16>())).max(1);
    for g0 in (0..ng).step_by(tile) {
        let mut j = rows.start;
        while j < rows.end {
            let c = (rows.end - j).min(PASS);
            for r in 0..c {
                let w = km.gguf_row(j + r, &mut buf);
                for (b, blk) in w.chunks_exact(t.block_bytes()).enumerate() {
                    // SAFETY: the CPU has the features; a whole block.
                    unsafe { unpack(t, blk, &mut unpacked[b * PASS + r]) };
                }
            }
            for g in g0..(g0 + tile).min(ng) {
                let ys = &groups[g * kb..(g + 1) * kb];
                let mut v = [[MaybeUninit::<f32>::uninit(); GROUP]; PASS];
                // SAFETY: the CPU has the features.
                unsafe {
                    if c == PASS {
                        cells_of::<PASS>(t, sum, &unpacked, ys, &mut v);
                    } else {
                        for (r, v) in v.iter_mut().enumerate().take(c) {
                            cells_of::<1>(t, sum, &unpacked[r..], ys, std::array::from_mut(v));
                        }
                    }
                }
                for (r, col) in v.iter().enumerate().take(c) {
                    for (i, x) in col.iter().enumerate() {
                        // SAFETY: written by `cells` for r < c; row 16g + i of the groups'
                        // and column j + r are within out and this task's.
                        unsafe { *out.add((GROUP * g + i) * n + j + r) = x.assume_init() };
                    }
                }
            }
            j += c;
        }
    }
}

/// `cells` with its unit (the values a scale covers) and chunk (the values summed in integers
/// between float roundings) fixed for `t` and `sum`, so that its loops unroll.
///
/// # Safety
/// The CPU has AVX2, FMA and AVX-512 F, VL and VNNI; `takes(t, sum)`.
#[inline(always)]
unsafe fn cells_of<const P: usize>(
    t: KType,
    sum: Sum,
    u: &[Unpacked],
    ys: &[Q8Kx16],
    out: &mut [[MaybeUninit<f32>; GROUP]; P],
) {
    let unit32 = matches!(t, KType::Q4K | KType::Q5K);
    // SAFETY: the caller's contract.
    unsafe {
        match (unit32, sum) {
            (true, Sum::Rows(64)) => cells::<P, 32, 64>(t, sum, u, ys, out),
            (true, _) => cells::<P, 32, QK_K>(t, sum, u, ys, out),
            (false, Sum::Rows(128)) => cells::<P, 16, 128>(t, sum, u, ys, out),
            (false, _) => cells::<P, 16, QK_K>(t, sum, u, ys, out),
        }
    }
}

/// The cells of P weight rows (`u`: their blocks, block b of row r at `b * PASS + r`) and one
/// group (`ys`: its kb blocks): out[r][i] for weight row r, group row i. A scale covers
/// UNIT values; CHUNK values are summed in integers between float roundings.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
unsafe fn cells<const P: usize, const UNIT: usize, const CHUNK: usize>(
    t: KType,
    sum: Sum,
    u: &[Unpacked],
    ys: &[Q8Kx16],
    out: &mut [[MaybeUninit<f32>; GROUP]; P],
) {
    debug_assert!(CHUNK == QK_K || sum == Sum::Rows(CHUNK));
    let has_min = matches!(t, KType::Q2K | KType::Q4K | KType::Q5K);
    let (unit, chunk) = (UNIT, CHUNK);
    // Per weight row: the value and (Sum::Rows) the min term, sixteen cells each.
    let mut row = [_mm512_setzero_ps(); P];
    let mut row_min = [_mm512_setzero_ps(); P];
    for (b, y) in ys.iter().enumerate() {
        let us: [&Unpacked; P] = std::array::from_fn(|r| &u[b * PASS + r]);
        // SAFETY: 8 floats.
        let dy = unsafe { _mm512_loadu_ps(y.d.as_ptr()) };
        for ch in 0..QK_K / chunk {
            let mut isum = [_mm512_setzero_si512(); P];
            for un in ch * chunk / unit..(ch + 1) * chunk / unit {
                let mut acc = [_mm512_setzero_si512(); P];
                for s in un * unit / 4..(un + 1) * unit / 4 {
                    // SAFETY: step s of the block.
                    let a = unsafe { _mm512_loadu_si512(y.qs[s].as_ptr().cast()) };
                    for r in 0..P {
                        // SAFETY: values 4s..4s+3 of 256.
                        let w =
                            unsafe { us[r].u.as_ptr().add(4 * s).cast::<i32>().read_unaligned() };
                        acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(w), a);
                    }
                }
                for r in 0..P {
                    let sc = _mm512_set1_epi32(us[r].sc[un * unit / 16]);
                    isum[r] = _mm512_add_epi32(isum[r], _mm512_mullo_epi32(acc[r], sc));
                }
            }
            let mut term = [_mm512_setzero_si512(); P];
            for q in ch * chunk / 32..(ch + 1) * chunk / 32 {
                // SAFETY: pair q of the block's sums.
                let bs = unsafe { _mm512_loadu_si512(y.bs[q].as_ptr().cast()) };
                for r in 0..P {
                    let p = _mm512_madd_epi16(bs, _mm512_set1_epi32(us[r].pw[q]));
                    term[r] = _mm512_add_epi32(term[r], p);
                }
            }
            for r in 0..P {
                let (d, dmin) = (us[r].d, us[r].dmin);
                match sum {
                    Sum::Rows(_) => {
                        let dd = _mm512_mul_ps(_mm512_set1_ps(d), dy);
                        let dm = _mm512_mul_ps(_mm512_set1_ps(dmin), dy);
                        row[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r]), dd, row[r]);
                        row_min[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(term[r]), dm, row_min[r]);
                    }
                    _ => {
                        // d * isum - dmin * imin, one rounding each; or, with an offset,
                        // d * (isum - offset).
                        let v = if has_min {
                            let v = _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(isum[r]));
                            let m = _mm512_cvtepi32_ps(term[r]);
                            _mm512_fmadd_ps(_mm512_set1_ps(-dmin), m, v)
                        } else {
                            let is = _mm512_sub_epi32(isum[r], term[r]);
                            _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(is))
                        };
                        row[r] = _mm512_fmadd_ps(v, dy, row[r]);
                    }
                }
            }
        }
    }
    for r in 0..P {
        let v = match sum {
            Sum::Rows(_) => _mm512_sub_ps(row[r], row_min[r]),
            _ => row[r],
        };
        // SAFETY: 8 floats.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr().cast(), v) };
    }
}

/// A Q4_K or Q5_K super-block's scales for the sixteen rows of an interleaved group (see
/// `rows16`): `d`, `dmin`, and `scales_mins_k4`'s scales and mins 0-3 and 4-7, a byte each
/// (`byte`).
struct Scales4 {
    d: __m512,
    dmin: __m512,
    sc: [__m512i; 2],
    mn: [__m512i; 2],
}

impl Scales4 {
    /// # Safety
    /// g points at a whole Q4_K or Q5_K group's super-block.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn of(g: *const u8) -> Self {
        use super::rows16::word;
        let (k1, k2, k3) = (
            _mm512_set1_epi32(0x3f3f3f3f),
            _mm512_set1_epi32(0x0f0f0f0f),
            _mm512_set1_epi32(0x03030303),
        );
        // SAFETY (the loads): within the group's super-block.
        let (d, dmin, u0, u1, u2) = unsafe {
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(g.cast())),
                _mm512_cvtph_ps(_mm256_loadu_si256(g.add(32).cast())),
                _mm512_loadu_si512(g.add(word(KType::Q4K, 0)).cast()),
                _mm512_loadu_si512(g.add(word(KType::Q4K, 1)).cast()),
                _mm512_loadu_si512(g.add(word(KType::Q4K, 2)).cast()),
            )
        };
        let sc = [
            _mm512_and_si512(u0, k1),
            _mm512_or_si512(
                _mm512_and_si512(u2, k2),
                _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u0, 6), k3), 4),
            ),
        ];
        let mn = [
            _mm512_and_si512(u1, k1),
            _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi32(u2, 4), k2),
                _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u1, 6), k3), 4),
            ),
        ];
        Self { d, dmin, sc, mn }
    }
}

/// Byte u (< 8) of each of sixteen words split over two vectors (`Scales4`'s), in the low byte
/// of its lane: a scale or min of sixteen rows, ready for `mullo_epi32` and `madd_epi16`.
#[inline]
#[target_feature(enable = "avx512f")]
fn byte(v: &[__m512i; 2], u: usize) -> __m512i {
    let s = _mm512_srl_epi32(v[u / 4], _mm_cvtsi32_si128(8 * (u % 4) as i32));
    _mm512_and_si512(s, _mm512_set1_epi32(0xFF))
}

/// `hsum8` lane by lane, for sixteen cells at once: the halves, then pairs.
#[inline]
#[target_feature(enable = "avx512f")]
fn hsum8x16(l: &[__m512; 8]) -> __m512 {
    let r: [__m512; 4] = std::array::from_fn(|k| _mm512_add_ps(l[k + 4], l[k]));
    _mm512_add_ps(_mm512_add_ps(r[0], r[2]), _mm512_add_ps(r[1], r[3]))
}

/// Step (j, p) of a Q4_K or Q5_K super-block against R activation rows (block b of each of
/// ys): the products of sixteen rows' values 64j + 4p.. (`wl`) and 64j + 32 + 4p.. (`wh`)
/// with row i's, added to lo[i] and hi[i].
///
/// # Safety
/// j < 4, p < 8.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn k4_step<const R: usize>(
    lo: &mut [__m512i; R],
    hi: &mut [__m512i; R],
    (wl, wh): (__m512i, __m512i),
    ys: &[&[Q8K]; R],
    b: usize,
    (j, p): (usize, usize),
) {
    debug_assert!(j < 4 && p < 8);
    for i in 0..R {
        let q = ys[i][b].qs.as_ptr();
        // SAFETY: values of the block (the caller's j and p).
        let (alo, ahi) = unsafe {
            (
                q.add(64 * j + 4 * p).cast::<i32>().read_unaligned(),
                q.add(64 * j + 32 + 4 * p).cast::<i32>().read_unaligned(),
            )
        };
        lo[i] = _mm512_dpbusd_epi32(lo[i], wl, _mm512_set1_epi32(alo));
        hi[i] = _mm512_dpbusd_epi32(hi[i], wh, _mm512_set1_epi32(ahi));
    }
}

/// `Sum::Rows` cells of one group of sixteen interleaved Q4_K rows (`grp`: its kb blocks, see
/// `rows16`) against R activation rows `ys` (kb blocks each), row i summed as `sums[i]`:
/// out[i][r] for weight row r. The integers are `super::dot_row`'s (exact), the floats round as
/// `super::Cell` does, lane by lane. A group's quants are loaded and split into nibbles once
/// for the R rows.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F, BW and VNNI; every sum is `Rows(64)` or
/// `Rows(256)`; grp holds kb groups' blocks and each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn rows16_q4k<const R: usize>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    sums: [Sum; R],
    out: &mut [[f32; 16]; R],
) {
    const GROUP_BYTES: usize = super::rows16::group_bytes(KType::Q4K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    debug_assert!(sums
        .iter()
        .all(|s| matches!(s, Sum::Rows(64) | Sum::Rows(QK_K))));
    let per_chunk = sums.map(|s| s == Sum::Rows(64));
    let m4 = _mm512_set1_epi8(0xF);
    let mut row = [_mm512_setzero_ps(); R];
    let mut row_min = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
        // SAFETY: a Q4_K group's super-block.
        let Scales4 { d, dmin, sc, mn } = unsafe { Scales4::of(g) };
        let dd: [__m512; R] = std::array::from_fn(|i| _mm512_mul_ps(d, _mm512_set1_ps(ys[i][b].d)));
        let dm: [__m512; R] =
            std::array::from_fn(|i| _mm512_mul_ps(dmin, _mm512_set1_ps(ys[i][b].d)));
        let mut isum = [_mm512_setzero_si512(); R];
        let mut imin = [_mm512_setzero_si512(); R];
        for j in 0..4 {
            let mut lo = [_mm512_setzero_si512(); R];
            let mut hi = [_mm512_setzero_si512(); R];
            for p in 0..8 {
                // SAFETY: vector (j, p) of the group's quants.
                let w = unsafe {
                    _mm512_loadu_si512(g.add(super::rows16::word(KType::Q4K, 3 + 8 * j + p)).cast())
                };
                let wl = _mm512_and_si512(w, m4);
                let wh = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
                // SAFETY: j < 4, p < 8.
                unsafe { k4_step(&mut lo, &mut hi, (wl, wh), &ys, b, (j, p)) };
            }
            let (sl, sh) = (byte(&sc, 2 * j), byte(&sc, 2 * j + 1));
            let (ml, mh) = (byte(&mn, 2 * j), byte(&mn, 2 * j + 1));
            for i in 0..R {
                let bs = |u: usize| {
                    let s = &ys[i][b].bsums;
                    _mm512_set1_epi32(s[2 * u] as i32 + s[2 * u + 1] as i32)
                };
                let is =
                    _mm512_add_epi32(_mm512_mullo_epi32(lo[i], sl), _mm512_mullo_epi32(hi[i], sh));
                let im = _mm512_add_epi32(
                    _mm512_mullo_epi32(ml, bs(2 * j)),
                    _mm512_mullo_epi32(mh, bs(2 * j + 1)),
                );
                if per_chunk[i] {
                    row[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), dd[i], row[i]);
                    row_min[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(im), dm[i], row_min[i]);
                } else {
                    isum[i] = _mm512_add_epi32(isum[i], is);
                    imin[i] = _mm512_add_epi32(imin[i], im);
                }
            }
        }
        for i in 0..R {
            if !per_chunk[i] {
                row[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), dd[i], row[i]);
                row_min[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imin[i]), dm[i], row_min[i]);
            }
        }
    }
    for i in 0..R {
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(out[i].as_mut_ptr(), _mm512_sub_ps(row[i], row_min[i])) };
    }
}

/// Q5_K's values 64j + 4p.. and 64j + 32 + 4p.. of sixteen interleaved rows (as
/// `avx2::q45k_values`), from quants vector (j, p) `w` and high bits vector p `h` (see
/// `rows16`): bits 2j and 2j + 1 of h's bytes are the fifth bits of the two.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn q5k_values(w: __m512i, h: __m512i, j: usize) -> (__m512i, __m512i) {
    let m4 = _mm512_set1_epi8(0xF);
    // Bit `from` of every byte of h at bit 4, the rest clear (constant shifts once j is).
    let fifth = |from: usize| {
        let h = match from {
            0 => _mm512_slli_epi16::<4>(h),
            1 => _mm512_slli_epi16::<3>(h),
            2 => _mm512_slli_epi16::<2>(h),
            3 => _mm512_slli_epi16::<1>(h),
            4 => h,
            5 => _mm512_srli_epi16::<1>(h),
            6 => _mm512_srli_epi16::<2>(h),
            _ => _mm512_srli_epi16::<3>(h),
        };
        _mm512_and_si512(h, _mm512_set1_epi8(0x10))
    };
    (
        _mm512_or_si512(_mm512_and_si512(w, m4), fifth(2 * j)),
        _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16::<4>(w), m4),
            fifth(2 * j + 1),
        ),
    )
}

/// The integers of Q5_K's min term for sixteen rows against one activation block: min u times
/// the sum of its 32 activations, summed (`super::group_mins`). A min and such a sum fit in 16
/// bits, so each product is a `madd_epi16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn q5k_mins(mn: &[__m512i; 2], y: &Q8K) -> __m512i {
    let mut imin = _mm512_setzero_si512();
    for u in 0..8 {
        let s = y.bsums[2 * u] as i32 + y.bsums[2 * u + 1] as i32;
        let m = _mm512_madd_epi16(byte(mn, u), _mm512_set1_epi32(s as u16 as i32));
        imin = _mm512_add_epi32(imin, m);
    }
    imin
}

/// `Sum::Lanes` cells of one group of sixteen interleaved Q5_K rows (`grp`: its kb blocks, see
/// `rows16`) against one activation row `y`: out[r] for weight row r. Eight position lanes per
/// cell and the mins in a float of their own, as ggml's dot product keeps them; the integers
/// are `super::dot_row`'s, the floats round as `super::Cell` does, lane by lane. Lane by lane:
/// a lane's four chunks of 64 values, then the next, so that its high bits are loaded once.
/// Four products of 5-bit values and Q8_K fit in 16 bits, so a scale is applied by `vpdpwssd`
/// against the scale in the low half of each word.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F, BW and VNNI; grp holds kb groups' blocks and y
/// kb blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn rows16_q5k_lanes(grp: &[u8], y: &[Q8K], out: &mut [f32; 16]) {
    use super::rows16::q5k_step;
    const GROUP_BYTES: usize = super::rows16::group_bytes(KType::Q5K);
    let kb = y.len();
    assert!(grp.len() >= kb * GROUP_BYTES);
    let mut lanes = [_mm512_setzero_ps(); 8];
    let mut mins = _mm512_setzero_ps();
    for (b, y) in y.iter().enumerate() {
        let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
        // SAFETY: a Q5_K group's super-block.
        let Scales4 { d, dmin, sc, mn } = unsafe { Scales4::of(g) };
        let scales: [[__m512i; 2]; 4] =
            std::array::from_fn(|j| [byte(&sc, 2 * j), byte(&sc, 2 * j + 1)]);
        let q = y.qs.as_ptr();
        let dy = _mm512_mul_ps(_mm512_set1_ps(y.d), d);
        for (p, lane) in lanes.iter_mut().enumerate() {
            // SAFETY: step p's high bits.
            let h = unsafe { _mm512_loadu_si512(g.add(q5k_step(p)).cast()) };
            let mut acc = _mm512_setzero_si512();
            for (j, s) in scales.iter().enumerate() {
                // SAFETY: step p's quants j; values of the block.
                let (w, alo, ahi) = unsafe {
                    (
                        _mm512_loadu_si512(g.add(q5k_step(p) + 64 * (1 + j)).cast()),
                        q.add(64 * j + 4 * p).cast::<i32>().read_unaligned(),
                        q.add(64 * j + 32 + 4 * p).cast::<i32>().read_unaligned(),
                    )
                };
                let (wl, wh) = q5k_values(w, h, j);
                let z = _mm512_setzero_si512();
                let dl = _mm512_dpbusd_epi32(z, wl, _mm512_set1_epi32(alo));
                let dh = _mm512_dpbusd_epi32(z, wh, _mm512_set1_epi32(ahi));
                acc = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(acc, dl, s[0]), dh, s[1]);
            }
            *lane = _mm512_fmadd_ps(dy, _mm512_cvtepi32_ps(acc), *lane);
        }
        let dminy = _mm512_mul_ps(_mm512_set1_ps(-y.d), dmin);
        mins = _mm512_fmadd_ps(dminy, _mm512_cvtepi32_ps(q5k_mins(&mn, y)), mins);
    }
    // SAFETY: 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), _mm512_add_ps(hsum8x16(&lanes), mins)) };
}

/// `Sum::Tiled` cells of one group of sixteen interleaved Q5_K rows (`grp`: its kb blocks, see
/// `rows16`) against R activation rows `ys` (kb blocks each): out[i][r] for weight row r. The
/// integers are `super::dot_row`'s, the floats round as `super::Cell` does, lane by lane. A
/// group's values are unpacked once for the R rows.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F, BW and VNNI; grp holds kb groups' blocks and
/// each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn rows16_q5k_tiled<const R: usize>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    out: &mut [[f32; 16]; R],
) {
    use super::rows16::q5k_step;
    const GROUP_BYTES: usize = super::rows16::group_bytes(KType::Q5K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    let mut row = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
        // SAFETY: a Q5_K group's super-block.
        let Scales4 { d, dmin, sc, mn } = unsafe { Scales4::of(g) };
        let mut isum = [_mm512_setzero_si512(); R];
        for j in 0..4 {
            let mut lo = [_mm512_setzero_si512(); R];
            let mut hi = [_mm512_setzero_si512(); R];
            for p in 0..8 {
                // SAFETY: step p's high bits and quants j.
                let (h, w) = unsafe {
                    (
                        _mm512_loadu_si512(g.add(q5k_step(p)).cast()),
                        _mm512_loadu_si512(g.add(q5k_step(p) + 64 * (1 + j)).cast()),
                    )
                };
                let (wl, wh) = q5k_values(w, h, j);
                // SAFETY: j < 4, p < 8.
                unsafe { k4_step(&mut lo, &mut hi, (wl, wh), &ys, b, (j, p)) };
            }
            let (sl, sh) = (byte(&sc, 2 * j), byte(&sc, 2 * j + 1));
            for i in 0..R {
                let is =
                    _mm512_add_epi32(_mm512_mullo_epi32(lo[i], sl), _mm512_mullo_epi32(hi[i], sh));
                isum[i] = _mm512_add_epi32(isum[i], is);
            }
        }
        for i in 0..R {
            let imin = _mm512_cvtepi32_ps(q5k_mins(&mn, &ys[i][b]));
            let r = _mm512_fnmadd_ps(dmin, imin, _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum[i])));
            row[i] = _mm512_fmadd_ps(r, _mm512_set1_ps(ys[i][b].d), row[i]);
        }
    }
    for i in 0..R {
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(out[i].as_mut_ptr(), row[i]) };
    }
}

/// `Sum::Rows` cells of one group of sixteen interleaved Q2_K rows (`grp`: its kb blocks, see
/// `rows16`) against R activation rows `ys`, row i summed as `sums[i]` (`Rows(128)` or
/// `Rows(256)`): out[i][r] for weight row r. The integers are `super::dot_row`'s, the floats
/// round as `super::Cell` does, lane by lane. Group by group of 16 values: sixteen products of
/// 2-bit values fit in 16 bits, so a group's scale is applied once, by `vpdpwssd`; each 128
/// values' sum is kept apart.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F, BW and VNNI; every sum is `Rows(128)` or
/// `Rows(256)`; grp holds kb groups' blocks and each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
// j and h are positions in the block as well as indices.
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn rows16_q2k<const R: usize>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    sums: [Sum; R],
    out: &mut [[f32; 16]; R],
) {
    use super::rows16::word;
    const GROUP_BYTES: usize = super::rows16::group_bytes(KType::Q2K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    debug_assert!(sums
        .iter()
        .all(|s| matches!(s, Sum::Rows(128) | Sum::Rows(QK_K))));
    let per_chunk = sums.map(|s| s == Sum::Rows(128));
    let (m2, m4) = (_mm512_set1_epi8(3), _mm512_set1_epi32(0xF));
    let mut row = [_mm512_setzero_ps(); R];
    let mut row_min = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
        // SAFETY (the loads): within the group's super-block.
        let (d, dmin, u) = unsafe {
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(g.cast())),
                _mm512_cvtph_ps(_mm256_loadu_si256(g.add(32).cast())),
                [0, 1, 2, 3].map(|w| _mm512_loadu_si512(g.add(word(KType::Q2K, w)).cast())),
            )
        };
        // The scale (low nibble) or min of group q of the sixteen rows.
        let nibble = |q: usize, min: bool| {
            let at = 8 * (q % 4) + 4 * min as usize;
            _mm512_and_si512(_mm512_srl_epi32(u[q / 4], _mm_cvtsi32_si128(at as i32)), m4)
        };
        // Each 128 values' integer sum, per activation row.
        let mut isum = [[_mm512_setzero_si512(); 2]; R];
        for j in 0..2 {
            for s in 0..4 {
                // Values 128j + 32s.., groups 8j + 2s and 8j + 2s + 1.
                let mut acc = [[_mm512_setzero_si512(); 2]; R];
                for p in 0..8 {
                    // SAFETY: bits word 8j + p of the group's sixteen rows.
                    let q = unsafe {
                        _mm512_loadu_si512(g.add(word(KType::Q2K, 4 + 8 * j + p)).cast())
                    };
                    let w =
                        _mm512_and_si512(_mm512_srl_epi16(q, _mm_cvtsi32_si128(2 * s as i32)), m2);
                    for i in 0..R {
                        // SAFETY: values 128j + 32s + 4p.. of the block.
                        let a = unsafe {
                            let at = 128 * j + 32 * s + 4 * p;
                            ys[i][b].qs.as_ptr().add(at).cast::<i32>().read_unaligned()
                        };
                        acc[i][p / 4] = _mm512_dpbusd_epi32(acc[i][p / 4], w, _mm512_set1_epi32(a));
                    }
                }
                for h in 0..2 {
                    let sc = nibble(8 * j + 2 * s + h, false);
                    for i in 0..R {
                        isum[i][j] = _mm512_dpwssd_epi32(isum[i][j], acc[i][h], sc);
                    }
                }
            }
        }
        for i in 0..R {
            let y = &ys[i][b];
            // The mins' integers, per 128 values: min q times the sum of its 16 activations.
            let imin: [__m512i; 2] = std::array::from_fn(|c| {
                let mut v = _mm512_setzero_si512();
                for q in 8 * c..8 * c + 8 {
                    let bs = _mm512_set1_epi32(y.bsums[q] as u16 as i32);
                    v = _mm512_add_epi32(v, _mm512_madd_epi16(nibble(q, true), bs));
                }
                v
            });
            let (dd, dm) = (
                _mm512_mul_ps(d, _mm512_set1_ps(y.d)),
                _mm512_mul_ps(dmin, _mm512_set1_ps(y.d)),
            );
            if per_chunk[i] {
                for c in 0..2 {
                    row[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i][c]), dd, row[i]);
                    row_min[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(imin[c]), dm, row_min[i]);
                }
            } else {
                let is = _mm512_add_epi32(isum[i][0], isum[i][1]);
                let im = _mm512_add_epi32(imin[0], imin[1]);
                row[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), dd, row[i]);
                row_min[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(im), dm, row_min[i]);
            }
        }
    }
    for i in 0..R {
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(out[i].as_mut_ptr(), _mm512_sub_ps(row[i], row_min[i])) };
    }
}

/// The cells of one group of sixteen interleaved Q3_K rows (`grp`: its kb blocks, see `rows16`)
/// against R activation rows `ys`, all summed as `Sum::Lanes` (with `LANES`, one row: eight
/// position lanes per cell, as ggml's dot product keeps them) or `Sum::Tiled`: out[i][r] for
/// weight row r. The integers are `super::dot_row`'s; the floats round as `super::Cell` does,
/// lane by lane. Lane by lane (a step of `rows16::q3k_step`): its values are unsigned here
/// (w + 4), and each `vpdpbusd` starts from minus 4 times the sum of its four activations, so
/// that four products fit in 16 bits and a scale is applied by `vpdpwssd`.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F, BW and VNNI; grp holds kb groups' blocks and
/// each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
// p is a position in the block as well as a lane's index.
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn rows16_q3k<const R: usize, const LANES: bool>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    out: &mut [[f32; 16]; R],
) {
    use super::rows16::{q3k_step, Q3K_SCALES};
    const GROUP_BYTES: usize = super::rows16::group_bytes(KType::Q3K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    assert!(!LANES || R == 1);
    let (m2, m4) = (_mm512_set1_epi8(3), _mm512_set1_epi8(4));
    let (k2, k4) = (_mm512_set1_epi32(0x03030303), _mm512_set1_epi32(0x0f0f0f0f));
    let low16 = _mm512_set1_epi32(0xFFFF);
    let mut lanes = [_mm512_setzero_ps(); 8];
    let mut row = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
        // SAFETY (the loads): within the group's super-block.
        let (d, u) = unsafe {
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(g.cast())),
                [0, 1, 2].map(|w| _mm512_loadu_si512(g.add(Q3K_SCALES + 64 * w).cast())),
            )
        };
        // `scales_q3k` for sixteen rows: scales 4v..4v+4 as the bytes of words v, minus 32.
        let low = [
            _mm512_and_si512(u[0], k4),
            _mm512_and_si512(u[1], k4),
            _mm512_and_si512(_mm512_srli_epi32::<4>(u[0]), k4),
            _mm512_and_si512(_mm512_srli_epi32::<4>(u[1]), k4),
        ];
        let high = [
            u[2],
            _mm512_srli_epi32::<2>(u[2]),
            _mm512_srli_epi32::<4>(u[2]),
            _mm512_srli_epi32::<6>(u[2]),
        ];
        let packed: [__m512i; 4] = std::array::from_fn(|v| {
            let h = _mm512_slli_epi32::<4>(_mm512_and_si512(high[v], k2));
            _mm512_sub_epi8(_mm512_or_si512(low[v], h), _mm512_set1_epi8(32))
        });
        // Scale q of the sixteen rows, signed, in the low half of each word.
        let scale = |q: usize| {
            let v = _mm512_sll_epi32(packed[q / 4], _mm_cvtsi32_si128(24 - 8 * (q % 4) as i32));
            _mm512_and_si512(_mm512_srai_epi32::<24>(v), low16)
        };
        // Minus 4 times the sum of each activation word (four values), per row.
        let mut offs = [[0i32; 64]; R];
        for i in 0..R {
            for c in 0..4 {
                // SAFETY: values 64c.. of the block.
                let a = unsafe { _mm512_loadu_si512(ys[i][b].qs.as_ptr().add(64 * c).cast()) };
                let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(4), a);
                let s = _mm512_sub_epi32(_mm512_setzero_si512(), s);
                // SAFETY: 16 words of offs[i].
                unsafe { _mm512_storeu_si512(offs[i].as_mut_ptr().add(16 * c).cast(), s) };
            }
        }
        let dy = _mm512_mul_ps(d, _mm512_set1_ps(ys[0][b].d));
        let mut isum = [_mm512_setzero_si512(); R];
        let mut sc = [_mm512_setzero_si512(); 8];
        for p in 0..8 {
            if p % 4 == 0 {
                // Values 128j + 32s + 4p.. are in group 8j + 2s + p / 4.
                sc = std::array::from_fn(|t| scale(8 * (t / 4) + 2 * (t % 4) + p / 4));
            }
            // SAFETY: step p's three vectors.
            let (h, q) = unsafe {
                let at = g.add(q3k_step(p));
                (
                    _mm512_loadu_si512(at.cast()),
                    [
                        _mm512_loadu_si512(at.add(64).cast()),
                        _mm512_loadu_si512(at.add(128).cast()),
                    ],
                )
            };
            let mut acc = [_mm512_setzero_si512(); R];
            for j in 0..2 {
                for s in 0..4 {
                    // Low bits 2s.., and hmask bit 4j + s as 4.
                    let lo = _mm512_and_si512(
                        _mm512_srl_epi16(q[j], _mm_cvtsi32_si128(2 * s as i32)),
                        m2,
                    );
                    let bit = 4 * j + s;
                    let hi = if bit >= 2 {
                        _mm512_srl_epi16(h, _mm_cvtsi32_si128(bit as i32 - 2))
                    } else {
                        _mm512_sll_epi16(h, _mm_cvtsi32_si128(2 - bit as i32))
                    };
                    let w = _mm512_or_si512(lo, _mm512_and_si512(hi, m4));
                    let word = 32 * j + 8 * s + p;
                    for i in 0..R {
                        // SAFETY: values 4 word.. of the block.
                        let a = unsafe {
                            ys[i][b]
                                .qs
                                .as_ptr()
                                .add(4 * word)
                                .cast::<i32>()
                                .read_unaligned()
                        };
                        let o = _mm512_set1_epi32(offs[i][word]);
                        let dot = _mm512_dpbusd_epi32(o, w, _mm512_set1_epi32(a));
                        acc[i] = _mm512_dpwssd_epi32(acc[i], dot, sc[4 * j + s]);
                    }
                }
            }
            if LANES {
                lanes[p] = _mm512_fmadd_ps(dy, _mm512_cvtepi32_ps(acc[0]), lanes[p]);
            } else {
                for i in 0..R {
                    isum[i] = _mm512_add_epi32(isum[i], acc[i]);
                }
            }
        }
        if !LANES {
            for i in 0..R {
                let r = _mm512_mul_ps(d, _mm512_cvtepi32_ps(isum[i]));
                row[i] = _mm512_fmadd_ps(r, _mm512_set1_ps(ys[i][b].d), row[i]);
            }
        }
    }
    for i in 0..R {
        let v = if LANES { hsum8x16(&lanes) } else { row[i] };
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(out[i].as_mut_ptr(), v) };
    }
}

/// Q6_K's values 128j + 32t + 4p.. (t < 4) of sixteen interleaved rows, unsigned (as
/// `avx2::q6k_values`), from step (j, p)'s three vectors (see `rows16::q6k_step`).
///
/// # Safety
/// at points at a step of a Q6_K group's super-block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn q6k_step_values(at: *const u8) -> [__m512i; 4] {
    let (m4, m3) = (_mm512_set1_epi8(0xF), _mm512_set1_epi8(3));
    // SAFETY: the step's three vectors (the caller's).
    let (qa, qb, qh) = unsafe {
        (
            _mm512_loadu_si512(at.cast()),
            _mm512_loadu_si512(at.add(64).cast()),
            _mm512_loadu_si512(at.add(128).cast()),
        )
    };
    let high = |s: u32| {
        let h = _mm512_and_si512(_mm512_srl_epi16(qh, _mm_cvtsi32_si128(s as i32)), m3);
        _mm512_slli_epi16::<4>(h)
    };
    [
        _mm512_or_si512(_mm512_and_si512(qa, m4), high(0)),
        _mm512_or_si512(_mm512_and_si512(qb, m4), high(2)),
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(qa), m4), high(4)),
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(qb), m4), high(6)),
    ]
}

/// The sixteen rows' scale of group q (< 16) of a Q6_K group's super-block at g, sign-extended
/// (`LOW16`: masked to the low half of each word, for `madd_epi16`).
///
/// # Safety
/// g points at a Q6_K group's super-block.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn q6k_scale<const LOW16: bool>(g: *const u8, q: usize) -> __m512i {
    // SAFETY: the scales of group q (the caller's).
    let v = _mm512_cvtepi8_epi32(unsafe {
        _mm_loadu_si128(g.add(super::rows16::Q6K_SCALES + 16 * q).cast())
    });
    if LOW16 {
        _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF))
    } else {
        v
    }
}

/// `Sum::Lanes` cells of one group of sixteen interleaved Q6_K rows (`grp`: its kb blocks, see
/// `rows16`) against one activation row `y`: out[r] for weight row r. Eight position lanes per
/// cell, as ggml's dot product keeps them; the integers are `super::dot_row`'s, the floats
/// round as `super::Cell` does, lane by lane. Lane by lane (its two steps side by side): a
/// product of four 6-bit values and four of Q8_K fits in 16 bits, so a scale is applied by
/// `vpdpwssd` against the scale in the low half of each word.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F, BW and VNNI; grp holds kb groups' blocks and y
/// kb blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn rows16_q6k_lanes(grp: &[u8], y: &[Q8K], out: &mut [f32; 16]) {
    use super::rows16::q6k_step;
    const GROUP_BYTES: usize = super::rows16::group_bytes(KType::Q6K);
    let kb = y.len();
    assert!(grp.len() >= kb * GROUP_BYTES);
    let mut lanes = [_mm512_setzero_ps(); 8];
    for (b, y) in y.iter().enumerate() {
        let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
        // SAFETY (the loads): within the group's super-block.
        let d = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(g.cast()) });
        let dy = _mm512_mul_ps(_mm512_set1_ps(y.d), d);
        let q = y.qs.as_ptr();
        let mut sc = [[_mm512_setzero_si512(); 4]; 2];
        for (p, lane) in lanes.iter_mut().enumerate() {
            if p % 4 == 0 {
                // Values 128j + 32t + 4p.. are in group 8j + 2t + p / 4.
                // SAFETY: a group of 16's scales.
                sc = std::array::from_fn(|j| {
                    std::array::from_fn(|t| unsafe { q6k_scale::<true>(g, 8 * j + 2 * t + p / 4) })
                });
            }
            let mut acc = _mm512_setzero_si512();
            for (j, sc) in sc.iter().enumerate() {
                // SAFETY: step (j, p) of the group's super-block.
                let w = unsafe { q6k_step_values(g.add(q6k_step(j, p))) };
                for t in 0..4 {
                    // SAFETY: values 128j + 32t + 4p.. of the block.
                    let a = unsafe {
                        q.add(128 * j + 32 * t + 4 * p)
                            .cast::<i32>()
                            .read_unaligned()
                    };
                    let dot =
                        _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[t], _mm512_set1_epi32(a));
                    acc = _mm512_dpwssd_epi32(acc, dot, sc[t]);
                }
            }
            // The offset of 32: lane p takes groups 2p and 2p + 1's (as `super::dot_row`).
            let off = |q: usize| {
                let bs = _mm512_set1_epi32(y.bsums[q] as u16 as i32);
                // SAFETY: group q's scales.
                _mm512_madd_epi16(unsafe { q6k_scale::<true>(g, q) }, bs)
            };
            let o = _mm512_slli_epi32::<5>(_mm512_add_epi32(off(2 * p), off(2 * p + 1)));
            *lane = _mm512_fmadd_ps(dy, _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, o)), *lane);
        }
    }
    // SAFETY: 16 floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), hsum8x16(&lanes)) };
}

/// `Sum::Tiled` cells of one group of sixteen interleaved Q6_K rows (`grp`: its kb blocks, see
/// `rows16`) against R activation rows `ys`: out[i][r] for weight row r. The integers are
/// `super::dot_row`'s; the floats round as `super::Cell` does, lane by lane: each group of 16
/// values' products summed, then scaled once.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and AVX-512 F, BW and VNNI; grp holds kb groups' blocks and
/// each of ys kb blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
// p is a position in the block as well as an index.
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn rows16_q6k_tiled<const R: usize>(
    grp: &[u8],
    ys: [&[Q8K]; R],
    out: &mut [[f32; 16]; R],
) {
    use super::rows16::q6k_step;
    const GROUP_BYTES: usize = super::rows16::group_bytes(KType::Q6K);
    let kb = ys[0].len();
    assert!(grp.len() >= kb * GROUP_BYTES && ys.iter().all(|y| y.len() == kb));
    let mut row = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        let g = grp[b * GROUP_BYTES..][..GROUP_BYTES].as_ptr();
        // SAFETY (the loads): within the group's super-block.
        let d = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(g.cast()) });
        let mut isum = [_mm512_setzero_si512(); R];
        for j in 0..2 {
            let mut acc = [[_mm512_setzero_si512(); 4]; R];
            for p in 0..8 {
                // SAFETY: step (j, p) of the group's super-block.
                let w = unsafe { q6k_step_values(g.add(q6k_step(j, p))) };
                for (t, w) in w.iter().enumerate() {
                    for i in 0..R {
                        // SAFETY: values 128j + 32t + 4p.. of the block.
                        let a = unsafe {
                            ys[i][b]
                                .qs
                                .as_ptr()
                                .add(128 * j + 32 * t + 4 * p)
                                .cast::<i32>()
                                .read_unaligned()
                        };
                        acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], *w, _mm512_set1_epi32(a));
                    }
                }
                if p % 4 == 3 {
                    for t in 0..4 {
                        // SAFETY: a group of 16's scales.
                        let s = unsafe { q6k_scale::<false>(g, 8 * j + 2 * t + p / 4) };
                        for i in 0..R {
                            isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(acc[i][t], s));
                            acc[i][t] = _mm512_setzero_si512();
                        }
                    }
                }
            }
        }
        for i in 0..R {
            let y = &ys[i][b];
            // The offset of 32: scale times the activations' sum, per group of 16.
            let mut o = _mm512_setzero_si512();
            for q in 0..16 {
                let bs = _mm512_set1_epi32(y.bsums[q] as u16 as i32);
                // SAFETY: group q's scales.
                o = _mm512_add_epi32(o, _mm512_madd_epi16(unsafe { q6k_scale::<true>(g, q) }, bs));
            }
            let is = _mm512_sub_epi32(isum[i], _mm512_slli_epi32::<5>(o));
            let r = _mm512_mul_ps(d, _mm512_cvtepi32_ps(is));
            row[i] = _mm512_fmadd_ps(r, _mm512_set1_ps(y.d), row[i]);
        }
    }
    for i in 0..R {
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(out[i].as_mut_ptr(), row[i]) };
    }
}

/// The first n words (of `at`'s, a multiple of 16) of row r's block (GGUF's bytes) into out, out of its interleaved
/// group's super-block `grp` (see `rows16`), where `at` places them for row 0: by gathers of
/// sixteen.
///
/// # Safety
/// The CPU has AVX-512 F; grp is a whole group's super-block whose words lie at `at` (+ 4r);
/// r < 16.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn words_of(grp: &[u8], r: usize, at: &[i32], n: usize, out: &mut [u8]) {
    assert!(r < 16 && n <= at.len() && at.len().is_multiple_of(16) && out.len() >= 4 * n);
    debug_assert!(at[..n]
        .iter()
        .all(|&a| a >= 0 && a as usize + 4 * r + 4 <= grp.len()));
    for h in (0..n).step_by(16) {
        let k: __mmask16 = if n - h >= 16 { !0 } else { (1 << (n - h)) - 1 };
        // SAFETY: sixteen indices; words h.. of row r (k of them) within grp (asserted) and
        // out.
        unsafe {
            let idx = _mm512_loadu_si512(at[h..h + 16].as_ptr().cast());
            let from = grp.as_ptr().add(4 * r);
            let v = _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), k, idx, from.cast());
            _mm512_mask_storeu_epi32(out.as_mut_ptr().add(4 * h).cast(), k, v);
        }
    }
}
