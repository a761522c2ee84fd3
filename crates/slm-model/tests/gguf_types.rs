//! Every GGUF storage type slm reads, on a tiny random Llama written as llama.cpp's converter
//! writes it (GGUF names, Q/K rows permuted for interleaved RoPE), against the same weights as a
//! Hugging Face folder. The folder holds the dequantized values, so what remains is how each
//! path multiplies: exact-order f32 for F32, and 8-bit activations for the block types.

mod common;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;

/// convert_hf_to_gguf.py's `permute`: pairs (i, i + d/2) of each head become adjacent rows.
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// Writes the GGUF with matrices stored as `dtype`, and returns the weights it represents.
fn write_gguf(
    path: &std::path::Path,
    tensors: &[(String, Tensor)],
    dtype: GgmlDType,
    permute_qk: bool,
) -> Vec<(String, Tensor)> {
    let dev = Device::Cpu;
    let mut qs = Vec::new();
    let mut represented = Vec::new();
    for (name, t) in tensors {
        let is_matrix = t.rank() == 2;
        let ty = if is_matrix { dtype } else { GgmlDType::F32 };
        let q = QTensor::quantize(t, ty).unwrap();
        represented.push((name.clone(), q.dequantize(&dev).unwrap()));
        let stored = match (permute_qk, name.contains("q_proj"), name.contains("k_proj")) {
            (true, true, _) => QTensor::quantize(&permute(t, HEADS), ty).unwrap(),
            (true, _, true) => QTensor::quantize(&permute(t, KV_HEADS), ty).unwrap(),
            _ => q,
        };
        // The name mapping itself is checked against llama.cpp's names in weights.rs.
        let gguf_name = slm_model::weights::hf_to_gguf_name(name).expect("a GGUF name");
        qs.push((gguf_name, stored));
    }
    use gguf_file::Value as V;
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.embedding_length", V::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", V::U32(FFN as u32)),
        ("llama.block_count", V::U32(LAYERS as u32)),
        ("llama.attention.head_count", V::U32(HEADS as u32)),
        ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
        ("llama.context_length", V::U32(64)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
    ];
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = qs.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    represented
}

fn logits(path: &std::path::Path) -> Vec<f32> {
    let m = slm_model::load(path, &Device::Cpu).unwrap();
    // The source read without the weights (as the CLI reads it to build the tokenizer
    // first) is the one the load reports.
    match (slm_model::source(path).unwrap(), &m.source) {
        (
            slm_model::ModelSource::Gguf {
                path: p,
                metadata,
                tensor_types,
                file_bytes,
            },
            slm_model::ModelSource::Gguf {
                path: lp,
                metadata: lm,
                tensor_types: lt,
                file_bytes: lb,
            },
        ) => {
            assert_eq!((&p, &tensor_types, file_bytes), (lp, lt, *lb));
            assert_eq!(format!("{metadata:?}"), format!("{lm:?}"));
            assert!(file_bytes > 0 && !tensor_types.is_empty());
        }
        (
            slm_model::ModelSource::HfFolder { dir },
            slm_model::ModelSource::HfFolder { dir: ld },
        ) => {
            assert_eq!(&dir, ld)
        }
        (a, b) => panic!("{}: read as {a:?}, loaded as {b:?}", path.display()),
    }
    let mut cache = m.model.new_cache();
    let mut out = m
        .model
        .next_logits(&[5, 17, 42, 7, 99], &mut cache)
        .unwrap();
    out.extend(m.model.next_logits(&[3], &mut cache).unwrap());
    out
}

/// Largest difference relative to the spread of the reference logits.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let mean = b.iter().sum::<f32>() / b.len() as f32;
    let std = (b.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / b.len() as f32).sqrt();
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / std
}

#[test]
fn every_storage_type_matches_the_same_weights_as_a_folder() {
    let w = tensors(7);
    let dir = tempfile::tempdir().unwrap();
    // Bounds, in units of the reference logits' standard deviation. F32 goes through candle's
    // quantized-matmul path, another f32 summation order (seen: 7e-5). F16/BF16 weights round
    // the activations to their own type first, as llama.cpp does (its vec_dot_type): a
    // relative 2^-11 per value for F16 (seen: 3.6e-3), 2^-8 for BF16 (seen: 1.5e-2); the
    // products are then exact, and `half_matmul`'s own tests hold them to 1e-6 of an f64 sum. The block types quantize activations to
    // 8 bits, about 0.4% of each block's largest entry per value, which moves these logits by
    // 0.05-0.1 std (seen). A layout or decoding mistake moves them by ~1 std (the control
    // below: 0.99), so 0.2 separates the two by a factor of five each way.
    let cases = [
        (GgmlDType::F32, 1e-3),
        (GgmlDType::F16, 0.02),
        (GgmlDType::BF16, 0.07),
        (GgmlDType::Q8_0, 0.2),
        (GgmlDType::Q4_0, 0.2),
        (GgmlDType::Q4_1, 0.2),
        (GgmlDType::Q5_0, 0.2),
        (GgmlDType::Q5_1, 0.2),
        (GgmlDType::Q2K, 0.2),
        (GgmlDType::Q3K, 0.2),
        (GgmlDType::Q4K, 0.2),
        (GgmlDType::Q5K, 0.2),
        (GgmlDType::Q6K, 0.2),
    ];
    for (dtype, tol) in cases {
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        let represented = write_gguf(&path, &w, dtype, true);
        let folder = hf_folder(&config_json(), &represented);
        let (g, f) = (logits(&path), logits(folder.path()));
        let d = rel_diff(&g, &f);
        eprintln!("{dtype:?}: max |gguf - folder| = {d:.2e} of the logits' std");
        assert!(d < tol, "{dtype:?}: {d} >= {tol}");
    }
}

#[test]
fn a_gguf_without_the_qk_permutation_is_detected() {
    // The control for the test above: the same file with Q/K left in HF row order must not
    // pass, or the comparison could not see a RoPE layout mistake.
    let w = tensors(7);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unpermuted.gguf");
    let represented = write_gguf(&path, &w, GgmlDType::F32, false);
    let folder = hf_folder(&config_json(), &represented);
    let d = rel_diff(&logits(&path), &logits(folder.path()));
    eprintln!("unpermuted: {d:.2e}");
    assert!(d > 0.5, "unpermuted Q/K gave {d}");
}
