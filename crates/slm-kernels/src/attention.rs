//! Attention over an f16 key/value cache, for inference (the cache itself is slm-model's).
//!
//! Why by hand: the cache is stored in f16 (half the memory of f32, as llama.cpp does by
//! default), and how the arithmetic around it is done decides whether slm's greedy output
//! matches llama.cpp's. SmolLM2 is sensitive enough that rounding q/k/v to f16 or not moves
//! top logits by 0.1-0.3, so the order of operations follows llama.cpp's CPU flash-attention:
//! - fewer than `TILE_Q` new queries (decode, short prompts): the query is rounded to f16, dot
//!   products are f16 x f16 accumulated in f32, and softmax(QK)V is accumulated online in an
//!   f16 buffer (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`);
//! - `TILE_Q` or more (prefill of long prompts, perplexity): K and V widened to f32 and
//!   everything else in f32, over tiles of 64 queries and 64 keys, in the order of
//!   `ggml_compute_forward_flash_attn_ext_tiled` (`attend_tiled`); only one tile's scores
//!   exist at a time. Decode runs one task per (query, head) on the pool once the cache is
//!   long enough to share.
//!
//! Training does not come here: its attention is `train::attention`.

use half::f16;

use crate::ggml_math::Isa;

/// llama.cpp's GGML_FA_TILE_Q: below this many queries it takes the f16 path.
pub const TILE_Q: usize = 64;

/// Attention of `t` new queries `q` ((t, n_heads, hd) roped, f32 row-major) at positions
/// `past..past + t` over the cache's keys and values `k`, `v` ((past + t, n_kv, hd) in f16,
/// the new ones included): (t, n_heads * hd), causal.
#[allow(clippy::too_many_arguments)]
pub fn attend_cached(
    kc: &[f16],
    vc: &[f16],
    q: &[f32],
    t: usize,
    past: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
) -> Vec<f32> {
    let row = n_kv * hd;
    let len = past + t;
    assert!(kc.len() >= len * row && vc.len() >= len * row && q.len() >= t * n_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let rep = n_heads / n_kv;

    if t >= TILE_Q {
        return attend_tiled(kc, vc, q, t, past, n_heads, n_kv, hd, scale);
    }

    let mut out = vec![0f32; t * n_heads * hd];
    let o = crate::pool::OutPtr(out.as_mut_ptr());
    let one = |task: usize| {
        let (i, h) = (task / n_heads, task % n_heads);
        let visible = past + i + 1;
        let g = h / rep;
        let qrow = &q[(i * n_heads + h) * hd..][..hd];
        let q16: Vec<f32> = qrow.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let mut acc = vec![f16::ZERO; hd];
        let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
        for j in 0..visible {
            let krow = &kc[j * row + g * hd..][..hd];
            let s = crate::ggml_math::dot_f16(krow, &q16) * scale;
            let vrow = &vc[j * row + g * hd..][..hd];
            let (mut ms, mut vs) = (1f32, 1f32);
            if s > m {
                let old = m;
                m = s;
                ms = (old - m).exp();
                crate::ggml_math::scale_f16(&mut acc, ms);
            } else {
                vs = (s - m).exp();
            }
            crate::ggml_math::mad_f16(&mut acc, vrow, vs);
            s_sum = s_sum.mul_add(ms, vs); // contracted to FMA in ggml's build
        }
        let inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
        // SAFETY: (query i, head h) is written by this task only; out holds t * n_heads * hd.
        let dst = unsafe { std::slice::from_raw_parts_mut(o.get().add(task * hd), hd) };
        for (d, a) in dst.iter_mut().zip(&acc) {
            *d = a.to_f32() * inv;
        }
    };
    // One task per (query, head) on the kernel pool once there is enough to share: in decode
    // this was serial work on the calling thread while the other threads waited.
    if len * n_heads >= MIN_PARALLEL {
        crate::pool::global().run(t * n_heads, one);
    } else {
        (0..t * n_heads).for_each(one);
    }
    out
}

/// Keys times heads below which the f16 path stays on the calling thread (a section of the
/// pool costs a few microseconds).
const MIN_PARALLEL: usize = 256;

/// Keys per tile of the tiled path (llama.cpp's GGML_FA_TILE_KV).
const TILE_KV: usize = 64;

/// llama.cpp's tiled flash attention (`ggml_compute_forward_flash_attn_ext_tiled`), which
/// it runs for `TILE_Q` or more queries, in its arithmetic: queries in f32, keys and values
/// widened from f16, and per query over tiles of `TILE_KV` keys (aligned at key 0, a tile
/// skipped where the query sees none of it): scores as a chain of fused multiply-adds over
/// the head's dimensions, scaled, the keys it does not see at -inf; the running maximum
/// and sum rescaled by libm's `expf` when the maximum grows; the tile's exponentials and
/// their sum as ggml_vec_soft_max_f32 forms them (`ggml_math::soft_max`), the sum added in
/// f64 and rounded to f32; values accumulated as a chain of fused multiply-adds over the
/// tile's keys; at the end times the reciprocal of the sum. A query's result does not
/// depend on which queries share its tile, so tasks take (head, 64 queries) here.
#[allow(clippy::too_many_arguments)]
fn attend_tiled(
    k16: &[f16],
    v16: &[f16],
    q: &[f32],
    t: usize,
    past: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    let row = n_kv * hd;
    let (k32, v32) = widen(past + t, n_kv, hd, |pos, g| {
        let src = pos * row + g * hd;
        (&k16[src..src + hd], &v16[src..src + hd])
    });
    let isa = Isa::best();
    let mut out = vec![0f32; t * n_heads * hd];
    let o = crate::pool::OutPtr(out.as_mut_ptr());
    let q_tiles = t.div_ceil(TILE_Q);
    let shape = TiledShape {
        t,
        past,
        n_heads,
        n_kv,
        hd,
        scale,
    };
    crate::pool::global().run(n_heads * q_tiles, |task| {
        let (h, tile) = (task / q_tiles, task % q_tiles);
        let (i0, i1) = (tile * TILE_Q, ((tile + 1) * TILE_Q).min(t));
        // SAFETY: rows i0..i1 of head h are written by this task only, inside out's
        // t * n_heads * hd values (each row's hd values at (i * n_heads + h) * hd).
        let write = |i: usize, row: &[f32]| unsafe {
            std::slice::from_raw_parts_mut(o.get().add((i * n_heads + h) * hd), hd)
                .copy_from_slice(row)
        };
        let query = |i: usize| &q[(i * n_heads + h) * hd..][..hd];
        tiled(&k32, &v32, query, shape, h, i0..i1, isa, write);
    });
    out
}

/// A stored key or value element, widened to f32 exactly.
pub(crate) trait Element: Copy {
    fn f32(self) -> f32;
}

impl Element for f16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

impl Element for f32 {
    fn f32(self) -> f32 {
        self
    }
}

/// Keys and values widened to f32 (exact) for every task of one call, per key/value head:
/// the keys as transposed tiles ([head][tile][dimension][key], zero past the last key), the
/// values as rows ([head][position][dimension]). `kv(pos, g)`: the key and value of head g
/// at position pos, `hd` values each.
pub(crate) fn widen<'a, T: Element + 'a>(
    len: usize,
    n_kv: usize,
    hd: usize,
    kv: impl Fn(usize, usize) -> (&'a [T], &'a [T]),
) -> (Vec<f32>, Vec<f32>) {
    let tiles = len.div_ceil(TILE_KV);
    let mut k32 = vec![0f32; n_kv * tiles * hd * TILE_KV];
    let mut v32 = vec![0f32; n_kv * len * hd];
    for pos in 0..len {
        let (tile, tk) = (pos / TILE_KV, pos % TILE_KV);
        for g in 0..n_kv {
            let (kr, vr) = kv(pos, g);
            let kt = &mut k32[(g * tiles + tile) * hd * TILE_KV..][..hd * TILE_KV];
            for (d, x) in kr[..hd].iter().enumerate() {
                kt[d * TILE_KV + tk] = x.f32();
            }
            for (y, x) in v32[(g * len + pos) * hd..][..hd].iter_mut().zip(&vr[..hd]) {
                *y = x.f32();
            }
        }
    }
    (k32, v32)
}

/// The shape of one tiled call: `t` queries at positions `past..past + t` over `past + t`
/// keys (causal), `n_heads` query heads sharing `n_kv` key/value heads of `hd` dimensions.
#[derive(Clone, Copy)]
pub(crate) struct TiledShape {
    pub t: usize,
    pub past: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub hd: usize,
    pub scale: f32,
}

/// Head `h`'s queries `rows` (query i is `query(i)`) through every key tile of `widen`'s
/// keys and values, as `attend_tiled` describes; row i's result goes to `write(i, ..)`.
/// Compiled with FMA where the CPU has it (`isa`: `Isa::best()`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiled<'q>(
    k32: &[f32],
    v32: &[f32],
    query: impl Fn(usize) -> &'q [f32],
    shape: TiledShape,
    h: usize,
    rows: std::ops::Range<usize>,
    isa: Option<Isa>,
    write: impl Fn(usize, &[f32]),
) {
    #[cfg(target_arch = "x86_64")]
    if isa.is_some() {
        // SAFETY: Isa::best found AVX2 and FMA.
        return unsafe { tiled_task_fma(k32, v32, query, shape, h, rows, isa, write) };
    }
    tiled_task(k32, v32, query, shape, h, rows, isa, write)
}

/// `tiled_task` compiled with FMA, so its fused multiply-adds are instructions and its
/// loops vectorise. The arithmetic is the same in every build: each value is one chain of
/// fused multiply-adds in a fixed order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tiled_task_fma<'q>(
    k32: &[f32],
    v32: &[f32],
    query: impl Fn(usize) -> &'q [f32],
    s: TiledShape,
    h: usize,
    rows: std::ops::Range<usize>,
    isa: Option<Isa>,
    write: impl Fn(usize, &[f32]),
) {
    tiled_task(k32, v32, query, s, h, rows, isa, write)
}

/// Query rows whose scores and values a tile computes together (each loaded key and value
/// serves them all from registers).
const ROW_BLOCK: usize = 4;
/// Dimensions the AVX-512 values kernel accumulates in registers at a time (with
/// `ROW_BLOCK` rows: sixteen registers); other head sizes take the portable loop.
const LANES: usize = 64;
/// The same for the AVX2 kernel (eight of its sixteen registers).
const LANES_AVX2: usize = 16;

/// Head `h`'s queries `rows` through every key tile, as `attend_tiled` describes, over
/// `widen`'s keys and values; the tile products in AVX-512 registers when `isa` says so.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tiled_task<'q>(
    k32: &[f32],
    v32: &[f32],
    query: impl Fn(usize) -> &'q [f32],
    s: TiledShape,
    h: usize,
    rows: std::ops::Range<usize>,
    isa: Option<Isa>,
    write: impl Fn(usize, &[f32]),
) {
    let TiledShape {
        t,
        past,
        n_heads,
        n_kv,
        hd,
        scale,
    } = s;
    let g = h / (n_heads / n_kv);
    let len = past + t;
    let tiles = len.div_ceil(TILE_KV);
    let n = rows.len();
    let (mut m, mut sum) = (vec![f32::NEG_INFINITY; n], vec![0f32; n]);
    let mut acc = vec![0f32; n * hd];
    let mut qt = vec![[0f32; ROW_BLOCK]; hd];
    let last_key = past + rows.end - 1;
    for k0 in (0..=last_key).step_by(TILE_KV) {
        // This tile's keys, transposed ([dimension][key]), and its values ([key][dimension]).
        let kt = &k32[(g * tiles + k0 / TILE_KV) * hd * TILE_KV..][..hd * TILE_KV];
        let vt = &v32[(g * len + k0) * hd..(g * len + len) * hd];
        // The rows that see some key of this tile.
        let first = (k0 + 1).saturating_sub(past + 1 + rows.start).min(n);
        for b0 in (first..n).step_by(ROW_BLOCK) {
            let nb = ROW_BLOCK.min(n - b0);
            // The block's queries, transposed; a short block repeats its last row, so that
            // every loop below has a fixed length and its sums stay in registers (the
            // repeated rows' results are dropped).
            for b in 0..ROW_BLOCK {
                let qr = query(rows.start + b0 + b.min(nb - 1));
                for (col, &x) in qt.iter_mut().zip(qr) {
                    col[b] = x;
                }
            }
            // Scores: per (row, key) one chain of FMAs over the dimensions, from 0.
            let mut kq = [[0f32; TILE_KV]; ROW_BLOCK];
            scores(&mut kq, &qt, kt, isa);
            for (b, kb) in kq.iter_mut().enumerate().take(nb) {
                let r = b0 + b;
                let visible = past + rows.start + r + 1;
                for (j, x) in kb.iter_mut().enumerate() {
                    *x = if k0 + j < visible {
                        *x * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                let tile_max = kb
                    .iter()
                    .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
                let new = m[r].max(tile_max);
                if new > m[r] {
                    let ms = (m[r] - new).exp();
                    acc[r * hd..(r + 1) * hd].iter_mut().for_each(|x| *x *= ms);
                    sum[r] *= ms;
                }
                m[r] = new;
                sum[r] = (sum[r] as f64 + crate::ggml_math::soft_max(kb, new)) as f32;
            }
            // Values: per (row, dimension) one chain of FMAs over the tile's keys, onto
            // what the row holds. Keys no row of the block sees have probability 0, and
            // adding 0 times a value leaves a sum as it is: they are left out.
            let seen = (past + rows.start + b0 + nb - k0).min(TILE_KV);
            let vt = &vt[..seen * hd];
            values(&mut acc[b0 * hd..(b0 + nb) * hd], nb, hd, &kq, vt, isa);
        }
    }
    for (r, i) in rows.enumerate() {
        let inv = if sum[r] == 0.0 { 0.0 } else { 1.0 / sum[r] };
        let a = &mut acc[r * hd..(r + 1) * hd];
        a.iter_mut().for_each(|x| *x *= inv);
        write(i, a);
    }
}

/// kq[b][j] = Σ_d qt[d][b] · kt[d][j] (kt: `qt.len()` rows of a tile's keys): one chain of
/// fused multiply-adds per score, over the dimensions in order, from 0. Inlined so that it
/// takes `tiled_task_fma`'s features: compiled alone, each `mul_add` was a call to libm's fmaf.
#[inline(always)]
fn scores(
    kq: &mut [[f32; TILE_KV]; ROW_BLOCK],
    qt: &[[f32; ROW_BLOCK]],
    kt: &[f32],
    isa: Option<Isa>,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: Isa::best found AVX-512; kt holds qt.len() tile rows (asserted inside).
        Some(Isa::Avx512) => return unsafe { x86::scores(kq, qt, kt) },
        // SAFETY: Isa::best found AVX2 and FMA; as above.
        Some(Isa::Avx2) => return unsafe { x86::scores_avx2(kq, qt, kt) },
        None => {}
    }
    let _ = isa;
    for (d, qd) in qt.iter().enumerate() {
        let krow = &kt[d * TILE_KV..(d + 1) * TILE_KV];
        for (kb, &qv) in kq.iter_mut().zip(qd) {
            for (x, &kv) in kb.iter_mut().zip(krow) {
                *x = kv.mul_add(qv, *x);
            }
        }
    }
}

/// block[b][x] += Σ_kk kq[b][kk] · vt[kk][x] for the block's first `nb` rows of `hd` (vt:
/// whole rows of `hd`): one chain of fused multiply-adds per value, over the keys in order,
/// onto what the row holds. Inlined for the reason `scores` is.
#[inline(always)]
fn values(
    block: &mut [f32],
    nb: usize,
    hd: usize,
    kq: &[[f32; TILE_KV]; ROW_BLOCK],
    vt: &[f32],
    isa: Option<Isa>,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: Isa::best found AVX-512; the sizes are asserted inside.
        Some(Isa::Avx512) if hd.is_multiple_of(LANES) => {
            return unsafe { x86::values(block, nb, hd, kq, vt) }
        }
        // SAFETY: Isa::best found AVX2 and FMA; the sizes are asserted inside.
        Some(Isa::Avx2) if hd.is_multiple_of(LANES_AVX2) => {
            return unsafe { x86::values_avx2(block, nb, hd, kq, vt) }
        }
        _ => {}
    }
    let _ = isa;
    for (a, kb) in block.chunks_exact_mut(hd).take(nb).zip(kq) {
        for (&p, vrow) in kb.iter().zip(vt.chunks_exact(hd)) {
            for (x, &v) in a.iter_mut().zip(vrow) {
                *x = v.mul_add(p, *x);
            }
        }
    }
}

/// The tile's two products in AVX-512 registers (sixteen accumulators each) or AVX2 ones
/// (eight), the same chains of fused multiply-adds as the portable loops: the compiler kept
/// those sums in memory between steps.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{LANES_AVX2, ROW_BLOCK, TILE_KV};
    use std::arch::x86_64::*;

    /// kq[b][j] = Σ_d qt[d][b] · kt[d][j], one FMA per d in order, from 0.
    ///
    /// # Safety
    /// AVX-512F; `kt` holds `qt.len() * TILE_KV` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores(
        kq: &mut [[f32; TILE_KV]; ROW_BLOCK],
        qt: &[[f32; ROW_BLOCK]],
        kt: &[f32],
    ) {
        assert!(kt.len() >= qt.len() * TILE_KV);
        let mut acc = [_mm512_setzero_ps(); 16];
        for (d, qd) in qt.iter().enumerate() {
            let k = kt.as_ptr().add(d * TILE_KV);
            let kv = [
                _mm512_loadu_ps(k),
                _mm512_loadu_ps(k.add(16)),
                _mm512_loadu_ps(k.add(32)),
                _mm512_loadu_ps(k.add(48)),
            ];
            for (b, &q) in qd.iter().enumerate() {
                let qv = _mm512_set1_ps(q);
                for (c, &k) in kv.iter().enumerate() {
                    acc[b * 4 + c] = _mm512_fmadd_ps(k, qv, acc[b * 4 + c]);
                }
            }
        }
        for (b, row) in kq.iter_mut().enumerate() {
            for c in 0..4 {
                _mm512_storeu_ps(row.as_mut_ptr().add(c * 16), acc[b * 4 + c]);
            }
        }
    }

    /// block[b][x] += Σ_kk kq[b][kk] · vt[kk][x] for the first `nb` rows, one FMA per key
    /// in order onto what the row holds.
    ///
    /// # Safety
    /// AVX-512F; `hd` a multiple of 64, `block` `nb` rows and `vt` whole rows of `hd`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn values(
        block: &mut [f32],
        nb: usize,
        hd: usize,
        kq: &[[f32; TILE_KV]; ROW_BLOCK],
        vt: &[f32],
    ) {
        assert!(hd.is_multiple_of(64) && block.len() >= nb * hd && nb <= ROW_BLOCK);
        let seen = vt.len() / hd;
        assert!(seen <= TILE_KV);
        for c in (0..hd).step_by(64) {
            let mut acc = [_mm512_setzero_ps(); 16];
            for b in 0..nb {
                for l in 0..4 {
                    acc[b * 4 + l] = _mm512_loadu_ps(block.as_ptr().add(b * hd + c + l * 16));
                }
            }
            for kk in 0..seen {
                let v = vt.as_ptr().add(kk * hd + c);
                let vv = [
                    _mm512_loadu_ps(v),
                    _mm512_loadu_ps(v.add(16)),
                    _mm512_loadu_ps(v.add(32)),
                    _mm512_loadu_ps(v.add(48)),
                ];
                for (b, kb) in kq.iter().enumerate() {
                    let p = _mm512_set1_ps(kb[kk]);
                    for (l, &x) in vv.iter().enumerate() {
                        acc[b * 4 + l] = _mm512_fmadd_ps(x, p, acc[b * 4 + l]);
                    }
                }
            }
            for b in 0..nb {
                for l in 0..4 {
                    _mm512_storeu_ps(block.as_mut_ptr().add(b * hd + c + l * 16), acc[b * 4 + l]);
                }
            }
        }
    }

    /// `scores` with AVX2 and FMA: sixteen keys of the tile at a time for the block's rows.
    ///
    /// # Safety
    /// AVX2 and FMA; `kt` holds `qt.len() * TILE_KV` values.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores_avx2(
        kq: &mut [[f32; TILE_KV]; ROW_BLOCK],
        qt: &[[f32; ROW_BLOCK]],
        kt: &[f32],
    ) {
        assert!(kt.len() >= qt.len() * TILE_KV);
        for c in (0..TILE_KV).step_by(16) {
            let mut acc = [_mm256_setzero_ps(); 2 * ROW_BLOCK];
            for (d, qd) in qt.iter().enumerate() {
                let k = kt.as_ptr().add(d * TILE_KV + c);
                let kv = [_mm256_loadu_ps(k), _mm256_loadu_ps(k.add(8))];
                for (b, &q) in qd.iter().enumerate() {
                    let qv = _mm256_set1_ps(q);
                    for (l, &k) in kv.iter().enumerate() {
                        acc[b * 2 + l] = _mm256_fmadd_ps(k, qv, acc[b * 2 + l]);
                    }
                }
            }
            for (b, row) in kq.iter_mut().enumerate() {
                for l in 0..2 {
                    _mm256_storeu_ps(row.as_mut_ptr().add(c + l * 8), acc[b * 2 + l]);
                }
            }
        }
    }

    /// `values` with AVX2 and FMA: sixteen dimensions at a time.
    ///
    /// # Safety
    /// AVX2 and FMA; `hd` a multiple of 16, `block` `nb` rows and `vt` whole rows of `hd`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn values_avx2(
        block: &mut [f32],
        nb: usize,
        hd: usize,
        kq: &[[f32; TILE_KV]; ROW_BLOCK],
        vt: &[f32],
    ) {
        assert!(hd.is_multiple_of(LANES_AVX2) && block.len() >= nb * hd && nb <= ROW_BLOCK);
        let seen = vt.len() / hd;
        assert!(seen <= TILE_KV);
        for c in (0..hd).step_by(LANES_AVX2) {
            let mut acc = [_mm256_setzero_ps(); 2 * ROW_BLOCK];
            for b in 0..nb {
                for l in 0..2 {
                    acc[b * 2 + l] = _mm256_loadu_ps(block.as_ptr().add(b * hd + c + l * 8));
                }
            }
            for kk in 0..seen {
                let v = vt.as_ptr().add(kk * hd + c);
                let vv = [_mm256_loadu_ps(v), _mm256_loadu_ps(v.add(8))];
                for (b, kb) in kq.iter().enumerate() {
                    let p = _mm256_set1_ps(kb[kk]);
                    for (l, &x) in vv.iter().enumerate() {
                        acc[b * 2 + l] = _mm256_fmadd_ps(x, p, acc[b * 2 + l]);
                    }
                }
            }
            for b in 0..nb {
                for l in 0..2 {
                    _mm256_storeu_ps(block.as_mut_ptr().add(b * hd + c + l * 8), acc[b * 2 + l]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Keys and values so far, as slm-model's layer cache holds them.
    #[derive(Default)]
    struct Cache {
        k: Vec<f16>,
        v: Vec<f16>,
        len: usize,
    }

    impl Cache {
        #[allow(clippy::too_many_arguments)]
        fn attend(
            &mut self,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            t: usize,
            nh: usize,
            nkv: usize,
            hd: usize,
        ) -> Vec<f32> {
            self.k.extend(k.iter().map(|&x| f16::from_f32(x)));
            self.v.extend(v.iter().map(|&x| f16::from_f32(x)));
            self.len += t;
            attend_cached(&self.k, &self.v, q, t, self.len - t, nh, nkv, hd)
        }
    }

    /// Causal attention in f64 over the same f16-rounded keys and values, per (query, head).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        k: &[f16],
        v: &[f16],
        q: &[f32],
        t: usize,
        past: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
    ) -> Vec<f64> {
        let (row, rep) = (nkv * hd, nh / nkv);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0f64; t * nh * hd];
        for i in 0..t {
            for h in 0..nh {
                let g = h / rep;
                let qr = &q[(i * nh + h) * hd..][..hd];
                let s: Vec<f64> = (0..past + i + 1)
                    .map(|j| {
                        let kr = &k[j * row + g * hd..][..hd];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * b.to_f64())
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for d in 0..hd {
                        out[(i * nh + h) * hd + d] += p / sum * v[j * row + g * hd + d].to_f64();
                    }
                }
            }
        }
        out
    }

    /// The decode path (t < TILE_Q) over a cache long enough to run on the pool: within the
    /// f16 accumulator's rounding of the f64 reference (measured max 1.2e-3 here), while
    /// letting one more key in (an off-by-one mask) moves outputs by far more.
    #[test]
    fn decode_attention_on_the_pool_matches_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (nh, nkv, hd) = (6, 2, 20);
        let mut cache = Cache::default();
        let mut rand_vec =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2f32..2.0)).collect() };
        let past = 60;
        assert!(past * nh >= MIN_PARALLEL && past < TILE_Q);
        let (q0, k0, v0) = (
            rand_vec(past * nh * hd),
            rand_vec(past * nkv * hd),
            rand_vec(past * nkv * hd),
        );
        cache.attend(&q0, &k0, &v0, past, nh, nkv, hd);
        let t = 3;
        let (q, k, v) = (
            rand_vec(t * nh * hd),
            rand_vec(t * nkv * hd),
            rand_vec(t * nkv * hd),
        );
        let y = cache.attend(&q, &k, &v, t, nh, nkv, hd);
        let want = reference(&cache.k, &cache.v, &q, t, past, nh, nkv, hd);
        let err = y
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0f64, f64::max);
        assert!(err < 4e-3, "max error {err}");
        // The first query seeing one key too many (the second's own key), as a wrong mask would.
        let leaky = reference(&cache.k, &cache.v, &q[..nh * hd], 1, past + 1, nh, nkv, hd);
        let moved = y[..nh * hd]
            .iter()
            .zip(&leaky)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0f64, f64::max);
        assert!(
            moved > 10.0 * 4e-3,
            "an extra key moved outputs by only {moved}"
        );
    }

    /// The tiled path's portable loops and its AVX-512 and AVX2 kernels give the same bits
    /// (the property tests of every kernel set the CPU has), on a cache that ends inside a
    /// tile.
    #[test]
    fn tiled_attention_is_the_same_in_every_build() {
        for isa in Isa::available() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            let (nh, nkv, hd, past, t) = (6, 2, 64, 37, TILE_Q + 70);
            let len = past + t;
            let mut r =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2f32..2.0)).collect() };
            let k: Vec<f16> = r(len * nkv * hd).into_iter().map(f16::from_f32).collect();
            let v: Vec<f16> = r(len * nkv * hd).into_iter().map(f16::from_f32).collect();
            let q = r(t * nh * hd);
            let row = nkv * hd;
            let (k32, v32) = widen(len, nkv, hd, |pos, g| {
                let src = pos * row + g * hd;
                (&k[src..src + hd], &v[src..src + hd])
            });
            let shape = TiledShape {
                t,
                past,
                n_heads: nh,
                n_kv: nkv,
                hd,
                scale: 0.125,
            };
            for h in 0..nh {
                for rows in [0..TILE_Q, TILE_Q..t] {
                    let run = |fast: bool| {
                        let out = std::cell::RefCell::new(vec![0f32; t * hd]);
                        let write = |i: usize, row: &[f32]| {
                            out.borrow_mut()[i * hd..(i + 1) * hd].copy_from_slice(row)
                        };
                        let isa = fast.then_some(isa);
                        let query = |i: usize| &q[(i * nh + h) * hd..][..hd];
                        tiled_task(&k32, &v32, query, shape, h, rows.clone(), isa, write);
                        out.into_inner()
                    };
                    let (a, b) = (run(true), run(false));
                    assert!(
                        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{isa:?} head {h} rows {rows:?}"
                    );
                }
            }
        }
    }

    /// The long-prompt path (t >= TILE_Q), after a short first call filled part of the cache:
    /// grouped heads, a head size with a tail of eight, queries not a multiple of a task.
    #[test]
    fn long_prompt_attention_matches_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (nh, nkv, hd) = (6, 2, 20);
        let mut cache = Cache::default();
        let mut rand_vec =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2f32..2.0)).collect() };
        let (q0, k0, v0) = (
            rand_vec(5 * nh * hd),
            rand_vec(5 * nkv * hd),
            rand_vec(5 * nkv * hd),
        );
        cache.attend(&q0, &k0, &v0, 5, nh, nkv, hd);
        let t = TILE_Q + 7;
        let (q, k, v) = (
            rand_vec(t * nh * hd),
            rand_vec(t * nkv * hd),
            rand_vec(t * nkv * hd),
        );
        let y = cache.attend(&q, &k, &v, t, nh, nkv, hd);
        let want = reference(&cache.k, &cache.v, &q, t, 5, nh, nkv, hd);
        for (idx, (a, b)) in y.iter().zip(&want).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-5, "element {idx}: {a} vs {b}");
        }
    }
}
