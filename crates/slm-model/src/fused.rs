//! Causal softmax, RMSNorm, RoPE and SwiGLU as single ops with their own backward, for training.
//!
//! Why by hand: candle's fused softmax, RMSNorm and RoPE have no backward (and SwiGLU is two ops), so with gradients on it
//! composes them from five or six elementwise ops, each materialising a tensor forward and
//! several more backward (the (b, heads, t, t) attention scores among them). These do one
//! pass per row each way. The composed ops stay the reference they are tested against; the
//! inference path (no gradients) does not use these, it keeps ggml's exact rounding.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType, D,
};
use num_traits::Float;
use rayon::prelude::*;
use slm_kernels::exp::{contiguous, ExpInPlace};

/// Runs `f` on the f32 or f64 data of a tensor.
macro_rules! on_float {
    ($t:expr, $op:expr, |$x:ident, $l:ident| $body:expr) => {{
        let (storage, $l) = $t.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(CpuStorage::F32($x)) => $body,
            candle_core::Storage::Cpu(CpuStorage::F64($x)) => $body,
            _ => candle_core::bail!("{}: expects f32 or f64 on the CPU", $op),
        }
    }};
}

/// dx = y * (dy - sum(dy * y)) per row.
fn softmax_bwd_rows<T: WithDType + Float>(y: &[T], dy: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    out.par_chunks_mut(n)
        .zip(y.par_chunks(n).zip(dy.par_chunks(n)))
        .for_each(|(o, (y, dy))| {
            let dot = y.iter().zip(dy).fold(T::zero(), |s, (&a, &b)| s + a * b);
            for ((o, &y), &dy) in o.iter_mut().zip(y).zip(dy) {
                *o = y * (dy - dot);
            }
        });
    out
}

/// Causal attention weights: softmax over the last dimension of `scale * x`, where row r of the
/// (..., rows, t) scores is query position `r % t` (so `rows` may stack several query heads
/// that share a key head) and may see keys 0..=that position. Masked entries are exactly 0.
pub fn causal_softmax(x: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(CausalSoftmax { scale })
}

struct CausalSoftmax {
    scale: f64,
}

fn causal_softmax_rows<T: WithDType + ExpInPlace>(x: &[T], t: usize, scale: f64) -> Vec<T> {
    let scale = <T as WithDType>::from_f64(scale);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(t)
        .zip(x.par_chunks(t))
        .enumerate()
        .for_each(|(r, (o, row))| {
            let seen = r % t + 1;
            let (o, row) = (&mut o[..seen], &row[..seen]);
            let max = row.iter().fold(T::neg_infinity(), |m, &v| Float::max(m, v));
            for (o, &v) in o.iter_mut().zip(row) {
                *o = (v - max) * scale;
            }
            T::exp_in_place(o);
            let sum = o.iter().fold(T::zero(), |s, &v| s + v);
            let inv = T::one() / sum;
            o.iter_mut().for_each(|o| *o *= inv);
        });
    out
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "slm-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = l.dims().last().copied().unwrap_or(1).max(1);
        if l.dims().len() < 2 || !l.dims()[l.dims().len() - 2].is_multiple_of(t) {
            candle_core::bail!(
                "{}: rows must be a multiple of the keys, got {:?}",
                self.name(),
                l.dims()
            );
        }
        let n = self.name();
        let out = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(causal_softmax_rows(contiguous(x, l, n)?, t, self.scale))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(causal_softmax_rows(contiguous(x, l, n)?, t, self.scale))
            }
            _ => candle_core::bail!("{n}: expects f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    /// dx = scale * y * (dy - sum(dy * y)); masked entries have y = 0 and get 0.
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = softmax_grad(y, dy, self.name())?;
        Ok(Some((grad * self.scale)?))
    }
}

fn softmax_grad(y: &Tensor, dy: &Tensor, op: &str) -> candle_core::Result<Tensor> {
    let n = y.dim(D::Minus1)?;
    let dy = dy.contiguous()?;
    let (ys, yl) = y.storage_and_layout();
    let candle_core::Storage::Cpu(ys) = &*ys else {
        candle_core::bail!("{op}: expects the CPU");
    };
    Ok(on_float!(dy, op, |d, dl| {
        let yv = contiguous(ys.as_slice()?, yl, op)?;
        let dv = contiguous(d, dl, op)?;
        Tensor::from_vec(softmax_bwd_rows(yv, dv, n), y.shape(), y.device())?
    }))
}

/// `silu(g) * u`, the SwiGLU gate.
pub fn swiglu(g: &Tensor, u: &Tensor) -> candle_core::Result<Tensor> {
    g.contiguous()?.apply_op2(&u.contiguous()?, SwiGlu)
}

struct SwiGlu;

fn swiglu_rows<T: WithDType + ExpInPlace>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(o, (g, u))| {
            // o = e^-g, then silu(g) * u = g / (1 + e^-g) * u.
            o.iter_mut().zip(g).for_each(|(o, &g)| *o = -g);
            T::exp_in_place(o);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (T::one() + *o) * u;
            }
        });
    out
}

/// With s = sigmoid(g): d/du = silu(g) = g s, d/dg = u s (1 + g (1 - s)).
fn swiglu_bwd_rows<T: WithDType + ExpInPlace>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut dg, mut du) = (vec![T::zero(); g.len()], vec![T::zero(); g.len()]);
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(
            g.par_chunks(4096)
                .zip(u.par_chunks(4096))
                .zip(dy.par_chunks(4096)),
        )
        .for_each(|((dg, du), ((g, u), dy))| {
            dg.iter_mut().zip(g).for_each(|(o, &g)| *o = -g);
            T::exp_in_place(dg);
            for i in 0..g.len() {
                let s = T::one() / (T::one() + dg[i]);
                du[i] = dy[i] * g[i] * s;
                dg[i] = dy[i] * u[i] * s * (T::one() + g[i] * (T::one() - s));
            }
        });
    (dg, du)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "slm-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("slm-swiglu: shapes {:?} and {:?}", l1.dims(), l2.dims());
        }
        let n = self.name();
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(swiglu_rows(contiguous(g, l1, n)?, contiguous(u, l2, n)?))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u)) => {
                CpuStorage::F64(swiglu_rows(contiguous(g, l1, n)?, contiguous(u, l2, n)?))
            }
            _ => candle_core::bail!("{n}: expects f32 or f64, both the same"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = self.name();
        let dy = dy.contiguous()?;
        let (us, ul) = u.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let (candle_core::Storage::Cpu(us), candle_core::Storage::Cpu(ds)) = (&*us, &*ds) else {
            candle_core::bail!("{n}: expects the CPU");
        };
        let (dg, du) = on_float!(g, n, |gv, gl| {
            let (dg, du) = swiglu_bwd_rows(
                contiguous(gv, gl, n)?,
                contiguous(us.as_slice()?, ul, n)?,
                contiguous(ds.as_slice()?, dl, n)?,
            );
            (
                Tensor::from_vec(dg, g.shape(), g.device())?,
                Tensor::from_vec(du, u.shape(), u.device())?,
            )
        });
        Ok((Some(dg), Some(du)))
    }
}

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f64 })
}

struct RmsNorm {
    eps: f64,
}

fn inv_rms<T: WithDType + Float>(row: &[T], eps: f64) -> T {
    let ss = row.iter().fold(T::zero(), |s, &v| s + v * v);
    let mean = WithDType::to_f64(ss) / row.len() as f64;
    <T as WithDType>::from_f64(1.0 / (mean + eps).sqrt())
}

fn rms_norm_rows<T: WithDType + Float>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let n = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(o, row)| {
            let r = inv_rms(row, eps);
            for ((o, &x), &w) in o.iter_mut().zip(row).zip(w) {
                *o = x * r * w;
            }
        });
    out
}

/// With r = 1/rms(x) and g = w * dy: dx = r * g - x * r^3 * mean(g * x); dw = sum over rows
/// of dy * x * r.
fn rms_norm_bwd_rows<T: WithDType + Float>(
    x: &[T],
    w: &[T],
    dy: &[T],
    eps: f64,
) -> (Vec<T>, Vec<T>) {
    let n = w.len();
    let rows_per_chunk = (x.len() / n)
        .div_ceil(rayon::current_num_threads() * 4)
        .max(1);
    let mut dx = vec![T::zero(); x.len()];
    let dw = dx
        .par_chunks_mut(n * rows_per_chunk)
        .zip(
            x.par_chunks(n * rows_per_chunk)
                .zip(dy.par_chunks(n * rows_per_chunk)),
        )
        .map(|(dxc, (xc, dyc))| {
            let mut dw = vec![T::zero(); n];
            for ((dx, x), dy) in dxc.chunks_mut(n).zip(xc.chunks(n)).zip(dyc.chunks(n)) {
                let r = inv_rms(x, eps);
                let mut gx = T::zero();
                for ((&x, &dy), &w) in x.iter().zip(dy).zip(w) {
                    gx += w * dy * x;
                }
                let c = r * r * r * gx / <T as WithDType>::from_f64(n as f64);
                for i in 0..n {
                    dx[i] = r * w[i] * dy[i] - x[i] * c;
                    dw[i] += dy[i] * x[i] * r;
                }
            }
            dw
        })
        .reduce(
            || vec![T::zero(); n],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, &b)| *a += b);
                a
            },
        );
    (dx, dw)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "slm-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l2.shape().elem_count();
        if l1.dims().last() != Some(&n) {
            candle_core::bail!(
                "slm-rms-norm: weight of {n} for a last dimension of {:?}",
                l1.dims().last()
            );
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => CpuStorage::F32(rms_norm_rows(
                contiguous(x, l1, self.name())?,
                contiguous(w, l2, self.name())?,
                self.eps,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => CpuStorage::F64(rms_norm_rows(
                contiguous(x, l1, self.name())?,
                contiguous(w, l2, self.name())?,
                self.eps,
            )),
            _ => candle_core::bail!("slm-rms-norm: expects f32 or f64, both the same"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (ws, wl) = w.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let (candle_core::Storage::Cpu(ws), candle_core::Storage::Cpu(ds)) = (&*ws, &*ds) else {
            candle_core::bail!("slm-rms-norm: expects the CPU");
        };
        let (dx, dw) = on_float!(x, "slm-rms-norm", |xv, xl| {
            let name = "slm-rms-norm";
            let (dx, dw) = rms_norm_bwd_rows(
                contiguous(xv, xl, name)?,
                contiguous(ws.as_slice()?, wl, name)?,
                contiguous(ds.as_slice()?, dl, name)?,
                self.eps,
            );
            (
                Tensor::from_vec(dx, x.shape(), x.device())?,
                Tensor::from_vec(dw, w.shape(), w.device())?,
            )
        });
        Ok((Some(dx), Some(dw)))
    }
}

/// Rotary embedding of (batch, heads, t, head_dim) by (t, head_dim / 2) tables; pairs are
/// adjacent (`interleaved`) or half a head apart. Its backward is the inverse rotation.
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { interleaved })
}

struct Rope {
    interleaved: bool,
}

/// Rotates every row of `x` (t rows of `d` per head) by `sign` * the angle of its position.
fn rotate<T: WithDType + Float>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    t: usize,
    d: usize,
    interleaved: bool,
    sign: T,
) -> Vec<T> {
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(t * d)
        .zip(x.par_chunks(t * d))
        .for_each(|(o, xh)| {
            for p in 0..t {
                let (c, s) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                let (o, xr) = (&mut o[p * d..(p + 1) * d], &xh[p * d..(p + 1) * d]);
                for i in 0..half {
                    let (a, b) = if interleaved {
                        (2 * i, 2 * i + 1)
                    } else {
                        (i, i + half)
                    };
                    let (si, ci) = (sign * s[i], c[i]);
                    o[a] = xr[a] * ci - xr[b] * si;
                    o[b] = xr[b] * ci + xr[a] * si;
                }
            }
        });
    out
}

impl Rope {
    fn dims(&self, l: &Layout, lc: &Layout) -> candle_core::Result<(usize, usize)> {
        let (_, _, t, d) = l.shape().dims4()?;
        if d % 2 != 0 || lc.shape().dims2()? != (t, d / 2) {
            candle_core::bail!("slm-rope: tables {:?} for x {:?}", lc.dims(), l.dims());
        }
        Ok((t, d))
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "slm-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, d) = self.dims(l1, l2)?;
        let n = self.name();
        let il = self.interleaved;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                CpuStorage::F32(rotate(
                    contiguous(x, l1, n)?,
                    contiguous(c, l2, n)?,
                    contiguous(s, l3, n)?,
                    t,
                    d,
                    il,
                    1.0,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(c), CpuStorage::F64(s)) => {
                CpuStorage::F64(rotate(
                    contiguous(x, l1, n)?,
                    contiguous(c, l2, n)?,
                    contiguous(s, l3, n)?,
                    t,
                    d,
                    il,
                    1.0,
                ))
            }
            _ => candle_core::bail!("slm-rope: expects f32 or f64, all the same"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (t, d) = (dy.dim(2)?, dy.dim(3)?);
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        let (candle_core::Storage::Cpu(cs), candle_core::Storage::Cpu(ss)) = (&*cs, &*ss) else {
            candle_core::bail!("slm-rope: expects the CPU");
        };
        let n = self.name();
        let dx = on_float!(dy, n, |dv, dl| {
            let v = rotate(
                contiguous(dv, dl, n)?,
                contiguous(cs.as_slice()?, cl, n)?,
                contiguous(ss.as_slice()?, sl, n)?,
                t,
                d,
                self.interleaved,
                -1.0,
            );
            Tensor::from_vec(v, dy.shape(), dy.device())?
        });
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 11) as f64 / (1u64 << 53) as f64) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    const SHAPES: [&[usize]; 4] = [&[1, 1], &[3, 7], &[2, 3, 5, 33], &[4, 130]];

    #[test]
    fn rms_norm_matches_the_composed_reference() {
        for (i, shape) in SHAPES.iter().enumerate() {
            for (dtype, tol) in [(DType::F64, 1e-13), (DType::F32, 2e-5)] {
                let n = *shape.last().unwrap();
                let x = Var::from_tensor(&random(shape, i as u64, dtype)).unwrap();
                let w = Var::from_tensor(&random(&[n], 50 + i as u64, dtype)).unwrap();
                let up = random(shape, 99 + i as u64, dtype);
                let ours = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
                let reference =
                    candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
                assert!(max_diff(&ours, &reference) <= tol, "{shape:?} {dtype:?}");
                let grads = |y: &Tensor| {
                    let g = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    (
                        g.get(x.as_tensor()).unwrap().clone(),
                        g.get(w.as_tensor()).unwrap().clone(),
                    )
                };
                let ((ax, aw), (rx, rw)) = (grads(&ours), grads(&reference));
                let rows = (x.elem_count() / n) as f64;
                assert!(max_diff(&ax, &rx) <= 10.0 * tol, "{shape:?} {dtype:?}: dx");
                assert!(
                    max_diff(&aw, &rw) <= 10.0 * tol * rows,
                    "{shape:?} {dtype:?}: dw"
                );
            }
        }
    }

    #[test]
    fn rope_matches_the_composed_reference_both_layouts() {
        for (i, &(b, h, t, d)) in [(1, 1, 1, 2), (2, 3, 5, 8), (1, 2, 7, 66)]
            .iter()
            .enumerate()
        {
            for (dtype, tol) in [(DType::F64, 1e-14), (DType::F32, 1e-6)] {
                let x = Var::from_tensor(&random(&[b, h, t, d], i as u64, dtype)).unwrap();
                let cos = random(&[t, d / 2], 10 + i as u64, dtype);
                let sin = random(&[t, d / 2], 20 + i as u64, dtype);
                let up = random(&[b, h, t, d], 30 + i as u64, dtype);
                for interleaved in [false, true] {
                    let ours = rope(x.as_tensor(), &cos, &sin, interleaved).unwrap();
                    let reference = if interleaved {
                        candle_nn::rotary_emb::rope_i_slow(x.as_tensor(), &cos, &sin)
                    } else {
                        candle_nn::rotary_emb::rope_slow(x.as_tensor(), &cos, &sin)
                    }
                    .unwrap();
                    assert!(
                        max_diff(&ours, &reference) <= 4.0 * tol,
                        "{interleaved} {dtype:?}"
                    );
                    let g = |y: &Tensor| {
                        (y * &up)
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .backward()
                            .unwrap()
                            .get(x.as_tensor())
                            .unwrap()
                            .clone()
                    };
                    let diff = max_diff(&g(&ours), &g(&reference));
                    assert!(
                        diff <= 4.0 * tol,
                        "{interleaved} {dtype:?}: gradient {diff}"
                    );
                }
            }
        }
    }

    /// Against the composed path the model used before: scale, add the causal mask, softmax;
    /// rows stack 3 query heads per key head as the grouped-query attention lays them out.
    #[test]
    fn causal_softmax_matches_scale_mask_softmax() {
        for (i, &(b, heads, rep, t)) in [(1, 1, 1, 1), (2, 2, 3, 5), (1, 1, 2, 37)]
            .iter()
            .enumerate()
        {
            for (dtype, tol) in [(DType::F64, 1e-14), (DType::F32, 1e-6)] {
                let shape = [b, heads, rep * t, t];
                let x = Var::from_tensor(&random(&shape, i as u64, dtype)).unwrap();
                let up = random(&shape, 40 + i as u64, dtype);
                let scale = 0.125;
                let ours = causal_softmax(x.as_tensor(), scale).unwrap();
                let mask: Vec<f64> = (0..t)
                    .flat_map(|q| (0..t).map(move |k| if k > q { f64::NEG_INFINITY } else { 0.0 }))
                    .collect();
                let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let reference = (x.as_tensor() * scale)
                    .unwrap()
                    .reshape((b, heads, rep, t, t))
                    .unwrap()
                    .broadcast_add(&mask)
                    .unwrap()
                    .reshape(&shape[..])
                    .unwrap();
                let reference = candle_nn::ops::softmax(&reference, D::Minus1).unwrap();
                assert!(max_diff(&ours, &reference) <= tol, "{shape:?} {dtype:?}");
                let g = |y: &Tensor| {
                    (y * &up)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap()
                        .get(x.as_tensor())
                        .unwrap()
                        .clone()
                };
                let diff = max_diff(&g(&ours), &g(&reference));
                assert!(diff <= 4.0 * tol, "{shape:?} {dtype:?}: gradient {diff}");
            }
        }
    }
    #[test]
    fn swiglu_matches_the_composed_reference() {
        for (i, shape) in SHAPES.iter().enumerate() {
            for (dtype, tol) in [(DType::F64, 1e-14), (DType::F32, 1e-6)] {
                let g = Var::from_tensor(&(random(shape, i as u64, dtype) * 4.0).unwrap()).unwrap();
                let u = Var::from_tensor(&random(shape, 60 + i as u64, dtype)).unwrap();
                let up = random(shape, 99 + i as u64, dtype);
                let ours = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
                let reference =
                    (candle_nn::ops::silu(g.as_tensor()).unwrap() * u.as_tensor()).unwrap();
                assert!(
                    max_diff(&ours, &reference) <= 8.0 * tol,
                    "{shape:?} {dtype:?}"
                );
                let grads = |y: &Tensor| {
                    let s = (y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                    (
                        s.get(g.as_tensor()).unwrap().clone(),
                        s.get(u.as_tensor()).unwrap().clone(),
                    )
                };
                let ((ag, au), (rg, ru)) = (grads(&ours), grads(&reference));
                assert!(
                    max_diff(&ag, &rg) <= 16.0 * tol,
                    "{shape:?} {dtype:?}: dg {}",
                    max_diff(&ag, &rg)
                );
                assert!(max_diff(&au, &ru) <= 8.0 * tol, "{shape:?} {dtype:?}: du");
            }
        }
    }
}
