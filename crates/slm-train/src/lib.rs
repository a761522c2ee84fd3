//! slm-train: the training loop's parts: parameter initialisation, the loss, AdamW with its
//! state in the open, the learning-rate schedule, and the fused trainer (trainer.rs, the
//! forward and backward passes written out over fixed buffers) that `run` uses wherever it
//! handles the model, with candle's autograd through `slm_model::Llama` as its reference.
//! Distillation, pruning recovery and fine-tuning reuse them with their own objectives.

pub mod bench;
pub mod init;
pub mod loss;
pub mod optim;
pub mod recipe;
pub mod report;
pub mod run;
pub mod samples;
pub mod schedule;
pub mod trainer;

pub use loss::{lm_head_loss, lm_loss, model_loss};
