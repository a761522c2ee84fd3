//! Entity scores against seqeval (the independent reference the field reports WNUT and CoNLL
//! F1 with) on 300 seeded random cases, valid BIO and not: the same entities, and precision,
//! recall and F1 per type and micro-averaged equal to seqeval's to 1e-12 (the same ratios of
//! the same counts; the bound is f64 rounding of F1's formula).

use slm_eval::entities::{entities, score};

#[test]
#[cfg_attr(
    not(python_seqeval),
    ignore = "needs a Python with seqeval ($SLM_PYTHON; .ci/run installs requirements-dev.txt)"
)]
fn entity_scores_equal_seqeval() {
    let py = std::env::var("SLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/seqeval_reference.py"
    );
    let out = std::process::Command::new(&py)
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{py} {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cases.len(), 300);
    let tags =
        |v: &serde_json::Value| -> Vec<Vec<String>> { serde_json::from_value(v.clone()).unwrap() };
    for (i, c) in cases.iter().enumerate() {
        let (gold, pred) = (tags(&c["gold"]), tags(&c["pred"]));
        let want: Vec<(String, usize, usize)> =
            serde_json::from_value(c["gold_entities"].clone()).unwrap();
        let got: Vec<(String, usize, usize)> = entities(&gold)
            .into_iter()
            .map(|e| (e.kind, e.start, e.end))
            .collect();
        assert_eq!(got, want, "case {i}: entities of {gold:?}");
        let s = score(&gold, &pred);
        let report = c["report"].as_object().unwrap();
        for (name, r) in report {
            let prf = match name.as_str() {
                "micro avg" => s.micro,
                "macro avg" | "weighted avg" => continue,
                kind => *s
                    .per_type
                    .get(kind)
                    .unwrap_or_else(|| panic!("case {i}: no type {kind} in {:?}", s.per_type)),
            };
            for (ours, theirs, what) in [
                (prf.precision, &r["precision"], "precision"),
                (prf.recall, &r["recall"], "recall"),
                (prf.f1, &r["f1-score"], "f1"),
            ] {
                let theirs = theirs.as_f64().unwrap();
                assert!(
                    (ours - theirs).abs() <= 1e-12,
                    "case {i} {name} {what}: {ours} vs seqeval {theirs}"
                );
            }
            assert_eq!(
                prf.support as u64,
                r["support"].as_u64().unwrap(),
                "case {i} {name}"
            );
        }
        // seqeval reports the types of the gold entities only; slm also lists types that
        // occur only in predictions (with support 0).
        for (kind, prf) in &s.per_type {
            if !report.contains_key(kind) {
                assert_eq!(
                    prf.support, 0,
                    "case {i}: {kind} missing from seqeval's report"
                );
            }
        }
    }
}
