//! slm-compress: models rewritten for other tools: Hugging Face folders and GGUF files in the
//! float types (`export`); quantization and pruning to come.

pub mod export;
pub mod quantize;
