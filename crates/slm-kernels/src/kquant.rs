//! K-quant weights (Q2_K to Q6_K) multiplied on the kernel pool, for decode steps.
//!
//! candle's quantized matmul runs on candle's own thread pool, whose workers then spin on
//! the cores that the kernel pool's workers spin on. Measured on SmolLM2-135M Q4_K_M (its
//! down projections are Q4_K and Q6_K), decode on 2 threads ran at 75 tok/s, slower than on
//! 1 (83); with this module, 127-137 (llama.cpp: 125). Here candle's per-row dot products
//! (`vec_dot`, so the same numbers) run on the kernel pool: activations quantized to Q8_K
//! once per matmul, spans of weight rows per task, as for the other block matrices.
//!
//! Prompts still go to candle (`Linear::forward` decides): on x86 it repacks Q4_K/Q6_K into
//! tiles that run ~3x the per-row dot products on many rows (`examples/kernels.rs` with
//! KERNELS_CANDLE=1), at the price of a second copy of those weights. Kernels of our own for
//! these types, in the interleaved layouts of `quant`, would remove both; not written yet.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use std::mem::MaybeUninit;
use std::sync::Arc;

use crate::pool::OutPtr;

/// Whether `q` is a K-quant matrix this module multiplies.
pub fn supports(q: &QTensor) -> bool {
    use GgmlDType::*;
    q.device().is_cpu()
        && q.shape().dims().len() == 2
        && matches!(q.dtype(), Q2K | Q3K | Q4K | Q5K | Q6K)
}

/// A K-quant weight matrix (n x k, stored as GGUF has it) as a candle op: `x W^T`.
#[derive(Debug, Clone)]
pub struct KQuantMatmul(pub Arc<QTensor>);

impl CustomOp1 for KQuantMatmul {
    fn name(&self) -> &'static str {
        "k-quant-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.shape().dims2()?;
        crate::ggml_math::matmul_fwd(s, l, "k-quant matmul", n, k, |x, m, out| {
            matmul(&self.0, x, m, out)
        })
    }
}

/// `out (m x n) = x (m x k) W^T` for a K-quant `q` of n x k; on Ok every output is written.
pub fn matmul(
    q: &QTensor,
    x: &[f32],
    m: usize,
    out: &mut [MaybeUninit<f32>],
) -> candle_core::Result<()> {
    let (n, k) = q.shape().dims2()?;
    let data = q.data()?;
    match q.dtype() {
        GgmlDType::Q2K => run::<BlockQ2K>(&data, n, k, x, m, out),
        GgmlDType::Q3K => run::<BlockQ3K>(&data, n, k, x, m, out),
        GgmlDType::Q4K => run::<BlockQ4K>(&data, n, k, x, m, out),
        GgmlDType::Q5K => run::<BlockQ5K>(&data, n, k, x, m, out),
        GgmlDType::Q6K => run::<BlockQ6K>(&data, n, k, x, m, out),
        other => candle_core::bail!("k-quant matmul: {other:?} is not a K-quant type"),
    }
}

/// The blocks of a CPU QTensor's bytes (candle stores them as a `Vec` of blocks, so they are
/// aligned; checked all the same).
fn blocks<T>(bytes: &[u8], n: usize, kb: usize) -> candle_core::Result<&[T]> {
    let size = std::mem::size_of::<T>();
    if bytes.len() != n * kb * size || bytes.as_ptr().align_offset(std::mem::align_of::<T>()) != 0 {
        candle_core::bail!(
            "k-quant matmul: {} bytes for {n} rows of {kb} blocks of {size} bytes",
            bytes.len()
        );
    }
    // SAFETY: length and alignment checked; the block types are plain old data (floats and
    // byte arrays) for which every bit pattern is a value.
    Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n * kb) })
}

/// Activation rows a task takes at a time.
const ROW_TILE: usize = 16;

fn run<T: GgmlType>(
    bytes: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
    out: &mut [MaybeUninit<f32>],
) -> candle_core::Result<()> {
    if !k.is_multiple_of(T::BLCK_SIZE) || x.len() < m * k || out.len() < m * n {
        candle_core::bail!(
            "k-quant matmul: k {k} (blocks of {}), {} inputs for {m} rows, {} outputs for {n}",
            T::BLCK_SIZE,
            x.len(),
            out.len()
        );
    }
    let kb = k / T::BLCK_SIZE;
    let w: &[T] = blocks(bytes, n, kb)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let mut act = vec![T::VecDotType::zeros(); m * kb];
    crate::pool::for_chunks(&mut act, kb.max(1), |start, row| {
        let i = start / kb.max(1);
        T::VecDotType::from_float(&x[i * k..(i + 1) * k], row)
    });
    let act = &act[..];
    let pool = crate::pool::global();
    // Whole quads of rows per span, as candle forms them (vec_dot_4 shares the activation
    // loads between four weight rows).
    let spans: Vec<_> = pool.spans(n, 4).collect();
    let o = OutPtr(out.as_mut_ptr().cast::<f32>());
    pool.run(spans.len(), |s| {
        let r = spans[s].clone();
        let row = |j: usize| &w[j * kb..(j + 1) * kb];
        let a = |i: usize| &act[i * kb..(i + 1) * kb];
        // SAFETY (the writes below): the spans are disjoint columns j of out, which holds
        // m * n values; only this task writes column j of any row i.
        let put = |i: usize, j: usize, v: f32| unsafe { *o.get().add(i * n + j) = v };
        // Sixteen activation rows (27 KB of Q8_K at k = 1536) stay in L1 while the span's
        // weights pass; each quad of weight rows is then read once per sixteen rows, as
        // ggml and candle block it.
        for i0 in (0..m).step_by(ROW_TILE) {
            let tile = i0..(i0 + ROW_TILE).min(m);
            let mut j = r.start;
            while j + 4 <= r.end {
                for i in tile.clone() {
                    let (d0, d1, d2, d3) =
                        T::vec_dot_4(k, row(j), row(j + 1), row(j + 2), row(j + 3), a(i));
                    put(i, j, d0);
                    put(i, j + 1, d1);
                    put(i, j + 2, d2);
                    put(i, j + 3, d3);
                }
                j += 4;
            }
            for j in j..r.end {
                for i in tile.clone() {
                    put(i, j, T::vec_dot(k, row(j), a(i)));
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};
    use rand::{Rng, SeedableRng};

    fn values(t: candle_core::Result<Tensor>) -> Vec<f32> {
        t.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The pool's schedule gives candle's own quantized matmul bit for bit: same dot products.
    #[test]
    fn equals_candles_quantized_matmul_on_odd_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let dev = Device::Cpu;
        for t in [
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            for &(n, k, m) in &[
                (1, 256, 1),
                (7, 512, 1),
                (13, 256, 3),
                (33, 768, 9),
                (8, 1536, 17),
            ] {
                let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1f32..1.0)).collect();
                let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
                let q = Arc::new(QTensor::quantize(&w, t).unwrap());
                assert!(supports(&q));
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3f32..3.0)).collect();
                let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
                let theirs = values(QMatMul::from_arc(q.clone()).unwrap().forward(&xt));
                let ours = values(xt.apply_op1_no_bwd(&KQuantMatmul(q.clone())));
                assert_eq!(ours.len(), m * n);
                for (c, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{t:?} n{n} k{k} m{m} cell {c}");
                }
                // And against the dequantized weights, so that the comparison above is not of
                // two copies of one mistake.
                let dense = q.dequantize(&dev).unwrap();
                let exact = values(xt.matmul(&dense.t().unwrap()));
                let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs())).max(1.0);
                for (c, (a, b)) in ours.iter().zip(&exact).enumerate() {
                    // Activations go through 8 bits (Q8_K): about 1% of the largest output.
                    assert!(
                        (a - b).abs() <= 0.02 * scale,
                        "{t:?} n{n} k{k} m{m} cell {c}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_k_not_made_of_whole_blocks_is_refused_by_name() {
        let q = QTensor::quantize(
            &Tensor::zeros((4, 256), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q4K,
        )
        .unwrap();
        let mut out = [MaybeUninit::uninit(); 4];
        let err = run::<BlockQ4K>(&q.data().unwrap(), 4, 200, &[0.0; 200], 1, &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("k 200 (blocks of 256)"), "{err}");
        // Bytes that are not n rows of whole blocks, and a type that is not a K-quant.
        let bytes = q.data().unwrap();
        let err = blocks::<BlockQ4K>(&bytes[..bytes.len() - 1], 4, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{} bytes for 4 rows", bytes.len() - 1)),
            "{err}"
        );
        let q8 = QTensor::quantize(
            &Tensor::zeros((4, 256), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        assert!(!supports(&q8));
        let err = matmul(&q8, &[0.0; 256], 1, &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Q8_0 is not a K-quant type"), "{err}");
    }
}
