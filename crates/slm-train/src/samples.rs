//! Sample continuations at each evaluation, so report.html shows what the loss numbers mean.
//!
//! A few lines of top-k sampling rather than slm-runtime's sampler: generation is a later
//! stage of the pipeline, and training must not depend on it. The prompts are the openings of
//! fixed validation windows and the RNG is seeded by the update count, so a resumed run writes
//! the same samples as an unbroken one.

use serde::{Deserialize, Serialize};
use slm_model::Llama;

use crate::init::Rng;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sample {
    pub step: u64,
    pub tokens: u64,
    pub prompt: String,
    pub text: String,
}

pub const PROMPT_TOKENS: usize = 8;
pub const NEW_TOKENS: usize = 48;
const TEMPERATURE: f32 = 0.8;
const TOP_K: usize = 40;

/// Continues each prompt by up to NEW_TOKENS tokens (stopping at `eos`), within the context.
pub fn continue_prompts(
    model: &Llama,
    prompts: &[Vec<u32>],
    eos: u32,
    seed: u64,
) -> candle_core::Result<Vec<Vec<u32>>> {
    let ctx = model.config().max_position_embeddings;
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let mut cache = model.new_cache();
        let mut logits = model.next_logits(prompt, &mut cache)?;
        let mut new = Vec::new();
        while new.len() < NEW_TOKENS && prompt.len() + new.len() < ctx {
            let next = top_k(&logits, &mut rng);
            if next == eos {
                break;
            }
            new.push(next);
            logits = model.next_logits(&[next], &mut cache)?;
        }
        out.push(new);
    }
    Ok(out)
}

fn top_k(logits: &[f32], rng: &mut Rng) -> u32 {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = TOP_K.min(idx.len());
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        logits[b as usize].total_cmp(&logits[a as usize])
    });
    idx.truncate(k);
    let max = idx
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - max) / TEMPERATURE) as f64).exp())
        .collect();
    let mut r = rng.uniform() * weights.iter().sum::<f64>();
    for (&i, w) in idx.iter().zip(&weights) {
        if r < *w {
            return i;
        }
        r -= w;
    }
    idx[k - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_draws_only_among_the_k_largest_in_proportion() {
        let mut logits = vec![-10f32; 100];
        logits[7] = 2.0;
        logits[42] = 2.0 + TEMPERATURE * 2f32.ln(); // twice as likely as id 7
        let mut rng = Rng(1);
        let mut counts = [0usize; 100];
        for _ in 0..30_000 {
            counts[top_k(&logits, &mut rng) as usize] += 1;
        }
        let (a, b) = (counts[7] as f64, counts[42] as f64);
        assert!((b / a - 2.0).abs() < 0.1, "{a} vs {b}");
        // The other 38 of the top 40 share e^(-12/0.8)-sized weights: practically never drawn.
        assert!(counts.iter().sum::<usize>() - counts[7] - counts[42] < 5);
    }
}
