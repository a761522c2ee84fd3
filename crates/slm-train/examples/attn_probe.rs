use slm_train::kernels::{attention, attention_bwd, AttnShape};
use std::time::Instant;
fn main() {
    let s = AttnShape { batch: 8, positions: 512, heads: 8, kv_heads: 8, head_dim: 64 };
    let n = s.batch * s.positions;
    let qkv: Vec<f32> = (0..n * s.qkv_width()).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut out = vec![0f32; n * s.out_width()];
    let mut lse = vec![0f32; n * s.heads];
    let mut dqkv = vec![0f32; n * s.qkv_width()];
    let dout = out.clone();
    for _ in 0..2 { attention(&mut out, &mut lse, &qkv, s); }
    let t = Instant::now();
    for _ in 0..5 { attention(&mut out, &mut lse, &qkv, s); }
    let f = t.elapsed().as_secs_f64() / 5.0;
    let t = Instant::now();
    for _ in 0..5 { attention_bwd(&mut dqkv, &dout, &out, &lse, &qkv, s); }
    let b = t.elapsed().as_secs_f64() / 5.0;
    println!("fwd {:.1} ms  bwd {:.1} ms (per layer)", f * 1e3, b * 1e3);
}
