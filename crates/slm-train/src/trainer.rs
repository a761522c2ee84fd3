//! The training step without autograd: the Llama model's forward and backward passes written
//! out layer by layer over buffers allocated once (kernels.rs, matmul.rs), and AdamW over
//! the flat parameter, gradient and moment vectors.
//!
//! Parameters live here during training, in one vector laid out so that a layer's q, k and v
//! projections (and its gate and up projections) form one matrix each: one product instead
//! of three (two). The candle `VarMap` gets them back for evaluation, samples, checkpoints and
//! the model folder (`write_params`), under the same names and with the optimizer state under
//! the same keys as `optim::AdamW`, so checkpoints do not depend on which path trained them.

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rayon::prelude::*;
use slm_model::{Arch, Config};

use slm_kernels::train::{self as kernels, AttnShape, RopeSpec};
use slm_kernels::head::{head_loss_into, HeadShape};
use slm_kernels::gemm::linear;
use crate::optim::AdamWConfig;

/// Why a model cannot train on this path (it then trains through candle's autograd).
pub fn unsupported(cfg: &Config) -> Option<String> {
    if cfg.arch != Arch::Llama && cfg.arch != Arch::Mistral {
        return Some(format!("the fused trainer does not handle {:?}", cfg.arch));
    }
    if cfg.attention_bias {
        return Some("the fused trainer does not handle attention biases".into());
    }
    if !cfg.head_dim.is_multiple_of(2) {
        return Some(format!("head_dim {} is odd", cfg.head_dim));
    }
    if cfg.num_key_value_heads == 0
        || !cfg
            .num_attention_heads
            .is_multiple_of(cfg.num_key_value_heads)
    {
        return Some(format!(
            "{} query heads are not a multiple of {} kv heads",
            cfg.num_attention_heads, cfg.num_key_value_heads
        ));
    }
    None
}

struct Param {
    name: String,
    shape: Vec<usize>,
    range: Range<usize>,
    decay: bool,
}

/// Where one layer's parameters lie in the flat vector.
struct LayerParams {
    attn_norm: Range<usize>,
    /// q, k and v projections, one after the other: ((heads + 2 kv_heads) head_dim) x hidden.
    qkv: Range<usize>,
    o: Range<usize>,
    mlp_norm: Range<usize>,
    /// gate then up projection: (2 ffn) x hidden.
    gate_up: Range<usize>,
    down: Range<usize>,
}

/// What a layer's forward keeps for its backward.
struct Saved {
    r1: Vec<f32>,
    h1: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    lse: Vec<f32>,
    mid: Vec<f32>,
    r2: Vec<f32>,
    h2: Vec<f32>,
    gu: Vec<f32>,
    sig: Vec<f32>,
    act: Vec<f32>,
}

/// Backward's working buffers, shared by the layers.
struct Work {
    dres: Vec<f32>,
    dh: Vec<f32>,
    dqkv: Vec<f32>,
    datt: Vec<f32>,
    dgu: Vec<f32>,
    dact: Vec<f32>,
    head: Vec<f32>,
    /// Per-thread partial weight gradients (`linear::weight_grad`).
    partials: Vec<f32>,
}

pub struct Trainer {
    cfg: Config,
    batch: usize,
    positions: usize,
    params_by_name: Vec<Param>,
    layers: Vec<LayerParams>,
    embed: Range<usize>,
    norm: Range<usize>,
    head: Range<usize>,
    params: Vec<f32>,
    grads: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    steps: u64,
    adam: AdamWConfig,
    cos: Vec<f32>,
    sin: Vec<f32>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// The residual stream entering each layer, and leaving the last.
    streams: Vec<Vec<f32>>,
    saved: Vec<Saved>,
    final_r: Vec<f32>,
    final_h: Vec<f32>,
    work: Work,
    laps: Laps,
}

/// Seconds spent per kind of op, summed over the updates since the last `take_op_seconds`:
/// each op runs alone (parallel inside), so the wall time between two laps is its own.
#[derive(Default)]
struct Laps {
    last: Option<std::time::Instant>,
    seconds: Vec<(&'static str, f64)>,
}

impl Laps {
    fn start(&mut self) {
        self.last = Some(std::time::Instant::now());
    }
    /// Charges the time since the previous lap to `op`.
    fn lap(&mut self, op: &'static str) {
        let now = std::time::Instant::now();
        let dt = self.last.map_or(0.0, |t| (now - t).as_secs_f64());
        self.last = Some(now);
        match self.seconds.iter_mut().find(|(n, _)| *n == op) {
            Some((_, s)) => *s += dt,
            None => self.seconds.push((op, dt)),
        }
    }
}

/// RoPE over the q and k heads of the fused q|k|v rows (they are adjacent, from column 0).
fn rope_spec<'a>(s: AttnShape, cos: &'a [f32], sin: &'a [f32]) -> RopeSpec<'a> {
    RopeSpec {
        width: s.qkv_width(),
        heads: s.heads + s.kv_heads,
        head_dim: s.head_dim,
        positions: s.positions,
        cos,
        sin,
    }
}

fn zeros(n: usize) -> Vec<f32> {
    vec![0f32; n]
}

impl Trainer {
    /// A trainer for `batch` sequences of the model's full context, its parameters read from
    /// `vars` (every tensor of `cfg.tensor_shapes()`).
    pub fn new(
        cfg: &Config,
        batch: usize,
        adam: AdamWConfig,
        vars: &VarMap,
    ) -> candle_core::Result<Self> {
        if let Some(why) = unsupported(cfg) {
            candle_core::bail!("{why}");
        }
        let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (heads, kvh) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (qw, kvw) = (heads * hd, kvh * hd);
        let positions = cfg.max_position_embeddings;
        let n = batch * positions;

        let mut params_by_name = Vec::new();
        let mut at = 0usize;
        let mut take = |name: String, shape: Vec<usize>| {
            let len: usize = shape.iter().product();
            let range = at..at + len;
            at += len;
            params_by_name.push(Param {
                decay: crate::init::decays(&name),
                name,
                shape,
                range: range.clone(),
            });
            range
        };
        let span = |a: &Range<usize>, b: &Range<usize>| a.start..b.end;
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let attn_norm = take(format!("{p}.input_layernorm.weight"), vec![d]);
            let q = take(format!("{p}.self_attn.q_proj.weight"), vec![qw, d]);
            take(format!("{p}.self_attn.k_proj.weight"), vec![kvw, d]);
            let v = take(format!("{p}.self_attn.v_proj.weight"), vec![kvw, d]);
            let o = take(format!("{p}.self_attn.o_proj.weight"), vec![d, qw]);
            let mlp_norm = take(format!("{p}.post_attention_layernorm.weight"), vec![d]);
            let gate = take(format!("{p}.mlp.gate_proj.weight"), vec![f, d]);
            let up = take(format!("{p}.mlp.up_proj.weight"), vec![f, d]);
            let down = take(format!("{p}.mlp.down_proj.weight"), vec![d, f]);
            layers.push(LayerParams {
                attn_norm,
                qkv: span(&q, &v),
                o,
                mlp_norm,
                gate_up: span(&gate, &up),
                down,
            });
        }
        let embed = take("model.embed_tokens.weight".into(), vec![cfg.vocab_size, d]);
        let norm = take("model.norm.weight".into(), vec![d]);
        let head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            take("lm_head.weight".into(), vec![cfg.vocab_size, d])
        };
        let total = at;

        let rope = slm_model::llama::Rope::new(cfg, None, false, &Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (cos, sin) = rope.tables();
        let (cos, sin) = (
            cos.flatten_all()?.to_vec1::<f32>()?,
            sin.flatten_all()?.to_vec1::<f32>()?,
        );
        let qkv_w = qw + 2 * kvw;
        let saved = (0..cfg.num_hidden_layers)
            .map(|_| Saved {
                r1: zeros(n),
                h1: zeros(n * d),
                qkv: zeros(n * qkv_w),
                att: zeros(n * qw),
                lse: zeros(n * heads),
                mid: zeros(n * d),
                r2: zeros(n),
                h2: zeros(n * d),
                gu: zeros(n * 2 * f),
                sig: zeros(n * f),
                act: zeros(n * f),
            })
            .collect();
        let mut t = Self {
            cfg: cfg.clone(),
            batch,
            positions,
            params_by_name,
            layers,
            embed,
            norm,
            head,
            params: zeros(total),
            grads: zeros(total),
            m: zeros(total),
            v: zeros(total),
            steps: 0,
            adam,
            cos,
            sin,
            inputs: vec![0; n],
            targets: vec![0; n],
            streams: (0..=cfg.num_hidden_layers).map(|_| zeros(n * d)).collect(),
            saved,
            final_r: zeros(n),
            final_h: zeros(n * d),
            work: Work {
                dres: zeros(n * d),
                dh: zeros(n * d),
                dqkv: zeros(n * qkv_w),
                datt: zeros(n * qw),
                dgu: zeros(n * 2 * f),
                dact: zeros(n * f),
                head: Vec::new(),
                partials: Vec::new(),
            },
            laps: Laps::default(),
        };
        t.read_params(vars)?;
        Ok(t)
    }

    /// Tokens per micro-batch: `batch` rows of `positions + 1` (inputs and shifted targets).
    pub fn tokens_per_batch(&self) -> usize {
        self.batch * (self.positions + 1)
    }

    fn attn_shape(&self) -> AttnShape {
        AttnShape {
            batch: self.batch,
            positions: self.positions,
            heads: self.cfg.num_attention_heads,
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    /// Sets every gradient to zero (before the first micro-batch of an update).
    pub fn zero_grads(&mut self) {
        self.grads.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
    }

    /// Forward and backward on one micro-batch (`batch` rows of `positions + 1` tokens,
    /// row-major): adds `scale` times the gradient of the mean next-token loss into the
    /// gradients, and returns that loss.
    pub fn accumulate(&mut self, tokens: &[u32], scale: f32) -> candle_core::Result<f32> {
        Ok(self.accumulate_timed(tokens, scale)?.0)
    }

    /// The mean next-token loss of one micro-batch, without gradients (validation), in the
    /// buffers training uses rather than a second model's.
    pub fn loss(&mut self, tokens: &[u32]) -> candle_core::Result<f32> {
        self.load_batch(tokens)?;
        self.forward();
        let cfg = &self.cfg;
        let n = self.batch * self.positions;
        let total = head_loss_into(
            HeadShape {
                n,
                d: cfg.hidden_size,
                v: cfg.vocab_size,
            },
            &self.final_h,
            &self.params[self.head.clone()],
            &self.targets,
            1.0,
            None,
            &mut self.work.head,
        );
        Ok((total / n.max(1) as f64) as f32)
    }

    /// `accumulate`, and the seconds its forward pass took (up to the output projection).
    pub fn accumulate_timed(
        &mut self,
        tokens: &[u32],
        scale: f32,
    ) -> candle_core::Result<(f32, f64)> {
        self.load_batch(tokens)?;
        let t0 = std::time::Instant::now();
        self.forward();
        let forward_s = t0.elapsed().as_secs_f64();
        Ok((self.head_and_backward(scale), forward_s))
    }

    /// Checks a micro-batch and splits it into inputs and targets.
    fn load_batch(&mut self, tokens: &[u32]) -> candle_core::Result<()> {
        let (t, b) = (self.positions, self.batch);
        if tokens.len() != b * (t + 1) {
            candle_core::bail!(
                "a micro-batch of {} tokens, {b} rows of {} expected",
                tokens.len(),
                t + 1
            );
        }
        if let Some(bad) = tokens.iter().find(|&&x| x as usize >= self.cfg.vocab_size) {
            candle_core::bail!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        for (r, row) in tokens.chunks_exact(t + 1).enumerate() {
            self.inputs[r * t..(r + 1) * t].copy_from_slice(&row[..t]);
            self.targets[r * t..(r + 1) * t].copy_from_slice(&row[1..]);
        }
        Ok(())
    }

    fn forward(&mut self) {
        let cfg = &self.cfg;
        let (d, f, eps) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.rms_norm_eps as f32,
        );
        let n = self.batch * self.positions;
        let shape = self.attn_shape();
        let (qw, qkv_w) = (shape.out_width(), shape.qkv_width());
        let rope = rope_spec(shape, &self.cos, &self.sin);
        let p = &self.params;
        let laps = &mut self.laps;
        laps.start();
        kernels::embed(
            &mut self.streams[0],
            &p[self.embed.clone()],
            &self.inputs,
            d,
        );
        laps.lap("embedding");
        for (l, (lp, s)) in self.layers.iter().zip(&mut self.saved).enumerate() {
            let (before, after) = self.streams.split_at_mut(l + 1);
            let (x, out) = (&before[l], &mut after[0]);
            kernels::rms_norm(&mut s.h1, &mut s.r1, x, &p[lp.attn_norm.clone()], eps);
            laps.lap("rms_norm");
            linear::forward(&mut s.qkv, &s.h1, &p[lp.qkv.clone()], (n, d, qkv_w), false);
            laps.lap("linear");
            kernels::rope(&mut s.qkv, rope, false);
            laps.lap("rope");
            kernels::attention(&mut s.att, &mut s.lse, &s.qkv, shape);
            laps.lap("attention");
            s.mid.copy_from_slice(x);
            linear::forward(&mut s.mid, &s.att, &p[lp.o.clone()], (n, qw, d), true);
            laps.lap("linear");
            kernels::rms_norm(&mut s.h2, &mut s.r2, &s.mid, &p[lp.mlp_norm.clone()], eps);
            laps.lap("rms_norm");
            linear::forward(
                &mut s.gu,
                &s.h2,
                &p[lp.gate_up.clone()],
                (n, d, 2 * f),
                false,
            );
            laps.lap("linear");
            kernels::swiglu(&mut s.act, &mut s.sig, &s.gu, f);
            laps.lap("swiglu");
            out.copy_from_slice(&s.mid);
            linear::forward(out, &s.act, &p[lp.down.clone()], (n, f, d), true);
            laps.lap("linear");
        }
        let last = &self.streams[self.cfg.num_hidden_layers];
        kernels::rms_norm(
            &mut self.final_h,
            &mut self.final_r,
            last,
            &p[self.norm.clone()],
            eps,
        );
        laps.lap("rms_norm");
    }

    /// The loss of the output projection, then every gradient back to the embedding.
    fn head_and_backward(&mut self, scale: f32) -> f32 {
        let cfg = &self.cfg;
        let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let n = self.batch * self.positions;
        let shape = self.attn_shape();
        let (qw, qkv_w) = (shape.out_width(), shape.qkv_width());
        let rope = rope_spec(shape, &self.cos, &self.sin);
        let (p, g, w) = (&self.params, &mut self.grads, &mut self.work);
        let laps = &mut self.laps;
        laps.start();
        let total = head_loss_into(
            HeadShape { n, d, v },
            &self.final_h,
            &p[self.head.clone()],
            &self.targets,
            scale,
            Some((&mut w.dh, &mut g[self.head.clone()])),
            &mut w.head,
        );
        laps.lap("output projection + loss");
        w.dres.par_chunks_mut(1 << 14).for_each(|c| c.fill(0.0));
        kernels::rms_norm_bwd(
            &mut w.dres,
            &mut g[self.norm.clone()],
            &w.dh,
            &self.streams[cfg.num_hidden_layers],
            &self.final_r,
            &p[self.norm.clone()],
        );
        laps.lap("rms_norm (backward)");
        for (l, (lp, s)) in self.layers.iter().zip(&self.saved).enumerate().rev() {
            let x = &self.streams[l];
            // MLP: out = mid + down(silu(gate) * up)
            linear::backward(
                &mut w.dact,
                &mut g[lp.down.clone()],
                &w.dres,
                &s.act,
                &p[lp.down.clone()],
                (n, f, d),
                &mut w.partials,
            );
            laps.lap("linear (backward)");
            kernels::swiglu_bwd(&mut w.dgu, &w.dact, &s.gu, &s.sig, f);
            laps.lap("swiglu (backward)");
            linear::backward(
                &mut w.dh,
                &mut g[lp.gate_up.clone()],
                &w.dgu,
                &s.h2,
                &p[lp.gate_up.clone()],
                (n, d, 2 * f),
                &mut w.partials,
            );
            laps.lap("linear (backward)");
            kernels::rms_norm_bwd(
                &mut w.dres,
                &mut g[lp.mlp_norm.clone()],
                &w.dh,
                &s.mid,
                &s.r2,
                &p[lp.mlp_norm.clone()],
            );
            laps.lap("rms_norm (backward)");
            // Attention: mid = x + o(attention(rope(q), rope(k), v))
            linear::backward(
                &mut w.datt,
                &mut g[lp.o.clone()],
                &w.dres,
                &s.att,
                &p[lp.o.clone()],
                (n, qw, d),
                &mut w.partials,
            );
            laps.lap("linear (backward)");
            kernels::attention_bwd(&mut w.dqkv, &w.datt, &s.att, &s.lse, &s.qkv, shape);
            laps.lap("attention (backward)");
            kernels::rope(&mut w.dqkv, rope, true);
            laps.lap("rope (backward)");
            linear::backward(
                &mut w.dh,
                &mut g[lp.qkv.clone()],
                &w.dqkv,
                &s.h1,
                &p[lp.qkv.clone()],
                (n, d, qkv_w),
                &mut w.partials,
            );
            laps.lap("linear (backward)");
            kernels::rms_norm_bwd(
                &mut w.dres,
                &mut g[lp.attn_norm.clone()],
                &w.dh,
                x,
                &s.r1,
                &p[lp.attn_norm.clone()],
            );
            laps.lap("rms_norm (backward)");
        }
        kernels::embed_bwd(&mut g[self.embed.clone()], &w.dres, &self.inputs, d);
        laps.lap("embedding (backward)");
        (total / n.max(1) as f64) as f32
    }

    /// Seconds per kind of op since the last call, largest first.
    pub fn take_op_seconds(&mut self) -> Vec<(&'static str, f64)> {
        let mut v = std::mem::take(&mut self.laps.seconds);
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        // Partial sums of fixed blocks, added in order: the same norm on every run.
        let parts: Vec<f64> = self
            .grads
            .par_chunks(1 << 16)
            .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .collect();
        parts.iter().sum::<f64>().sqrt()
    }

    /// One AdamW update (as `optim::AdamW::step`) with the gradients times `grad_scale`.
    pub fn step(&mut self, lr: f64, grad_scale: f64) {
        self.steps += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.adam;
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        let (b1, b2, gs) = (beta1 as f32, beta2 as f32, grad_scale as f32);
        let (inv_bc1, inv_bc2, eps, lr32) = (
            (1.0 / bc1) as f32,
            (1.0 / bc2) as f32,
            eps as f32,
            lr as f32,
        );
        for prm in &self.params_by_name {
            let keep = if prm.decay && weight_decay != 0.0 {
                (1.0 - lr * weight_decay) as f32
            } else {
                1.0
            };
            let r = prm.range.clone();
            const CHUNK: usize = 1 << 14;
            self.params[r.clone()]
                .par_chunks_mut(CHUNK)
                .zip(self.grads[r.clone()].par_chunks(CHUNK))
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

    fn var_map_tensor(
        data: &HashMap<String, candle_core::Var>,
        name: &str,
        shape: &[usize],
    ) -> candle_core::Result<candle_core::Var> {
        let var = data
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("the model has no tensor {name}")))?;
        if var.dims() != shape {
            candle_core::bail!("{name} has shape {:?}, {shape:?} expected", var.dims());
        }
        Ok(var.clone())
    }

    /// Reads every parameter from `vars` (after a resume or a parent model's load).
    pub fn read_params(&mut self, vars: &VarMap) -> candle_core::Result<()> {
        let data = vars.data().lock().expect("var map lock");
        for prm in &self.params_by_name {
            let var = Self::var_map_tensor(&data, &prm.name, &prm.shape)?;
            let values = var
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            self.params[prm.range.clone()].copy_from_slice(&values);
        }
        Ok(())
    }

    /// Writes every parameter into `vars`, whose model then computes with them.
    pub fn write_params(&self, vars: &VarMap) -> candle_core::Result<()> {
        let data = vars.data().lock().expect("var map lock");
        for prm in &self.params_by_name {
            let var = Self::var_map_tensor(&data, &prm.name, &prm.shape)?;
            let t = Tensor::from_slice(
                &self.params[prm.range.clone()],
                prm.shape.as_slice(),
                &Device::Cpu,
            )?
            .to_dtype(var.dtype())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// The gradients by parameter name (for tests and diagnostics).
    pub fn grads_by_name(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        self.by_name(&self.grads)
    }

    fn by_name(&self, values: &[f32]) -> candle_core::Result<HashMap<String, Tensor>> {
        self.params_by_name
            .iter()
            .map(|p| {
                Ok((
                    p.name.clone(),
                    Tensor::from_slice(&values[p.range.clone()], p.shape.as_slice(), &Device::Cpu)?,
                ))
            })
            .collect()
    }

    /// The moments by name (`m.NAME`, `v.NAME`), as `optim::AdamW::state` saves them.
    pub fn state(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut s = HashMap::new();
        for (prefix, values) in [("m", &self.m), ("v", &self.v)] {
            for (name, t) in self.by_name(values)? {
                s.insert(format!("{prefix}.{name}"), t);
            }
        }
        Ok(s)
    }

    /// Restores what `state` saved, after `steps` updates.
    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        steps: u64,
    ) -> candle_core::Result<()> {
        for prm in &self.params_by_name {
            for (prefix, values) in [("m", &mut self.m), ("v", &mut self.v)] {
                let key = format!("{prefix}.{}", prm.name);
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state has no {key}"))
                })?;
                if t.dims() != prm.shape.as_slice() {
                    candle_core::bail!(
                        "optimizer state {key} has shape {:?}, the parameter {:?}",
                        t.dims(),
                        prm.shape
                    );
                }
                let x = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                values[prm.range.clone()].copy_from_slice(&x);
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{init_params, Rng};
    use candle_nn::VarBuilder;
    use slm_model::{Llama, Weights};

    /// Odd sizes on purpose: a head_dim that is not a multiple of 8, grouped kv heads, more
    /// positions than one attention tile and not a multiple of it, a vocabulary of 97.
    pub(crate) fn odd_config(tied: bool) -> Config {
        Config {
            arch: Arch::Llama,
            vocab_size: 97,
            hidden_size: 36,
            intermediate_size: 50,
            num_hidden_layers: 2,
            num_attention_heads: 6,
            num_key_value_heads: 2,
            head_dim: 6,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 150,
            tie_word_embeddings: tied,
            attention_bias: false,
            bos_token_id: None,
            eos_token_id: Some(0),
        }
    }

    pub(crate) fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
        let mut rng = Rng(seed);
        (0..n)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect()
    }

    /// Loss and gradients of candle's autograd through `slm_model::Llama` (the reference).
    pub(crate) fn reference(
        cfg: &Config,
        vars: &VarMap,
        tokens: &[u32],
        batch: usize,
    ) -> (f32, HashMap<String, Tensor>) {
        let dev = Device::Cpu;
        let model = Llama::load(
            cfg,
            &Weights::Vars(VarBuilder::from_varmap(vars, DType::F32, &dev)),
            &dev,
        )
        .unwrap();
        let t = cfg.max_position_embeddings;
        let all = Tensor::from_slice(tokens, (batch, t + 1), &dev).unwrap();
        let (x, y) = (all.narrow(1, 0, t).unwrap(), all.narrow(1, 1, t).unwrap());
        let loss = crate::model_loss(&model, &x, &y).unwrap();
        let store = loss.backward().unwrap();
        let data = vars.data().lock().unwrap();
        let grads = data
            .iter()
            .map(|(name, var)| (name.clone(), store.get(var.as_tensor()).unwrap().clone()))
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Every gradient within 1e-4 of the reference's largest value in that tensor.
    #[test]
    fn loss_and_gradients_equal_candle_autograd() {
        for tied in [true, false] {
            let cfg = odd_config(tied);
            let batch = 3;
            let vars = init_params(&cfg, DType::F32, 7, &Device::Cpu).unwrap();
            // Norm weights away from 1, so a wrong norm gradient cannot hide.
            for (name, var) in vars.data().lock().unwrap().iter() {
                if name.ends_with("norm.weight") {
                    let n = var.elem_count();
                    let w: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 * 0.15).collect();
                    var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                }
            }
            let tokens = random_tokens(batch * 151, cfg.vocab_size, 3);
            let (ref_loss, ref_grads) = reference(&cfg, &vars, &tokens, batch);
            let mut tr = Trainer::new(&cfg, batch, AdamWConfig::default(), &vars).unwrap();
            tr.zero_grads();
            let loss = tr.accumulate(&tokens, 1.0).unwrap();
            assert!(
                (loss - ref_loss).abs() <= 1e-5 * ref_loss.abs(),
                "loss {loss} vs reference {ref_loss}"
            );
            let eval = tr.loss(&tokens).unwrap();
            assert!(
                (eval - ref_loss).abs() <= 1e-5 * ref_loss.abs(),
                "validation loss {eval} vs reference {ref_loss}"
            );
            let grads = tr.grads_by_name().unwrap();
            assert_eq!(grads.len(), ref_grads.len());
            for (name, r) in &ref_grads {
                let g = &grads[name];
                let err = max_abs(&(g - r).unwrap());
                let scale = max_abs(r);
                assert!(
                    err <= 1e-4 * scale,
                    "tied={tied} {name}: max error {err:e}, largest reference value {scale:e}"
                );
            }
        }
    }

    /// Twenty AdamW updates with clipping, learning-rate warmup and two micro-batches each,
    /// through the fused trainer and through candle's autograd with `optim::AdamW`: the same
    /// loss curve, and the same parameters after it, within f32 tolerance.
    #[test]
    fn a_short_run_follows_the_reference_loss_curve() {
        let cfg = odd_config(true);
        let (batch, accum) = (2, 2);
        let dev = Device::Cpu;
        let adam = AdamWConfig::default();
        let fused_vars = init_params(&cfg, DType::F32, 11, &dev).unwrap();
        let ref_vars = init_params(&cfg, DType::F32, 11, &dev).unwrap();
        let mut tr = Trainer::new(&cfg, batch, adam, &fused_vars).unwrap();
        let model = Llama::load(
            &cfg,
            &Weights::Vars(VarBuilder::from_varmap(&ref_vars, DType::F32, &dev)),
            &dev,
        )
        .unwrap();
        let mut opt = crate::optim::AdamW::new(&ref_vars, adam, crate::init::decays).unwrap();
        let t = cfg.max_position_embeddings;
        let (mut fused, mut reference) = (vec![], vec![]);
        for step in 0..20u64 {
            let lr = 3e-3 * ((step + 1) as f64 / 5.0).min(1.0);
            // Rows that count up in steps of 5 from a random start: learnable in a few updates.
            let batches: Vec<Vec<u32>> = (0..accum)
                .map(|i| {
                    let starts = random_tokens(batch, cfg.vocab_size, 100 + step * 7 + i);
                    starts
                        .iter()
                        .flat_map(|&s| (0..t as u32 + 1).map(move |j| (s + 5 * j) % 97))
                        .collect()
                })
                .collect();
            tr.zero_grads();
            let mut loss = 0.0;
            for b in &batches {
                loss += tr.accumulate(b, 1.0 / accum as f32).unwrap() / accum as f32;
            }
            let norm = tr.grad_norm();
            tr.step(lr, if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 });
            fused.push(loss);

            let mut acc: crate::optim::Grads = HashMap::new();
            let mut loss = 0.0;
            for b in &batches {
                let all = Tensor::from_slice(b, (batch, t + 1), &dev).unwrap();
                let (x, y) = (all.narrow(1, 0, t).unwrap(), all.narrow(1, 1, t).unwrap());
                let l = crate::model_loss(&model, &x, &y).unwrap();
                loss += l.to_scalar::<f32>().unwrap() / accum as f32;
                let g = (l / accum as f64).unwrap().backward().unwrap();
                opt.add_grads(&mut acc, &g).unwrap();
            }
            let norm = opt.grad_norm(&acc).unwrap();
            let scale = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
            opt.step(&acc, lr, scale).unwrap();
            reference.push(loss);
        }
        for (i, (a, b)) in fused.iter().zip(&reference).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "update {i}: fused loss {a}, reference {b} (curves {fused:?} vs {reference:?})"
            );
        }
        assert!(fused[19] < fused[0] - 0.1, "the loss fell: {fused:?}");
        tr.write_params(&fused_vars).unwrap();
        let (fd, rd) = (
            fused_vars.data().lock().unwrap(),
            ref_vars.data().lock().unwrap(),
        );
        for (name, v) in rd.iter() {
            let err = max_abs(&(fd[name].as_tensor() - v.as_tensor()).unwrap());
            assert!(
                err <= 1e-4 * max_abs(v.as_tensor()),
                "{name}: parameters differ by {err:e}"
            );
        }
    }

    /// The same seed and batches give the same parameters to the bit, however rayon's
    /// threads shared the work: every reduction sums fixed blocks in a fixed order.
    #[test]
    fn updates_are_reproducible_bit_for_bit() {
        let cfg = odd_config(true);
        let run = || {
            let vars = init_params(&cfg, DType::F32, 5, &Device::Cpu).unwrap();
            let mut tr = Trainer::new(&cfg, 3, AdamWConfig::default(), &vars).unwrap();
            for step in 0..3 {
                tr.zero_grads();
                let tokens = random_tokens(3 * 151, cfg.vocab_size, 40 + step);
                tr.accumulate(&tokens, 1.0).unwrap();
                let norm = tr.grad_norm();
                tr.step(1e-2, 1.0 / norm.max(1.0));
            }
            tr.params.clone()
        };
        let first = run();
        for _ in 0..3 {
            let again = run();
            assert!(
                first
                    .iter()
                    .zip(&again)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "parameters differ between two identical runs"
            );
        }
    }

    /// Each refusal names what was wrong: a micro-batch of the wrong length, a token past the
    /// vocabulary, a model the fused path does not handle, a parameter missing or of another
    /// shape, optimizer state without a moment or with one of another shape.
    #[test]
    fn bad_input_is_refused_by_name() {
        let cfg = odd_config(true);
        let dev = Device::Cpu;
        let vars = init_params(&cfg, DType::F32, 1, &dev).unwrap();
        let mut tr = Trainer::new(&cfg, 2, AdamWConfig::default(), &vars).unwrap();
        let err = |r: candle_core::Result<f32>| r.unwrap_err().to_string();
        let short = err(tr.accumulate(&[1; 10], 1.0));
        assert!(short.contains("10 tokens, 2 rows of 151"), "{short}");
        let mut tokens = random_tokens(tr.tokens_per_batch(), cfg.vocab_size, 2);
        tokens[5] = 97;
        let outside = err(tr.loss(&tokens));
        assert!(
            outside.contains("token id 97") && outside.contains("97"),
            "{outside}"
        );

        let mut biased = cfg.clone();
        biased.attention_bias = true;
        let e = Trainer::new(&biased, 2, AdamWConfig::default(), &vars)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("attention biases"), "{e}");

        let other = VarMap::new();
        let e = tr.read_params(&other).unwrap_err().to_string();
        assert!(
            e.contains("has no tensor model.layers.0.input_layernorm.weight"),
            "{e}"
        );
        let wide = init_params(&odd_config(false), DType::F32, 1, &dev).unwrap();
        {
            let mut data = wide.data().lock().unwrap();
            let bad = Tensor::zeros((3, 36), DType::F32, &dev).unwrap();
            data.insert(
                "model.norm.weight".into(),
                candle_core::Var::from_tensor(&bad).unwrap(),
            );
        }
        let e = tr.read_params(&wide).unwrap_err().to_string();
        assert!(
            e.contains("model.norm.weight has shape [3, 36], [36] expected"),
            "{e}"
        );

        let mut state = tr.state().unwrap();
        state.remove("v.model.norm.weight");
        let e = tr.load_state(&state, 1).unwrap_err().to_string();
        assert!(
            e.contains("optimizer state has no v.model.norm.weight"),
            "{e}"
        );
        let mut state = tr.state().unwrap();
        state.insert(
            "m.model.norm.weight".into(),
            Tensor::zeros(5, DType::F32, &dev).unwrap(),
        );
        let e = tr.load_state(&state, 1).unwrap_err().to_string();
        assert!(e.contains("m.model.norm.weight has shape [5]"), "{e}");
    }
}
