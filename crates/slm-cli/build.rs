include!("../../build-support/test_assets.rs");

fn main() {
    asset_cfg("smollm2_q4_1", "models/SmolLM2-135M-Instruct.Q4_1.gguf");
    python_cfg("python_transformers", "torch, transformers");
    python_cfg("python_peft", "torch, transformers, peft");
    python_cfg("python_openai", "openai, sentence_transformers, numpy");
    program_cfg("chromedriver", "chromedriver");
}
