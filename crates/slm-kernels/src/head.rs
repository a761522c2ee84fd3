//! The output projection fused with next-token cross-entropy, forward and backward, on
//! slices: the one implementation the fused trainer and the candle op (slm-train's
//! `lm_head_loss`) both call. Rows go in chunks whose logits stay in cache and become their
//! own gradient in place; no tokens x vocab tensor is ever kept.

use candle_core::WithDType;
use num_traits::Float;
use rayon::prelude::*;

use crate::exp::ExpInPlace;
use crate::gemm::{gemm, View};

/// Logits per chunk: 512 rows of an 8192-token vocabulary (16 MB of f32). Each chunk adds
/// its share into w's gradient, which is read and written once per chunk: 64-row chunks
/// (2 MB) made that traffic cost more than the chunks saved. With the fused trainer, tiny
/// shape, head seconds per update: 256 rows 0.252-0.254, 512 rows 0.227-0.246, 1024 rows
/// 0.232-0.243 (+16 MB peak), 2048 rows 0.243-0.252 (+49 MB).
pub const HEAD_CHUNK_VALUES: usize = 1 << 22;

/// Rows, width and vocabulary of an output projection.
#[derive(Clone, Copy)]
pub struct HeadShape {
    pub n: usize,
    pub d: usize,
    pub v: usize,
}

/// The summed cross-entropy of `h · wᵀ` (h: n x d, w: v x d) against `targets` (checked by
/// the caller to lie below v); with `grads` = (dh, dw), writes `scale / n` times its gradient
/// with respect to h into dh and adds that of w into dw. `buf` holds one chunk's logits
/// between calls.
#[allow(clippy::too_many_arguments)]
pub fn head_loss_into<T: WithDType + ExpInPlace>(
    HeadShape { n, d, v }: HeadShape,
    h: &[T],
    w: &[T],
    targets: &[u32],
    scale: T,
    grads: Option<(&mut [T], &mut [T])>,
    buf: &mut Vec<T>,
) -> f64 {
    assert!(h.len() >= n * d && w.len() >= v * d && targets.len() >= n);
    let mut grads = grads;
    if let Some((dh, dw)) = &grads {
        assert!(dh.len() >= n * d && dw.len() >= v * d);
    }
    let chunk = (HEAD_CHUNK_VALUES / v.max(1)).clamp(1, n.max(1));
    buf.resize(chunk * v, T::zero());
    let inv_n = WithDType::to_f64(scale) / n.max(1) as f64;
    let mut total = 0f64;
    for c0 in (0..n).step_by(chunk) {
        let rows = chunk.min(n - c0);
        let hc = &h[c0 * d..(c0 + rows) * d];
        let logits = &mut buf[..rows * v];
        // SAFETY (all three products): the asserts above bound the h rows (rows x d), w
        // (v x d) read as its transpose or as it is, the chunk's logits (rows x v) and its
        // transpose, and the gradients.
        unsafe {
            gemm(
                logits.as_mut_ptr(),
                v,
                false,
                (rows, v, d),
                View::rows(hc, d),
                View::transposed(w, d),
                T::one(),
                true,
            )
        };
        let targets = &targets[c0..c0 + rows];
        // Per-row losses collected and added in order, so the total does not depend on how
        // rayon split the rows.
        let losses: Vec<f64> = logits
            .par_chunks_mut(v)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let max = row.iter().fold(T::neg_infinity(), |m, &x| Float::max(m, x));
                let at_target = WithDType::to_f64(row[t as usize]);
                row.iter_mut().for_each(|x| *x -= max);
                T::exp_in_place(row);
                let sum: f64 = row.iter().map(|&e| WithDType::to_f64(e)).sum();
                let lse = WithDType::to_f64(max) + sum.ln();
                // d(loss)/d(logit) = (softmax - one-hot) * scale / n.
                let s = <T as WithDType>::from_f64(inv_n / sum);
                row.iter_mut().for_each(|x| *x *= s);
                row[t as usize] -= <T as WithDType>::from_f64(inv_n);
                lse - at_target
            })
            .collect();
        total += losses.iter().sum::<f64>();
        let Some((dh, dw)) = grads.as_mut() else {
            continue;
        };
        let g = &buf[..rows * v];
        unsafe {
            gemm(
                dh[c0 * d..].as_mut_ptr(),
                d,
                false,
                (rows, d, v),
                View::rows(g, v),
                View::rows(w, d),
                T::one(),
                true,
            );
            gemm(
                dw.as_mut_ptr(),
                d,
                true,
                (v, d, rows),
                View::transposed(g, v),
                View::rows(hc, d),
                T::one(),
                true,
            );
        }
    }
    total
}

