//! Matrix multiplication with K-quant weights (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), computing
//! llama.cpp's arithmetic bit for bit, as `quant` does for the 32-blocks.
//!
//! Activations are quantized once per matmul to Q8_K (ggml's `quantize_row_q8_K_ref`: 256
//! values, an f32 scale, sums of 16). The integer part of every dot product is exact; what
//! has to match llama.cpp is where its floats round, and its x86 build rounds in three ways,
//! chosen per matmul (`Sum::of`):
//!
//! - `Sum::Lanes`, its dot products (`ggml_vec_dot_qN_K_q8_K`, AVX2), for batches of fewer
//!   than 8 rows: per super-block, eight int32 lanes (lane p holds bytes 4p..4p+3 of every 32
//!   values, times their scales), each converted to f32 and fused-multiply-added with the
//!   block scale into eight float accumulators, reduced at the end as `hsum_float_8`. Mins,
//!   where the type has them, take a path of their own (per type, below).
//! - `Sum::Rows`, its repacked 8-row kernels (`ggml_gemv/gemm_qN_K_8x8_q8_K`), which it uses
//!   for every batch of Q4_K (AVX2) and Q2_K (AVX-512) matrices with a multiple of 8 rows: per
//!   chunk of values, the chunk's whole integer sum and whole min term, each fused into one
//!   float accumulator with the scales multiplied first; the value is their difference. The
//!   chunk is the super-block in the gemv (a batch's last m % 4 rows) and smaller in the gemm
//!   (the rest: 64 values for Q4_K, 128 for Q2_K).
//! - `Sum::Tiled`, its tiled K-quant matmul (`ggml-cpu/tiled`) for batches of 8 rows or more
//!   of the other matrices: per super-block `d * isum - dmin * imin` (one fused rounding),
//!   fused-multiply-added with the activation scale into the accumulator. (Its AVX-512 kernel
//!   writes that last step as a product and a sum, which GCC contracts into one FMA: measured
//!   against the built library, the unfused form differs in half the outputs.)
//!
//! The scalar functions here are the reference the SIMD kernels must equal: `avx2`'s dot
//! products (one weight row against up to four activation rows, every sum), and, where the
//! CPU has AVX-512 VNNI, `avx512`'s kernel for whole groups of sixteen activation rows summed
//! as `Tiled` or `Rows` (the rows in the lanes, so a scale multiplies sixteen rows' sums at
//! once). The weights stay in GGUF's block layout (one copy, the file's bytes): it is the
//! activations that are rearranged, once per matmul, into the groups' interleaved form.
//! Except where the CPU has AVX2 or AVX-512: there the rows of every K-quant matrix of a
//! multiple of 16 rows are interleaved sixteen at a time at load (`rows16`, the same bytes
//! moved), and kernels holding weight rows in the lanes take decode and batches (`avx512`'s
//! sixteen rows to a register, `avx2_rows16`'s eight; with AVX-512, Q2_K's, Q3_K's and Q6_K's
//! batches up to a few groups, `rows16_min_groups`).

use candle_core::quantized::GgmlDType;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use std::mem::MaybeUninit;
use std::sync::Arc;

use crate::ggml_math::Isa;
use crate::pool::OutPtr;
use crate::quant::{f16_at, hsum8};
use crate::scratch::MapError;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_rows16;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod rows16;

/// Values per K-quant super-block.
pub const QK_K: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KType {
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl KType {
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q2K => Self::Q2K,
            GgmlDType::Q3K => Self::Q3K,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }
    pub fn to_ggml(self) -> GgmlDType {
        match self {
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }
    /// Bytes per super-block of 256 weights.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }
    /// Where a block keeps its f16 scale `d` and, for the types with mins, `dmin`.
    pub(crate) fn scales_at(self) -> (usize, Option<usize>) {
        match self {
            Self::Q2K => (80, Some(82)),
            Self::Q3K => (108, None),
            Self::Q4K | Self::Q5K => (0, Some(2)),
            Self::Q6K => (208, None),
        }
    }
}

/// How llama.cpp sums one row of a matmul (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sum {
    Lanes,
    /// Chunks of this many values (64, 128 or 256).
    Rows(usize),
    Tiled,
}

impl Sum {
    /// llama.cpp's choice for row i of an m-row batch times an n-row matrix of `t`
    /// (`ggml_repack_get_optimal_repack_type`, the repacked matmul's split into groups of 4
    /// rows and a remainder, and the tiled matmul's batch floor of 8, on x86), in the build
    /// that `ggml_math::flavor` reproduces, whatever this CPU: Q4_K is repacked in both, Q2_K
    /// only with AVX-512. So a model's outputs do not depend on the machine.
    pub(crate) fn of(t: KType, n: usize, m: usize, i: usize) -> Self {
        use crate::ggml_math::{flavor, Flavor};
        let repacked = match t {
            KType::Q4K => true,
            KType::Q2K => flavor() == Flavor::Avx512,
            _ => false,
        } && n.is_multiple_of(8);
        if repacked {
            if i < m - m % 4 {
                Sum::Rows(if t == KType::Q4K { 64 } else { 128 })
            } else {
                Sum::Rows(QK_K)
            }
        } else if m >= 8 {
            Sum::Tiled
        } else {
            Sum::Lanes
        }
    }
}

/// One super-block of activations as ggml's block_q8_K.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Q8K {
    pub(crate) d: f32,
    pub(crate) qs: [i8; QK_K],
    /// Sums of each 16 consecutive `qs`.
    pub(crate) bsums: [i16; 16],
}

// SAFETY: numbers only; any bits are a block.
unsafe impl crate::scratch::Plain for Q8K {}

/// ggml's `quantize_row_q8_K_ref` (which its x86 build runs, and whose values its repacked
/// kernels' quantizer reproduces): the scale from the value of largest magnitude, first
/// found, `-127/max`; round half to even.
pub(crate) fn quantize_row_q8k(x: &[f32], out: &mut [Q8K]) {
    #[cfg(target_arch = "x86_64")]
    if crate::ggml_math::has_avx2() {
        // SAFETY: the CPU has the features.
        return unsafe { avx2::quantize_row_q8k(x, out) };
    }
    quantize_row_q8k_portable(x, out)
}

/// `quantize_row_q8k` in plain Rust. Its rounding part, `quantize_block_q8k`, is also compiled
/// with AVX2 enabled, by `avx2::quantize_row_q8k`, where the rounding is one instruction instead
/// of a call.
#[inline(always)]
pub(crate) fn quantize_row_q8k_portable(x: &[f32], out: &mut [Q8K]) {
    for (xs, y) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            y.d = 0.0;
            y.qs = [0; QK_K];
            y.bsums = [0; 16];
            continue;
        }
        quantize_block_q8k(xs, max, y);
    }
}

/// One block of `quantize_row_q8k` once its value of largest magnitude (`max`, not 0) is
/// known: the values, their sums of 16 and the scale.
#[inline(always)]
pub(crate) fn quantize_block_q8k(xs: &[f32], max: f32, y: &mut Q8K) {
    let iscale = -127.0 / max;
    for (q, &v) in y.qs.iter_mut().zip(xs) {
        *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    for (s, g) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
        *s = g.iter().map(|&q| q as i16).sum();
    }
    y.d = 1.0 / iscale;
}

/// Q4_K's and Q5_K's eight 6-bit scales and mins (`get_scale_min_k4`, computed as ggml's
/// dot products unpack them: four words at a time).
#[inline(always)]
pub(crate) fn scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    const KMASK1: u32 = 0x3f3f3f3f;
    const KMASK2: u32 = 0x0f0f0f0f;
    const KMASK3: u32 = 0x03030303;
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    let sc = (u0 & KMASK1) as u64 | ((((u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4)) as u64) << 32);
    let mn = (u1 & KMASK1) as u64
        | (((((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4)) as u64) << 32);
    (sc.to_le_bytes(), mn.to_le_bytes())
}

/// Q3_K's sixteen 6-bit scales, offset to signed.
pub(crate) fn scales_q3k(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for j in 0..16 {
        let low = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        out[j] = (low | high << 4) as i8 - 32;
    }
    out
}

/// A super-block's 256 weights as the integers the dot products multiply, and the scale
/// of each group of 16 (Q4_K/Q5_K scales cover 32 values and are repeated).
fn unpack(t: KType, b: &[u8], w: &mut [i8; QK_K], sc: &mut [i32; 16]) {
    match t {
        KType::Q2K => {
            for (g, s) in sc.iter_mut().enumerate() {
                *s = (b[g] & 0xF) as i32;
            }
            let qs = &b[16..80];
            for (v, w) in w.iter_mut().enumerate() {
                let (j, s, l) = (v / 128, (v % 128) / 32, v % 32);
                *w = ((qs[32 * j + l] >> (2 * s)) & 3) as i8;
            }
        }
        KType::Q3K => {
            let scales = scales_q3k(&b[96..108]);
            for (g, s) in sc.iter_mut().enumerate() {
                *s = scales[g] as i32;
            }
            let (hmask, qs) = (&b[0..32], &b[32..96]);
            for (v, w) in w.iter_mut().enumerate() {
                let (j, s, l) = (v / 128, (v % 128) / 32, v % 32);
                let low = ((qs[32 * j + l] >> (2 * s)) & 3) as i8;
                let high = hmask[l] >> (4 * j + s) & 1;
                *w = low - if high == 0 { 4 } else { 0 };
            }
        }
        KType::Q4K | KType::Q5K => {
            let (scales, _) = scales_mins_k4(&b[4..16]);
            for (g, s) in sc.iter_mut().enumerate() {
                *s = scales[g / 2] as i32;
            }
            let (qh, qs) = if t == KType::Q5K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            for (v, w) in w.iter_mut().enumerate() {
                let (j, half, l) = (v / 64, (v % 64) / 32, v % 32);
                let nibble = (qs[32 * j + l] >> (4 * half)) & 0xF;
                let high = qh.map_or(0, |h| (h[l] >> (2 * j + half)) & 1);
                *w = (nibble | high << 4) as i8;
            }
        }
        KType::Q6K => {
            for (g, s) in sc.iter_mut().enumerate() {
                *s = b[192 + g] as i8 as i32;
            }
            let (ql, qh) = (&b[0..128], &b[128..192]);
            for (v, w) in w.iter_mut().enumerate() {
                let (j, t, l) = (v / 128, (v % 128) / 32, v % 32);
                let low = ql[64 * j + 32 * (t % 2) + l] >> (4 * (t / 2)) & 0xF;
                let high = (qh[32 * j + l] >> (2 * t)) & 3;
                // Unsigned here; the 32 is subtracted through the activation sums.
                *w = (low | high << 4) as i8;
            }
        }
    }
}

/// The eight int32 lanes of a super-block's dot product: lane p sums the values whose
/// position within their 32 is 4p..4p+3, each times its group's scale.
fn lanes(w: &[i8; QK_K], sc: &[i32; 16], q8: &[i8; QK_K]) -> [i32; 8] {
    let mut l = [0i32; 8];
    for v in 0..QK_K {
        l[(v % 32) / 4] += sc[v / 16] * w[v] as i32 * q8[v] as i32;
    }
    l
}

/// A block's two scales as floats: (d, dmin) (dmin 0 for the types without mins).
fn block_scales(t: KType, b: &[u8]) -> (f32, f32) {
    let (d, dmin) = t.scales_at();
    (f16_at(b, d), dmin.map_or(0.0, |at| f16_at(b, at)))
}

/// The integers of the min term per group of 16 values: min * (sum of the activations it
/// covers). Q4_K and Q5_K have one min per 32, put on the first group of its two; Q6_K's
/// offset of 32 is a min of its own kind (`offset_term`); the others have none.
fn group_mins(t: KType, b: &[u8], y: &Q8K) -> [i32; 16] {
    let mut g = [0i32; 16];
    match t {
        KType::Q2K => {
            for (i, g) in g.iter_mut().enumerate() {
                *g = (b[i] >> 4) as i32 * y.bsums[i] as i32;
            }
        }
        KType::Q4K | KType::Q5K => {
            let (_, m) = scales_mins_k4(&b[4..16]);
            for i in 0..8 {
                g[2 * i] = m[i] as i32 * (y.bsums[2 * i] as i32 + y.bsums[2 * i + 1] as i32);
            }
        }
        _ => {}
    }
    g
}

/// Q6_K's offset: 32 * sum over groups of scale * (sum of the group's activations), which its
/// kernels subtract from the products of the unsigned values.
fn offset_term(b: &[u8], y: &Q8K) -> i32 {
    (0..16)
        .map(|g| b[192 + g] as i8 as i32 * y.bsums[g] as i32)
        .sum::<i32>()
        << 5
}

/// The float state of one dot product (one cell) across super-blocks.
#[derive(Clone, Copy)]
struct Cell {
    lanes: [f32; 8],
    mins: [f32; 4],
    row: f32,
    row_min: f32,
}

impl Cell {
    const ZERO: Cell = Cell {
        lanes: [0.0; 8],
        mins: [0.0; 4],
        row: 0.0,
        row_min: 0.0,
    };

    /// Adds one super-block as `sum` does, given its integers: `lanes` (after Q6_K's offset,
    /// for `Sum::Lanes`), the exact totals of its chunks (`chunks`, 256 / chunk of them;
    /// one for the other sums, the whole block, Q6_K's offset off), and its group mins.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        t: KType,
        sum: Sum,
        (d, dmin): (f32, f32),
        y: &Q8K,
        lanes: &[i32; 8],
        chunks: &[i32],
        gm: &[i32; 16],
    ) {
        match sum {
            Sum::Rows(chunk) => {
                let per = QK_K / chunk;
                for (c, &isum) in chunks.iter().enumerate() {
                    let imin: i32 = gm[c * 16 / per..(c + 1) * 16 / per].iter().sum();
                    self.row = (isum as f32).mul_add(d * y.d, self.row);
                    self.row_min = (imin as f32).mul_add(dmin * y.d, self.row_min);
                }
            }
            Sum::Tiled => {
                let isum = chunks[0];
                let imin: i32 = gm.iter().sum();
                let mut r = d * isum as f32;
                if matches!(t, KType::Q2K | KType::Q4K | KType::Q5K) {
                    r = (-dmin).mul_add(imin as f32, r);
                }
                self.row = r.mul_add(y.d, self.row);
            }
            Sum::Lanes => {
                let dy = y.d * d;
                let dminy = -y.d * dmin;
                match t {
                    KType::Q2K => {
                        // Mins first, into the same lanes: lane p takes groups 2p and 2p+1.
                        for (p, acc) in self.lanes.iter_mut().enumerate() {
                            let m = gm[2 * p] + gm[2 * p + 1];
                            *acc = dminy.mul_add(m as f32, *acc);
                        }
                    }
                    KType::Q4K => {
                        // Four float lanes of their own: lane q takes sub-blocks 2q and 2q+1.
                        for (q, a) in self.mins.iter_mut().enumerate() {
                            let m = gm[4 * q] + gm[4 * q + 2];
                            *a = dminy.mul_add(m as f32, *a);
                        }
                    }
                    KType::Q5K => {
                        let m: i32 = gm.iter().sum();
                        self.mins[0] = dminy.mul_add(m as f32, self.mins[0]);
                    }
                    KType::Q3K | KType::Q6K => {}
                }
                for (acc, &l) in self.lanes.iter_mut().zip(lanes) {
                    *acc = dy.mul_add(l as f32, *acc);
                }
            }
        }
    }

    /// The dot product once every super-block is in.
    fn value(&self, t: KType, sum: Sum) -> f32 {
        let m = &self.mins;
        match (sum, t) {
            (Sum::Rows(_), _) => self.row - self.row_min,
            (Sum::Tiled, _) => self.row,
            (Sum::Lanes, KType::Q4K) => hsum8(&self.lanes) + ((m[0] + m[2]) + (m[1] + m[3])),
            (Sum::Lanes, KType::Q5K) => hsum8(&self.lanes) + m[0],
            (Sum::Lanes, _) => hsum8(&self.lanes),
        }
    }
}

/// The dot product of one weight row (GGUF blocks) with one row of activations: the
/// reference every kernel equals bit for bit.
pub(crate) fn dot_row(t: KType, sum: Sum, row: &[u8], a: &[Q8K]) -> f32 {
    let (mut w, mut sc) = ([0i8; QK_K], [0i32; 16]);
    let mut cell = Cell::ZERO;
    for (b, y) in row.chunks_exact(t.block_bytes()).zip(a) {
        unpack(t, b, &mut w, &mut sc);
        let mut l = lanes(&w, &sc, &y.qs);
        let chunk = match sum {
            Sum::Rows(c) => c,
            _ => QK_K,
        };
        let mut chunks: Vec<i32> = (0..QK_K / chunk)
            .map(|c| {
                (c * chunk..(c + 1) * chunk)
                    .map(|v| sc[v / 16] * w[v] as i32 * y.qs[v] as i32)
                    .sum::<i32>()
            })
            .collect();
        if t == KType::Q6K {
            // Q6_K's offset of 32: out of the whole block's sum, and, for its dot products,
            // out of each lane as they take it.
            chunks[0] -= offset_term(b, y);
            for (p, l) in l.iter_mut().enumerate() {
                let s =
                    y.bsums[2 * p] as i32 * sc[2 * p] + y.bsums[2 * p + 1] as i32 * sc[2 * p + 1];
                *l -= s << 5;
            }
        }
        let gm = group_mins(t, b, y);
        cell.add(t, sum, block_scales(t, b), y, &l, &chunks, &gm);
    }
    cell.value(t, sum)
}

/// A weight matrix in K-quant super-blocks (n rows of k, GGUF's bytes), applied as a candle
/// op (inference only).
#[derive(Debug, Clone)]
pub struct KMatrix {
    pub t: KType,
    /// GGUF's blocks, or (`interleaved`) the same bytes in `rows16`'s layout.
    bytes: Arc<Vec<u8>>,
    interleaved: bool,
    pub n: usize,
    pub k: usize,
}

impl KMatrix {
    /// `gguf`: n rows of k values in `t`'s super-blocks, as stored in a GGUF file. Matrices of a
    /// multiple of 16 rows are interleaved (`rows16`) where the CPU has
    /// AVX-512.
    pub fn new(t: KType, gguf: &[u8], n: usize, k: usize) -> Self {
        let kb = k / QK_K;
        assert!(k.is_multiple_of(QK_K) && gguf.len() == n * kb * t.block_bytes());
        let interleaved = rows16::applies(n);
        Self {
            t,
            bytes: Arc::new(if interleaved {
                rows16::interleave(t, gguf, n, kb)
            } else {
                gguf.to_vec()
            }),
            interleaved,
            n,
            k,
        }
    }

    /// The weights in GGUF block order.
    pub fn gguf_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        if !self.interleaved {
            return std::borrow::Cow::Borrowed(&self.bytes);
        }
        let mut all = Vec::with_capacity(self.bytes.len());
        let mut row = Vec::new();
        for j in 0..self.n {
            all.extend_from_slice(self.gguf_row(j, &mut row));
        }
        std::borrow::Cow::Owned(all)
    }

    /// Row j in GGUF's blocks: the stored bytes, or rebuilt into `buf` from the interleaved
    /// layout.
    pub(crate) fn gguf_row<'a>(&'a self, j: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
        let kb = self.k / QK_K;
        if self.interleaved {
            rows16::gguf_row(self.t, &self.bytes, kb, j, buf);
            buf
        } else {
            let rb = kb * self.t.block_bytes();
            &self.bytes[j * rb..(j + 1) * rb]
        }
    }

    /// Row j widened to f32 by candle's dequantization (ggml's `dequantize_row_*`).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        use candle_core::quantized::k_quants::*;
        fn widen<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
            // The f16 fields of a block want 2-byte alignment that the file's bytes need not
            // have: copied into blocks first.
            let mut blocks = vec![T::zeros(); bytes.len() / std::mem::size_of::<T>()];
            assert_eq!(blocks.len() * std::mem::size_of::<T>(), bytes.len());
            // SAFETY: the block types are plain old data of block_bytes each (every bit
            // pattern a value); lengths equal.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    blocks.as_mut_ptr().cast::<u8>(),
                    bytes.len(),
                )
            };
            T::to_float(&blocks, out);
        }
        let mut buf = Vec::new();
        let row = self.gguf_row(j, &mut buf);
        let out = &mut out[..self.k];
        match self.t {
            KType::Q2K => widen::<BlockQ2K>(row, out),
            KType::Q3K => widen::<BlockQ3K>(row, out),
            KType::Q4K => widen::<BlockQ4K>(row, out),
            KType::Q5K => widen::<BlockQ5K>(row, out),
            KType::Q6K => widen::<BlockQ6K>(row, out),
        }
    }

    /// x (m, k) times the transpose of these weights into out (m, n); every value written.
    pub fn matmul(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [MaybeUninit<f32>],
    ) -> Result<(), MapError> {
        self.matmul_with(x, m, out, Isa::best(), None)
    }

    /// `matmul` with the kernels of `isa` and, if given, one way of summing for every row
    /// (the tests run every combination).
    fn matmul_with(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [MaybeUninit<f32>],
        isa: Option<Isa>,
        sum: Option<Sum>,
    ) -> Result<(), MapError> {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= m * k && out.len() >= m * n);
        if m == 0 || n == 0 {
            return Ok(());
        }
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut s) => self.matmul_in(x, m, out, isa, sum, &mut s),
            Err(_) => self.matmul_in(x, m, out, isa, sum, &mut Default::default()),
        })
    }

    /// `matmul_with`, the activations quantized into `scratch`.
    fn matmul_in(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [MaybeUninit<f32>],
        isa: Option<Isa>,
        sum: Option<Sum>,
        scratch: &mut Scratch,
    ) -> Result<(), MapError> {
        let (n, k) = (self.n, self.k);
        let kb = k / QK_K;
        let act: &mut [Q8K] = scratch.act.slice(m * kb)?;
        crate::pool::for_chunks(act, kb, |start, row| {
            let i = start / kb;
            quantize_row_q8k(&x[i * k..(i + 1) * k], row)
        });
        let act = &*act;
        let sum_of = |i: usize| sum.unwrap_or_else(|| Sum::of(self.t, n, m, i));
        // The AVX-512 kernels take whole groups of rows that share a sum they compute:
        // a prefix of the batch (the rows whose sum differs are its last few).
        #[cfg(target_arch = "x86_64")]
        let groups = {
            let s0 = sum_of(0);
            let ng = if isa == Some(Isa::Avx512) && avx512::takes(self.t, s0) {
                use avx512::GROUP;
                (0..m / GROUP)
                    .take_while(|g| (GROUP * g..GROUP * (g + 1)).all(|i| sum_of(i) == s0))
                    .count()
            } else {
                0
            };
            // Interleaved rows take their own kernel instead (`rows16_span`) until there are
            // enough groups to repay unpacking their rows out of the interleaved layout.
            let ng = if self.interleaved && ng < rows16_min_groups(self.t) {
                0
            } else {
                ng
            };
            let g = scratch.groups.slice(ng * kb)?;
            avx512::interleave(act, kb, ng, g);
            (s0, &*g)
        };
        let pool = crate::pool::global();
        let align = if self.interleaved { rows16::ROWS } else { 4 };
        let spans: Vec<_> = pool.spans(n, align).collect();
        let o = OutPtr(out.as_mut_ptr().cast::<f32>());
        pool.run(spans.len(), |s| {
            let rows = spans[s].clone();
            #[allow(unused_mut)]
            let mut first = 0;
            #[cfg(target_arch = "x86_64")]
            if !groups.1.is_empty() {
                // SAFETY: spans are disjoint output columns; out holds m * n values; the
                // groups were formed only for AVX-512 and a sum the kernels take.
                unsafe { avx512::span(self, groups.0, groups.1, rows.clone(), o.get()) };
                first = groups.1.len() / kb * avx512::GROUP;
            }
            #[cfg(target_arch = "x86_64")]
            if let (true, Some(isa)) = (self.interleaved, isa) {
                return self.rows16_span(isa, act, first..m, rows, o, &sum_of);
            }
            // SAFETY: as above.
            unsafe { self.span(act, first..m, rows, o.get(), isa, &sum_of) }
        });
        Ok(())
    }

    /// Rows `rows` of the weights against activation rows `acts` by dot products, cell
    /// (i, j) to out[i * n + j]; `sum_of(i)` is row i's way of summing.
    ///
    /// # Safety
    /// out holds the batch's rows times n values and no other thread writes columns `rows`.
    unsafe fn span(
        &self,
        act: &[Q8K],
        acts: std::ops::Range<usize>,
        rows: std::ops::Range<usize>,
        out: *mut f32,
        isa: Option<Isa>,
        sum_of: &dyn Fn(usize) -> Sum,
    ) {
        let kb = self.k / QK_K;
        let n = self.n;
        #[cfg(target_arch = "x86_64")]
        if isa.is_some() {
            // SAFETY: the caller's contract; `isa` is one this CPU has.
            return unsafe { avx2::span(self, sum_of, act, acts, rows, out) };
        }
        let _ = isa;
        // Tiles of activation rows stay in L1 while the span's weight rows pass.
        let mut buf = Vec::new();
        for i0 in acts.clone().step_by(ROW_TILE) {
            for j in rows.clone() {
                let w = self.gguf_row(j, &mut buf);
                for i in i0..(i0 + ROW_TILE).min(acts.end) {
                    let v = dot_row(self.t, sum_of(i), w, &act[i * kb..(i + 1) * kb]);
                    // SAFETY: i < m, j < n, this task's column.
                    unsafe { *out.add(i * n + j) = v };
                }
            }
        }
    }
}

impl KMatrix {
    /// Rows `rows` (whole groups of 16) of an interleaved matrix against activation rows
    /// `acts` by the `rows16` kernels of `isa` (`avx512::rows16_*`, `avx2_rows16::*`), several
    /// activation rows at a time where they share a sum those take (`rows16_takes`); any other
    /// sum (a test's choice) by the dot products on rebuilt rows.
    #[cfg(target_arch = "x86_64")]
    fn rows16_span(
        &self,
        isa: Isa,
        act: &[Q8K],
        acts: std::ops::Range<usize>,
        rows: std::ops::Range<usize>,
        o: OutPtr<f32>,
        sum_of: &dyn Fn(usize) -> Sum,
    ) {
        let (n, kb) = (self.n, self.k / QK_K);
        let gb = kb * rows16::group_bytes(self.t);
        let y = |i: usize| &act[i * kb..(i + 1) * kb];
        let mut i = acts.start;
        while i < acts.end {
            let sum = sum_of(i);
            if !rows16_takes(isa, self.t, sum) {
                // SAFETY: the caller's (`matmul_in`'s) span of out.
                unsafe { self.span(act, i..i + 1, rows.clone(), o.get(), Some(isa), sum_of) };
                i += 1;
                continue;
            }
            // Rows taken at once: up to 8 for Q5_K with AVX-512 (measured faster than 4 on its
            // prompts), 4 for the others; all summed alike. `Lanes` keeps more floats per cell:
            // one row.
            let alike = |r: usize| i + r <= acts.end && (i..i + r).all(|x| sum_of(x) == sum);
            let r = match (isa, self.t, sum) {
                (_, _, Sum::Lanes) => 1,
                (Isa::Avx512, KType::Q5K, _) if alike(8) => 8,
                _ if alike(4) => 4,
                _ => 1,
            };
            for g in rows.start / rows16::ROWS..rows.end / rows16::ROWS {
                let grp = &self.bytes[g * gb..(g + 1) * gb];
                let mut v = [[0f32; rows16::ROWS]; 8];
                // SAFETY: the CPU has `isa` (the caller's); a sum these take for r rows from
                // i, all alike; whole blocks.
                unsafe {
                    match isa {
                        Isa::Avx512 => rows16_avx512(self.t, grp, &y, i, r, sum, &mut v),
                        Isa::Avx2 => rows16_avx2(self.t, grp, &y, i, r, sum, &mut v),
                    }
                }
                for (di, v) in v.iter().enumerate().take(r) {
                    // SAFETY: row i + di and this span's columns of out.
                    unsafe {
                        let at = o.get().add((i + di) * n + g * rows16::ROWS);
                        std::ptr::copy_nonoverlapping(v.as_ptr(), at, v.len())
                    };
                }
            }
            i += r;
        }
    }
}

/// Whether the `rows16` kernels of `isa` take a matrix of `t` summed as `sum`: llama.cpp's
/// repacked `Rows` of Q4_K and Q2_K, and the other types' `Tiled` and `Lanes` (with AVX2 Q2_K's
/// too, which llama.cpp repacks only with AVX-512).
#[cfg(target_arch = "x86_64")]
fn rows16_takes(isa: Isa, t: KType, sum: Sum) -> bool {
    match (t, sum) {
        (KType::Q4K, Sum::Rows(64) | Sum::Rows(QK_K)) => true,
        (KType::Q2K, Sum::Rows(128) | Sum::Rows(QK_K)) => true,
        (KType::Q2K, Sum::Tiled | Sum::Lanes) => isa == Isa::Avx2,
        (KType::Q3K | KType::Q5K | KType::Q6K, Sum::Tiled | Sum::Lanes) => true,
        _ => false,
    }
}

/// One interleaved group `grp` of `t` against activation rows i..i + r (`y(i)`, all summed as
/// `sum`) by `avx512`'s kernels, into v.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VNNI; `rows16_takes(Avx512, t, sum)`; r is 1, 4 or (Q5_K) 8,
/// 1 for `Lanes`.
#[cfg(target_arch = "x86_64")]
unsafe fn rows16_avx512<'a>(
    t: KType,
    grp: &[u8],
    y: &dyn Fn(usize) -> &'a [Q8K],
    i: usize,
    r: usize,
    sum: Sum,
    v: &mut [[f32; 16]; 8],
) {
    use std::array::from_fn;
    let ys = |d: usize| y(i + d);
    let lanes = sum == Sum::Lanes;
    // SAFETY: the caller's.
    unsafe {
        match (t, r, lanes) {
            (KType::Q2K, 4, _) => avx512::rows16_q2k::<4>(grp, from_fn(ys), [sum; 4], first(v)),
            (KType::Q2K, ..) => avx512::rows16_q2k::<1>(grp, [y(i)], [sum], first(v)),
            (KType::Q3K, 4, _) => avx512::rows16_q3k::<4, false>(grp, from_fn(ys), first(v)),
            (KType::Q3K, _, true) => avx512::rows16_q3k::<1, true>(grp, [y(i)], first(v)),
            (KType::Q3K, ..) => avx512::rows16_q3k::<1, false>(grp, [y(i)], first(v)),
            (KType::Q4K, 4, _) => avx512::rows16_q4k::<4>(grp, from_fn(ys), [sum; 4], first(v)),
            (KType::Q4K, ..) => avx512::rows16_q4k::<1>(grp, [y(i)], [sum], first(v)),
            (KType::Q5K, 8, _) => avx512::rows16_q5k_tiled::<8>(grp, from_fn(ys), v),
            (KType::Q5K, 4, _) => avx512::rows16_q5k_tiled::<4>(grp, from_fn(ys), first(v)),
            (KType::Q5K, _, true) => avx512::rows16_q5k_lanes(grp, y(i), &mut v[0]),
            (KType::Q5K, ..) => avx512::rows16_q5k_tiled::<1>(grp, [y(i)], first(v)),
            (KType::Q6K, 4, _) => avx512::rows16_q6k_tiled::<4>(grp, from_fn(ys), first(v)),
            (KType::Q6K, _, true) => avx512::rows16_q6k_lanes(grp, y(i), &mut v[0]),
            (KType::Q6K, ..) => avx512::rows16_q6k_tiled::<1>(grp, [y(i)], first(v)),
        }
    }
}

/// `rows16_avx512` with `avx2_rows16`'s kernels.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `rows16_takes(Avx2, t, sum)`; r is 1 or 4, 1 for `Lanes`.
#[cfg(target_arch = "x86_64")]
unsafe fn rows16_avx2<'a>(
    t: KType,
    grp: &[u8],
    y: &dyn Fn(usize) -> &'a [Q8K],
    i: usize,
    r: usize,
    sum: Sum,
    v: &mut [[f32; 16]; 8],
) {
    use avx2_rows16 as k;
    use std::array::from_fn;
    let ys = |d: usize| y(i + d);
    let lanes = sum == Sum::Lanes;
    // SAFETY: the caller's.
    unsafe {
        match (t, r, lanes) {
            (KType::Q2K, 4, _) if matches!(sum, Sum::Rows(_)) => {
                k::rows16_q2k_rows::<4>(grp, from_fn(ys), [sum; 4], first(v))
            }
            (KType::Q2K, _, _) if matches!(sum, Sum::Rows(_)) => {
                k::rows16_q2k_rows::<1>(grp, [y(i)], [sum], first(v))
            }
            (KType::Q2K, _, true) => k::rows16_q2k::<1, true>(grp, [y(i)], first(v)),
            (KType::Q2K, 4, _) => k::rows16_q2k::<4, false>(grp, from_fn(ys), first(v)),
            (KType::Q2K, ..) => k::rows16_q2k::<1, false>(grp, [y(i)], first(v)),
            (KType::Q3K, _, true) => k::rows16_q3k::<1, true>(grp, [y(i)], first(v)),
            (KType::Q3K, 4, _) => k::rows16_q3k::<4, false>(grp, from_fn(ys), first(v)),
            (KType::Q3K, ..) => k::rows16_q3k::<1, false>(grp, [y(i)], first(v)),
            (KType::Q4K, 4, _) => k::rows16_q4k::<4>(grp, from_fn(ys), [sum; 4], first(v)),
            (KType::Q4K, ..) => k::rows16_q4k::<1>(grp, [y(i)], [sum], first(v)),
            (KType::Q5K, _, true) => k::rows16_q5k_lanes(grp, y(i), &mut v[0]),
            (KType::Q5K, 4, _) => k::rows16_q5k_tiled::<4>(grp, from_fn(ys), first(v)),
            (KType::Q5K, ..) => k::rows16_q5k_tiled::<1>(grp, [y(i)], first(v)),
            (KType::Q6K, _, true) => k::rows16_q6k::<1, true>(grp, [y(i)], first(v)),
            (KType::Q6K, 4, _) => k::rows16_q6k::<4, false>(grp, from_fn(ys), first(v)),
            (KType::Q6K, ..) => k::rows16_q6k::<1, false>(grp, [y(i)], first(v)),
        }
    }
}

/// The first N of a kernel's eight output rows.
#[cfg(target_arch = "x86_64")]
fn first<const N: usize>(v: &mut [[f32; 16]; 8]) -> &mut [[f32; 16]; N] {
    (&mut v[..N]).try_into().expect("N <= 8")
}

/// Groups of activation rows from which an interleaved matrix of `t` takes `avx512::span`
/// rather than `rows16_span`: Q2_K's, Q3_K's and Q6_K's from a few groups, never Q4_K's or
/// Q5_K's, whose `rows16` kernels were the faster at every batch of a model's prompt (`slm
/// bench`, models of `bench/make-kquant-model.sh`).
fn rows16_min_groups(t: KType) -> usize {
    match t {
        KType::Q2K | KType::Q3K | KType::Q6K => 4,
        _ => usize::MAX,
    }
}

/// Activation rows a task takes at a time (16 rows of Q8_K at k = 1536: 28 KB).
pub(crate) const ROW_TILE: usize = 16;

/// A matmul's quantized activations: by row, and (AVX-512) in groups of sixteen rows.
#[derive(Default)]
struct Scratch {
    act: crate::scratch::Scratch,
    #[cfg(target_arch = "x86_64")]
    groups: crate::scratch::Scratch,
}

thread_local! {
    /// Kept between the matmuls of a thread (see `scratch`).
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

impl CustomOp1 for KMatrix {
    fn name(&self) -> &'static str {
        "k-quant-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        crate::ggml_math::matmul_fwd(s, l, "k-quant matmul", self.n, self.k, |x, m, out| {
            self.matmul(x, m, out)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests;
