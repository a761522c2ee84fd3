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

/// sha256 of a file, hex: the identity of a model's weights, a task file, a prompts file.
pub fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The fingerprint that ties shards to a tokenizer: sha256 of its tokenizer.json bytes.
pub fn tokenizer_sha256(tokenizer_json: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(tokenizer_json).into()
}
