//! Prompt and decode speed as llama-bench measures them: pp128 and pp512 (one prompt of that
//! many tokens into a fresh cache), tg128 (128 tokens decoded one at a time, greedy), each
//! warmed up once untimed and reported as the median over `reps`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use slm_model::Llama;

/// Tokens per second of each test.
#[derive(Debug, Clone, Copy)]
pub struct Speed {
    pub pp128: f64,
    pub pp512: f64,
    pub tg128: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(model: &Llama, reps: usize) -> candle_core::Result<Speed> {
    let vocab = model.config.vocab_size as u32;
    // Token ids as llama-bench uses them: arbitrary but fixed.
    let tokens =
        |n: usize| -> Vec<u32> { (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect() };
    let reps = reps.max(1);
    // Each test is warmed up first, as llama-bench does: one untimed prompt of the same
    // length, one untimed decoded token. Otherwise the first test timed also the first
    // touch of every weight page and the kernel pool's start.
    let pp = |n: usize| -> candle_core::Result<f64> {
        let ids = Tensor::new(tokens(n).as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        model.forward(&ids, Some(&mut model.new_cache()), true)?;
        let mut rates = Vec::new();
        for _ in 0..reps {
            let mut cache = model.new_cache();
            let t = Instant::now();
            model.forward(&ids, Some(&mut cache), true)?;
            rates.push(n as f64 / t.elapsed().as_secs_f64());
        }
        Ok(median(rates))
    };
    let pp128 = pp(128)?;
    let pp512 = pp(512)?;
    model.next_logits(&[1], &mut model.new_cache())?;
    let mut rates = Vec::new();
    for _ in 0..reps {
        let mut cache = model.new_cache();
        let mut next = 1u32;
        let t = Instant::now();
        for _ in 0..128 {
            let logits = model.next_logits(&[next], &mut cache)?;
            next = crate::argmax(&logits);
        }
        rates.push(128.0 / t.elapsed().as_secs_f64());
    }
    Ok(Speed {
        pp128,
        pp512,
        tg128: median(rates),
    })
}
