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
use slm_kernels::exp::{all_log_sum_exp, contiguous, ExpInPlace};
use slm_kernels::head::{head_loss_into, HeadShape};



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

/// The training loss of `model` on inputs `x` (batch, seq) and targets `y`: `lm_head_loss`
/// where the output projection is a dense f32/f64 matrix, else `lm_loss` of the logits.
pub fn model_loss(model: &slm_model::Llama, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    match model.head_weight() {
        Some(w) if matches!(w.dtype(), DType::F32 | DType::F64) => {
            lm_head_loss(&model.hidden(x)?, w, y)
        }
        _ => lm_loss(&model.forward(x, None, false)?, y),
    }
}

/// Mean next-token cross-entropy of the output projection `h · wᵀ` (h: (.., hidden) final
/// hidden states, w: (vocab, hidden)) against targets, without the (tokens x vocab) logits.
///
/// Why: `lm_loss` of the projected logits materialises them (134 MB for the tiny benchmark
/// shape), then their gradient, and candle's backward adds that gradient into a third zeroed
/// tensor of the same size before two matmuls read it. Here rows go in chunks that stay in
/// cache: each chunk's logits become its softmax-minus-one-hot gradient in place, which goes
/// straight into the gradients of h and w (computed with the loss, since nothing follows the
/// loss but its scale). `lm_loss` after a matmul stays the reference it is tested against.
pub fn lm_head_loss(h: &Tensor, w: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let d = h.dim(D::Minus1)?;
    let h = h.reshape(((), d))?.contiguous()?;
    let w = w.contiguous()?;
    let targets: Vec<u32> = targets.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    h.apply_op2(
        &w,
        HeadLoss {
            targets,
            grads: Mutex::new(None),
        },
    )
}

struct HeadLoss {
    targets: Vec<u32>,
    /// Gradients of the mean loss with respect to h and w, from the forward pass.
    grads: Mutex<Option<(CpuStorage, CpuStorage)>>,
}

impl HeadLoss {
    /// The mean loss, and its gradients with respect to h (n x d) and w (v x d).
    #[allow(clippy::type_complexity)]
    fn run<T: WithDType + ExpInPlace>(
        &self,
        h: &[T],
        hl: &Layout,
        w: &[T],
        wl: &Layout,
    ) -> candle_core::Result<(T, Vec<T>, Vec<T>)> {
        let (n, d) = hl.shape().dims2()?;
        let (v, dw_) = wl.shape().dims2()?;
        let (h, w) = (
            contiguous(h, hl, "head loss")?,
            contiguous(w, wl, "head loss")?,
        );
        if dw_ != d {
            candle_core::bail!(
                "head loss: hidden states of width {d} against weights of width {dw_}"
            );
        }
        if self.targets.len() != n {
            candle_core::bail!("head loss: {} targets for {n} rows", self.targets.len());
        }
        if let Some(&bad) = self.targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("head loss: target id {bad} is outside the vocabulary of {v}");
        }
        let mut dh = vec![T::zero(); n * d];
        let mut dw = vec![T::zero(); v * d];
        let mut buf = Vec::new();
        let total = head_loss_into(
            HeadShape { n, d, v },
            h,
            w,
            &self.targets,
            T::one(),
            Some((&mut dh, &mut dw)),
            &mut buf,
        );
        let inv_n = 1.0 / n.max(1) as f64;
        Ok((<T as WithDType>::from_f64(total * inv_n), dh, dw))
    }
}

impl candle_core::CustomOp2 for HeadLoss {
    fn name(&self) -> &'static str {
        "slm-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (loss, dh, dw) = match (s1, s2) {
            (CpuStorage::F32(h), CpuStorage::F32(w)) => {
                let (l, dh, dw) = self.run(h, l1, w, l2)?;
                (
                    CpuStorage::F32(vec![l]),
                    CpuStorage::F32(dh),
                    CpuStorage::F32(dw),
                )
            }
            (CpuStorage::F64(h), CpuStorage::F64(w)) => {
                let (l, dh, dw) = self.run(h, l1, w, l2)?;
                (
                    CpuStorage::F64(vec![l]),
                    CpuStorage::F64(dh),
                    CpuStorage::F64(dw),
                )
            }
            _ => candle_core::bail!("head loss: hidden states and weights must both be f32 or f64"),
        };
        *self.grads.lock().expect("head loss grads") = Some((dh, dw));
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let Some((dh, dw)) = self.grads.lock().expect("head loss grads").take() else {
            candle_core::bail!("head loss: backward ran twice, or without its forward");
        };
        let dev = h.device();
        let to_tensor = |s: CpuStorage, shape: &Shape| match s {
            CpuStorage::F32(v) => Tensor::from_vec(v, shape, dev),
            CpuStorage::F64(v) => Tensor::from_vec(v, shape, dev),
            _ => unreachable!("the forward stores f32 or f64"),
        };
        let (dh, dw) = (to_tensor(dh, h.shape())?, to_tensor(dw, w.shape())?);
        // The upstream gradient of a scalar loss (1, or 1 / accumulation steps).
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if g == 1.0 {
            Ok((Some(dh), Some(dw)))
        } else {
            Ok((Some((dh * g)?), Some((dw * g)?)))
        }
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

    /// The fused head loss against `lm_loss` of the explicit matmul, in value and in both
    /// gradients, on shapes whose rows span one chunk, several, and a short last chunk.
    #[test]
    fn head_loss_matches_matmul_then_cross_entropy() {
        let cases = [
            (1, 1, 3, 2, 1),
            (2, 3, 5, 17, 2),
            (3, 50, 8, 301, 3),
            (2, 700, 16, 1000, 4),
        ];
        for (b, t, d, v, seed) in cases {
            for dtype in [DType::F64, DType::F32] {
                let dev = Device::Cpu;
                let var = |len: usize, shape: &[usize], s: u64| {
                    let x = Tensor::from_vec(random(len, s, 1.0), shape, &dev).unwrap();
                    Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap()
                };
                let h = var(b * t * d, &[b, t, d], seed);
                let w = var(v * d, &[v, d], seed + 50);
                let mut rng = crate::init::Rng(seed + 100);
                let y: Vec<u32> = (0..b * t)
                    .map(|_| (rng.next_u64() % v as u64) as u32)
                    .collect();
                let y = Tensor::from_vec(y, (b, t), &dev).unwrap();
                let ours = lm_head_loss(h.as_tensor(), w.as_tensor(), &y).unwrap();
                let logits = h
                    .as_tensor()
                    .reshape((b * t, d))
                    .unwrap()
                    .matmul(&w.as_tensor().t().unwrap())
                    .unwrap();
                let reference = lm_loss(&logits.reshape((b, t, v)).unwrap(), &y).unwrap();
                let f = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
                let (a, r) = (
                    f(&ours).to_scalar::<f64>().unwrap(),
                    f(&reference).to_scalar::<f64>().unwrap(),
                );
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                assert!(
                    (a - r).abs() <= tol * r.abs().max(1.0),
                    "{b}x{t}x{d}x{v} {dtype:?}: {a} vs {r}"
                );
                let (go, gr) = (ours.backward().unwrap(), reference.backward().unwrap());
                for (name, x) in [("h", &h), ("w", &w)] {
                    let (ga, gb) = (
                        f(go.get(x.as_tensor()).unwrap()),
                        f(gr.get(x.as_tensor()).unwrap()),
                    );
                    let scale = gb
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                    let diff = (ga - gb)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                    assert!(
                        diff <= tol * scale.max(1e-30) * 10.0,
                        "{b}x{t}x{d}x{v} {dtype:?}: d{name} differs by {diff} (scale {scale})"
                    );
                }
            }
        }
    }

    /// An upstream scale (gradient accumulation divides the loss) scales both gradients.
    #[test]
    fn head_loss_gradients_follow_the_upstream_scale() {
        let dev = Device::Cpu;
        let h =
            Var::from_tensor(&Tensor::from_vec(random(6 * 4, 1, 1.0), (1, 6, 4), &dev).unwrap())
                .unwrap();
        let w = Var::from_tensor(&Tensor::from_vec(random(9 * 4, 2, 1.0), (9, 4), &dev).unwrap())
            .unwrap();
        let y = Tensor::new(&[[1u32, 2, 3, 4, 5, 8]], &dev).unwrap();
        let whole = lm_head_loss(h.as_tensor(), w.as_tensor(), &y)
            .unwrap()
            .backward()
            .unwrap();
        let third = (lm_head_loss(h.as_tensor(), w.as_tensor(), &y).unwrap() / 3.0)
            .unwrap()
            .backward()
            .unwrap();
        let a = (whole.get(w.as_tensor()).unwrap() / 3.0).unwrap();
        let b = third.get(w.as_tensor()).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-15, "{diff}");
    }

    #[test]
    fn head_loss_refuses_bad_targets_and_widths() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((1, 2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
        let y = Tensor::new(&[[1u32, 5]], &dev).unwrap();
        let err = lm_head_loss(&h, &w, &y).unwrap_err().to_string();
        assert!(
            err.contains("target id 5") && err.contains("vocabulary of 5"),
            "{err}"
        );
        let w3 = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
        let y = Tensor::new(&[[1u32, 2]], &dev).unwrap();
        let err = lm_head_loss(&h, &w3, &y).unwrap_err().to_string();
        assert!(err.contains("width 4") && err.contains("width 3"), "{err}");
        let y3 = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
        let err = lm_head_loss(&h, &w, &y3).unwrap_err().to_string();
        assert!(err.contains("3 targets for 2 rows"), "{err}");
        let w64 = Tensor::zeros((5, 4), DType::F64, &dev).unwrap();
        let err = lm_head_loss(&h, &w64, &y).unwrap_err().to_string();
        assert!(err.contains("both be f32 or f64"), "{err}");
    }

    /// The gradients come from the forward pass once: a second backward of the same loss is
    /// refused rather than given nothing or stale gradients.
    #[test]
    fn head_loss_backward_twice_is_an_error() {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::ones((1, 2, 4), DType::F32, &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::ones((5, 4), DType::F32, &dev).unwrap()).unwrap();
        let y = Tensor::new(&[[1u32, 2]], &dev).unwrap();
        let loss = lm_head_loss(h.as_tensor(), w.as_tensor(), &y).unwrap();
        loss.backward().unwrap();
        let err = loss.backward().unwrap_err().to_string();
        assert!(err.contains("backward ran twice"), "{err}");
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
