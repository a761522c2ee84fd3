//! From raw text to what a run trains on: a byte-level BPE tokenizer (tokenizer.json) and
//! token shards. `slm tokenizer train`, `slm data prepare` and the quickstart all run these.

use std::io::Write;
use std::path::Path;

use slm_data::{Document, Manifest, PrepareOptions, ShardInfo};

use crate::run::{Result, TrainError};

/// Trains a `vocab`-token byte-level BPE on `docs` and writes it to `out` (atomically);
/// returns the vocabulary's size.
pub fn train_tokenizer(
    docs: &[Document],
    vocab: usize,
    min_frequency: u64,
    out: &Path,
) -> Result<usize> {
    let tok = slm_tokenizer::train::train_bpe(
        docs.iter().map(|d| d.text.as_str()),
        &slm_tokenizer::train::TrainOptions {
            vocab_size: vocab,
            min_frequency,
        },
    )
    .map_err(|e| TrainError::Setup(e.to_string()))?;
    let json = tok
        .to_string(false)
        .map_err(|e| TrainError::Setup(format!("serializing the tokenizer: {e}")))?;
    slm_data::shard::write_atomic(out, |f| f.write_all(json.as_bytes()))?;
    Ok(tok.get_vocab_size(true))
}

/// Tokenizes `docs` with the tokenizer.json at `tokenizer` into shards in `out`, documents
/// ended by the token `eos`; `progress` hears the bytes done.
pub fn prepare_shards(
    docs: &[Document],
    tokenizer: &Path,
    out: &Path,
    opts: &PrepareOptions,
    eos: &str,
    progress: &mut dyn FnMut(usize),
) -> Result<Manifest> {
    let json = std::fs::read(tokenizer).map_err(|err| TrainError::Io {
        path: tokenizer.to_path_buf(),
        err,
    })?;
    let tok = tokenizers::Tokenizer::from_bytes(&json)
        .map_err(|e| TrainError::Setup(format!("{}: {e}", tokenizer.display())))?;
    let Some(eos_id) = tok.token_to_id(eos) else {
        return Err(TrainError::Setup(format!(
            "{}: no token {eos:?} to end documents with (choose one with --eos)",
            tokenizer.display()
        )));
    };
    let info = ShardInfo {
        vocab: tok.get_vocab_size(true) as u32,
        eos: eos_id,
        tokenizer_sha256: slm_data::tokenizer_sha256(&json),
    };
    let encode = |text: &str| -> std::result::Result<Vec<u32>, String> {
        tok.encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    };
    Ok(slm_data::prepare(
        docs, &encode, &info, out, opts, progress,
    )?)
}
