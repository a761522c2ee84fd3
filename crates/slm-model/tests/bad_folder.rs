//! Hugging Face folders that are incomplete or corrupt: a clear error naming the file or the
//! tensor, never a panic. A complete tiny folder is the control that must load and run.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

mod common;

fn tensors() -> HashMap<String, Tensor> {
    common::tensors(1).into_iter().collect()
}

fn folder(config: &str, tensors: &HashMap<String, Tensor>) -> tempfile::TempDir {
    let t: Vec<(String, Tensor)> = tensors.clone().into_iter().collect();
    common::hf_folder(config, &t)
}

fn load_err(dir: &Path) -> String {
    match slm_model::load(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_complete_tiny_folder_loads_and_runs() {
    let dir = folder(&common::config_json(), &tensors());
    let m = slm_model::load(dir.path(), &Device::Cpu).unwrap();
    let mut cache = m.model.new_cache();
    let logits = m.model.next_logits(&[1, 2, 3], &mut cache).unwrap();
    assert_eq!(logits.len(), common::VOCAB);
    assert!(logits.iter().all(|x| x.is_finite()));
}

#[test]
fn missing_or_bad_files_are_named() {
    let empty = tempfile::tempdir().unwrap();
    let e = load_err(empty.path());
    assert!(e.contains("config.json"), "{e}");

    let dir = folder(&common::config_json(), &tensors());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");

    let dir = folder(
        &common::config_json().replace("\"llama\"", "\"gpt_bigcode\""),
        &tensors(),
    );
    let e = load_err(dir.path());
    assert!(
        e.contains("gpt_bigcode") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn corrupt_or_truncated_safetensors_are_errors() {
    let dir = folder(&common::config_json(), &tensors());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 7, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains("safetensors"), "cut at {cut}: {e}");
    }
    // A header length far beyond the file.
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &huge).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("safetensors"), "{e}");
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let mut t = tensors();
    t.remove("model.layers.1.mlp.up_proj.weight");
    let dir = folder(&common::config_json(), &t);
    let e = load_err(dir.path());
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");

    let mut t = tensors();
    t.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((common::HIDDEN, common::HIDDEN), DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = folder(&common::config_json(), &t);
    let e = load_err(dir.path());
    assert!(e.contains("k_proj"), "{e}");
}

#[test]
fn f16_and_bf16_safetensors_load_as_their_f32_values() {
    use candle_core::DType;
    let w = common::tensors(3);
    for dt in [DType::F16, DType::BF16] {
        let stored: Vec<(String, Tensor)> = w
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(dt).unwrap()))
            .collect();
        let widened: Vec<(String, Tensor)> = stored
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(DType::F32).unwrap()))
            .collect();
        let run = |dir: &Path| {
            let m = slm_model::load(dir, &Device::Cpu).unwrap();
            let mut cache = m.model.new_cache();
            m.model.next_logits(&[4, 8, 15, 16], &mut cache).unwrap()
        };
        let a = run(common::hf_folder(&common::config_json(), &stored).path());
        let b = run(common::hf_folder(&common::config_json(), &widened).path());
        assert_eq!(
            a, b,
            "{dt:?} weights should load exactly as their f32 values"
        );
    }
}
