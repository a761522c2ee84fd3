//! What the reference tests share: the F16 GGUF of SmolLM2-135M-Instruct the references were
//! made from.

use std::path::{Path, PathBuf};

use slm_compress::export::{gguf_to_hf, hf_to_gguf, FloatType};

/// The F16 GGUF made again by slm from the Q4_1 asset in `dir`: Q4_1 -> Hugging Face folder
/// in f16 -> GGUF in f16, as bench/quantize-reference.sh does.
pub fn f16_input(dir: &Path) -> PathBuf {
    let asset = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    gguf_to_hf(&asset, &dir.join("hf16"), FloatType::F16).unwrap();
    let input = dir.join("f16.gguf");
    hf_to_gguf(&dir.join("hf16"), &input, FloatType::F16).unwrap();
    input
}

/// The folder of the committed reference files.
pub fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}
