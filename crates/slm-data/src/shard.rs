//! Token shards: a 64-byte header, then the tokens as little-endian u16 or u32, memory-mapped.
//!
//!   0  magic    b"SLMTOKS\0"
//!   8  version  u32 = 1
//!  12  width    u32: bytes per token, 2 or 4
//!  16  vocab    u32: tokens are < vocab
//!  20  eos      u32: the id that ends every document
//!  24  count    u64: number of tokens
//!  32  tokenizer sha256 (32 bytes): shards and tokenizer must match

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{DataError, Result};

pub const MAGIC: &[u8; 8] = b"SLMTOKS\0";
pub const VERSION: u32 = 1;
pub const HEADER: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    pub vocab: u32,
    pub eos: u32,
    pub tokenizer_sha256: [u8; 32],
}

impl ShardInfo {
    fn width(&self) -> usize {
        if self.vocab <= 1 << 16 {
            2
        } else {
            4
        }
    }
}

/// Writes `path` atomically: a temporary file beside it, fsync, rename, fsync of the folder.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let io = |err| DataError::Io {
        path: path.to_path_buf(),
        err,
    };
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out")
    ));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    write(&mut f).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

pub fn write_shard(path: &Path, info: &ShardInfo, tokens: &[u32]) -> Result<()> {
    let width = info.width();
    if let Some(&bad) = tokens.iter().find(|&&t| t >= info.vocab) {
        return Err(DataError::Shard {
            file: path.to_path_buf(),
            what: format!("token {bad} is outside the vocabulary of {}", info.vocab),
        });
    }
    write_atomic(path, |f| {
        let mut w = std::io::BufWriter::new(f);
        let mut h = [0u8; HEADER];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(width as u32).to_le_bytes());
        h[16..20].copy_from_slice(&info.vocab.to_le_bytes());
        h[20..24].copy_from_slice(&info.eos.to_le_bytes());
        h[24..32].copy_from_slice(&(tokens.len() as u64).to_le_bytes());
        h[32..64].copy_from_slice(&info.tokenizer_sha256);
        w.write_all(&h)?;
        for &t in tokens {
            if width == 2 {
                w.write_all(&(t as u16).to_le_bytes())?;
            } else {
                w.write_all(&t.to_le_bytes())?;
            }
        }
        w.flush()
    })
}

/// A memory-mapped shard whose header and length were checked on open.
pub struct Shard {
    pub path: PathBuf,
    pub info: ShardInfo,
    width: usize,
    len: usize,
    map: memmap2::Mmap,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |what: String| DataError::Shard {
            file: path.to_path_buf(),
            what,
        };
        let f = std::fs::File::open(path).map_err(|err| DataError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        // SAFETY: a read-only map; shards are written once (atomically) and never modified.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|err| DataError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad(
                "not a token shard (bad magic or shorter than its header)".into(),
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(map[i..i + 4].try_into().expect("4 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!("version {version}, this slm reads {VERSION}")));
        }
        let width = u32_at(12) as usize;
        if width != 2 && width != 4 {
            return Err(bad(format!("token width {width}, expected 2 or 4")));
        }
        let count = u64::from_le_bytes(map[24..32].try_into().expect("8 bytes"));
        let expected = (count as u128) * width as u128 + HEADER as u128;
        if expected != map.len() as u128 {
            return Err(bad(format!(
                "header says {count} tokens ({expected} bytes) but the file has {} bytes",
                map.len()
            )));
        }
        let info = ShardInfo {
            vocab: u32_at(16),
            eos: u32_at(20),
            tokenizer_sha256: map[32..64].try_into().expect("32 bytes"),
        };
        let shard = Self {
            path: path.to_path_buf(),
            width,
            len: count as usize,
            info,
            map,
        };
        if let Some(i) = (0..shard.len).find(|&i| shard.token(i) >= shard.info.vocab) {
            return Err(bad(format!(
                "token {} at position {i} is outside the vocabulary of {}",
                shard.token(i),
                shard.info.vocab
            )));
        }
        Ok(shard)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token `i`, or None past the shard's end.
    #[inline]
    pub fn get(&self, i: usize) -> Option<u32> {
        (i < self.len).then(|| self.token(i))
    }

    /// Token `i < len` (checked by the callers in this file).
    #[inline]
    fn token(&self, i: usize) -> u32 {
        let at = HEADER + i * self.width;
        if self.width == 2 {
            u16::from_le_bytes([self.map[at], self.map[at + 1]]) as u32
        } else {
            u32::from_le_bytes(self.map[at..at + 4].try_into().expect("4 bytes"))
        }
    }

    /// Tokens `start..start+n` (clamped to the shard).
    pub fn slice(&self, start: usize, n: usize) -> Vec<u32> {
        (start..start.saturating_add(n).min(self.len))
            .map(|i| self.token(i))
            .collect()
    }
}
