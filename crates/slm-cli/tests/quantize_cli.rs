//! `slm imatrix` and `slm quantize` end to end: an importance matrix of SmolLM2 over
//! calibration text makes its q4_k_m better on held-out text; the K-quant mixes of a model
//! `slm train` wrote run; bad requests (a matrix of another model, --pure on rows that are not
//! whole blocks, an unknown type, a disk that fills up) are refused by name and leave
//! nothing behind.

use std::path::{Path, PathBuf};

mod common;
use common::{corpus_tokenizer_shards, fails, ok, slm, train_tiny};

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Perplexity by `slm eval` over the first `windows` windows of 512 tokens of `text`.
fn perplexity(model: &Path, text: &Path, windows: usize, out: &Path) -> f64 {
    ok(slm()
        .arg("eval")
        .arg(model)
        .arg("--task")
        .arg(format!("perplexity:{}", text.display()))
        .args(["--limit", &windows.to_string(), "--out"])
        .arg(out));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    r["tasks"][0]["metrics"]["ppl"]["value"].as_f64().unwrap()
}

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn an_imatrix_lowers_q4_k_m_perplexity_and_one_of_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let asset = slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    ok(slm()
        .arg("export")
        .arg(&asset)
        .args(["--format", "hf", "--type", "f16", "-o"])
        .arg(d.join("hf16")));
    let f16 = d.join("f16.gguf");
    ok(slm()
        .arg("export")
        .arg(d.join("hf16"))
        .args(["--format", "gguf", "--type", "f16", "-o"])
        .arg(&f16));
    let calib = repo().join("data/quickstart/moby-dick-003.txt");
    let im = d.join("imatrix.gguf");
    ok(slm()
        .arg("imatrix")
        .arg(&f16)
        .arg("--calib")
        .arg(&calib)
        .args(["--chunks", "8", "-o"])
        .arg(&im));
    // Held-out text of another source than the calibration text.
    let eval = repo().join("../shared/fixtures/reference/eval.txt");
    let mut ppl = Vec::new();
    for (name, with) in [("plain", false), ("weighted", true)] {
        let out = d.join(format!("{name}.gguf"));
        let mut cmd = slm();
        cmd.arg("quantize")
            .arg(&f16)
            .args(["--type", "q4_k_m", "-o"])
            .arg(&out);
        if with {
            cmd.arg("--imatrix").arg(&im);
        }
        ok(&mut cmd);
        ppl.push(perplexity(&out, &eval, 8, &d.join(format!("{name}.json"))));
    }
    println!(
        "q4_k_m perplexity over 8 windows of eval.txt: {:.3} without, {:.3} with the imatrix",
        ppl[0], ppl[1]
    );
    assert!(ppl[1] < ppl[0], "{ppl:?}");

    // An importance matrix of another model (a tiny one `slm train` made, 64 wide) is refused
    // by name; nothing is written.
    let tiny_dir = d.join("tiny");
    std::fs::create_dir_all(&tiny_dir).unwrap();
    corpus_tokenizer_shards(&tiny_dir);
    let tiny = train_tiny(&tiny_dir, "t", 2, true);
    let tiny_im = d.join("tiny-imatrix.gguf");
    ok(slm()
        .arg("imatrix")
        .arg(&tiny)
        .arg("--calib")
        .arg(tiny_dir.join("corpus/00.txt"))
        .args(["--ctx", "32", "-o"])
        .arg(&tiny_im));
    let before = files_in(d);
    let e = fails(
        slm()
            .arg("quantize")
            .arg(&f16)
            .args(["--type", "q4_k_m", "--imatrix"])
            .arg(&tiny_im)
            .arg("-o")
            .arg(d.join("x.gguf")),
    );
    assert!(
        e.contains("has 64 values for 'blk.0.attn_q.weight', whose rows hold 576")
            && e.contains("made for another model"),
        "{e}"
    );
    assert_eq!(files_in(d), before);

    // --pure asks for Q4_K everywhere; SmolLM2's rows of 576 are not whole 256-blocks.
    let e = fails(
        slm()
            .arg("quantize")
            .arg(&f16)
            .args(["--type", "q4_k_m", "--pure", "-o"])
            .arg(d.join("x.gguf")),
    );
    assert!(
        e.contains("has rows of 576 values, not whole Q4_K blocks of 256"),
        "{e}"
    );
    assert_eq!(files_in(d), before);

    // A disk that fills up mid-write (here a file size limit: the write fails with EFBIG as
    // it would with ENOSPC) leaves neither the output nor a temporary file.
    let out = d.join("full.gguf");
    let e = fails(
        std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"trap "" XFSZ; ulimit -f 20000; exec "$@""#)
            .arg("sh")
            .arg(env!("CARGO_BIN_EXE_slm"))
            .arg("quantize")
            .arg(&f16)
            .args(["--type", "q8_0", "-o"])
            .arg(&out),
    );
    assert!(e.contains("full.gguf") && e.contains("too large"), "{e}");
    assert_eq!(files_in(d), before);
}

/// A model `slm train` wrote, in every K-quant mix (its 64-wide rows fall back to 32-value
/// types as llama-quantize's would): each file loads and generates. An unknown type lists
/// the ones there are.
#[test]
fn trained_models_take_every_k_quant_mix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    corpus_tokenizer_shards(d);
    let folder = train_tiny(d, "m", 2, true);
    for ty in [
        "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
        "f16", "bf16",
    ] {
        let out = d.join(format!("{ty}.gguf"));
        ok(slm()
            .arg("quantize")
            .arg(&folder)
            .args(["--type", ty, "-o"])
            .arg(&out));
        let text =
            ok(slm()
                .arg("generate")
                .arg(&out)
                .args(["-p", "the whale", "-n", "4", "--temp", "0"]));
        assert!(!text.trim().is_empty(), "{ty}");
    }
    let e = fails(
        slm()
            .arg("quantize")
            .arg(&folder)
            .args(["--type", "q4_k", "-o"])
            .arg(d.join("x.gguf")),
    );
    assert!(e.contains("q4_k_m") && e.contains("q6_k"), "{e}");

    // An importance matrix needs windows of at least 16 tokens (llama-imatrix skips shorter
    // batches) and at least two of them.
    let before = files_in(d);
    let e = fails(
        slm()
            .arg("imatrix")
            .arg(&folder)
            .arg("--calib")
            .arg(d.join("corpus/00.txt"))
            .args(["--ctx", "8", "-o"])
            .arg(d.join("x.gguf")),
    );
    assert!(e.contains("--ctx 8 must be at least 16"), "{e}");
    std::fs::write(d.join("short.txt"), "the whale.").unwrap();
    let e = fails(
        slm()
            .arg("imatrix")
            .arg(&folder)
            .arg("--calib")
            .arg(d.join("short.txt"))
            .args(["--ctx", "32", "-o"])
            .arg(d.join("x.gguf")),
    );
    assert!(
        e.contains("needs at least two windows of --ctx 32 (64 tokens)"),
        "{e}"
    );
    let mut expected = [before, vec!["short.txt".to_string()]].concat();
    expected.sort();
    assert_eq!(files_in(d), expected);

    // A folder whose lineage file is not JSON is refused by name, not exported without it.
    let copy = d.join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(&folder).unwrap().flatten() {
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    std::fs::write(copy.join("slm.json"), "{").unwrap();
    let e = fails(
        slm()
            .arg("export")
            .arg(&copy)
            .args(["--format", "gguf", "-o"])
            .arg(d.join("x.gguf")),
    );
    assert!(e.contains("slm.json: not JSON"), "{e}");
    assert!(!d.join("x.gguf").exists());
}
