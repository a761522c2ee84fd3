//! Scalar replicas of the few ggml CPU kernels whose rounding differs by instruction set.
//!
//! SmolLM2 carries activations near 2e4 in a few channels, and every matmul quantizes its
//! input to 8 bits, so a one-ulp difference in SiLU or in an attention dot product flips a
//! rounding, and thirty layers later the logits move by 2%. llama.cpp itself moves that much
//! between its AVX2 and AVX-512 builds (measured: up to 2.4e-2 relative on the top-10 logits
//! of the reference prompts). Matching a llama.cpp run therefore means doing its arithmetic
//! in its order, for the instruction set it was built for. The reference fixtures come from an
//! AVX-512 build, which is the default here; `SLM_GGML_FLAVOR=avx2` reproduces an AVX2 build
//! (no fixture holds an AVX2 build's outputs; it was checked against a local llama.cpp once).
//! Neither is more accurate than the other: both are within a few ulp of the true values.

use candle_core::{CpuStorage, DType, Layout, Tensor};
use half::f16;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Whether the ggml-exact CPU ops apply: f32 tensors on the CPU that no gradient flows
/// through. Otherwise (training, GPU, other float types) the model uses candle's own ops.
pub fn exact_path(xs: &[&Tensor]) -> bool {
    xs.iter()
        .all(|x| !x.track_op() && x.device().is_cpu() && x.dtype() == DType::F32)
}

/// The values of a contiguous f32 CPU tensor, as the ggml-exact custom ops read their inputs.
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op} expects f32")
    };
    crate::exp::contiguous(v, l, op)
}

/// The forward of a weight-matrix op `x (.., k) W^T` for an n x k matrix: checks the input
/// width, lets `matmul(x, m, out)` fill the (m, n) output, keeps the leading dimensions.
/// `matmul` must write every output value when it returns Ok: the output is not zeroed
/// first (at 512 positions that zeroing was ~1.5% of a prompt, on the calling thread while
/// the pool's other threads waited).
pub fn matmul_fwd(
    s: &CpuStorage,
    l: &Layout,
    op: &str,
    n: usize,
    k: usize,
    matmul: impl FnOnce(&[f32], usize, &mut [std::mem::MaybeUninit<f32>]) -> candle_core::Result<()>,
) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
    let x = f32_slice(s, l, op)?;
    let dims = l.shape().dims();
    let width = *dims.last().unwrap_or(&0);
    if width != k {
        candle_core::bail!("{op}: input width {width}, weights expect {k}");
    }
    let m = x.len() / k;
    let mut out = Vec::with_capacity(m * n);
    matmul(x, m, &mut out.spare_capacity_mut()[..m * n])?;
    // SAFETY: `matmul` returned Ok, so it wrote all m * n values (its contract above).
    unsafe { out.set_len(m * n) };
    let mut od = dims.to_vec();
    *od.last_mut().expect("rank >= 1") = n;
    Ok((CpuStorage::F32(out), candle_core::Shape::from(od)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Avx512,
    Avx2,
}

pub fn flavor() -> Flavor {
    static FLAVOR: OnceLock<Flavor> = OnceLock::new();
    *FLAVOR.get_or_init(|| match std::env::var("SLM_GGML_FLAVOR").as_deref() {
        Ok("avx2") => Flavor::Avx2,
        _ => Flavor::Avx512,
    })
}

const SHIFT: u32 = 0x4b40_0000; // 0x1.8p23: adding it rounds to an integer
const LOG2E: u32 = 0x3fb8_aa3b;
const LN2_HI: u32 = 0x3f31_7200;
const LN2_LO: u32 = 0x35bf_be8e;
const C5: u32 = 0x3c07_2010;
const C4: u32 = 0x3d2b_9f17;
const C3: u32 = 0x3e2a_af33;
const C2: u32 = 0x3eff_fedb;
const C1: u32 = 0x3f7f_fff6;

fn c(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// ggml_v_expf, one lane. Both builds share the range reduction and polynomial; AVX-512
/// folds the constant 1 into the polynomial and scales with `vscalefps`, AVX2 adds it in the
/// final fused multiply-add against a power of two assembled in the exponent bits.
pub fn expf(x: f32) -> f32 {
    expf_in(x, flavor())
}

fn expf_in(x: f32, flavor: Flavor) -> f32 {
    let r = c(SHIFT);
    let z = x.mul_add(c(LOG2E), r);
    let n = z - r;
    let b = (-n).mul_add(c(LN2_LO), (-n).mul_add(c(LN2_HI), x));
    let u = b * b;
    let p = c(C5).mul_add(b, c(C4)).mul_add(u, c(C3).mul_add(b, c(C2)));
    match flavor {
        Flavor::Avx512 => {
            if n.abs() > 192.0 {
                return if n <= 0.0 { 0.0 } else { f32::INFINITY };
            }
            let j = p.mul_add(u, c(C1).mul_add(b, 1.0));
            // vscalefps: j * 2^n rounded once; the product is exact in f64.
            (j as f64 * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
        }
        Flavor::Avx2 => {
            let j = p.mul_add(u, c(C1) * b);
            let e = z.to_bits() << 23;
            let k = f32::from_bits(e.wrapping_add(1f32.to_bits()));
            if n.abs() <= 126.0 {
                return k.mul_add(j, k);
            }
            let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
            let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
            let s2 = f32::from_bits(e.wrapping_sub(g));
            if n.abs() > 192.0 {
                s1 * s1
            } else {
                s2.mul_add(j, s2) * s1
            }
        }
    }
}

/// `s[i] = expf(s[i] - max)` in place, each value as ggml_v_expf computes it (the values
/// ggml_vec_soft_max_f32 stores).
pub fn exp_sub(s: &mut [f32], max: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features.
        return unsafe { x86::exp_sub(s, max, flavor()) };
    }
    let f = flavor();
    for x in s.iter_mut() {
        *x = expf_in(*x - max, f);
    }
}

/// ggml_vec_soft_max_f32: the exponentials of `s[i] - max` in place, and their sum as that
/// function forms it: each vector's lanes added pairwise as the build's reduction does
/// (AVX-512: `_mm512_reduce_add_ps`, halves of 8, 4, then 2 + 2 lanes; AVX2: halves of 4,
/// then 2 + 2 lanes), the vectors' sums added in f64, a short tail through libm's expf.
pub fn soft_max(s: &mut [f32], max: f32) -> f64 {
    let f = flavor();
    let lanes = match f {
        Flavor::Avx512 => 16,
        Flavor::Avx2 => 8,
    };
    let np = s.len() - s.len() % lanes;
    exp_sub(&mut s[..np], max);
    let mut sum = 0f64;
    for c in s[..np].chunks_exact(lanes) {
        let quad: [f32; 4] = match f {
            Flavor::Avx512 => {
                let half: [f32; 8] = std::array::from_fn(|i| c[8 + i] + c[i]);
                std::array::from_fn(|i| half[4 + i] + half[i])
            }
            Flavor::Avx2 => std::array::from_fn(|i| c[4 + i] + c[i]),
        };
        sum += ((quad[0] + quad[2]) + (quad[1] + quad[3])) as f64;
    }
    for x in &mut s[np..] {
        *x = (*x - max).exp();
        sum += *x as f64;
    }
    sum
}

/// ggml_vec_swiglu_f32: `silu(g) * u` with silu as `x / (1 + expf(-x))`.
pub fn swiglu(g: f32, u: f32) -> f32 {
    g / (1.0 + expf(-g)) * u
}

/// `swiglu` over whole rows: `out[i] = silu(g[i]) * u[i]`, eight or sixteen at a time as
/// ggml's vector loop does (the same values as `swiglu` element by element).
/// Every value of `out` is written.
pub fn swiglu_slice(g: &[f32], u: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
    assert!(g.len() == u.len() && u.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features; lengths are equal.
        return unsafe { x86::swiglu(g, u, out, flavor()) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        o.write(swiglu(g, u));
    }
}

/// Rotation of rows of width `d` by per-position tables of d/2 values, as ggml's
/// `rotate_pairs` compiles (GCC contracts `x0*cos - x1*sin` into one fused multiply-add).
/// Pairs are adjacent (`interleaved`) or half a row apart. Row r is at table position
/// (r / per) % positions: `per` = 1 for (.., heads, seq, d), `per` = heads for (seq, heads, d).
#[derive(Debug, Clone, Copy)]
pub struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    pub positions: usize,
    pub per: usize,
    pub d: usize,
    pub interleaved: bool,
}

impl Rope<'_> {
    /// The rotation of `x`, whole rows, on the kernel pool.
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let d = self.d.max(1);
        // Parts of about 16 KB of whole rows: enough to share, few enough to be cheap.
        let chunk = (4096 / d).max(1) * d;
        // SAFETY: `rows` writes every value of its part.
        unsafe {
            crate::pool::fill_chunks(x.len(), chunk, |start, part| {
                self.rows(&x[start..start + part.len()], start / d, part)
            })
        }
    }

    /// Rows `first_row..` of the whole: `x` into `y` (equal lengths, whole rows).
    pub fn rows(&self, x: &[f32], first_row: usize, y: &mut [MaybeUninit<f32>]) {
        assert_eq!(x.len(), y.len());
        assert!(self.cos.len() >= self.positions * self.d / 2 && self.sin.len() == self.cos.len());
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has the features (the body is the portable code, compiled with
            // FMA so that `mul_add` is one instruction instead of a library call).
            return unsafe { x86::rope_rows(self, x, first_row, y) };
        }
        self.rows_portable(x, first_row, y)
    }

    #[inline(always)]
    fn rows_portable(&self, x: &[f32], first_row: usize, y: &mut [MaybeUninit<f32>]) {
        let d = self.d;
        let (step, offset) = if self.interleaved { (2, 1) } else { (1, d / 2) };
        for (row, (xr, yr)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            let p = ((first_row + row) / self.per) % self.positions;
            let (cr, sr) = (
                &self.cos[p * d / 2..][..d / 2],
                &self.sin[p * d / 2..][..d / 2],
            );
            for i in 0..d / 2 {
                let (cos, sin) = (cr[i], sr[i]);
                let j = i * step;
                let (x0, x1) = (xr[j], xr[j + offset]);
                yr[j].write(x0.mul_add(cos, -(x1 * sin)));
                yr[j + offset].write(x0.mul_add(sin, x1 * cos));
            }
        }
    }
}

/// The widest x86 kernels a matrix product may use. AVX-512 kernels compute the same cells as
/// the AVX2 ones, bit for bit; `SLM_KERNELS=avx2` keeps to AVX2 (to compare the two, or where
/// 512-bit code lowers the clock more than it gains).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Avx2,
    Avx512,
}

impl Isa {
    /// The widest this CPU has (None without AVX2, FMA and F16C: the portable kernels).
    pub fn best() -> Option<Isa> {
        static BEST: OnceLock<Option<Isa>> = OnceLock::new();
        *BEST.get_or_init(|| {
            let only_avx2 = match std::env::var("SLM_KERNELS") {
                Ok(v) if v == "avx2" => true,
                Ok(v) => {
                    tracing::warn!(
                        "SLM_KERNELS={v:?} is not a kernel set (expected \"avx2\"); ignored"
                    );
                    false
                }
                Err(_) => false,
            };
            if has_avx512() && !only_avx2 {
                Some(Isa::Avx512)
            } else if has_avx2() {
                Some(Isa::Avx2)
            } else {
                None
            }
        })
    }

    /// Every kernel set this CPU can run, narrowest first (what the tests compare).
    pub fn available() -> Vec<Isa> {
        let mut v = Vec::new();
        if has_avx2() {
            v.push(Isa::Avx2);
        }
        if has_avx512() {
            v.push(Isa::Avx512);
        }
        v
    }
}

/// Whether this CPU has the AVX-512 subsets the 512-bit kernels use (F, BW, VL, VNNI) beside
/// AVX2, FMA and F16C; checked once.
pub fn has_avx512() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            has_avx2()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether this CPU runs the x86 kernels (AVX2, FMA and F16C); checked once.
pub fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// ggml_vec_dot_f16 (flash attention's K·Q): four accumulators of `lanes` f32 fed with fused
/// multiply-adds, folded as (a0+a2)+(a1+a3), then reduced across lanes in the order of the
/// build's horizontal add; a tail past the last full step is added in f64.
pub fn dot_f16(k: &[f16], q: &[f32]) -> f32 {
    assert_eq!(k.len(), q.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features; lengths are equal.
        return unsafe { x86::dot_f16(k, q, flavor()) };
    }
    match flavor() {
        Flavor::Avx512 => dot_f16_lanes::<16>(k, q),
        Flavor::Avx2 => dot_f16_lanes::<8>(k, q),
    }
}

/// ggml_vec_mad_f16: `y = f16(x * v + y)` element by element (one rounding of a fused
/// multiply-add, then to f16).
pub fn mad_f16(y: &mut [f16], x: &[f16], v: f32) {
    assert_eq!(y.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features; lengths are equal.
        return unsafe { x86::mad_f16(y, x, v) };
    }
    for (a, b) in y.iter_mut().zip(x) {
        *a = f16::from_f32(b.to_f32().mul_add(v, a.to_f32()));
    }
}

/// ggml_vec_scale_f16: `y = f16(y * v)`.
pub fn scale_f16(y: &mut [f16], v: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features.
        return unsafe { x86::scale_f16(y, v) };
    }
    for a in y.iter_mut() {
        *a = f16::from_f32(a.to_f32() * v);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{f16, Flavor};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2, FMA and F16C; `k.len() == q.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(k: &[f16], q: &[f32], flavor: Flavor) -> f32 {
        let n = k.len();
        let (kp, qp) = (k.as_ptr() as *const u16, q.as_ptr());
        let ld = |i: usize| _mm256_cvtph_ps(_mm_loadu_si128(kp.add(i) as *const __m128i));
        let lq = |i: usize| _mm256_loadu_ps(qp.add(i));
        let (total, np) = match flavor {
            Flavor::Avx512 => {
                // Four accumulators of 16 lanes: a[2j] the low eight lanes of the j-th.
                let np = n - n % 64;
                let mut a = [_mm256_setzero_ps(); 8];
                for i in (0..np).step_by(64) {
                    for (x, acc) in a.iter_mut().enumerate() {
                        let idx = i + x * 8;
                        *acc = _mm256_fmadd_ps(ld(idx), lq(idx), *acc);
                    }
                }
                let lo = _mm256_add_ps(_mm256_add_ps(a[0], a[4]), _mm256_add_ps(a[2], a[6]));
                let hi = _mm256_add_ps(_mm256_add_ps(a[1], a[5]), _mm256_add_ps(a[3], a[7]));
                let t3 = _mm256_add_ps(hi, lo);
                let t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
                let r = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
                (_mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r))), np)
            }
            Flavor::Avx2 => {
                let np = n - n % 32;
                let mut a = [_mm256_setzero_ps(); 4];
                for i in (0..np).step_by(32) {
                    for (x, acc) in a.iter_mut().enumerate() {
                        let idx = i + x * 8;
                        *acc = _mm256_fmadd_ps(ld(idx), lq(idx), *acc);
                    }
                }
                let v = _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
                let t0 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let t1 = _mm_hadd_ps(t0, t0);
                (_mm_cvtss_f32(_mm_hadd_ps(t1, t1)), np)
            }
        };
        let mut sum = total as f64;
        for i in np..n {
            sum += (k[i].to_f32() * q[i]) as f64;
        }
        sum as f32
    }

    /// # Safety
    /// FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rope_rows(
        r: &super::Rope,
        x: &[f32],
        first_row: usize,
        y: &mut [std::mem::MaybeUninit<f32>],
    ) {
        r.rows_portable(x, first_row, y)
    }

    /// ggml_v_expf of eight lanes, in the arithmetic of `flavor` (see `super::expf`).
    #[inline(always)]
    unsafe fn expf8(x: __m256, flavor: Flavor) -> __m256 {
        let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
        let r = c(super::SHIFT);
        let z = _mm256_fmadd_ps(x, c(super::LOG2E), r);
        let n = _mm256_sub_ps(z, r);
        let b = _mm256_fnmadd_ps(
            n,
            c(super::LN2_LO),
            _mm256_fnmadd_ps(n, c(super::LN2_HI), x),
        );
        let u = _mm256_mul_ps(b, b);
        let p = _mm256_fmadd_ps(
            _mm256_fmadd_ps(c(super::C5), b, c(super::C4)),
            u,
            _mm256_fmadd_ps(c(super::C3), b, c(super::C2)),
        );
        let absn = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let big = _mm256_cmp_ps::<_CMP_GT_OQ>(absn, _mm256_set1_ps(192.0));
        let nonpos = _mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps());
        match flavor {
            Flavor::Avx512 => {
                let j =
                    _mm256_fmadd_ps(p, u, _mm256_fmadd_ps(c(super::C1), b, _mm256_set1_ps(1.0)));
                // vscalefps: j * 2^n rounded once, done exactly in f64 four lanes at a time.
                let ni = _mm256_cvtps_epi32(n);
                let scale = |j4: __m128, n4: __m128i| {
                    let e = _mm256_slli_epi64::<52>(_mm256_add_epi64(
                        _mm256_cvtepi32_epi64(n4),
                        _mm256_set1_epi64x(1023),
                    ));
                    _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(j4), _mm256_castsi256_pd(e)))
                };
                let lo = scale(_mm256_castps256_ps128(j), _mm256_castsi256_si128(ni));
                let hi = scale(_mm256_extractf128_ps(j, 1), _mm256_extracti128_si256(ni, 1));
                let res = _mm256_set_m128(hi, lo);
                let alt = _mm256_andnot_ps(nonpos, _mm256_set1_ps(f32::INFINITY));
                _mm256_blendv_ps(res, alt, big)
            }
            Flavor::Avx2 => {
                let j = _mm256_fmadd_ps(p, u, _mm256_mul_ps(c(super::C1), b));
                let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
                let k = _mm256_castsi256_ps(_mm256_add_epi32(
                    e,
                    _mm256_castps_si256(_mm256_set1_ps(1.0)),
                ));
                let mid = _mm256_cmp_ps::<_CMP_GT_OQ>(absn, _mm256_set1_ps(126.0));
                let g = _mm256_and_si256(
                    _mm256_castps_si256(nonpos),
                    _mm256_set1_epi32(0x8200_0000u32 as i32),
                );
                let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
                let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
                let scaled = _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1);
                let plain = _mm256_fmadd_ps(k, j, k);
                let r = _mm256_blendv_ps(plain, scaled, mid);
                _mm256_blendv_ps(r, _mm256_mul_ps(s1, s1), big)
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn exp_sub(s: &mut [f32], max: f32, flavor: Flavor) {
        let n = s.len();
        let np = n - n % 8;
        let (p, m) = (s.as_mut_ptr(), _mm256_set1_ps(max));
        for i in (0..np).step_by(8) {
            let e = expf8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m), flavor);
            _mm256_storeu_ps(p.add(i), e);
        }
        for x in &mut s[np..] {
            *x = super::expf_in(*x - max, flavor);
        }
    }

    /// # Safety
    /// AVX2 and FMA; equal lengths.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn swiglu(
        g: &[f32],
        u: &[f32],
        out: &mut [std::mem::MaybeUninit<f32>],
        flavor: Flavor,
    ) {
        let n = g.len();
        let np = n - n % 8;
        let one = _mm256_set1_ps(1.0);
        let o = out.as_mut_ptr().cast::<f32>();
        for i in (0..np).step_by(8) {
            let x = _mm256_loadu_ps(g.as_ptr().add(i));
            let e = expf8(_mm256_sub_ps(_mm256_setzero_ps(), x), flavor);
            let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
            let y = _mm256_mul_ps(silu, _mm256_loadu_ps(u.as_ptr().add(i)));
            _mm256_storeu_ps(o.add(i), y);
        }
        for i in np..n {
            out[i].write(super::swiglu(g[i], u[i]));
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; `y.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn mad_f16(y: &mut [f16], x: &[f16], v: f32) {
        let n = y.len();
        let (yp, xp) = (y.as_mut_ptr() as *mut u16, x.as_ptr() as *const u16);
        let vv = _mm256_set1_ps(v);
        let np = n - n % 8;
        for i in (0..np).step_by(8) {
            let a = _mm256_cvtph_ps(_mm_loadu_si128(yp.add(i) as *const __m128i));
            let b = _mm256_cvtph_ps(_mm_loadu_si128(xp.add(i) as *const __m128i));
            let r = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_fmadd_ps(b, vv, a));
            _mm_storeu_si128(yp.add(i) as *mut __m128i, r);
        }
        for i in np..n {
            y[i] = f16::from_f32(x[i].to_f32().mul_add(v, y[i].to_f32()));
        }
    }

    /// # Safety
    /// AVX2 and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scale_f16(y: &mut [f16], v: f32) {
        let n = y.len();
        let yp = y.as_mut_ptr() as *mut u16;
        let vv = _mm256_set1_ps(v);
        let np = n - n % 8;
        for i in (0..np).step_by(8) {
            let a = _mm256_cvtph_ps(_mm_loadu_si128(yp.add(i) as *const __m128i));
            let r = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_mul_ps(a, vv));
            _mm_storeu_si128(yp.add(i) as *mut __m128i, r);
        }
        for a in &mut y[np..] {
            *a = f16::from_f32(a.to_f32() * v);
        }
    }
}

fn dot_f16_lanes<const L: usize>(k: &[f16], q: &[f32]) -> f32 {
    let n = k.len();
    let step = 4 * L;
    let np = n - n % step;
    let mut acc = [[0f32; L]; 4];
    for i in (0..np).step_by(step) {
        for (j, a) in acc.iter_mut().enumerate() {
            for (l, lane) in a.iter_mut().enumerate() {
                let idx = i + j * L + l;
                *lane = k[idx].to_f32().mul_add(q[idx], *lane);
            }
        }
    }
    let mut v = [0f32; L];
    for (l, x) in v.iter_mut().enumerate() {
        *x = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let total = if L == 16 {
        // _mm512_reduce_add_ps: halves folded 256, 128, 64, then the last pair.
        let t3: Vec<f32> = (0..8).map(|l| v[l + 8] + v[l]).collect();
        let t6: Vec<f32> = (0..4).map(|l| t3[l + 4] + t3[l]).collect();
        (t6[0] + t6[2]) + (t6[1] + t6[3])
    } else {
        // 128-bit halves added, then two _mm_hadd_ps.
        let t0: Vec<f32> = (0..4).map(|l| v[l] + v[l + 4]).collect();
        (t0[0] + t0[1]) + (t0[2] + t0[3])
    };
    let mut sum = total as f64;
    for i in np..n {
        sum += (k[i].to_f32() * q[i]) as f64;
    }
    sum as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml_vec_soft_max_f32: each value of the vector part exactly `expf(x - max)` (ggml's
    /// vectorised expf, on the eight-lane and scalar paths alike), the tail libm's `expf`,
    /// masked values (-inf) exactly 0, and the sum within rounding of an f64 sum.
    #[test]
    fn soft_max_values_and_sum() {
        let lanes = match flavor() {
            Flavor::Avx512 => 16,
            Flavor::Avx2 => 8,
        };
        for n in [1, 7, 8, 9, 16, 31, 64, 100] {
            let mut x: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 23) as f32 * 0.9 - 15.0)
                .collect();
            if n > 3 {
                x[3] = f32::NEG_INFINITY;
            }
            let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut y = x.clone();
            let sum = soft_max(&mut y, max);
            let np = n - n % lanes;
            let mut want = 0f64;
            for (i, (a, &b)) in y.iter().zip(&x).enumerate() {
                let e = if i < np {
                    expf(b - max)
                } else {
                    (b - max).exp()
                };
                assert_eq!(a.to_bits(), e.to_bits(), "n {n}: exp({b} - {max})");
                want += *a as f64;
            }
            if n > 3 {
                assert_eq!(y[3], 0.0);
            }
            assert!((sum - want).abs() <= want * 1e-6, "n {n}: {sum} vs {want}");
        }
    }

    #[test]
    fn expf_is_within_two_ulp_of_libm() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (expf(x), x.exp());
            worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
            x += 0.0137;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        assert_eq!(expf(0.0), 1.0);
    }

    /// The x86 kernels against the scalar code, bit for bit, over lengths with and without
    /// tails.
    #[test]
    fn f16_kernels_equal_scalar() {
        for n in [8, 31, 64, 70, 128, 131] {
            let k: Vec<f16> = (0..n)
                .map(|i| f16::from_f32(((i * 37 % 101) as f32 - 50.0) * 0.031))
                .collect();
            let q: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let want = match flavor() {
                Flavor::Avx512 => dot_f16_lanes::<16>(&k, &q),
                Flavor::Avx2 => dot_f16_lanes::<8>(&k, &q),
            };
            assert_eq!(dot_f16(&k, &q).to_bits(), want.to_bits(), "dot n={n}");
            let mut y = k.clone();
            mad_f16(
                &mut y,
                &k[..n].iter().rev().copied().collect::<Vec<_>>(),
                0.77,
            );
            for (i, (a, b)) in y.iter().zip(&k).enumerate() {
                let want = f16::from_f32(k[n - 1 - i].to_f32().mul_add(0.77, b.to_f32()));
                assert_eq!(a.to_bits(), want.to_bits(), "mad n={n} i={i}");
            }
            let mut y = k.clone();
            scale_f16(&mut y, 0.3);
            for (a, b) in y.iter().zip(&k) {
                assert_eq!(a.to_bits(), f16::from_f32(b.to_f32() * 0.3).to_bits());
            }
        }
    }

    /// The vector SiLU against the scalar replica bit for bit, across the ranges where expf
    /// takes its different branches (|n| <= 126, up to 192, beyond).
    #[test]
    fn swiglu_slice_equals_scalar() {
        let mut g: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.071).collect();
        g.extend([
            0.0, -0.0, 1e-30, -1e-30, 87.5, -87.5, 88.9, -88.9, 100.0, -100.0, 140.0, -140.0,
        ]);
        g.extend([f32::INFINITY, f32::NEG_INFINITY, 3e4, -3e4]);
        g.truncate(g.len() - g.len() % 8);
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut out = vec![0f32; g.len()];
        for flavor in [Flavor::Avx512, Flavor::Avx2] {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: features checked, equal lengths; the kernel stores values only.
                unsafe { x86::swiglu(&g, &u, crate::pool::as_uninit(&mut out), flavor) };
            }
            #[cfg(not(target_arch = "x86_64"))]
            // SAFETY: swiglu_slice stores values only.
            swiglu_slice(&g, &u, unsafe { crate::pool::as_uninit(&mut out) });
            for i in 0..g.len() {
                let want = g[i] / (1.0 + expf_in(-g[i], flavor)) * u[i];
                assert!(
                    out[i].to_bits() == want.to_bits() || (out[i].is_nan() && want.is_nan()),
                    "{flavor:?} g={} got {} want {}",
                    g[i],
                    out[i],
                    want
                );
            }
        }
    }

    #[test]
    fn f16_dot_matches_f64_sum() {
        let k: Vec<f16> = (0..80)
            .map(|i| f16::from_f32(i as f32 * 0.01 - 0.3))
            .collect();
        let q: Vec<f32> = (0..80).map(|i| (i as f32 * 0.37).sin()).collect();
        let want: f64 = k.iter().zip(&q).map(|(a, b)| a.to_f64() * *b as f64).sum();
        assert!((dot_f16(&k, &q) as f64 - want).abs() < 1e-5);
    }
}
