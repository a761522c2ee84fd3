//! Token sampling, in llama.cpp's order: repetition penalty, top-k, top-p, min-p,
//! temperature, then a draw. Temperature 0 is greedy (argmax).

use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 keeps all tokens.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// 1.0 is off. Divides positive logits (multiplies negative ones) of recent tokens.
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI's penalties over the same window: subtracted once from a token that appears
    /// (presence), and once per appearance (frequency); 0 is off.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        // llama.cpp's defaults.
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature {} must be >= 0", self.temperature));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(format!("top-p {} must be in [0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p {} must be in [0, 1]", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!(
                "repeat penalty {} must be > 0",
                self.repeat_penalty
            ));
        }
        for (name, v) in [
            ("presence penalty", self.presence_penalty),
            ("frequency penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} {v} must be in [-2, 2]"));
            }
        }
        Ok(())
    }

    fn penalises(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch: (id, logit) candidates, reused between calls.
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            cand: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits_pen;
        let logits = if p.penalises() {
            // llama.cpp's penalties sampler: each distinct token of the window is penalised
            // once by the repeat penalty, then by count * frequency + presence.
            logits_pen = logits.to_vec();
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut counts = std::collections::HashMap::new();
            for &t in &history[start..] {
                *counts.entry(t).or_insert(0u32) += 1;
            }
            for (&t, &n) in &counts {
                if let Some(l) = logits_pen.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                    *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
            &logits_pen[..]
        } else {
            logits
        };
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l)),
        );
        if self.cand.is_empty() {
            return argmax(logits);
        }
        // Only the top k need ordering: select them first (a full sort of a 50k vocabulary
        // per token was most of the sampler's time).
        if p.top_k > 0 && self.cand.len() > p.top_k {
            self.cand
                .select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            self.cand.truncate(p.top_k);
        }
        self.cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        // Probabilities at temperature 1 for the top-p and min-p cuts, as llama.cpp does.
        let max = self.cand[0].1;
        let probs: Vec<f32> = self.cand.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = self.cand.len();
            for (i, pr) in probs.iter().enumerate() {
                cum += pr / total;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            // relative to the top token's probability: exp(l - max) >= min_p
            let cut = max + p.min_p.ln();
            let keep = self.cand.iter().take_while(|c| c.1 >= cut).count();
            self.cand.truncate(keep.max(1));
        }
        let weights: Vec<f32> = self
            .cand
            .iter()
            .map(|c| ((c.1 - max) / p.temperature).exp())
            .collect();
        let sum: f32 = weights.iter().sum();
        let mut r = self.rng.random::<f32>() * sum;
        for (c, w) in self.cand.iter().zip(&weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        self.cand.last().expect("non-empty").0
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-probabilities of `id` and of the `top` most likely tokens under `logits` (softmax at
/// temperature 1, the model's own distribution), most likely first.
pub fn logprobs(logits: &[f32], id: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + sum.ln();
    let lp = |l: f32| (l as f64 - log_z) as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() < top || l > best[best.len() - 1].1 {
                let at = best.partition_point(|b| b.1 >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
    }
    let chosen = logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |&l| lp(l));
    (chosen, best.into_iter().map(|(i, l)| (i, lp(l))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn repeat_penalty_changes_the_winner() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.5,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[1]), 3);
    }

    #[test]
    fn top_k_1_is_greedy_whatever_the_temperature() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..SamplingParams::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[]), 1);
        }
    }

    #[test]
    fn sampling_follows_the_distribution_and_the_seed() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..SamplingParams::default()
        };
        let logits = [0f32, (3f32).ln()]; // p = 0.25, 0.75
        let mut s = Sampler::new(params.clone());
        let draws: Vec<u32> = (0..4000).map(|_| s.sample(&logits, &[])).collect();
        let ones = draws.iter().filter(|&&d| d == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        let mut again = Sampler::new(params);
        let redraw: Vec<u32> = (0..4000).map(|_| again.sample(&logits, &[])).collect();
        assert_eq!(draws, redraw, "same seed, same draws");
    }

    #[test]
    fn presence_and_frequency_penalties_follow_llama_cpp() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            ..SamplingParams::greedy()
        });
        // token 1: 3.0 - (2 * 0.3 + 0.5) = 1.9 < 2.0 (token 3, seen once: 2.9 - 0.8 = 2.1)
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9, 2.0], &[1, 1, 3]), 3);
        let bad = SamplingParams {
            presence_penalty: 2.5,
            ..SamplingParams::default()
        };
        assert!(bad.validate().unwrap_err().contains("presence penalty 2.5"));
    }

    #[test]
    fn logprobs_are_the_log_softmax() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        let (lp, top) = logprobs(&logits, 2, 2);
        assert!((lp as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((top[0].1 as f64 - (3.0 - z.ln())).abs() < 1e-6);
        assert!(logprobs(&logits, 0, 0).1.is_empty());
    }

    #[test]
    fn min_p_removes_unlikely_tokens() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.2,
            ..SamplingParams::default()
        });
        // token 0 has p/p_max = e^-3 < 0.2: never drawn
        for _ in 0..500 {
            assert_ne!(s.sample(&[0.0, 3.0, 3.0], &[]), 0);
        }
    }
}
