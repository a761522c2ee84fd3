//! Prints each tensor of a GGUF file as `name type sha256-of-its-data`, one per line in file
//! order: how bench/quantize-reference.sh records llama-quantize's outputs, and how the
//! quantize test compares slm's with them (metadata may differ; tensor data must not).
//!
//!     cargo run --release -p slm-compress --example tensor_hashes -- FILE.gguf

use sha2::Digest;

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: tensor_hashes FILE.gguf");
    let g = slm_model::GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
    for t in &g.tensors {
        let h = hex::encode(sha2::Sha256::digest(g.tensor_bytes(t)));
        println!("{} {} {h}", t.name, t.dtype.name());
    }
}
