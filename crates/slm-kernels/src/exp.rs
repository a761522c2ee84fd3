//! `exp` over slices, and the log-sum-exp normaliser built on it: the one exponential the
//! training ops, the fused head and evaluation share. (Inference keeps ggml's own `expf`
//! replica in ggml_math, whose roundings llama.cpp fixes.)

use candle_core::{Layout, WithDType};
use num_traits::Float;

/// The elements of a contiguous tensor's storage `x` under layout `l`.
pub fn contiguous<'a, T: WithDType>(
    x: &'a [T],
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&x[a..b]),
        None => candle_core::bail!("{op}: expects a contiguous tensor"),
    }
}

/// `exp` over a slice in place: f32 through a branch-free polynomial that the compiler
/// vectorises (AVX2+FMA when the CPU has them), f64 through the standard library.
///
/// Why by hand: the standard library's `expf` is a scalar call per element, and cross-entropy
/// takes two exponentials of every logit per step (67M for the tiny benchmark shape).
pub trait ExpInPlace: Float {
    fn exp_in_place(xs: &mut [Self]);
}

impl ExpInPlace for f64 {
    fn exp_in_place(xs: &mut [f64]) {
        xs.iter_mut().for_each(|x| *x = x.exp());
    }
}

impl ExpInPlace for f32 {
    fn exp_in_place(xs: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { exp_avx2(xs) };
        }
        exp_portable(xs)
    }
}

/// log(sum(exp(row))) with the exponentials from `exp_in_place`, summed in f64.
///
/// The maximum and the sum run over eight lanes, combined at the end: one running value was
/// a chain of dependent instructions, and over a vocabulary it was most of this function.
pub fn log_sum_exp<T: WithDType + ExpInPlace>(row: &[T], scratch: &mut Vec<T>) -> f64 {
    const LANES: usize = 8;
    let mut top = [T::neg_infinity(); LANES];
    let chunks = row.chunks_exact(LANES);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &x| Float::max(m, x));
    for c in chunks {
        for (t, &x) in top.iter_mut().zip(c) {
            *t = Float::max(*t, x);
        }
    }
    max = top.iter().fold(max, |m, &x| Float::max(m, x));
    scratch.clear();
    scratch.extend(row.iter().map(|&x| x - max));
    T::exp_in_place(scratch);
    let mut acc = [0f64; LANES];
    let chunks = scratch.chunks_exact(LANES);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&e| WithDType::to_f64(e))
        .sum();
    for c in chunks {
        for (a, &e) in acc.iter_mut().zip(c) {
            *a += WithDType::to_f64(e);
        }
    }
    WithDType::to_f64(max) + (acc.iter().sum::<f64>() + tail).ln()
}

/// `log_sum_exp` of every row of width `v` of `x`, rows in parallel on the kernel pool (rayon's
/// workers would spin against the pool's on the same cores): the normaliser of a log-softmax
/// over the vocabulary, for scoring continuations.
pub fn all_log_sum_exp<T: WithDType + ExpInPlace>(x: &[T], v: usize) -> Vec<f64> {
    let v = v.max(1);
    let mut out = vec![0f64; x.len() / v];
    crate::pool::for_chunks(&mut out, 8, |start, part| {
        let mut scratch = Vec::with_capacity(v);
        for (i, o) in part.iter_mut().enumerate() {
            *o = log_sum_exp(&x[(start + i) * v..][..v], &mut scratch);
        }
    });
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(xs: &mut [f32]) {
    exp_portable(xs)
}

/// Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, the degree-7 Taylor polynomial of e^r,
/// and 2^n applied as two powers of two built in the exponent bits (so that n from -150 to
/// 128 needs no special case: the products underflow to subnormals and 0, or overflow to
/// inf, exactly as exp does). Within 2 ulp of the standard library (tested).
#[inline(always)]
fn exp_portable(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    for x in xs.iter_mut() {
        let v = x.clamp(-104.0, 89.0);
        let n = (v * LOG2E).round_ties_even();
        let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, v));
        let p = r
            .mul_add(1.0 / 5040.0, 1.0 / 720.0)
            .mul_add(r, 1.0 / 120.0)
            .mul_add(r, 1.0 / 24.0)
            .mul_add(r, 1.0 / 6.0)
            .mul_add(r, 0.5)
            .mul_add(r, 1.0)
            .mul_add(r, 1.0);
        // n as an integer through the float's bits (n + 1.5 * 2^23 puts it in the low
        // mantissa bits): `as i32` saturates and checks for NaN element by element, which
        // kept the loop from vectorising. A NaN input stays NaN through p.
        let n = (n + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
        let half = n >> 1;
        let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
        *x = p * pow2(half) * pow2(n - half);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_within_two_ulp_of_the_standard_library() {
        let mut xs: Vec<f32> = (0..200_001).map(|i| -100.0 + i as f32 * 0.001).collect();
        xs.extend([
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            88.0,
            -87.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
        ]);
        let mut ys = xs.clone();
        f32::exp_in_place(&mut ys);
        let mut portable = xs.clone();
        exp_portable(&mut portable);
        assert_eq!(
            portable, ys,
            "the vectorised and portable builds agree bit for bit"
        );
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = x.exp();
            if want < f32::MIN_POSITIVE {
                assert!(y < 1e-37, "exp({x}) = {y}, want {want}");
            } else if want.is_infinite() {
                assert!(y.is_infinite(), "exp({x}) = {y}");
            } else {
                let ulps = (y.to_bits() as i64 - want.to_bits() as i64).abs();
                assert!(ulps <= 2, "exp({x}) = {y}, want {want} ({ulps} ulp)");
            }
        }
    }
}
