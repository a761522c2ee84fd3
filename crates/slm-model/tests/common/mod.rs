//! A tiny random Llama for tests that need a whole model but not a trained one.

#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{Device, Tensor};

pub const HIDDEN: usize = 256;
pub const FFN: usize = 512;
pub const LAYERS: usize = 2;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const VOCAB: usize = 300;

pub fn config_json() -> String {
    format!(
        r#"{{"model_type": "llama", "architectures": ["LlamaForCausalLM"],
  "hidden_size": {HIDDEN}, "intermediate_size": {FFN}, "num_hidden_layers": {LAYERS},
  "num_attention_heads": {HEADS}, "num_key_value_heads": {KV_HEADS}, "vocab_size": {VOCAB},
  "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
  "tie_word_embeddings": true}}"#
    )
}

/// HF-named f32 weights: N(0, 0.05) matrices, norms near 1.
pub fn tensors(seed: u64) -> Vec<(String, Tensor)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut v = Vec::new();
    let mut put = |name: String, shape: &[usize], norm: bool| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                // Sum of uniforms: roughly normal, no extra dependency.
                let g: f32 = (0..4).map(|_| rng.random_range(-1f32..1.0)).sum::<f32>() * 0.87;
                if norm {
                    1.0 + 0.1 * g
                } else {
                    0.05 * g
                }
            })
            .collect();
        v.push((name, Tensor::from_vec(data, shape, &dev).unwrap()));
    };
    put("model.embed_tokens.weight".into(), &[VOCAB, HIDDEN], false);
    put("model.norm.weight".into(), &[HIDDEN], true);
    let kv = KV_HEADS * HEAD_DIM;
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[HIDDEN], true);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[HIDDEN],
            true,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[HIDDEN, HIDDEN],
            false,
        );
        put(format!("{p}.self_attn.k_proj.weight"), &[kv, HIDDEN], false);
        put(format!("{p}.self_attn.v_proj.weight"), &[kv, HIDDEN], false);
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[HIDDEN, HIDDEN],
            false,
        );
        put(format!("{p}.mlp.gate_proj.weight"), &[FFN, HIDDEN], false);
        put(format!("{p}.mlp.up_proj.weight"), &[FFN, HIDDEN], false);
        put(format!("{p}.mlp.down_proj.weight"), &[HIDDEN, FFN], false);
    }
    v
}

/// Writes config.json and model.safetensors into a new temporary folder.
pub fn hf_folder(config: &str, tensors: &[(String, Tensor)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, dir.path().join("model.safetensors")).unwrap();
    dir
}
