//! Perplexity by llama.cpp's `llama-perplexity` method, so figures compare directly: the text is
//! cut into non-overlapping windows of `ctx` tokens, each evaluated from an empty cache, and
//! only the second half of each window is scored (every scored token has at least ctx/2 tokens
//! of context). With a BOS-using model the first token of each window is replaced by BOS.

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use slm_model::Llama;

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error(
        "the text has {tokens} tokens, fewer than the {need} needed for one window of --ctx {ctx}"
    )]
    TooShort {
        tokens: usize,
        need: usize,
        ctx: usize,
    },
    #[error("--ctx {ctx} must be at least 4 and at most the model's context length {max}")]
    BadContext { ctx: usize, max: usize },
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    pub ppl: f64,
    /// Standard error of the perplexity, as llama-perplexity reports it.
    pub stderr: f64,
    pub windows: usize,
    pub scored_tokens: usize,
}

/// Mean negative log-likelihood and its standard error turned into perplexity.
pub fn summarize(nll: &[f64]) -> (f64, f64) {
    let n = nll.len() as f64;
    let mean = nll.iter().sum::<f64>() / n;
    let mean2 = nll.iter().map(|x| x * x).sum::<f64>() / n;
    let ppl = mean.exp();
    let var = mean2 - mean * mean;
    let se = if var > 0.0 && n > 1.0 {
        (var / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (ppl, se * ppl)
}

/// -log p(target) from one row of logits, in f64 as llama.cpp does.
pub fn nll_of(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    -(logits[target as usize] as f64 - max - sum.ln())
}

pub fn perplexity(
    model: &Llama,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    progress: bool,
) -> Result<Perplexity, PerplexityError> {
    let max = model.config.max_position_embeddings;
    if ctx < 4 || ctx > max {
        return Err(PerplexityError::BadContext { ctx, max });
    }
    let windows = tokens.len() / ctx;
    if windows == 0 {
        return Err(PerplexityError::TooShort {
            tokens: tokens.len(),
            need: ctx,
            ctx,
        });
    }
    let bar = if progress {
        ProgressBar::new(windows as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "perplexity {bar:30} {pos}/{len} windows  {per_sec}  eta {eta}  {msg}",
        )
        .expect("static template"),
    );
    let first = ctx / 2;
    let mut nll = Vec::with_capacity(windows * (ctx - first - 1));
    for w in 0..windows {
        let mut window = tokens[w * ctx..(w + 1) * ctx].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        let mut cache = model.new_cache();
        let ids = Tensor::new(window.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&ids, Some(&mut cache), false)?.squeeze(0)?;
        let rows = logits.narrow(0, first, ctx - first - 1)?.to_vec2::<f32>()?;
        for (i, row) in rows.iter().enumerate() {
            nll.push(nll_of(row, tokens[w * ctx + first + i + 1]));
        }
        let (ppl, _) = summarize(&nll);
        bar.set_message(format!("ppl {ppl:.4}"));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (ppl, stderr) = summarize(&nll);
    Ok(Perplexity {
        ppl,
        stderr,
        windows,
        scored_tokens: nll.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_give_vocab_size_perplexity() {
        let logits = vec![0.5f32; 100];
        let nll: Vec<f64> = (0..10).map(|t| nll_of(&logits, t)).collect();
        let (ppl, se) = summarize(&nll);
        assert!((ppl - 100.0).abs() < 1e-9);
        assert_eq!(se, 0.0);
    }

    #[test]
    fn stderr_follows_llama_perplexity_formula() {
        let nll = [1.0, 2.0, 3.0];
        let (ppl, se) = summarize(&nll);
        assert!((ppl - 2f64.exp()).abs() < 1e-12);
        // var = 14/3 - 4 = 2/3; se(mean) = sqrt(var / 2); se(ppl) = se * ppl
        assert!((se - (1.0f64 / 3.0).sqrt() * 2f64.exp()).abs() < 1e-12);
    }
}

/// Perplexity on `valid` of the unigram model of `train` (token frequencies, add-one smoothed
/// over `vocab`): the baseline a language model has to beat by using context at all.
pub fn unigram_perplexity(train: impl Iterator<Item = u32>, valid: &[u32], vocab: usize) -> f64 {
    let mut counts = vec![1u64; vocab];
    let mut total = vocab as u64;
    for t in train {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1;
            total += 1;
        }
    }
    let nll: f64 = valid
        .iter()
        .map(|&t| {
            let c = counts.get(t as usize).copied().unwrap_or(1);
            -((c as f64) / total as f64).ln()
        })
        .sum();
    (nll / valid.len().max(1) as f64).exp()
}

#[cfg(test)]
mod unigram_tests {
    use super::unigram_perplexity;

    #[test]
    fn uniform_text_gives_the_vocabulary_size_and_skew_lowers_it() {
        let uniform: Vec<u32> = (0..1000).map(|i| i % 10).collect();
        let p = unigram_perplexity(uniform.iter().copied(), &uniform, 10);
        assert!((p - 10.0).abs() < 1e-9, "{p}");
        let skewed: Vec<u32> = (0..1000).map(|i| if i % 10 == 0 { 1 } else { 0 }).collect();
        let p = unigram_perplexity(skewed.iter().copied(), &skewed, 10);
        // Entropy of (0.9, 0.1) is 0.325 nats: perplexity ~1.38 (plus smoothing).
        assert!(p > 1.3 && p < 1.5, "{p}");
    }
}
