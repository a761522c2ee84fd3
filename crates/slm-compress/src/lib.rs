//! slm-compress: models rewritten for other tools: Hugging Face folders and GGUF files in the
//! float types (`export`), GGUF files in ggml's block types (`quantize`, by the row
//! quantizers of `quants`), importance matrices to guide them (`imatrix`); pruning to come.

pub mod export;
pub mod imatrix;
pub mod quantize;
pub mod quants;
