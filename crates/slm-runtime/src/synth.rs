//! Synthetic training text from a teacher (`slm synth`): documents sampled from prompts
//! (topics, instructions or openings), several at once on the batching engine, deduplicated,
//! appended to a JSON Lines corpus that `slm data prepare` reads (its "text" field).
//!
//! Document i continues prompt i mod P with the seed `seed + i`: the engine's output for a
//! sequence does not depend on what runs beside it, so a document is a function of its index,
//! and an interrupted run continues where it stopped (rerun the same command) with the texts
//! an unbroken run writes. A document whose text was already written is dropped and the next
//! index taken, until N distinct documents are written (or 4 N indices tried). The settings
//! and the teacher's identity go into OUT.synth.json beside the corpus; a run over an OUT
//! made with other settings is refused.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use slm_model::Llama;
use slm_tokenizer::Tokenizer;

use crate::engine::{Engine, EngineConfig, Event, Job, Sink};
use crate::sampler::SamplingParams;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Bad(String),
}

type Result<T> = std::result::Result<T, SynthError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |err| SynthError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// What a corpus was made with (OUT.synth.json).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SynthSettings {
    pub teacher: PathBuf,
    pub teacher_sha256: String,
    pub prompts: PathBuf,
    pub prompts_sha256: String,
    pub n: usize,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Prompts rendered as a user turn with the teacher's chat template.
    pub chat: bool,
    /// The prompt is kept in front of each document's text.
    pub keep_prompt: bool,
}

/// One line of the corpus.
#[derive(Debug, Serialize, Deserialize)]
struct Doc {
    text: String,
    index: u64,
    prompt: String,
}

/// Reads a prompts file: JSON Lines of {"prompt": ...} (or {"text": ...}).
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| {
            SynthError::Bad(format!(
                "{}: line {}: {what}; expected {{\"prompt\": \"...\"}}",
                path.display(),
                i + 1
            ))
        };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let p = v
            .get("prompt")
            .or_else(|| v.get("text"))
            .and_then(|p| p.as_str())
            .ok_or_else(|| bad("no \"prompt\" string"))?;
        if p.trim().is_empty() {
            return Err(bad("an empty prompt"));
        }
        out.push(p.to_string());
    }
    if out.is_empty() {
        return Err(SynthError::Bad(format!("{}: no prompts", path.display())));
    }
    Ok(out)
}

struct ChannelSink(mpsc::Sender<Event>);

impl Sink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn closed(&self) -> bool {
        false
    }
}

/// The documents already in `out` (whole lines only: a line cut by an interruption is
/// dropped, and the file rewritten without it).
fn read_done(out: &Path) -> Result<Vec<Doc>> {
    let Ok(text) = std::fs::read_to_string(out) else {
        return Ok(Vec::new());
    };
    let mut docs = Vec::new();
    let mut whole = 0;
    for line in text.split_inclusive('\n') {
        match (
            line.ends_with('\n'),
            serde_json::from_str::<Doc>(line.trim_end()),
        ) {
            (true, Ok(d)) => {
                docs.push(d);
                whole += line.len();
            }
            _ => break,
        }
    }
    if whole != text.len() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(io(out))?;
        f.set_len(whole as u64).map_err(io(out))?;
    }
    Ok(docs)
}

/// Writes up to `settings.n` distinct documents to `out` (continuing what it holds);
/// `progress(written, n)` after each. Returns the documents written in all and the
/// duplicates dropped in this run.
pub fn synth(
    model: Llama,
    tok: Tokenizer,
    prompts: &[String],
    settings: &SynthSettings,
    parallel: usize,
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(usize, usize)> {
    let meta_path = PathBuf::from(format!("{}.synth.json", out.display()));
    match std::fs::read_to_string(&meta_path) {
        Ok(text) => {
            let old: SynthSettings = serde_json::from_str(&text)
                .map_err(|e| SynthError::Bad(format!("{}: {e}", meta_path.display())))?;
            if &old != settings {
                return Err(SynthError::Bad(format!(
                    "{} was made with other settings ({}); write to another file, or rerun \
                     with the same ones to continue it",
                    out.display(),
                    meta_path.display()
                )));
            }
        }
        Err(_) if out.exists() => {
            return Err(SynthError::Bad(format!(
                "{} exists and is no slm synth output (no {}); write to another file",
                out.display(),
                meta_path.display()
            )))
        }
        Err(_) => {
            let text = serde_json::to_vec_pretty(settings).expect("json");
            std::fs::write(&meta_path, text).map_err(io(&meta_path))?;
        }
    }
    let done = read_done(out)?;
    let mut seen: HashSet<String> = done.iter().map(|d| d.text.clone()).collect();
    let mut written = done.len();
    let mut next = done.iter().map(|d| d.index + 1).max().unwrap_or(0);
    let limit = 4 * settings.n as u64;
    progress(written, settings.n);
    let template = match (settings.chat, &tok.chat_template) {
        (true, Some(t)) => Some(t),
        (true, None) => {
            return Err(SynthError::Bad(format!(
                "{}: --chat, but the teacher has no chat template",
                settings.teacher.display()
            )))
        }
        (false, _) => None,
    };
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let text = match &template {
                Some(t) => t
                    .render(&[slm_tokenizer::chat::Message::new("user", p)], true)
                    .map_err(|e| SynthError::Bad(e.to_string()))?,
                None => p.clone(),
            };
            tok.encode(&text, template.is_none())
                .map_err(|e| SynthError::Bad(e.to_string()))
        })
        .collect::<Result<_>>()?;
    let ctx = model.config.max_position_embeddings;
    let longest = encoded.iter().map(|e| e.len()).max().unwrap_or(0);
    if longest + settings.max_tokens > ctx {
        return Err(SynthError::Bad(format!(
            "a prompt of {longest} tokens plus --max-tokens {} exceeds the teacher's context {ctx}",
            settings.max_tokens
        )));
    }
    let model = Arc::new(model);
    let engine = Engine::start(
        model.clone(),
        Arc::new(tok),
        EngineConfig::new(&model, parallel, longest + settings.max_tokens),
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(io(out))?;
    let mut dropped = 0;
    while written < settings.n && next < limit {
        // A round of documents in flight; written in index order.
        let round: Vec<u64> = (next..limit).take(2 * parallel.max(1)).collect();
        next += round.len() as u64;
        let mut pending = BTreeMap::new();
        for &i in &round {
            let p = (i % prompts.len() as u64) as usize;
            let (tx, rx) = mpsc::channel();
            let job = Job {
                prompt: encoded[p].clone(),
                max_tokens: settings.max_tokens,
                sampling: SamplingParams {
                    temperature: settings.temperature,
                    top_k: 0,
                    top_p: settings.top_p,
                    min_p: 0.0,
                    seed: settings.seed.wrapping_add(i),
                    ..SamplingParams::default()
                },
                stop: Vec::new(),
                logprobs: None,
                deadline: None,
                json: None,
                ignore_eos: false,
            };
            engine
                .submit(job, Box::new(ChannelSink(tx)))
                .map_err(|e| SynthError::Bad(e.to_string()))?;
            pending.insert(i, (p, rx));
        }
        for (i, (p, rx)) in pending {
            let mut text = String::new();
            for event in rx.iter() {
                match event {
                    Event::Text { text: t, .. } => text.push_str(&t),
                    Event::Done(_) => break,
                    Event::Failed(e) => return Err(SynthError::Bad(e)),
                }
            }
            let text = match settings.keep_prompt {
                true => format!("{}{text}", prompts[p]),
                false => text.trim().to_string(),
            };
            if written >= settings.n || text.trim().is_empty() || !seen.insert(text.clone()) {
                dropped += usize::from(written < settings.n);
                continue;
            }
            let doc = Doc {
                text,
                index: i,
                prompt: prompts[p].clone(),
            };
            let line = serde_json::to_string(&doc).expect("json");
            file.write_all(format!("{line}\n").as_bytes())
                .map_err(io(out))?;
            written += 1;
            progress(written, settings.n);
        }
        file.flush().map_err(io(out))?;
    }
    file.sync_all().map_err(io(out))?;
    Ok((written, dropped))
}
