//! slm-kernels: the CPU compute under every model slm runs or trains, knowing nothing of
//! models or files.
//!
//! Two arithmetics live here side by side, each named by its module:
//! - llama.cpp's (inference on GGUF weights): the block matmuls (`quant`, Q4_0/Q4_1/Q8_0 with
//!   8-bit activations), `half_matmul` (F16/BF16), `kquant` (K-quants through candle's dot
//!   products) and ggml's elementwise roundings (`ggml_math`: RMSNorm, RoPE, SwiGLU, expf,
//!   f16 attention dots), attention over an f16 KV cache (`attention`) and over packed
//!   sequences for evaluation (`packed`), all on the spinning worker `pool` with per-thread
//!   `scratch`.
//! - f32 training: each op's forward and backward once (`train`: RMSNorm, RoPE, SwiGLU,
//!   causal attention, the embedding; `head`: the output projection fused with
//!   cross-entropy), over `gemm` products on rayon's threads, with the shared `exp`.
//!
//! Every kernel has a property test against a plain reference (scalar code or candle's
//! composed ops), bit for bit where the arithmetic is llama.cpp's.

pub mod attention;
pub mod exp;
pub mod gemm;
pub mod ggml_math;
pub mod half_matmul;
pub mod head;
pub mod kd;
pub mod kquant;
pub mod lora;
pub mod packed;
pub mod pool;
pub mod process;
pub mod quant;
mod scratch;

pub use scratch::MapError;
pub mod train;
