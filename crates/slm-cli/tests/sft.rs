//! Chat fine-tuning end to end through the `slm` binary: a tiny base model trained on the
//! sea corpus, fine-tuned (`objective.kind = "sft"`, packed) on conversations whose replies
//! follow a rule; the fine-tuned model then answers held-out prompts, rendered with its chat
//! template, with the rule's reply and ends its turn. Bad chat data is refused by name.

use std::path::Path;

mod common;
use common::{corpus_tokenizer_shards, fails, ok, slm, train_tiny_context};

const WORDS: [&str; 10] = [
    "the", "whale", "ship", "sea", "captain", "white", "deep", "sailed", "under", "storm",
];

/// Deterministic questions of 2 to 6 corpus words.
fn questions(n: usize, seed: u64) -> Vec<String> {
    let mut x = seed;
    let mut next = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        x >> 58
    };
    (0..n)
        .map(|_| {
            let len = 2 + next() as usize % 5;
            let words: Vec<&str> = (0..len)
                .map(|_| WORDS[next() as usize % WORDS.len()])
                .collect();
            words.join(" ")
        })
        .collect()
}

/// The rule the assistant follows.
fn reply(question: &str) -> &'static str {
    if question.contains("storm") {
        "storm under the ship"
    } else {
        "the deep sea"
    }
}

/// A tiny base model with room for a conversation (64 positions).
fn base(dir: &Path) -> std::path::PathBuf {
    train_tiny_context(dir, "base", 2, true, 64)
}

fn sft_recipe(dir: &Path, name: &str, train: &str, parent: &Path) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"[run]
out = "{name}"
seed = 3
[data]
train = "{train}"
valid_fraction = 0.1
[model]
parent = "{}"
[objective]
kind = "sft"
[budget]
epochs = 30
[optim]
batch = 4
lr = 3e-3
warmup = 5
weight_decay = 0.0
[eval]
interval = 25
"#,
            parent.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_tiny_model_fine_tuned_on_chats_answers_in_their_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    corpus_tokenizer_shards(d);
    let base = base(d);
    // Single- and two-round conversations, some with a system turn.
    let rows: String = questions(160, 1)
        .chunks(2)
        .enumerate()
        .map(|(i, q)| {
            let mut m = Vec::new();
            if i % 3 == 0 {
                m.push(serde_json::json!({"role": "system", "content": "answer"}));
            }
            for q in q.iter().take(1 + i % 2) {
                m.push(serde_json::json!({"role": "user", "content": q}));
                m.push(serde_json::json!({"role": "assistant", "content": reply(q)}));
            }
            format!("{}\n", serde_json::json!({ "messages": m }))
        })
        .collect();
    std::fs::write(d.join("chats.jsonl"), rows).unwrap();
    let recipe = sft_recipe(d, "chat", "chats.jsonl", &base);
    ok(slm().arg("train").arg(&recipe).current_dir(d));
    let model = d.join("chat").join("model");
    let metrics = std::fs::read_to_string(d.join("chat/metrics.jsonl")).unwrap();
    let valid: Vec<f64> = metrics
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["valid_loss"].as_f64()
        })
        .collect();
    assert!(
        valid.len() >= 2 && valid.last() < valid.first(),
        "validation loss {valid:?}"
    );

    let mut right = 0;
    let held_out = questions(20, 99);
    for q in &held_out {
        let prompt = format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
        let out = ok(slm()
            .arg("generate")
            .arg(&model)
            .args(["-p", &prompt, "-n", "16", "--temp", "0"]));
        // The prompt, then the reply alone: generation stops at the end of the turn
        // (generation_config.json names <|im_end|>), not after 16 tokens.
        let answer = out.strip_prefix(&prompt).unwrap_or(&out);
        if answer.trim_end() == reply(q) {
            right += 1;
        } else {
            eprintln!("{q:?}: {out:?}");
        }
    }
    assert!(
        right >= 18,
        "{right} of {} held-out prompts answered by the rule",
        held_out.len()
    );
}

#[test]
fn bad_chat_data_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    corpus_tokenizer_shards(d);
    let base = base(d);
    let good = serde_json::json!({"messages": [
        {"role": "user", "content": "the sea"},
        {"role": "assistant", "content": "deep"}]});
    let no_reply = serde_json::json!({"messages": [{"role": "user", "content": "the sea"}]});
    std::fs::write(d.join("bad.jsonl"), format!("{good}\n{good}\n{no_reply}\n")).unwrap();
    let e = fails(
        slm()
            .arg("train")
            .arg(sft_recipe(d, "bad", "bad.jsonl", &base))
            .current_dir(d),
    );
    assert!(
        e.contains("bad.jsonl:3") && e.contains("no assistant turn"),
        "{e}"
    );

    // A parent without a chat template.
    let plain = d.join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(base.join(f), plain.join(f)).unwrap();
    }
    std::fs::write(d.join("good.jsonl"), format!("{good}\n{good}\n")).unwrap();
    let e = fails(
        slm()
            .arg("train")
            .arg(sft_recipe(d, "plain", "good.jsonl", &plain))
            .current_dir(d),
    );
    assert!(e.contains("chat template"), "{e}");

    // Too little to hold any out, and a context too short to reach any reply.
    std::fs::write(d.join("one.jsonl"), format!("{good}\n")).unwrap();
    let e = fails(
        slm()
            .arg("train")
            .arg(sft_recipe(d, "one", "one.jsonl", &base))
            .current_dir(d),
    );
    assert!(e.contains("one.jsonl") && e.contains("at least 2"), "{e}");
    let short = sft_recipe(d, "short", "good.jsonl", &base);
    let text = std::fs::read_to_string(&short).unwrap();
    std::fs::write(
        &short,
        text.replace("[objective]", "context = 4\n[objective]"),
    )
    .unwrap();
    let e = fails(slm().arg("train").arg(&short).current_dir(d));
    assert!(e.contains("assistant tokens within 4 positions"), "{e}");
}
