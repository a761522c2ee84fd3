//! The output projection fused with next-token cross-entropy, forward and backward, on
//! slices: the trainer's one head loss. Rows go in chunks whose logits stay in cache and
//! become their own gradient in place; no tokens x vocab tensor is ever kept.

use candle_core::WithDType;
use num_traits::Float;
use rayon::prelude::*;

use crate::exp::ExpInPlace;
use crate::gemm::{gemm, View};

/// Logits per chunk (512 rows of an 8192-token vocabulary). Each chunk adds its share into
/// w's gradient, which is read and written once per chunk, so much smaller chunks cost more
/// in that traffic than they save; much larger ones add to the peak (`slm bench --train`
/// measures the head's seconds).
pub const HEAD_CHUNK_VALUES: usize = 1 << 22;

/// A target that counts for nothing, no loss and no gradient: prompt tokens in chat
/// fine-tuning, padding.
pub const IGNORE: u32 = u32::MAX;

/// Rows, width and vocabulary of an output projection.
#[derive(Clone, Copy)]
pub struct HeadShape {
    pub n: usize,
    pub d: usize,
    pub v: usize,
}

/// The summed cross-entropy of `h · wᵀ` (h: n x d, w: v x d) against `targets` (checked by
/// the caller to lie below v, or `IGNORE`), and how many targets counted; with `grads` =
/// (dh, dw), writes `scale / counted` times its gradient with respect to h into dh (zero
/// for ignored rows) and adds that of w into dw: the gradient of `scale` times the mean
/// loss. `buf` holds one chunk's logits between calls.
#[allow(clippy::too_many_arguments)]
pub fn head_loss_into<T: WithDType + ExpInPlace>(
    HeadShape { n, d, v }: HeadShape,
    h: &[T],
    w: &[T],
    targets: &[u32],
    scale: T,
    grads: Option<(&mut [T], &mut [T])>,
    buf: &mut Vec<T>,
) -> (f64, usize) {
    assert!(h.len() >= n * d && w.len() >= v * d && targets.len() >= n);
    let mut grads = grads;
    if let Some((dh, dw)) = &grads {
        assert!(dh.len() >= n * d && dw.len() >= v * d);
    }
    let chunk = (HEAD_CHUNK_VALUES / v.max(1)).clamp(1, n.max(1));
    buf.resize(chunk * v, T::zero());
    let counted = targets[..n].iter().filter(|&&t| t != IGNORE).count();
    let inv_n = WithDType::to_f64(scale) / counted.max(1) as f64;
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
                if t == IGNORE {
                    row.fill(T::zero());
                    return 0.0;
                }
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
    (total, counted)
}

/// The fused head against candle's composed ops with autograd (matmul, then
/// `candle_nn::loss::cross_entropy` over the rows whose target counts), in value and both
/// gradients, on shapes whose rows span one chunk, several and a short last one, with some
/// targets ignored. f64 agrees to rounding (1e-12); f32 within 1e-5 of the largest value
/// (another summation order over up to 1000 logits).
#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};
    use rand::{Rng, SeedableRng};

    fn check<T: WithDType + ExpInPlace>(n: usize, d: usize, v: usize, seed: u64, tol: f64) {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut values = |len: usize| -> Vec<f64> {
            (0..len).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect()
        };
        let (h, w) = (values(n * d), values(v * d));
        let targets: Vec<u32> = (0..n)
            .map(|i| {
                if i % 7 == 3 {
                    IGNORE
                } else {
                    ((i * 7919 + seed as usize) % v) as u32
                }
            })
            .collect();
        let cast = |x: &[f64]| -> Vec<T> { x.iter().map(|&a| T::from_f64(a)).collect() };
        let (ht, wt) = (cast(&h), cast(&w));
        let (mut dh, mut dw) = (vec![T::zero(); n * d], vec![T::zero(); v * d]);
        let scale = 0.5;
        let (total, counted) = head_loss_into(
            HeadShape { n, d, v },
            &ht,
            &wt,
            &targets,
            T::from_f64(scale),
            Some((&mut dh, &mut dw)),
            &mut Vec::new(),
        );

        let hv = Var::from_vec(h, (n, d), &dev).unwrap();
        let wv = Var::from_vec(w, (v, d), &dev).unwrap();
        let keep: Vec<u32> = (0..n as u32)
            .filter(|&i| targets[i as usize] != IGNORE)
            .collect();
        assert_eq!(counted, keep.len());
        let kept_targets: Vec<u32> = keep.iter().map(|&i| targets[i as usize]).collect();
        let rows = Tensor::new(keep.as_slice(), &dev).unwrap();
        let logits = hv
            .as_tensor()
            .index_select(&rows, 0)
            .unwrap()
            .matmul(&wv.as_tensor().t().unwrap())
            .unwrap();
        let loss = candle_nn::loss::cross_entropy(
            &logits,
            &Tensor::new(kept_targets.as_slice(), &dev).unwrap(),
        )
        .unwrap();
        let mean = loss.to_scalar::<f64>().unwrap();
        let got = total / counted as f64;
        assert!(
            (got - mean).abs() <= tol * mean.abs(),
            "{n}x{d}x{v}: loss {got} vs {mean}"
        );
        let grads = (loss * scale).unwrap().backward().unwrap();
        for (name, ours, var) in [("h", &dh, &hv), ("w", &dw, &wv)] {
            let want: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let largest = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            let err = ours
                .iter()
                .zip(&want)
                .fold(0f64, |m, (a, b)| m.max((WithDType::to_f64(*a) - b).abs()));
            assert!(
                err <= tol * largest,
                "{n}x{d}x{v} d{name}: error {err:e} against {largest:e}"
            );
        }
        for (i, &t) in targets.iter().enumerate() {
            if t == IGNORE {
                assert!(dh[i * d..(i + 1) * d]
                    .iter()
                    .all(|x| WithDType::to_f64(*x) == 0.0));
            }
        }
    }

    #[test]
    fn matches_matmul_then_cross_entropy() {
        for (n, d, v, seed) in [
            (1, 3, 2, 1),
            (6, 5, 17, 2),
            (150, 8, 301, 3),
            (1400, 16, 4100, 4),
        ] {
            check::<f64>(n, d, v, seed, 1e-12);
            check::<f32>(n, d, v, seed, 1e-5);
        }
    }
}
