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
        Ok(())
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
        let logits = if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            logits_pen = logits.to_vec();
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if let Some(l) = logits_pen.get_mut(t as usize) {
                    if seen.insert(t) {
                        *l = if *l > 0.0 {
                            *l / p.repeat_penalty
                        } else {
                            *l * p.repeat_penalty
                        };
                    }
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
        self.cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            self.cand.truncate(p.top_k.max(1));
        }
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
