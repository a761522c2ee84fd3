//! slm-data: corpora in, memory-mapped token shards out (see shard.rs for the format).

pub mod corpus;
pub mod prepare;
pub mod shard;
pub mod tasks;

use std::path::PathBuf;

pub use corpus::{read_corpus, Document};
pub use prepare::{prepare, Dataset, Manifest, PrepareOptions};
pub use shard::{Shard, ShardInfo};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: not text: {what}", file.display())]
    NotText { file: PathBuf, what: String },
    #[error("{}:{line}: {what}", file.display())]
    Format {
        file: PathBuf,
        line: usize,
        what: String,
    },
    #[error("{0}")]
    Empty(String),
    #[error("{source_name}: cannot tokenize: {what}")]
    Tokenize { source_name: String, what: String },
    #[error("{}: {what}", file.display())]
    Shard { file: PathBuf, what: String },
    #[error("{}: the shards were made with tokenizer {shards} but this tokenizer is {tokenizer}; run `slm data prepare` again with it", dir.display())]
    TokenizerMismatch {
        dir: PathBuf,
        shards: String,
        tokenizer: String,
    },
}

pub type Result<T> = std::result::Result<T, DataError>;

/// The fingerprint that ties shards to a tokenizer: sha256 of its tokenizer.json bytes.
pub fn tokenizer_sha256(tokenizer_json: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(tokenizer_json).into()
}
