//! The model against llama.cpp on SmolLM2-135M-Instruct: top-10 next-token logits and greedy
//! continuations from ../shared/fixtures/reference (produced by llama.cpp, not by slm).
//! slm reproduces the reference build's arithmetic (slm_kernels::ggml_math, quant,
//! half_matmul), so every logit equals llama.cpp's at the six decimals the fixture prints
//! (finer than one f32 ulp at these magnitudes: the same float) and the greedy tokens are
//! the same. Q4_1 is the fetched asset; Q8_0 is made from it as the fixture's was
//! (tests/support/requantize.rs).

#[path = "support/requantize.rs"]
mod requantize;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use serde_json::Value;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A logit as the fixture prints it.
fn printed(x: f64) -> String {
    format!("{x:.6}")
}

fn matches_fixture(model_path: &Path, fixture: &str) {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("fixtures/reference").join(fixture)).unwrap(),
    )
    .unwrap();
    let loaded = slm_model::load(model_path, &Device::Cpu).unwrap();
    let model = &loaded.model;
    for p in reference["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["token_ids"]);
        let mut cache = model.new_cache();
        let logits = model.next_logits(&prompt, &mut cache).unwrap();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let ours: Vec<(usize, String)> = order[..10]
            .iter()
            .map(|&i| (i, printed(logits[i] as f64)))
            .collect();
        let theirs: Vec<(usize, String)> = p["top10"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["id"].as_u64().unwrap() as usize,
                    printed(t["logit"].as_f64().unwrap()),
                )
            })
            .collect();
        assert_eq!(ours, theirs, "{fixture} {name}: top-10 (id, logit) differ");

        let want = ids(&p["greedy_ids"]);
        let mut got = Vec::new();
        let mut next = order[0] as u32;
        for _ in 0..want.len() {
            got.push(next);
            let l = model.next_logits(&[next], &mut cache).unwrap();
            next = l
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
        }
        assert_eq!(
            got, want,
            "{fixture} {name}: greedy continuation differs from llama.cpp"
        );
    }
}

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
