//! The Llama-family transformer: RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP,
//! for inference (quantized GGUF weights, KV cache) in llama.cpp's arithmetic
//! (slm_kernels::ggml_math), or, in a `dequantized` copy, candle's f32 ops. Over candle `Var`s
//! it is also the reference the fused trainer (slm-train) is tested against: a tensor tracked
//! for gradients goes through candle's composed ops, whose backward is candle's autograd.

use crate::attention::{self, LayerCache};
use std::sync::{Arc, Mutex};

use crate::weights::{Embedding, InputStats, Linear, Result, Tap, Weights};
use candle_core::{DType, Device, Tensor};
use slm_format::config::{Config, Head};
use slm_format::params::Role;
use slm_kernels::ggml_math::{exact_path, f32_slice};
use slm_kernels::packed::{self, Pack};

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
        let x = f32_slice(s1, l1, "rms norm")?;
        let w = f32_slice(s2, l2, "rms norm")?;
        let n = w.len();
        let width = l1.shape().dims().last().copied().unwrap_or(0);
        if n == 0 || width != n {
            candle_core::bail!("rms norm: input width {width}, weight of {n}")
        }
        let rows = (PART_VALUES / n).max(1);
        // SAFETY: x is contiguous with last dimension n, so the parts are whole rows, and
        // every value of each row is written.
        let y = unsafe {
            slm_kernels::pool::fill_chunks(x.len(), rows * n, |start, part| {
                let xs = &x[start..start + part.len()];
                for (xr, yr) in xs.chunks_exact(n).zip(part.chunks_exact_mut(n)) {
                    let sum: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
                    let mean = (sum / n as f64) as f32;
                    let scale = 1.0 / (mean + self.eps).sqrt();
                    for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                        o.write(v * scale * g);
                    }
                }
            })
        };
        Ok((candle_core::CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// Values per task when a prompt's norms and activations are split across the kernel pool
/// (a multiple of eight, so that each part runs the vector loop as the whole would).
const PART_VALUES: usize = 16 << 10;

/// `ggml`: round as llama.cpp does (see `Llama::dequantized` for when that is off).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f32, ggml: bool) -> candle_core::Result<Tensor> {
    if ggml && exact_path(&[x, w]) {
        x.contiguous()?
            .apply_op2_no_bwd(&w.contiguous()?, &GgmlRmsNorm { eps })
    } else if x.track_op() || w.track_op() {
        candle_nn::ops::rms_norm_slow(x, w, eps)
    } else if x.dtype() == DType::F32 {
        candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)
    } else {
        candle_nn::ops::rms_norm_slow(x, w, eps)
    }
}

/// `silu(g) * u` with ggml's vectorised expf (see ggml_math): SiLU feeds an 8-bit
/// quantization just like RMSNorm does.
struct GgmlSwiglu;

impl candle_core::CustomOp2 for GgmlSwiglu {
    fn name(&self) -> &'static str {
        "ggml-swiglu"
    }
    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        zip_on_pool(
            "swiglu",
            s1,
            l1,
            s2,
            l2,
            slm_kernels::ggml_math::swiglu_slice,
        )
    }
}

/// An elementwise op of two f32 tensors of one shape, split across the kernel pool:
/// `f(a, b, out)` fills `out` from the same stretch of both inputs, writing every value.
fn zip_on_pool(
    op: &str,
    s1: &candle_core::CpuStorage,
    l1: &candle_core::Layout,
    s2: &candle_core::CpuStorage,
    l2: &candle_core::Layout,
    f: impl Fn(&[f32], &[f32], &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
    let a = f32_slice(s1, l1, op)?;
    let b = f32_slice(s2, l2, op)?;
    if l1.shape() != l2.shape() {
        candle_core::bail!("{op} shapes differ: {:?} vs {:?}", l1.shape(), l2.shape())
    }
    // SAFETY: `f` writes every value of its part (its contract above).
    let y = unsafe {
        slm_kernels::pool::fill_chunks(a.len(), PART_VALUES, |start, part| {
            let end = start + part.len();
            f(&a[start..end], &b[start..end], part)
        })
    };
    Ok((candle_core::CpuStorage::F32(y), l1.shape().clone()))
}

fn swiglu(g: &Tensor, u: &Tensor, ggml: bool) -> candle_core::Result<Tensor> {
    if ggml && exact_path(&[g, u]) {
        g.contiguous()?
            .apply_op2_no_bwd(&u.contiguous()?, &GgmlSwiglu)
    } else {
        candle_nn::ops::silu(g)? * u
    }
}

/// `x + a` on the kernel pool. candle's own add of a prompt-sized tensor runs on candle's
/// thread pool, whose worker then spins on a core the kernel pool's worker wants
/// (2% of an F16 prompt's samples on 2 threads). The sum is the same either way.
struct PoolAdd;

impl candle_core::CustomOp2 for PoolAdd {
    fn name(&self) -> &'static str {
        "pool-add"
    }
    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        zip_on_pool("residual add", s1, l1, s2, l2, |x, a, out| {
            for ((o, &u), &v) in out.iter_mut().zip(x).zip(a) {
                o.write(u + v);
            }
        })
    }
}

/// The residual stream plus a block's output.
fn residual(x: &Tensor, a: &Tensor) -> candle_core::Result<Tensor> {
    if exact_path(&[x, a]) && x.shape() == a.shape() {
        x.contiguous()?.apply_op2_no_bwd(&a.contiguous()?, &PoolAdd)
    } else {
        x + a
    }
}

/// `f` of the values of `x`, a contiguous f32 CPU tensor, without copying them.
fn with_f32<R>(x: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (s, l) = x.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("{op} expects a CPU tensor")
    };
    Ok(f(f32_slice(s, l, op)?))
}

/// Rotation of (batch, heads, seq, head_dim) by per-position cos/sin tables, rounded as
/// ggml's `rotate_pairs` compiles (GCC contracts `x0*cos - x1*sin` into one fused
/// multiply-add). Pairs are adjacent (GGUF llama) or half a head apart (NeoX / HF layout).
struct GgmlRope {
    interleaved: bool,
}

impl candle_core::CustomOp3 for GgmlRope {
    fn name(&self) -> &'static str {
        "ggml-rope"
    }
    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = f32_slice(s1, l1, "rope")?;
        let c = f32_slice(s2, l2, "rope")?;
        let s = f32_slice(s3, l3, "rope")?;
        let dims = l1.shape().dims();
        let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if c.len() != t * d / 2 || s.len() != c.len() {
            candle_core::bail!(
                "rope tables hold {} values, {t} positions need {}",
                c.len(),
                t * d / 2
            )
        }
        let y = slm_kernels::ggml_math::Rope {
            cos: c,
            sin: s,
            positions: t,
            per: 1,
            d,
            interleaved: self.interleaved,
        }
        .apply(x);
        Ok((candle_core::CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// Rotary position embedding tables, computed for the positions a model has reached so far
/// and extended (doubling) when a longer sequence arrives: a model whose context is a million
/// positions costs nothing until it is used that far.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Per-pair divisors of the angle (GGUF's rope_freqs, llama3 scaling, or ones).
    factors: Vec<f32>,
    theta_scale: f32,
    max_positions: usize,
    device: Device,
    interleaved: bool,
    /// cos and sin, (positions, head_dim / 2) each; shared by clones, which compute the same.
    tables: std::sync::Arc<std::sync::RwLock<(Tensor, Tensor)>>,
}

impl Rope {
    pub fn new(
        cfg: &Config,
        freq_factors: Option<&[f32]>,
        interleaved: bool,
        device: &Device,
    ) -> Result<Self> {
        let d = cfg.head_dim;
        // Per-pair divisors of the angle: GGUF's rope_freqs, or the llama3 scaling rule turned
        // into the same factors (as llama.cpp's converter does), or none.
        let factors: Vec<f32> = match (freq_factors, &cfg.rope_scaling) {
            (Some(f), _) => f.to_vec(),
            (None, Some(s)) => {
                let low_wavelen = s.original_max_position_embeddings as f64 / s.low_freq_factor;
                let high_wavelen = s.original_max_position_embeddings as f64 / s.high_freq_factor;
                (0..d / 2)
                    .map(|i| {
                        let inv = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64);
                        let wavelen = 2.0 * std::f64::consts::PI / inv;
                        if wavelen < high_wavelen {
                            1.0
                        } else if wavelen > low_wavelen {
                            s.factor as f32
                        } else {
                            let smooth = (s.original_max_position_embeddings as f64 / wavelen
                                - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 / ((1.0 - smooth) / s.factor + smooth)) as f32
                        }
                    })
                    .collect()
            }
            (None, None) => vec![1.0; d / 2],
        };
        if factors.len() != d / 2 || factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
            return Err(crate::weights::WeightError::Tensor {
                source_name: "model".into(),
                tensor: "rope_freqs.weight".into(),
                what: format!(
                    "{} factors, head_dim {d} needs {} finite positive ones",
                    factors.len(),
                    d / 2
                ),
            });
        }
        let empty = Tensor::zeros((0, d / 2), DType::F32, device)?;
        Ok(Self {
            factors,
            // The angles in f32 exactly as ggml computes them: theta_scale = base^(-2/d) and
            // theta_i = theta_{i-1} * theta_scale starting from the position, so they round
            // alike.
            theta_scale: (cfg.rope_theta as f32).powf(-2.0 / d as f32),
            max_positions: cfg.max_position_embeddings,
            device: device.clone(),
            interleaved,
            tables: std::sync::Arc::new(std::sync::RwLock::new((empty.clone(), empty))),
        })
    }

    /// cos and sin of the angles of positions 0..n, (n, head_dim / 2) each, in f32.
    pub fn tables(&self, n: usize) -> candle_core::Result<(Tensor, Tensor)> {
        self.span(0, n)
    }

    /// The tables' rows for positions pos..pos+t.
    fn span(&self, pos: usize, t: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let n = pos + t;
        if n > self.max_positions {
            candle_core::bail!(
                "position {} is past the model's context length {}",
                n - 1,
                self.max_positions
            );
        }
        {
            let g = self.tables.read().unwrap_or_else(|e| e.into_inner());
            if g.0.dim(0)? >= n {
                return Ok((g.0.narrow(0, pos, t)?, g.1.narrow(0, pos, t)?));
            }
        }
        let mut g = self.tables.write().unwrap_or_else(|e| e.into_inner());
        let have = g.0.dim(0)?;
        if have < n {
            let len = n.max(2 * have).max(256).min(self.max_positions);
            let half = self.factors.len();
            let mut cos = Vec::with_capacity(len * half);
            let mut sin = Vec::with_capacity(len * half);
            for p in 0..len {
                let mut theta = p as f32;
                for &ff in &self.factors {
                    let a = theta / ff;
                    cos.push(a.cos());
                    sin.push(a.sin());
                    theta *= self.theta_scale;
                }
            }
            *g = (
                Tensor::from_vec(cos, (len, half), &self.device)?,
                Tensor::from_vec(sin, (len, half), &self.device)?,
            );
        }
        Ok((g.0.narrow(0, pos, t)?, g.1.narrow(0, pos, t)?))
    }

    /// x: (batch, heads, seq, head_dim) at positions pos..pos+seq.
    fn apply(&self, x: &Tensor, pos: usize, ggml: bool) -> candle_core::Result<Tensor> {
        let (cos, sin) = self.span(pos, x.dim(2)?)?;
        self.rotate(x, cos, sin, ggml)
    }

    /// x: (1, seq, heads * head_dim) at positions pos..pos+seq, with the ggml-exact rotation
    /// on the kernel pool; the rotated values in the same layout.
    fn rotate_rows(&self, x: &Tensor, pos: usize, heads: usize) -> candle_core::Result<Vec<f32>> {
        self.rotate_rows_by(x, &self.span(pos, x.dim(1)?)?, heads)
    }

    /// As `rotate_rows`, each row by its own row of `tables` (seq, head_dim / 2).
    fn rotate_rows_by(
        &self,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        heads: usize,
    ) -> candle_core::Result<Vec<f32>> {
        let (_, t, width) = x.dims3()?;
        let d = width / heads.max(1);
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        with_f32(x, "rope", |x| {
            with_f32(&cos, "rope", |c| {
                with_f32(&sin, "rope", |s| {
                    slm_kernels::ggml_math::Rope {
                        cos: c,
                        sin: s,
                        positions: t,
                        per: heads,
                        d,
                        interleaved: self.interleaved,
                    }
                    .apply(x)
                })
            })
        })??
    }

    /// cos and sin for rows at `positions` (a packed forward's), (rows, head_dim / 2) each:
    /// the same for every layer, so a forward takes them once.
    fn at_rows(&self, positions: &[u32]) -> candle_core::Result<(Tensor, Tensor)> {
        let reach = positions.iter().max().map_or(0, |&p| p as usize + 1);
        let (cos, sin) = self.tables(reach)?;
        let idx = Tensor::new(positions, &self.device)?;
        Ok((cos.index_select(&idx, 0)?, sin.index_select(&idx, 0)?))
    }

    /// x: (batch, heads, seq, head_dim), each row rotated by its row of `rows` (`at_rows`).
    fn apply_at(
        &self,
        x: &Tensor,
        rows: &(Tensor, Tensor),
        ggml: bool,
    ) -> candle_core::Result<Tensor> {
        self.rotate(x, rows.0.clone(), rows.1.clone(), ggml)
    }

    /// x rotated by per-row tables cos, sin: (seq, head_dim / 2).
    fn rotate(
        &self,
        x: &Tensor,
        cos: Tensor,
        sin: Tensor,
        ggml: bool,
    ) -> candle_core::Result<Tensor> {
        // Tables are f32; training may run in another float type (f64 for gradient checks).
        let cos = cos.to_dtype(x.dtype())?;
        let sin = sin.to_dtype(x.dtype())?;
        if ggml && exact_path(&[x]) {
            return x.contiguous()?.apply_op3_no_bwd(
                &cos.contiguous()?,
                &sin.contiguous()?,
                &GgmlRope {
                    interleaved: self.interleaved,
                },
            );
        }
        // candle's fused rope kernels have no backward; the composed ones do.
        match (self.interleaved, x.track_op()) {
            (true, true) => candle_nn::rotary_emb::rope_i_slow(x, &cos, &sin),
            (false, true) => candle_nn::rotary_emb::rope_slow(x, &cos, &sin),
            (true, false) => candle_nn::rotary_emb::rope_i(x, &cos, &sin),
            (false, false) => candle_nn::rotary_emb::rope(x, &cos, &sin),
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
    /// q, k and v of x (batch, seq, hidden) as (batch, heads, seq, head_dim), q and k
    /// rotated by `rotate`.
    fn qkv(
        &self,
        x: &Tensor,
        rotate: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let hd = self.head_dim;
        let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous();
        let [q, k, v] = Linear::forward_group([&self.q, &self.k, &self.v], x)?;
        let q = rotate(&heads(q, self.n_heads)?)?;
        let k = rotate(&heads(k, self.n_kv_heads)?)?;
        Ok((q, k, heads(v, self.n_kv_heads)?))
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: usize,
        mut cache: Option<&mut LayerCache>,
        ggml: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        if let Some(cache) = cache.as_deref_mut() {
            if b != 1 {
                candle_core::bail!("a KV cache holds one sequence; got a batch of {b}");
            }
            if ggml && exact_path(&[x]) {
                return self.forward_cached(x, rope, pos, cache);
            }
        }
        let (q, k, v) = self.qkv(x, |y| rope.apply(y, pos, ggml))?;
        if let Some(cache) = cache {
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
        let att = q.matmul(&k.t()?)?;
        let att = masked_softmax(att, scale, b, nkv, rep, t)?;
        let y = att.matmul(&v)?;
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        self.o.forward(&y)
    }

    /// Inference over a KV cache with the ggml-exact ops, without the (batch, heads, seq,
    /// head_dim) layout: q, k and v stay as the matmuls wrote them, (seq, heads, head_dim),
    /// which is what the cache and `attend` take. The two transposes there and back were
    /// serial copies on the calling thread (~2% of a 512-token prompt on 2 threads).
    fn forward_cached(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: usize,
        cache: &mut LayerCache,
    ) -> candle_core::Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let [q, k, v] = Linear::forward_group([&self.q, &self.k, &self.v], x)?;
        let q = rope.rotate_rows(&q, pos, nh)?;
        let k = rope.rotate_rows(&k, pos, nkv)?;
        let y = with_f32(&v, "attention", |v| {
            attention::attend(cache, &q, &k, v, t, nh, nkv, hd, x.device())
        })??;
        self.o.forward(&y.unsqueeze(0)?)
    }

    /// Several sequences' new tokens in one pass: x (1, rows, hidden) holds `spans[i].0` rows
    /// for the sequence whose layer cache is `spans[i].1`, in order; `angles` are the rows'
    /// rotations (`Rope::at_rows` of their positions). The projections run once over all rows;
    /// attention runs per sequence against its own cache, exactly as `forward_cached` would
    /// for that sequence alone.
    fn forward_spans(
        &self,
        x: &Tensor,
        rope: &Rope,
        angles: &(Tensor, Tensor),
        spans: &mut [(usize, &mut LayerCache)],
    ) -> candle_core::Result<Tensor> {
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let [q, k, v] = Linear::forward_group([&self.q, &self.k, &self.v], x)?;
        let q = rope.rotate_rows_by(&q, angles, nh)?;
        let k = rope.rotate_rows_by(&k, angles, nkv)?;
        let (qw, kw) = (nh * hd, nkv * hd);
        let mut out = Vec::with_capacity(q.len());
        with_f32(&v, "attention", |v| -> candle_core::Result<()> {
            let mut row = 0;
            for (t, cache) in spans.iter_mut() {
                let t = *t;
                let y = attention::attend(
                    cache,
                    &q[row * qw..(row + t) * qw],
                    &k[row * kw..(row + t) * kw],
                    &v[row * kw..(row + t) * kw],
                    t,
                    nh,
                    nkv,
                    hd,
                    x.device(),
                )?;
                out.extend(y.flatten_all()?.to_vec1::<f32>()?);
                row += t;
            }
            Ok(())
        })??;
        let rows = out.len() / qw;
        self.o
            .forward(&Tensor::from_vec(out, (1, rows, qw), x.device())?)
    }

    /// x: (1, rows, hidden) of a pack; see `packed`.
    fn forward_packed(
        &self,
        x: &Tensor,
        rope: &Rope,
        pack: &Pack,
        rows: &(Tensor, Tensor),
        ggml: bool,
    ) -> candle_core::Result<Tensor> {
        let t = x.dim(1)?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (q, k, v) = self.qkv(x, |y| rope.apply_at(y, rows, ggml))?;
        let flat = |y: Tensor| -> candle_core::Result<Vec<f32>> {
            y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
        };
        let y = packed::attend(pack, &flat(q)?, &flat(k)?, &flat(v)?, nh, nkv, hd);
        let y = Tensor::from_vec(y, (1, t, nh * hd), x.device())?.to_dtype(x.dtype())?;
        self.o.forward(&y)
    }
}

/// softmax(scale * att + causal mask) for scores laid out (b, nkv, rep * t, t).
fn masked_softmax(
    att: Tensor,
    scale: f64,
    b: usize,
    nkv: usize,
    rep: usize,
    t: usize,
) -> candle_core::Result<Tensor> {
    let mut att = (att * scale)?;
    if t > 1 {
        let mask = causal_mask(t, t, att.device())?.to_dtype(att.dtype())?;
        att = att
            .reshape((b, nkv, rep, t, t))?
            .broadcast_add(&mask)?
            .reshape((b, nkv, rep * t, t))?;
    }
    if att.track_op() {
        // The fused softmax has no backward; the composed one does.
        candle_nn::ops::softmax(&att, candle_core::D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&att)
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
    fn forward(&self, x: &Tensor, ggml: bool) -> candle_core::Result<Tensor> {
        let [g, u] = Linear::forward_group([&self.gate, &self.up], x)?;
        let s = swiglu(&g, &u, ggml)?;
        self.down.forward(&s)
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
    /// Bytes one position takes over all layers (keys and values in f16).
    pub fn bytes_per_position(cfg: &Config) -> usize {
        cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 2
    }
    /// A new cache holding this one's first `n` positions (a shared prompt prefix), with room
    /// reserved for `capacity` positions so that growing to it never reallocates.
    pub fn prefix(&self, n: usize, capacity: usize) -> Cache {
        let row = self.row;
        Cache {
            layers: self
                .layers
                .iter()
                .map(|l| l.prefix(n.min(l.len()), capacity.max(n), row))
                .collect(),
            row,
        }
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
    /// Inference rounds as llama.cpp does (norms, SiLU and RoPE in ggml's order): on by
    /// default, off in a `dequantized` copy.
    ggml: bool,
}

impl Llama {
    pub fn load(config: &Config, w: &Weights, device: &Device) -> Result<Self> {
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        // Names from the one parameter description (slm_format::params); a linear layer is
        // asked for by its weight's name without ".weight".
        let name = |role: Role, layer: Option<usize>| role.hf_name(layer);
        let prefix = |role: Role, layer: usize| {
            let n = name(role, Some(layer));
            n.strip_suffix(".weight").map(str::to_string).unwrap_or(n)
        };
        let embed = w.embedding(&name(Role::Embedding, None), c.vocab_size, h)?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let qdim = c.num_attention_heads * hd;
            let kvdim = c.num_key_value_heads * hd;
            let bias = c.attention_bias;
            let f = c.intermediate_size;
            blocks.push(Block {
                attn_norm: w.tensor(&name(Role::AttnNorm, Some(i)), &[h])?,
                attn: Attention {
                    q: w.linear(&prefix(Role::Q, i), qdim, h, bias)?,
                    k: w.linear(&prefix(Role::K, i), kvdim, h, bias)?,
                    v: w.linear(&prefix(Role::V, i), kvdim, h, bias)?,
                    o: w.linear(&prefix(Role::O, i), h, qdim, false)?,
                    n_heads: c.num_attention_heads,
                    n_kv_heads: c.num_key_value_heads,
                    head_dim: hd,
                },
                mlp_norm: w.tensor(&name(Role::MlpNorm, Some(i)), &[h])?,
                mlp: Mlp {
                    gate: w.linear(&prefix(Role::Gate, i), f, h, false)?,
                    up: w.linear(&prefix(Role::Up, i), f, h, false)?,
                    down: w.linear(&prefix(Role::Down, i), h, f, false)?,
                },
            });
        }
        let norm = w.tensor(&name(Role::FinalNorm, None), &[h])?;
        // Some checkpoints say tie_word_embeddings=false yet ship no lm_head; tying is the only
        // sensible reading of that.
        let head = name(Role::Head, None);
        let score = name(Role::Score, None);
        let score = score.trim_end_matches(".weight");
        let lm_head = match &c.head {
            Head::Lm if c.tie_word_embeddings || !w.contains(&head) => embed.as_linear()?,
            Head::Lm => w.linear(head.trim_end_matches(".weight"), c.vocab_size, h, false)?,
            Head::Sequence { labels, .. } => w.linear(score, labels.len(), h, false)?,
            Head::Token { labels, .. } => w.linear(score, labels.len(), h, true)?,
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
            ggml: true,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn new_cache(&self) -> Cache {
        Cache::new(&self.config)
    }

    /// Runs `ids` (batch, seq) through the model after what `cache` holds (positions continue
    /// from there). Returns logits (batch, seq, vocab), or (batch, 1, vocab) with `last_only`;
    /// a classifier's (`Config::head`) are per label rather than per token.
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        last_only: bool,
    ) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let mut x = self.stream(ids, cache)?;
        if last_only {
            x = x.narrow(1, t - 1, 1)?;
        }
        self.logits(&x)
    }

    /// Final-norm hidden states (batch, seq, hidden) of `ids` from position 0: the logits
    /// before the output projection, for a loss that applies the projection itself (see
    /// `head_weight`).
    pub fn hidden(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.final_norm(&self.stream(ids, None)?)
    }

    /// The residual stream after every block for `ids` (batch, seq), after what `cache`
    /// holds; a sequence past the model's context is refused.
    fn stream(&self, ids: &Tensor, cache: Option<&mut Cache>) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let pos = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if pos + t > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's context length {}",
                pos + t,
                self.config.max_position_embeddings
            );
        }
        let x = self.embed.forward(ids)?;
        let mut cache = cache;
        self.blocks(x, |i, attn, h| {
            let kv = cache.as_mut().map(|c| &mut c.layers[i]);
            attn.forward(h, &self.rope, pos, kv, self.ggml)
        })
    }

    fn final_norm(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        rms_norm(x, &self.norm, self.config.rms_norm_eps as f32, self.ggml)
    }

    /// The output projection's weight (vocab, hidden) where it is a plain dense matrix without
    /// bias (a trained or f32 model; not a quantized one).
    pub fn head_weight(&self) -> Option<&Tensor> {
        match &self.lm_head {
            Linear::Dense { w, b: None } => Some(w),
            _ => None,
        }
    }

    /// The residual stream through every block; `attend` does a block's attention.
    fn blocks(
        &self,
        mut x: Tensor,
        mut attend: impl FnMut(usize, &Attention, &Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let eps = self.config.rms_norm_eps as f32;
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &blk.attn_norm, eps, self.ggml)?;
            let a = attend(i, &blk.attn, &h)?;
            x = residual(&x, &a)?;
            let h = rms_norm(&x, &blk.mlp_norm, eps, self.ggml)?;
            let m = blk.mlp.forward(&h, self.ggml)?;
            x = residual(&x, &m)?;
        }
        Ok(x)
    }

    /// Final norm and output projection.
    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.project(&self.final_norm(x)?)
    }

    /// The output projection of final-norm hidden states (`hidden`'s rows): logits, in f32
    /// (f64 in f64 runs), by the model's own kernels (a quantized head's included).
    pub fn project(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let logits = self.lm_head.forward(x)?;
        // f32 for callers, except in f64 runs (gradient checks) where precision is the point.
        match logits.dtype() {
            DType::F64 | DType::F32 => Ok(logits),
            _ => logits.to_dtype(DType::F32),
        }
    }

    /// `f` of `project`'s logits of `x` as (values, vocabulary size), borrowed from the tensor
    /// rather than copied out: a chunk of rows' logits is megabytes.
    pub fn project_with<R>(
        &self,
        x: &Tensor,
        f: impl FnOnce(&[f32], usize) -> R,
    ) -> candle_core::Result<R> {
        let logits = self.project(x)?;
        let vocab = logits.dim(candle_core::D::Minus1)?;
        if logits.dtype() == DType::F32 && logits.device().is_cpu() && logits.is_contiguous() {
            return with_f32(&logits, "logits", |v| f(v, vocab));
        }
        let v: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(f(&v, vocab))
    }

    /// A packed forward (see `packed`): `ids` holds one token per row of `pack`. Returns the
    /// logits of the rows in `rows` only, (rows.len(), vocab): the output projection is a
    /// large share of a small model's work and most rows' predictions are not needed.
    pub fn forward_packed(
        &self,
        ids: &[u32],
        pack: &Pack,
        rows: &[u32],
    ) -> candle_core::Result<Tensor> {
        self.project(&self.hidden_packed(ids, pack, rows)?)
    }

    /// `forward_packed` before the output projection: the final-norm hidden states of the
    /// rows in `rows`, (rows.len(), hidden), for callers that project a few rows at a time
    /// (`project`) instead of holding rows x vocabulary logits at once.
    pub fn hidden_packed(
        &self,
        ids: &[u32],
        pack: &Pack,
        rows: &[u32],
    ) -> candle_core::Result<Tensor> {
        if ids.len() != pack.len() {
            candle_core::bail!("{} token ids for a pack of {} rows", ids.len(), pack.len());
        }
        let max = self.config.max_position_embeddings;
        if let Some(&p) = pack.positions().iter().find(|&&p| p as usize >= max) {
            candle_core::bail!("position {p} exceeds the model's context length {max}");
        }
        let angles = self.rope.at_rows(pack.positions())?;
        let x = self
            .embed
            .forward(&Tensor::new(ids, &self.device)?.unsqueeze(0)?)?;
        let x = self.blocks(x, |_, attn, h| {
            attn.forward_packed(h, &self.rope, pack, &angles, self.ggml)
        })?;
        let x = x
            .squeeze(0)?
            .index_select(&Tensor::new(rows, &self.device)?, 0)?;
        self.final_norm(&x)
    }

    /// The same model with every weight matrix as dense f32 (see `Linear::dequantized`) and
    /// candle's vectorised norm, SiLU and RoPE kernels. Matching llama.cpp bit for bit only
    /// makes sense while activations are rounded to 8 bits as its kernels round them; here
    /// they are not, and ggml's scalar replicas would be a quarter of the time.
    pub fn dequantized(&self) -> candle_core::Result<Llama> {
        let mut m = self.clone();
        m.ggml = false;
        for blk in &mut m.blocks {
            for l in [
                &mut blk.attn.q,
                &mut blk.attn.k,
                &mut blk.attn.v,
                &mut blk.attn.o,
                &mut blk.mlp.gate,
                &mut blk.mlp.up,
                &mut blk.mlp.down,
            ] {
                *l = l.dequantized()?;
            }
        }
        m.lm_head = m.lm_head.dequantized()?;
        Ok(m)
    }

    /// The same model with the input of every block's projection recorded as it runs (for an
    /// importance matrix): the statistics of each, under its weight's GGUF name
    /// (`blk.N.attn_q.weight`, ...), in layer order.
    pub fn observed(&self) -> (Llama, Vec<(String, Tap)>) {
        let mut m = self.clone();
        let mut taps = Vec::new();
        for (i, blk) in m.blocks.iter_mut().enumerate() {
            for (role, l) in [
                (Role::Q, &mut blk.attn.q),
                (Role::K, &mut blk.attn.k),
                (Role::V, &mut blk.attn.v),
                (Role::O, &mut blk.attn.o),
                (Role::Gate, &mut blk.mlp.gate),
                (Role::Up, &mut blk.mlp.up),
                (Role::Down, &mut blk.mlp.down),
            ] {
                let stats = Arc::new(Mutex::new(InputStats::default()));
                *l = l.observed(stats.clone());
                taps.push((role.gguf_name(Some(i)), stats));
            }
        }
        (m, taps)
    }

    /// Continues several sequences at once: `spans[i]` appends its tokens (one while
    /// decoding, a prompt's chunk while prefilling) to its own cache. Every projection runs
    /// once over all the rows, so a decode step for many sequences reads each weight once;
    /// each sequence's logits equal, bit for bit, those of `next_logits` on it alone (the
    /// block kernels compute each activation row independently). Returns each span's last
    /// logits, in order.
    pub fn next_logits_batch(
        &self,
        spans: &mut [(&[u32], &mut Cache)],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let max = self.config.max_position_embeddings;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for (tokens, cache) in spans.iter() {
            if tokens.is_empty() {
                candle_core::bail!("a sequence in a batch has no new tokens");
            }
            let pos = cache.len();
            if pos + tokens.len() > max {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the model's context length {max}",
                    pos + tokens.len()
                );
            }
            ids.extend_from_slice(tokens);
            positions.extend((pos..pos + tokens.len()).map(|p| p as u32));
        }
        if spans.is_empty() {
            return Ok(Vec::new());
        }
        let x = self
            .embed
            .forward(&Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?)?;
        if !(self.ggml && exact_path(&[&x])) {
            // Other float types and devices run each sequence alone, through the same forward
            // a single sequence takes.
            return spans
                .iter_mut()
                .map(|(tokens, cache)| self.next_logits(tokens, cache))
                .collect();
        }
        let angles = self.rope.at_rows(&positions)?;
        let x = self.blocks(x, |i, attn, h| {
            let mut layer: Vec<(usize, &mut LayerCache)> = spans
                .iter_mut()
                .map(|(tokens, cache)| (tokens.len(), &mut cache.layers[i]))
                .collect();
            attn.forward_spans(h, &self.rope, &angles, &mut layer)
        })?;
        let mut last = Vec::with_capacity(spans.len());
        let mut row = 0u32;
        for (tokens, _) in spans.iter() {
            row += tokens.len() as u32;
            last.push(row - 1);
        }
        let x = x
            .squeeze(0)?
            .index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?
            .unsqueeze(0)?;
        let logits = self.logits(&x)?.squeeze(0)?;
        (0..spans.len()).map(|i| logits.get(i)?.to_vec1()).collect()
    }

    /// Logits of the last position for a token sequence appended to `cache`.
    pub fn next_logits(&self, tokens: &[u32], cache: &mut Cache) -> candle_core::Result<Vec<f32>> {
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        self.forward(&ids, Some(cache), true)?
            .flatten_all()?
            .to_vec1()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_tables_grow_with_use_and_keep_their_values() {
        let mut cfg = Config::from_hf_json(
            r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10}"#,
            "c",
        )
        .unwrap();
        cfg.max_position_embeddings = crate::limits::MAX_CONTEXT;
        let rope = Rope::new(&cfg, None, false, &Device::Cpu).unwrap();
        // Nothing is computed for a million positions until they are used.
        assert_eq!(rope.tables.read().unwrap().0.dim(0).unwrap(), 0);
        let (small, _) = rope.tables(10).unwrap();
        assert_eq!(rope.tables.read().unwrap().0.dim(0).unwrap(), 256);
        let (big, _) = rope.tables(1000).unwrap();
        assert_eq!(rope.tables.read().unwrap().0.dim(0).unwrap(), 1000);
        // Growing recomputes the same values (ggml's angle recurrence per position).
        let a: Vec<f32> = small.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = big
            .narrow(0, 0, 10)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        let e = rope
            .tables(crate::limits::MAX_CONTEXT + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("past the model's context length"), "{e}");
    }

    #[test]
    fn rms_norm_rejects_a_weight_of_another_width() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
        let w = Tensor::ones(3, DType::F32, &dev).unwrap();
        let err = rms_norm(&x, &w, 1e-5, true).unwrap_err().to_string();
        assert!(err.contains("input width 6, weight of 3"), "{err}");
    }

    #[test]
    fn elementwise_ops_on_the_pool_refuse_shapes_that_differ() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 6), DType::F32, &dev).unwrap();
        let y = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let err = x.apply_op2_no_bwd(&y, &PoolAdd).unwrap_err().to_string();
        assert!(err.contains("residual add shapes differ"), "{err}");
        let err = x.apply_op2_no_bwd(&y, &GgmlSwiglu).unwrap_err().to_string();
        assert!(err.contains("swiglu shapes differ"), "{err}");
    }

    #[test]
    fn residual_add_on_the_pool_equals_candles_add() {
        let dev = Device::Cpu;
        // Three parts of the pool's split, the last one short.
        let n = 2 * PART_VALUES + 123;
        let x = Tensor::randn(0f32, 1.0, (1, n), &dev).unwrap();
        let a = Tensor::randn(0f32, 1.0, (1, n), &dev).unwrap();
        let ours: Vec<f32> = residual(&x, &a)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs: Vec<f32> = (&x + &a).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours, theirs);
        // A transposed (strided) operand is made contiguous first.
        let y = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap().t().unwrap();
        let ours: Vec<f32> = residual(&y, &b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs: Vec<f32> = (&y + &b).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours, theirs);
    }
}
