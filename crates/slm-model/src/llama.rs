//! The Llama-family transformer: RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP.
//! One definition for inference (quantized GGUF weights, KV cache) and training (candle Vars,
//! no cache): the fused candle kernels are used unless a tensor is being tracked for gradients.

use crate::attention::{self, LayerCache};
use crate::config::Config;
use crate::weights::{Embedding, Linear, Result, Weights};
use candle_core::{DType, Device, Tensor, D};

/// RMSNorm as ggml computes it: squares summed in f64, `scale = 1/sqrtf(mean + eps)`, then
/// `(x * scale) * w` in f32. The next matmul quantizes its input to 8 bits, so a one-ulp
/// difference here can flip a rounding and move a projection by 5e-4: bit-exactness with
/// llama.cpp starts at the norm. The differentiable candle version serves training.
struct GgmlRmsNorm {
    eps: f32,
}

impl candle_core::CustomOp2 for GgmlRmsNorm {
    fn name(&self) -> &'static str {
        "ggml-rms-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("rms norm expects f32")
        };
        let (Some((xs, xe)), Some((ws, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("rms norm expects contiguous tensors")
        };
        let (x, w) = (&x[xs..xe], &w[ws..we]);
        let n = w.len();
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let sum: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
            let mean = (sum / n as f64) as f32;
            let scale = 1.0 / (mean + self.eps).sqrt();
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                *o = v * scale * g;
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if x.track_op() || w.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 {
        candle_nn::ops::rms_norm_slow(x, w, eps)
    } else {
        x.contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &GgmlRmsNorm { eps })
    }
}

fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Rotary position embedding tables.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl Rope {
    pub fn new(
        cfg: &Config,
        freq_factors: Option<&[f32]>,
        interleaved: bool,
        device: &Device,
    ) -> Result<Self> {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        if let Some(f) = freq_factors {
            for (inv, &f) in inv_freq.iter_mut().zip(f) {
                *inv /= f as f64;
            }
        } else if let Some(s) = &cfg.rope_scaling {
            let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
            for inv in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *inv;
                *inv = if wavelen < high_wavelen {
                    *inv
                } else if wavelen > low_wavelen {
                    *inv / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f64 / wavelen
                        - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * *inv / s.factor + smooth * *inv
                };
            }
        }
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * d / 2);
        let mut sin = Vec::with_capacity(n * d / 2);
        for p in 0..n {
            for &f in &inv_freq {
                // The angle in f32 as llama.cpp computes it (theta_scale^i * p in float), so
                // long positions round the same way.
                let a = (p as f32) * (f as f32);
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, d / 2), device)?,
            sin: Tensor::from_vec(sin, (n, d / 2), device)?,
            interleaved,
        })
    }

    /// x: (batch, heads, seq, head_dim) at positions pos..pos+seq.
    fn apply(&self, x: &Tensor, pos: usize) -> candle_core::Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, t)?;
        let sin = self.sin.narrow(0, pos, t)?;
        match (self.interleaved, x.track_op()) {
            (true, false) => candle_nn::rotary_emb::rope_i(x, &cos, &sin),
            (true, true) => candle_nn::rotary_emb::rope_i_slow(x, &cos, &sin),
            (false, false) => candle_nn::rotary_emb::rope(x, &cos, &sin),
            (false, true) => candle_nn::rotary_emb::rope_slow(x, &cos, &sin),
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: usize,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        let q = rope.apply(&heads(q, nh)?, pos)?;
        let k = rope.apply(&heads(k, nkv)?, pos)?;
        let v = heads(v, nkv)?;
        if let Some(cache) = cache {
            if b != 1 {
                candle_core::bail!("a KV cache holds one sequence; got a batch of {b}");
            }
            let rows = |y: Tensor| -> candle_core::Result<Vec<f32>> {
                y.squeeze(0)?.transpose(0, 1)?.flatten_all()?.to_vec1()
            };
            let y = attention::attend(
                cache,
                &rows(q)?,
                &rows(k)?,
                &rows(v)?,
                t,
                nh,
                nkv,
                hd,
                x.device(),
            )?;
            return self.o.forward(&y.unsqueeze(0)?);
        }
        // Grouped-query attention without copying K/V per query head: the `rep` query heads
        // that share a KV head become `rep * t` rows of one matmul against it.
        let rep = nh / nkv;
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if t > 1 {
            let mask = causal_mask(t, t, x.device())?;
            att = att
                .reshape((b, nkv, rep, t, t))?
                .broadcast_add(&mask)?
                .reshape((b, nkv, rep * t, t))?;
        }
        let att = softmax_last_dim(&att)?;
        let y = att.matmul(&v)?;
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.o.forward(&y)
    }
}

/// (t, len) additive mask for t new queries at the end of a sequence of len keys.
fn causal_mask(t: usize, len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let past = len - t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..len).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, len), device)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let g = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: Tensor,
    attn: Attention,
    mlp_norm: Tensor,
    mlp: Mlp,
}

/// Per-sequence state of generation: keys and values of every layer so far.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<LayerCache>,
    row: usize,
}

impl Cache {
    pub fn new(cfg: &Config) -> Self {
        Self {
            layers: vec![LayerCache::default(); cfg.num_hidden_layers],
            row: cfg.num_key_value_heads * cfg.head_dim,
        }
    }
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.layers.first().map(LayerCache::len).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(LayerCache::clear);
    }
    /// Keeps the first `n` positions (to reuse a shared prefix).
    pub fn truncate(&mut self, n: usize) {
        let row = self.row;
        self.layers.iter_mut().for_each(|l| l.truncate(n, row));
    }
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerCache::bytes).sum()
    }
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub config: Config,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    device: Device,
}

impl Llama {
    pub fn load(config: &Config, w: &Weights, device: &Device) -> Result<Self> {
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let embed = w.embedding("model.embed_tokens.weight", c.vocab_size, h)?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qdim = c.num_attention_heads * hd;
            let kvdim = c.num_key_value_heads * hd;
            let bias = c.attention_bias;
            blocks.push(Block {
                attn_norm: w.tensor(&format!("{p}.input_layernorm.weight"), &[h])?,
                attn: Attention {
                    q: w.linear(&format!("{p}.self_attn.q_proj"), qdim, h, bias)?,
                    k: w.linear(&format!("{p}.self_attn.k_proj"), kvdim, h, bias)?,
                    v: w.linear(&format!("{p}.self_attn.v_proj"), kvdim, h, bias)?,
                    o: w.linear(&format!("{p}.self_attn.o_proj"), h, qdim, false)?,
                    n_heads: c.num_attention_heads,
                    n_kv_heads: c.num_key_value_heads,
                    head_dim: hd,
                },
                mlp_norm: w.tensor(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp: Mlp {
                    gate: w.linear(&format!("{p}.mlp.gate_proj"), c.intermediate_size, h, false)?,
                    up: w.linear(&format!("{p}.mlp.up_proj"), c.intermediate_size, h, false)?,
                    down: w.linear(&format!("{p}.mlp.down_proj"), h, c.intermediate_size, false)?,
                },
            });
        }
        let norm = w.tensor("model.norm.weight", &[h])?;
        // Some checkpoints say tie_word_embeddings=false yet ship no lm_head; tying is the only
        // sensible reading of that.
        let lm_head = if c.tie_word_embeddings || !w.contains("lm_head.weight") {
            embed.as_linear()?
        } else {
            w.linear("lm_head", c.vocab_size, h, false)?
        };
        let freq_factors = w.rope_freq_factors()?;
        let rope = Rope::new(
            c,
            freq_factors.as_deref(),
            w.rope_interleaved(c.arch),
            device,
        )?;
        Ok(Self {
            config: c.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(&self.config)
    }

    /// Runs `ids` (batch, seq) through the model after what `cache` holds (positions continue
    /// from there). Returns logits (batch, seq, vocab), or (batch, 1, vocab) with `last_only`.
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        last_only: bool,
    ) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let pos = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if pos + t > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's context length {}",
                pos + t,
                self.config.max_position_embeddings
            );
        }
        let eps = self.config.rms_norm_eps as f32;
        let mut x = self.embed.forward(ids)?;
        let mut cache = cache;
        for (i, blk) in self.blocks.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c.layers[i]);
            let a = blk
                .attn
                .forward(&rms_norm(&x, &blk.attn_norm, eps)?, &self.rope, pos, kv)?;
            x = (x + a)?;
            let m = blk.mlp.forward(&rms_norm(&x, &blk.mlp_norm, eps)?)?;
            x = (x + m)?;
        }
        if last_only {
            x = x.narrow(1, t - 1, 1)?;
        }
        let x = rms_norm(&x, &self.norm, eps)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    /// Logits of the last position for a token sequence appended to `cache`.
    pub fn next_logits(&self, tokens: &[u32], cache: &mut Cache) -> candle_core::Result<Vec<f32>> {
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        self.forward(&ids, Some(cache), true)?
            .flatten_all()?
            .to_vec1()
    }
}
