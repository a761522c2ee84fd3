include!("../../build-support/test_assets.rs");

fn main() {
    asset_cfg("smollm2_q4_1", "models/SmolLM2-135M-Instruct.Q4_1.gguf");
    python_cfg("python_seqeval", "seqeval");
}
