//! Fresh parameters for a model shape, from a seed, independent of the machine.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
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
    let map = VarMap::new();
    let mut rng = Rng(seed);
    let resid = 0.02 / (2.0 * cfg.num_hidden_layers as f64).sqrt();
    {
        let mut data = map.data().lock().expect("var map lock");
        for (name, shape) in cfg.tensor_shapes() {
            let n: usize = shape.iter().product();
            let values: Vec<f64> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                let std = if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                    resid
                } else {
                    0.02
                };
                (0..n).map(|_| rng.normal() * std).collect()
            };
            let t = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
            data.insert(name, Var::from_tensor(&t)?);
        }
    }
    Ok(map)
}

/// Whether weight decay applies: matrices yes; norms, biases and embeddings no.
pub fn decays(name: &str) -> bool {
    !(name.ends_with("norm.weight") || name.ends_with(".bias") || name.contains("embed_tokens"))
}
