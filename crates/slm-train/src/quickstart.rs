//! The parts of `slm quickstart`, the bundled end-to-end demo: its corpus (the fetched
//! public-domain corpora, else chapters embedded in this library, so an installed binary
//! needs no files beside it), its recipe, and the held-out tokens it is scored on.

use std::path::PathBuf;

use slm_data::{Dataset, Document};

use crate::run::Result;

mod bundled {
    include!(concat!(env!("OUT_DIR"), "/bundled_corpus.rs"));
}

/// The tokenizer's vocabulary and the rarest pair it merges.
pub const VOCAB: usize = 4096;
pub const MIN_FREQUENCY: u64 = 2;
/// What ends a document in the shards.
pub const EOS: &str = "<|endoftext|>";
/// Openings the trained model continues.
pub const PROMPTS: [&str; 3] = ["Call me", "The whale", "It is the duty of"];

/// The documents to train on and where they came from: `paths` when given, else the fetched
/// corpora (State of the Union addresses and Moby-Dick) when present, else the first
/// chapters of Moby-Dick bundled in this library.
pub fn documents(paths: &[PathBuf]) -> Result<(Vec<Document>, String)> {
    if !paths.is_empty() {
        return Ok((slm_data::read_corpus(paths)?, "the given corpus".into()));
    }
    let assets = slm_model::assets::dir().join("corpora");
    let fetched = [assets.join("sotu"), assets.join("moby-dick.txt")];
    if fetched.iter().all(|p| p.exists()) {
        return Ok((
            slm_data::read_corpus(&fetched)?,
            format!("the fetched corpora in {}", assets.display()),
        ));
    }
    let docs = bundled::CHAPTERS
        .iter()
        .map(|(name, text)| Document {
            source: format!("bundled:{name}"),
            text: text.to_string(),
        })
        .collect();
    Ok((
        docs,
        format!(
            "the {} bundled chapters of Moby-Dick (`bash ../shared/fetch-assets.sh corpora` gives a larger corpus)",
            bundled::CHAPTERS.len()
        ),
    ))
}

/// The recipe: a ~5M-parameter Llama trained for `minutes`, paths relative to the recipe.
pub fn recipe(seed: u64, minutes: f64) -> String {
    format!(
        r#"# slm quickstart: a ~5M-parameter Llama trained for a fixed time.
[run]
out = "run"
seed = {seed}
[data]
shards = "shards"
tokenizer = "tokenizer.json"
[model]
d_model = 256
layers = 5
heads = 4
ffn = 688
context = 128
[budget]
minutes = {minutes}
[optim]
batch = 16
lr = 2e-3
warmup = 20
[eval]
interval = 50
batches = 8
[checkpoint]
interval = 100
keep = 1
"#
    )
}

/// Held-out tokens to score: 32 pieces of 1024 tokens spread evenly over the whole
/// validation set, so every kind of held-out text counts, not just the first document's.
pub fn held_out(data: &Dataset) -> Vec<u32> {
    let all: Vec<u32> = data
        .valid
        .iter()
        .flat_map(|s| s.slice(0, s.len()))
        .collect();
    let (pieces, piece) = (32, 1024);
    if all.len() <= pieces * piece {
        return all;
    }
    let stride = all.len() / pieces;
    (0..pieces)
        .flat_map(|i| all[i * stride..i * stride + piece].iter().copied())
        .collect()
}

/// Every training token, for the unigram baseline, read one at a time from the maps.
pub fn train_tokens(data: &Dataset) -> impl Iterator<Item = u32> + '_ {
    data.train
        .iter()
        .flat_map(|s| (0..s.len()).filter_map(move |i| s.get(i)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_chapters_are_embedded() {
        assert_eq!(bundled::CHAPTERS.len(), 39);
        assert_eq!(bundled::CHAPTERS[0].0, "moby-dick-001.txt");
        assert!(bundled::CHAPTERS.iter().all(|(_, t)| t.len() > 1000));
    }
}
