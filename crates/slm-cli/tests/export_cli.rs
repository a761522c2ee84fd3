//! `slm export` of a model folder that `slm train` wrote: to GGUF and back. The GGUF runs in
//! slm with the folder's greedy continuation, and the folder made back from it holds the same
//! tensors, byte for byte; tied and untied embeddings alike. Bad requests name the problem.

use std::path::Path;

mod common;
use common::{corpus_tokenizer_shards, fails, ok, slm, train_tiny};

fn greedy(model: &Path) -> String {
    ok(slm()
        .arg("generate")
        .arg(model)
        .args(["-p", "the whale", "-n", "12", "--temp", "0"]))
}

fn tensors(folder: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(folder.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn trained_folders_go_to_gguf_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    corpus_tokenizer_shards(d);
    for (name, kv_heads, tied) in [("gqa_tied", 2, true), ("mha_untied", 4, false)] {
        let folder = train_tiny(d, name, kv_heads, tied);
        let gguf = d.join(format!("{name}.gguf"));
        ok(slm()
            .arg("export")
            .arg(&folder)
            .args(["--format", "gguf", "-o"])
            .arg(&gguf));
        assert_eq!(greedy(&gguf), greedy(&folder), "{name}");
        let back = d.join(format!("{name}-back"));
        ok(slm()
            .arg("export")
            .arg(&gguf)
            .args(["--format", "hf", "-o"])
            .arg(&back));
        assert!(tensors(&back) == tensors(&folder), "{name}: tensors differ");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["tie_word_embeddings"], tied, "{name}");
    }
    let folder = d.join("gqa_tied/model");
    let e = fails(
        slm()
            .arg("export")
            .arg(&folder)
            .args(["--format", "hf", "-o"])
            .arg(d.join("x")),
    );
    assert!(
        e.contains("--format hf") && e.contains("reads a GGUF file"),
        "{e}"
    );
    let e = fails(
        slm()
            .arg("export")
            .arg(&folder)
            .args(["--format", "gguf", "--type", "q4_0", "-o"])
            .arg(d.join("x.gguf")),
    );
    assert!(e.contains("q4_0"), "{e}");
    let e = fails(
        slm()
            .arg("export")
            .arg(d.join("gqa_tied.gguf"))
            .args(["--format", "hf", "-o"])
            .arg(d.join("gqa_tied-back")),
    );
    assert!(e.contains("already exists"), "{e}");
    let e = fails(
        slm()
            .arg("export")
            .arg(&folder)
            .args(["--format", "gguf", "-o"])
            .arg(d.join("no/such/dir/x.gguf")),
    );
    assert!(e.contains("cannot write"), "{e}");
}
