//! Throughput of the block matmul kernels on SmolLM2-135M's shapes, against the bytes they
//! stream: `cargo run --release -p slm-model --example kernels [THREADS]`.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use slm_kernels::half_matmul::{HalfMatrix, HalfType};
use slm_kernels::kquant::{KMatrix, KType};
use slm_kernels::quant::{BlockMatrix, BlockType};

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    slm_kernels::pool::init(threads);
    println!("threads {threads}");
    println!("| type | n x k | m | GB/s | GOP/s | us/call |");
    println!("|---|---|---|---|---|---|");
    let ms: Vec<usize> = std::env::var("KERNELS_M")
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|_| vec![1, 64, 512]);
    // KERNELS_TYPES=Q8_0,F16 picks types by name (all by default).
    let types = std::env::var("KERNELS_TYPES").ok();
    let wanted = |t: &str| types.as_ref().is_none_or(|v| v.split(',').any(|x| x == t));
    let shapes = [(1536, 576), (576, 1536), (49152, 576)];
    for t in [HalfType::F16, HalfType::BF16] {
        if !wanted(&format!("{t:?}")) {
            continue;
        }
        for (n, k) in shapes {
            let bytes: Vec<u8> = (0..n * k)
                .flat_map(|i| {
                    let v = ((i * 7919) % 1000) as f32 * 1e-3 - 0.5;
                    half::f16::from_f32(v).to_le_bytes()
                })
                .collect();
            let hm = HalfMatrix::new(t, &bytes, n, k);
            for &m in &ms {
                let run = |x: &[f32], out: &mut [f32]| hm.matmul(x, m, out);
                report(&format!("{t:?}"), n, k, m, bytes.len(), run);
            }
        }
    }
    for (g, t) in [
        (GgmlDType::Q4_1, BlockType::Q4_1),
        (GgmlDType::Q8_0, BlockType::Q8_0),
        (GgmlDType::Q4_0, BlockType::Q4_0),
        (GgmlDType::Q5_0, BlockType::Q5_0),
        (GgmlDType::Q5_1, BlockType::Q5_1),
    ] {
        if !wanted(&format!("{t:?}")) {
            continue;
        }
        for (n, k) in shapes {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, g).unwrap();
            let bytes = q.data().unwrap().to_vec();
            for &m in &ms {
                let bm = BlockMatrix::new(t, &bytes, n, k);
                let run = |x: &[f32], out: &mut [f32]| bm.matmul(x, m, out).unwrap();
                report(&format!("{t:?}"), n, k, m, bytes.len(), run);
            }
        }
    }
    // K-quants (k must be whole 256-blocks, so only the down projection's shape applies);
    // KERNELS_CANDLE=1 adds candle's quantized matmul for comparison.
    for t in [KType::Q2K, KType::Q3K, KType::Q4K, KType::Q5K, KType::Q6K] {
        if !wanted(&format!("{t:?}")) {
            continue;
        }
        let (n, k) = (576, 1536);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, t.to_ggml()).unwrap();
        let bytes = q.storage_size_in_bytes();
        let km = KMatrix::new(t, &q.data().unwrap(), n, k);
        for &m in &ms {
            let run = |x: &[f32], out: &mut [f32]| {
                // SAFETY: the kernel stores computed values only.
                km.matmul(x, m, unsafe { slm_kernels::pool::as_uninit(out) })
                    .unwrap();
            };
            report(&format!("{t:?}"), n, k, m, bytes, run);
            if std::env::var("KERNELS_CANDLE").is_ok() {
                let qm = candle_core::quantized::QMatMul::from_qtensor(
                    QTensor::quantize(&w, t.to_ggml()).unwrap(),
                )
                .unwrap();
                let run = |x: &[f32], out: &mut [f32]| {
                    use candle_core::Module;
                    let xt = Tensor::from_slice(x, (m, k), &Device::Cpu).unwrap();
                    let y: Vec<f32> = qm
                        .forward(&xt)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    out.copy_from_slice(&y);
                };
                report(&format!("{t:?} candle"), n, k, m, bytes, run);
            }
        }
    }
}

/// Times `run` on an m x k input and prints one table row.
fn report(t: &str, n: usize, k: usize, m: usize, bytes: usize, run: impl Fn(&[f32], &mut [f32])) {
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 31) % 97) as f32 * 0.01 - 0.4)
        .collect();
    let mut out = vec![0f32; m * n];
    // The fastest of many calls: on a shared machine the mean measures the neighbours too.
    let reps = (4e9 / (n * k * m) as f64).clamp(20.0, 2000.0) as usize;
    run(&x, &mut out);
    let s = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            run(&x, &mut out);
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    println!(
        "| {t} | {n} x {k} | {m} | {:.1} | {:.1} | {:.1} |",
        bytes as f64 / s / 1e9,
        2.0 * (n * k * m) as f64 / s / 1e9,
        s * 1e6
    );
}
