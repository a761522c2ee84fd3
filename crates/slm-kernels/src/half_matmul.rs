//! Matrix multiplication with 16-bit float weights (GGUF F16 and BF16), kept at two bytes a
//! weight.
//!
//! Why by hand: candle widens F16/BF16 GGUF tensors to f32 at load (`QMatMul`), which doubles
//! both the memory and the bytes read per decoded token, and its f16 gemm is slower than
//! f32. Here the weights stay as stored. Arithmetic follows llama.cpp's: the activations are
//! rounded to the weights' type first (its `vec_dot_type`), then each output is one f32
//! fused multiply-add chain in eight lanes over k (tinyBLAS's order for F16 and BF16),
//! reduced by `hsum8`, and any k % 8 tail added after, one product at a time. (A product of
//! two 16-bit floats is exact in f32, so only the order of the sums decides the result.)
//!
//! Layout: rows in groups of eight, interleaved eight values at a time (row 0's values 0..8,
//! row 1's values 0..8, ..., row 7's, then values 8..16), then each row's k % 8 tail. A decode
//! step then reads one sequential stream per group instead of eight rows 2k bytes apart,
//! which measured here at half the memory bandwidth. `gguf_bytes` restores the stored order.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::{bf16, f16};

use crate::ggml_math::Isa;
use crate::pool::{as_uninit, OutPtr};
use crate::quant::hsum8;
use std::mem::MaybeUninit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfType {
    F16,
    BF16,
}

impl HalfType {
    pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        match t {
            G::F16 => Some(Self::F16),
            G::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    pub fn to_ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            Self::F16 => G::F16,
            Self::BF16 => G::BF16,
        }
    }

    /// A stored value widened to f32 (exact).
    #[inline(always)]
    fn widen(self, bits: u16) -> f32 {
        match self {
            Self::F16 => f16::from_bits(bits).to_f32(),
            Self::BF16 => bf16::from_bits(bits).to_f32(),
        }
    }

    /// x rounded to this type (nearest, ties to even, as ggml's conversions) and widened back.
    #[inline(always)]
    fn round(self, x: f32) -> f32 {
        match self {
            Self::F16 => f16::from_f32(x).to_f32(),
            Self::BF16 => bf16::from_f32(x).to_f32(),
        }
    }
}

/// One output: weight row `w` against rounded activations `x`, with the scalar kernel that
/// every SIMD kernel must equal bit for bit.
fn dot_row(t: HalfType, w: &[u16], x: &[f32]) -> f32 {
    let k8 = w.len() / 8 * 8;
    let mut acc = [0f32; 8];
    for (wc, xc) in w[..k8].chunks_exact(8).zip(x[..k8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] = t.widen(wc[l]).mul_add(xc[l], acc[l]);
        }
    }
    let mut v = hsum8(&acc);
    for (&wv, &xv) in w[k8..].iter().zip(&x[k8..]) {
        v = t.widen(wv).mul_add(xv, v);
    }
    v
}

/// Rows per group of the interleaved layout.
const ROWS: usize = 8;

/// Where value c of row j lies in the interleaved layout of n x k values.
#[inline(always)]
fn index(j: usize, c: usize, k: usize) -> usize {
    let (g, r) = (j / ROWS, j % ROWS);
    let k8 = k / 8 * 8;
    let base = g * ROWS * k;
    if c < k8 {
        base + c / 8 * 64 + r * 8 + c % 8
    } else {
        base + ROWS * k8 + r * (k - k8) + (c - k8)
    }
}

/// Weight rows `rows` against all m activation rows, cell (j, i) to `out[i * n + j]`.
///
/// # Safety
/// `out` holds m * n values and no other thread writes the columns in `rows`.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_scalar(
    t: HalfType,
    w: &[u16],
    k: usize,
    x: &[f32],
    m: usize,
    rows: std::ops::Range<usize>,
    out: *mut f32,
    n: usize,
) {
    let mut wr = vec![0u16; k];
    for j in rows {
        for (c, v) in wr.iter_mut().enumerate() {
            *v = w[index(j, c, k)];
        }
        for i in 0..m {
            // SAFETY: i < m and j < n per the contract.
            unsafe { *out.add(i * n + j) = dot_row(t, &wr, &x[i * k..(i + 1) * k]) };
        }
    }
}

/// A weight matrix of n rows of k 16-bit floats, applied as a candle op (inference only).
#[derive(Debug, Clone)]
pub struct HalfMatrix {
    pub t: HalfType,
    bits: std::sync::Arc<Vec<u16>>,
    pub n: usize,
    pub k: usize,
}

impl HalfMatrix {
    /// `gguf`: n rows of k little-endian values of type `t`, as stored in a GGUF file.
    pub fn new(t: HalfType, gguf: &[u8], n: usize, k: usize) -> Self {
        assert_eq!(
            gguf.len(),
            n * k * 2,
            "half matrix: {n} x {k} needs {} bytes",
            n * k * 2
        );
        let mut bits = vec![0u16; n.div_ceil(ROWS) * ROWS * k];
        for (j, row) in gguf.chunks_exact(2 * k.max(1)).enumerate().take(n) {
            for (c, b) in row.chunks_exact(2).enumerate() {
                bits[index(j, c, k)] = u16::from_le_bytes([b[0], b[1]]);
            }
        }
        Self {
            t,
            bits: std::sync::Arc::new(bits),
            n,
            k,
        }
    }

    /// The weights as stored in GGUF.
    pub fn gguf_bytes(&self) -> Vec<u8> {
        let k = self.k;
        (0..self.n)
            .flat_map(|j| (0..k).flat_map(move |c| self.bits[index(j, c, k)].to_le_bytes()))
            .collect()
    }

    /// Row j widened to f32 (exact): the embedding lookup of a tied matrix.
    pub fn row(&self, j: usize, out: &mut [f32]) {
        for (c, o) in out[..self.k].iter_mut().enumerate() {
            *o = self.t.widen(self.bits[index(j, c, self.k)]);
        }
    }

    /// x (m, k) times the transpose of these weights into out (m, n).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        // SAFETY: the kernels store computed values only.
        group_isa(&[self], x, m, &mut [unsafe { as_uninit(out) }], Isa::best())
    }

    /// x (m, k) times the transpose of each matrix (all of one type, k wide) into its out
    /// (m, n_i): x rounded once and one section of the kernel pool for all of them. Every
    /// output value is written (so the outputs may start uninitialised).
    pub fn matmul_group(
        ws: &[&HalfMatrix],
        x: &[f32],
        m: usize,
        outs: &mut [&mut [MaybeUninit<f32>]],
    ) {
        group_isa(ws, x, m, outs, Isa::best())
    }
}

/// `HalfMatrix::matmul_group` with the kernels of `isa`; None: the scalar kernel (the tests'
/// reference).
fn group_isa(
    ws: &[&HalfMatrix],
    x: &[f32],
    m: usize,
    outs: &mut [&mut [MaybeUninit<f32>]],
    isa: Option<Isa>,
) {
    assert_eq!(ws.len(), outs.len());
    let Some((k, t)) = ws.first().map(|w| (w.k, w.t)) else {
        return;
    };
    assert!(x.len() >= m * k);
    let pool = crate::pool::global();
    // llama.cpp's vec_dot_type: the activations in the weights' type.
    // SAFETY: round_row writes every value of its part.
    let xr = unsafe {
        crate::pool::fill_chunks(m * k, k.max(1), |start, row| {
            round_row(t, &x[start..start + row.len()], row)
        })
    };
    #[cfg(target_arch = "x86_64")]
    let kernel = match isa {
        Some(Isa::Avx512) => avx512::kernel(t),
        Some(Isa::Avx2) => avx2::kernel(t),
        None => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let kernel: Option<fn()> = {
        let _ = isa;
        None
    };
    // Output features in spans of whole tiles; each task walks all m activation rows so a
    // weight row is read from memory once.
    let mut spans = Vec::new();
    let mut jobs = Vec::with_capacity(ws.len());
    for (ji, (w, out)) in ws.iter().zip(outs.iter_mut()).enumerate() {
        assert!(w.k == k && w.t == t && out.len() >= m * w.n);
        jobs.push((&w.bits[..], w.n, OutPtr(out.as_mut_ptr().cast::<f32>())));
        spans.extend(pool.spans(w.n, 8).map(|r| (ji, r)));
    }
    let xr = &xr[..];
    pool.run(spans.len(), |s| {
        let (ji, r) = spans[s].clone();
        let (w, n, o) = jobs[ji];
        match kernel {
            // SAFETY: spans are disjoint, out holds m * n, the kernel suits this CPU.
            #[cfg(target_arch = "x86_64")]
            Some(f) => unsafe { f(t, w, k, xr, m, r, o.get(), n) },
            _ => unsafe { rows_scalar(t, w, k, xr, m, r, o.get(), n) },
        }
    });
}

/// Writes every value of `out` (as long as `x`).
fn round_row(t: HalfType, x: &[f32], out: &mut [MaybeUninit<f32>]) {
    assert_eq!(x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if t == HalfType::F16 && crate::ggml_math::has_avx2() {
        // SAFETY: the CPU has F16C; the slices have equal lengths.
        return unsafe { avx2::round_f16(x, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(t.round(v));
    }
}

impl CustomOp1 for HalfMatrix {
    fn name(&self) -> &'static str {
        "half-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        crate::ggml_math::matmul_fwd(s, l, "half matmul", self.n, self.k, |x, m, out| {
            Self::matmul_group(&[self], x, m, &mut [out]);
            Ok(())
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{HalfType, ROWS};
    use crate::quant::hsum8_m256 as hsum8;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Eight stored values widened to f32.
    pub(super) trait Widen {
        unsafe fn load8(p: *const u16) -> __m256;
    }
    pub(super) struct F16;
    pub(super) struct Bf16;
    impl Widen for F16 {
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }
    impl Widen for Bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
        }
    }

    /// # Safety
    /// F16C; `out` at least as long as `x`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn round_f16(x: &[f32], out: &mut [MaybeUninit<f32>]) {
        let k8 = x.len() / 8 * 8;
        let o = out.as_mut_ptr().cast::<f32>();
        for i in (0..k8).step_by(8) {
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(i)));
            _mm256_storeu_ps(o.add(i), _mm256_cvtph_ps(h));
        }
        for i in k8..x.len() {
            out[i].write(HalfType::F16.round(x[i]));
        }
    }

    /// Rows r0..r0+R of the group at `grp` against activation rows `x` .. `x + C * k`;
    /// cell (r, c) to `out[c * n + r]`.
    ///
    /// # Safety
    /// The group and activation rows exist; r0 + R <= 8; AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline(never)]
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    unsafe fn tile<W: Widen, const R: usize, const C: usize, const SPLIT: bool>(
        t: HalfType,
        grp: *const u16,
        r0: usize,
        k: usize,
        span: std::ops::Range<usize>,
        x: *const f32,
        partial: *mut [[__m256; C]; R],
        out: *mut f32,
        n: usize,
    ) {
        let k8 = k / 8 * 8;
        // Vector loads and stores for `partial`: copied as arrays they became memcpy calls.
        let saved = partial as *mut f32;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        if SPLIT && span.start > 0 {
            for r in 0..R {
                for c in 0..C {
                    acc[r][c] = _mm256_loadu_ps(saved.add((r * C + c) * 8));
                }
            }
        }
        for i in span.clone().step_by(8) {
            // Eight values of eight rows: 128 bytes, two cache lines, per step of eight.
            let chunk = grp.add(i * ROWS);
            if C == 1 && i % 32 == 0 {
                // Decode streams the weights from memory once: ask for what comes after.
                for l in 0..4 {
                    let p = chunk.wrapping_add(PREFETCH + l * 32);
                    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                }
            }
            let mut wv = [_mm256_setzero_ps(); R];
            for r in 0..R {
                wv[r] = W::load8(chunk.add((r0 + r) * 8));
            }
            for c in 0..C {
                let xv = _mm256_loadu_ps(x.add(c * k + i));
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(wv[r], xv, acc[r][c]);
                }
            }
        }
        if SPLIT && span.end < k8 {
            for r in 0..R {
                for c in 0..C {
                    _mm256_storeu_ps(saved.add((r * C + c) * 8), acc[r][c]);
                }
            }
            return;
        }
        let tail = grp.add(ROWS * k8);
        for r in 0..R {
            for c in 0..C {
                let row_tail = tail.add((r0 + r) * (k - k8));
                *out.add(c * n + r) = finish(t, hsum8(acc[r][c]), row_tail, x.add(c * k), k8, k);
            }
        }
    }

    /// One cell's result: its lanes' sum `v`, then the k % 8 values past the last whole step
    /// (a row's `tail` of the layout against activations `x[k8..k]`), one product at a time.
    ///
    /// # Safety
    /// `tail` holds k - k8 values and `x` k.
    #[inline(always)]
    pub(super) unsafe fn finish(
        t: HalfType,
        mut v: f32,
        tail: *const u16,
        x: *const f32,
        k8: usize,
        k: usize,
    ) -> f32 {
        for i in k8..k {
            v = t.widen(*tail.add(i - k8)).mul_add(*x.add(i), v);
        }
        v
    }

    /// How far ahead decode prefetches, in values (8 KB).
    const PREFETCH: usize = 4096;
    const GEMM_R: usize = 2;
    const GEMM_C: usize = 6;
    /// Weight bytes a block of rows keeps in L2 while all activation rows pass.
    pub(super) const ROW_BLOCK_BYTES: usize = 256 << 10;
    /// Activation bytes a tile may keep in L1 over the whole of k; past that, k goes in
    /// chunks of `K_CHUNK` (9 KB of activations). Measured on the down projection
    /// (576 x 1536, 512 rows, one thread): 57-59 -> 67-68 GFLOP/s; chunking k = 576 as well
    /// was slower.
    const X_TILE_BYTES: usize = 16 << 10;
    const K_CHUNK: usize = 384;

    /// Weight rows `rows` (whole groups but perhaps the last) against all m activation rows;
    /// cell (j, i) to `out[i * n + j]`.
    ///
    /// # Safety
    /// As `super::rows_scalar`, and the CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows<W: Widen>(
        t: HalfType,
        w: &[u16],
        k: usize,
        x: &[f32],
        m: usize,
        rows: std::ops::Range<usize>,
        out: *mut f32,
        n: usize,
    ) {
        debug_assert_eq!(rows.start % ROWS, 0);
        let gp = |g: usize| w.as_ptr().add(g * ROWS * k);
        let xp = |i: usize| x.as_ptr().add(i * k);
        let op = |i: usize, j: usize| out.add(i * n + j);
        let groups = rows.start / ROWS..rows.end.div_ceil(ROWS);
        let valid = |g: usize| (rows.end - g * ROWS).min(ROWS);
        let whole = 0..k / 8 * 8;
        let mut one = [[_mm256_setzero_ps(); 1]; 1];
        if m == 1 {
            let mut eight = [[_mm256_setzero_ps(); 1]; ROWS];
            for g in groups {
                if valid(g) == ROWS {
                    let (a, o) = (xp(0), op(0, g * ROWS));
                    tile::<W, ROWS, 1, false>(t, gp(g), 0, k, whole.clone(), a, &mut eight, o, n);
                } else {
                    for r in 0..valid(g) {
                        let (a, o) = (xp(0), op(0, g * ROWS + r));
                        tile::<W, 1, 1, false>(t, gp(g), r, k, whole.clone(), a, &mut one, o, n);
                    }
                }
            }
            return;
        }
        // A tile of activation rows stays in L1 while a block of the span's weight rows passes
        // it from L2 (reading the activations from L2 instead capped the FMAs at half rate);
        // the block then moves on, so the weights come from memory once. Where a tile of
        // activation rows would not fit in L1 beside the weights, k is cut into chunks and
        // each tile's accumulators wait in `partial` between them: every lane still sums in
        // the same order, so the result does not depend on the chunking.
        let block = (ROW_BLOCK_BYTES / (2 * k.max(1))).max(1).div_ceil(ROWS);
        let chunk = if GEMM_C * k * 4 <= X_TILE_BYTES {
            whole.end.max(8)
        } else {
            K_CHUNK
        };
        let split = chunk < whole.end;
        let mut partial = vec![[[_mm256_setzero_ps(); GEMM_C]; GEMM_R]; block * ROWS / GEMM_R + 1];
        for gb in (groups.start..groups.end).step_by(block) {
            let blk = gb..(gb + block).min(groups.end);
            let mut i = 0;
            while i < m {
                // The last rows (m % 6) as one narrower tile, not one row at a time.
                let c = (m - i).min(GEMM_C);
                let mut k0 = 0;
                loop {
                    let span = k0..(k0 + chunk).min(whole.end);
                    for g in blk.clone() {
                        let mut r0 = 0;
                        while r0 < valid(g) {
                            let full_r = r0 + GEMM_R <= valid(g);
                            let (a, o) = (xp(i), op(i, g * ROWS + r0));
                            // Slot of rows r0.. of group g; a one-row tile uses its first half.
                            let p = partial.as_mut_ptr().add(((g - gb) * ROWS + r0) / GEMM_R);
                            let s = span.clone();
                            macro_rules! go {
                                ($r:literal, $c:literal) => {
                                    if split {
                                        tile::<W, $r, $c, true>(
                                            t,
                                            gp(g),
                                            r0,
                                            k,
                                            s,
                                            a,
                                            p.cast(),
                                            o,
                                            n,
                                        )
                                    } else {
                                        tile::<W, $r, $c, false>(
                                            t,
                                            gp(g),
                                            r0,
                                            k,
                                            s,
                                            a,
                                            p.cast(),
                                            o,
                                            n,
                                        )
                                    }
                                };
                            }
                            match (full_r, c) {
                                (true, 6) => go!(2, 6),
                                (true, 5) => go!(2, 5),
                                (true, 4) => go!(2, 4),
                                (true, 3) => go!(2, 3),
                                (true, 2) => go!(2, 2),
                                (true, _) => go!(2, 1),
                                (false, 6) => go!(1, 6),
                                (false, 5) => go!(1, 5),
                                (false, 4) => go!(1, 4),
                                (false, 3) => go!(1, 3),
                                (false, 2) => go!(1, 2),
                                (false, _) => go!(1, 1),
                            }
                            r0 += if full_r { GEMM_R } else { 1 };
                        }
                    }
                    k0 += chunk;
                    if k0 >= whole.end {
                        break;
                    }
                }
                i += c;
            }
        }
    }

    pub(super) type RowsFn =
        unsafe fn(HalfType, &[u16], usize, &[f32], usize, std::ops::Range<usize>, *mut f32, usize);

    /// The kernel for `t` if this CPU has AVX2, FMA and F16C.
    pub(super) fn kernel(t: HalfType) -> Option<RowsFn> {
        if !crate::ggml_math::has_avx2() {
            return None;
        }
        Some(match t {
            HalfType::F16 => rows::<F16>,
            HalfType::BF16 => rows::<Bf16>,
        })
    }
}

/// The AVX-512 kernel: `avx2`'s cells, bit for bit, two weight rows to a 512-bit register.
/// Each output is still one eight-lane chain over k: the low half of a register carries row
/// r's lanes, the high half row r + 1's, both against the same eight activations (loaded
/// once into both halves). A tile is a whole group of eight weight rows by six activation
/// rows (24 accumulators of the 32 registers): measured against four rows by twelve, it
/// converts more weights per step but loads half the activations (129-135 against 117-125
/// GFLOP/s on one thread).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::{self, Bf16, Widen, F16};
    use super::{HalfType, ROWS};
    use crate::quant::hsum8_m256 as hsum8;
    use std::arch::x86_64::*;

    /// Sixteen stored values (eight of two adjacent rows) widened to f32.
    trait Widen16: Widen {
        unsafe fn load16(p: *const u16) -> __m512;
    }
    impl Widen16 for F16 {
        #[inline(always)]
        unsafe fn load16(p: *const u16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
    }
    impl Widen16 for Bf16 {
        #[inline(always)]
        unsafe fn load16(p: *const u16) -> __m512 {
            let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v))
        }
    }

    /// Row pairs per tile (eight weight rows) and activation rows per tile.
    const GEMM_P: usize = 4;
    const GEMM_C: usize = 6;
    /// As `avx2`'s: a tile of activations stays in L1 over the whole of k up to this size;
    /// past it k goes in chunks of `K_CHUNK` (a tile's 12 KB).
    const X_TILE_BYTES: usize = 28 << 10;
    const K_CHUNK: usize = 512;

    /// Rows r0..r0+2P of the group at `grp` against activation rows `x` .. `x + C * k`, over
    /// the values `span` (whole steps of eight); cell (r, c) to `out[c * ldo + r]` once the
    /// span reaches the last whole step (before that the accumulators wait in `partial`).
    ///
    /// # Safety
    /// The group and activation rows exist; r0 + 2P <= 8; AVX-512 F, FMA and F16C.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[inline(never)]
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)]
    unsafe fn tile<W: Widen16, const P: usize, const C: usize, const SPLIT: bool>(
        t: HalfType,
        grp: *const u16,
        r0: usize,
        k: usize,
        span: std::ops::Range<usize>,
        x: *const f32,
        partial: *mut f32,
        out: *mut f32,
        ldo: usize,
    ) {
        let k8 = k / 8 * 8;
        let mut acc = [[_mm512_setzero_ps(); C]; P];
        if SPLIT && span.start > 0 {
            for p in 0..P {
                for c in 0..C {
                    acc[p][c] = _mm512_loadu_ps(partial.add((p * C + c) * 16));
                }
            }
        }
        for i in span.clone().step_by(8) {
            let chunk = grp.add(i * ROWS);
            let mut wv = [_mm512_setzero_ps(); P];
            for p in 0..P {
                wv[p] = W::load16(chunk.add((r0 + 2 * p) * 8));
            }
            for c in 0..C {
                let xv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(
                    x.add(c * k + i) as *const f64,
                )));
                for p in 0..P {
                    acc[p][c] = _mm512_fmadd_ps(wv[p], xv, acc[p][c]);
                }
            }
        }
        if SPLIT && span.end < k8 {
            for p in 0..P {
                for c in 0..C {
                    _mm512_storeu_ps(partial.add((p * C + c) * 16), acc[p][c]);
                }
            }
            return;
        }
        let tail = grp.add(ROWS * k8);
        for p in 0..P {
            for c in 0..C {
                let a = acc[p][c];
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
                for (h, half) in [_mm512_castps512_ps256(a), hi].into_iter().enumerate() {
                    let row_tail = tail.add((r0 + 2 * p + h) * (k - k8));
                    let v = avx2::finish(t, hsum8(half), row_tail, x.add(c * k), k8, k);
                    *out.add(c * ldo + 2 * p + h) = v;
                }
            }
        }
    }

    /// Weight rows `rows` (whole groups but perhaps the last) against all m activation rows;
    /// cell (j, i) to `out[i * n + j]`. Decode (m = 1) streams the weights from memory and
    /// runs `avx2`'s tiles, which keep up with it.
    ///
    /// # Safety
    /// As `super::rows_scalar`; the CPU has AVX-512 F, AVX2, FMA and F16C.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows<W: Widen16>(
        t: HalfType,
        w: &[u16],
        k: usize,
        x: &[f32],
        m: usize,
        rows: std::ops::Range<usize>,
        out: *mut f32,
        n: usize,
    ) {
        debug_assert_eq!(rows.start % ROWS, 0);
        if m == 1 {
            return avx2::rows::<W>(t, w, k, x, m, rows, out, n);
        }
        let gp = |g: usize| w.as_ptr().add(g * ROWS * k);
        let groups = rows.start / ROWS..rows.end.div_ceil(ROWS);
        let valid = |g: usize| (rows.end - g * ROWS).min(ROWS);
        let k8 = k / 8 * 8;
        // As `avx2::rows`: a block of weight rows stays in L2 while all activation rows pass
        // it a tile at a time, k in chunks where a tile would not fit in L1.
        let block = (avx2::ROW_BLOCK_BYTES / (2 * k.max(1)))
            .max(1)
            .div_ceil(ROWS);
        let chunk = if GEMM_C * k * 4 <= X_TILE_BYTES {
            k8.max(8)
        } else {
            K_CHUNK
        };
        let split = chunk < k8;
        let slot = GEMM_P * GEMM_C * 16;
        let tiles_per_group = ROWS / (2 * GEMM_P);
        let mut partial = vec![0f32; block * tiles_per_group * slot];
        // A last group of fewer than eight rows runs whole (its padding rows are zeros) into
        // `scratch`, and only its valid rows are kept.
        let mut scratch = [0f32; GEMM_C * ROWS];
        for gb in (groups.start..groups.end).step_by(block) {
            let blk = gb..(gb + block).min(groups.end);
            let mut i = 0;
            while i < m {
                let c = (m - i).min(GEMM_C);
                let xi = x.as_ptr().add(i * k);
                let mut k0 = 0;
                loop {
                    let span = k0..(k0 + chunk).min(k8);
                    for g in blk.clone() {
                        let whole = valid(g) == ROWS;
                        for tr in 0..tiles_per_group {
                            let r0 = tr * 2 * GEMM_P;
                            let (o, ldo) = if whole {
                                (out.add(i * n + g * ROWS + r0), n)
                            } else {
                                (scratch.as_mut_ptr().add(r0), ROWS)
                            };
                            let p = partial
                                .as_mut_ptr()
                                .add(((g - gb) * tiles_per_group + tr) * slot);
                            let s = span.clone();
                            macro_rules! go {
                                ($c:literal) => {
                                    if split {
                                        tile::<W, GEMM_P, $c, true>(
                                            t,
                                            gp(g),
                                            r0,
                                            k,
                                            s,
                                            xi,
                                            p,
                                            o,
                                            ldo,
                                        )
                                    } else {
                                        tile::<W, GEMM_P, $c, false>(
                                            t,
                                            gp(g),
                                            r0,
                                            k,
                                            s,
                                            xi,
                                            p,
                                            o,
                                            ldo,
                                        )
                                    }
                                };
                            }
                            match c {
                                6 => go!(6),
                                5 => go!(5),
                                4 => go!(4),
                                3 => go!(3),
                                2 => go!(2),
                                _ => go!(1),
                            }
                        }
                    }
                    k0 += chunk;
                    if k0 >= k8 {
                        break;
                    }
                }
                let last = blk.end - 1;
                if valid(last) < ROWS {
                    for ci in 0..c {
                        std::ptr::copy_nonoverlapping(
                            scratch.as_ptr().add(ci * ROWS),
                            out.add((i + ci) * n + last * ROWS),
                            valid(last),
                        );
                    }
                }
                i += c;
            }
        }
    }

    /// The kernel for `t` if this CPU has AVX-512 F beside AVX2, FMA and F16C.
    pub(super) fn kernel(t: HalfType) -> Option<avx2::RowsFn> {
        if !crate::ggml_math::has_avx512() {
            return None;
        }
        Some(match t {
            HalfType::F16 => rows::<F16>,
            HalfType::BF16 => rows::<Bf16>,
        })
    }

    const _: () = assert!(GEMM_C == 6 && ROWS.is_multiple_of(2 * GEMM_P));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_bits(t: HalfType, len: usize, rng: &mut impl Rng) -> Vec<u8> {
        (0..len)
            .flat_map(|_| {
                let v = rng.random_range(-3f32..3.0) * rng.random_range(0f32..1.0);
                match t {
                    HalfType::F16 => f16::from_f32(v).to_le_bytes(),
                    HalfType::BF16 => bf16::from_f32(v).to_le_bytes(),
                }
            })
            .collect()
    }

    /// The SIMD kernels equal the scalar reference bit for bit on odd shapes: rows not a
    /// multiple of any tile, k with and without a tail of eight, 1 to 70 activation rows.
    #[test]
    fn kernels_equal_scalar_reference_on_odd_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for t in [HalfType::F16, HalfType::BF16] {
            for &(n, k, m) in &[
                (1, 8, 1),
                (7, 576, 1),
                (13, 37, 1),
                (9, 100, 5),
                (33, 64, 70),
                (8, 1, 3),
                (130, 608, 9),
                (21, 1001, 13),
                (8, 768, 6),
                (11, 1000, 14),
                (16, 1536, 25),
            ] {
                let bytes = random_bits(t, n * k, &mut rng);
                let w = HalfMatrix::new(t, &bytes, n, k);
                assert_eq!(w.gguf_bytes(), bytes, "{t:?} n{n} k{k}: layout round trip");
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-4f32..4.0)).collect();
                let mut slow = vec![f32::NAN; m * n];
                // SAFETY: the kernels store computed values only.
                unsafe { group_isa(&[&w], &x, m, &mut [as_uninit(&mut slow)], None) };
                // Every kernel set this CPU has.
                for isa in Isa::available() {
                    // NaN to start: a cell the kernels left unwritten could not match.
                    let mut fast = vec![f32::NAN; m * n];
                    unsafe { group_isa(&[&w], &x, m, &mut [as_uninit(&mut fast)], Some(isa)) };
                    for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                        let at = format!("{t:?} {isa:?} n{n} k{k} m{m} cell {i}");
                        assert_eq!(a.to_bits(), b.to_bits(), "{at}");
                    }
                }
            }
        }
    }

    /// Several matrices of one type in one call: each output as its matrix alone gives it.
    #[test]
    fn group_equals_each_matrix_alone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let (k, m) = (72, 5);
        for t in [HalfType::F16, HalfType::BF16] {
            let ws: Vec<HalfMatrix> = [17, 8, 40]
                .iter()
                .map(|&n| HalfMatrix::new(t, &random_bits(t, n * k, &mut rng), n, k))
                .collect();
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-4f32..4.0)).collect();
            let refs: Vec<&HalfMatrix> = ws.iter().collect();
            let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.n]).collect();
            // SAFETY: the kernels store computed values only.
            let mut slices: Vec<&mut [MaybeUninit<f32>]> =
                outs.iter_mut().map(|o| unsafe { as_uninit(o) }).collect();
            HalfMatrix::matmul_group(&refs, &x, m, &mut slices);
            for (w, grouped) in ws.iter().zip(&outs) {
                let mut alone = vec![0f32; m * w.n];
                w.matmul(&x, m, &mut alone);
                let same = alone
                    .iter()
                    .zip(grouped)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{t:?} n={}: grouped call differs", w.n);
            }
        }
    }

    /// Against an f64 product of the widened weights and rounded activations: only f32
    /// summation error is allowed (relative to the sum of |products|).
    #[test]
    fn matmul_matches_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for t in [HalfType::F16, HalfType::BF16] {
            let (n, k, m) = (11, 200, 4);
            let bytes = random_bits(t, n * k, &mut rng);
            let w = HalfMatrix::new(t, &bytes, n, k);
            assert_eq!(w.gguf_bytes(), bytes);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-4f32..4.0)).collect();
            let mut out = vec![0f32; m * n];
            w.matmul(&x, m, &mut out);
            let mut row = vec![0f32; k];
            for j in 0..n {
                w.row(j, &mut row);
                for i in 0..m {
                    let (mut s, mut mag) = (0f64, 0f64);
                    for (a, &b) in row.iter().zip(&x[i * k..(i + 1) * k]) {
                        let p = *a as f64 * t.round(b) as f64;
                        s += p;
                        mag += p.abs();
                    }
                    let err = (out[i * n + j] as f64 - s).abs();
                    assert!(
                        err <= 1e-6 * mag,
                        "{t:?} ({i},{j}): {} vs {s}",
                        out[i * n + j]
                    );
                }
            }
        }
    }

    /// An input whose width is not the weights' k is refused with both widths named.
    #[test]
    fn wrong_input_width_is_a_clear_error() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let w = HalfMatrix::new(
            HalfType::F16,
            &random_bits(HalfType::F16, 3 * 16, &mut rng),
            3,
            16,
        );
        let x =
            candle_core::Tensor::zeros((2, 15), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap();
        let err = x.apply_op1_no_bwd(&w).unwrap_err().to_string();
        assert!(
            err.contains("half matmul: input width 15, weights expect 16"),
            "{err}"
        );
        let ok =
            candle_core::Tensor::zeros((2, 16), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap()
                .apply_op1_no_bwd(&w)
                .unwrap();
        assert_eq!(ok.dims(), &[2, 3]);
    }

    /// Activation rounding is ggml's: nearest, ties to even, for both types.
    #[test]
    fn activations_round_to_nearest_even() {
        // 1 + 2^-11 is halfway between two f16 values; even wins (1.0). Nine values, so
        // both the eight-wide path and the tail are taken.
        let h = 2f32.powi(-11);
        let x = [
            1.0 + h,
            1.0 + 3.0 * h,
            -0.0,
            65504.0,
            0.1,
            -1.0 - h,
            3.0,
            1e-8,
            1.0 + h,
        ];
        let mut out = [0f32; 9];
        // SAFETY: round_row stores rounded values only.
        round_row(HalfType::F16, &x, unsafe { as_uninit(&mut out) });
        let want = [
            1.0,
            1.0 + 4.0 * h,
            -0.0,
            65504.0,
            f16::from_f32(0.1).to_f32(),
        ];
        assert_eq!(out[..5], want);
        assert_eq!(out[5..], [-1.0, 3.0, f16::from_f32(1e-8).to_f32(), 1.0]);
        assert!(out[2].is_sign_negative());
        round_row(
            HalfType::BF16,
            &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)],
            // SAFETY: as above.
            unsafe { as_uninit(&mut out[..2]) },
        );
        assert_eq!(out[..2], [1.0, 1.0 + 4.0 * 2f32.powi(-8)]);
    }
}
