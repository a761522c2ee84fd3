//! Aggregate metrics with their standard errors, computed as lm-evaluation-harness does.

use serde::{Deserialize, Serialize};

/// A metric's value over the evaluated documents and the standard error of that value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub value: f64,
    pub stderr: f64,
}

/// Mean of per-document scores, with the standard error of the mean: the sample standard
/// deviation (n - 1 in the denominator) over sqrt(n), lm-eval's `mean_stderr`.
pub fn mean(xs: &[f64]) -> Metric {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return Metric {
            value: f64::NAN,
            stderr: f64::NAN,
        };
    }
    let mu = xs.iter().sum::<f64>() / n;
    let stderr = if xs.len() > 1 {
        let var = xs.iter().map(|x| (x - mu) * (x - mu)).sum::<f64>() / (n - 1.0);
        (var / n).sqrt()
    } else {
        0.0
    };
    Metric { value: mu, stderr }
}

/// The first index of the largest value (numpy's argmax: ties go to the earlier option).
pub fn argmax(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Unweighted mean over classes of F1 (classes never predicted nor present are left out).
pub fn macro_f1(gold: &[usize], pred: &[usize], classes: usize) -> f64 {
    let mut f1s = Vec::new();
    for c in 0..classes {
        let tp = gold
            .iter()
            .zip(pred)
            .filter(|&(&g, &p)| g == c && p == c)
            .count() as f64;
        let fp = gold
            .iter()
            .zip(pred)
            .filter(|&(&g, &p)| g != c && p == c)
            .count() as f64;
        let fn_ = gold
            .iter()
            .zip(pred)
            .filter(|&(&g, &p)| g == c && p != c)
            .count() as f64;
        if tp + fp + fn_ == 0.0 {
            continue;
        }
        f1s.push(2.0 * tp / (2.0 * tp + fp + fn_));
    }
    f1s.iter().sum::<f64>() / f1s.len().max(1) as f64
}

/// Macro-F1 with a bootstrap standard error (F1 is not a mean of per-document scores, so
/// lm-eval bootstraps it too): the standard deviation over `iters` resamples with
/// replacement, from a fixed seed so the figure is reproducible.
pub fn macro_f1_bootstrap(gold: &[usize], pred: &[usize], classes: usize, iters: usize) -> Metric {
    let value = macro_f1(gold, pred, classes);
    let n = gold.len();
    if n < 2 || iters < 2 {
        return Metric { value, stderr: 0.0 };
    }
    let mut rng = crate::SplitMix(1234);
    let (mut g, mut p) = (vec![0; n], vec![0; n]);
    let scores: Vec<f64> = (0..iters)
        .map(|_| {
            for i in 0..n {
                let j = rng.below(n);
                g[i] = gold[j];
                p[i] = pred[j];
            }
            macro_f1(&g, &p, classes)
        })
        .collect();
    let m = scores.iter().sum::<f64>() / iters as f64;
    let var = scores.iter().map(|s| (s - m) * (s - m)).sum::<f64>() / (iters as f64 - 1.0);
    Metric {
        value,
        stderr: var.sqrt(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_stderr_is_the_sample_deviation_over_root_n() {
        // [1, 0, 1, 1]: mean 0.75, sample variance 0.25, stderr sqrt(0.25 / 4) = 0.25.
        let m = mean(&[1.0, 0.0, 1.0, 1.0]);
        assert_eq!(m.value, 0.75);
        assert!((m.stderr - 0.25).abs() < 1e-12);
        assert_eq!(mean(&[1.0]).stderr, 0.0);
    }

    #[test]
    fn argmax_takes_the_first_of_equals() {
        assert_eq!(argmax(&[-3.0, -1.0, -1.0, -2.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }

    #[test]
    fn macro_f1_by_hand() {
        // class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 1, fp 1, fn 1 -> 0.5.
        assert_eq!(macro_f1(&[0, 0, 1, 1], &[0, 1, 0, 1], 2), 0.5);
        assert_eq!(macro_f1(&[0, 1, 1], &[0, 1, 1], 3), 1.0);
        let m = macro_f1_bootstrap(&[0, 0, 1, 1, 0, 1], &[0, 1, 1, 1, 0, 0], 2, 200);
        assert!(m.stderr > 0.05 && m.stderr < 0.5, "{m:?}");
    }
}
