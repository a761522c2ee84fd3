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
        // The folder's lineage (slm.json) travels in the GGUF's metadata.
        let g = slm_model::GgufFile::open(&gguf).unwrap();
        let lineage: serde_json::Value =
            serde_json::from_str(g.get_str("slm.lineage").unwrap().unwrap()).unwrap();
        let slm_json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("slm.json")).unwrap())
                .unwrap();
        assert_eq!(lineage, slm_json, "{name}");
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
    // Quantized from the folder (through a temporary F32 GGUF) and from the GGUF: the same
    // file, which runs; nothing else is left beside it.
    let qdir = d.join("q");
    std::fs::create_dir_all(&qdir).unwrap();
    ok(slm()
        .arg("quantize")
        .arg(&folder)
        .args(["--type", "q4_0", "-o"])
        .arg(qdir.join("a.gguf")));
    ok(slm()
        .arg("quantize")
        .arg(d.join("gqa_tied.gguf"))
        .args(["--type", "q4_0", "-o"])
        .arg(qdir.join("b.gguf")));
    assert!(
        std::fs::read(qdir.join("a.gguf")).unwrap() == std::fs::read(qdir.join("b.gguf")).unwrap()
    );
    let names: Vec<String> = std::fs::read_dir(&qdir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!greedy(&qdir.join("a.gguf")).is_empty());
    let e = fails(
        slm()
            .arg("quantize")
            .arg(&folder)
            .args(["--type", "q4_k", "-o"])
            .arg(qdir.join("c.gguf")),
    );
    assert!(e.contains("q4_k_m") && e.contains("q8_0"), "{e}");
    let e = fails(
        slm()
            .arg("quantize")
            .arg(qdir.join("a.gguf"))
            .args(["--type", "q8_0", "-o"])
            .arg(qdir.join("c.gguf")),
    );
    assert!(e.contains("--allow-requantize"), "{e}");
    assert!(!qdir.join("c.gguf").exists());
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
