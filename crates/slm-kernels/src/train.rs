//! The forward and backward passes of the transformer block's parts (RMSNorm, RoPE, causal
//! attention, SwiGLU, the embedding) on f32 slices, for the trainer in trainer.rs.
//!
//! Why by hand and not as candle ops with autograd: candle's backward allocates every
//! gradient as a new tensor and adds it into another fresh zeroed one, walks each composed op
//! as a separate pass over memory, and runs elementwise work and matmuls on two thread pools
//! that spin against each other; on 2 cores that was more than half of a training step.
//! Here every function writes into buffers its caller allocated once, rows are split across
//! rayon's threads (the pool the matmuls use too), and the backward passes add straight into
//! the gradients they feed. The candle model (`slm_model::Llama` over `Var`s, with
//! autograd) stays the reference these are tested against.

use crate::exp::ExpInPlace;
use rayon::prelude::*;

use crate::gemm::{gemm, View};

/// Rows per parallel task of the row-wise kernels.
const ROWS: usize = 32;

/// Query rows per attention tile: a tile's scores (ROWS x positions) stay in L2.
const QUERY_TILE: usize = 128;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums, so the loop vectorises (a single f32 sum must keep its order).
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// RMSNorm: `y = x * r * w` per row, with `r = 1 / sqrt(mean(x²) + eps)` kept for backward.
pub fn rms_norm(y: &mut [f32], r: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    y.par_chunks_mut(ROWS * d)
        .zip(r.par_chunks_mut(ROWS))
        .zip(x.par_chunks(ROWS * d))
        .for_each(|((y, r), x)| {
            for ((yr, rr), xr) in y.chunks_exact_mut(d).zip(r).zip(x.chunks_exact(d)) {
                *rr = 1.0 / (dot(xr, xr) / d as f32 + eps).sqrt();
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * *rr * g;
                }
            }
        });
}

/// RMSNorm backward: adds the gradient with respect to x into `dx` (the residual stream's
/// gradient, which x also feeds directly) and that of the weight into `dw`.
pub fn rms_norm_bwd(dx: &mut [f32], dw: &mut [f32], dy: &[f32], x: &[f32], r: &[f32], w: &[f32]) {
    let d = w.len();
    // One partial weight gradient per fixed block of rows, summed in order: the same sum
    // whichever thread ran which block (rayon's fold would follow its work stealing).
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS * d)
        .zip(dy.par_chunks(ROWS * d))
        .zip(x.par_chunks(ROWS * d))
        .zip(r.par_chunks(ROWS))
        .map(|(((dx, dy), x), r)| {
            let mut acc = vec![0f32; d];
            for (((dxr, dyr), xr), &rr) in dx
                .chunks_exact_mut(d)
                .zip(dy.chunks_exact(d))
                .zip(x.chunks_exact(d))
                .zip(r)
            {
                // y_c = x_c r w_c: dx_c = r (dy_c w_c) - r³/d x_c Σ_j dy_j w_j x_j
                let mut s = 0f32;
                for ((&g, &wc), &xc) in dyr.iter().zip(w).zip(xr) {
                    s += g * wc * xc;
                }
                let k = rr * rr * rr * s / d as f32;
                for ((((o, &g), &wc), &xc), a) in
                    dxr.iter_mut().zip(dyr).zip(w).zip(xr).zip(acc.iter_mut())
                {
                    *o += rr * g * wc - k * xc;
                    *a += g * xc * rr;
                }
            }
            acc
        })
        .collect();
    for part in &partials {
        dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
}

/// Where the heads lie in a row of the fused q|k|v projection, and the rotation tables.
#[derive(Clone, Copy)]
pub struct RopeSpec<'a> {
    /// Values per row of the buffer.
    pub width: usize,
    /// Heads to rotate, from column 0 (the q and k heads are adjacent in q|k|v).
    pub heads: usize,
    pub head_dim: usize,
    /// Positions per sequence: row n is at position n % positions.
    pub positions: usize,
    /// cos and sin of each position's angles (positions x head_dim / 2).
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// Packed rows (`attention`'s `starts`): row n is at position n % positions - starts[n].
    pub starts: Option<&'a [u32]>,
}

/// Rotary embedding in place, pairs half a head apart (the Hugging Face layout);
/// `inverse` rotates back, which is the backward pass of the rotation.
pub fn rope(buf: &mut [f32], s: RopeSpec, inverse: bool) {
    let half = s.head_dim / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    buf.par_chunks_mut(s.width)
        .enumerate()
        .for_each(|(n, row)| {
            let p = n % s.positions - s.starts.map_or(0, |st| st[n] as usize);
            let (cos, sin) = (
                &s.cos[p * half..(p + 1) * half],
                &s.sin[p * half..(p + 1) * half],
            );
            for head in row[..s.heads * s.head_dim].chunks_exact_mut(s.head_dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x0, x1, c, sn) = (a[i], b[i], cos[i], sign * sin[i]);
                    a[i] = x0 * c - x1 * sn;
                    b[i] = x1 * c + x0 * sn;
                }
            }
        });
}

/// SwiGLU: `a = silu(g) * u` for rows of g|u (2f values: gate, then up); the gate's
/// sigmoid is kept for backward.
pub fn swiglu(a: &mut [f32], sig: &mut [f32], gu: &[f32], f: usize) {
    a.par_chunks_mut(ROWS * f)
        .zip(sig.par_chunks_mut(ROWS * f))
        .zip(gu.par_chunks(ROWS * 2 * f))
        .for_each(|((a, sig), gu)| {
            for ((ar, sr), gur) in a
                .chunks_exact_mut(f)
                .zip(sig.chunks_exact_mut(f))
                .zip(gu.chunks_exact(2 * f))
            {
                let (g, u) = gur.split_at(f);
                sr.iter_mut().zip(g).for_each(|(s, &x)| *s = -x);
                f32::exp_in_place(sr);
                for (((o, s), &x), &y) in ar.iter_mut().zip(sr.iter_mut()).zip(g).zip(u) {
                    *s = 1.0 / (1.0 + *s);
                    *o = x * *s * y;
                }
            }
        });
}

/// SwiGLU backward: the gradients of g|u (written) from that of a.
pub fn swiglu_bwd(dgu: &mut [f32], da: &[f32], gu: &[f32], sig: &[f32], f: usize) {
    dgu.par_chunks_mut(ROWS * 2 * f)
        .zip(da.par_chunks(ROWS * f))
        .zip(gu.par_chunks(ROWS * 2 * f))
        .zip(sig.par_chunks(ROWS * f))
        .for_each(|(((dgu, da), gu), sig)| {
            for (((dr, dar), gur), sr) in dgu
                .chunks_exact_mut(2 * f)
                .zip(da.chunks_exact(f))
                .zip(gu.chunks_exact(2 * f))
                .zip(sig.chunks_exact(f))
            {
                let (dg, du) = dr.split_at_mut(f);
                let (g, u) = gur.split_at(f);
                for i in 0..f {
                    let (s, x) = (sr[i], g[i]);
                    // silu(x) = x s, silu'(x) = s (1 + x (1 - s))
                    dg[i] = dar[i] * u[i] * s * (1.0 + x * (1.0 - s));
                    du[i] = dar[i] * x * s;
                }
            }
        });
}

/// Embedding rows for each token.
pub fn embed(x: &mut [f32], table: &[f32], tokens: &[u32], d: usize) {
    x.par_chunks_mut(d)
        .zip(tokens.par_iter())
        .for_each(|(row, &t)| row.copy_from_slice(&table[t as usize * d..(t as usize + 1) * d]));
}

/// Embedding backward: each row's gradient added into its token's row of the table's
/// gradient. Split by columns, so threads never add into the same value.
pub fn embed_bwd(dtable: &mut [f32], dx: &[f32], tokens: &[u32], d: usize) {
    let parts = rayon::current_num_threads().max(1);
    let cols = d.div_ceil(parts).max(1);
    let dt = SharedMut(dtable.as_mut_ptr());
    (0..d.div_ceil(cols)).into_par_iter().for_each(|p| {
        let (c0, c1) = (p * cols, ((p + 1) * cols).min(d));
        for (row, &t) in dx.chunks_exact(d).zip(tokens) {
            // SAFETY: tokens lie below the table's rows (checked by the trainer), and this
            // task alone writes columns c0..c1.
            let out =
                unsafe { std::slice::from_raw_parts_mut(dt.at(t as usize * d + c0), c1 - c0) };
            out.iter_mut().zip(&row[c0..c1]).for_each(|(o, g)| *o += g);
        }
    });
}

/// A bias added to every row of `y` (rows of `b.len()` values).
pub fn add_bias(y: &mut [f32], b: &[f32]) {
    y.par_chunks_mut(b.len().max(1) * ROWS).for_each(|rows| {
        for row in rows.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(y, &b)| *y += b);
        }
    });
}

/// Bias backward: the column sums of `dy` (rows of `db.len()` values) added into `db`.
/// Split by columns and summed down the rows in order, so the sums do not depend on how the
/// threads shared the work.
pub fn bias_bwd(db: &mut [f32], dy: &[f32]) {
    let width = db.len();
    const COLS: usize = 64;
    db.par_chunks_mut(COLS).enumerate().for_each(|(p, out)| {
        let (c0, cols) = (p * COLS, out.len());
        for row in dy.chunks_exact(width) {
            out.iter_mut()
                .zip(&row[c0..c0 + cols])
                .for_each(|(o, g)| *o += g);
        }
    });
}

thread_local! {
    /// Each thread's attention tile (scores, and their gradient in backward), kept between
    /// calls: a fresh one per task came from mmap above glibc's threshold, and every
    /// update paid its page faults and the TLB shootdowns of unmapping it.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` with this thread's tile, at least `len` values long.
fn with_tile<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    TILE.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() < len {
            t.resize(len, 0.0);
        }
        f(&mut t[..len])
    })
}

/// A pointer that parallel tasks share, each writing its own elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: users write disjoint elements (see each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay inside the allocation.
        unsafe { self.0.add(i) }
    }
}

/// Causal self-attention over the fused q|k|v rows of `batch` sequences of `positions`.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub positions: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Values per q|k|v row.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
    /// Values per output row.
    pub fn out_width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    fn k_col(&self, g: usize) -> usize {
        (self.heads + g) * self.head_dim
    }
    fn v_col(&self, g: usize) -> usize {
        (self.heads + self.kv_heads + g) * self.head_dim
    }
    fn check(&self, qkv: usize, out: usize, lse: usize) {
        let n = self.batch * self.positions;
        assert!(self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads));
        assert!(qkv >= n * self.qkv_width() && out >= n * self.out_width());
        assert!(lse >= n * self.heads);
    }
}

/// Row `i` of a score tile `row` (valid entries `first..valid`, the rest masked): softmax
/// in place with the masked entries set to 0; returns the log of its normaliser.
fn softmax_row(row: &mut [f32], first: usize, valid: usize) -> f32 {
    let (before, row) = row.split_at_mut(first);
    before.fill(0.0);
    let (live, masked) = row.split_at_mut(valid - first);
    let max = live.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    live.iter_mut().for_each(|x| *x -= max);
    f32::exp_in_place(live);
    let sum: f32 = live.iter().sum();
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
    masked.fill(0.0);
    max + sum.ln()
}

/// A tile's scaled scores `scores` (rows x r1) = scale · q (rows query rows of one head,
/// `qkv_width` apart) · kᵀ (the first r1 keys of one kv head), on the calling thread.
fn tile_scores(scores: &mut [f32], q: &[f32], k: &[f32], rows: usize, r1: usize, s: AttnShape) {
    let (w, hd) = (s.qkv_width(), s.head_dim);
    assert!(scores.len() >= rows * r1);
    assert!(rows == 0 || q.len() >= (rows - 1) * w + hd);
    assert!(r1 == 0 || k.len() >= (r1 - 1) * w + hd);
    // SAFETY: the asserts bound every element the views address.
    unsafe {
        gemm(
            scores.as_mut_ptr(),
            r1,
            false,
            (rows, r1, hd),
            View::rows(q, w),
            View::transposed(k, w),
            s.scale(),
            false,
        )
    }
}

/// Where each query's sequence begins in its row: `starts[b * positions + i]` for packed
/// rows (several sequences one after another, each attending only within itself), 0 for
/// every query when `None`. Checked: a start lies at or before its query.
fn first_key(starts: Option<&[u32]>, t: usize, b: usize, i: usize) -> usize {
    starts.map_or(0, |st| st[b * t + i] as usize)
}

/// The first index of `starts` (rows of `positions`) whose sequence would start after the
/// position itself: what `attention` and `rope` cannot take.
pub fn misplaced_start(starts: &[u32], positions: usize) -> Option<usize> {
    (0..starts.len()).find(|&n| starts[n] as usize > n % positions)
}

fn check_starts(starts: Option<&[u32]>, s: AttnShape) {
    if let Some(st) = starts {
        let n = s.batch * s.positions;
        assert!(st.len() >= n, "a start per query");
        assert!(
            misplaced_start(&st[..n], s.positions).is_none(),
            "a sequence starts at or before each of its queries"
        );
    }
}

/// Forward: `out` (rows x heads*head_dim) and the log-sum-exp of every score row
/// (`lse`, batch x heads x positions), from which backward rebuilds the probabilities.
/// Scores live one tile of query rows at a time, never as a whole T x T matrix. Query `i`
/// sees keys `first_key(starts, ..)..=i`.
pub fn attention(
    out: &mut [f32],
    lse: &mut [f32],
    qkv: &[f32],
    s: AttnShape,
    starts: Option<&[u32]>,
) {
    s.check(qkv.len(), out.len(), lse.len());
    check_starts(starts, s);
    let (t, hd, w, ow) = (s.positions, s.head_dim, s.qkv_width(), s.out_width());
    let rep = s.heads / s.kv_heads;
    let (o_ptr, l_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    (0..s.batch * s.kv_heads).into_par_iter().for_each(|task| {
        with_tile(QUERY_TILE * t, |scores| {
            let (b, g) = (task / s.kv_heads, task % s.kv_heads);
            let base = b * t * w;
            let k = &qkv[base + s.k_col(g)..];
            let v = &qkv[base + s.v_col(g)..];
            for h in g * rep..(g + 1) * rep {
                for r0 in (0..t).step_by(QUERY_TILE) {
                    let (rows, r1) = (QUERY_TILE.min(t - r0), (r0 + QUERY_TILE).min(t));
                    let q = &qkv[base + r0 * w + h * hd..];
                    let sc = &mut scores[..rows * r1];
                    tile_scores(sc, q, k, rows, r1, s);
                    for (i, row) in sc.chunks_exact_mut(r1).enumerate() {
                        let l = softmax_row(row, first_key(starts, t, b, r0 + i), r0 + i + 1);
                        // SAFETY: row (b, h, r0 + i) of lse belongs to this task.
                        unsafe { *l_ptr.at((b * s.heads + h) * t + r0 + i) = l };
                    }
                    // SAFETY: v rows of sequence b lie inside qkv (checked); the output rows
                    // r0..r1 of head h belong to this task alone.
                    unsafe {
                        gemm(
                            o_ptr.at((b * t + r0) * ow + h * hd),
                            ow,
                            false,
                            (rows, hd, r1),
                            View::rows(sc, r1),
                            View::rows(v, w),
                            1.0,
                            false,
                        );
                    }
                }
            }
        })
    });
}

/// Backward: the gradients of q|k|v (written, before RoPE's backward) from that of `out`.
/// Each tile's probabilities are rebuilt from q, k and `lse`; `dS = P (dP - rowsum(dO O))`.
pub fn attention_bwd(
    dqkv: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    qkv: &[f32],
    s: AttnShape,
    starts: Option<&[u32]>,
) {
    s.check(qkv.len(), out.len(), lse.len());
    check_starts(starts, s);
    s.check(dqkv.len(), dout.len(), lse.len());
    let (t, hd, w, ow) = (s.positions, s.head_dim, s.qkv_width(), s.out_width());
    let rep = s.heads / s.kv_heads;
    let d_ptr = SharedMut(dqkv.as_mut_ptr());
    (0..s.batch * s.kv_heads).into_par_iter().for_each(|task| {
        with_tile(2 * QUERY_TILE * t, |scratch| {
            let (b, g) = (task / s.kv_heads, task % s.kv_heads);
            let base = b * t * w;
            let k = &qkv[base + s.k_col(g)..];
            let v = &qkv[base + s.v_col(g)..];
            // This task owns the k and v gradient columns of kv head g in sequence b.
            for i in 0..t {
                for col in [s.k_col(g), s.v_col(g)] {
                    // SAFETY: inside dqkv (checked), owned by this task.
                    unsafe { std::slice::from_raw_parts_mut(d_ptr.at(base + i * w + col), hd) }
                        .fill(0.0);
                }
            }
            for h in g * rep..(g + 1) * rep {
                for r0 in (0..t).step_by(QUERY_TILE) {
                    let (rows, r1) = (QUERY_TILE.min(t - r0), (r0 + QUERY_TILE).min(t));
                    let (p, dp) = scratch.split_at_mut(QUERY_TILE * t);
                    let (p, dp) = (&mut p[..rows * r1], &mut dp[..rows * r1]);
                    let q = &qkv[base + r0 * w + h * hd..];
                    let dout_t = &dout[(b * t + r0) * ow + h * hd..];
                    let out_t = &out[(b * t + r0) * ow + h * hd..];
                    tile_scores(p, q, k, rows, r1, s);
                    // SAFETY (every product below): the operands are rows of sequence b
                    // inside their buffers (checked); the written gradient rows (q of head h,
                    // rows r0..r1; k and v of head g) belong to this task.
                    unsafe {
                        gemm(
                            dp.as_mut_ptr(),
                            r1,
                            false,
                            (rows, r1, hd),
                            View::rows(dout_t, ow),
                            View::transposed(v, w),
                            1.0,
                            false,
                        );
                    }
                    for (i, (pr, dpr)) in p
                        .chunks_exact_mut(r1)
                        .zip(dp.chunks_exact_mut(r1))
                        .enumerate()
                    {
                        let (first, valid) = (first_key(starts, t, b, r0 + i), r0 + i + 1);
                        let l = lse[(b * s.heads + h) * t + r0 + i];
                        let (before, seen) = pr.split_at_mut(first);
                        before.fill(0.0);
                        let (live, masked) = seen.split_at_mut(valid - first);
                        live.iter_mut().for_each(|x| *x -= l);
                        f32::exp_in_place(live);
                        masked.fill(0.0);
                        let dd = dot(&dout_t[i * ow..i * ow + hd], &out_t[i * ow..i * ow + hd]);
                        for (x, &pv) in dpr.iter_mut().zip(pr.iter()) {
                            *x = pv * (*x - dd);
                        }
                    }
                    unsafe {
                        gemm(
                            d_ptr.at(base + r0 * w + h * hd),
                            w,
                            false,
                            (rows, hd, r1),
                            View::rows(dp, r1),
                            View::rows(k, w),
                            s.scale(),
                            false,
                        );
                        gemm(
                            d_ptr.at(base + s.k_col(g)),
                            w,
                            true,
                            (r1, hd, rows),
                            View::transposed(dp, r1),
                            View::rows(q, w),
                            s.scale(),
                            false,
                        );
                        gemm(
                            d_ptr.at(base + s.v_col(g)),
                            w,
                            true,
                            (r1, hd, rows),
                            View::transposed(p, r1),
                            View::rows(dout_t, ow),
                            1.0,
                            false,
                        );
                    }
                }
            }
        })
    });
}

/// Every fused op against the same op composed of candle's differentiable primitives (its
/// autograd gives the reference gradients) and against central finite differences, on
/// random inputs of odd sizes. Tolerances: gradients within 1e-4 of the reference's largest
/// value (f32 against f32 with another summation order); a directional derivative within
/// 1% of the finite difference (the f32 forward's rounding over a step of 1e-2).
#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var, D};
    use rand::{Rng, SeedableRng};

    /// Normal samples (Box-Muller) from a seed.
    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
                let g = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                g as f32 * scale
            })
            .collect()
    }

    fn close(name: &str, got: &[f32], want: &Tensor) {
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{name}: length");
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            err <= 1e-4 * scale,
            "{name}: max error {err:e} against a largest value of {scale:e}"
        );
    }

    fn var(values: &[f32], shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::from_slice(values, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Σ y·r (the loss whose gradient with respect to y is r) of a candle output.
    fn weighted_sum(y: &Tensor, r: &[f32]) -> Tensor {
        let r = Tensor::from_slice(r, y.shape(), &Device::Cpu).unwrap();
        (y * r).unwrap().sum_all().unwrap()
    }

    fn dot64(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    /// `grad · u` against (L(x + eps u) - L(x - eps u)) / (2 eps) with L(x) = f(x) · r.
    fn finite_difference(
        name: &str,
        x: &[f32],
        grad: &[f32],
        r: &[f32],
        f: impl Fn(&[f32]) -> Vec<f32>,
    ) {
        let u = random(x.len(), 99, 1.0);
        let eps = 1e-2f32;
        let shifted = |sign: f32| -> Vec<f32> {
            x.iter()
                .zip(&u)
                .map(|(&a, &b)| a + sign * eps * b)
                .collect()
        };
        let (lp, lm) = (dot64(&f(&shifted(1.0)), r), dot64(&f(&shifted(-1.0)), r));
        let fd = (lp - lm) / (2.0 * eps as f64);
        let an = dot64(grad, &u);
        assert!(
            (fd - an).abs() <= 1e-2 * an.abs().max(1e-3),
            "{name}: directional derivative {an} against finite difference {fd}"
        );
    }

    #[test]
    fn rms_norm_gradients() {
        let (n, d) = (37, 45);
        let x = random(n * d, 1, 1.0);
        let w = random(d, 2, 1.0);
        let r = random(n * d, 3, 1.0);
        let run = |x: &[f32]| {
            let (mut y, mut rr) = (vec![0f32; n * d], vec![0f32; n]);
            rms_norm(&mut y, &mut rr, x, &w, 1e-5);
            (y, rr)
        };
        let (y, rr) = run(&x);
        let (mut dx, mut dw) = (vec![0.5f32; n * d], vec![0.25f32; d]);
        rms_norm_bwd(&mut dx, &mut dw, &r, &x, &rr, &w);
        // The backward adds into what the buffers held.
        dx.iter_mut().for_each(|v| *v -= 0.5);
        dw.iter_mut().for_each(|v| *v -= 0.25);

        let (xv, wv) = (var(&x, &[n, d]), var(&w, &[d]));
        let ms = xv.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let inv = (ms + 1e-5).unwrap().sqrt().unwrap().recip().unwrap();
        let yr = xv.broadcast_mul(&inv).unwrap().broadcast_mul(&wv).unwrap();
        close("rms_norm forward", &y, &yr);
        let g = weighted_sum(&yr, &r).backward().unwrap();
        close("rms_norm dx", &dx, g.get(&xv).unwrap());
        close("rms_norm dw", &dw, g.get(&wv).unwrap());
        finite_difference("rms_norm dx", &x, &dx, &r, |x| run(x).0);
    }

    #[test]
    fn rope_gradients() {
        let (batch, t, heads, hd, extra) = (2, 13, 3, 10, 7);
        let width = heads * hd + extra; // columns past the rotated heads stay untouched
        let half = hd / 2;
        let angles: Vec<f32> = (0..t * half)
            .map(|i| (i / half) as f32 * (1e-2f32).powf((i % half) as f32 / half as f32))
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let spec = RopeSpec {
            width,
            heads,
            head_dim: hd,
            positions: t,
            cos: &cos,
            sin: &sin,
            starts: None,
        };
        let x = random(batch * t * width, 4, 1.0);
        let r = random(batch * t * width, 5, 1.0);
        let run = |x: &[f32]| {
            let mut y = x.to_vec();
            rope(&mut y, spec, false);
            y
        };
        let y = run(&x);
        let mut dx = r.clone();
        rope(&mut dx, spec, true);

        // Reference: (batch, t, width) -> the rotated heads by halves, the rest as is.
        let xv = var(&x, &[batch, t, width]);
        let heads_part = xv
            .narrow(2, 0, heads * hd)
            .unwrap()
            .reshape((batch, t, heads, hd))
            .unwrap();
        let (x1, x2) = (
            heads_part.narrow(3, 0, half).unwrap(),
            heads_part.narrow(3, half, half).unwrap(),
        );
        let c = Tensor::from_slice(&cos, (1, t, 1, half), &Device::Cpu).unwrap();
        let s = Tensor::from_slice(&sin, (1, t, 1, half), &Device::Cpu).unwrap();
        let y1 = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
        let y2 = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
        let rotated = Tensor::cat(&[y1, y2], 3)
            .unwrap()
            .reshape((batch, t, heads * hd))
            .unwrap();
        let yr = Tensor::cat(&[rotated, xv.narrow(2, heads * hd, extra).unwrap()], 2).unwrap();
        close("rope forward", &y, &yr);
        let g = weighted_sum(&yr, &r).backward().unwrap();
        close("rope dx", &dx, g.get(&xv).unwrap());
        finite_difference("rope dx", &x, &dx, &r, run);
    }

    #[test]
    fn swiglu_gradients() {
        let (n, f) = (29, 51);
        let gu = random(n * 2 * f, 6, 2.0);
        let r = random(n * f, 7, 1.0);
        let run = |gu: &[f32]| {
            let (mut a, mut sig) = (vec![0f32; n * f], vec![0f32; n * f]);
            swiglu(&mut a, &mut sig, gu, f);
            (a, sig)
        };
        let (a, sig) = run(&gu);
        let mut dgu = vec![0f32; n * 2 * f];
        swiglu_bwd(&mut dgu, &r, &gu, &sig, f);

        let guv = var(&gu, &[n, 2 * f]);
        let (g, u) = (guv.narrow(1, 0, f).unwrap(), guv.narrow(1, f, f).unwrap());
        let sigmoid = (g.neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .recip()
            .unwrap();
        let ar = ((g * sigmoid).unwrap() * u).unwrap();
        close("swiglu forward", &a, &ar);
        let grads = weighted_sum(&ar, &r).backward().unwrap();
        close("swiglu dgu", &dgu, grads.get(&guv).unwrap());
        finite_difference("swiglu dgu", &gu, &dgu, &r, |x| run(x).0);
    }

    #[test]
    fn bias_forward_and_gradient() {
        let (n, w) = (37, 70);
        let b = random(w, 11, 1.0);
        let y0 = random(n * w, 12, 1.0);
        let mut y = y0.clone();
        add_bias(&mut y, &b);
        for (i, (got, start)) in y.iter().zip(&y0).enumerate() {
            assert_eq!(*got, start + b[i % w]);
        }
        // Added into what db held, in row order per column: exactly the sequential sums.
        let mut db = vec![0.5f32; w];
        bias_bwd(&mut db, &y0);
        for (c, got) in db.iter().enumerate() {
            let want = (0..n).fold(0.5f32, |s, r| s + y0[r * w + c]);
            assert_eq!(got.to_bits(), want.to_bits(), "column {c}");
        }
    }

    #[test]
    fn embedding_gradients() {
        let (vocab, d, n) = (23, 19, 61);
        let table = random(vocab * d, 8, 1.0);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let tokens: Vec<u32> = (0..n)
            .map(|_| (rng.random::<u64>() % vocab as u64) as u32)
            .collect();
        let r = random(n * d, 10, 1.0);
        let mut x = vec![0f32; n * d];
        embed(&mut x, &table, &tokens, d);
        let mut dt = vec![0f32; vocab * d];
        embed_bwd(&mut dt, &r, &tokens, d);

        let tv = var(&table, &[vocab, d]);
        let ids = Tensor::from_slice(&tokens, n, &Device::Cpu).unwrap();
        let xr = tv.index_select(&ids, 0).unwrap();
        close("embedding forward", &x, &xr);
        let g = weighted_sum(&xr, &r).backward().unwrap();
        close("embedding dtable", &dt, g.get(&tv).unwrap());
    }

    /// Grouped kv heads, a head_dim that is not a multiple of 8, and more positions than one
    /// query tile, ending inside a tile.
    #[test]
    fn attention_gradients() {
        let s = AttnShape {
            batch: 2,
            positions: QUERY_TILE + 21,
            heads: 4,
            kv_heads: 2,
            head_dim: 6,
        };
        let (t, hd, w, ow) = (s.positions, s.head_dim, s.qkv_width(), s.out_width());
        let n = s.batch * t;
        let qkv = random(n * w, 11, 1.0);
        let r = random(n * ow, 12, 1.0);
        let run = |qkv: &[f32]| {
            let (mut out, mut lse) = (vec![0f32; n * ow], vec![0f32; n * s.heads]);
            attention(&mut out, &mut lse, qkv, s, None);
            (out, lse)
        };
        let (out, lse) = run(&qkv);
        let mut dqkv = vec![f32::NAN; n * w];
        attention_bwd(&mut dqkv, &r, &out, &lse, &qkv, s, None);

        // Reference: (batch, heads, t, hd) per part, explicit scores with a -inf mask.
        let qv = var(&qkv, &[s.batch, t, w]);
        let part = |col: usize, h: usize| {
            qv.narrow(2, col, h * hd)
                .unwrap()
                .reshape((s.batch, t, h, hd))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q = part(0, s.heads);
        let rep = s.heads / s.kv_heads;
        let expand = |x: Tensor| {
            // kv head g serves query heads g * rep .. (g + 1) * rep
            let x = x.unsqueeze(2).unwrap();
            let x = Tensor::cat(&vec![x; rep], 2).unwrap();
            x.reshape((s.batch, s.heads, t, hd)).unwrap()
        };
        let k = expand(part(s.heads * hd, s.kv_heads));
        let v = expand(part((s.heads + s.kv_heads) * hd, s.kv_heads));
        let mask: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        let scores = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap()
            / (hd as f64).sqrt())
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
        let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let yr = p
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((s.batch, t, ow))
            .unwrap();
        close("attention forward", &out, &yr);
        let g = weighted_sum(&yr, &r).backward().unwrap();
        close("attention dqkv", &dqkv, g.get(&qv).unwrap());
        finite_difference("attention dqkv", &qkv, &dqkv, &r, |x| run(x).0);
    }

    /// Two sequences packed into one row (the first longer than a query tile) give, through
    /// RoPE and attention, forward and backward, what each gives in a row of its own: the
    /// second sees none of the first, and starts its positions at 0.
    #[test]
    fn packed_sequences_attend_only_within_themselves() {
        let (a, b) = (QUERY_TILE + 9, 23);
        let shape = |positions| AttnShape {
            batch: 1,
            positions,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let (hd, half) = (8, 4);
        let angles: Vec<f32> = (0..(a + b) * half)
            .map(|i| (i / half) as f32 * 0.1f32.powi((i % half) as i32))
            .collect();
        let cos: Vec<f32> = angles.iter().map(|x| x.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|x| x.sin()).collect();
        // RoPE, attention and its backward over one row of `t` positions.
        let run = |qkv: &[f32], dout: &[f32], t: usize, starts: Option<&[u32]>| {
            let s = shape(t);
            let (w, ow) = (s.qkv_width(), s.out_width());
            let rope_s = RopeSpec {
                width: w,
                heads: s.heads + s.kv_heads,
                head_dim: hd,
                positions: t,
                cos: &cos,
                sin: &sin,
                starts,
            };
            let mut x = qkv.to_vec();
            rope(&mut x, rope_s, false);
            let (mut out, mut lse) = (vec![0f32; t * ow], vec![0f32; t * s.heads]);
            attention(&mut out, &mut lse, &x, s, starts);
            let mut dx = vec![f32::NAN; t * w];
            attention_bwd(&mut dx, dout, &out, &lse, &x, s, starts);
            rope(&mut dx, rope_s, true);
            (out, dx)
        };
        let s = shape(a + b);
        let (w, ow) = (s.qkv_width(), s.out_width());
        let qkv = random((a + b) * w, 21, 1.0);
        let dout = random((a + b) * ow, 22, 1.0);
        let starts: Vec<u32> = (0..a + b)
            .map(|i| if i < a { 0 } else { a as u32 })
            .collect();
        let (out, dx) = run(&qkv, &dout, a + b, Some(&starts));
        let (out1, dx1) = run(&qkv[..a * w], &dout[..a * ow], a, None);
        let (out2, dx2) = run(&qkv[a * w..], &dout[a * ow..], b, None);
        let near = |name: &str, got: &[f32], want: &[f32]| {
            let err = got
                .iter()
                .zip(want)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            // The same sums, but over a tile that also holds the other sequence's (zero)
            // probabilities: only the products' blocking differs.
            assert!(err <= 1e-5, "{name}: max difference {err:e}");
        };
        near("first output", &out[..a * ow], &out1);
        near("second output", &out[a * ow..], &out2);
        near("first gradient", &dx[..a * w], &dx1);
        near("second gradient", &dx[a * w..], &dx2);
    }
}
