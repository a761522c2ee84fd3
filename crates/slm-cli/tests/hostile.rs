//! Hostile and careless input through the command line: each case feeds one bad input and
//! asserts a clear error (file, field, value) instead of an abort, a hang or a wrong result;
//! for faults, the state left behind. Grouped as issue 18 lists them: aborts and runaway
//! memory, hangs, silent wrong results, half-written state, and how errors read.
//! (GGUF files, safetensors headers and config.json are fuzzed in slm-model's tests; slm
//! pull's misbehaving servers are in slm-hub's.)

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;
use common::{fails, ok, slm};

/// One tiny trained model folder shared by the tests of this file, with its corpus.
fn base() -> &'static (tempfile::TempDir, PathBuf) {
    static BASE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        common::corpus_tokenizer_shards(dir.path());
        let model = common::train_tiny(dir.path(), "base", 2, true);
        (dir, model)
    })
}

/// A copy of the tiny model folder in `into`, for a test to damage.
fn model_copy(into: &Path) -> PathBuf {
    let to = into.join("model");
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&base().1).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn generate(model: &Path) -> std::process::Command {
    let mut c = slm();
    c.arg("generate")
        .arg(model)
        .args(["-p", "the whale", "-n", "4"]);
    c
}

// ---- Aborts and runaway memory ------------------------------------------------------------

/// Sizes in config.json beyond the limits: refused at load, naming the field and the bound,
/// before anything is sized from them (the RoPE tables, the layer list).
#[test]
fn huge_sizes_in_config_json_are_refused() {
    for (field, value) in [
        ("max_position_embeddings", 1u64 << 31),
        ("max_position_embeddings", 1 << 40),
        ("num_hidden_layers", 1 << 40),
        ("vocab_size", 4_000_000_000),
        ("intermediate_size", 100_000_000_000),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let m = model_copy(dir.path());
        edit_json(&m.join("config.json"), |v| v[field] = value.into());
        let e = fails(&mut generate(&m));
        assert!(
            e.contains("config.json") && e.contains(field) && e.contains(&value.to_string()),
            "{field} = {value}: {e}"
        );
        assert!(e.contains("limit"), "{e}");
    }
}

/// Recipes whose shape or batch is beyond the limits are refused by the recipe check; one
/// within the limits but too large for the machine's memory by the memory estimate.
#[test]
fn recipes_too_large_to_train_are_refused() {
    let (dir, _) = base();
    let d = dir.path();
    let recipe = std::fs::read_to_string(d.join("base.toml")).unwrap();
    for (from, to, key) in [
        ("batch = 8", "batch = 100000000", "optim.batch = 100000000"),
        ("ffn = 96", "ffn = 100000000000", "model.ffn = 100000000000"),
        (
            "d_model = 64",
            "d_model = 1048576",
            "model.d_model = 1048576",
        ),
        (
            "layers = 2",
            "layers = 100000000",
            "model.layers = 100000000",
        ),
        (
            "[optim]",
            "[optim]\ngrad_accum = 1000000",
            "optim.grad_accum = 1000000",
        ),
        ("tokens = 20480", "minutes = inf", "budget.minutes = inf"),
        (
            "rope_theta = 500.0",
            "rope_theta = inf",
            "model.rope_theta = inf",
        ),
    ] {
        let r = d.join("big.toml");
        let text = recipe
            .replace(from, to)
            .replace("out = \"base\"", "out = \"big\"");
        std::fs::write(&r, text).unwrap();
        let e = fails(slm().arg("train").arg(&r).current_dir(d));
        assert!(e.contains("big.toml") && e.contains(key), "{key}: {e}");
    }
    // Within every limit, but 200 layers of width 4096 do not fit in 1 GB.
    let r = d.join("big.toml");
    let text = recipe
        .replace("d_model = 64", "d_model = 4096")
        .replace("layers = 2", "layers = 200")
        .replace("heads = 4", "heads = 32")
        .replace("kv_heads = 2", "kv_heads = 32")
        .replace("out = \"base\"", "out = \"big\"");
    std::fs::write(&r, text).unwrap();
    let e = fails(
        slm()
            .arg("train")
            .arg(&r)
            .env("SLM_MEMORY_BYTES", "1000000000")
            .current_dir(d),
    );
    assert!(
        e.contains("needs about") && e.contains("this machine has 1.0 GB"),
        "{e}"
    );
}

#[test]
fn a_vocabulary_beyond_the_limit_is_refused() {
    let (dir, _) = base();
    let e = fails(
        slm()
            .args([
                "tokenizer",
                "train",
                "corpus",
                "--vocab",
                "4000000000",
                "-o",
            ])
            .arg(dir.path().join("never.json"))
            .current_dir(dir.path()),
    );
    assert!(e.contains("--vocab") && e.contains("4000000000"), "{e}");
    assert!(!dir.path().join("never.json").exists());
}

// ---- Hangs ----------------------------------------------------------------------------------

/// A chat template that loops without end: `slm info` does not render it, `slm chat` stops
/// it with an error when its instruction budget runs out.
#[test]
fn a_runaway_chat_template_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_copy(dir.path());
    edit_json(&m.join("tokenizer_config.json"), |v| {
        v["chat_template"] =
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
                .into()
    });
    let info = ok(slm().arg("info").arg(&m));
    assert!(info.contains("template present"), "{info}");
    let mut child = slm()
        .arg("chat")
        .arg(&m)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{e}");
    assert!(e.contains("chat template") && e.contains("fuel"), "{e}");
}

/// --max-tokens near usize::MAX must not wrap around the context check.
#[test]
fn max_tokens_that_overflow_are_refused() {
    let m = &base().1;
    let e = fails(slm().arg("generate").arg(m).args([
        "-p",
        "the",
        "-n",
        "18446744073709551611",
        "--ctx",
        "16",
    ]));
    assert!(e.contains("exceeds the context length (16)"), "{e}");
    // With --truncate the message says what is left to do, not to pass --truncate.
    let e = fails(slm().arg("generate").arg(m).args([
        "-p",
        "the",
        "-n",
        "100",
        "--ctx",
        "16",
        "--truncate",
    ]));
    assert!(
        e.contains("lower --max-tokens") && !e.contains("pass --truncate"),
        "{e}"
    );
}

#[test]
fn thread_counts_beyond_the_limit_are_refused() {
    let e = fails(slm().args(["bench", "--train", "tiny", "--threads", "100000"]));
    assert!(e.contains("--threads") && e.contains("1024"), "{e}");
    let e = fails(slm().args(["bench", "--train", "tiny", "--threads", "0"]));
    assert!(e.contains("--threads"), "{e}");
}

// ---- Silent wrong results -------------------------------------------------------------------

/// Special token ids past the vocabulary, a chat template that is not text, a tokenizer with
/// ids past the embedding, weights stored as integers: refused at load.
#[test]
fn inconsistent_model_folders_are_refused() {
    type Damage = Box<dyn Fn(&Path)>;
    let cases: [(&str, Damage, &str); 5] = [
        (
            "bos out of range",
            Box::new(|m| edit_json(&m.join("config.json"), |v| v["bos_token_id"] = 99999.into())),
            "bos_token_id 99999",
        ),
        (
            "eos out of range",
            Box::new(|m| {
                edit_json(&m.join("config.json"), |v| {
                    v["eos_token_id"] = 4294967296u64.into()
                })
            }),
            "eos_token_id",
        ),
        (
            "template not text",
            Box::new(|m| {
                edit_json(&m.join("tokenizer_config.json"), |v| {
                    v["chat_template"] = 5.into()
                })
            }),
            "chat_template is 5",
        ),
        (
            "tokenizer past the embedding",
            Box::new(|m| {
                edit_json(&m.join("tokenizer.json"), |v| {
                    v["added_tokens"]
                        .as_array_mut()
                        .unwrap()
                        .push(serde_json::json!({
                        "id": 5000, "content": "<|extra|>", "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": false, "special": true}))
                })
            }),
            "embedding has",
        ),
        (
            "integer weights",
            Box::new(|m| {
                // Same byte length: F32 -> I32 in the safetensors header.
                let p = m.join("model.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
                let header = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
                let at = header.find("\"F32\"").unwrap() + 8 + 1;
                b[at..at + 3].copy_from_slice(b"I32");
                std::fs::write(&p, b).unwrap();
            }),
            "stored as I32",
        ),
    ];
    for (what, damage, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let m = model_copy(dir.path());
        damage(&m);
        let e = fails(&mut generate(&m));
        assert!(e.contains(want), "{what}: {e}");
        assert!(
            e.contains(&*m.to_string_lossy()),
            "{what}: names no file: {e}"
        );
    }
}

/// All-NaN weights: an error, not an empty reply with exit 0.
#[test]
fn nan_weights_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_copy(dir.path());
    let p = m.join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    for w in b[8 + n..].chunks_exact_mut(4) {
        w.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&p, b).unwrap();
    let e = fails(&mut generate(&m));
    assert!(e.contains("NaN"), "{e}");
}

/// A checkpoint whose state claims an update it never reached, and a truncated checkpoint:
/// the resume names the file and falls back to the previous complete checkpoint.
#[test]
fn broken_checkpoints_are_named_and_passed_over() {
    let (dir, _) = base();
    let d = dir.path();
    let recipe = std::fs::read_to_string(d.join("base.toml")).unwrap();
    let r = d.join("ckpt.toml");
    std::fs::write(
        &r,
        recipe.replace("out = \"base\"", "out = \"ckpt\"")
            + "[checkpoint]\ninterval = 4\nkeep = 3\n",
    )
    .unwrap();
    ok(slm().arg("train").arg(&r).current_dir(d));
    let ck = d.join("ckpt/checkpoints");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    all.sort();
    assert_eq!(all.len(), 3, "{all:?}");
    // The newest: a truncated weights file. The one before: a state from another run.
    let newest = all[2].join("model.safetensors");
    let len = std::fs::metadata(&newest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    edit_json(&all[1].join("state.json"), |v| v["step"] = 999999.into());
    let out = slm()
        .arg("train")
        .arg(&r)
        .arg("--resume")
        .current_dir(d)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains(&*newest.to_string_lossy())
            && e.contains(&*all[1].join("state.json").to_string_lossy())
            && e.contains(&format!(
                "resumed from the previous one, {}",
                all[0].display()
            )),
        "{e}"
    );
    // With none usable, the error lists each.
    std::fs::remove_dir_all(&all[0]).unwrap();
    let ckpts: Vec<PathBuf> = std::fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    for c in &ckpts {
        edit_json(&c.join("state.json"), |v| v["step"] = 999999.into());
    }
    let e = fails(slm().arg("train").arg(&r).arg("--resume").current_dir(d));
    assert!(e.contains("no checkpoint") && e.contains("999999"), "{e}");
}

/// A context longer than every validation shard is an error, not a run without validation.
#[test]
fn validation_shorter_than_the_context_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("corpus")).unwrap();
    let (b, _) = base();
    for e in std::fs::read_dir(b.path().join("corpus"))
        .unwrap()
        .flatten()
    {
        std::fs::copy(e.path(), d.join("corpus").join(e.file_name())).unwrap();
    }
    std::fs::write(d.join("corpus/99-short.txt"), "the whale.").unwrap();
    std::fs::copy(b.path().join("tok.json"), d.join("tok.json")).unwrap();
    // A tenth of the documents in validation: the whole set, but each window needs 3000.
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
        .args(["--valid-fraction", "0.03"])
        .current_dir(d));
    let recipe = std::fs::read_to_string(b.path().join("base.toml"))
        .unwrap()
        .replace("context = 32", "context = 2048")
        .replace("tokens = 20480", "tokens = 200000")
        .replace("batch = 8", "batch = 1");
    std::fs::write(d.join("r.toml"), recipe).unwrap();
    let e = fails(slm().arg("train").arg("r.toml").current_dir(d));
    assert!(
        e.contains("validation shard") && e.contains("model.context 2048"),
        "{e}"
    );
}

/// Multiple choice with an empty option, --limit 0, a classify prompt without {text}, an
/// --out that cannot be written: each refused before the model runs.
#[test]
fn evaluation_mistakes_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = &base().1;
    std::fs::write(
        d.join("c.jsonl"),
        "{\"context\": \"the\", \"choices\": [\" whale\", \"\"], \"answer\": 0}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("k.jsonl"),
        "{\"text\": \"the whale\", \"label\": \"a\"}\n{\"text\": \"the sea\", \"label\": \"b\"}\n",
    )
    .unwrap();
    let eval = |args: &[&str]| {
        let mut c = slm();
        c.arg("eval").arg(m).args(args).current_dir(d);
        fails(&mut c)
    };
    let e = eval(&["--task", "choice:c.jsonl"]);
    assert!(
        e.contains("c.jsonl") && e.contains("option 1 is empty"),
        "{e}"
    );
    let e = eval(&["--task", "classify:k.jsonl", "--limit", "0"]);
    assert!(e.contains("--limit") && e.contains("at least 1"), "{e}");
    let e = eval(&["--task", "classify:k.jsonl", "--prompt", "Is it {labels}?"]);
    assert!(e.contains("k.jsonl") && e.contains("{text}"), "{e}");
    let e = eval(&["--task", "classify:k.jsonl", "--out", "no/such/dir/r.json"]);
    assert!(
        e.contains("no/such/dir/r.json") && e.contains("cannot write"),
        "{e}"
    );
    let e = eval(&["--task", "classify:k.jsonl", "--out", "k.jsonl"]);
    assert!(e.contains("overwrite the input"), "{e}");
}

#[test]
fn report_will_not_overwrite_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path().join("r.json");
    std::fs::write(&r, "{}").unwrap();
    let e = fails(slm().arg("report").arg(&r).arg("-o").arg(&r));
    assert!(e.contains("overwrite the input"), "{e}");
    assert_eq!(std::fs::read_to_string(&r).unwrap(), "{}");
}

// ---- Half-written state ---------------------------------------------------------------------

/// `slm data prepare` into a folder that holds shards, killed at various moments: the folder
/// holds the old set or the new one, each whole (its manifest's files and token counts),
/// never a mix.
#[test]
fn killed_data_prepare_leaves_a_whole_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (b, _) = base();
    std::fs::copy(b.path().join("tok.json"), d.join("tok.json")).unwrap();
    // A corpus large enough that tokenizing takes a while.
    std::fs::create_dir_all(d.join("big")).unwrap();
    let text = std::fs::read_to_string(b.path().join("corpus/00.txt")).unwrap();
    for i in 0..200 {
        std::fs::write(d.join(format!("big/{i:03}.txt")), text.repeat(20)).unwrap();
    }
    let prepare = |corpus: &str| {
        let mut c = slm();
        c.args([
            "data",
            "prepare",
            corpus,
            "--tokenizer",
            "tok.json",
            "-o",
            "shards",
        ])
        .current_dir(d);
        c
    };
    ok(&mut prepare("big"));
    let manifest = |d: &Path| std::fs::read_to_string(d.join("shards/manifest.json")).unwrap();
    let first = manifest(d);
    let mut saw_new = false;
    for delay_ms in [50u64, 150, 300, 600, 1200, 5000] {
        std::fs::write(d.join("big/000.txt"), format!("{delay_ms} {text}")).unwrap();
        let mut child = prepare("big")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // Whole: the manifest's files exist with the sizes it implies, and nothing else.
        let m: serde_json::Value = serde_json::from_str(&manifest(d)).unwrap();
        let mut listed: Vec<String> = ["train", "valid"]
            .iter()
            .flat_map(|s| m[s]["files"].as_array().unwrap().iter())
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        listed.push("manifest.json".into());
        listed.sort();
        let mut present: Vec<String> = std::fs::read_dir(d.join("shards"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        present.sort();
        assert_eq!(listed, present, "killed after {delay_ms} ms");
        saw_new |= manifest(d) != first;
    }
    assert!(
        saw_new,
        "no run lived long enough to finish; the test proves nothing"
    );
}

// ---- How errors read ------------------------------------------------------------------------

/// One line per error whatever RUST_BACKTRACE says; no colour codes when stderr is a file;
/// devices named as what they are.
#[test]
fn errors_read_as_one_message() {
    for (path, want) in [
        ("/dev/null", "not a regular file"),
        ("/dev/zero", "not a regular file"),
    ] {
        let out = slm()
            .args(["info", path])
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            e.starts_with("error: ") && e.contains(path) && e.contains(want),
            "{e}"
        );
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(!e.contains("backtrace") && !e.contains("Caused by"), "{e}");
    }
    // A warning (a run without validation data) on a non-terminal stderr: no escape codes.
    let (b, _) = base();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::copy(b.path().join("tok.json"), d.join("tok.json")).unwrap();
    ok(slm()
        .args(["data", "prepare"])
        .arg(b.path().join("corpus"))
        .args([
            "--tokenizer",
            "tok.json",
            "-o",
            "shards",
            "--valid-fraction",
            "0",
        ])
        .current_dir(d));
    let recipe = std::fs::read_to_string(b.path().join("base.toml"))
        .unwrap()
        .replace("tokens = 20480", "tokens = 512");
    std::fs::write(d.join("r.toml"), recipe).unwrap();
    let out = slm()
        .arg("train")
        .arg("r.toml")
        .current_dir(d)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{e}");
    assert!(e.contains("no validation tokens"), "{e}");
    assert!(!e.contains('\u{1b}'), "{e:?}");
}
