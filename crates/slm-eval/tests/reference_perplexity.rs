//! Perplexity of SmolLM2-135M-Instruct Q4_1 on ../shared/fixtures/reference/eval.txt against
//! llama-perplexity's 23.8663 (ctx 512). Slow in debug builds: .ci/run runs tests with --release.

use std::path::PathBuf;

use candle_core::Device;
use slm_tokenizer::Tokenizer;

#[test]
#[cfg_attr(
    not(smollm2_q4_1),
    ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf: run ../shared/fetch-assets.sh models"
)]
fn q4_1_perplexity_within_one_percent_of_llama_cpp() {
    let path = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/reference/eval.txt"),
    )
    .unwrap();
    let loaded = slm_model::load(&path, &Device::Cpu).unwrap();
    let tok = Tokenizer::for_model(&loaded.source).unwrap();
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(ids.len(), 51_313, "token count differs from llama.cpp's");
    let p = slm_eval::perplexity::perplexity(&loaded.model, &ids, 512, None, false).unwrap();
    let reference = 23.8663;
    eprintln!(
        "slm perplexity {:.4} +/- {:.4}, llama.cpp {reference}",
        p.ppl, p.stderr
    );
    assert_eq!(p.windows, 100);
    assert!(
        (p.ppl - reference).abs() / reference < 0.01,
        "perplexity {} vs llama.cpp {reference}",
        p.ppl
    );
}
