//! Attention over an f16 key/value cache, for inference (the cache itself is slm-model's).
//!
//! Why by hand: the cache is stored in f16 (half the memory of f32, as llama.cpp does by
//! default), and how the arithmetic around it is done decides whether slm's greedy output
//! matches llama.cpp's. SmolLM2 is sensitive enough that rounding q/k/v to f16 or not moves
//! top logits by 0.1-0.3, so the order of operations follows llama.cpp's CPU flash-attention:
//! - fewer than `TILE_Q` new queries (decode, short prompts): the query is rounded to f16, dot
//!   products are f16 x f16 accumulated in f32, and softmax(QK)V is accumulated online in an
//!   f16 buffer (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`);
//! - `TILE_Q` or more (prefill of long prompts, perplexity): K and V widened to f32 and
//!   everything else in f32 (the tiled kernel), done here on the kernel pool as two matrix
//!   products per (key/value head, 32 positions) with an exact softmax between them: only
//!   that block's scores exist at a time, never a t x len matrix for all heads (that was
//!   ~30 MB at 512 positions, the peak memory of a run). Decode runs one task per
//!   (query, head) on the pool once the cache is long enough to share.
//!
//! Training does not come here: its attention is `train::attention`.

use half::f16;

use crate::gemm::{gemm, View};

/// llama.cpp's GGML_FA_TILE_Q: below this many queries it takes the f16 path.
pub const TILE_Q: usize = 64;

/// Attention of `t` new queries `q` ((t, n_heads, hd) roped, f32 row-major) at positions
/// `past..past + t` over the cache's keys and values `k`, `v` ((past + t, n_kv, hd) in f16,
/// the new ones included): (t, n_heads * hd), causal.
#[allow(clippy::too_many_arguments)]
pub fn attend_cached(
    kc: &[f16],
    vc: &[f16],
    q: &[f32],
    t: usize,
    past: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
) -> Vec<f32> {
    let row = n_kv * hd;
    let len = past + t;
    assert!(kc.len() >= len * row && vc.len() >= len * row && q.len() >= t * n_heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let rep = n_heads / n_kv;

    if t >= TILE_Q {
        return attend_f32(kc, vc, q, t, past, n_heads, n_kv, hd, scale);
    }

    let mut out = vec![0f32; t * n_heads * hd];
    let o = crate::pool::OutPtr(out.as_mut_ptr());
    let one = |task: usize| {
        let (i, h) = (task / n_heads, task % n_heads);
        let visible = past + i + 1;
        let g = h / rep;
        let qrow = &q[(i * n_heads + h) * hd..][..hd];
        let q16: Vec<f32> = qrow.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let mut acc = vec![f16::ZERO; hd];
        let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
        for j in 0..visible {
            let krow = &kc[j * row + g * hd..][..hd];
            let s = crate::ggml_math::dot_f16(krow, &q16) * scale;
            let vrow = &vc[j * row + g * hd..][..hd];
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
        // SAFETY: (query i, head h) is written by this task only; out holds t * n_heads * hd.
        let dst = unsafe { std::slice::from_raw_parts_mut(o.get().add(task * hd), hd) };
        for (d, a) in dst.iter_mut().zip(&acc) {
            *d = a.to_f32() * inv;
        }
    };
    // One task per (query, head) on the kernel pool once there is enough to share: in decode
    // this was serial work on the calling thread while the other threads waited.
    if len * n_heads >= MIN_PARALLEL {
        crate::pool::global().run(t * n_heads, one);
    } else {
        (0..t * n_heads).for_each(one);
    }
    out
}

/// Keys times heads below which the f16 path stays on the calling thread (a section of the
/// pool costs a few microseconds).
const MIN_PARALLEL: usize = 256;

/// Query positions of one task in the f32 path. A task takes them for all the heads that
/// share one key/value head, so each product reads that head's keys once for
/// rep x QUERIES_PER_TASK query rows.
const QUERIES_PER_TASK: usize = 32;

/// The f32 path for t queries at positions past.. over the whole (f16) cache: K and V
/// widened to f32 once, then per task (key/value head, block of query positions) two
/// matrix products through the `gemm` crate, scores = scale * Q K^T and out = P V, with an
/// exact softmax in between. The scores of one block (rows x visible keys) are the only
/// intermediate; keys a query does not see yet get probability zero.
#[allow(clippy::too_many_arguments)]
fn attend_f32(
    k16: &[f16],
    v16: &[f16],
    q: &[f32],
    t: usize,
    past: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    scale: f32,
) -> Vec<f32> {
    let widen = |x: &[f16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
    let (k, v) = (widen(k16), widen(v16));
    let (row, rep) = (n_kv * hd, n_heads / n_kv);
    let mut out = vec![0f32; t * n_heads * hd];
    let o = crate::pool::OutPtr(out.as_mut_ptr());
    let chunks = t.div_ceil(QUERIES_PER_TASK);
    crate::pool::global().run(n_kv * chunks, |task| {
        let (g, c) = (task / chunks, task % chunks);
        let (i0, i1) = (c * QUERIES_PER_TASK, ((c + 1) * QUERIES_PER_TASK).min(t));
        let rows = (i1 - i0) * rep;
        let width = past + i1;
        // Row r is position i0 + r / rep, head g * rep + r % rep: the group's heads lie
        // side by side in q for one position.
        let mut qs = Vec::with_capacity(rows * hd);
        for i in i0..i1 {
            qs.extend_from_slice(&q[(i * n_heads + g * rep) * hd..][..rep * hd]);
        }
        let mut s = vec![0f32; rows * width];
        // The group's keys, read transposed: key j's value d at k[g * hd + j * row + d].
        product(
            &mut s,
            width,
            &qs,
            hd,
            View {
                ptr: k[g * hd..].as_ptr(),
                rs: 1,
                cs: row,
            },
            scale,
        );
        let mut sums = vec![0f32; rows];
        for (r, (sr, sum)) in s.chunks_exact_mut(width).zip(&mut sums).enumerate() {
            let visible = past + i0 + r / rep + 1;
            let m = sr[..visible]
                .iter()
                .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            *sum = crate::ggml_math::exp_sub_sum(&mut sr[..visible], m);
            sr[visible..].fill(0.0);
        }
        let mut os = vec![0f32; rows * hd];
        product(
            &mut os,
            hd,
            &s,
            width,
            View {
                ptr: v[g * hd..].as_ptr(),
                rs: row,
                cs: 1,
            },
            1.0,
        );
        for (r, (orow, sum)) in os.chunks_exact(hd).zip(&sums).enumerate() {
            let (i, h) = (i0 + r / rep, g * rep + r % rep);
            // SAFETY: (position i, head h) is written by this task only; out holds
            // t * n_heads * hd.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(o.get().add((i * n_heads + h) * hd), hd) };
            for (d, a) in dst.iter_mut().zip(orow) {
                *d = a / sum;
            }
        }
    });
    out
}

/// `dst = beta * lhs rhs` on the calling thread: lhs is m x kd and dst m x n, both row-major.
fn product(dst: &mut [f32], n: usize, lhs: &[f32], kd: usize, rhs: View<f32>, beta: f32) {
    let m = lhs.len() / kd.max(1);
    assert!(lhs.len() == m * kd && dst.len() == m * n);
    // SAFETY: the callers' rhs views lie inside the widened cache (kd x n elements at their
    // strides), and dst and lhs are checked above.
    unsafe {
        gemm(
            dst.as_mut_ptr(),
            n,
            false,
            (m, n, kd),
            View::rows(lhs, kd),
            rhs,
            beta,
            false,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Keys and values so far, as slm-model's layer cache holds them.
    #[derive(Default)]
    struct Cache {
        k: Vec<f16>,
        v: Vec<f16>,
        len: usize,
    }

    impl Cache {
        #[allow(clippy::too_many_arguments)]
        fn attend(
            &mut self,
            q: &[f32],
            k: &[f32],
            v: &[f32],
            t: usize,
            nh: usize,
            nkv: usize,
            hd: usize,
        ) -> Vec<f32> {
            self.k.extend(k.iter().map(|&x| f16::from_f32(x)));
            self.v.extend(v.iter().map(|&x| f16::from_f32(x)));
            self.len += t;
            attend_cached(&self.k, &self.v, q, t, self.len - t, nh, nkv, hd)
        }
    }

    /// Causal attention in f64 over the same f16-rounded keys and values, per (query, head).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        k: &[f16],
        v: &[f16],
        q: &[f32],
        t: usize,
        past: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
    ) -> Vec<f64> {
        let (row, rep) = (nkv * hd, nh / nkv);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0f64; t * nh * hd];
        for i in 0..t {
            for h in 0..nh {
                let g = h / rep;
                let qr = &q[(i * nh + h) * hd..][..hd];
                let s: Vec<f64> = (0..past + i + 1)
                    .map(|j| {
                        let kr = &k[j * row + g * hd..][..hd];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * b.to_f64())
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, p) in e.iter().enumerate() {
                    for d in 0..hd {
                        out[(i * nh + h) * hd + d] += p / sum * v[j * row + g * hd + d].to_f64();
                    }
                }
            }
        }
        out
    }

    /// The decode path (t < TILE_Q) over a cache long enough to run on the pool: within the
    /// f16 accumulator's rounding of the f64 reference (measured max 1.2e-3 here), while
    /// letting one more key in (an off-by-one mask) moves outputs by far more.
    #[test]
    fn decode_attention_on_the_pool_matches_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (nh, nkv, hd) = (6, 2, 20);
        let mut cache = Cache::default();
        let mut rand_vec =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2f32..2.0)).collect() };
        let past = 60;
        assert!(past * nh >= MIN_PARALLEL && past < TILE_Q);
        let (q0, k0, v0) = (
            rand_vec(past * nh * hd),
            rand_vec(past * nkv * hd),
            rand_vec(past * nkv * hd),
        );
        cache.attend(&q0, &k0, &v0, past, nh, nkv, hd);
        let t = 3;
        let (q, k, v) = (
            rand_vec(t * nh * hd),
            rand_vec(t * nkv * hd),
            rand_vec(t * nkv * hd),
        );
        let y = cache.attend(&q, &k, &v, t, nh, nkv, hd);
        let want = reference(&cache.k, &cache.v, &q, t, past, nh, nkv, hd);
        let err = y
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0f64, f64::max);
        assert!(err < 4e-3, "max error {err}");
        // The first query seeing one key too many (the second's own key), as a wrong mask would.
        let leaky = reference(&cache.k, &cache.v, &q[..nh * hd], 1, past + 1, nh, nkv, hd);
        let moved = y[..nh * hd]
            .iter()
            .zip(&leaky)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0f64, f64::max);
        assert!(
            moved > 10.0 * 4e-3,
            "an extra key moved outputs by only {moved}"
        );
    }

    /// The long-prompt path (t >= TILE_Q), after a short first call filled part of the cache:
    /// grouped heads, a head size with a tail of eight, queries not a multiple of a task.
    #[test]
    fn long_prompt_attention_matches_f64_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (nh, nkv, hd) = (6, 2, 20);
        let mut cache = Cache::default();
        let mut rand_vec =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2f32..2.0)).collect() };
        let (q0, k0, v0) = (
            rand_vec(5 * nh * hd),
            rand_vec(5 * nkv * hd),
            rand_vec(5 * nkv * hd),
        );
        cache.attend(&q0, &k0, &v0, 5, nh, nkv, hd);
        let t = TILE_Q + 7;
        let (q, k, v) = (
            rand_vec(t * nh * hd),
            rand_vec(t * nkv * hd),
            rand_vec(t * nkv * hd),
        );
        let y = cache.attend(&q, &k, &v, t, nh, nkv, hd);
        let want = reference(&cache.k, &cache.v, &q, t, 5, nh, nkv, hd);
        for (idx, (a, b)) in y.iter().zip(&want).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-5, "element {idx}: {a} vs {b}");
        }
    }
}
