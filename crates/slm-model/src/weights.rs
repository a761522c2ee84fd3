//! Where a model's tensors come from: a GGUF file (quantized blocks kept as they are) or a
//! candle `VarBuilder` (safetensors folders, and the trainer's variables). Tensors are asked
//! for by their Hugging Face names; GGUF names are derived from those.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use slm_format::gguf::{GgmlType, GgufError, GgufFile};
use slm_kernels::half_matmul::{HalfMatrix, HalfType};
use slm_kernels::kquant::{KMatrix, KType};
use slm_kernels::quant::{BlockMatrix, BlockType};

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{source_name}: tensor '{tensor}': {what}")]
    Tensor {
        source_name: String,
        tensor: String,
        what: String,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, WeightError>;

pub use slm_format::params::hf_to_gguf_name;

/// A linear layer `y = x W^T + b`, with W dense (trainable) or in quantized GGUF blocks.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense {
        w: Tensor,
        b: Option<Tensor>,
    },
    Quantized {
        w: QMatMul,
        b: Option<Tensor>,
    },
    /// GGML 32-blocks computed with ggml's exact arithmetic (see `quant`).
    Blocks {
        w: BlockMatrix,
        b: Option<Tensor>,
    },
    /// K-quant super-blocks computed with llama.cpp's exact arithmetic (see `kquant`).
    KBlocks {
        w: KMatrix,
        b: Option<Tensor>,
    },
    /// F16/BF16 weights kept at two bytes (see `half_matmul`).
    Half {
        w: HalfMatrix,
        b: Option<Tensor>,
    },
    /// A layer whose inputs are recorded on the way through (see `Llama::observed`).
    Observed {
        inner: Box<Linear>,
        stats: Tap,
    },
}

/// A layer's shared input statistics, as `Llama::observed` hands them out.
pub type Tap = Arc<std::sync::Mutex<InputStats>>;

/// What importance matrices are made of: per input column, the sum of the squares of every
/// input row a layer has seen, summed row after row in f32 (llama-imatrix's order), and the
/// number of rows.
#[derive(Debug, Clone, Default)]
pub struct InputStats {
    pub sum2: Vec<f32>,
    pub rows: u64,
}

impl InputStats {
    fn add(&mut self, x: &Tensor) -> candle_core::Result<()> {
        let k = x.dims().last().copied().unwrap_or(0);
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if self.sum2.is_empty() {
            self.sum2 = vec![0.0; k];
        }
        if self.sum2.len() != k {
            candle_core::bail!(
                "observed inputs of width {k} after width {}",
                self.sum2.len()
            );
        }
        for row in xs.chunks_exact(k.max(1)) {
            for (a, &v) in self.sum2.iter_mut().zip(row) {
                *a += v * v;
            }
            self.rows += 1;
        }
        Ok(())
    }
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (y, b) = match self {
            // One 2-D matmul over all positions: with a broadcast batched matmul, training's
            // backward would build one weight gradient per batch row and then sum them.
            Linear::Dense { w, b } => {
                let (n, k) = w.dims2()?;
                let mut shape = x.dims().to_vec();
                let last = shape.len() - 1;
                shape[last] = n;
                (x.reshape(((), k))?.matmul(&w.t()?)?.reshape(shape)?, b)
            }
            Linear::Quantized { w, b } => (w.forward(x)?, b),
            Linear::Blocks { w, b } => (x.contiguous()?.apply_op1_no_bwd(w)?, b),
            Linear::KBlocks { w, b } => (x.contiguous()?.apply_op1_no_bwd(w)?, b),
            Linear::Half { w, b } => (x.contiguous()?.apply_op1_no_bwd(w)?, b),
            Linear::Observed { inner, stats } => {
                stats
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("input statistics poisoned".into()))?
                    .add(x)?;
                return inner.forward(x);
            }
        };
        match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// Several projections of one input (q, k and v; gate and up). Block matrices, or half
    /// matrices of one type, run as one matmul on the CPU: the input quantized (or rounded)
    /// once and all their rows in one section of the kernel pool. Anything else, one by one.
    pub fn forward_group<const N: usize>(
        ls: [&Linear; N],
        x: &Tensor,
    ) -> candle_core::Result<[Tensor; N]> {
        enum Kind<'a> {
            Blocks(Vec<&'a BlockMatrix>),
            Half(Vec<&'a HalfMatrix>),
        }
        let blocks: Option<Vec<_>> = ls
            .iter()
            .map(|l| match l {
                Linear::Blocks { w, .. } => Some(w),
                _ => None,
            })
            .collect();
        let half: Option<Vec<_>> = ls
            .iter()
            .map(|l| match l {
                Linear::Half { w, .. } => Some(w),
                _ => None,
            })
            .collect();
        let kind = match (blocks, half) {
            (Some(b), _) => Some(Kind::Blocks(b)),
            (_, Some(h)) if h.iter().all(|w| w.t == h[0].t) => Some(Kind::Half(h)),
            _ => None,
        };
        let (Some(kind), true) = (kind, N > 1 && slm_kernels::ggml_math::exact_path(&[x])) else {
            return ls
                .iter()
                .map(|l| l.forward(x))
                .collect::<candle_core::Result<Vec<_>>>()?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("forward_group".into()));
        };
        let x = x.contiguous()?;
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let shapes: Vec<(usize, usize)> = match &kind {
            Kind::Blocks(ws) => ws.iter().map(|w| (w.k, w.n)).collect(),
            Kind::Half(ws) => ws.iter().map(|w| (w.k, w.n)).collect(),
        };
        let ns: Vec<usize> = shapes
            .into_iter()
            .map(|(wk, n)| {
                if wk == k {
                    Ok(n)
                } else {
                    Err(candle_core::Error::Msg(format!(
                        "projection: input width {k}, weights expect {wk}"
                    )))
                }
            })
            .collect::<candle_core::Result<_>>()?;
        let m = x.elem_count() / k.max(1);
        // Not zeroed: the grouped matmuls write every output value (see their docs).
        let mut outs: Vec<Vec<f32>> = ns.iter().map(|n| Vec::with_capacity(m * n)).collect();
        {
            let (storage, layout) = x.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("projection: expects a CPU tensor");
            };
            let xs = slm_kernels::ggml_math::f32_slice(cpu, layout, "projection")?;
            let mut slices: Vec<_> = outs
                .iter_mut()
                .zip(&ns)
                .map(|(o, &n)| &mut o.spare_capacity_mut()[..m * n])
                .collect();
            match &kind {
                Kind::Blocks(ws) => BlockMatrix::matmul_group(ws, xs, m, &mut slices)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
                Kind::Half(ws) => HalfMatrix::matmul_group(ws, xs, m, &mut slices),
            }
        }
        for (o, &n) in outs.iter_mut().zip(&ns) {
            // SAFETY: matmul_group wrote all m * n values of each output.
            unsafe { o.set_len(m * n) };
        }
        let mut ys = Vec::with_capacity(N);
        for ((out, n), l) in outs.into_iter().zip(ns).zip(ls) {
            let mut shape = dims.clone();
            *shape.last_mut().expect("rank >= 1") = n;
            let y = Tensor::from_vec(out, shape, x.device())?;
            ys.push(match l {
                Linear::Blocks { b: Some(b), .. } | Linear::Half { b: Some(b), .. } => {
                    y.broadcast_add(b)?
                }
                _ => y,
            });
        }
        Ok(ys.try_into().expect("one output per projection"))
    }

    /// This layer with its inputs recorded into `stats`.
    pub fn observed(&self, stats: Tap) -> Linear {
        Linear::Observed {
            inner: Box::new(self.clone()),
            stats,
        }
    }

    /// The same weights widened to a dense f32 matrix, run through candle's f32 gemm at four
    /// bytes per weight; activations are no longer rounded to 8 bits on the way. (This was
    /// ~4x the first block kernels' speed on prompts; the current ones are faster than it.)
    pub fn dequantized(&self) -> candle_core::Result<Linear> {
        let dense = |w: Tensor, b: &Option<Tensor>| Linear::Dense { w, b: b.clone() };
        Ok(match self {
            Linear::Dense { w, b } => dense(w.to_dtype(DType::F32)?, b),
            Linear::Quantized { w, b } => match w {
                QMatMul::QTensor(q) => dense(q.dequantize(&q.device())?, b),
                QMatMul::Tensor(w) | QMatMul::TensorF16(w) => dense(w.to_dtype(DType::F32)?, b),
            },
            Linear::Blocks { w, b } => {
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    w.t.to_ggml(),
                    &w.gguf_bytes(),
                    vec![w.n, w.k],
                    &Device::Cpu,
                )?;
                dense(q.dequantize(&Device::Cpu)?, b)
            }
            Linear::KBlocks { w, b } => {
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    w.t.to_ggml(),
                    &w.gguf_bytes(),
                    vec![w.n, w.k],
                    &Device::Cpu,
                )?;
                dense(q.dequantize(&Device::Cpu)?, b)
            }
            Linear::Half { w, b } => {
                let mut all = vec![0f32; w.n * w.k];
                for (j, row) in all.chunks_exact_mut(w.k).enumerate() {
                    w.row(j, row);
                }
                dense(Tensor::from_vec(all, (w.n, w.k), &Device::Cpu)?, b)
            }
            Linear::Observed { inner, stats } => Linear::Observed {
                inner: Box::new(inner.dequantized()?),
                stats: stats.clone(),
            },
        })
    }
}

/// Token embeddings: a dense table, or quantized rows dequantized on lookup (a 49k x 576 table
/// is 113 MB as f32 but 30 MB as Q8_0, and only the looked-up rows are ever needed).
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
    /// GGML 32-blocks shared with the output projection when embeddings are tied (one copy
    /// of the largest matrix of a small model, not two).
    Blocks(BlockMatrix),
    /// K-quant super-blocks, shared with a tied output projection.
    KBlocks(KMatrix),
    /// F16/BF16 rows, widened on lookup; shared with a tied output projection.
    Half(HalfMatrix),
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(w) => {
                let (b, t) = ids.dims2()?;
                w.index_select(&ids.flatten_all()?, 0)?
                    .reshape((b, t, w.dim(1)?))
            }
            Embedding::Quantized(q) => q.embedding(ids),
            Embedding::Blocks(w) => lookup(ids, w.n, w.k, |j, row| w.dequantize_row(j, row)),
            Embedding::KBlocks(w) => lookup(ids, w.n, w.k, |j, row| w.dequantize_row(j, row)),
            Embedding::Half(w) => lookup(ids, w.n, w.k, |j, row| w.row(j, row)),
        }
    }

    /// The same weights as an output projection (tied embeddings).
    pub fn as_linear(&self) -> candle_core::Result<Linear> {
        Ok(match self {
            Embedding::Dense(w) => Linear::Dense {
                w: w.clone(),
                b: None,
            },
            Embedding::Quantized(q) => Linear::Quantized {
                w: QMatMul::from_arc(q.clone())?,
                b: None,
            },
            Embedding::Blocks(w) => Linear::Blocks {
                w: w.clone(),
                b: None,
            },
            Embedding::KBlocks(w) => Linear::KBlocks {
                w: w.clone(),
                b: None,
            },
            Embedding::Half(w) => Linear::Half {
                w: w.clone(),
                b: None,
            },
        })
    }
}

/// Rows `ids` (b, t) of an n x k table, each widened by `row(j, out)`: (b, t, k).
fn lookup(
    ids: &Tensor,
    n: usize,
    k: usize,
    row: impl Fn(usize, &mut [f32]),
) -> candle_core::Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let device = ids.device().clone();
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    let mut x = vec![0f32; ids.len() * k];
    for (&id, out) in ids.iter().zip(x.chunks_exact_mut(k)) {
        if id as usize >= n {
            candle_core::bail!("token id {id} is past the vocabulary of {n}");
        }
        row(id as usize, out);
    }
    Tensor::from_vec(x, (b, t, k), &device)
}

/// A GGUF weight matrix in one of slm-kernels' CPU layouts.
enum CpuMatrix {
    Blocks(BlockMatrix),
    KBlocks(KMatrix),
    Half(HalfMatrix),
}

/// The GGUF tensor of Hugging Face name `hf_name`, n x k, in the CPU kernels' layout for its
/// type, if it is a CPU run, the tensor has that shape and a kernel has its type (the file's
/// pages are then handed back: the kernel keeps its own bytes).
fn cpu_matrix(
    file: &GgufFile,
    device: &Device,
    hf_name: &str,
    n: usize,
    k: usize,
) -> Option<CpuMatrix> {
    let info = hf_to_gguf_name(hf_name).and_then(|g| file.tensor_info(&g))?;
    if !device.is_cpu() || info.dims != [n, k] {
        return None;
    }
    let (ty, bytes) = (candle_type(info.dtype), file.tensor_bytes(info));
    let m = if let Some(t) = BlockType::from_ggml(ty) {
        CpuMatrix::Blocks(BlockMatrix::new(t, bytes, n, k))
    } else if let Some(t) = KType::from_ggml(ty) {
        CpuMatrix::KBlocks(KMatrix::new(t, bytes, n, k))
    } else if let Some(t) = HalfType::from_ggml(ty) {
        CpuMatrix::Half(HalfMatrix::new(t, bytes, n, k))
    } else {
        return None;
    };
    file.release(info);
    Some(m)
}

pub enum Weights<'a> {
    Gguf { file: &'a GgufFile, device: Device },
    Vars(VarBuilder<'a>),
}

impl Weights<'_> {
    fn source_name(&self) -> String {
        match self {
            Weights::Gguf { file, .. } => file.path().display().to_string(),
            Weights::Vars(_) => "weights".into(),
        }
    }

    fn err(&self, tensor: &str, what: impl Into<String>) -> WeightError {
        WeightError::Tensor {
            source_name: self.source_name(),
            tensor: tensor.into(),
            what: what.into(),
        }
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            Weights::Gguf { file, .. } => hf_to_gguf_name(hf_name)
                .map(|n| file.tensor_info(&n).is_some())
                .unwrap_or(false),
            Weights::Vars(vb) => vb.contains_tensor(hf_name),
        }
    }

    fn qtensor(&self, hf_name: &str, shape: &[usize]) -> Result<QTensor> {
        let Weights::Gguf { file, device } = self else {
            unreachable!("qtensor is only called for GGUF weights")
        };
        let name = hf_to_gguf_name(hf_name).ok_or_else(|| self.err(hf_name, "has no GGUF name"))?;
        let info = file
            .tensor_info(&name)
            .ok_or_else(|| self.err(&name, "missing from the file"))?;
        if info.dims != shape {
            return Err(self.err(
                &name,
                format!(
                    "has shape {:?} ({}), the config implies {shape:?}",
                    info.dims,
                    info.dtype.name()
                ),
            ));
        }
        gguf_qtensor(file, &name, device)
    }

    /// A full-precision tensor (norm weights, biases).
    pub fn tensor(&self, hf_name: &str, shape: &[usize]) -> Result<Tensor> {
        match self {
            Weights::Gguf { device, .. } => Ok(self.qtensor(hf_name, shape)?.dequantize(device)?),
            Weights::Vars(vb) => vb
                .get(shape, hf_name)
                .map_err(|e| self.err(hf_name, e.to_string())),
        }
    }

    pub fn linear(
        &self,
        hf_prefix: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let wname = format!("{hf_prefix}.weight");
        let b = if bias {
            Some(self.tensor(&format!("{hf_prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        match self {
            Weights::Gguf { file, device } => {
                // The kernels of slm-kernels run on the CPU; another device (or a type they do
                // not have) takes candle's QMatMul.
                if let Some(m) = cpu_matrix(file, device, &wname, out_dim, in_dim) {
                    return Ok(match m {
                        CpuMatrix::Blocks(w) => Linear::Blocks { w, b },
                        CpuMatrix::KBlocks(w) => Linear::KBlocks { w, b },
                        CpuMatrix::Half(w) => Linear::Half { w, b },
                    });
                }
                let q = self.qtensor(&wname, &[out_dim, in_dim])?;
                Ok(Linear::Quantized {
                    w: QMatMul::from_qtensor(q)?,
                    b,
                })
            }
            Weights::Vars(vb) => {
                let w = vb
                    .get((out_dim, in_dim), &wname)
                    .map_err(|e| self.err(&wname, e.to_string()))?;
                Ok(Linear::Dense { w, b })
            }
        }
    }

    pub fn embedding(&self, hf_name: &str, vocab: usize, hidden: usize) -> Result<Embedding> {
        match self {
            Weights::Gguf { file, device } => {
                if let Some(m) = cpu_matrix(file, device, hf_name, vocab, hidden) {
                    return Ok(match m {
                        CpuMatrix::Blocks(w) => Embedding::Blocks(w),
                        CpuMatrix::KBlocks(w) => Embedding::KBlocks(w),
                        CpuMatrix::Half(w) => Embedding::Half(w),
                    });
                }
                let q = self.qtensor(hf_name, &[vocab, hidden])?;
                if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                    Ok(Embedding::Dense(
                        q.dequantize(device)?.to_dtype(DType::F32)?,
                    ))
                } else {
                    Ok(Embedding::Quantized(Arc::new(q)))
                }
            }
            Weights::Vars(vb) => Ok(Embedding::Dense(
                vb.get((vocab, hidden), hf_name)
                    .map_err(|e| self.err(hf_name, e.to_string()))?,
            )),
        }
    }

    /// llama.cpp carries llama3 rope scaling as per-dimension frequency divisors.
    pub fn rope_freq_factors(&self) -> Result<Option<Vec<f32>>> {
        match self {
            Weights::Gguf { file, device } => match file.tensor_info("rope_freqs.weight") {
                None => Ok(None),
                Some(_) => {
                    let t = gguf_qtensor(file, "rope_freqs.weight", device)?.dequantize(device)?;
                    Ok(Some(t.flatten_all()?.to_vec1::<f32>()?))
                }
            },
            Weights::Vars(_) => Ok(None),
        }
    }

    /// GGUF files converted from Llama/Mistral checkpoints store q and k with their rows
    /// permuted so that rotary pairs are adjacent (interleaved); Hugging Face weights and
    /// Qwen2 GGUFs pair dimension i with i + d/2.
    pub fn rope_interleaved(&self, arch: slm_format::config::Arch) -> bool {
        matches!(self, Weights::Gguf { .. }) && arch != slm_format::config::Arch::Qwen2
    }
}

/// One tensor of a GGUF file as a candle `QTensor` (a copy of its bytes, so the map can be
/// dropped).
pub fn gguf_qtensor(file: &GgufFile, name: &str, device: &Device) -> Result<QTensor> {
    let info = file.tensor_info(name).ok_or_else(|| GgufError::Tensor {
        path: file.path().to_path_buf(),
        tensor: name.to_string(),
        what: "not found in the file".into(),
    })?;
    let bytes = file.tensor_bytes(info);
    let terr = |what: String| GgufError::Tensor {
        path: file.path().to_path_buf(),
        tensor: name.to_string(),
        what,
    };
    // candle reinterprets the bytes as blocks in place; blocks hold f16/f32 fields, so the
    // slice must be aligned for them. A mapped file with a legal alignment always is; a
    // file with `general.alignment` of 1 or 2 may not be, so copy to an aligned buffer then.
    let aligned: Vec<u64>;
    let bytes = if !(bytes.as_ptr() as usize).is_multiple_of(8) {
        let mut buf = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: buf holds at least bytes.len() bytes; u8 has no alignment needs.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, bytes.len()) };
        dst.copy_from_slice(bytes);
        aligned = buf;
        // SAFETY: as above; `aligned` outlives this use.
        unsafe { std::slice::from_raw_parts(aligned.as_ptr() as *const u8, bytes.len()) }
    } else {
        bytes
    };
    candle_core::quantized::ggml_file::qtensor_from_ggml(
        candle_type(info.dtype),
        bytes,
        info.dims.clone(),
        device,
    )
    .map_err(|e| terr(e.to_string()).into())
}

/// candle's name for a GGUF tensor type: candle dequantizes every type and computes the
/// K-quants' dot products.
pub fn candle_type(t: GgmlType) -> GgmlDType {
    match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q8_1 => GgmlDType::Q8_1,
        GgmlType::Q2K => GgmlDType::Q2K,
        GgmlType::Q3K => GgmlDType::Q3K,
        GgmlType::Q4K => GgmlDType::Q4K,
        GgmlType::Q5K => GgmlDType::Q5K,
        GgmlType::Q6K => GgmlDType::Q6K,
        GgmlType::Q8K => GgmlDType::Q8K,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// slm-format checks tensor byte lengths with its own block sizes; candle reads the
    /// blocks with its own. They must be the same numbers.
    #[test]
    fn gguf_type_sizes_equal_candles() {
        for t in GgmlType::ALL {
            let c = candle_type(t);
            assert_eq!(
                (t.block_size(), t.type_size()),
                (c.block_size(), c.type_size()),
                "{t:?}"
            );
        }
    }

    /// A tied embedding looks rows up in the output projection's blocks: the same values as
    /// candle's dequantization, bit for bit, for every block type, grouped layout or not.
    #[test]
    fn block_embedding_rows_equal_candle_dequantization() {
        let dev = Device::Cpu;
        let (n, k) = (13, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 * 2e-3 - 1.0)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        for g in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
        ] {
            let q = QTensor::quantize(&w, g).unwrap();
            let want: Vec<f32> = q
                .dequantize(&dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let t = BlockType::from_ggml(g).unwrap();
            let e = Embedding::Blocks(BlockMatrix::new(t, &q.data().unwrap(), n, k));
            let ids: Vec<u32> = (0..n as u32).rev().collect();
            let got: Vec<f32> = e
                .forward(
                    &Tensor::new(ids.as_slice(), &dev)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                )
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (r, &id) in ids.iter().enumerate() {
                for c in 0..k {
                    let (a, b) = (got[r * k + c], want[id as usize * k + c]);
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{g:?} row {id} col {c}: {a} vs {b}"
                    );
                }
            }
        }
    }

    fn q8_linear(n: usize, k: usize, seed: usize) -> Linear {
        let w: Vec<f32> = (0..n * k)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 * 2e-3 - 1.0)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let w = BlockMatrix::new(BlockType::Q8_0, &q.data().unwrap(), n, k);
        Linear::Blocks { w, b: None }
    }

    /// Projections run as one group give what each gives alone, bit for bit, including a
    /// group that mixes kinds (and so runs one by one).
    #[test]
    fn grouped_projections_equal_each_alone() {
        let dev = Device::Cpu;
        let k = 64;
        let x: Vec<f32> = (0..3 * k)
            .map(|i| ((i * 31) % 97) as f32 * 0.01 - 0.4)
            .collect();
        let x = Tensor::from_vec(x, (1, 3, k), &dev).unwrap();
        let (a, b) = (q8_linear(24, k, 1), q8_linear(8, k, 2));
        let dense = Linear::Dense {
            w: Tensor::ones((5, k), DType::F32, &dev).unwrap(),
            b: None,
        };
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|f| f.to_bits()).collect()
        };
        let [ya, yb] = Linear::forward_group([&a, &b], &x).unwrap();
        assert_eq!(ya.dims(), &[1, 3, 24]);
        assert_eq!(bits(&ya), bits(&a.forward(&x).unwrap()));
        assert_eq!(bits(&yb), bits(&b.forward(&x).unwrap()));
        let [ya, yd] = Linear::forward_group([&a, &dense], &x).unwrap();
        assert_eq!(bits(&ya), bits(&a.forward(&x).unwrap()));
        assert_eq!(bits(&yd), bits(&dense.forward(&x).unwrap()));
    }

    #[test]
    fn grouped_projections_reject_a_wrong_input_width() {
        let x = Tensor::zeros((1, 2, 32), DType::F32, &Device::Cpu).unwrap();
        let (a, b) = (q8_linear(8, 64, 1), q8_linear(8, 64, 2));
        let err = Linear::forward_group([&a, &b], &x).unwrap_err().to_string();
        assert!(err.contains("input width 32, weights expect 64"), "{err}");
    }

    #[test]
    fn block_embedding_rejects_ids_past_the_vocabulary() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((4, 32), DType::F32, &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let e = Embedding::Blocks(BlockMatrix::new(BlockType::Q8_0, &q.data().unwrap(), 4, 32));
        let err = e
            .forward(&Tensor::new(&[[1u32, 4]], &dev).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("token id 4 is past the vocabulary of 4"),
            "{err}"
        );
    }
}
