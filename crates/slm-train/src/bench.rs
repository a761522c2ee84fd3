//! Training throughput on the two fixed shapes that bench/train_torch.py builds in PyTorch:
//! random tokens, fp32, one AdamW update per batch, timed per phase (forward, backward,
//! optimizer) so a comparison also says where the time goes.

use std::time::Instant;

use candle_core::{DType, Device};
use slm_model::Config;

use crate::init::{init_params, Rng};
use crate::optim::AdamWConfig;
use crate::trainer::Trainer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// d256 L4 H4 ffn688 ctx256 batch16 vocab8192 (5.3M parameters)
    Tiny,
    /// d512 L8 H8 ffn1376 ctx512 batch8 vocab8192 (29M parameters)
    Small,
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" => Ok(Shape::Tiny),
            "small" => Ok(Shape::Small),
            _ => Err(format!(
                "unknown training shape {s:?}: expected tiny or small"
            )),
        }
    }
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Tiny => "tiny",
            Shape::Small => "small",
        }
    }

    /// The model and the batch size. Embeddings are tied, as in the recipes' default.
    pub fn config(self) -> (Config, usize) {
        let (d, layers, heads, ffn, ctx, batch) = match self {
            Shape::Tiny => (256, 4, 4, 688, 256, 16),
            Shape::Small => (512, 8, 8, 1376, 512, 8),
        };
        let cfg = Config {
            arch: slm_model::Arch::Llama,
            vocab_size: 8192,
            hidden_size: d,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: heads,
            head_dim: d / heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: ctx,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_id: Some(0),
            head: Default::default(),
        };
        (cfg, batch)
    }
}

/// Median seconds per update and its phases over the measured steps.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBench {
    pub shape: &'static str,
    pub parameters: usize,
    pub tokens_per_step: usize,
    pub steps: usize,
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub final_loss: f32,
    /// Mean seconds per update by kind of op, largest first.
    pub ops: Vec<(&'static str, f64)>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `warmup` untimed updates (allocator and caches settle), then `steps` timed ones.
pub fn run(shape: Shape, steps: usize, warmup: usize) -> candle_core::Result<TrainBench> {
    let dev = Device::Cpu;
    let (cfg, batch) = shape.config();
    let ctx = cfg.max_position_embeddings;
    let vars = init_params(&cfg, DType::F32, 0, &dev)?;
    let mut tr = Trainer::new(&cfg, batch, AdamWConfig::default(), &vars)?;
    let mut rng = Rng(1);
    let vocab = cfg.vocab_size as u64;
    let (mut fwd, mut bwd, mut upd, mut all) = (vec![], vec![], vec![], vec![]);
    let mut final_loss = f32::NAN;
    for i in 0..warmup + steps.max(1) {
        if i == warmup {
            tr.take_op_seconds();
        }
        let toks: Vec<u32> = (0..batch * (ctx + 1))
            .map(|_| (rng.next_u64() % vocab) as u32)
            .collect();
        let t0 = Instant::now();
        // The trainer computes the loss and the gradients in one pass; its forward share is
        // timed inside `accumulate_timed`.
        tr.zero_grads();
        let (loss, forward_s) = tr.accumulate_timed(&toks, 1.0)?;
        final_loss = loss;
        let t2 = Instant::now();
        let norm = tr.grad_norm();
        let scale = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
        tr.step(3e-4, scale);
        let t1 = t0 + std::time::Duration::from_secs_f64(forward_s);
        let t3 = Instant::now();
        if i >= warmup {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            upd.push((t3 - t2).as_secs_f64());
            all.push((t3 - t0).as_secs_f64());
        }
    }
    let tokens_per_step = batch * ctx;
    let step_s = median(all);
    let ops = tr
        .take_op_seconds()
        .into_iter()
        .map(|(op, s)| (op, s / steps.max(1) as f64))
        .collect();
    Ok(TrainBench {
        shape: shape.name(),
        parameters: cfg.num_params(),
        tokens_per_step,
        steps: steps.max(1),
        tokens_per_s: tokens_per_step as f64 / step_s,
        step_s,
        forward_s: median(fwd),
        backward_s: median(bwd),
        optimizer_s: median(upd),
        final_loss,
        ops,
    })
}
