//! `slm export --format hf` of SmolLM2-135M-Instruct (Q4_1 GGUF): the folder loads in slm and
//! in transformers, and both give the logits of slm's f32 path over the GGUF (its weights
//! dequantized, attention in f32 without a cache).

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use slm_compress::export::{gguf_to_hf, hf_to_gguf, FloatType};

fn model() -> PathBuf {
    slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// Largest |logit difference| allowed between two f32 evaluations of SmolLM2 that differ only
/// in summation order (candle's gemm, torch's BLAS, ggml's f32 elementwise order). Measured:
/// 1.2e-4 between slm and transformers on the exported folder, 2.3e-4 between transformers
/// and slm's f32 path over the GGUF, with logits up to 27 (about 1e-5 relative): 30 layers of
/// activations near 2e4 amplify the last-bit differences. A layout error is far larger
/// (leaving q's rows permuted moves logits by 35).
const F32_ORDER: f32 = 5e-4;

const PROMPT: &str = "The white whale swam under the deep sea. The captain sailed";

/// Logits (positions x vocab) of `ids` through `m` from position 0, no cache.
fn logits(m: &slm_model::Llama, ids: &[u32]) -> Vec<Vec<f32>> {
    let t = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&t, None, false)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn export(dir: &Path, ty: FloatType) -> (PathBuf, Vec<u32>, Vec<Vec<f32>>) {
    let out = dir.join("hf");
    gguf_to_hf(&model(), &out, ty).unwrap();
    let g = slm_model::load(&model(), &Device::Cpu).unwrap();
    let tok = slm_tokenizer::Tokenizer::for_model(&g.source).unwrap();
    let ids = tok.encode(PROMPT, true).unwrap();
    let reference = logits(&g.model.dequantized().unwrap(), &ids);
    (out, ids, reference)
}

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn exported_folder_loads_in_slm_with_the_same_logits_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (out, ids, reference) = export(dir.path(), FloatType::F32);
    let h = slm_model::load(&out, &Device::Cpu).unwrap();
    let tok = slm_tokenizer::Tokenizer::from_folder(&out).unwrap();
    assert_eq!(tok.encode(PROMPT, true).unwrap(), ids);
    assert!(tok.chat_template.is_some());
    let d = max_diff(&logits(&h.model, &ids), &reference);
    eprintln!("slm HF folder vs slm f32 GGUF path: max |diff| {d:e}");
    assert!(d < F32_ORDER, "{d}");
    // Nothing but the folder is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("hf")]);
    // An existing folder is not overwritten.
    let e = gguf_to_hf(&model(), &out, FloatType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
}

#[test]
#[cfg_attr(
    any(not(smollm2_q4_1), not(python_transformers)),
    ignore = "needs ../shared/fetch-assets.sh models and a Python with torch and transformers in $SLM_PYTHON"
)]
fn exported_folder_loads_in_transformers_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (out, ids, reference) = export(dir.path(), FloatType::F32);
    let py = std::env::var("SLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support_logits.py");
    let ids_arg: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let o = Command::new(&py)
        .arg(&script)
        .arg(&out)
        .arg(ids_arg.join(","))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["class"], "LlamaForCausalLM");
    let hf: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    let d = max_diff(&hf, &reference);
    eprintln!("transformers vs slm f32 GGUF path: max |diff| {d:e}");
    assert!(d < F32_ORDER, "{d}");
    let h = slm_model::load(&out, &Device::Cpu).unwrap();
    let d = max_diff(&hf, &logits(&h.model, &ids));
    eprintln!("transformers vs slm on the folder: max |diff| {d:e}");
    assert!(d < F32_ORDER, "{d}");
}

/// GGUF (Q4_1) -> folder (f32) -> GGUF (f32): the new GGUF holds the dequantized weights in
/// the original's layout, so slm's f32 path gives the original's logits bit for bit, and its
/// tokenizer the same ids. Folder -> GGUF -> folder gives the same safetensors bytes, in each
/// float type.
#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn folder_and_gguf_round_trips_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, ids, reference) = export(d, FloatType::F32);
    let b = d.join("b.gguf");
    hf_to_gguf(&a, &b, FloatType::F32).unwrap();
    let g = slm_model::load(&b, &Device::Cpu).unwrap();
    assert_eq!(logits(&g.model.dequantized().unwrap(), &ids), reference);
    let tok = slm_tokenizer::Tokenizer::for_model(&g.source).unwrap();
    assert_eq!(tok.encode(PROMPT, true).unwrap(), ids);
    assert!(tok.chat_template.is_some());
    for ty in [FloatType::F32, FloatType::F16, FloatType::BF16] {
        let first = d.join(format!("{ty:?}-1"));
        gguf_to_hf(&model(), &first, ty).unwrap();
        let g = d.join(format!("{ty:?}.gguf"));
        hf_to_gguf(&first, &g, ty).unwrap();
        let second = d.join(format!("{ty:?}-2"));
        gguf_to_hf(&g, &second, ty).unwrap();
        for f in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(
                std::fs::read(first.join(f)).unwrap() == std::fs::read(second.join(f)).unwrap(),
                "{ty:?}: {f} differs after the round trip"
            );
        }
    }
}
