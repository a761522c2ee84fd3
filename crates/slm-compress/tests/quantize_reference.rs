//! `slm quantize` writes the tensor data llama-quantize writes, byte for byte and with the same
//! type per tensor, for every file type it offers, without and with an importance matrix, from
//! one F16 GGUF of SmolLM2-135M-Instruct made by slm from the Q4_1 asset. The reference hashes
//! and the importance matrix come from llama.cpp built outside the repository
//! (bench/quantize-reference.sh; tests/reference/README).

use std::path::Path;

mod common;
use common::{f16_input, reference_dir};

use sha2::Digest;
use slm_compress::imatrix::Imatrix;
use slm_compress::quantize::{quantize_gguf, FileType, Options};

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

fn reference(name: &str) -> Vec<String> {
    std::fs::read_to_string(reference_dir().join(name))
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

fn opts(file_type: FileType, imatrix: Option<&Imatrix>) -> Options<'_> {
    Options {
        file_type,
        allow_requantize: false,
        pure: false,
        imatrix,
    }
}

/// Quantizes `input` to each of `types` and compares every tensor's type and bytes with the
/// reference file `TYPE{suffix}.txt`.
fn assert_types_match(input: &Path, types: &[&str], imatrix: Option<&Imatrix>, suffix: &str) {
    let d = input.parent().unwrap();
    for name in types {
        let ft = FileType::parse(name).unwrap();
        let out = d.join(format!("{name}{suffix}.gguf"));
        quantize_gguf(input, &out, &opts(ft, imatrix), &|_, _| {}).unwrap();
        let (ours, theirs) = (hashes(&out), reference(&format!("{name}{suffix}.txt")));
        assert!(
            ours == theirs,
            "{name}{suffix}: {} tensors differ from llama-quantize's, e.g. {:?}",
            ours.iter().filter(|l| !theirs.contains(l)).count(),
            differing(&ours, &theirs)
        );
        // And the result runs: slm loads it.
        slm_model::load(&out, &candle_core::Device::Cpu).unwrap();
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn every_file_type_matches_llama_quantize_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let input = f16_input(dir.path());
    assert_eq!(
        hashes(&input),
        reference("input-f16.txt"),
        "the F16 input differs from the reference's"
    );
    assert_types_match(
        &input,
        &[
            "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s",
            "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
        ],
        None,
        "",
    );
}

/// With llama-imatrix's importance matrix: the importance-weighted quantizers of every block
/// type (legacy and K), and the q4_0 guard that gives the first ffn_down layers Q4_1.
#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn file_types_with_an_imatrix_match_llama_quantize_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let input = f16_input(dir.path());
    let im = Imatrix::load(&reference_dir().join("imatrix.gguf")).unwrap();
    assert_eq!(im.len(), 30 * 7, "one entry per block projection");
    assert_types_match(
        &input,
        &["q4_0", "q5_1", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"],
        Some(&im),
        "-imatrix",
    );
}

/// Already-quantized weights are refused with the reason unless asked for; nothing is
/// written.
#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn requantizing_needs_to_be_asked_for() {
    let asset = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8.gguf");
    let e = quantize_gguf(&asset, &out, &opts(FileType::Q8_0, None), &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is already Q") && e.contains("--allow-requantize"),
        "{e}"
    );
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    let again = Options {
        allow_requantize: true,
        ..opts(FileType::Q8_0, None)
    };
    quantize_gguf(&asset, &out, &again, &|_, _| {}).unwrap();
    slm_model::load(&out, &candle_core::Device::Cpu).unwrap();
}
