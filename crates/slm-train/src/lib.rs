//! slm-train: the training loop's parts: parameter initialisation, the loss, AdamW with its
//! state in the open, and the learning-rate schedule. Distillation, pruning recovery and
//! fine-tuning reuse them with their own objectives.

pub mod init;
pub mod optim;
pub mod recipe;
pub mod report;
pub mod run;
pub mod samples;
pub mod schedule;

use candle_core::{Tensor, D};

/// Mean next-token cross-entropy of logits (b, t, vocab) against targets (b, t).
pub fn lm_loss(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    candle_nn::loss::cross_entropy(&logits.reshape(((), v))?, &targets.flatten_all()?)
}
