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
}
