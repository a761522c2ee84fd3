//! Hugging Face folders that are incomplete or corrupt: a clear error naming the file or the
//! tensor, never a panic. A complete tiny folder is the control that must load and run.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

const CONFIG: &str = r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"],
  "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
  "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
  "tie_word_embeddings": true}"#;

fn tensors() -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut m = HashMap::new();
    let mut put = |name: String, shape: &[usize]| {
        let t = Tensor::randn(0f32, 0.02, shape, &dev).unwrap();
        m.insert(name, t);
    };
    put("model.embed_tokens.weight".into(), &[100, 64]);
    put("model.norm.weight".into(), &[64]);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[64]);
        put(format!("{p}.post_attention_layernorm.weight"), &[64]);
        put(format!("{p}.self_attn.q_proj.weight"), &[64, 64]);
        put(format!("{p}.self_attn.k_proj.weight"), &[32, 64]);
        put(format!("{p}.self_attn.v_proj.weight"), &[32, 64]);
        put(format!("{p}.self_attn.o_proj.weight"), &[64, 64]);
        put(format!("{p}.mlp.gate_proj.weight"), &[128, 64]);
        put(format!("{p}.mlp.up_proj.weight"), &[128, 64]);
        put(format!("{p}.mlp.down_proj.weight"), &[64, 128]);
    }
    m
}

fn folder(config: &str, tensors: &HashMap<String, Tensor>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    candle_core::safetensors::save(tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match slm_model::load(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_complete_tiny_folder_loads_and_runs() {
    let dir = folder(CONFIG, &tensors());
    let m = slm_model::load(dir.path(), &Device::Cpu).unwrap();
    let mut cache = m.model.new_cache();
    let logits = m.model.next_logits(&[1, 2, 3], &mut cache).unwrap();
    assert_eq!(logits.len(), 100);
    assert!(logits.iter().all(|x| x.is_finite()));
}

#[test]
fn missing_or_bad_files_are_named() {
    let empty = tempfile::tempdir().unwrap();
    let e = load_err(empty.path());
    assert!(e.contains("config.json"), "{e}");

    let dir = folder(CONFIG, &tensors());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");

    let dir = folder(&CONFIG.replace("\"llama\"", "\"gpt_bigcode\""), &tensors());
    let e = load_err(dir.path());
    assert!(
        e.contains("gpt_bigcode") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn corrupt_or_truncated_safetensors_are_errors() {
    let dir = folder(CONFIG, &tensors());
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
    let dir = folder(CONFIG, &t);
    let e = load_err(dir.path());
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");

    let mut t = tensors();
    t.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = folder(CONFIG, &t);
    let e = load_err(dir.path());
    assert!(e.contains("k_proj"), "{e}");
}
