//! Knowledge distillation's loss on one row of a student's logits: a divergence between the
//! teacher's and the student's distributions softened by a temperature T, scaled by T² (so
//! its gradient keeps its size as T changes, as Hinton et al. scale it), mixed with the
//! hard cross-entropy: `alpha · T² · D(teacher, student) + (1 - alpha) · CE`.
//!
//! The teacher comes as its logits over the whole vocabulary (online distillation) or as
//! its top k tokens with their log-probabilities and the log of the mass left to all other
//! tokens (a cache). Both are the same computation over *buckets*: each of the k tokens is
//! a bucket, and the rest of the vocabulary is one more, whose mass is compared whole (the
//! divergence of the two distributions coarsened to those k + 1 outcomes; with the whole
//! vocabulary as k it is the exact divergence). For a bucket b with teacher and student
//! masses P_t(b), P_s(b), every divergence here has the gradient
//!
//! ```text
//!   dD/dz_j = (1/T) · p_s(j) · (g_b(j) - Σ_b P_s(b) g_b),   g_b = ∂D/∂P_s(b)
//! ```
//!
//! so one routine serves them all; each divergence gives its term and `h_b = P_s(b) g_b`
//! (finite where g_b alone overflows).

use candle_core::WithDType;
use num_traits::Float;

use crate::exp::ExpInPlace;

/// The divergence between the teacher's (P_t) and the student's (P_s) distributions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// KL(P_t ‖ P_s): the student covers every token the teacher gives mass to (Hinton's).
    Forward,
    /// KL(P_s ‖ P_t): the student puts its mass where the teacher does (mode-seeking).
    Reverse,
    /// TRL's generalised Jensen-Shannon divergence: with M = β P_t + (1 - β) P_s,
    /// β KL(P_t ‖ M) + (1 - β) KL(P_s ‖ M); β strictly between 0 and 1 (its limits are
    /// `Forward` and `Reverse` in TRL's GKD).
    Jsd { beta: f64 },
}

/// A distillation loss's settings, checked by the recipe: temperature > 0, alpha in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Distill {
    pub temperature: f64,
    /// The weight of the distillation term; the hard cross-entropy gets 1 - alpha.
    pub alpha: f64,
    pub divergence: Divergence,
}

/// What the teacher says about one position.
#[derive(Clone, Copy)]
pub enum TeacherRow<'a, T> {
    /// Its logits over the whole vocabulary.
    Logits(&'a [T]),
    /// Its top tokens (distinct, below the vocabulary size) at the distillation temperature,
    /// their log-probabilities, and the log of the mass of every other token.
    TopK {
        ids: &'a [u32],
        logp: &'a [f32],
        rest: f32,
    },
}

/// The teacher of a fused head's rows (see `head::head_loss_into`).
pub struct Teacher<'a, T> {
    pub kd: Distill,
    pub source: TeacherSource<'a, T>,
}

/// Where the teacher's view of each row comes from.
pub enum TeacherSource<'a, T> {
    /// Its logits, computed chunk by chunk as the head reaches them: `fill(first, rows, out)`
    /// writes rows `first..first + rows` (rows x vocabulary) into `out`.
    Logits(&'a mut dyn FnMut(usize, usize, &mut [T])),
    /// Its top k per row (row-major, n x k) with the log of each row's remaining mass.
    TopK {
        k: usize,
        ids: &'a [u32],
        logp: &'a [f32],
        rest: &'a [f32],
    },
}

/// The smallest mass a bucket is taken to have: a log-probability stays finite.
const FLOOR: f64 = f64::MIN_POSITIVE;

/// One bucket's divergence term and `h = P_s · ∂D/∂P_s` (up to a constant per row, which
/// the gradient's centring removes), from the log-masses of the teacher and the student.
fn bucket(div: Divergence, lt: f64, ls: f64) -> (f64, f64) {
    match div {
        Divergence::Forward => {
            let pt = lt.exp();
            let term = if pt > 0.0 { pt * (lt - ls) } else { 0.0 };
            (term, -pt)
        }
        Divergence::Reverse => {
            let ps = ls.exp();
            let term = if ps > 0.0 { ps * (ls - lt) } else { 0.0 };
            (term, ps * (ls - lt))
        }
        Divergence::Jsd { beta } => {
            let (a, b) = (beta.ln() + lt, (1.0 - beta).ln() + ls);
            let lm = a.max(b) + (-(a - b).abs()).exp().ln_1p();
            let (pt, ps) = (lt.exp(), ls.exp());
            let kt = if pt > 0.0 { beta * pt * (lt - lm) } else { 0.0 };
            let ks = if ps > 0.0 {
                (1.0 - beta) * ps * (ls - lm)
            } else {
                0.0
            };
            (kt + ks, (1.0 - beta) * ps * (ls - lm))
        }
    }
}

/// Softmax of `z / temperature` into `e` (unnormalised, shifted by the row's largest value):
/// returns (the shift's log-sum, the sum of `e`), so `log p(j) = (z_j - max) / T - ln sum`.
fn soften<T: WithDType + ExpInPlace>(z: &[T], temperature: f64, e: &mut Vec<T>) -> (f64, f64) {
    let max = z.iter().fold(T::neg_infinity(), |m, &x| Float::max(m, x));
    let inv = T::from_f64(1.0 / temperature);
    e.clear();
    e.extend(z.iter().map(|&x| (x - max) * inv));
    T::exp_in_place(e);
    let sum: f64 = e.iter().map(|&x| WithDType::to_f64(x)).sum();
    (WithDType::to_f64(max), sum)
}

/// Per-thread buffers of a row's computation (each a row of the vocabulary).
pub struct RowScratch<T> {
    z: Vec<T>,
    student: Vec<T>,
    hard: Vec<T>,
    teacher: Vec<T>,
    /// A top k's h per top token.
    top_h: Vec<f64>,
}

impl<T> Default for RowScratch<T> {
    fn default() -> Self {
        Self {
            z: Vec::new(),
            student: Vec::new(),
            hard: Vec::new(),
            teacher: Vec::new(),
            top_h: Vec::new(),
        }
    }
}

/// The distillation loss of one row of student logits `row` (overwritten with `scale` times
/// its gradient), with the hard target `target` of class weight `c` (None: no target, the
/// row counts for nothing and its gradient is zero). Returns the row's loss.
pub fn row_loss<T: WithDType + ExpInPlace>(
    kd: &Distill,
    row: &mut [T],
    target: Option<(u32, f64)>,
    teacher: TeacherRow<T>,
    scale: f64,
    s: &mut RowScratch<T>,
) -> f64 {
    let Some((y, c)) = target else {
        row.fill(T::zero());
        return 0.0;
    };
    let v = row.len();
    let temp = kd.temperature;
    s.z.clear();
    s.z.extend_from_slice(row);
    let (max_s, sum_s) = soften(&s.z, temp, &mut s.student);
    let ln_s = sum_s.ln();
    let log_ps = |j: usize| (WithDType::to_f64(s.z[j]) - max_s) / temp - ln_s;
    // The hard cross-entropy at temperature 1 (its softmax shared when T is 1), when it
    // weighs anything: its loss, and its unnormalised softmax with the inverse of its sum.
    let (hard_loss, hard) = if kd.alpha < 1.0 {
        let (max1, sum1) = if temp == 1.0 {
            (max_s, sum_s)
        } else {
            soften(&s.z, 1.0, &mut s.hard)
        };
        let lse = max1 + sum1.ln();
        let e1 = if temp == 1.0 { &s.student } else { &s.hard };
        (
            c * (lse - WithDType::to_f64(s.z[y as usize])),
            Some((e1, 1.0 / sum1)),
        )
    } else {
        (0.0, None)
    };

    // Divergence over the buckets, keeping each bucket's h: per token of the vocabulary in
    // `s.teacher` (whole logits), or per top token in `s.top_h` (a top k, whose other
    // tokens share the rest's h in proportion to p_s).
    let (mut div, mut h_sum) = (0.0, 0.0);
    let per_rest: f64;
    match teacher {
        TeacherRow::Logits(zt) => {
            assert_eq!(zt.len(), v, "teacher and student vocabularies");
            let (max_t, sum_t) = soften(zt, temp, &mut s.teacher);
            let ln_t = sum_t.ln();
            for (j, (&x, out)) in zt.iter().zip(s.teacher.iter_mut()).enumerate() {
                let lt = (WithDType::to_f64(x) - max_t) / temp - ln_t;
                let (term, h) = bucket(kd.divergence, lt, log_ps(j));
                div += term;
                h_sum += h;
                *out = T::from_f64(h);
            }
            per_rest = 0.0;
        }
        TeacherRow::TopK { ids, logp, rest } => {
            assert_eq!(ids.len(), logp.len());
            let mut top_mass = 0.0;
            s.top_h.clear();
            for (&id, &lt) in ids.iter().zip(logp) {
                let j = id as usize;
                top_mass += WithDType::to_f64(s.student[j]);
                let (term, h) = bucket(kd.divergence, f64::from(lt), log_ps(j));
                div += term;
                h_sum += h;
                s.top_h.push(h);
            }
            let rest_s = ((sum_s - top_mass) / sum_s).max(FLOOR);
            let (term, h) = bucket(kd.divergence, f64::from(rest).max(FLOOR.ln()), rest_s.ln());
            div += term;
            h_sum += h;
            per_rest = h / rest_s;
        }
    }

    // dL/dz_j = scale · [alpha · T · (hj - p_s(j) Σh) + (1 - alpha) · c · (p_1(j) - [j = y])].
    let (a, b) = (scale * kd.alpha * temp, scale * (1.0 - kd.alpha) * c);
    let inv_s = 1.0 / sum_s;
    let p_s = |j: usize| WithDType::to_f64(s.student[j]) * inv_s;
    let grad = |j: usize, ps: f64, hj: f64| {
        let p1 = hard.map_or(0.0, |(e1, inv_1)| WithDType::to_f64(e1[j]) * inv_1);
        a * (hj - ps * h_sum) + b * p1
    };
    match teacher {
        TeacherRow::Logits(_) => {
            for (j, out) in row.iter_mut().enumerate() {
                *out = T::from_f64(grad(j, p_s(j), WithDType::to_f64(s.teacher[j])));
            }
        }
        TeacherRow::TopK { ids, .. } => {
            for (j, out) in row.iter_mut().enumerate() {
                let ps = p_s(j);
                *out = T::from_f64(grad(j, ps, ps * per_rest));
            }
            for (&id, &h) in ids.iter().zip(&s.top_h) {
                let j = id as usize;
                row[j] = T::from_f64(grad(j, p_s(j), h));
            }
        }
    }
    if hard.is_some() {
        let y = y as usize;
        row[y] = T::from_f64(WithDType::to_f64(row[y]) - b);
    }
    kd.alpha * temp * temp * div + (1.0 - kd.alpha) * hard_loss
}

/// The teacher's top `k` tokens of `logits` at `temperature`: ids (by falling probability,
/// ties by id), their log-probabilities, and the log of the mass of all other tokens
/// (`-inf` when the k tokens are the whole vocabulary). What a cache stores per position,
/// and what online distillation with a top-k computes, so the two agree.
pub fn top_k<T: WithDType + ExpInPlace>(
    logits: &[T],
    temperature: f64,
    k: usize,
    scratch: &mut Vec<T>,
    ids: &mut Vec<u32>,
    logp: &mut Vec<f32>,
) -> f32 {
    let v = logits.len();
    let k = k.min(v);
    let (max, sum) = soften(logits, temperature, scratch);
    let ln_sum = sum.ln();
    let mut order: Vec<u32> = (0..v as u32).collect();
    let by_value = |a: &u32, b: &u32| {
        let (x, y) = (logits[*a as usize], logits[*b as usize]);
        y.partial_cmp(&x)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(b))
    };
    if k < v {
        order.select_nth_unstable_by(k, by_value);
        order.truncate(k);
    }
    order.sort_unstable_by(by_value);
    let mut top = 0.0;
    ids.clear();
    logp.clear();
    for &j in &order {
        top += WithDType::to_f64(scratch[j as usize]);
        ids.push(j);
        logp.push(((WithDType::to_f64(logits[j as usize]) - max) / temperature - ln_sum) as f32);
    }
    if k == v {
        return f32::NEG_INFINITY;
    }
    (((sum - top) / sum).max(0.0)).ln() as f32
}

/// The distillation loss against a direct computation in f64 (softmax, the divergence, T²,
/// the cross-entropy) and its gradient against central finite differences of that direct
/// loss; through the fused head over several chunks in f64 and f32; a top-k of the whole
/// vocabulary against the full logits.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::{head_loss_into, HeadGrads, HeadShape, HeadWeights, IGNORE};
    use rand::{Rng, SeedableRng};

    fn log_softmax(z: &[f64], temp: f64) -> Vec<f64> {
        let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let lse = z.iter().map(|&x| ((x - m) / temp).exp()).sum::<f64>().ln();
        z.iter().map(|&x| (x - m) / temp - lse).collect()
    }

    /// The loss of one row, directly: the teacher's buckets are its top `k` tokens and the
    /// rest (all tokens as their own buckets when k is the vocabulary).
    fn direct(kd: &Distill, z: &[f64], zt: &[f64], k: usize, y: usize) -> f64 {
        let (t, v) = (kd.temperature, z.len());
        let (ls, lt) = (log_softmax(z, t), log_softmax(zt, t));
        let mut order: Vec<usize> = (0..v).collect();
        if k < v {
            order.sort_by(|&a, &b| zt[b].partial_cmp(&zt[a]).unwrap().then(a.cmp(&b)));
        }
        let mut pt: Vec<f64> = order[..k].iter().map(|&j| lt[j].exp()).collect();
        let mut ps: Vec<f64> = order[..k].iter().map(|&j| ls[j].exp()).collect();
        if k < v {
            pt.push(order[k..].iter().map(|&j| lt[j].exp()).sum());
            ps.push(order[k..].iter().map(|&j| ls[j].exp()).sum());
        }
        let kl = |p: &[f64], q: &[f64]| -> f64 {
            p.iter()
                .zip(q)
                .filter(|(p, _)| **p > 0.0)
                .map(|(p, q)| p * (p / q).ln())
                .sum()
        };
        let d = match kd.divergence {
            Divergence::Forward => kl(&pt, &ps),
            Divergence::Reverse => kl(&ps, &pt),
            Divergence::Jsd { beta } => {
                let m: Vec<f64> = pt
                    .iter()
                    .zip(&ps)
                    .map(|(a, b)| beta * a + (1.0 - beta) * b)
                    .collect();
                beta * kl(&pt, &m) + (1.0 - beta) * kl(&ps, &m)
            }
        };
        let ce = -log_softmax(z, 1.0)[y];
        kd.alpha * t * t * d + (1.0 - kd.alpha) * ce
    }

    fn random(rng: &mut rand::rngs::StdRng, n: usize, spread: f64) -> Vec<f64> {
        (0..n)
            .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * spread)
            .collect()
    }

    const DIVERGENCES: [Divergence; 3] = [
        Divergence::Forward,
        Divergence::Reverse,
        Divergence::Jsd { beta: 0.3 },
    ];

    fn teacher_top_k(zt: &[f64], temp: f64, k: usize) -> (Vec<u32>, Vec<f32>, f32) {
        let (mut ids, mut logp) = (Vec::new(), Vec::new());
        let rest = top_k(zt, temp, k, &mut Vec::new(), &mut ids, &mut logp);
        (ids, logp, rest)
    }

    #[test]
    fn a_row_matches_the_direct_loss_and_its_finite_differences() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let v = 23;
        for divergence in DIVERGENCES {
            for (temperature, alpha, k) in [
                (1.0, 1.0, v),
                (2.0, 0.5, v),
                (0.7, 0.25, 5),
                (1.0, 0.8, 1),
                (2.0, 1.0, 5),
            ] {
                let kd = Distill {
                    temperature,
                    alpha,
                    divergence,
                };
                let (z, zt) = (random(&mut rng, v, 4.0), random(&mut rng, v, 4.0));
                let y = 7;
                let (ids, logp, rest) = teacher_top_k(&zt, temperature, k);
                let teacher = if k == v {
                    TeacherRow::Logits(&zt)
                } else {
                    TeacherRow::TopK {
                        ids: &ids,
                        logp: &logp,
                        rest,
                    }
                };
                let mut row = z.clone();
                let scale = 0.5;
                let loss = row_loss(
                    &kd,
                    &mut row,
                    Some((y as u32, 1.0)),
                    teacher,
                    scale,
                    &mut RowScratch::default(),
                );
                let want = direct(&kd, &z, &zt, k, y);
                // The top-k's log-probabilities are stored in f32.
                let tol = if k == v { 1e-12 } else { 1e-6 };
                assert!(
                    (loss - want).abs() <= tol * want.abs().max(1.0),
                    "{kd:?} k {k}: {loss} vs {want}"
                );
                for j in 0..v {
                    let eps = 1e-5;
                    let (mut up, mut down) = (z.clone(), z.clone());
                    up[j] += eps;
                    down[j] -= eps;
                    let fd = scale * (direct(&kd, &up, &zt, k, y) - direct(&kd, &down, &zt, k, y))
                        / (2.0 * eps);
                    assert!(
                        (row[j] - fd).abs() <= 1e-6,
                        "{kd:?} k {k} dz[{j}]: {} vs {fd}",
                        row[j]
                    );
                }
            }
        }
    }

    #[test]
    fn a_top_k_of_the_whole_vocabulary_is_the_full_distribution() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let v = 50;
        let (z, zt) = (random(&mut rng, v, 6.0), random(&mut rng, v, 6.0));
        for divergence in DIVERGENCES {
            let kd = Distill {
                temperature: 1.5,
                alpha: 0.6,
                divergence,
            };
            let (ids, logp, rest) = teacher_top_k(&zt, 1.5, v);
            assert_eq!(rest, f32::NEG_INFINITY);
            let (mut full, mut top) = (z.clone(), z.clone());
            let s = &mut RowScratch::default();
            let a = row_loss(
                &kd,
                &mut full,
                Some((3, 1.0)),
                TeacherRow::Logits(&zt),
                1.0,
                s,
            );
            let b = row_loss(
                &kd,
                &mut top,
                Some((3, 1.0)),
                TeacherRow::TopK {
                    ids: &ids,
                    logp: &logp,
                    rest,
                },
                1.0,
                s,
            );
            assert!((a - b).abs() < 1e-6, "{divergence:?}: {a} vs {b}");
            for (x, y) in full.iter().zip(&top) {
                assert!((x - y).abs() < 1e-6, "{divergence:?}: {x} vs {y}");
            }
        }
    }

    /// The fused head with a teacher (its logits chunk by chunk, or its top k), rows over
    /// three chunks and some ignored, against the direct loss and, for dh, the rows' f64
    /// gradients (checked above) times w.
    fn through_the_head<T: WithDType + ExpInPlace>(k: usize, tol: f64) {
        let (n, d, v) = (2200, 3, 16384);
        assert!(n > 2 * (crate::head::HEAD_CHUNK_VALUES / v));
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (h, w) = (random(&mut rng, n * d, 1.5), random(&mut rng, v * d, 1.5));
        let (ht, wt) = (random(&mut rng, n * d, 1.5), random(&mut rng, v * d, 1.5));
        let targets: Vec<u32> = (0..n)
            .map(|i| match i % 11 {
                4 => IGNORE,
                _ => ((i * 7919) % v) as u32,
            })
            .collect();
        let logits = |h: &[f64], w: &[f64], r: usize| -> Vec<f64> {
            (0..v)
                .map(|j| (0..d).map(|c| h[r * d + c] * w[j * d + c]).sum())
                .collect()
        };
        let kd = Distill {
            temperature: 2.0,
            alpha: 0.7,
            divergence: Divergence::Forward,
        };
        let cast = |x: &[f64]| -> Vec<T> { x.iter().map(|&a| T::from_f64(a)).collect() };
        let (mut ids, mut logp, mut rest) = (Vec::new(), Vec::new(), Vec::new());
        for r in (0..n).filter(|_| k < v) {
            let (i, l, rr) = teacher_top_k(&logits(&ht, &wt, r), kd.temperature, k);
            ids.extend(i);
            logp.extend(l);
            rest.push(rr);
        }
        let mut fill = |first: usize, rows: usize, out: &mut [T]| {
            for r in 0..rows {
                let z = cast(&logits(&ht, &wt, first + r));
                out[r * v..(r + 1) * v].copy_from_slice(&z);
            }
        };
        let source = match k < v {
            true => TeacherSource::TopK {
                k,
                ids: &ids,
                logp: &logp,
                rest: &rest,
            },
            false => TeacherSource::Logits(&mut fill),
        };
        let mut dh = vec![T::zero(); n * d];
        let (total, weight) = head_loss_into(
            HeadShape { n, d, v },
            &cast(&h),
            HeadWeights::matrix(&cast(&w)),
            &targets,
            T::one(),
            Some(HeadGrads {
                dh: &mut dh,
                dw: None,
                db: None,
            }),
            &mut Vec::new(),
            Some(Teacher { kd, source }),
        );
        assert_eq!(
            weight,
            targets.iter().filter(|&&t| t != IGNORE).count() as f64
        );
        let (mut want, mut worst, mut largest) = (0.0, 0f64, 0f64);
        for r in 0..n {
            let dh = &dh[r * d..(r + 1) * d];
            if targets[r] == IGNORE {
                assert!(dh.iter().all(|x| WithDType::to_f64(*x) == 0.0));
                continue;
            }
            let (z, zt) = (logits(&h, &w, r), logits(&ht, &wt, r));
            want += direct(&kd, &z, &zt, k, targets[r] as usize);
            let teacher = match k < v {
                true => TeacherRow::TopK {
                    ids: &ids[r * k..(r + 1) * k],
                    logp: &logp[r * k..(r + 1) * k],
                    rest: rest[r],
                },
                false => TeacherRow::Logits(&zt),
            };
            let mut g = z.clone();
            let target = Some((targets[r], 1.0));
            row_loss(
                &kd,
                &mut g,
                target,
                teacher,
                1.0 / weight,
                &mut RowScratch::default(),
            );
            for (c, &ours) in dh.iter().enumerate() {
                let want: f64 = (0..v).map(|j| g[j] * w[j * d + c]).sum();
                worst = worst.max((WithDType::to_f64(ours) - want).abs());
                largest = largest.max(want.abs());
            }
        }
        let got = total / weight;
        want /= weight;
        assert!(
            (got - want).abs() <= tol * want,
            "k {k}: loss {got} vs {want}"
        );
        assert!(
            worst <= tol * largest,
            "k {k}: dh off by {worst:e} of {largest:e}"
        );
    }

    /// f64 to rounding; f32 within 1e-4 (logits and exponentials rounded to 24 bits over a
    /// vocabulary of 16384, and the top-k's log-probabilities stored in f32 in both).
    #[test]
    fn the_fused_head_distills_over_several_chunks_in_f64_and_f32() {
        for k in [16384, 16] {
            through_the_head::<f64>(k, if k == 16384 { 1e-10 } else { 1e-6 });
            through_the_head::<f32>(k, 1e-4);
        }
    }
}
