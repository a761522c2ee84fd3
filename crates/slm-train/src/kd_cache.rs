//! A cache of a teacher's targets (`slm distill cache`): for every training window of a set
//! of shards, each position's top k tokens at a temperature, their log-probabilities and
//! the log of the remaining mass, computed once and memory-mapped by any number of student
//! runs (`[teacher] cache = ...`).
//!
//! Windows are the same for every distillation run, online or cached: each training shard
//! is cut into windows of `context` predicted positions at multiples of `context` (the
//! window's `context + 1` tokens overlap the next window's first), and a run draws whole
//! windows. So a cached run sees the data an online run with the same seed sees.
//!
//! The folder holds `cache.json` (what the targets are keyed to: the shards' corpus and
//! tokenizer hashes and lengths, the teacher's sha256, k, the temperature, the context) and
//! `targets.bin`: one record per position, window after window, of k token ids (u16 when
//! the vocabulary fits, else u32), k log-probabilities (f16) and the rest's log-mass (f32).
//! Online distillation with a top k rounds its log-probabilities to f16 the same way.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use slm_data::Dataset;

use crate::run::{io, Result, TrainError};
use crate::teacher::{TeacherModel, TopK};

const VERSION: u32 = 1;

/// Whole windows of `ctx` predicted positions in each training shard: (shard, first token).
pub fn windows(data: &Dataset, ctx: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (i, s) in data.train.iter().enumerate() {
        let n = s.len().saturating_sub(1) / ctx;
        out.extend((0..n).map(|w| (i, w * ctx)));
    }
    out
}

/// What a cache holds and what it was made from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheMeta {
    pub version: u32,
    pub teacher: PathBuf,
    pub teacher_sha256: String,
    pub corpus_sha256: String,
    pub tokenizer_sha256: String,
    /// Tokens of each training shard, in order.
    pub shard_tokens: Vec<u64>,
    pub context: usize,
    pub top_k: usize,
    pub temperature: f64,
    pub vocab: usize,
    pub windows: u64,
}

impl CacheMeta {
    fn id_bytes(&self) -> usize {
        if self.vocab <= 1 << 16 {
            2
        } else {
            4
        }
    }

    /// Bytes of one position's record.
    pub fn record_bytes(&self) -> usize {
        self.top_k * (self.id_bytes() + 2) + 4
    }

    fn window_bytes(&self) -> usize {
        self.record_bytes() * self.context
    }
}

fn setup(msg: String) -> TrainError {
    TrainError::Setup(msg)
}

/// Rounds a top k's log-probabilities as a cache stores them (f16), so that online and
/// cached distillation compute with the same numbers.
pub fn round_log_probs(logp: &mut [f32]) {
    for x in logp {
        *x = half::f16::from_f32(*x).to_f32();
    }
}

fn shard_tokens(data: &Dataset) -> Vec<u64> {
    data.train.iter().map(|s| s.len() as u64).collect()
}

/// Appends the records of `top` (rows x k) to `out`.
fn encode(meta: &CacheMeta, top: &TopK, out: &mut Vec<u8>) {
    let k = meta.top_k;
    for (r, &rest) in top.rest.iter().enumerate() {
        for &id in &top.ids[r * k..(r + 1) * k] {
            match meta.id_bytes() {
                2 => out.extend((id as u16).to_le_bytes()),
                _ => out.extend(id.to_le_bytes()),
            }
        }
        for &l in &top.logp[r * k..(r + 1) * k] {
            out.extend(half::f16::from_f32(l).to_le_bytes());
        }
        out.extend(rest.to_le_bytes());
    }
}

/// The teacher and the shards of `slm distill cache` for windows of `context`: the shards
/// must have been made with `tokenizer` (default: the teacher's own tokenizer.json), whose
/// vocabulary the teacher's must be.
pub fn open_inputs(
    teacher: &Path,
    shards: &Path,
    tokenizer: Option<&Path>,
    context: usize,
) -> Result<(TeacherModel, Dataset)> {
    let (tok_json, tok_name) = match tokenizer {
        Some(t) => (std::fs::read(t).map_err(io(t))?, t.to_path_buf()),
        None => (
            crate::parent::Parent::open(teacher)?.tokenizer_json,
            teacher.to_path_buf(),
        ),
    };
    let data =
        Dataset::open(shards, &slm_data::tokenizer_sha256(&tok_json)).map_err(
            |e| match tokenizer {
                Some(_) => e.into(),
                None => setup(format!(
                    "{e} (the teacher's own tokenizer was compared; if the shards were made with \
                 the same vocabulary in another tokenizer.json, pass that file as --tokenizer)"
                )),
            },
        )?;
    let tok = tokenizers::Tokenizer::from_bytes(&tok_json)
        .map_err(|e| setup(format!("{}: {e}", tok_name.display())))?;
    let vocab = data.manifest.vocab_size as usize;
    let model = TeacherModel::open(teacher, &tok, &tok_name, vocab, context)?;
    Ok((model, data))
}

/// Builds (or, when `out` has an unfinished build of the same settings, continues) the
/// cache of `teacher`'s targets for the training windows of `data`, `batch` windows per
/// forward pass; `progress(done, total)` after each. Written into `out.tmp/` and renamed
/// to `out` when whole.
#[allow(clippy::too_many_arguments)]
pub fn build(
    teacher: &TeacherModel,
    data: &Dataset,
    top_k: usize,
    temperature: f64,
    context: usize,
    batch: usize,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CacheMeta> {
    if out.exists() {
        return Err(setup(format!(
            "{} exists: a cache is written once; remove it or name another folder",
            out.display()
        )));
    }
    let wins = windows(data, context);
    if wins.is_empty() {
        return Err(setup(format!(
            "{}: no training shard holds {} tokens (a window of context {context})",
            data.dir.display(),
            context + 1
        )));
    }
    let meta = CacheMeta {
        version: VERSION,
        teacher: teacher.path.clone(),
        teacher_sha256: teacher.sha256.clone(),
        corpus_sha256: data.manifest.corpus_sha256.clone(),
        tokenizer_sha256: data.manifest.tokenizer_sha256.clone(),
        shard_tokens: shard_tokens(data),
        context,
        top_k,
        temperature,
        vocab: data.manifest.vocab_size as usize,
        windows: wins.len() as u64,
    };
    let tmp = PathBuf::from(format!("{}.tmp", out.display()));
    let meta_path = tmp.join("cache.json");
    let bin = tmp.join("targets.bin");
    // An unfinished build of the same settings continues after its last whole window.
    let mut done = 0u64;
    if tmp.exists() {
        let same = std::fs::read_to_string(&meta_path)
            .ok()
            .and_then(|t| serde_json::from_str::<CacheMeta>(&t).ok())
            .is_some_and(|m| m == meta);
        if same {
            let len = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
            done = len / meta.window_bytes() as u64;
        } else {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    if done == 0 {
        let text = serde_json::to_vec_pretty(&meta).expect("json");
        std::fs::write(&meta_path, text).map_err(io(&meta_path))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&bin)
        .map_err(io(&bin))?;
    // Drops a partly written window.
    let whole = done * meta.window_bytes() as u64;
    file.set_len(whole).map_err(io(&bin))?;
    let mut file = std::io::BufWriter::new(file);
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(whole)).map_err(io(&bin))?;
    let mut bytes = Vec::new();
    for group in wins[done as usize..].chunks(batch.max(1)) {
        let mut inputs = Vec::with_capacity(group.len() * context);
        for &(s, start) in group {
            inputs.extend(data.train[s].slice(start, context));
        }
        let hidden = teacher.hidden(&inputs, group.len())?;
        let top = teacher.top_k(&hidden, top_k, temperature)?;
        bytes.clear();
        encode(&meta, &top, &mut bytes);
        file.write_all(&bytes).map_err(io(&bin))?;
        done += group.len() as u64;
        progress(done, meta.windows);
    }
    let file = file.into_inner().map_err(|e| io(&bin)(e.into_error()))?;
    file.sync_all().map_err(io(&bin))?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(meta)
}

/// An open cache, memory-mapped.
pub struct Cache {
    pub dir: PathBuf,
    pub meta: CacheMeta,
    map: memmap2::Mmap,
}

impl Cache {
    /// Opens the cache at `dir` for a run over `data` with `context` positions, taught by
    /// the teacher whose file hashes to `teacher_sha256`, at `temperature` with `top_k`
    /// (0: take the cache's): anything else the cache was made for is refused by name.
    pub fn open(
        dir: &Path,
        data: &Dataset,
        teacher_sha256: &str,
        context: usize,
        top_k: usize,
        temperature: f64,
    ) -> Result<Self> {
        let meta_path = dir.join("cache.json");
        let text = std::fs::read_to_string(&meta_path).map_err(io(&meta_path))?;
        let meta: CacheMeta = serde_json::from_str(&text)
            .map_err(|e| setup(format!("{}: {e}", meta_path.display())))?;
        let name = dir.display();
        let bad = |what: String| Err(setup(format!("teacher.cache {name}: {what}")));
        if meta.version != VERSION {
            return bad(format!("version {}, slm reads {VERSION}", meta.version));
        }
        if meta.corpus_sha256 != data.manifest.corpus_sha256
            || meta.tokenizer_sha256 != data.manifest.tokenizer_sha256
            || meta.shard_tokens != shard_tokens(data)
        {
            return bad(format!(
                "made for other shards (corpus sha256 {}), not {} (corpus sha256 {}): \
                 build a cache for these shards with `slm distill cache`",
                meta.corpus_sha256,
                data.dir.display(),
                data.manifest.corpus_sha256
            ));
        }
        if meta.teacher_sha256 != teacher_sha256 {
            return bad(format!(
                "made by another teacher ({}, sha256 {}) than teacher.model (sha256 {teacher_sha256})",
                meta.teacher.display(),
                meta.teacher_sha256
            ));
        }
        if meta.context != context {
            return bad(format!(
                "its windows are of context {}, the run's model.context is {context}",
                meta.context
            ));
        }
        if top_k != 0 && top_k != meta.top_k {
            return bad(format!(
                "it holds the top {}, the recipe asks for teacher.top_k = {top_k}",
                meta.top_k
            ));
        }
        if meta.temperature != temperature {
            return bad(format!(
                "made at temperature {}, the recipe's teacher.temperature is {temperature}",
                meta.temperature
            ));
        }
        if meta.vocab != data.manifest.vocab_size as usize
            || meta.top_k == 0
            || meta.top_k > crate::recipe::MAX_TOP_K
        {
            return bad(format!(
                "vocabulary {} and top_k {}: expected the shards' vocabulary {} and 1 to {}",
                meta.vocab,
                meta.top_k,
                data.manifest.vocab_size,
                crate::recipe::MAX_TOP_K
            ));
        }
        let expect_windows = windows(data, context).len() as u64;
        let bin = dir.join("targets.bin");
        let file = std::fs::File::open(&bin).map_err(io(&bin))?;
        let len = file.metadata().map_err(io(&bin))?.len();
        let want = expect_windows
            .checked_mul(meta.window_bytes() as u64)
            .ok_or_else(|| setup(format!("{name}: size overflows")))?;
        if meta.windows != expect_windows || len != want {
            return bad(format!(
                "targets.bin has {len} bytes; {expect_windows} windows of {} bytes expected",
                meta.window_bytes()
            ));
        }
        // SAFETY: a read-only map of a file slm wrote whole and renamed into place; every
        // read below is bounded by the length checked above.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&bin))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            meta,
            map,
        })
    }

    /// The targets of `windows` (indices into `windows(data, context)`), position after
    /// position. A token id past the vocabulary is refused by name.
    pub fn targets(&self, windows: &[usize]) -> Result<TopK> {
        let (k, ctx) = (self.meta.top_k, self.meta.context);
        let (rec, idb) = (self.meta.record_bytes(), self.meta.id_bytes());
        let rows = windows.len() * ctx;
        let mut top = TopK {
            k,
            ids: Vec::with_capacity(rows * k),
            logp: Vec::with_capacity(rows * k),
            rest: Vec::with_capacity(rows),
        };
        for &w in windows {
            let base = w * self.meta.window_bytes();
            let bytes = &self.map[base..base + self.meta.window_bytes()];
            for r in bytes.chunks_exact(rec) {
                let (ids, rest) = r.split_at(k * idb);
                let (logp, rest) = rest.split_at(k * 2);
                for id in ids.chunks_exact(idb) {
                    let id = match idb {
                        2 => u16::from_le_bytes([id[0], id[1]]) as u32,
                        _ => u32::from_le_bytes([id[0], id[1], id[2], id[3]]),
                    };
                    if id as usize >= self.meta.vocab {
                        return Err(setup(format!(
                            "{}: window {w} holds token id {id}, past the vocabulary of {}",
                            self.dir.join("targets.bin").display(),
                            self.meta.vocab
                        )));
                    }
                    top.ids.push(id);
                }
                top.logp.extend(
                    logp.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                );
                top.rest
                    .push(f32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
            }
        }
        Ok(top)
    }
}
