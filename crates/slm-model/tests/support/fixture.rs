//! A model's next-token logits and greedy continuations against a llama.cpp fixture of
//! ../shared/fixtures/reference: the top 10 (id, logit) as the fixture prints them (six
//! decimals, finer than one f32 ulp at these magnitudes: the same float) and every greedy
//! token. Shared by the tests of every file the fixtures were made from.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde_json::Value;

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A logit as the fixture prints it.
fn printed(x: f64) -> String {
    format!("{x:.6}")
}

pub fn matches_fixture(model_path: &Path, fixture: &str) {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("fixtures/reference").join(fixture)).unwrap(),
    )
    .unwrap();
    let loaded = slm_model::load(model_path, &Device::Cpu).unwrap();
    let model = &loaded.model;
    for p in reference["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["token_ids"]);
        let mut cache = model.new_cache();
        let logits = model.next_logits(&prompt, &mut cache).unwrap();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let ours: Vec<(usize, String)> = order[..10]
            .iter()
            .map(|&i| (i, printed(logits[i] as f64)))
            .collect();
        let theirs: Vec<(usize, String)> = p["top10"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["id"].as_u64().unwrap() as usize,
                    printed(t["logit"].as_f64().unwrap()),
                )
            })
            .collect();
        assert_eq!(ours, theirs, "{fixture} {name}: top-10 (id, logit) differ");

        let want = ids(&p["greedy_ids"]);
        let mut got = Vec::new();
        let mut next = order[0] as u32;
        for _ in 0..want.len() {
            got.push(next);
            let l = model.next_logits(&[next], &mut cache).unwrap();
            next = l
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
        }
        assert_eq!(
            got, want,
            "{fixture} {name}: greedy continuation differs from llama.cpp"
        );
    }
}
