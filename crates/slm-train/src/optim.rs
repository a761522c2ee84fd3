//! AdamW (decoupled weight decay, as torch.optim.AdamW) with its moments as plain tensors, so
//! a checkpoint can hold them and a resumed run continues exactly.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};
use candle_nn::VarMap;

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

struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// Gradients by parameter (accumulated over micro-batches by the caller).
pub type Grads = HashMap<TensorId, Tensor>;

pub struct AdamW {
    params: Vec<Param>,
    steps: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    /// Every variable of `map`, in name order; `decay(name)` says which get weight decay.
    pub fn new(map: &VarMap, cfg: AdamWConfig, decay: impl Fn(&str) -> bool) -> Result<Self> {
        let data = map.data().lock().expect("var map lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut params = Vec::with_capacity(names.len());
        for name in names {
            let var = data[name].clone();
            params.push(Param {
                name: name.clone(),
                m: var.zeros_like()?,
                v: var.zeros_like()?,
                decay: decay(name),
                var,
            });
        }
        Ok(Self {
            params,
            steps: 0,
            cfg,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The gradients of this optimizer's parameters from a backward pass, by tensor id.
    pub fn grads(&self, store: &GradStore) -> Grads {
        self.params
            .iter()
            .filter_map(|p| {
                store
                    .get(p.var.as_tensor())
                    .map(|g| (p.var.as_tensor().id(), g.clone()))
            })
            .collect()
    }

    /// Adds a backward pass's gradients into `acc` (micro-batches of one update).
    pub fn add_grads(&self, acc: &mut Grads, store: &GradStore) -> Result<()> {
        for (id, g) in self.grads(store) {
            let sum = match acc.remove(&id) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(id, sum);
        }
        Ok(())
    }

    /// The global L2 norm of the gradients (what clipping compares with its limit).
    pub fn grad_norm(&self, grads: &Grads) -> Result<f64> {
        let mut sq = 0f64;
        for p in &self.params {
            if let Some(g) = grads.get(&p.var.as_tensor().id()) {
                sq += g
                    .to_dtype(candle_core::DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt())
    }

    /// One update with learning rate `lr`, gradients multiplied by `grad_scale` first (for
    /// clipping and accumulation). Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &Grads, lr: f64, grad_scale: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        for p in &mut self.params {
            let Some(g) = grads.get(&p.var.as_tensor().id()) else {
                continue;
            };
            let g = (g * grad_scale)?;
            p.m = ((&p.m * beta1)? + (&g * (1.0 - beta1))?)?;
            p.v = ((&p.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let mhat = (&p.m / bc1)?;
            let vhat = (&p.v / bc2)?;
            let mut w = p.var.as_tensor().clone();
            if p.decay && weight_decay != 0.0 {
                w = (w * (1.0 - lr * weight_decay))?;
            }
            let update = (mhat / (vhat.sqrt()? + eps)?)?;
            p.var.set(&(w - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments by name (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut s = HashMap::new();
        for p in &self.params {
            s.insert(format!("m.{}", p.name), p.m.clone());
            s.insert(format!("v.{}", p.name), p.v.clone());
        }
        s
    }

    /// Restores what `state` saved, after `steps` updates.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for p in &mut self.params {
            for (key, slot) in [
                (format!("m.{}", p.name), &mut p.m),
                (format!("v.{}", p.name), &mut p.v),
            ] {
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no {key}"))
                })?;
                if t.shape() != p.var.shape() {
                    candle_core::bail!(
                        "optimizer state {key} has shape {:?}, the parameter {:?}",
                        t.shape(),
                        p.var.shape()
                    );
                }
                *slot = t.to_dtype(p.var.dtype())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}
