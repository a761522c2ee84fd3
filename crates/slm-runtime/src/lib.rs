//! slm-runtime: text generation over a loaded model: prompt processing, sampling, stop rules,
//! streaming.

pub mod bench;
pub mod embed;
pub mod engine;
pub mod json_constraint;
pub mod sampler;
pub mod stops;
pub mod synth;

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

pub use sampler::{argmax, Sampler, SamplingParams};
use slm_model::{Cache, Llama};
use slm_tokenizer::Tokenizer;
pub use stops::StopText;

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(
        "the prompt ({prompt} tokens) plus --max-tokens ({max}) exceeds the context length ({ctx}); \
         shorten the prompt, lower --max-tokens, or pass --truncate to drop the start of the prompt"
    )]
    ContextOverflow {
        prompt: usize,
        max: usize,
        ctx: usize,
    },
    #[error(
        "--max-tokens ({max}) leaves no room for the prompt in the context length ({ctx}), \
         even truncated; lower --max-tokens"
    )]
    NoRoomForPrompt { max: usize, ctx: usize },
    #[error(
        "the model produced {what} logits at generated token {at}: its weights or its \
         arithmetic are broken (a NaN or infinite weight?)"
    )]
    NonFinite { what: &'static str, at: usize },
    #[error("empty prompt: there is nothing to continue")]
    EmptyPrompt,
    #[error(
        "constrained output: no token of the vocabulary continues the JSON at generated token {at}"
    )]
    NoValidToken { at: usize },
    #[error("invalid sampling settings: {0}")]
    Sampling(String),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error(transparent)]
    Tokenizer(#[from] slm_tokenizer::TokenizerError),
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text ends with one of these (it is not included in the output).
    pub stop: Vec<String>,
    /// Drop the start of the prompt when prompt + max_tokens does not fit the context.
    pub truncate: bool,
    /// Context length; defaults to the model's.
    pub context: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            truncate: false,
            context: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string appeared.
    Stop,
    /// max_tokens reached.
    Length,
    /// The caller's callback asked to stop (Ctrl-C).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos | FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_time: Duration,
    pub gen_time: Duration,
}

impl Generation {
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }
    pub fn gen_tps(&self) -> f64 {
        self.tokens.len() as f64 / self.gen_time.as_secs_f64().max(1e-9)
    }
}

/// Fits the prompt to the context, or explains why it does not fit.
pub fn fit_prompt(
    prompt: &[u32],
    max_tokens: usize,
    ctx: usize,
    truncate: bool,
) -> Result<Vec<u32>, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    // Saturating: a max_tokens near usize::MAX must not wrap into "fits".
    if prompt.len().saturating_add(max_tokens) <= ctx {
        return Ok(prompt.to_vec());
    }
    if !truncate {
        return Err(GenerateError::ContextOverflow {
            prompt: prompt.len(),
            max: max_tokens,
            ctx,
        });
    }
    if max_tokens >= ctx {
        return Err(GenerateError::NoRoomForPrompt {
            max: max_tokens,
            ctx,
        });
    }
    Ok(prompt[prompt.len() - (ctx - max_tokens)..].to_vec())
}

/// Prompt tokens a forward pass takes at most: llama.cpp's default micro-batch (`n_ubatch`).
/// A longer prompt runs in pieces of this size, as in llama.cpp, because a K-quant matmul's
/// rounding depends on how many rows it has (`slm_kernels::kquant`): a prompt of 515 tokens is
/// 512 rows and then 3, and its last 3 rows round as llama.cpp's do only in a batch of 3. The
/// pieces also bound a long prompt's activations.
pub const UBATCH: usize = 512;

/// A model's cache with the tokens it holds, so a chat's next turn only processes what is new.
pub struct Session {
    pub cache: Cache,
    tokens: Vec<u32>,
}

impl Session {
    pub fn new(model: &Llama) -> Self {
        Self {
            cache: model.new_cache(),
            tokens: Vec::new(),
        }
    }
    pub fn reset(&mut self) {
        self.cache.reset();
        self.tokens.clear();
    }
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Feeds `prompt`, reusing the longest cached prefix; returns the last position's logits.
    pub fn prefill(&mut self, model: &Llama, prompt: &[u32]) -> Result<Vec<f32>, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let common = self
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least the last prompt token must run to produce logits.
        let keep = common.min(prompt.len() - 1);
        self.cache.truncate(keep);
        self.tokens.truncate(keep);
        let mut logits = Vec::new();
        for piece in prompt[keep..].chunks(UBATCH) {
            logits = model.next_logits(piece, &mut self.cache)?;
            self.tokens.extend_from_slice(piece);
        }
        Ok(logits)
    }
    fn step(&mut self, model: &Llama, token: u32) -> Result<Vec<f32>, GenerateError> {
        let logits = model.next_logits(&[token], &mut self.cache)?;
        self.tokens.push(token);
        Ok(logits)
    }
}

/// Generates a continuation of `prompt` (token ids). `on_text` receives each new piece of text
/// as soon as it is complete UTF-8 and may return `Break` to stop.
///
/// `session` may already hold a prefix of `prompt` (a chat's earlier turns): only the part
/// after it is processed.
pub fn generate(
    model: &Llama,
    tok: &Tokenizer,
    session: &mut Session,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation, GenerateError> {
    opts.sampling.validate().map_err(GenerateError::Sampling)?;
    let ctx = opts
        .context
        .unwrap_or(model.config.max_position_embeddings)
        .min(model.config.max_position_embeddings);
    let prompt = fit_prompt(prompt, opts.max_tokens, ctx, opts.truncate)?;
    let mut sampler = Sampler::new(opts.sampling.clone());
    let t0 = Instant::now();
    let logits = session.prefill(model, &prompt)?;
    let prompt_time = t0.elapsed();

    let t1 = Instant::now();
    let mut history = prompt.clone();
    let mut out = Vec::new();
    let mut text = StopText::new(tok, opts.stop.clone());
    let mut logits = logits;
    let mut finish = FinishReason::Length;
    while out.len() < opts.max_tokens {
        check_logits(&mut logits, tok.vocab_size(), out.len())?;
        let next = sampler.sample(&logits, &history);
        if tok.is_stop(next) {
            finish = FinishReason::Eos;
            break;
        }
        out.push(next);
        history.push(next);
        let (piece, stopped) = text.push(next)?;
        if stopped {
            if !piece.is_empty() {
                let _ = on_text(&piece);
            }
            finish = FinishReason::Stop;
            break;
        }
        if !piece.is_empty() && on_text(&piece).is_break() {
            finish = FinishReason::Cancelled;
            break;
        }
        if out.len() == opts.max_tokens {
            break;
        }
        logits = session.step(model, next)?;
    }
    if finish != FinishReason::Stop && finish != FinishReason::Cancelled {
        let rest = text.flush();
        if !rest.is_empty() {
            let _ = on_text(&rest);
        }
    }
    let text = text.text().to_string();
    Ok(Generation {
        prompt_tokens: prompt.len(),
        tokens: out,
        text,
        finish,
        prompt_time,
        gen_time: t1.elapsed(),
    })
}

/// Readies a step's logits for sampling: rows of the embedding past the tokenizer's ids
/// (padding, as Qwen2 ships) have no text and are never sampled; NaN or no finite logit at
/// all means the model is broken, which is an error rather than a token.
pub fn check_logits(logits: &mut [f32], speakable: usize, at: usize) -> Result<(), GenerateError> {
    if let Some(padding) = logits.get_mut(speakable..) {
        padding.fill(f32::NEG_INFINITY);
    }
    if logits.iter().any(|x| x.is_nan()) {
        return Err(GenerateError::NonFinite { what: "NaN", at });
    }
    if !logits.iter().any(|x| x.is_finite()) {
        return Err(GenerateError::NonFinite {
            what: "no finite",
            at,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_fitting() {
        assert_eq!(fit_prompt(&[1, 2, 3], 5, 8, false).unwrap(), vec![1, 2, 3]);
        let err = fit_prompt(&[1, 2, 3, 4], 5, 8, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--truncate") && err.contains("context length (8)"),
            "{err}"
        );
        assert_eq!(
            fit_prompt(&[1, 2, 3, 4], 5, 8, true).unwrap(),
            vec![2, 3, 4]
        );
        assert!(matches!(
            fit_prompt(&[1], 8, 8, true),
            Err(GenerateError::NoRoomForPrompt { max: 8, ctx: 8 })
        ));
        // A max_tokens that would overflow prompt + max_tokens is refused, not wrapped.
        assert!(matches!(
            fit_prompt(&[1, 2, 3, 4, 5], usize::MAX - 4, 16, false),
            Err(GenerateError::ContextOverflow { .. })
        ));
        assert!(matches!(
            fit_prompt(&[], 1, 8, false),
            Err(GenerateError::EmptyPrompt)
        ));
    }
}
