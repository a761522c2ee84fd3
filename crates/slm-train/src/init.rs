//! Fresh parameters for a model shape, from a seed, independent of the machine.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use slm_model::params::Role;
use slm_model::Config;

/// splitmix64, then Box-Muller: a small, portable source of normal samples, so a seed gives
/// the same model everywhere (candle's CPU randn cannot be seeded).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// GPT-2 / nanoGPT initialisation: N(0, 0.02) for matrices and embeddings, with the
/// projections that write into the residual stream (o_proj, down_proj) scaled by
/// 1/sqrt(2 * layers); ones for norms, zeros for biases.
pub fn init_params(
    cfg: &Config,
    dtype: DType,
    seed: u64,
    device: &Device,
) -> candle_core::Result<VarMap> {
    init_params_except(cfg, dtype, seed, device, |_| false)
}

/// `init_params` but for the tensors `skip` selects (a base's projections kept in blocks):
/// they get no variable, their samples drawn all the same, so that the others' values do not
/// depend on it.
pub fn init_params_except(
    cfg: &Config,
    dtype: DType,
    seed: u64,
    device: &Device,
    skip: impl Fn(&slm_model::Param) -> bool,
) -> candle_core::Result<VarMap> {
    let map = VarMap::new();
    let mut rng = Rng(seed);
    let resid = 0.02 / (2.0 * cfg.num_hidden_layers as f64).sqrt();
    {
        let mut data = map.data().lock().expect("var map lock");
        // Drawn embedding and final norm first, then the layers and the head: the order the
        // samples have always been drawn in, so a seed keeps giving the same model.
        let mut params = cfg.params();
        params.sort_by_key(|p| match p.role {
            Role::Embedding => 0,
            Role::FinalNorm => 1,
            _ => 2,
        });
        for p in params {
            let n = p.len();
            if skip(&p) {
                if !(p.role.is_norm() || p.role.is_bias()) {
                    (0..n).for_each(|_| {
                        rng.normal();
                    });
                }
                continue;
            }
            let values: Vec<f64> = if p.role.is_norm() {
                vec![1.0; n]
            } else if p.role.is_bias() {
                vec![0.0; n]
            } else {
                let std = if p.role.writes_residual() {
                    resid
                } else {
                    0.02
                };
                (0..n).map(|_| rng.normal() * std).collect()
            };
            let t = Tensor::from_vec(values, p.shape.as_slice(), device)?.to_dtype(dtype)?;
            data.insert(p.name(), Var::from_tensor(&t)?);
        }
    }
    Ok(map)
}
