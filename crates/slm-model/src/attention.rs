//! Attention over an f16 key/value cache, for inference.
//!
//! Why by hand: the cache is stored in f16 (half the memory of f32, as llama.cpp does by
//! default), and how the arithmetic around it is done decides whether slm's greedy output
//! matches llama.cpp's. SmolLM2 is sensitive enough that rounding q/k/v to f16 or not moves
//! top logits by 0.1-0.3, so the order of operations follows llama.cpp's CPU flash-attention:
//! - fewer than `TILE_Q` new queries (decode, short prompts): the query is rounded to f16, dot
//!   products are f16 x f16 accumulated in f32, and softmax(QK)V is accumulated online in an
//!   f16 buffer (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`);
//! - `TILE_Q` or more (prefill of long prompts, perplexity): K and V widened to f32 and
//!   everything else in f32 (the tiled kernel), done here with candle's matmul.
//!
//! Training does not come here: it runs without a cache, through candle ops with gradients.

use candle_core::{DType, Device, Tensor};
use half::f16;

/// llama.cpp's GGML_FA_TILE_Q: below this many queries it takes the f16 path.
pub const TILE_Q: usize = 64;

/// Keys and values of one layer for one sequence, position-major: [pos][kv_head][head_dim],
/// so appending never moves what is there.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    k: Vec<f16>,
    v: Vec<f16>,
    len: usize,
}

impl LayerCache {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn clear(&mut self) {
        self.k.clear();
        self.v.clear();
        self.len = 0;
    }
    /// Drops everything after the first `n` positions.
    pub fn truncate(&mut self, n: usize, row: usize) {
        if n < self.len {
            self.k.truncate(n * row);
            self.v.truncate(n * row);
            self.len = n;
        }
    }
    pub fn bytes(&self) -> usize {
        (self.k.capacity() + self.v.capacity()) * 2
    }
}

/// q: (t, n_heads, hd) roped, k/v: (t, n_kv, hd) roped, all f32 row-major for batch 1.
/// Appends k/v to the cache and returns (t, n_heads * hd).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    cache: &mut LayerCache,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let row = n_kv * hd;
    cache.k.extend(k.iter().map(|&x| f16::from_f32(x)));
    cache.v.extend(v.iter().map(|&x| f16::from_f32(x)));
    cache.len += t;
    let len = cache.len;
    let past = len - t;
    let scale = 1.0 / (hd as f32).sqrt();
    let rep = n_heads / n_kv;

    if t >= TILE_Q {
        // f32 path: widen K/V and let candle's gemm do the two matmuls.
        let kt = Tensor::from_slice(&cache.k, (len, n_kv, hd), device)?
            .to_dtype(DType::F32)?
            .transpose(0, 1)?
            .contiguous()?; // (n_kv, len, hd)
        let vt = Tensor::from_slice(&cache.v, (len, n_kv, hd), device)?
            .to_dtype(DType::F32)?
            .transpose(0, 1)?
            .contiguous()?;
        let qt = Tensor::from_slice(q, (t, n_heads, hd), device)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n_kv, rep * t, hd))?;
        let att = (qt.matmul(&kt.t()?)? * scale as f64)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..len).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, len), device)?;
        let att = att
            .reshape((n_kv, rep, t, len))?
            .broadcast_add(&mask)?
            .reshape((n_kv, rep * t, len))?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&vt)?; // (n_kv, rep*t, hd)
        return y
            .reshape((n_heads, t, hd))?
            .transpose(0, 1)?
            .reshape((t, n_heads * hd));
    }

    let mut out = vec![0f32; t * n_heads * hd];
    let mut q16 = vec![0f32; hd];
    let mut acc = vec![f16::ZERO; hd];
    for i in 0..t {
        let visible = past + i + 1;
        for h in 0..n_heads {
            let g = h / rep;
            let qrow = &q[(i * n_heads + h) * hd..][..hd];
            for (d, &x) in q16.iter_mut().zip(qrow) {
                *d = f16::from_f32(x).to_f32();
            }
            acc.fill(f16::ZERO);
            let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
            for j in 0..visible {
                let krow = &cache.k[j * row + g * hd..][..hd];
                let s = crate::ggml_math::dot_f16(krow, &q16) * scale;
                let vrow = &cache.v[j * row + g * hd..][..hd];
                let (mut ms, mut vs) = (1f32, 1f32);
                if s > m {
                    let old = m;
                    m = s;
                    ms = (old - m).exp();
                    crate::ggml_math::scale_f16(&mut acc, ms);
                } else {
                    vs = (s - m).exp();
                }
                crate::ggml_math::mad_f16(&mut acc, vrow, vs);
                s_sum = s_sum.mul_add(ms, vs); // contracted to FMA in ggml's build
            }
            let inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
            for (o, a) in out[(i * n_heads + h) * hd..][..hd].iter_mut().zip(&acc) {
                *o = a.to_f32() * inv;
            }
        }
    }
    Tensor::from_vec(out, (t, n_heads * hd), device)
}
