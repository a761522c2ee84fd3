//! `slm eval` and `slm report` end to end on a tiny trained model: multiple choice, zero-shot
//! classification and perplexity into one results file with lineage, then an HTML report;
//! bad task files fail with the file and line.

mod common;

use common::{corpus_tokenizer_shards, fails, ok, slm, train_tiny};

#[test]
fn eval_writes_results_and_report_compares_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    corpus_tokenizer_shards(d);
    let model = train_tiny(d, "m", 2, true);

    // The model has only seen ten sea words: it must prefer one of them to letters it has
    // never seen after a sentence of them.
    let mut choice = String::new();
    for (i, ctx) in [
        "the whale",
        "the captain sailed",
        "white sea under",
        "deep storm the",
    ]
    .iter()
    .enumerate()
    {
        let (good, bad) = (" ship", " qzjx");
        let (choices, answer) = if i % 2 == 0 {
            (vec![good, bad], 0)
        } else {
            (vec![bad, good], 1)
        };
        choice.push_str(
            &serde_json::json!({"context": ctx, "choices": choices, "answer": answer}).to_string(),
        );
        choice.push('\n');
    }
    std::fs::write(d.join("sea.jsonl"), choice).unwrap();
    std::fs::write(
        d.join("mood.jsonl"),
        // Labels as the choices: one of the model's ten words and letters it has never
        // seen. It picks "sea" every time, so two of three are right.
        "{\"text\": \"the storm\", \"label\": \"sea\"}\n{\"text\": \"the white ship\", \"label\": \"qzjx\"}\n{\"text\": \"deep sea\", \"label\": \"sea\"}\n",
    )
    .unwrap();
    let out = ok(slm()
        .arg("eval")
        .arg(&model)
        .args([
            "--task",
            "choice:sea.jsonl",
            "--task",
            "classify:mood.jsonl",
            "--task",
            "perplexity:corpus/00.txt",
            "--ctx",
            "16",
            "--limit",
            "3",
            "--out",
            "r.json",
        ])
        .current_dir(d));
    assert!(out.contains("sea"), "{out}");

    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("r.json")).unwrap()).unwrap();
    assert_eq!(r["slm_version"], env!("CARGO_PKG_VERSION"));
    assert!(r["created"].as_str().unwrap().starts_with("20"));
    assert_eq!(r["model"]["format"], "hf");
    // Lineage from the trained folder's slm.json.
    assert_eq!(r["model"]["lineage"]["tokens_seen"], 20480);
    let tasks = r["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3);
    let sea = &tasks[0];
    assert_eq!(
        (sea["name"].as_str(), sea["n"].as_u64()),
        (Some("sea"), Some(3))
    );
    assert_eq!(sea["metrics"]["acc"]["value"], 1.0, "{sea}");
    assert_eq!(sea["metrics"]["acc"]["stderr"], 0.0);
    assert_eq!(sea["arithmetic"], "ggml");
    assert_eq!(sea["file_sha256"].as_str().unwrap().len(), 64);
    let mood = &tasks[1];
    assert_eq!(mood["kind"], "classify");
    assert_eq!(mood["labels"], serde_json::json!(["qzjx", "sea"]));
    let acc = mood["metrics"]["acc"]["value"].as_f64().unwrap();
    assert!((acc - 2.0 / 3.0).abs() < 1e-12, "{mood}");
    // Predictions [sea, sea, sea] against [sea, qzjx, sea]: F1 of "sea" 2*2/(2*2+1) = 0.8,
    // of "qzjx" 0 (no true positive), macro 0.4.
    let f1 = mood["metrics"]["macro_f1"]["value"].as_f64().unwrap();
    assert!((f1 - 0.4).abs() < 1e-12, "{mood}");
    let ppl = &tasks[2];
    assert_eq!(ppl["n"], 3);
    let p = ppl["metrics"]["ppl"]["value"].as_f64().unwrap();
    // Ten words in a 300-token vocabulary: far below uniform.
    assert!(p > 1.0 && p < 30.0, "{ppl}");

    // A second results file for the report.
    ok(slm()
        .arg("eval")
        .arg(&model)
        .args(["--task", "choice:sea.jsonl", "--out", "g.json"])
        .current_dir(d));
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("g.json")).unwrap()).unwrap();
    assert_eq!(g["tasks"][0]["arithmetic"], "ggml");
    assert_eq!(g["tasks"][0]["n"], 4);
    assert_eq!(g["tasks"][0]["metrics"]["acc"]["value"], 1.0);

    let html_path = d.join("report.html");
    ok(slm()
        .args(["report", "r.json", "g.json", "-o"])
        .arg(&html_path)
        .current_dir(d));
    let html = std::fs::read_to_string(&html_path).unwrap();
    for want in ["<svg", ">r<", ">g<", "sea", "mood", "macro_f1", "&plusmn;"] {
        assert!(html.contains(want), "report lacks {want:?}");
    }
}

#[test]
fn bad_task_files_and_specs_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    corpus_tokenizer_shards(d);
    let model = train_tiny(d, "m", 4, false);
    std::fs::write(
        d.join("bad.jsonl"),
        "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"answer\": 0}\n{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"answer\": 7}\n",
    )
    .unwrap();
    for (args, want) in [
        (
            vec!["--task", "choice:bad.jsonl"],
            "bad.jsonl:2: \"answer\" is 7",
        ),
        (
            vec!["--task", "choice:nope.jsonl"],
            "nope.jsonl: no such file",
        ),
        (vec!["--task", "bad.jsonl"], "expected KIND:FILE"),
        (
            vec!["--suite", "core", "--evals", "."],
            "hellaswag.jsonl is missing",
        ),
    ] {
        let err = fails(slm().arg("eval").arg(&model).args(&args).current_dir(d));
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let err = fails(
        slm()
            .arg("eval")
            .arg(&model)
            .args(["--suite", "core"])
            .env_remove("SLM_EVALS")
            .current_dir(d),
    );
    assert!(
        err.contains("--suite needs the folder of its files"),
        "{err}"
    );
    let err = fails(
        slm()
            .args(["report", "bad.jsonl", "-o", "x.html"])
            .current_dir(d),
    );
    assert!(err.contains("not a results file"), "{err}");
}
