//! Distillation end to end through the `slm` binary: a tiny student taught by a tiny teacher
//! (`objective.kind = "kd"`, online), killed and resumed with the unbroken run's losses, its
//! lineage naming the teacher; a top k of the whole vocabulary computing what the full
//! logits do; and bad settings and a teacher with another tokenizer refused by name.

use std::path::{Path, PathBuf};

mod common;
use common::{
    copy_dir, corpus_tokenizer_shards, fails, kill_and_resume, losses, ok, slm, train_tiny,
};

/// A student recipe taught by `teacher/model`; `teacher` is the `[teacher]` table's body
/// after its model.
fn recipe(dir: &Path, name: &str, teacher: &str, tokens: usize) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"[run]
out = "{name}"
seed = 3
[data]
shards = "shards"
tokenizer = "tok.json"
[model]
d_model = 32
layers = 2
heads = 2
ffn = 64
context = 16
[objective]
kind = "kd"
[teacher]
model = "teacher/model"
{teacher}
[budget]
tokens = {tokens}
[optim]
batch = 4
grad_accum = 2
lr = 3e-3
warmup = 10
[eval]
interval = 40
batches = 2
[checkpoint]
interval = 7
keep = 2
"#
        ),
    )
    .unwrap();
    p
}

struct Fixture {
    dir: tempfile::TempDir,
}

/// The shards and a teacher trained on them, made once for this file's tests.
fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        corpus_tokenizer_shards(dir.path());
        train_tiny(dir.path(), "teacher", 4, false);
        Fixture { dir }
    })
}

#[test]
fn a_distilled_student_learns_and_resumes_with_the_same_losses() {
    let d = fixture().dir.path();
    let settings = "temperature = 2.0\nalpha = 0.5";
    let started = std::time::Instant::now();
    ok(slm()
        .arg("train")
        .arg(recipe(d, "unbroken", settings, 19200))
        .current_dir(d));
    let run_ms = started.elapsed().as_millis() as u64;
    let want = losses(&d.join("unbroken"));
    assert_eq!(want.len(), 150);
    assert!(
        want[149].1 < want[0].1 - 0.5,
        "the student learns: {} to {}",
        want[0].1,
        want[149].1
    );

    let r = recipe(d, "killed", settings, 19200);
    let run = d.join("killed");
    let kills = kill_and_resume(d, &r, &run, run_ms, || {});
    eprintln!("killed {kills} times");
    assert!(kills >= 2, "killed {kills} times; the test needs two");
    let got = losses(&run);
    assert_eq!(got.len(), want.len());
    for ((s1, a), (s2, b)) in want.iter().zip(&got) {
        assert_eq!(s1, s2);
        // The teacher's forward is as deterministic as the student's.
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "step {s1}: unbroken {a}, resumed {b}"
        );
    }

    // Lineage: the teacher's file and hash, and the loss's settings in the recipe.
    let slm_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("unbroken/model/slm.json")).unwrap())
            .unwrap();
    let teacher = &slm_json["data"]["teacher"];
    assert!(teacher["model"]
        .as_str()
        .unwrap()
        .ends_with("teacher/model"));
    let sha = teacher["sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64, "{sha}");
    assert_eq!(slm_json["recipe"]["teacher"]["temperature"], 2.0);
    assert_eq!(slm_json["recipe"]["objective"]["kind"], "kd");
}

/// The first update's loss (same initial student, same batch) with the teacher as full
/// logits and as a top k of its whole vocabulary: the same buckets, the top k's
/// log-probabilities rounded to f16 as a cache keeps them (measured apart: up to 2e-6).
#[test]
fn a_top_k_of_the_whole_vocabulary_computes_what_the_full_logits_do() {
    let d = fixture().dir.path();
    let vocab: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("teacher/model/config.json")).unwrap(),
    )
    .unwrap();
    let v = vocab["vocab_size"].as_u64().unwrap();
    for loss in ["forward", "reverse", "jsd"] {
        let common = format!("temperature = 1.5\nalpha = 0.7\nloss = \"{loss}\"");
        let full = format!("full_{loss}");
        let top = format!("top_{loss}");
        ok(slm()
            .arg("train")
            .arg(recipe(d, &full, &common, 128))
            .current_dir(d));
        ok(slm()
            .arg("train")
            .arg(recipe(d, &top, &format!("{common}\ntop_k = {v}"), 128))
            .current_dir(d));
        let (a, b) = (losses(&d.join(full))[0].1, losses(&d.join(top))[0].1);
        eprintln!("{loss}: full {a}, top-k {b}");
        assert!((a - b).abs() <= 1e-5 * a.abs(), "{loss}: {a} vs {b}");
    }
}

#[test]
fn bad_teachers_and_settings_are_refused_by_name() {
    let d = fixture().dir.path();
    let refused = |name: &str, settings: &str, want: &[&str]| {
        let r = recipe(d, name, settings, 128);
        let e = fails(slm().arg("train").arg(&r).current_dir(d));
        for w in want {
            assert!(e.contains(w), "{name}: wants {w:?} in: {e}");
        }
    };
    refused("t0", "temperature = 0.0", &["teacher.temperature", "0"]);
    refused("tneg", "temperature = -1.0", &["teacher.temperature"]);
    refused(
        "a15",
        "alpha = 1.5",
        &["teacher.alpha", "1.5", "0 <= alpha <= 1"],
    );
    refused("aneg", "alpha = -0.1", &["teacher.alpha"]);
    refused("b1", "loss = \"jsd\"\nbeta = 1.0", &["teacher.beta"]);
    refused("k", "top_k = 100000", &["teacher.top_k", "100000"]);
    refused("loss", "loss = \"kl\"", &["loss", "kl"]);

    // A teacher with another tokenizer: one token's id swapped with another's.
    let other = d.join("other_teacher");
    copy_dir(&d.join("teacher/model"), &other);
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = {
        let mut keys = vocab.keys().skip(10);
        (keys.next().unwrap().clone(), keys.next().unwrap().clone())
    };
    let (ia, ib) = (vocab[&a].clone(), vocab[&b].clone());
    vocab.insert(a, ib);
    vocab.insert(b, ia);
    std::fs::write(other.join("tokenizer.json"), tok.to_string()).unwrap();
    let r = recipe(d, "other", "", 128);
    let text = std::fs::read_to_string(&r).unwrap();
    std::fs::write(&r, text.replace("teacher/model", "other_teacher")).unwrap();
    let e = fails(slm().arg("train").arg(&r).current_dir(d));
    assert!(
        e.contains("other_teacher") && e.contains("tokenizer differs") && e.contains("2 of"),
        "{e}"
    );

    // A teacher needs the kd objective, and kd a teacher.
    let r = recipe(d, "lm_teacher", "", 128);
    let text = std::fs::read_to_string(&r).unwrap();
    std::fs::write(&r, text.replace("kind = \"kd\"", "kind = \"lm\"")).unwrap();
    let e = fails(slm().arg("train").arg(&r).current_dir(d));
    assert!(e.contains("teacher") && e.contains("kd"), "{e}");
    let r = recipe(d, "no_teacher", "", 128);
    let text = std::fs::read_to_string(&r).unwrap();
    let start = text.find("[teacher]").unwrap();
    let end = text.find("[budget]").unwrap();
    std::fs::write(&r, format!("{}{}", &text[..start], &text[end..])).unwrap();
    let e = fails(slm().arg("train").arg(&r).current_dir(d));
    assert!(e.contains("teacher") && e.contains("(missing)"), "{e}");

    // A teacher that is no model.
    let r = recipe(d, "nothing", "", 128);
    let text = std::fs::read_to_string(&r).unwrap();
    std::fs::write(&r, text.replace("teacher/model", "no_such_model")).unwrap();
    let e = fails(slm().arg("train").arg(&r).current_dir(d));
    assert!(e.contains("no_such_model"), "{e}");

    // A student of a longer context than the teacher's 32 positions, online and cached.
    let r = recipe(d, "long", "", 1280);
    let text = std::fs::read_to_string(&r).unwrap();
    std::fs::write(&r, text.replace("context = 16", "context = 64")).unwrap();
    let e = fails(slm().arg("train").arg(&r).current_dir(d));
    assert!(
        e.contains("teacher/model") && e.contains("context of 32") && e.contains("64"),
        "{e}"
    );
    let e = fails(distill_cache(d).args(["--context", "64", "-o", "long_targets"]));
    assert!(e.contains("context of 32") && e.contains("64"), "{e}");
}

/// `slm distill cache` of the fixture's teacher over its shards, in `d`.
fn distill_cache(d: &Path) -> std::process::Command {
    let mut c = slm();
    c.args(["distill", "cache", "teacher/model", "--data", "shards"])
        .current_dir(d);
    c
}

/// Windows of 16 positions of the fixture's shards with the teacher's top 8 at T = 2.
fn cache(d: &Path, name: &str, context: usize) -> PathBuf {
    ok(distill_cache(d)
        .args(["--top-k", "8", "--temperature", "2.0", "--batch", "3"])
        .args(["--context", &context.to_string(), "-o", name]));
    d.join(name)
}

#[test]
fn a_cached_run_follows_the_online_one_and_one_cache_serves_two_students() {
    let d = fixture().dir.path();
    let targets = cache(d, "targets", 16);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(targets.join("cache.json")).unwrap())
            .unwrap();
    // 8 u16 ids, 8 f16 log-probabilities and an f32 rest per position.
    let windows = meta["windows"].as_u64().unwrap();
    assert_eq!(
        std::fs::metadata(targets.join("targets.bin"))
            .unwrap()
            .len(),
        windows * 16 * (8 * 4 + 4)
    );
    let settings = "temperature = 2.0\nalpha = 0.5\ntop_k = 8";
    ok(slm()
        .arg("train")
        .arg(recipe(d, "online8", settings, 3200))
        .current_dir(d));
    ok(slm()
        .arg("train")
        .arg(recipe(
            d,
            "cached8",
            &format!("{settings}\ncache = \"targets\""),
            3200,
        ))
        .current_dir(d));
    let (online, cached) = (losses(&d.join("online8")), losses(&d.join("cached8")));
    assert_eq!(online.len(), 25);
    // The same windows and the same f16-rounded targets: the teacher's rows do not depend
    // on how its forward groups them (the cache 3 windows a pass, the run 4).
    for ((s, a), (_, b)) in online.iter().zip(&cached) {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "update {s}: online {a}, cached {b}"
        );
    }

    // A second student of another shape reads the same cache.
    let r = recipe(
        d,
        "cached_other",
        &format!("{settings}\ncache = \"targets\""),
        3200,
    );
    let text = std::fs::read_to_string(&r).unwrap();
    std::fs::write(
        &r,
        text.replace("d_model = 32", "d_model = 48")
            .replace("layers = 2", "layers = 1"),
    )
    .unwrap();
    ok(slm().arg("train").arg(&r).current_dir(d));
    let l = losses(&d.join("cached_other"));
    assert!(l[24].1 < l[0].1, "the second student learns: {l:?}");

    // A cache made for something else is refused by name.
    let with = |name: &str, settings: &str, edit: &dyn Fn(String) -> String| {
        let r = recipe(d, name, settings, 128);
        let text = std::fs::read_to_string(&r).unwrap();
        std::fs::write(&r, edit(text)).unwrap();
        fails(slm().arg("train").arg(&r).current_dir(d))
    };
    let cached = format!("{settings}\ncache = \"targets\"");
    let e = with("c_ctx", &cached, &|t| {
        t.replace("context = 16", "context = 12")
    });
    assert!(
        e.contains("targets") && e.contains("context 16") && e.contains("12"),
        "{e}"
    );
    let e = with("c_temp", &cached.replace("2.0", "1.0"), &|t| t);
    assert!(e.contains("temperature 2") && e.contains("is 1"), "{e}");
    let e = with("c_k", &cached.replace("top_k = 8", "top_k = 16"), &|t| t);
    assert!(e.contains("top 8") && e.contains("top_k = 16"), "{e}");
    train_tiny(d, "teacher2", 2, true);
    let e = with("c_teacher", &cached, &|t| {
        t.replace("teacher/model", "teacher2/model")
    });
    assert!(e.contains("another teacher") && e.contains("sha256"), "{e}");
    // Shards of part of the corpus.
    std::fs::create_dir_all(d.join("half")).unwrap();
    for i in 0..15 {
        let f = format!("{i:02}.txt");
        std::fs::copy(d.join("corpus").join(&f), d.join("half").join(&f)).unwrap();
    }
    ok(slm()
        .args([
            "data",
            "prepare",
            "half",
            "--tokenizer",
            "tok.json",
            "-o",
            "half_shards",
        ])
        .current_dir(d));
    let e = with("c_shards", &cached, &|t| {
        t.replace("\"shards\"", "\"half_shards\"")
    });
    assert!(
        e.contains("other shards") && e.contains("half_shards"),
        "{e}"
    );

    // A cache is written once.
    let e = fails(distill_cache(d).args(["--context", "16", "-o", "targets"]));
    assert!(e.contains("targets") && e.contains("exists"), "{e}");

    // Bad settings of `slm distill cache`, by name.
    let cache_fails =
        |args: &[&str]| fails(distill_cache(d).args(args).args(["-o", "bad_targets"]));
    let e = cache_fails(&["--context", "16", "--top-k", "0"]);
    assert!(e.contains("--top-k 0"), "{e}");
    let e = cache_fails(&["--context", "16", "--temperature", "0"]);
    assert!(e.contains("--temperature 0"), "{e}");
    let e = cache_fails(&["--context", "0"]);
    assert!(e.contains("--context 0"), "{e}");
    let e = cache_fails(&["--context", "16", "--batch", "0"]);
    assert!(e.contains("--batch 0"), "{e}");
    // Without --tokenizer, the teacher's own tokenizer.json must be the file the shards were
    // made with: here the same vocabulary in other bytes (pretty-printed).
    let respaced = d.join("respaced_teacher");
    copy_dir(&d.join("teacher/model"), &respaced);
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(respaced.join("tokenizer.json")).unwrap())
            .unwrap();
    std::fs::write(
        respaced.join("tokenizer.json"),
        serde_json::to_string_pretty(&tok).unwrap(),
    )
    .unwrap();
    let e = fails(
        slm()
            .args(["distill", "cache", "respaced_teacher", "--data", "shards"])
            .args(["--context", "16", "-o", "bad_targets"])
            .current_dir(d),
    );
    assert!(e.contains("--tokenizer"), "{e}");

    // A damaged cache: cut short, or holding a token id past the vocabulary.
    let damaged = d.join("damaged");
    copy_dir(&targets, &damaged);
    let bin = damaged.join("targets.bin");
    let mut bytes = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &bytes[..bytes.len() - 10]).unwrap();
    let e = with("c_short", &cached.replace("targets", "damaged"), &|t| t);
    assert!(e.contains("damaged") && e.contains("bytes"), "{e}");
    for w in 0..windows as usize {
        // The first id of every window, so whichever the run draws first is damaged.
        let at = w * 16 * (8 * 4 + 4);
        bytes[at..at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
    }
    std::fs::write(&bin, &bytes).unwrap();
    let e = with("c_id", &cached.replace("targets", "damaged"), &|t| t);
    assert!(e.contains("65535") && e.contains("vocabulary"), "{e}");
}

/// `slm synth`: distinct documents from the teacher in the prompts' turn, a corpus
/// `slm data prepare` reads; an interrupted file (a line cut short) continued by the same
/// command into what an unbroken run writes; other settings and bad prompts refused.
#[test]
fn synth_writes_distinct_documents_and_continues_an_interrupted_file() {
    let d = fixture().dir.path();
    std::fs::write(
        d.join("prompts.jsonl"),
        "{\"prompt\": \"the whale\"}\n{\"prompt\": \"the captain\"}\n{\"text\": \"deep sea\"}\n",
    )
    .unwrap();
    let synth = |out: &str, n: &str| {
        let mut c = slm();
        c.args([
            "synth",
            "teacher/model",
            "--prompts",
            "prompts.jsonl",
            "-n",
            n,
        ])
        .args([
            "--max-tokens",
            "12",
            "--parallel",
            "3",
            "--keep-prompt",
            "--seed",
            "7",
        ])
        .args(["-o", out])
        .current_dir(d);
        c
    };
    ok(&mut synth("syn.jsonl", "12"));
    let text = std::fs::read_to_string(d.join("syn.jsonl")).unwrap();
    let docs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(docs.len(), 12);
    let distinct: std::collections::HashSet<&str> =
        docs.iter().map(|d| d["text"].as_str().unwrap()).collect();
    assert_eq!(distinct.len(), 12);
    for doc in &docs {
        let (t, p) = (
            doc["text"].as_str().unwrap(),
            doc["prompt"].as_str().unwrap(),
        );
        assert!(t.starts_with(p) && t.len() > p.len(), "{doc}");
    }
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("syn.jsonl.synth.json")).unwrap())
            .unwrap();
    assert_eq!(meta["teacher_sha256"].as_str().unwrap().len(), 64);
    ok(slm()
        .args([
            "data",
            "prepare",
            "syn.jsonl",
            "--tokenizer",
            "tok.json",
            "-o",
            "syn_shards",
        ])
        .current_dir(d));

    // Interrupted after five documents and part of the sixth.
    let cut: usize = text.lines().take(5).map(|l| l.len() + 1).sum::<usize>() + 10;
    std::fs::write(d.join("again.jsonl"), &text[..cut]).unwrap();
    std::fs::copy(
        d.join("syn.jsonl.synth.json"),
        d.join("again.jsonl.synth.json"),
    )
    .unwrap();
    ok(&mut synth("again.jsonl", "12"));
    assert_eq!(
        std::fs::read_to_string(d.join("again.jsonl")).unwrap(),
        text
    );

    let e = fails(&mut synth("syn.jsonl", "13"));
    assert!(
        e.contains("syn.jsonl") && e.contains("other settings"),
        "{e}"
    );
    // A file synth did not write, a prompt and reply past the teacher's context, no documents.
    let e = fails(&mut synth("prompts.jsonl", "12"));
    assert!(
        e.contains("prompts.jsonl") && e.contains("no slm synth output"),
        "{e}"
    );
    let e = fails(
        slm()
            .args([
                "synth",
                "teacher/model",
                "--prompts",
                "prompts.jsonl",
                "-n",
                "2",
            ])
            .args(["--max-tokens", "100", "-o", "long.jsonl"])
            .current_dir(d),
    );
    assert!(
        e.contains("--max-tokens 100") && e.contains("context 32"),
        "{e}"
    );
    let e = fails(&mut synth("none.jsonl", "0"));
    assert!(e.contains("-n 0"), "{e}");
    // Greedy decoding gives at most one document per prompt: fewer than the 5 asked for.
    let e = fails(
        slm()
            .args([
                "synth",
                "teacher/model",
                "--prompts",
                "prompts.jsonl",
                "-n",
                "5",
            ])
            .args(["--temp", "0", "--max-tokens", "8", "-o", "greedy.jsonl"])
            .current_dir(d),
    );
    assert!(
        e.contains("distinct documents of 5 in 20 tries") && e.contains("--temp"),
        "{e}"
    );
    std::fs::write(
        d.join("bad_prompts.jsonl"),
        "{\"prompt\": \"a\"}\n{\"topic\": 3}\n",
    )
    .unwrap();
    let e = fails(
        slm()
            .args([
                "synth",
                "teacher/model",
                "--prompts",
                "bad_prompts.jsonl",
                "-n",
                "2",
            ])
            .args(["-o", "bad.jsonl"])
            .current_dir(d),
    );
    assert!(
        e.contains("bad_prompts.jsonl") && e.contains("line 2"),
        "{e}"
    );
}

/// A teacher whose embedding and output have rows past the tokenizer's vocabulary (as
/// Qwen's are padded) teaches as the same teacher without them: their logits are dropped.
#[test]
fn a_teacher_with_padding_rows_teaches_as_without_them() {
    let d = fixture().dir.path();
    let padded = d.join("padded_teacher");
    copy_dir(&d.join("teacher/model"), &padded);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(padded.join("config.json")).unwrap())
            .unwrap();
    let v = config["vocab_size"].as_u64().unwrap() as usize;
    config["vocab_size"] = (v + 20).into();
    std::fs::write(padded.join("config.json"), config.to_string()).unwrap();
    let dev = candle_core::Device::Cpu;
    let mut tensors =
        candle_core::safetensors::load(padded.join("model.safetensors"), &dev).unwrap();
    let mut grown = 0;
    for t in tensors.values_mut() {
        if t.dims().len() == 2 && t.dim(0).unwrap() == v {
            // Large rows: were they not dropped, they would take the distribution.
            let pad = (candle_core::Tensor::ones((20, t.dim(1).unwrap()), t.dtype(), &dev)
                .unwrap()
                * 3.0)
                .unwrap();
            *t = candle_core::Tensor::cat(&[&*t, &pad], 0).unwrap();
            grown += 1;
        }
    }
    assert!(grown >= 1, "the teacher has an embedding of {v} rows");
    candle_core::safetensors::save(&tensors, padded.join("model.safetensors")).unwrap();
    let settings = "temperature = 1.0\nalpha = 0.5";
    ok(slm()
        .arg("train")
        .arg(recipe(d, "plain_teacher", settings, 640))
        .current_dir(d));
    let r = recipe(d, "padded", settings, 640);
    let text = std::fs::read_to_string(&r).unwrap();
    std::fs::write(&r, text.replace("teacher/model", "padded_teacher")).unwrap();
    ok(slm().arg("train").arg(&r).current_dir(d));
    let (a, b) = (losses(&d.join("plain_teacher")), losses(&d.join("padded")));
    assert_eq!(a.len(), 5);
    for ((s, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x.to_bits(), y.to_bits(), "update {s}: {x} vs {y}");
    }
}
