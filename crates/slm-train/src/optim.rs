//! AdamW (decoupled weight decay, as torch.optim.AdamW) over flat parameter, gradient and
//! moment vectors: the trainer's parameters are one vector, and a head or adapter trained
//! beside it keeps its own vector and its own `AdamW`. The moments are plain slices, so a
//! checkpoint holds them and a resumed run continues exactly.

use std::ops::Range;

use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// A stretch of the parameter vector that AdamW updates: whether weight decay applies.
/// Stretches not listed (frozen parameters) are left alone, moments included.
#[derive(Debug, Clone)]
pub struct Group {
    pub range: Range<usize>,
    pub decay: bool,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    /// First and second moments, one value per parameter.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Updates applied so far (the bias corrections' t).
    pub steps: u64,
}

impl AdamW {
    /// Zero moments for `len` parameters.
    pub fn new(cfg: AdamWConfig, len: usize) -> Self {
        Self {
            cfg,
            m: vec![0.0; len],
            v: vec![0.0; len],
            steps: 0,
        }
    }

    /// One update of the `groups` of `params` with learning rate `lr`, the gradients times
    /// `grad_scale` first (clipping). Each value's update depends only on its own gradient
    /// and moments, so the result does not depend on how the threads split the work.
    pub fn step(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        groups: &[Group],
        lr: f64,
        grad_scale: f64,
    ) {
        assert!(
            params.len() == self.m.len() && grads.len() == self.m.len(),
            "AdamW over {} values given {} parameters and {} gradients",
            self.m.len(),
            params.len(),
            grads.len()
        );
        self.steps += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        let (b1, b2, gs) = (beta1 as f32, beta2 as f32, grad_scale as f32);
        let (inv_bc1, inv_bc2, eps, lr32) = (
            (1.0 / bc1) as f32,
            (1.0 / bc2) as f32,
            eps as f32,
            lr as f32,
        );
        for group in groups {
            let keep = if group.decay && weight_decay != 0.0 {
                (1.0 - lr * weight_decay) as f32
            } else {
                1.0
            };
            let r = group.range.clone();
            const CHUNK: usize = 1 << 14;
            params[r.clone()]
                .par_chunks_mut(CHUNK)
                .zip(grads[r.clone()].par_chunks(CHUNK))
                .zip(self.m[r.clone()].par_chunks_mut(CHUNK))
                .zip(self.v[r].par_chunks_mut(CHUNK))
                .for_each(|(((w, g), m), v)| {
                    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m).zip(v) {
                        let g = g * gs;
                        *m = *m * b1 + g * (1.0 - b1);
                        *v = *v * b2 + g * g * (1.0 - b2);
                        let update = (*m * inv_bc1) / ((*v * inv_bc2).sqrt() + eps);
                        *w = *w * keep - update * lr32;
                    }
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// loss = 0.5 * (w + n): gradient 0.5 for both; only w decays. By hand
    /// (torch.optim.AdamW, lr 0.1, wd 0.1, betas 0.9/0.95): w 1 -> 0.89 -> 0.7811,
    /// n 1 -> 0.9 -> 0.8. A frozen third value does not move.
    #[test]
    fn two_updates_match_torch_by_hand() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(cfg, 3);
        let mut p = vec![1.0f32, 1.0, 1.0];
        let groups = [
            Group {
                range: 0..1,
                decay: true,
            },
            Group {
                range: 1..2,
                decay: false,
            },
        ];
        let mut seen = Vec::new();
        for _ in 0..2 {
            opt.step(&mut p, &[0.5, 0.5, 0.5], &groups, 0.1, 1.0);
            seen.push(p.clone());
        }
        let close = |a: f32, b: f64| (a as f64 - b).abs() < 1e-6;
        assert!(
            close(seen[0][0], 0.89) && close(seen[1][0], 0.7811),
            "{seen:?}"
        );
        assert!(close(seen[0][1], 0.9) && close(seen[1][1], 0.8), "{seen:?}");
        assert_eq!(p[2], 1.0, "a parameter outside every group is frozen");
        assert_eq!((opt.m[2], opt.v[2]), (0.0, 0.0));
    }

    /// Moments and the step count carried to a fresh optimizer continue the trajectory to
    /// the bit: a resumed run's next updates equal the unbroken run's.
    #[test]
    fn restored_moments_continue_the_same_trajectory() {
        let groups = [Group {
            range: 0..4,
            decay: true,
        }];
        let grad = |s: usize| -> Vec<f32> { (0..4).map(|i| ((i + s) as f32).sin()).collect() };
        let mut whole = AdamW::new(AdamWConfig::default(), 4);
        let mut p = vec![0.3f32, -0.2, 0.1, 0.9];
        for s in 0..5 {
            whole.step(&mut p, &grad(s), &groups, 1e-2, 0.7);
        }
        let mut first = AdamW::new(AdamWConfig::default(), 4);
        let mut q = vec![0.3f32, -0.2, 0.1, 0.9];
        for s in 0..2 {
            first.step(&mut q, &grad(s), &groups, 1e-2, 0.7);
        }
        let mut resumed = AdamW::new(AdamWConfig::default(), 4);
        resumed.m.copy_from_slice(&first.m);
        resumed.v.copy_from_slice(&first.v);
        resumed.steps = first.steps;
        for s in 2..5 {
            resumed.step(&mut q, &grad(s), &groups, 1e-2, 0.7);
        }
        assert_eq!(
            p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            q.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(whole.m, resumed.m);
    }
}
