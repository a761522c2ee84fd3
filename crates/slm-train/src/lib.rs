//! slm-train: the training loop's parts: parameter initialisation, AdamW with its state in
//! the open, the learning-rate schedule, and the trainer (trainer.rs: the forward and
//! backward passes written out over fixed buffers, every op's math in slm-kernels) that
//! `run` drives, with candle's autograd through `slm_model::Llama` as its test reference.
//! Distillation, pruning recovery and fine-tuning reuse them with their own objectives
//! (see the trainer's seams).

pub mod adapter;
pub mod bench;
pub mod init;
pub mod kd_cache;
pub mod optim;
pub mod parent;
pub mod prepare;
pub mod quickstart;
pub mod recipe;
pub mod report;
pub mod run;
pub mod samples;
pub mod schedule;
pub mod sft;
pub mod task;
pub mod teacher;
pub mod trainer;
