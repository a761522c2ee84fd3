//! slm-tokenizer: a `tokenizers::Tokenizer` for any model slm runs, built from GGUF metadata
//! or loaded from tokenizer.json, plus chat templates rendered with minijinja.

pub mod chat;
mod from_gguf;
pub mod train;

use std::path::{Path, PathBuf};

pub use chat::{ChatTemplate, Message};
pub use from_gguf::{from_gguf_metadata, to_gguf_metadata, TokenizerSpec};
use slm_format::ModelSource;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{file}: {what}")]
    Invalid { file: String, what: String },
    #[error("{file}: no tokenizer: {what}")]
    Missing { file: String, what: String },
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("chat template from {file}: {what}")]
    Template { file: String, what: String },
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// A model's tokenizer with the facts generation needs.
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Every id that ends a generation (EOS, end-of-turn tokens).
    pub stop_ids: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<ChatTemplate>,
    /// tokenizers computes the vocabulary size by building the whole vocabulary map; asked
    /// once per generated token, that was most of a decode step's time outside the model.
    vocab_size: std::sync::OnceLock<usize>,
}

impl Tokenizer {
    /// A tokenizer without special ids or chat template (set the public fields as needed).
    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            bos: None,
            eos: None,
            stop_ids: Vec::new(),
            add_bos: false,
            chat_template: None,
            vocab_size: Default::default(),
        }
    }

    /// The tokenizer of a loaded model: from GGUF metadata or the folder's tokenizer.json.
    pub fn for_model(source: &ModelSource) -> Result<Self> {
        match source {
            ModelSource::Gguf { path, metadata, .. } => {
                let file = path.display().to_string();
                let spec = from_gguf_metadata(metadata, &file)?;
                let template = match metadata.get("tokenizer.chat_template") {
                    Some(v) if v.as_str().is_none() => {
                        return Err(TokenizerError::Invalid {
                            file,
                            what: format!(
                                "tokenizer.chat_template is {}, expected a string",
                                v.summary()
                            ),
                        })
                    }
                    v => v.and_then(|v| v.as_str()),
                };
                let template = match template {
                    Some(t) => Some(ChatTemplate::new(
                        t,
                        spec.bos.map(|b| spec.piece(b)),
                        spec.eos.map(|e| spec.piece(e)),
                        &file,
                    )?),
                    None => None,
                };
                Ok(Self {
                    bos: spec.bos,
                    eos: spec.eos,
                    stop_ids: spec.stop_ids.clone(),
                    add_bos: spec.add_bos,
                    inner: spec.tokenizer,
                    chat_template: template,
                    vocab_size: Default::default(),
                })
            }
            ModelSource::HfFolder { dir } => Self::from_folder(dir),
        }
    }

    /// tokenizer_config.json for this tokenizer (as transformers reads it): the special
    /// tokens, whether bos is added, and the chat template.
    pub fn config_json(&self, model_max_length: usize) -> serde_json::Value {
        let piece = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let mut c = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": piece(self.bos),
            "eos_token": piece(self.eos),
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "model_max_length": model_max_length,
        });
        if let Some(t) = &self.chat_template {
            c["chat_template"] = t.source().into();
        }
        c
    }

    /// tokenizer.json + tokenizer_config.json (chat template, special tokens) of a folder.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(TokenizerError::Missing {
                file: dir.display().to_string(),
                what: "tokenizer.json not found in the model folder".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| TokenizerError::Invalid {
            file: tj.display().to_string(),
            what: e.to_string(),
        })?;
        let cfg_path: PathBuf = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| TokenizerError::Invalid {
                file: cfg_path.display().to_string(),
                what: e.to_string(),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let token_str = |key: &str| -> Option<String> {
            match cfg.get(key) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Object(o)) => {
                    o.get("content").and_then(|c| c.as_str()).map(String::from)
                }
                _ => None,
            }
        };
        let bos_s = token_str("bos_token");
        let eos_s = token_str("eos_token");
        let bos = bos_s.as_deref().and_then(|s| inner.token_to_id(s));
        let mut eos = eos_s.as_deref().and_then(|s| inner.token_to_id(s));
        // generation_config.json may name other end ids (e.g. <|im_end|> and <|endoftext|>).
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) {
            if let Ok(g) = serde_json::from_str::<serde_json::Value>(&text) {
                let ids: Vec<u32> = match g.get("eos_token_id") {
                    Some(serde_json::Value::Number(n)) => {
                        n.as_u64().into_iter().map(|n| n as u32).collect()
                    }
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .filter_map(|n| n.as_u64())
                        .map(|n| n as u32)
                        .collect(),
                    _ => vec![],
                };
                eos = eos.or(ids.first().copied());
                stop_ids.extend(ids);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let template = match template_source(cfg.get("chat_template"), &cfg_path)? {
            Some(t) => Some(ChatTemplate::new(
                t,
                bos_s,
                eos_s,
                &cfg_path.display().to_string(),
            )?),
            None => None,
        };
        Ok(Self {
            bos,
            eos,
            stop_ids,
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
            inner,
            chat_template: template,
            vocab_size: Default::default(),
        })
    }

    /// Token ids of `text`; special tokens written in the text (like `<|im_start|>`) are parsed.
    /// With `add_special`, BOS is prepended when the model asks for it.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// Token ids of `words` joined by single spaces (as a tagging row's sentence reads), and
    /// for each word the index of its first token: the token a word's tag is learnt and read
    /// at. A token belongs to the word its last byte lies in (a byte-level token carries the
    /// space before its word); BOS is prepended as `encode` does.
    pub fn encode_words<S: AsRef<str>>(&self, words: &[S]) -> Result<(Vec<u32>, Vec<usize>)> {
        let mut text = String::new();
        let mut ends = Vec::with_capacity(words.len());
        for (i, w) in words.iter().enumerate() {
            if i > 0 {
                text.push(' ');
            }
            text.push_str(w.as_ref());
            ends.push(text.len());
        }
        let enc = self
            .inner
            .encode(text.as_str(), false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        let mut first = vec![usize::MAX; words.len()];
        for (&id, &(start, end)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            let last = end.max(start + 1) - 1;
            let word = ends.partition_point(|&e| e <= last);
            if let Some(f) = first.get_mut(word).filter(|f| **f == usize::MAX) {
                *f = ids.len();
            }
            ids.push(id);
        }
        if let Some(i) = first.iter().position(|&f| f == usize::MAX) {
            return Err(TokenizerError::Tokenizers(format!(
                "word {i} ({:?}) gives no token of its own",
                words[i].as_ref()
            )));
        }
        Ok((ids, first))
    }

    /// `encode_words` with the sentence's tokens repeated (BOS once, before the first copy),
    /// each word's first token taken from the second copy: under causal attention it has
    /// seen the whole sentence. How a token-classification head with `echo` reads its input.
    pub fn encode_words_echoed<S: AsRef<str>>(
        &self,
        words: &[S],
    ) -> Result<(Vec<u32>, Vec<usize>)> {
        let (mut ids, mut first) = self.encode_words(words)?;
        let bos = usize::from(self.add_bos && self.bos.is_some());
        let copy = ids.len() - bos;
        ids.extend_from_within(bos..);
        for f in &mut first {
            *f += copy;
        }
        Ok((ids, first))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        *self
            .vocab_size
            .get_or_init(|| self.inner.get_vocab_size(true))
    }

    /// Refuses a tokenizer that does not fit the model's embedding rows: an id past the rows
    /// would be an out-of-range lookup, and a GGUF whose token list is shorter than its
    /// embedding has lost entries (llama.cpp requires them equal). A Hugging Face folder may
    /// have more rows than tokens (Qwen2 pads its embedding to a multiple of 128).
    pub fn check_fits(&self, model_rows: usize, source: &ModelSource) -> Result<()> {
        let ids = self
            .inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let (file, fits) = match source {
            ModelSource::Gguf { path, .. } => (path.display().to_string(), ids == model_rows),
            ModelSource::HfFolder { dir } => (
                dir.join("tokenizer.json").display().to_string(),
                ids <= model_rows,
            ),
        };
        if fits {
            return Ok(());
        }
        Err(TokenizerError::Invalid {
            file,
            what: format!(
                "the tokenizer has {ids} token ids but the model's embedding has {model_rows} rows: \
                 they belong to different models"
            ),
        })
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }
}

/// Turns a stream of token ids into text as soon as it is valid UTF-8: a multi-byte character
/// split over tokens is held back until complete. Each step decodes only the last few tokens
/// (tokenizers' `DecodeStream`): decoding the whole sequence again per token made the text,
/// not the model, the cost of long generations.
pub struct StreamDecoder<'a> {
    stream: tokenizers::tokenizer::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        Self {
            stream: tok.inner.decode_stream(true),
        }
    }

    /// The new text that `id` completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.stream
            .step(id)
            .map(Option::unwrap_or_default)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }
}

/// tokenizer_config.json's `chat_template`: a string, or Hugging Face's list of named
/// templates (the one named "default" is the chat template); anything else is an error.
fn template_source<'a>(v: Option<&'a serde_json::Value>, file: &Path) -> Result<Option<&'a str>> {
    let bad = |what: String| TokenizerError::Invalid {
        file: file.display().to_string(),
        what,
    };
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(serde_json::Value::Array(list)) => {
            let named = |want: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(want))
            };
            match named("default").and_then(|t| t.get("template")) {
                Some(serde_json::Value::String(s)) => Ok(Some(s)),
                _ => Err(bad(
                    "chat_template is a list without a {\"name\": \"default\", \"template\": \"...\"} entry".into(),
                )),
            }
        }
        Some(other) => Err(bad(format!(
            "chat_template is {other}, expected a string (or a list of named templates)"
        ))),
    }
}
