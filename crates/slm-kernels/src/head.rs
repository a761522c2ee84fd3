//! The output projection fused with next-token cross-entropy, forward and backward, on
//! slices: the trainer's one head loss. Rows go in chunks whose logits stay in cache and
//! become their own gradient in place; no tokens x vocab tensor is ever kept.

use candle_core::WithDType;
use num_traits::Float;
use rayon::prelude::*;

use crate::exp::ExpInPlace;
use crate::gemm::{gemm, View};
use crate::kd::{self, RowScratch, Teacher, TeacherRow, TeacherSource};

/// Logits per chunk (2048 rows of an 8192-token vocabulary, 341 of a 49152-token one: 64 MB
/// in f32). Each chunk reads w twice (logits, then h's gradient) and reads and writes w's
/// gradient once, so smaller chunks cost more in that traffic than they save once w outgrows
/// the caches (a 49152 x 576 head is 113 MB); much larger ones add to the peak
/// (`slm bench --train` measures the head's seconds).
pub const HEAD_CHUNK_VALUES: usize = 1 << 24;

/// A target that counts for nothing, no loss and no gradient: prompt tokens in chat
/// fine-tuning, padding.
pub const IGNORE: u32 = u32::MAX;

/// Rows, width and vocabulary (or labels) of an output projection.
#[derive(Clone, Copy)]
pub struct HeadShape {
    pub n: usize,
    pub d: usize,
    pub v: usize,
}

/// An output projection: the language model's (w only) or a classifier's.
#[derive(Clone, Copy)]
pub struct HeadWeights<'a, T> {
    /// v x d.
    pub w: &'a [T],
    /// One per output, added to every row's logits (a token classifier's).
    pub b: Option<&'a [T]>,
    /// A weight per class: the loss becomes `Σ c_y nll / Σ c_y` over the counted rows, as
    /// torch's `CrossEntropyLoss(weight=c)` computes it.
    pub class_weights: Option<&'a [f64]>,
}

impl<'a, T> HeadWeights<'a, T> {
    /// The language model's head: a matrix, no bias, every class alike.
    pub fn matrix(w: &'a [T]) -> Self {
        Self {
            w,
            b: None,
            class_weights: None,
        }
    }
}

/// Where the gradients of a head's loss go: dh is written, dw and db added into. A frozen head
/// (LoRA's tied embedding) has no dw: that product is not computed.
pub struct HeadGrads<'a, T> {
    pub dh: &'a mut [T],
    pub dw: Option<&'a mut [T]>,
    pub db: Option<&'a mut [T]>,
}

/// The summed (class-weighted) cross-entropy of `h · wᵀ + b` (h: n x d, w: v x d) against
/// `targets` (checked by the caller to lie below v, or `IGNORE`), and the weight that
/// counted (the number of counted targets when every class weighs 1); with `grads`, writes
/// `scale / weight` times its gradient with respect to h into dh (zero for ignored rows)
/// and adds those of w and b: the gradient of `scale` times the mean loss. `buf` holds one
/// chunk's logits between calls. With a `teacher`, each counted row's loss is the
/// distillation loss (`kd::row_loss`) instead of the cross-entropy alone.
#[allow(clippy::too_many_arguments)]
pub fn head_loss_into<T: WithDType + ExpInPlace>(
    HeadShape { n, d, v }: HeadShape,
    h: &[T],
    head: HeadWeights<T>,
    targets: &[u32],
    scale: T,
    grads: Option<HeadGrads<T>>,
    buf: &mut Vec<T>,
    teacher: Option<Teacher<T>>,
) -> (f64, f64) {
    let w = head.w;
    assert!(h.len() >= n * d && w.len() >= v * d && targets.len() >= n);
    assert!(head.b.is_none_or(|b| b.len() == v));
    assert!(head.class_weights.is_none_or(|c| c.len() == v));
    let mut grads = grads;
    if let Some(g) = &grads {
        assert!(g.dh.len() >= n * d && g.dw.as_ref().is_none_or(|dw| dw.len() >= v * d));
        assert!(g.db.as_ref().is_none_or(|db| db.len() == v));
    }
    let class = |t: u32| head.class_weights.map_or(1.0, |c| c[t as usize]);
    let chunk = (HEAD_CHUNK_VALUES / v.max(1)).clamp(1, n.max(1));
    buf.resize(chunk * v, T::zero());
    let weight: f64 = targets[..n]
        .iter()
        .filter(|&&t| t != IGNORE)
        .map(|&t| class(t))
        .sum();
    let inv_n = if weight > 0.0 {
        WithDType::to_f64(scale) / weight
    } else {
        0.0
    };
    let mut teacher = teacher;
    if let Some(Teacher {
        source: TeacherSource::TopK { k, ids, logp, rest },
        ..
    }) = &teacher
    {
        assert!(ids.len() >= n * k && logp.len() >= n * k && rest.len() >= n);
        assert!(ids[..n * k].iter().all(|&i| (i as usize) < v));
    }
    let mut teacher_logits = match &teacher {
        Some(Teacher {
            source: TeacherSource::Logits(_),
            ..
        }) => vec![T::zero(); chunk * v],
        _ => Vec::new(),
    };
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
        if let Some(b) = head.b {
            for row in logits.chunks_exact_mut(v) {
                row.iter_mut().zip(b).for_each(|(x, &b)| *x += b);
            }
        }
        let targets = &targets[c0..c0 + rows];
        // Per-row losses collected and added in order, so the total does not depend on how
        // rayon split the rows.
        let losses: Vec<f64> = if let Some(t) = &mut teacher {
            if let TeacherSource::Logits(fill) = &mut t.source {
                fill(c0, rows, &mut teacher_logits[..rows * v]);
            }
            let top = match t.source {
                TeacherSource::TopK { k, ids, logp, rest } => Some((k, ids, logp, rest)),
                TeacherSource::Logits(_) => None,
            };
            let (kd, teacher_logits) = (&t.kd, &teacher_logits);
            logits
                .par_chunks_mut(v)
                .zip(targets.par_iter())
                .enumerate()
                .map_init(RowScratch::default, |s, (i, (row, &t))| {
                    let teacher = match top {
                        None => TeacherRow::Logits(&teacher_logits[i * v..(i + 1) * v]),
                        Some((k, ids, logp, rest)) => {
                            let r = c0 + i;
                            TeacherRow::TopK {
                                ids: &ids[r * k..(r + 1) * k],
                                logp: &logp[r * k..(r + 1) * k],
                                rest: rest[r],
                            }
                        }
                    };
                    let target = (t != IGNORE).then(|| (t, class(t)));
                    kd::row_loss(kd, row, target, teacher, inv_n, s)
                })
                .collect()
        } else {
            logits
                .par_chunks_mut(v)
                .zip(targets.par_iter())
                .map(|(row, &t)| {
                    if t == IGNORE {
                        row.fill(T::zero());
                        return 0.0;
                    }
                    let c = class(t);
                    let max = row.iter().fold(T::neg_infinity(), |m, &x| Float::max(m, x));
                    let at_target = WithDType::to_f64(row[t as usize]);
                    row.iter_mut().for_each(|x| *x -= max);
                    T::exp_in_place(row);
                    let sum: f64 = row.iter().map(|&e| WithDType::to_f64(e)).sum();
                    let lse = WithDType::to_f64(max) + sum.ln();
                    // d(loss)/d(logit) = (softmax - one-hot) * c * scale / weight.
                    let s = <T as WithDType>::from_f64(c * inv_n / sum);
                    row.iter_mut().for_each(|x| *x *= s);
                    row[t as usize] -= <T as WithDType>::from_f64(c * inv_n);
                    c * (lse - at_target)
                })
                .collect()
        };
        total += losses.iter().sum::<f64>();
        let Some(HeadGrads { dh, dw, db }) = grads.as_mut() else {
            continue;
        };
        let g = &buf[..rows * v];
        if let Some(db) = db {
            for row in g.chunks_exact(v) {
                db.iter_mut().zip(row).for_each(|(a, &x)| *a += x);
            }
        }
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
            if let Some(dw) = dw {
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
    }
    (total, weight)
}

/// The fused head against candle's composed ops with autograd (matmul, bias, log-softmax and
/// a class-weighted mean over the rows whose target counts), in value and every gradient, on
/// shapes whose rows span one chunk, several and a short last one, with some targets
/// ignored. f64 agrees to rounding (1e-12); f32 within 1e-5 of the largest value (another
/// summation order over up to 1000 logits).
#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var, D};
    use rand::{Rng, SeedableRng};

    fn check<T: WithDType + ExpInPlace>(
        (n, d, v): (usize, usize, usize),
        seed: u64,
        classifier: bool,
        tol: f64,
    ) {
        let dev = Device::Cpu;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut values = |len: usize| -> Vec<f64> {
            (0..len).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect()
        };
        let (h, w, b) = (values(n * d), values(v * d), values(v));
        let class: Vec<f64> = (0..v).map(|i| 0.25 + (i % 3) as f64 * 0.5).collect();
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
        let (ht, wt, bt) = (cast(&h), cast(&w), cast(&b));
        let (mut dh, mut dw, mut db) = (
            vec![T::zero(); n * d],
            vec![T::zero(); v * d],
            vec![T::zero(); v],
        );
        let scale = 0.5;
        let head = HeadWeights {
            w: &wt,
            b: classifier.then_some(bt.as_slice()),
            class_weights: classifier.then_some(class.as_slice()),
        };
        let (total, weight) = head_loss_into(
            HeadShape { n, d, v },
            &ht,
            head,
            &targets,
            T::from_f64(scale),
            Some(HeadGrads {
                dh: &mut dh,
                dw: Some(&mut dw),
                db: classifier.then_some(db.as_mut_slice()),
            }),
            &mut Vec::new(),
            None,
        );

        let hv = Var::from_vec(h, (n, d), &dev).unwrap();
        let wv = Var::from_vec(w, (v, d), &dev).unwrap();
        let bv = Var::from_vec(b, v, &dev).unwrap();
        let keep: Vec<u32> = (0..n as u32)
            .filter(|&i| targets[i as usize] != IGNORE)
            .collect();
        let kept_targets: Vec<u32> = keep.iter().map(|&i| targets[i as usize]).collect();
        let c: Vec<f64> = kept_targets
            .iter()
            .map(|&t| if classifier { class[t as usize] } else { 1.0 })
            .collect();
        assert!((weight - c.iter().sum::<f64>()).abs() < 1e-12);
        let rows = Tensor::new(keep.as_slice(), &dev).unwrap();
        let mut logits = hv
            .as_tensor()
            .index_select(&rows, 0)
            .unwrap()
            .matmul(&wv.as_tensor().t().unwrap())
            .unwrap();
        if classifier {
            logits = logits.broadcast_add(bv.as_tensor()).unwrap();
        }
        let nll = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .gather(
                &Tensor::new(kept_targets.as_slice(), &dev)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap(),
                1,
            )
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let loss = (nll * Tensor::new(c.as_slice(), &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .affine(1.0 / weight, 0.0)
            .unwrap();
        let mean = loss.to_scalar::<f64>().unwrap();
        let got = total / weight;
        assert!(
            (got - mean).abs() <= tol * mean.abs(),
            "{n}x{d}x{v}: loss {got} vs {mean}"
        );
        let grads = (loss * scale).unwrap().backward().unwrap();
        let mut checks = vec![("h", &dh, &hv), ("w", &dw, &wv)];
        if classifier {
            checks.push(("b", &db, &bv));
        }
        for (name, ours, var) in checks {
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
        for (shape, seed) in [
            ((1, 3, 2), 1),
            ((6, 5, 17), 2),
            ((150, 8, 301), 3),
            ((1400, 16, 4100), 4),
        ] {
            check::<f64>(shape, seed, false, 1e-12);
            check::<f32>(shape, seed, false, 1e-5);
        }
    }

    #[test]
    fn a_classifiers_bias_and_class_weights_match_torchs_weighted_mean() {
        for (shape, seed) in [((1, 3, 2), 5), ((40, 9, 3), 6), ((300, 12, 13), 7)] {
            check::<f64>(shape, seed, true, 1e-12);
            check::<f32>(shape, seed, true, 1e-5);
        }
    }
}
