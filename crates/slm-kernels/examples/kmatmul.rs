//! x W^T for a K-quant W from raw files, as slm computes it, for comparing with another engine
//! on the same bytes: `kmatmul TYPE N K M weights.bin x.bin out.bin` (TYPE: q2_k..q6_k; x is
//! M rows of K f32, out M rows of N f32).

use slm_kernels::kquant::{KMatrix, KType};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let t = match a[1].as_str() {
        "q2_k" => KType::Q2K,
        "q3_k" => KType::Q3K,
        "q4_k" => KType::Q4K,
        "q5_k" => KType::Q5K,
        "q6_k" => KType::Q6K,
        other => panic!("unknown type {other}"),
    };
    let (n, k, m): (usize, usize, usize) = (
        a[2].parse().unwrap(),
        a[3].parse().unwrap(),
        a[4].parse().unwrap(),
    );
    let w = std::fs::read(&a[5]).unwrap();
    let x: Vec<f32> = std::fs::read(&a[6])
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let km = KMatrix::new(t, &w, n, k);
    let mut out = vec![0f32; m * n];
    km.matmul(&x, m, unsafe { slm_kernels::pool::as_uninit(&mut out) })
        .unwrap();
    let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&a[7], bytes).unwrap();
}
