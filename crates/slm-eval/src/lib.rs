//! slm-eval: how well a model predicts text, measured as the field does.

pub mod perplexity;
