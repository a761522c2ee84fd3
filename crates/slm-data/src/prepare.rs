//! Corpus to shards: tokenize each document, end it with EOS, split train/valid by document,
//! write `train-NNNNN.bin`, `valid-NNNNN.bin` and, last, `manifest.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::corpus::Document;
use crate::shard::{write_atomic, write_shard, Shard, ShardInfo};
use crate::{DataError, Result};

pub struct PrepareOptions {
    /// Share of documents held out for validation.
    pub valid_fraction: f64,
    pub seed: u64,
    /// Tokens per shard file at most.
    pub shard_tokens: usize,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            valid_fraction: 0.05,
            seed: 0,
            shard_tokens: 1 << 26,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Split {
    pub files: Vec<String>,
    pub tokens: u64,
    pub documents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub version: u32,
    pub tokenizer_sha256: String,
    pub vocab_size: u32,
    pub eos_id: u32,
    /// sha256 over the documents' text, in order: the data fingerprint recorded in slm.json.
    pub corpus_sha256: String,
    pub train: Split,
    pub valid: Split,
}

/// splitmix64: a fixed, seedable hash so the split is the same on every machine.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Its head for training and its tail for validation, cut at a paragraph break before the
/// `valid_fraction` mark (else at the mark).
fn split_tail(doc: &Document, valid_fraction: f64) -> (Document, Document) {
    let text = &doc.text;
    // The mark, moved back to the start of the character it falls in.
    let mut target = (((text.len() as f64) * (1.0 - valid_fraction)) as usize).min(text.len());
    while !text.is_char_boundary(target) {
        target -= 1;
    }
    let cut = text[..target]
        .rfind("\n\n")
        .map(|i| i + 2)
        .filter(|&i| i > 0 && i < text.len())
        .unwrap_or_else(|| {
            (target..text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(text.len())
        });
    let (a, b) = text.split_at(cut);
    let part = |t: &str, what: &str| Document {
        source: format!("{} ({what})", doc.source),
        text: t.to_string(),
    };
    (part(a, "head"), part(b, "tail"))
}

/// Which documents are held out: a seeded hash picks whole documents, except that a document
/// that alone is more than the validation share of the corpus (a lone document, or one book
/// among short speeches) gives its tail to validation and its head to training, so that one
/// long text can neither be missing from training nor make up most of the validation set.
fn split_documents(docs: &[Document], opts: &PrepareOptions) -> (Vec<Document>, Vec<Document>) {
    let total: usize = docs.iter().map(|d| d.text.len()).sum();
    let threshold = (opts.valid_fraction.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
    let (mut train, mut valid): (Vec<Document>, Vec<Document>) = (Vec::new(), Vec::new());
    for (i, d) in docs.iter().enumerate() {
        if opts.valid_fraction > 0.0 && d.text.len() as f64 > opts.valid_fraction * total as f64 {
            let (head, tail) = split_tail(d, opts.valid_fraction);
            train.push(head);
            if !tail.text.is_empty() {
                valid.push(tail);
            }
        } else if mix(opts.seed ^ mix(i as u64)) < threshold {
            valid.push(d.clone());
        } else {
            train.push(d.clone());
        }
    }
    // Both sides non-empty whenever a split was asked for.
    if opts.valid_fraction > 0.0 && valid.is_empty() && train.len() > 1 {
        valid.push(train.pop().expect("at least two documents"));
    }
    if train.is_empty() {
        train.push(valid.pop().expect("at least one document"));
    }
    (train, valid)
}

fn write_split(
    dir: &Path,
    name: &str,
    docs: &[Document],
    encode: &dyn Fn(&str) -> std::result::Result<Vec<u32>, String>,
    info: &ShardInfo,
    opts: &PrepareOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Split> {
    let mut files = Vec::new();
    let mut buf: Vec<u32> = Vec::new();
    let mut tokens = 0u64;
    let flush = |buf: &mut Vec<u32>, files: &mut Vec<String>| -> Result<()> {
        let file = format!("{name}-{:05}.bin", files.len());
        write_shard(&dir.join(&file), info, buf)?;
        files.push(file);
        buf.clear();
        Ok(())
    };
    for d in docs {
        let ids = encode(&d.text).map_err(|what| DataError::Tokenize {
            source_name: d.source.clone(),
            what,
        })?;
        tokens += ids.len() as u64 + 1;
        buf.extend(ids);
        buf.push(info.eos);
        progress(d.text.len());
        if buf.len() >= opts.shard_tokens {
            flush(&mut buf, &mut files)?;
        }
    }
    if !buf.is_empty() || files.is_empty() {
        flush(&mut buf, &mut files)?;
    }
    Ok(Split {
        files,
        tokens,
        documents: docs.len() as u64,
    })
}

/// Tokenizes `docs` with `encode` into shards under `out`. `progress` gets the bytes of text
/// done after each document.
pub fn prepare(
    docs: &[Document],
    encode: &dyn Fn(&str) -> std::result::Result<Vec<u32>, String>,
    info: &ShardInfo,
    out: &Path,
    opts: &PrepareOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Manifest> {
    if info.eos >= info.vocab {
        return Err(DataError::Empty(format!(
            "EOS id {} is outside the vocabulary of {}",
            info.eos, info.vocab
        )));
    }
    if !(0.0..1.0).contains(&opts.valid_fraction) {
        return Err(DataError::Empty(format!(
            "valid fraction {}: expected a number in [0, 1)",
            opts.valid_fraction
        )));
    }
    // The shards and their manifest change as one: they are written into a new folder beside
    // `out`, which then replaces it. A kill at any point leaves the old set or the new one,
    // never old manifest beside new shards.
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| DataError::Io { path, err }
    };
    let existing = std::fs::read_dir(out).ok().map(|d| d.count());
    if existing.is_some_and(|n| n > 0) && !out.join("manifest.json").is_file() {
        return Err(DataError::Empty(format!(
            "{} exists and holds files that are not token shards; choose an empty or new folder",
            out.display()
        )));
    }
    if out.exists() && existing.is_none() {
        return Err(DataError::Empty(format!(
            "{} exists and is not a folder",
            out.display()
        )));
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "shards".into());
    let sibling = |tag: &str| out.with_file_name(format!(".{name}.{tag}-{}", std::process::id()));
    let (tmp, old) = (sibling("new"), sibling("old"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let manifest = write_set(docs, encode, info, &tmp, opts, progress);
    let manifest = match manifest {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if out.exists() {
        swap_in(&tmp, out, &old).map_err(io(out))?;
    } else {
        std::fs::rename(&tmp, out).map_err(io(out))?;
    }
    let _ = std::fs::remove_dir_all(&old);
    if let Some(dir) = out.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = dir.sync_all();
    }
    Ok(manifest)
}

/// Puts folder `new` in the place of folder `out`, moving the old one to `old`. On Linux the
/// two trade places in one step (renameat2's RENAME_EXCHANGE), so `out` is never missing;
/// elsewhere two renames leave a moment without it (but never a mix).
fn swap_in(new: &Path, out: &Path, old: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
        let (a, b) = (c(new)?, c(out)?);
        // SAFETY: two valid NUL-terminated paths relative to the working directory.
        let r = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if r == 0 {
            // `new` now names the old set.
            return std::fs::rename(new, old);
        }
        let e = std::io::Error::last_os_error();
        // Filesystems without the exchange fall through to two renames.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    std::fs::rename(out, old)?;
    std::fs::rename(new, out)
}

/// Writes the shards and, last, the manifest into the empty folder `out`.
fn write_set(
    docs: &[Document],
    encode: &dyn Fn(&str) -> std::result::Result<Vec<u32>, String>,
    info: &ShardInfo,
    out: &Path,
    opts: &PrepareOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Manifest> {
    let mut h = sha2::Sha256::new();
    for d in docs {
        h.update((d.text.len() as u64).to_le_bytes());
        h.update(d.text.as_bytes());
    }
    let (train, valid) = split_documents(docs, opts);
    let train = write_split(out, "train", &train, encode, info, opts, progress)?;
    let valid = write_split(out, "valid", &valid, encode, info, opts, progress)?;
    let manifest = Manifest {
        version: 1,
        tokenizer_sha256: hex::encode(info.tokenizer_sha256),
        vocab_size: info.vocab,
        eos_id: info.eos,
        corpus_sha256: hex::encode(h.finalize()),
        train,
        valid,
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    write_atomic(&out.join("manifest.json"), |f| {
        use std::io::Write;
        f.write_all(&json)
    })?;
    Ok(manifest)
}

/// Prepared shards, opened and checked against the tokenizer that will read them.
pub struct Dataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub train: Vec<Shard>,
    pub valid: Vec<Shard>,
}

impl Dataset {
    /// Opens `dir`; `tokenizer_sha256` must be the hash of the tokenizer the shards were made
    /// with (a different tokenizer would silently train on the wrong ids).
    pub fn open(dir: &Path, tokenizer_sha256: &[u8; 32]) -> Result<Self> {
        let mpath = dir.join("manifest.json");
        let text = std::fs::read_to_string(&mpath).map_err(|err| DataError::Io {
            path: mpath.clone(),
            err,
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| DataError::Format {
            file: mpath.clone(),
            line: e.line(),
            what: e.to_string(),
        })?;
        if manifest.tokenizer_sha256 != hex::encode(tokenizer_sha256) {
            return Err(DataError::TokenizerMismatch {
                dir: dir.to_path_buf(),
                shards: manifest.tokenizer_sha256.clone(),
                tokenizer: hex::encode(tokenizer_sha256),
            });
        }
        let open = |files: &[String]| -> Result<Vec<Shard>> {
            files
                .iter()
                .map(|f| {
                    if f.contains('/') || f.contains("..") {
                        return Err(DataError::Format {
                            file: mpath.clone(),
                            line: 0,
                            what: format!("shard name {f:?} leaves the folder"),
                        });
                    }
                    let s = Shard::open(&dir.join(f))?;
                    if s.info.tokenizer_sha256 != *tokenizer_sha256 {
                        return Err(DataError::TokenizerMismatch {
                            dir: dir.join(f),
                            shards: hex::encode(s.info.tokenizer_sha256),
                            tokenizer: hex::encode(tokenizer_sha256),
                        });
                    }
                    Ok(s)
                })
                .collect()
        };
        let train = open(&manifest.train.files)?;
        let valid = open(&manifest.valid.files)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            train,
            valid,
        })
    }
}
