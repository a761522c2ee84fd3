//! A low-rank adapter (LoRA) beside a frozen linear layer, in training:
//! `y += s · (x · Aᵀ) · Bᵀ` with A (r x k) and B (m x r), forward and backward. `y` may be a
//! stretch of columns inside wider rows (the trainer's fused q|k|v and gate|up outputs), so
//! both take a row stride for y and dy. The frozen layer's own products stay in `gemm::linear`.

use crate::gemm::{gemm, View};

/// Rows, input width, output width and rank of an adapter, and the row stride of y and dy.
#[derive(Clone, Copy, Debug)]
pub struct LoraShape {
    pub n: usize,
    pub k: usize,
    pub m: usize,
    pub r: usize,
    pub y_stride: usize,
}

impl LoraShape {
    fn check(&self, y_len: usize, x_len: usize, a_len: usize, b_len: usize) {
        let Self {
            n,
            k,
            m,
            r,
            y_stride,
        } = *self;
        assert!(m <= y_stride, "{m} columns in rows of {y_stride}");
        assert!(
            n == 0 || y_len >= (n - 1) * y_stride + m,
            "y: {y_len} values"
        );
        assert!(x_len >= n * k && a_len >= r * k && b_len >= m * r);
    }
}

/// Inverted dropout of an adapter's input, as PEFT's `lora_dropout` applies it before A:
/// each value kept with probability 1 - p and scaled by 1 / (1 - p), else 0. The mask is a
/// function of `seed` and the value's index (counter-based), so backward rebuilds it instead
/// of keeping it. p is rounded to a multiple of 1/65536 (each value draws 16 bits), and the
/// scale is that of the rounded p, so the expectation is exactly x.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// Values per task of the dropout loops (a multiple of the 4 values one hash serves).
const DROP_CHUNK: usize = 1 << 14;

impl Dropout {
    fn threshold(&self) -> u32 {
        assert!((0.0..1.0).contains(&self.p), "dropout {}", self.p);
        (self.p as f64 * 65536.0).round().min(65535.0) as u32
    }

    /// Calls `f(chunk, first index, scales)` over `out` in chunks on the rayon pool, with
    /// each value's scale: 1 / (1 - p) where it is kept, else 0.
    fn each_chunk(&self, out: &mut [f32], f: impl Fn(&mut [f32], usize, &[f32]) + Sync) {
        use rayon::prelude::*;
        let thr = self.threshold();
        let keep = (65536.0 / (65536 - thr) as f64) as f32;
        out.par_chunks_mut(DROP_CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut scales = [0f32; DROP_CHUNK];
                let first = c * DROP_CHUNK;
                for (q, quad) in scales[..chunk.len()].chunks_mut(4).enumerate() {
                    let h = splitmix64(self.seed ^ ((first / 4 + q) as u64).wrapping_mul(GOLDEN));
                    for (j, s) in quad.iter_mut().enumerate() {
                        let bits = (h >> (16 * j)) as u16 as u32;
                        *s = if bits >= thr { keep } else { 0.0 };
                    }
                }
                f(chunk, first, &scales[..chunk.len()]);
            });
    }

    /// `out = dropout(x)`.
    pub fn apply(&self, out: &mut [f32], x: &[f32]) {
        assert!(out.len() <= x.len());
        self.each_chunk(out, |o, first, scales| {
            for ((o, &x), &s) in o.iter_mut().zip(&x[first..]).zip(scales) {
                *o = x * s;
            }
        });
    }

    /// `dx += dropout'(dxt)`: the gradient through the same mask and scale.
    pub fn backward_add(&self, dx: &mut [f32], dxt: &[f32]) {
        assert!(dx.len() <= dxt.len());
        self.each_chunk(dx, |d, first, scales| {
            for ((d, &g), &s) in d.iter_mut().zip(&dxt[first..]).zip(scales) {
                *d += g * s;
            }
        });
    }
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function: a well-mixed 64-bit hash of a counter.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `t = x · Aᵀ` (n x r, kept for backward), then `y += s · t · Bᵀ`.
pub fn forward(
    y: &mut [f32],
    t: &mut [f32],
    x: &[f32],
    a: &[f32],
    b: &[f32],
    sh: LoraShape,
    s: f32,
) {
    sh.check(y.len(), x.len(), a.len(), b.len());
    let LoraShape {
        n,
        k,
        m,
        r,
        y_stride,
    } = sh;
    assert!(t.len() >= n * r);
    // SAFETY: the checks above bound every element addressed in x, A, B, t and y's rows.
    unsafe {
        gemm(
            t.as_mut_ptr(),
            r,
            false,
            (n, r, k),
            View::rows(x, k),
            View::transposed(a, k),
            1.0,
            true,
        );
        gemm(
            y.as_mut_ptr(),
            y_stride,
            true,
            (n, m, r),
            View::rows(t, r),
            View::transposed(b, r),
            s,
            true,
        );
    }
}

/// Gradients from dy (n rows of stride `y_stride`, m columns): `dB += s · dyᵀ · t`,
/// `dt = s · dy · B` (scratch, n x r), `dA += dtᵀ · x`, and `dx += dt · A` (the frozen
/// layer's input gradient is already in dx).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dx: &mut [f32],
    da: &mut [f32],
    db: &mut [f32],
    dt: &mut [f32],
    dy: &[f32],
    x: &[f32],
    t: &[f32],
    a: &[f32],
    b: &[f32],
    sh: LoraShape,
    s: f32,
) {
    sh.check(dy.len(), x.len(), a.len(), b.len());
    let LoraShape {
        n,
        k,
        m,
        r,
        y_stride,
    } = sh;
    assert!(dx.len() >= n * k && da.len() >= r * k && db.len() >= m * r);
    assert!(t.len() >= n * r && dt.len() >= n * r);
    // SAFETY: as in `forward`; dt and t are n x r, dA r x k, dB m x r.
    unsafe {
        gemm(
            db.as_mut_ptr(),
            r,
            true,
            (m, r, n),
            View::transposed(dy, y_stride),
            View::rows(t, r),
            s,
            true,
        );
        gemm(
            dt.as_mut_ptr(),
            r,
            false,
            (n, r, m),
            View::rows(dy, y_stride),
            View::rows(b, r),
            s,
            true,
        );
        gemm(
            da.as_mut_ptr(),
            k,
            true,
            (r, k, n),
            View::transposed(dt, r),
            View::rows(x, k),
            1.0,
            true,
        );
        gemm(
            dx.as_mut_ptr(),
            k,
            true,
            (n, k, r),
            View::rows(dt, r),
            View::rows(a, k),
            1.0,
            true,
        );
    }
}

/// The adapter against the products written out in f64: outputs into a stretch of wider
/// rows, every gradient added onto what was there, on odd shapes (rank 1, more rank than
/// rows). f32 sums in another order: within 1e-5 of the largest value.
#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        let largest = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * largest.max(1.0),
                "{what}[{i}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn forward_and_backward_match_the_products_written_out() {
        for (n, k, m, r, stride, col) in
            [(5, 7, 3, 2, 11, 4), (3, 4, 6, 1, 6, 0), (2, 9, 5, 8, 13, 8)]
        {
            let sh = LoraShape {
                n,
                k,
                m,
                r,
                y_stride: stride,
            };
            let s = 0.75f32;
            let (x, a, b) = (values(n * k, 1), values(r * k, 2), values(m * r, 3));
            let y0 = values(n * stride, 4);
            let mut y = y0.clone();
            let mut t = vec![0f32; n * r];
            forward(&mut y[col..], &mut t, &x, &a, &b, sh, s);
            let tt = |i: usize, j: usize| {
                (0..k)
                    .map(|c| x[i * k + c] as f64 * a[j * k + c] as f64)
                    .sum::<f64>()
            };
            let mut want = y0.iter().map(|&v| v as f64).collect::<Vec<_>>();
            for i in 0..n {
                for o in 0..m {
                    want[i * stride + col + o] +=
                        s as f64 * (0..r).map(|j| tt(i, j) * b[o * r + j] as f64).sum::<f64>();
                }
            }
            close(&y, &want, "y");

            let dy = values(n * stride, 5);
            let (dx0, da0, db0) = (values(n * k, 6), values(r * k, 7), values(m * r, 8));
            let (mut dx, mut da, mut db) = (dx0.clone(), da0.clone(), db0.clone());
            let mut dt = vec![0f32; n * r];
            backward(
                &mut dx,
                &mut da,
                &mut db,
                &mut dt,
                &dy[col..],
                &x,
                &t,
                &a,
                &b,
                sh,
                s,
            );
            let g = |i: usize, o: usize| dy[i * stride + col + o] as f64;
            let dtt = |i: usize, j: usize| {
                s as f64 * (0..m).map(|o| g(i, o) * b[o * r + j] as f64).sum::<f64>()
            };
            let want_db: Vec<f64> = (0..m * r)
                .map(|e| {
                    let (o, j) = (e / r, e % r);
                    db0[e] as f64 + s as f64 * (0..n).map(|i| g(i, o) * tt(i, j)).sum::<f64>()
                })
                .collect();
            let want_da: Vec<f64> = (0..r * k)
                .map(|e| {
                    let (j, c) = (e / k, e % k);
                    da0[e] as f64 + (0..n).map(|i| dtt(i, j) * x[i * k + c] as f64).sum::<f64>()
                })
                .collect();
            let want_dx: Vec<f64> = (0..n * k)
                .map(|e| {
                    let (i, c) = (e / k, e % k);
                    dx0[e] as f64 + (0..r).map(|j| dtt(i, j) * a[j * k + c] as f64).sum::<f64>()
                })
                .collect();
            close(&db, &want_db, "dB");
            close(&da, &want_da, "dA");
            close(&dx, &want_dx, "dx");
        }
    }

    /// The share dropped is p within five standard deviations, kept values are scaled by
    /// 1 / (1 - p), the mask depends on the seed alone (not on the chunking or a second call),
    /// and backward passes gradients through the same mask.
    #[test]
    fn dropout_keeps_one_minus_p_and_backward_uses_the_same_mask() {
        let n = 3 * DROP_CHUNK + 7;
        let x: Vec<f32> = (0..n).map(|i| 1.0 + (i % 13) as f32).collect();
        for p in [0.0f32, 0.1, 0.5] {
            let d = Dropout { p, seed: 42 };
            let mut y = vec![f32::NAN; n];
            d.apply(&mut y, &x);
            let dropped = y.iter().filter(|&&v| v == 0.0).count() as f64;
            let sd = (n as f64 * p as f64 * (1.0 - p as f64)).sqrt();
            assert!(
                (dropped - n as f64 * p as f64).abs() <= 5.0 * sd + 1e-9,
                "p {p}: {dropped}"
            );
            let keep = 1.0 / (1.0 - p);
            for (&v, &x) in y.iter().zip(&x) {
                assert!(v == 0.0 || (v / x - keep).abs() <= 1e-3 * keep, "{v} {x}");
            }
            let mut again = vec![0f32; n];
            d.apply(&mut again, &x);
            assert_eq!(again, y);
            let mut dx = vec![1f32; n];
            d.backward_add(&mut dx, &x);
            for ((&g, &v), &x) in dx.iter().zip(&y).zip(&x) {
                assert!((g - 1.0 - v).abs() <= 1e-5 * (1.0 + v), "{g} {v} {x}");
            }
        }
        let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
        Dropout { p: 0.5, seed: 1 }.apply(&mut a, &x);
        Dropout { p: 0.5, seed: 2 }.apply(&mut b, &x);
        assert_ne!(a, b);
    }
}
