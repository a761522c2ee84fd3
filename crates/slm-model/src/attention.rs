//! The per-sequence key/value cache of one layer, in f16 as llama.cpp keeps it by default,
//! and attention over it (the arithmetic is slm_kernels::attention's).

use candle_core::{Device, Tensor};
use half::f16;

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
    /// The first `n` positions in a new cache with room for `capacity`.
    pub fn prefix(&self, n: usize, capacity: usize, row: usize) -> LayerCache {
        let n = n.min(self.len);
        let mut k = Vec::with_capacity(capacity * row);
        let mut v = Vec::with_capacity(capacity * row);
        k.extend_from_slice(&self.k[..n * row]);
        v.extend_from_slice(&self.v[..n * row]);
        LayerCache { k, v, len: n }
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
    cache.k.extend(k.iter().map(|&x| f16::from_f32(x)));
    cache.v.extend(v.iter().map(|&x| f16::from_f32(x)));
    cache.len += t;
    let past = cache.len - t;
    let out =
        slm_kernels::attention::attend_cached(&cache.k, &cache.v, q, t, past, n_heads, n_kv, hd);
    Tensor::from_vec(out, (t, n_heads * hd), device)
}
