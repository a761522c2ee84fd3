//! Matrix multiplication with GGML block-quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).
//!
//! Why not candle's `QMatMul` for these: its Q8_1 activation blocks compute the block sum
//! `s` as `f16(f16(sum) * f16(d))`, rounding twice, where ggml rounds once, `f16(d * sum)`.
//! For Q4_1/Q5_1 weights the dot product is `d_w*d_a*sum(q_w*q_a) + m_w*s_a` and the two terms
//! nearly cancel, so that extra rounding grows into ~1% error in a projection and a different
//! greedy continuation than llama.cpp's after ~15 tokens on SmolLM2. candle also rounds
//! activations half away from zero; ggml's SIMD path rounds half to even. Here activations
//! are quantized exactly as ggml does, and each block dot is computed in the same order
//! (exact integer sum, then `fma(d_w*d_a, sum, acc)`).
//!
//! Layout: one row of `k` values per output feature, in GGUF blocks, or, where the x86 kernels
//! run, repacked in groups of eight rows (`rows8`).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use half::f16;

use crate::ggml_math::Isa;
use crate::pool::OutPtr;
use crate::scratch::MapError;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::hsum8 as hsum8_m256;
use std::mem::MaybeUninit;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod rows8;

pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl BlockType {
    pub fn from_ggml(t: candle_core::quantized::GgmlDType) -> Option<Self> {
        use candle_core::quantized::GgmlDType as G;
        Some(match t {
            G::Q4_0 => Self::Q4_0,
            G::Q4_1 => Self::Q4_1,
            G::Q5_0 => Self::Q5_0,
            G::Q5_1 => Self::Q5_1,
            G::Q8_0 => Self::Q8_0,
            _ => return None,
        })
    }
    pub fn to_ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType as G;
        match self {
            Self::Q4_0 => G::Q4_0,
            Self::Q4_1 => G::Q4_1,
            Self::Q5_0 => G::Q5_0,
            Self::Q5_1 => G::Q5_1,
            Self::Q8_0 => G::Q8_0,
        }
    }
    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
        }
    }
    /// Activations pair with Q8_1 blocks (which carry the block sum) when weights have an offset.
    fn needs_sum(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }
}

/// One block of 32 activations quantized to 8 bits, as ggml's block_q8_0 / block_q8_1, with
/// the f16 scale and sum widened to f32 once.
#[derive(Clone, Copy)]
#[repr(C)]
struct ActBlock {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

// SAFETY: numbers only; any bits are a block.
unsafe impl crate::scratch::Plain for ActBlock {}

impl ActBlock {
    #[cfg(test)]
    const ZERO: Self = Self {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
    };
}

pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's quantize_row_q8_0 / q8_1 (the AVX2 variant: id = 127/max, round half to even).
fn quantize_row(x: &[f32], out: &mut [ActBlock]) {
    #[cfg(target_arch = "x86_64")]
    if crate::ggml_math::has_avx2() {
        assert!(x.len() >= out.len() * QK);
        // SAFETY: the CPU has the features; x covers the blocks.
        return unsafe { avx2::quantize_row(x, out) };
    }
    quantize_row_scalar(x, out)
}

fn quantize_row_scalar(x: &[f32], out: &mut [ActBlock]) {
    for (xs, blk) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max / 127.0;
        let id = if max != 0.0 { 127.0 / max } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in blk.qs.iter_mut().zip(xs) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        blk.d = f16::from_f32(d).to_f32();
        blk.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

/// One weight block as 32 signed values `q`; returns its scale `d` and offset `m` (0 for the
/// types without one).
#[inline(always)]
fn unpack_block(t: BlockType, blk: &[u8], q: &mut [i8]) -> (f32, f32) {
    match t {
        BlockType::Q8_0 => q
            .iter_mut()
            .zip(&blk[2..34])
            .for_each(|(o, &x)| *o = x as i8),
        BlockType::Q4_0 | BlockType::Q4_1 => {
            let (qs, off) = if t == BlockType::Q4_0 {
                (&blk[2..18], 8)
            } else {
                (&blk[4..20], 0)
            };
            for j in 0..16 {
                q[j] = (qs[j] & 0x0F) as i8 - off;
                q[j + 16] = (qs[j] >> 4) as i8 - off;
            }
        }
        BlockType::Q5_0 | BlockType::Q5_1 => {
            let (h, qs, off) = if t == BlockType::Q5_0 {
                (2, &blk[6..22], 16)
            } else {
                (4, &blk[8..24], 0)
            };
            let qh = u32::from_le_bytes([blk[h], blk[h + 1], blk[h + 2], blk[h + 3]]);
            for j in 0..16 {
                q[j] = ((qs[j] & 0x0F) as u32 | ((qh >> j) & 1) << 4) as i8 - off;
                q[j + 16] = ((qs[j] >> 4) as u32 | ((qh >> (j + 12)) & 0x10)) as i8 - off;
            }
        }
    }
    let m = if t.needs_sum() { f16_at(blk, 2) } else { 0.0 };
    (f16_at(blk, 0), m)
}

/// Dot product of one weight row with the scalar kernel: the reference every SIMD kernel
/// must equal bit for bit.
fn dot_row(t: BlockType, w: &[u8], a: &[ActBlock]) -> f32 {
    let mut q = [0i8; QK];
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (blk, ab) in w.chunks_exact(t.block_bytes()).zip(a) {
        let (dw, mw) = unpack_block(t, blk, &mut q);
        let d = dw * ab.d;
        for (l, acc) in acc.iter_mut().enumerate() {
            let lane: i32 = (0..4)
                .map(|e| q[4 * l + e] as i32 * ab.qs[4 * l + e] as i32)
                .sum();
            *acc = d.mul_add(lane as f32, *acc);
        }
        if t.needs_sum() {
            summs = mw.mul_add(ab.s, summs);
        }
    }
    // ggml adds the offsets' sum only for the types that have one (0 + -0 would be +0).
    if t.needs_sum() {
        hsum8(&acc) + summs
    } else {
        hsum8(&acc)
    }
}

/// `hsum_float_8`: the 128-bit halves added, then pairs, then the last two lanes.
#[inline(always)]
pub(crate) fn hsum8(a: &[f32; 8]) -> f32 {
    let r = [a[4] + a[0], a[5] + a[1], a[6] + a[2], a[7] + a[3]];
    (r[0] + r[2]) + (r[1] + r[3])
}

/// The portable kernel: weight rows `rows` against all `m` activation rows, cell (j, i) to `out[i * n + j]`.
///
/// # Safety
/// `out` holds m * n values and no other thread writes the columns in `rows`.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_scalar(
    t: BlockType,
    w: &[u8],
    row_bytes: usize,
    act: &[ActBlock],
    nb: usize,
    m: usize,
    rows: std::ops::Range<usize>,
    out: *mut f32,
    n: usize,
) {
    for j in rows {
        let wr = &w[j * row_bytes..(j + 1) * row_bytes];
        for i in 0..m {
            // SAFETY: i < m and j < n per the contract.
            unsafe { *out.add(i * n + j) = dot_row(t, wr, &act[i * nb..(i + 1) * nb]) };
        }
    }
}

/// One weight matrix of a `matmul_in` call: its blocks in GGUF order or, if `grouped`, in
/// `rows8`'s layout, and where its (m, n) output goes.
struct Job<'a> {
    t: BlockType,
    w: &'a [u8],
    grouped: bool,
    n: usize,
    out: OutPtr<f32>,
}

/// x (m, k) times W^T for each job's W. The activations are quantized once, and every
/// matrix's spans of rows run in one section of the pool: q, k and v of a decode step as
/// one pass over 1.1 MB instead of three, two of them too short to reach the memory's speed.
fn matmul_in(
    jobs: &[Job],
    k: usize,
    x: &[f32],
    m: usize,
    isa: Option<Isa>,
) -> Result<(), MapError> {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => matmul_with(jobs, k, x, m, isa, &mut s),
        Err(_) => matmul_with(jobs, k, x, m, isa, &mut Scratch::default()),
    })
}

/// A matmul's quantized activations, in the forms the kernels read (see `scratch` for why
/// they live outside the heap).
#[derive(Default)]
struct Scratch {
    act: crate::scratch::Scratch,
    sums: crate::scratch::Scratch,
    #[cfg(target_arch = "x86_64")]
    pairs: crate::scratch::Scratch,
}

thread_local! {
    /// Kept between the matmuls of a thread.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

fn matmul_with(
    jobs: &[Job],
    k: usize,
    x: &[f32],
    m: usize,
    isa: Option<Isa>,
    scratch: &mut Scratch,
) -> Result<(), MapError> {
    assert!(k.is_multiple_of(QK) && x.len() >= m * k);
    let nb = k / QK;
    let pool = crate::pool::global();
    let act: &mut [ActBlock] = scratch.act.slice(m * nb)?;
    crate::pool::for_chunks(act, nb, |start, row| {
        let i = start / nb;
        quantize_row(&x[i * k..(i + 1) * k], row)
    });
    let act = &*act;
    // The 512-bit tiles take the activations two rows at a time.
    #[cfg(target_arch = "x86_64")]
    let pairs: &[avx512::PairBlock] =
        if isa == Some(Isa::Avx512) && m > 1 && jobs.iter().any(|j| j.grouped) {
            let p = scratch.pairs.slice(m / 2 * nb)?;
            avx512::pairs(act, nb, m, p);
            p
        } else {
            &[]
        };
    // The activation blocks' sums `s`, packed, where a grouped matrix with offsets (Q4_1)
    // takes more than one row (its tiles read them once per group of weight rows).
    let sums: &[f32] = if m > 1 && jobs.iter().any(|j| j.grouped && j.t.needs_sum()) {
        let s = scratch.sums.slice(m * nb)?;
        s.iter_mut().zip(act).for_each(|(s, a)| *s = a.s);
        s
    } else {
        &[]
    };
    // Output features are split into spans (of whole groups, or of whole tiles of rows);
    // each task walks all m activation rows for its span, so a weight row is read from
    // memory once.
    let mut spans: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
    for (ji, j) in jobs.iter().enumerate() {
        if j.grouped {
            spans.extend(pool.spans(j.n.div_ceil(rows8::ROWS), 1).map(|r| (ji, r)));
        } else {
            assert!(j.w.len() >= j.n * nb * j.t.block_bytes());
            spans.extend(pool.spans(j.n, 8).map(|r| (ji, r)));
        }
    }
    pool.run(spans.len(), |s| {
        let (ji, r) = spans[s].clone();
        let j = &jobs[ji];
        #[cfg(target_arch = "x86_64")]
        if j.grouped {
            let geo = rows8::geometry(j.t).expect("grouped layout");
            assert!(j.w.len() >= j.n.div_ceil(rows8::ROWS) * geo.group_bytes(nb));
            if isa == Some(Isa::Avx512) {
                let f = avx512_kernel(j.t).expect("an AVX-512 kernel for every grouped type");
                // SAFETY: as below; `pairs` are this call's activations, the CPU has AVX-512.
                return unsafe { f(j.w, &geo, act, sums, pairs, nb, m, r, j.out.get(), j.n) };
            }
            let f = avx2::grouped_kernel(j.t).expect("grouped layout only where its kernel runs");
            // SAFETY: spans of groups are disjoint output columns, out holds m * n, and the
            // kernel was chosen for this CPU.
            return unsafe { f(j.w, &geo, act, sums, nb, m, r, j.out.get(), j.n) };
        }
        assert!(!j.grouped, "grouped layout without its kernel");
        let row_bytes = nb * j.t.block_bytes();
        // SAFETY: as above.
        unsafe { rows_scalar(j.t, j.w, row_bytes, act, nb, m, r, j.out.get(), j.n) }
    });
    Ok(())
}

#[cfg(target_arch = "x86_64")]
type Avx512Fn = unsafe fn(
    &[u8],
    &rows8::Geometry,
    &[ActBlock],
    &[f32],
    &[avx512::PairBlock],
    usize,
    usize,
    std::ops::Range<usize>,
    *mut f32,
    usize,
);

/// The 512-bit kernel of a grouped block type.
#[cfg(target_arch = "x86_64")]
fn avx512_kernel(t: BlockType) -> Option<Avx512Fn> {
    match t {
        BlockType::Q4_0 => Some(avx512::groups::<avx2::G4_0>),
        BlockType::Q4_1 => Some(avx512::groups::<avx2::G4_1>),
        BlockType::Q5_0 => Some(avx512::groups::<avx2::G5_0>),
        BlockType::Q5_1 => Some(avx512::groups::<avx2::G5_1>),
        BlockType::Q8_0 => Some(avx512::groups::<avx2::G8_0>),
    }
}

/// A weight matrix in GGML blocks, applied as a candle op (no gradient: inference only).
/// Where this CPU has the grouped kernels the blocks are repacked once, at load, into
/// `rows8`'s layout (the same bytes rearranged; `gguf_bytes` restores them).
#[derive(Debug, Clone)]
pub struct BlockMatrix {
    pub t: BlockType,
    bytes: std::sync::Arc<Vec<u8>>,
    grouped: bool,
    pub n: usize,
    pub k: usize,
}

impl BlockMatrix {
    /// `gguf`: n rows of k values in `t`'s blocks, as stored in a GGUF file.
    pub fn new(t: BlockType, gguf: &[u8], n: usize, k: usize) -> Self {
        assert!(k.is_multiple_of(QK) && gguf.len() == n * (k / QK) * t.block_bytes());
        #[cfg(target_arch = "x86_64")]
        let grouped = avx2::grouped_kernel(t).is_some();
        #[cfg(not(target_arch = "x86_64"))]
        let grouped = false;
        let bytes = if grouped {
            rows8::pack(t, gguf, n, k)
        } else {
            gguf.to_vec()
        };
        Self {
            t,
            bytes: std::sync::Arc::new(bytes),
            grouped,
            n,
            k,
        }
    }

    /// The weights in GGUF block order.
    pub fn gguf_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.grouped {
            rows8::unpack(self.t, &self.bytes, self.n, self.k).into()
        } else {
            self.bytes.as_slice().into()
        }
    }

    /// Row j widened to f32, as candle's dequantization computes it (`q * d`, `+ m`
    /// unfused): the embedding lookup of a tied matrix.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        self.widen_row(j, out, &mut Vec::new())
    }

    /// `dequantize_row` with `grouped_row` as the scratch a repacked row is unpacked into
    /// (zeroed first: unpacking ORs the nibbles in).
    fn widen_row(&self, j: usize, out: &mut [f32], grouped_row: &mut Vec<u8>) {
        let nb = self.k / QK;
        let bb = self.t.block_bytes();
        let row: &[u8] = if self.grouped {
            grouped_row.clear();
            grouped_row.resize(nb * bb, 0);
            rows8::unpack_row(self.t, &self.bytes, j, self.k, grouped_row);
            grouped_row
        } else {
            &self.bytes[j * nb * bb..][..nb * bb]
        };
        let mut q = [0i8; QK];
        for (blk, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            let (d, m) = unpack_block(self.t, blk, &mut q);
            for (y, &v) in o.iter_mut().zip(&q) {
                // No `+ 0` for the types without an offset: it would turn -0 into +0.
                *y = if self.t.needs_sum() {
                    v as f32 * d + m
                } else {
                    v as f32 * d
                };
            }
        }
    }

    /// Every row widened as `dequantize_row` widens it, into out (n x k), rows in parallel
    /// on rayon's threads: a frozen matrix for an f32 product (training over a quantized
    /// model).
    pub fn dequantize(&self, out: &mut [f32]) {
        use rayon::prelude::*;
        const ROWS: usize = 16;
        out[..self.n * self.k]
            .par_chunks_mut(ROWS * self.k)
            .enumerate()
            .for_each(|(c, rows)| {
                let mut scratch = Vec::new();
                for (i, row) in rows.chunks_exact_mut(self.k).enumerate() {
                    self.widen_row(c * ROWS + i, row, &mut scratch);
                }
            });
    }

    /// x (m, k) times the transpose of these weights into out (m, n).
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<(), MapError> {
        // SAFETY: the kernels store computed values only.
        Self::matmul_group(&[self], x, m, &mut [unsafe { crate::pool::as_uninit(out) }])
    }

    /// x (m, k) times the transpose of each matrix (all k wide) into its out (m, n_i): one
    /// quantization of x and one section of the kernel pool for all of them. Every output
    /// value is written (so the outputs may start uninitialised).
    pub fn matmul_group(
        ws: &[&BlockMatrix],
        x: &[f32],
        m: usize,
        outs: &mut [&mut [MaybeUninit<f32>]],
    ) -> Result<(), MapError> {
        Self::group_with(ws, x, m, outs, Isa::best())
    }

    /// `matmul_group` with the kernels of `isa` (the tests run every set the CPU has).
    fn group_with(
        ws: &[&BlockMatrix],
        x: &[f32],
        m: usize,
        outs: &mut [&mut [MaybeUninit<f32>]],
        isa: Option<Isa>,
    ) -> Result<(), MapError> {
        assert_eq!(ws.len(), outs.len());
        let Some(k) = ws.first().map(|w| w.k) else {
            return Ok(());
        };
        let jobs: Vec<Job> = ws
            .iter()
            .zip(outs.iter_mut())
            .map(|(w, out)| {
                assert!(w.k == k && out.len() >= m * w.n);
                Job {
                    t: w.t,
                    w: &w.bytes,
                    grouped: w.grouped,
                    n: w.n,
                    out: OutPtr(out.as_mut_ptr().cast()),
                }
            })
            .collect();
        matmul_in(&jobs, k, x, m, isa)
    }
}

impl CustomOp1 for BlockMatrix {
    fn name(&self) -> &'static str {
        "ggml-block-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        crate::ggml_math::matmul_fwd(s, l, "block matmul", self.n, self.k, |x, m, out| {
            Self::matmul_group(&[self], x, m, &mut [out])
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every block type.
    const TYPES: [BlockType; 5] = [
        BlockType::Q4_0,
        BlockType::Q4_1,
        BlockType::Q5_0,
        BlockType::Q5_1,
        BlockType::Q8_0,
    ];

    /// Every kernel set this CPU runs (the portable kernels where it has none).
    fn isas() -> Vec<Option<Isa>> {
        let v: Vec<Option<Isa>> = Isa::available().into_iter().map(Some).collect();
        if v.is_empty() {
            vec![None]
        } else {
            v
        }
    }

    /// `dequantize` widens every row exactly as candle's dequantization does (the values a
    /// Hugging Face export of a GGUF model holds), repacked rows included: 37 rows, more than
    /// two of its parallel chunks and not a multiple of the repacking's groups of eight.
    #[test]
    fn dequantize_matches_candle_bit_for_bit() {
        let dev = Device::Cpu;
        let (n, k) = (37, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 250.0 - 2.0) * (1.0 + (i % 5) as f32))
            .collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        for t in TYPES {
            let g = t.to_ggml();
            let q = QTensor::quantize(&w, g).unwrap();
            let want: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut got = vec![f32::NAN; n * k];
            BlockMatrix::new(t, &q.data().unwrap(), n, k).dequantize(&mut got);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{t:?}");
        }
    }

    /// Every block type against the dequantized weights times the (quantized) activations in
    /// plain f32: the only differences allowed are float summation order.
    #[test]
    fn block_dot_matches_dequantized_reference() {
        let dev = Device::Cpu;
        let (n, k, m) = (7, 96, 3);
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut normal = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| rng.random_range(-2f32..2.0) * rng.random_range(0f32..1.0))
                .collect()
        };
        let w = Tensor::from_vec(normal(n * k), (n, k), &dev).unwrap();
        let x = normal(m * k);
        for t in TYPES {
            let g = t.to_ggml();
            let q = QTensor::quantize(&w, g).unwrap();
            let bytes = q.data().unwrap().to_vec();
            let wd: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut out = vec![f32::NAN; m * n];
            BlockMatrix::new(t, &bytes, n, k)
                .matmul(&x, m, &mut out)
                .unwrap();
            for i in 0..m {
                let mut a = vec![
                    ActBlock {
                        d: 0.0,
                        s: 0.0,
                        qs: [0; QK]
                    };
                    k / QK
                ];
                quantize_row(&x[i * k..(i + 1) * k], &mut a);
                let xq: Vec<f32> = a
                    .iter()
                    .flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d))
                    .collect();
                for j in 0..n {
                    let direct = dot_row(
                        t,
                        &bytes
                            [j * (k / QK) * t.block_bytes()..(j + 1) * (k / QK) * t.block_bytes()],
                        &a,
                    );
                    assert_eq!(
                        out[i * n + j],
                        direct,
                        "{t:?} unpacked and direct block dots differ"
                    );
                    let mut want: f32 = (0..k).map(|c| wd[j * k + c] * xq[c]).sum();
                    if t.needs_sum() {
                        // ggml multiplies the block offset `m` by the f16-rounded activation
                        // sum `s`, not by the exact sum of the quantized activations: swap
                        // the exact term for ggml's so only summation order remains.
                        let row = &bytes[j * (k / QK) * t.block_bytes()..];
                        for (b, blk) in a.iter().enumerate() {
                            let mb = f16_at(row, b * t.block_bytes() + 2);
                            let exact: f32 = xq[b * QK..(b + 1) * QK].iter().sum();
                            want += mb * (blk.s - exact);
                        }
                    }
                    let got = out[i * n + j];
                    let scale: f32 = (0..k).map(|c| (wd[j * k + c] * xq[c]).abs()).sum();
                    let tol = 1e-5 * (1.0 + scale);
                    assert!((got - want).abs() < tol, "{t:?} [{i},{j}] {got} vs {want}");
                }
            }
        }
    }

    /// Random blocks of every type (raw bytes: any scale, any offset, any packed values,
    /// including Q8_0's -128) through the dispatched kernels against the scalar reference, bit
    /// for bit: the SIMD kernels do the same operations in the same order. Shapes cover one and
    /// many activation rows, weight rows off the tile and span sizes, and a k past the
    /// activation panel.
    #[test]
    fn kernels_equal_scalar_reference_on_odd_shapes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let types = [
            BlockType::Q4_0,
            BlockType::Q4_1,
            BlockType::Q5_0,
            BlockType::Q5_1,
            BlockType::Q8_0,
        ];
        for &(n, k, m) in &[
            (1, 32, 1),
            (3, 64, 2),
            (7, 96, 3),
            (9, 32, 5),
            (17, 288, 1),
            (33, 160, 7),
            (70, 64, 70),
            (130, 608, 4),
        ] {
            let nb = k / QK;
            let x: Vec<f32> = (0..m * k)
                .map(|_| rng.random_range(-3f32..3.0) * rng.random_range(0f32..1.0).powi(3))
                .collect();
            let mut act = vec![ActBlock::ZERO; m * nb];
            let mut act_ref = act.clone();
            for i in 0..m {
                quantize_row(&x[i * k..(i + 1) * k], &mut act[i * nb..(i + 1) * nb]);
                quantize_row_scalar(&x[i * k..(i + 1) * k], &mut act_ref[i * nb..(i + 1) * nb]);
            }
            for (a, b) in act.iter().zip(&act_ref) {
                assert_eq!(
                    (a.qs, a.d.to_bits(), a.s.to_bits()),
                    (b.qs, b.d.to_bits(), b.s.to_bits())
                );
            }
            let mut singles = Vec::new();
            for t in types {
                let bb = t.block_bytes();
                let mut w: Vec<u8> = (0..n * nb * bb).map(|_| rng.random()).collect();
                // Scales and offsets as finite f16 of moderate size (random bits would be
                // NaN or inf now and then, which compare unequal to themselves).
                for blk in w.chunks_exact_mut(bb) {
                    let d = f16::from_f32(rng.random_range(-0.05f32..0.05)).to_le_bytes();
                    blk[..2].copy_from_slice(&d);
                    if t.needs_sum() {
                        let m = f16::from_f32(rng.random_range(-0.5f32..0.5)).to_le_bytes();
                        blk[2..4].copy_from_slice(&m);
                    }
                }
                let bm = BlockMatrix::new(t, &w, n, k);
                assert_eq!(bm.gguf_bytes().as_ref(), w.as_slice());
                let row_bytes = nb * bb;
                let mut out = Vec::new();
                for isa in isas() {
                    out = vec![f32::NAN; m * n];
                    let o = unsafe { crate::pool::as_uninit(&mut out) };
                    BlockMatrix::group_with(&[&bm], &x, m, &mut [o], isa).unwrap();
                    for j in 0..n {
                        for i in 0..m {
                            let want = dot_row(
                                t,
                                &w[j * row_bytes..(j + 1) * row_bytes],
                                &act_ref[i * nb..(i + 1) * nb],
                            );
                            assert_eq!(
                                out[i * n + j].to_bits(),
                                want.to_bits(),
                                "{t:?} {isa:?} (grouped: {}) n={n} k={k} m={m} cell ({i}, {j}): \
                                 {} vs {want}",
                                bm.grouped,
                                out[i * n + j]
                            );
                        }
                    }
                }
                singles.push((bm, out));
            }
            // All five types (grouped layouts and GGUF order) as one group: each output as
            // its matrix alone gives it.
            let ws: Vec<&BlockMatrix> = singles.iter().map(|(bm, _)| bm).collect();
            for isa in isas() {
                let mut outs = vec![vec![f32::NAN; m * n]; ws.len()];
                let mut slices: Vec<&mut [MaybeUninit<f32>]> = outs
                    .iter_mut()
                    .map(|o| unsafe { crate::pool::as_uninit(o) })
                    .collect();
                BlockMatrix::group_with(&ws, &x, m, &mut slices, isa).unwrap();
                for ((bm, alone), grouped) in singles.iter().zip(&outs) {
                    let same = alone
                        .iter()
                        .zip(grouped)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{:?} {isa:?} n={n} k={k} m={m}: grouped call differs",
                        bm.t
                    );
                }
            }
        }
    }

    #[test]
    fn activation_rounding_is_half_to_even() {
        let mut x = vec![0f32; QK];
        x[0] = 127.0; // scale 1
        x[1] = 2.5;
        x[2] = -3.5;
        let mut a = [ActBlock {
            d: 0.0,
            s: 0.0,
            qs: [0; QK],
        }];
        quantize_row(&x, &mut a);
        assert_eq!((a[0].qs[1], a[0].qs[2]), (2, -4));
        let mut b = a;
        quantize_row_scalar(&x, &mut b);
        assert_eq!((a[0].qs, a[0].d, a[0].s), (b[0].qs, b[0].d, b[0].s));
        assert_eq!(a[0].s, 127.0 + 2.0 - 4.0);
    }
}
