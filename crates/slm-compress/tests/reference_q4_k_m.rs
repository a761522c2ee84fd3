//! SmolLM2-135M-Instruct in Q4_K_M against llama.cpp: `slm quantize` makes the file as the
//! fixture's was made (the Q4_1 asset requantized to F16, then Q4_K_M), its bytes are the
//! fixture's (sha256), and slm's kernels for its types (Q5_0, Q8_0, Q4_K and Q6_K) compute
//! llama.cpp's top-10 logits and greedy continuations exactly.

#[path = "../../slm-model/tests/support/fixture.rs"]
mod fixture;
#[path = "support/q4_k_m.rs"]
mod q4_k_m;

#[test]
#[cfg_attr(
    not(smollm2_q4_1),
    ignore = "needs models/SmolLM2-135M-Instruct.Q4_1.gguf: run ../shared/fetch-assets.sh models"
)]
fn q4_k_m_is_the_fixtures_file_and_its_logits_and_greedy_equal_llama_cpp() {
    let fixture_name = "smollm2-135m-instruct-q4_k_m.llamacpp.json";
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            fixture::shared()
                .join("fixtures/reference")
                .join(fixture_name),
        )
        .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let q4km = q4_k_m::q4_k_m(dir.path());
    assert_eq!(
        {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(std::fs::read(&q4km).unwrap()))
        },
        reference["model_sha256"].as_str().unwrap(),
        "slm quantize's Q4_K_M is not the file the fixture was made from"
    );
    fixture::matches_fixture(&q4km, fixture_name);
}
