//! The model against llama.cpp on SmolLM2-135M-Instruct: top-10 next-token logits and greedy
//! continuations from ../shared/fixtures/reference (produced by llama.cpp, not by slm).
//! slm reproduces the reference build's arithmetic (slm_kernels::ggml_math, quant,
//! half_matmul), so every logit equals llama.cpp's at the six decimals the fixture prints
//! (finer than one f32 ulp at these magnitudes: the same float) and the greedy tokens are
//! the same. Q4_1 is the fetched asset; Q8_0 is made from it as the fixture's was
//! (tests/support/requantize.rs).

#[path = "support/fixture.rs"]
mod fixture;
#[path = "support/requantize.rs"]
mod requantize;

use candle_core::quantized::GgmlDType;
use fixture::matches_fixture;

#[test]
#[cfg_attr(
    not(smollm2_q4_1),
    ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf: run ../shared/fetch-assets.sh models"
)]
fn q4_1_top10_logits_and_greedy_equal_llama_cpp() {
    let path = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    matches_fixture(&path, "smollm2-135m-instruct-q4_1.llamacpp.json");
}

#[test]
#[cfg_attr(
    not(smollm2_q4_1),
    ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf: run ../shared/fetch-assets.sh models"
)]
fn q8_0_top10_logits_and_greedy_equal_llama_cpp() {
    let path = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = tempfile::tempdir().unwrap();
    let q8 = dir.path().join("SmolLM2-135M-Instruct.Q8_0.gguf");
    requantize::requantize(&path, &q8, GgmlDType::Q8_0);
    matches_fixture(&q8, "smollm2-135m-instruct-q8_0.llamacpp.json");
}
