//! `slm quantize` writes the tensor data llama-quantize writes, byte for byte, for each legacy
//! file type (q8_0, q4_0, q4_1, q5_0, q5_1), from one F16 GGUF of SmolLM2-135M-Instruct made
//! by slm from the Q4_1 asset. The reference hashes come from llama.cpp built outside the
//! repository (bench/quantize-reference.sh; tests/reference/README).

use std::path::Path;

use sha2::Digest;
use slm_compress::export::{gguf_to_hf, hf_to_gguf, FloatType};
use slm_compress::quantize::{quantize_gguf, FileType};

fn hashes(path: &Path) -> Vec<String> {
    let g = slm_model::GgufFile::open(path).unwrap();
    let mut v: Vec<String> = g
        .tensors
        .iter()
        .map(|t| {
            let h = hex::encode(sha2::Sha256::digest(g.tensor_bytes(t)));
            format!("{} {} {h}", t.name, t.dtype.name())
        })
        .collect();
    v.sort();
    v
}

/// The F16 GGUF the reference was made from, made again by slm from the Q4_1 asset in `dir`:
/// Q4_1 -> Hugging Face folder in f16 -> GGUF in f16, as bench/quantize-reference.sh does.
fn f16_input(dir: &Path) -> std::path::PathBuf {
    let asset = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    gguf_to_hf(&asset, &dir.join("hf16"), FloatType::F16).unwrap();
    let input = dir.join("f16.gguf");
    hf_to_gguf(&dir.join("hf16"), &input, FloatType::F16).unwrap();
    input
}

fn reference(name: &str) -> Vec<String> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(name);
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn differing(ours: &[String], theirs: &[String]) -> Vec<String> {
    ours.iter()
        .filter(|l| !theirs.contains(l))
        .take(5)
        .cloned()
        .collect()
}

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn legacy_types_match_llama_quantize_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = f16_input(d);
    let ours = hashes(&input);
    assert_eq!(
        ours,
        reference("input-f16.txt"),
        "the F16 input differs from the reference's"
    );
    for (name, ft) in [
        ("q8_0", FileType::Q8_0),
        ("q4_0", FileType::Q4_0),
        ("q4_1", FileType::Q4_1),
        ("q5_0", FileType::Q5_0),
        ("q5_1", FileType::Q5_1),
    ] {
        let out = d.join(format!("{name}.gguf"));
        quantize_gguf(&input, &out, ft, false, &|_, _| {}).unwrap();
        let (ours, theirs) = (hashes(&out), reference(&format!("{name}.txt")));
        assert!(
            ours == theirs,
            "{name}: {} tensors differ from llama-quantize's, e.g. {:?}",
            differing(&ours, &theirs).len(),
            differing(&ours, &theirs)
        );
        // And the result runs: slm loads it.
        slm_model::load(&out, &candle_core::Device::Cpu).unwrap();
        std::fs::remove_file(&out).unwrap();
    }
}

/// The K-quant tensors llama-quantize writes in a q4_k_m file of SmolLM2 (ffn_down: Q6_K in
/// its "more bits" layers, Q4_K in the others) equal slm's quantizers', byte for byte. Q6_K is
/// also what legacy files give an output projection of whole 256-value rows.
#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn k_quants_match_llama_quantize_byte_for_byte() {
    use slm_model::gguf::GgmlType;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = f16_input(d);
    let g = slm_model::GgufFile::open(&input).unwrap();
    let (mut q4k, mut q6k) = (0, 0);
    for line in reference("q4_k_m.txt") {
        let mut it = line.split(' ');
        let (name, ty, hash) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        let ty = match ty {
            "Q6_K" => GgmlType::Q6K,
            "Q4_K" => GgmlType::Q4K,
            _ => continue,
        };
        let t = g.tensor_info(name).unwrap();
        let values = FloatType::F16.values(g.tensor_bytes(t));
        let cols = t.dims[1];
        let row = cols / 256 * ty.type_size();
        let mut out = vec![0u8; values.len() / cols * row];
        for (o, r) in out.chunks_mut(row).zip(values.chunks(cols)) {
            slm_compress::quantize::quantize_row(ty, r, o);
        }
        assert_eq!(hex::encode(sha2::Sha256::digest(&out)), hash, "{name}");
        *if ty == GgmlType::Q4K {
            &mut q4k
        } else {
            &mut q6k
        } += 1;
    }
    assert_eq!((q4k, q6k), (16, 14), "K-quant tensors in the reference");
}

/// Already-quantized weights are refused with the reason unless asked for; nothing is
/// written.
#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn requantizing_needs_to_be_asked_for() {
    let asset = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.gguf");
    let e = quantize_gguf(&asset, &out, FileType::Q8_0, false, &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is already Q") && e.contains("--allow-requantize"),
        "{e}"
    );
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    quantize_gguf(&asset, &out, FileType::Q8_0, true, &|_, _| {}).unwrap();
    slm_model::load(&out, &candle_core::Device::Cpu).unwrap();
}
