include!("../../build-support/test_assets.rs");

fn main() {
    python_cfg("python_transformers", "torch, transformers");
}
