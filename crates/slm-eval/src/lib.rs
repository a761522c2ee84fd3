//! slm-eval: how well a model predicts text and answers questions, measured as the field
//! does (llama.cpp's perplexity, lm-evaluation-harness's multiple-choice scoring), with
//! results files and HTML reports that compare models.

pub mod choice;
pub mod entities;
pub mod heads;
pub mod metrics;
pub mod perplexity;
pub mod report;
pub mod results;
pub mod run;
pub mod task;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Task(#[from] task::TaskError),
    #[error(transparent)]
    Tokenizer(#[from] slm_tokenizer::TokenizerError),
    #[error(transparent)]
    Perplexity(#[from] perplexity::PerplexityError),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error("document {doc}: a continuation of {tokens} tokens does not fit the model's context of {max}")]
    TooLong {
        doc: usize,
        tokens: usize,
        max: usize,
    },
    #[error(
        "an empty context needs a BOS or EOS token to start from, and the tokenizer has neither"
    )]
    EmptyContext,
    #[error("token id {token} is outside the model's vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error(transparent)]
    Data(#[from] slm_data::DataError),
    #[error("{0}")]
    Head(String),
    #[error(transparent)]
    Config(#[from] slm_model::config::ConfigError),
}

/// SplitMix64: the few-shot draws and bootstrap resamples must be the same on every platform
/// and with every version of a random-number crate, so results files stay reproducible.
pub(crate) struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0); the modulo bias is below 2^-40 for the sizes used here.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
