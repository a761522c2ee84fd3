//! Fine-tuning with a classifier head, end to end through the `slm` binary: a tiny base
//! model trained on the bundled-style corpus, then a sequence-classification head and a
//! token-classification head fine-tuned over it on keyword tasks; `slm eval` and
//! `slm predict` with the heads; transformers loads both folders (as
//! LlamaForSequenceClassification and LlamaForTokenClassification) and gives the same
//! logits; and bad input is refused by name.
//!
//! The transformers comparison needs a Python with torch and transformers (`$SLM_PYTHON`);
//! elsewhere it is ignored, and under CI it runs and fails (build-support/test_assets.rs).

use std::path::{Path, PathBuf};

mod common;
use common::{corpus_tokenizer_shards, fails, ok, slm, train_tiny};

const WORDS: [&str; 10] = [
    "the", "whale", "ship", "sea", "captain", "white", "deep", "sailed", "under", "storm",
];

/// Deterministic sentences of corpus words.
fn sentences(n: usize, seed: u64) -> Vec<Vec<&'static str>> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = 3 + (x >> 59) as usize % 8;
            (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    WORDS[(x >> 60) as usize % WORDS.len()]
                })
                .collect()
        })
        .collect()
}

/// `{"text","label"}` rows: "storm" if the sentence names one, else "calm".
fn classify_file(path: &Path, n: usize, seed: u64) {
    let rows: String = sentences(n, seed)
        .iter()
        .map(|s| {
            let label = if s.contains(&"storm") {
                "storm"
            } else {
                "calm"
            };
            format!(
                "{}\n",
                serde_json::json!({"text": s.join(" "), "label": label})
            )
        })
        .collect();
    std::fs::write(path, rows).unwrap();
}

/// `{"tokens","tags"}` rows of corpus words (see `write_tagged`).
fn tag_file(path: &Path, n: usize, seed: u64) {
    write_tagged(path, &sentences(n, seed));
}

/// The rows of `tag_file`, each with "white whale" or "white ship" (alternately) put in at
/// a varying place: "white" begins an animal or a vessel, which only the next word tells.
fn white_pair_file(path: &Path, n: usize, seed: u64) {
    let rows: Vec<Vec<&str>> = sentences(n, seed)
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let at = (i / 2) % (s.len() + 1);
            let second = if i % 2 == 0 { "whale" } else { "ship" };
            s.splice(at..at, ["white", second]);
            s
        })
        .collect();
    write_tagged(path, &rows);
}

/// Writes `{"tokens","tags"}` rows: "captain" is a person, "white whale" an animal, "white
/// ship" a vessel.
fn write_tagged(path: &Path, sentences: &[Vec<&str>]) {
    let rows: String = sentences
        .iter()
        .map(|s| {
            let tags: Vec<&str> = (0..s.len())
                .map(
                    |i| match (s[i], i.checked_sub(1).map(|j| s[j]), s.get(i + 1)) {
                        ("captain", _, _) => "B-person",
                        ("white", _, Some(&"whale")) => "B-animal",
                        ("whale", Some("white"), _) => "I-animal",
                        ("white", _, Some(&"ship")) => "B-vessel",
                        ("ship", Some("white"), _) => "I-vessel",
                        _ => "O",
                    },
                )
                .collect();
            format!("{}\n", serde_json::json!({"tokens": s, "tags": tags}))
        })
        .collect();
    std::fs::write(path, rows).unwrap();
}

/// Fine-tunes `parent` on `train` for `epochs`; `objective` is the `[objective]` table's body.
fn fine_tune(
    dir: &Path,
    name: &str,
    objective: &str,
    epochs: usize,
    parent: &Path,
    train: &str,
) -> PathBuf {
    let recipe = dir.join(format!("{name}.toml"));
    std::fs::write(
        &recipe,
        format!(
            r#"[run]
out = "{name}"
seed = 3
[data]
train = "{train}"
valid_fraction = 0.2
[model]
parent = "{}"
[objective]
{objective}
[budget]
epochs = {epochs}
[optim]
batch = 8
lr = 3e-3
warmup = 5
weight_decay = 0.0
[eval]
interval = 20
"#,
            parent.display(),
        ),
    )
    .unwrap();
    ok(slm().arg("train").arg(&recipe).current_dir(dir));
    dir.join(name).join("model")
}

fn metric(results: &Path, task: usize, name: &str) -> f64 {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(results).unwrap()).unwrap();
    r["tasks"][task]["metrics"][name]["value"].as_f64().unwrap()
}

/// Our logits for `ids` rows: a sequence head's at each row's last token, a token head's at
/// every token.
fn slm_logits(model_dir: &Path, rows: &[Vec<u32>], per_token: bool) -> Vec<f32> {
    let mut out = Vec::new();
    for l in common::model_logits(model_dir, rows) {
        if per_token {
            out.extend(l.into_iter().flatten());
        } else {
            out.extend(l.last().unwrap());
        }
    }
    out
}

/// Two tiny base models (one tied with grouped kv heads, one untied) and a classifier
/// fine-tuned over each, made once for the tests of this file.
struct Fixture {
    dir: tempfile::TempDir,
    base: PathBuf,
    cls: PathBuf,
    tag: PathBuf,
    /// Taggers of `white_pair_file`, without and with `echo`.
    pair: PathBuf,
    pair_echo: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        corpus_tokenizer_shards(d);
        let base = train_tiny(d, "base", 1, true);
        let untied = train_tiny(d, "base_untied", 4, false);
        classify_file(&d.join("cls.jsonl"), 600, 1);
        classify_file(&d.join("cls_test.jsonl"), 200, 2);
        tag_file(&d.join("tag.jsonl"), 600, 3);
        tag_file(&d.join("tag_test.jsonl"), 200, 4);
        let cls = fine_tune(d, "cls", "kind = \"classify\"", 4, &base, "cls.jsonl");
        let tag = fine_tune(d, "tag", "kind = \"tag\"", 4, &untied, "tag.jsonl");
        white_pair_file(&d.join("pair.jsonl"), 600, 5);
        white_pair_file(&d.join("pair_test.jsonl"), 200, 6);
        let pair = fine_tune(d, "pair", "kind = \"tag\"", 4, &untied, "pair.jsonl");
        let pair_echo = fine_tune(
            d,
            "pair_echo",
            "kind = \"tag\"\necho = true",
            4,
            &untied,
            "pair.jsonl",
        );
        Fixture {
            dir,
            base,
            cls,
            tag,
            pair,
            pair_echo,
        }
    })
}

#[test]
fn classifier_heads_train_evaluate_predict_and_refuse_bad_input() {
    let Fixture {
        dir,
        base,
        cls,
        tag,
        ..
    } = fixture();
    let (d, base, cls, tag) = (dir.path(), base.as_path(), cls.as_path(), tag.as_path());

    // Held-out rows of the same rule: the heads learnt it.
    ok(slm()
        .args(["eval"])
        .arg(cls)
        .args(["--task", "classify:cls_test.jsonl", "--out", "cls.json"])
        .current_dir(d));
    let acc = metric(&d.join("cls.json"), 0, "acc");
    eprintln!("classify accuracy {acc}");
    assert!(acc >= 0.9, "classify accuracy {acc}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("cls.json")).unwrap()).unwrap();
    let confusion = r["tasks"][0]["confusion"].as_array().unwrap();
    let total: u64 = confusion
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(total, 200);
    assert_eq!(
        r["tasks"][0]["labels"],
        serde_json::json!(["calm", "storm"])
    );
    ok(slm()
        .args(["eval"])
        .arg(tag)
        .args(["--task", "tag:tag_test.jsonl", "--out", "tag.json"])
        .current_dir(d));
    let f1 = metric(&d.join("tag.json"), 0, "f1");
    eprintln!("tag entity F1 {f1}");
    assert!(f1 >= 0.9, "tag F1 {f1}");
    assert!(metric(&d.join("tag.json"), 0, "f1/person") > 0.0);

    // slm predict: a label and the probabilities of all labels, or a tag per word.
    ok(slm()
        .args(["predict"])
        .arg(cls)
        .args(["--input", "cls_test.jsonl", "-o", "cls_pred.jsonl"])
        .current_dir(d));
    let preds = std::fs::read_to_string(d.join("cls_pred.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), 200);
    for line in preds.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let p = v["probabilities"].as_object().unwrap();
        let sum: f64 = p.values().map(|x| x.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{line}");
        let best = p
            .iter()
            .max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
            .unwrap()
            .0;
        assert_eq!(v["label"], best.as_str(), "{line}");
    }
    ok(slm()
        .args(["predict"])
        .arg(tag)
        .args(["--input", "tag_test.jsonl", "-o", "tag_pred.jsonl"])
        .current_dir(d));
    let preds = std::fs::read_to_string(d.join("tag_pred.jsonl")).unwrap();
    let gold = std::fs::read_to_string(d.join("tag_test.jsonl")).unwrap();
    for (p, g) in preds.lines().zip(gold.lines()) {
        let (p, g): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(p).unwrap(),
            serde_json::from_str(g).unwrap(),
        );
        assert_eq!(p["tokens"], g["tokens"]);
        assert_eq!(
            p["tags"].as_array().unwrap().len(),
            g["tokens"].as_array().unwrap().len()
        );
    }

    // Bad input, refused by name.
    std::fs::write(
        d.join("unknown.jsonl"),
        "{\"text\": \"the sea\", \"label\": \"calm\"}\n{\"text\": \"the ship\", \"label\": \"gale\"}\n",
    )
    .unwrap();
    let e = fails(
        slm()
            .arg("eval")
            .arg(cls)
            .args(["--task", "classify:unknown.jsonl"])
            .current_dir(d),
    );
    assert!(
        e.contains("row 2") && e.contains("'gale'") && e.contains("calm"),
        "{e}"
    );
    std::fs::write(
        d.join("bad_bio.jsonl"),
        "{\"tokens\": [\"the\", \"whale\"], \"tags\": [\"O\", \"I-animal\"]}\n",
    )
    .unwrap();
    let e = fails(
        slm()
            .arg("eval")
            .arg(tag)
            .args(["--task", "tag:bad_bio.jsonl"])
            .current_dir(d),
    );
    assert!(
        e.contains("bad_bio.jsonl:1") && e.contains("not valid BIO"),
        "{e}"
    );
    let e = fails(
        slm()
            .arg("eval")
            .arg(tag)
            .args(["--task", "classify:cls_test.jsonl"])
            .current_dir(d),
    );
    assert!(e.contains("token-classification head"), "{e}");
    let e = fails(
        slm()
            .arg("eval")
            .arg(base)
            .args(["--task", "tag:tag_test.jsonl"])
            .current_dir(d),
    );
    assert!(
        e.contains("language-model head") && e.contains("token-classification"),
        "{e}"
    );
    let e = fails(
        slm()
            .arg("predict")
            .arg(base)
            .args(["--input", "cls_test.jsonl", "-o", "x.jsonl"])
            .current_dir(d),
    );
    assert!(e.contains("language-model head"), "{e}");
    let e = fails(
        slm()
            .arg("generate")
            .arg(cls)
            .args(["--prompt", "the"])
            .current_dir(d),
    );
    assert!(e.contains("sequence-classification head"), "{e}");
    // A head on a model that has one; a label outside the recipe's labels.
    let recipe = std::fs::read_to_string(d.join("cls.toml")).unwrap();
    std::fs::write(
        d.join("again.toml"),
        recipe
            .replace("out = \"cls\"", "out = \"again\"")
            .replace(&base.display().to_string(), &cls.display().to_string()),
    )
    .unwrap();
    let e = fails(slm().args(["train", "again.toml"]).current_dir(d));
    assert!(
        e.contains("already has a sequence-classification head"),
        "{e}"
    );
    std::fs::write(
        d.join("labels.toml"),
        recipe.replace("out = \"cls\"", "out = \"labels\"").replace(
            "kind = \"classify\"",
            "kind = \"classify\"\nlabels = [\"calm\", \"windy\"]",
        ),
    )
    .unwrap();
    let e = fails(slm().args(["train", "labels.toml"]).current_dir(d));
    assert!(
        e.contains("label 'storm' is not among objective.labels"),
        "{e}"
    );
    std::fs::write(
        d.join("bad_train.jsonl"),
        "{\"tokens\": [\"the\", \"whale\"], \"tags\": [\"I-animal\", \"O\"]}\n",
    )
    .unwrap();
    let tag_recipe = std::fs::read_to_string(d.join("tag.toml")).unwrap();
    std::fs::write(
        d.join("bad_tag.toml"),
        tag_recipe
            .replace("out = \"tag\"", "out = \"bad_tag\"")
            .replace("tag.jsonl", "bad_train.jsonl"),
    )
    .unwrap();
    let e = fails(slm().args(["train", "bad_tag.toml"]).current_dir(d));
    assert!(
        e.contains("bad_train.jsonl:1") && e.contains("not valid BIO"),
        "{e}"
    );
}

#[test]
#[cfg_attr(
    not(python_transformers),
    ignore = "needs a Python with torch and transformers in $SLM_PYTHON (.ci/run makes one)"
)]
fn transformers_loads_the_heads_with_the_same_logits() {
    let f = fixture();
    let (cls, tag, tag_echo) = (f.cls.as_path(), f.tag.as_path(), f.pair_echo.as_path());
    let py = common::python_with("torch, transformers");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/hf_heads.py");
    for (model, per_token, class) in [
        (cls, false, "LlamaForSequenceClassification"),
        (tag, true, "LlamaForTokenClassification"),
        // config.json's slm_echo is a key transformers keeps and ignores: the same network.
        (tag_echo, true, "LlamaForTokenClassification"),
    ] {
        let tok = slm_tokenizer::Tokenizer::from_folder(model).unwrap();
        // Rows of different lengths: the sequence head's batch is right-padded.
        let rows: Vec<Vec<u32>> = [
            "the white whale sailed under the storm",
            "deep sea",
            "captain",
        ]
        .iter()
        .map(|t| tok.encode(t, true).unwrap())
        .collect();
        let arg = serde_json::to_string(&rows).unwrap();
        let out = common::run_python(
            &py,
            script.to_str().unwrap(),
            &[model.to_str().unwrap(), &arg],
        );
        let hf: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(hf["class"], class);
        let theirs: Vec<f32> = hf["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                let r = r.as_array().unwrap();
                if per_token {
                    r.iter()
                        .flat_map(|x| x.as_array().unwrap().clone())
                        .collect::<Vec<_>>()
                } else {
                    r.clone()
                }
            })
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let ours = slm_logits(model, &rows, per_token);
        assert_eq!(ours.len(), theirs.len(), "{class}");
        let worst = ours
            .iter()
            .zip(&theirs)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let spread = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("{class}: max |logit difference| {worst:e} (logits up to {spread})");
        assert!(
            spread > 0.5,
            "{class}: logits too flat ({spread}) to compare"
        );
        // f32 on both sides; only summation order differs (as hf_transformers.rs bounds it).
        assert!(worst < 1e-4, "{class}: logits differ by {worst}");
    }
}

/// "white" begins an animal or a vessel as the next word says: a causal tagger cannot see
/// that from "white" itself, an echoed one can read it in the second copy. The echo is kept
/// in the model folder, so `slm eval` and `slm predict` feed the input as training did.
///
/// Reading the next word of the first copy is a lookup (find this word before, take what
/// followed) that a 2-layer model trained for seconds learns only in part: the test asks for
/// a clear gain over the causal tagger (measured: entity F1 0.54 to 0.81), not for perfection.
#[test]
fn an_echoed_tagger_sees_the_words_after_each_word() {
    let f = fixture();
    let d = f.dir.path();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.pair_echo.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["slm_echo"], true);
    let gold = std::fs::read_to_string(d.join("pair_test.jsonl")).unwrap();
    // Entity F1 by `slm eval`, and the share of "white"s `slm predict` tags right.
    let scores = |model: &Path, name: &str| {
        let out = format!("{name}.json");
        ok(slm()
            .arg("eval")
            .arg(model)
            .args(["--task", "tag:pair_test.jsonl", "--out", &out])
            .current_dir(d));
        let pred = format!("{name}_pred.jsonl");
        ok(slm()
            .arg("predict")
            .arg(model)
            .args(["--input", "pair_test.jsonl", "-o", &pred])
            .current_dir(d));
        let preds = std::fs::read_to_string(d.join(&pred)).unwrap();
        let (mut right, mut whites) = (0, 0);
        for (p, g) in preds.lines().zip(gold.lines()) {
            let (p, g): (serde_json::Value, serde_json::Value) = (
                serde_json::from_str(p).unwrap(),
                serde_json::from_str(g).unwrap(),
            );
            for (i, w) in g["tokens"].as_array().unwrap().iter().enumerate() {
                if w == "white" {
                    whites += 1;
                    right += usize::from(p["tags"][i] == g["tags"][i]);
                }
            }
        }
        assert!(whites >= 200, "{whites} whites");
        (metric(&d.join(out), 0, "f1"), right as f64 / whites as f64)
    };
    let (causal_f1, causal_white) = scores(&f.pair, "pair_causal");
    let (echoed_f1, echoed_white) = scores(&f.pair_echo, "pair_echoed");
    eprintln!(
        "entity F1: causal {causal_f1:.3}, echoed {echoed_f1:.3}; whites right: causal {causal_white:.3}, echoed {echoed_white:.3}"
    );
    assert!(
        echoed_f1 >= causal_f1 + 0.15,
        "entity F1: echoed {echoed_f1}, causal {causal_f1}"
    );
    assert!(
        echoed_white >= causal_white + 0.15,
        "whites right: echoed {echoed_white}, causal {causal_white}"
    );

    // Echo is a tagger's setting.
    let recipe = std::fs::read_to_string(d.join("cls.toml")).unwrap();
    std::fs::write(
        d.join("cls_echo.toml"),
        recipe
            .replace("out = \"cls\"", "out = \"cls_echo\"")
            .replace("kind = \"classify\"", "kind = \"classify\"\necho = true"),
    )
    .unwrap();
    let e = fails(slm().args(["train", "cls_echo.toml"]).current_dir(d));
    assert!(e.contains("objective.echo") && e.contains("tag"), "{e}");
}
