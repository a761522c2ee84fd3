//! `slm train` killed with SIGKILL at random moments, then resumed, again and again: every
//! checkpoint on disk stays loadable and the loss curve equals an unbroken run's.

use std::path::{Path, PathBuf};

mod common;
use common::{copy_dir, corpus_tokenizer_shards as setup, fails, kill_and_resume, losses, ok, slm};

fn recipe(dir: &Path, name: &str) -> PathBuf {
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
[budget]
tokens = 38400
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

fn checkpoints_are_whole(run: &Path) {
    let Ok(entries) = std::fs::read_dir(run.join("checkpoints")) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue; // an unfinished temporary folder, never read
        }
        let d = e.path();
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("state.json")).unwrap()).unwrap();
        assert!(state["step"].as_u64().is_some(), "{name}");
        for f in ["model.safetensors", "optim.safetensors"] {
            candle_core::safetensors::load(d.join(f), &candle_core::Device::Cpu)
                .unwrap_or_else(|e| panic!("{name}/{f}: {e}"));
        }
    }
}

#[test]
fn killed_and_resumed_training_matches_an_unbroken_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let started = std::time::Instant::now();
    ok(slm().arg("train").arg(recipe(d, "unbroken")).current_dir(d));
    // Kills land at random points of a run as long as the unbroken one took.
    let run_ms = started.elapsed().as_millis() as u64;
    let want = losses(&d.join("unbroken"));
    assert_eq!(want.len(), 300);
    assert!(want[299].1 < want[0].1 - 0.5, "the tiny model learns");

    let r = recipe(d, "killed");
    let run = d.join("killed");
    let kills = kill_and_resume(d, &r, &run, run_ms, || checkpoints_are_whole(&run));
    eprintln!("killed {kills} times");
    assert!(
        kills >= 2,
        "the run was killed {kills} times; the test needs at least two"
    );
    checkpoints_are_whole(&d.join("killed"));
    let got = losses(&d.join("killed"));
    assert_eq!(got.len(), want.len());
    for ((s1, a), (s2, b)) in want.iter().zip(&got) {
        assert_eq!(s1, s2);
        // To the bit: a checkpoint holds the exact parameters and moments, and every
        // reduction of the trainer sums in a fixed order.
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "step {s1}: unbroken {a}, resumed {b}"
        );
    }
    assert!(d.join("killed/model/model.safetensors").is_file());
    // Samples at each evaluation (300 updates, interval 40: 7 passes plus the final one, 3 prompts
    // each); their RNG is keyed to the update, so the resumed run wrote the same ones.
    let samples = |run: &str| std::fs::read_to_string(d.join(run).join("samples.jsonl")).unwrap();
    assert_eq!(samples("unbroken").lines().count(), 8 * 3);
    assert_eq!(samples("killed"), samples("unbroken"));
    let report = std::fs::read_to_string(d.join("unbroken/report.html")).unwrap();
    assert!(
        report.contains("<svg") && report.contains("valid loss"),
        "report.html"
    );
    assert!(report.contains("<h2>samples</h2>") && report.contains("update 300"));

    // The model folder runs in slm's own generate and chat (its chat template is ChatML).
    let model = d.join("unbroken/model");
    let out = slm()
        .arg("generate")
        .arg(&model)
        .args(["-p", "the whale", "-n", "12", "--seed", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("the whale") && text.len() > "the whale".len() + 8,
        "{text:?}"
    );
    let mut chat = slm()
        .arg("chat")
        .arg(&model)
        .args(["-n", "8"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    chat.stdin
        .take()
        .unwrap()
        .write_all(b"the captain sailed\n/exit\n")
        .unwrap();
    let out = chat.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn training_and_data_mistakes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);

    // Shards made with one tokenizer, trained with another.
    ok(slm()
        .args([
            "tokenizer",
            "train",
            "corpus",
            "--vocab",
            "310",
            "-o",
            "other.json",
        ])
        .current_dir(d));
    let r = recipe(d, "mismatch");
    let text = std::fs::read_to_string(&r).unwrap();
    std::fs::write(&r, text.replace("tok.json", "other.json")).unwrap();
    let e = fails(slm().arg("train").arg(&r).current_dir(d));
    assert!(
        e.contains("slm data prepare") && e.contains("tokenizer"),
        "{e}"
    );

    // A context longer than any training shard.
    let r = recipe(d, "long");
    let text = std::fs::read_to_string(&r).unwrap();
    // (With a budget large enough for one update, which is checked first.)
    let text = text.replace("tokens = 38400", "tokens = 1000000");
    std::fs::write(&r, text.replace("context = 16", "context = 100000")).unwrap();
    let e = fails(slm().arg("train").arg(&r).current_dir(d));
    assert!(e.contains("model.context 100000"), "{e}");

    // Starting over a run that has checkpoints, instead of resuming it.
    let r = recipe(d, "twice");
    let text = std::fs::read_to_string(&r).unwrap();
    std::fs::write(&r, text.replace("tokens = 38400", "tokens = 1280")).unwrap();
    ok(slm().arg("train").arg(&r).current_dir(d));
    let e = fails(slm().arg("train").arg(&r).current_dir(d));
    assert!(e.contains("--resume"), "{e}");

    // Continuing from a parent model folder starts from its weights: one update at a tiny
    // learning rate leaves them (almost) as they were.
    let rc = recipe(d, "continued");
    let text = std::fs::read_to_string(&rc).unwrap();
    let start = text.find("[model]").unwrap();
    let end = text.find("[budget]").unwrap();
    let text = format!(
        "{}[model]\nparent = \"twice/model\"\ncontext = 16\n{}",
        &text[..start],
        &text[end..]
    )
    .replace("tokens = 38400", "tokens = 128")
    .replace("lr = 3e-3", "lr = 1e-9");
    std::fs::write(&rc, &text).unwrap();
    ok(slm().arg("train").arg(&rc).current_dir(d));
    let load =
        |p: &str| candle_core::safetensors::load(d.join(p), &candle_core::Device::Cpu).unwrap();
    let (parent, child) = (
        load("twice/model/model.safetensors"),
        load("continued/model/model.safetensors"),
    );
    assert_eq!(parent.len(), child.len());
    for (name, a) in &parent {
        let diff = (a - &child[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6, "{name}");
    }
    let lineage: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("continued/model/slm.json")).unwrap())
            .unwrap();
    assert!(lineage["parent"].as_str().unwrap().ends_with("twice/model"));
    // A parent whose tokenizer is not the one the shards were made with.
    copy_dir(&d.join("twice/model"), &d.join("alien"));
    std::fs::copy(d.join("other.json"), d.join("alien/tokenizer.json")).unwrap();
    std::fs::write(
        &rc,
        text.replace("twice/model", "alien")
            .replace("out = \"continued\"", "out = \"alien-run\""),
    )
    .unwrap();
    let e = fails(slm().arg("train").arg(&rc).current_dir(d));
    assert!(e.contains("parent's tokenizer differs"), "{e}");
    // A parent whose vocabulary is not the shards', a context past the parent's, and a parent
    // missing a tensor its config.json implies.
    let text = text.replace("out = \"continued\"", "out = \"bad-parent\"");
    copy_dir(&d.join("twice/model"), &d.join("wide"));
    let cfg_path = d.join("wide/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vocab_size"] = 999.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    std::fs::write(&rc, text.replace("twice/model", "wide")).unwrap();
    let e = fails(slm().arg("train").arg(&rc).current_dir(d));
    assert!(
        e.contains("vocab_size = 999") && e.contains("300 tokens"),
        "{e}"
    );
    std::fs::write(&rc, text.replace("context = 16", "context = 17")).unwrap();
    let e = fails(slm().arg("train").arg(&rc).current_dir(d));
    assert!(
        e.contains("max_position_embeddings = 16") && e.contains("model.context 17"),
        "{e}"
    );
    copy_dir(&d.join("twice/model"), &d.join("holed"));
    let weights = d.join("holed/model.safetensors");
    let mut params = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    params.remove("model.norm.weight");
    candle_core::safetensors::save(&params, &weights).unwrap();
    std::fs::write(&rc, text.replace("twice/model", "holed")).unwrap();
    let e = fails(slm().arg("train").arg(&rc).current_dir(d));
    assert!(
        e.contains("holed") && e.contains("no tensor model.norm.weight"),
        "{e}"
    );
    // Shape keys next to a parent.
    std::fs::write(
        &rc,
        text.replace("context = 16", "context = 16\nlayers = 3"),
    )
    .unwrap();
    let e = fails(slm().arg("train").arg(&rc).current_dir(d));
    assert!(
        e.contains("model.layers") && e.contains("model.parent"),
        "{e}"
    );

    // Parameters that turn the loss into NaN (a damaged checkpoint) stop the run, by step.
    let ckpts = d.join("twice/checkpoints");
    let last = std::fs::read_dir(&ckpts)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("state.json").is_file())
        .max()
        .unwrap();
    let model = last.join("model.safetensors");
    let mut params = candle_core::safetensors::load(&model, &candle_core::Device::Cpu).unwrap();
    let norm = params.get_mut("model.norm.weight").unwrap();
    *norm = (norm.ones_like().unwrap() * f64::NAN).unwrap();
    candle_core::safetensors::save(&params, &model).unwrap();
    let state = last.join("state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    st["total_steps"] = 1000.into(); // more updates to go, so the resumed run does one
    std::fs::write(&state, st.to_string()).unwrap();
    let e = fails(slm().arg("train").arg(&r).arg("--resume").current_dir(d));
    assert!(e.contains("the loss is NaN") && e.contains("step"), "{e}");

    // Data preparation: an EOS the tokenizer lacks, an impossible validation share, a
    // tokenizer file that is not there or not a tokenizer.
    let prepare = |tokenizer: &str, extra: &[&str]| {
        fails(
            slm()
                .args([
                    "data",
                    "prepare",
                    "corpus",
                    "--tokenizer",
                    tokenizer,
                    "-o",
                    "s2",
                ])
                .args(extra)
                .current_dir(d),
        )
    };
    let e = prepare("tok.json", &["--eos", "</s>"]);
    assert!(e.contains("</s>") && e.contains("--eos"), "{e}");
    let e = prepare("tok.json", &["--valid-fraction", "1.5"]);
    assert!(e.contains("--valid-fraction 1.5"), "{e}");
    let e = prepare("missing.json", &[]);
    assert!(
        e.contains("missing.json") && e.contains("No such file"),
        "{e}"
    );
    std::fs::write(d.join("junk.json"), "{").unwrap();
    let e = prepare("junk.json", &[]);
    assert!(e.contains("junk.json"), "{e}");

    // quickstart never overwrites a folder that holds something.
    let e = fails(slm().args(["quickstart", "--out", "corpus"]).current_dir(d));
    assert!(e.contains("already exists"), "{e}");
}
