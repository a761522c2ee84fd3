//! What the CLI tests share: running the binary, and a small corpus with its tokenizer and
//! shards.
// Each test binary includes this module and uses a different part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub fn slm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slm"))
}

/// Runs `cmd`, fails the test with its stderr unless it succeeds, and returns its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd`, fails the test if it succeeds, and returns its stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// In `dir`: corpus/ (30 documents of 400 seeded words from a ten-word sea vocabulary),
/// tok.json (a 300-token BPE) and shards/.
pub fn corpus_tokenizer_shards(dir: &Path) {
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let words = [
        "the", "whale", "ship", "sea", "captain", "white", "deep", "sailed", "under", "storm",
    ];
    let mut x = 7u64;
    for d in 0..30 {
        let mut text = String::new();
        for _ in 0..400 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push_str(words[(x >> 60) as usize % words.len()]);
            text.push(if (x >> 20).is_multiple_of(9) {
                '.'
            } else {
                ' '
            });
        }
        std::fs::write(corpus.join(format!("{d:02}.txt")), text).unwrap();
    }
    ok(slm()
        .args([
            "tokenizer",
            "train",
            "corpus",
            "--vocab",
            "300",
            "-o",
            "tok.json",
        ])
        .current_dir(dir));
    ok(slm()
        .args([
            "data",
            "prepare",
            "corpus",
            "--tokenizer",
            "tok.json",
            "-o",
            "shards",
        ])
        .current_dir(dir));
}

/// Trains a tiny model on the shards in `dir` (see `corpus_tokenizer_shards`) and returns its
/// model folder.
pub fn train_tiny(dir: &Path, name: &str, kv_heads: usize, tied: bool) -> std::path::PathBuf {
    let recipe = dir.join(format!("{name}.toml"));
    std::fs::write(
        &recipe,
        format!(
            r#"[run]
out = "{name}"
seed = 5
[data]
shards = "shards"
tokenizer = "tok.json"
[model]
d_model = 64
layers = 2
heads = 4
kv_heads = {kv_heads}
ffn = 96
context = 32
tied_embeddings = {tied}
rope_theta = 500.0
[budget]
tokens = 20480
[optim]
batch = 8
lr = 1e-2
warmup = 5
"#
        ),
    )
    .unwrap();
    ok(slm().arg("train").arg(&recipe).current_dir(dir));
    dir.join(name).join("model")
}
