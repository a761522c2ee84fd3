//! SmolLM2-135M-Instruct in Q4_K_M as the llama.cpp fixture's file was made: the Q4_1 asset
//! requantized to F16, then Q4_K_M (`slm quantize` writes llama-quantize's bytes).

use std::path::{Path, PathBuf};

use slm_compress::quantize::{quantize_gguf, FileType, Options};

/// Writes F16.gguf and the Q4_K_M file into `dir`; returns the latter's path.
pub fn q4_k_m(dir: &Path) -> PathBuf {
    let quantize = |input: &Path, out: &Path, file_type| {
        let opts = Options {
            file_type,
            imatrix: None,
            allow_requantize: true,
            pure: false,
        };
        quantize_gguf(input, out, &opts, &|_, _| {}).unwrap();
    };
    let asset = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (f16, out) = (
        dir.join("F16.gguf"),
        dir.join("SmolLM2-135M-Instruct.Q4_K_M.gguf"),
    );
    quantize(&asset, &f16, FileType::F16);
    quantize(&f16, &out, FileType::Q4KM);
    out
}
