//! Training throughput on the two fixed shapes that bench/train_torch.py builds in PyTorch:
//! random tokens, fp32, one AdamW update per batch, timed per phase (forward, backward,
//! optimizer) so a comparison also says where the time goes.

use std::time::Instant;

use candle_core::{DType, Device};
use slm_model::Config;

use crate::init::{init_params, Rng};
use crate::optim::AdamWConfig;
use crate::trainer::{BlockBase, LoraConfig, Trainer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// d256 L4 H4 ffn688 ctx256 batch16 vocab8192 (5.3M parameters)
    Tiny,
    /// d512 L8 H8 ffn1376 ctx512 batch8 vocab8192 (29M parameters)
    Small,
    /// SmolLM2-135M's shape (d576 L30 H9 KV3 ffn1536 vocab49152, tied) at ctx128 batch16:
    /// the fine-tuning comparison with transformers (+ PEFT) of bench/finetune_torch.py.
    Smollm2,
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" => Ok(Shape::Tiny),
            "small" => Ok(Shape::Small),
            "smollm2" => Ok(Shape::Smollm2),
            _ => Err(format!(
                "unknown training shape {s:?}: expected tiny, small or smollm2"
            )),
        }
    }
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Tiny => "tiny",
            Shape::Small => "small",
            Shape::Smollm2 => "smollm2",
        }
    }

    /// The model and the batch size. Embeddings are tied, as in the recipes' default.
    pub fn config(self) -> (Config, usize) {
        let (d, layers, heads, kv, ffn, ctx, batch, vocab, theta) = match self {
            Shape::Tiny => (256, 4, 4, 4, 688, 256, 16, 8192, 10_000.0),
            Shape::Small => (512, 8, 8, 8, 1376, 512, 8, 8192, 10_000.0),
            Shape::Smollm2 => (576, 30, 9, 3, 1536, 128, 16, 49152, 100_000.0),
        };
        let cfg = Config {
            arch: slm_model::Arch::Llama,
            vocab_size: vocab,
            hidden_size: d,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: d / heads,
            rms_norm_eps: 1e-5,
            rope_theta: theta,
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
    /// The LoRA rank, when adapters train over the frozen model.
    pub lora: Option<usize>,
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

/// `warmup` untimed updates (allocator and caches settle), then `steps` timed ones: of every
/// weight, or, with `lora` = r, of rank-r adapters (alpha 2r) on all seven projections of
/// every layer over the frozen model.
pub fn run(
    shape: Shape,
    steps: usize,
    warmup: usize,
    lora: Option<usize>,
) -> candle_core::Result<TrainBench> {
    let dev = Device::Cpu;
    let (cfg, batch) = shape.config();
    let ctx = cfg.max_position_embeddings;
    let vars = init_params(&cfg, DType::F32, 0, &dev)?;
    let mut tr = match lora {
        Some(rank) => {
            let l = LoraConfig {
                rank,
                alpha: 2.0 * rank as f64,
                targets: slm_model::Role::LORA_TARGETS.iter().map(|t| t.0).collect(),
                dropout: 0.0,
            };
            crate::adapter::init(&vars, &cfg, &l, 0)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Trainer::with_lora(
                &cfg,
                batch,
                AdamWConfig::default(),
                &vars,
                &l,
                BlockBase::new(),
            )?
        }
        None => Trainer::new(&cfg, batch, AdamWConfig::default(), &vars)?,
    };
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
        lora,
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
