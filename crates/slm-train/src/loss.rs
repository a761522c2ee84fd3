//! Next-token cross-entropy as one op with its own backward.
//!
//! Why by hand: candle composes cross-entropy from log_softmax (max, subtract, exp, sum, log,
//! subtract) and a gather, and its autograd walks each of those back, allocating and filling a
//! (tokens x vocab) tensor at every step: a dozen passes over the largest tensor of a training
//! step (134 MB for the tiny benchmark shape). Fused, the forward is two passes per row (max,
//! then the sum of exponentials) and the backward one (softmax minus the one-hot target).
//! `candle_nn::loss::cross_entropy` stays the reference it is tested against.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType, D};
use rayon::prelude::*;
use slm_model::fused::{all_log_sum_exp, contiguous, ExpInPlace};

/// Mean next-token cross-entropy of logits (b, t, vocab) against targets (b, t).
pub fn lm_loss(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), v))?.contiguous()?;
    let targets: Vec<u32> = targets.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    logits.apply_op1(CrossEntropy {
        targets,
        lse: Mutex::new(Vec::new()),
    })
}

struct CrossEntropy {
    targets: Vec<u32>,
    /// log-sum-exp of each row, kept from the forward pass for the backward.
    lse: Mutex<Vec<f64>>,
}

fn rows<'a, T: WithDType>(
    x: &'a [T],
    layout: &Layout,
) -> candle_core::Result<(usize, usize, &'a [T])> {
    let (n, v) = layout.shape().dims2()?;
    Ok((n, v, contiguous(x, layout, "cross-entropy")?))
}

impl CrossEntropy {
    fn fwd<T: WithDType + ExpInPlace>(&self, x: &[T], layout: &Layout) -> candle_core::Result<T> {
        let (n, v, x) = rows(x, layout)?;
        if self.targets.len() != n {
            candle_core::bail!("cross-entropy: {} targets for {n} rows", self.targets.len());
        }
        if let Some(&bad) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("cross-entropy: target id {bad} is outside the vocabulary of {v}");
        }
        let lse = all_log_sum_exp(x, v);
        let total: f64 = lse
            .iter()
            .zip(&self.targets)
            .enumerate()
            .map(|(i, (l, &t))| l - WithDType::to_f64(x[i * v + t as usize]))
            .sum();
        *self.lse.lock().expect("lse lock") = lse;
        Ok(<T as WithDType>::from_f64(total / n as f64))
    }

    fn bwd_rows<T: WithDType + ExpInPlace>(
        &self,
        x: &[T],
        layout: &Layout,
        grad: f64,
    ) -> candle_core::Result<Vec<T>> {
        let (n, v, x) = rows(x, layout)?;
        let mut lse = self.lse.lock().expect("lse lock").clone();
        if lse.len() != n {
            lse = all_log_sum_exp(x, v);
        }
        let scale = grad / n as f64;
        let mut out = vec![T::zero(); n * v];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v))
            .enumerate()
            .for_each(|(i, (o, row))| {
                let l = <T as WithDType>::from_f64(lse[i]);
                let s = <T as WithDType>::from_f64(scale);
                for (o, &x) in o.iter_mut().zip(row) {
                    *o = x - l;
                }
                T::exp_in_place(o);
                o.iter_mut().for_each(|o| *o *= s);
                let t = self.targets[i] as usize;
                o[t] -= s;
            });
        Ok(out)
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "slm-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(vec![self.fwd(x, l)?]),
            CpuStorage::F64(x) => CpuStorage::F64(vec![self.fwd(x, l)?]),
            _ => candle_core::bail!("cross-entropy: logits must be f32 or f64"),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let (storage, layout) = arg.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            candle_core::bail!("cross-entropy runs on the CPU");
        };
        let out = match s {
            CpuStorage::F32(x) => {
                Tensor::from_vec(self.bwd_rows(x, layout, g)?, arg.shape(), arg.device())?
            }
            CpuStorage::F64(x) => {
                Tensor::from_vec(self.bwd_rows(x, layout, g)?, arg.shape(), arg.device())?
            }
            _ => candle_core::bail!("cross-entropy: logits must be f32 or f64"),
        };
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn random(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        let mut rng = crate::init::Rng(seed);
        (0..n).map(|_| rng.normal() * scale).collect()
    }

    /// Loss and gradient against candle_nn's composed cross-entropy, on odd shapes.
    #[test]
    fn matches_the_composed_reference_in_value_and_gradient() {
        for (b, t, v, seed) in [(1, 1, 2, 1), (2, 3, 17, 2), (3, 5, 301, 3), (1, 7, 1000, 4)] {
            for dtype in [DType::F64, DType::F32] {
                let dev = Device::Cpu;
                let x = Tensor::from_vec(random(b * t * v, seed, 3.0), (b, t, v), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let mut rng = crate::init::Rng(seed + 100);
                let y: Vec<u32> = (0..b * t)
                    .map(|_| (rng.next_u64() % v as u64) as u32)
                    .collect();
                let y = Tensor::from_vec(y, (b, t), &dev).unwrap();
                let xv = Var::from_tensor(&x).unwrap();
                let ours = lm_loss(xv.as_tensor(), &y).unwrap();
                let reference = candle_nn::loss::cross_entropy(
                    &xv.as_tensor().reshape((b * t, v)).unwrap(),
                    &y.flatten_all().unwrap(),
                )
                .unwrap();
                let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
                let (a, r) = (
                    ours.to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap(),
                    reference
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap(),
                );
                assert!(
                    (a - r).abs() <= tol * r.abs().max(1.0),
                    "{b}x{t}x{v} {dtype:?}: {a} vs {r}"
                );
                let ga = ours
                    .backward()
                    .unwrap()
                    .get(xv.as_tensor())
                    .unwrap()
                    .clone();
                let gr = reference
                    .backward()
                    .unwrap()
                    .get(xv.as_tensor())
                    .unwrap()
                    .clone();
                let diff = (ga.to_dtype(DType::F64).unwrap() - gr.to_dtype(DType::F64).unwrap())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                // Gradients are softmax probabilities / (b*t): bounded by 1/(b*t).
                let gtol = tol / (b * t) as f64;
                assert!(
                    diff <= gtol,
                    "{b}x{t}x{v} {dtype:?}: gradient differs by {diff}"
                );
            }
        }
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 5), DType::F32, &dev).unwrap();
        let y = Tensor::new(&[[1u32, 5]], &dev).unwrap();
        let err = lm_loss(&x, &y).unwrap_err().to_string();
        assert!(
            err.contains("target id 5") && err.contains("vocabulary of 5"),
            "{err}"
        );
    }
}
