//! Builds a Hugging Face tokenizer from the `tokenizer.ggml.*` metadata of a GGUF file, the
//! same way llama.cpp interprets it: "gpt2" (byte-level BPE with the pre-tokenizer named by
//! `tokenizer.ggml.pre`) and "llama" (SentencePiece BPE with byte fallback).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::ser::SerializeMap;

use serde_json::{json, Value as Json};
use slm_format::gguf::Value;

use crate::{Result, TokenizerError};

/// llama.cpp token types.
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;
const TOKEN_BYTE: i64 = 6;

pub struct TokenizerSpec {
    pub tokenizer: tokenizers::Tokenizer,
    pub tokens: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub stop_ids: Vec<u32>,
    pub add_bos: bool,
}

impl TokenizerSpec {
    /// The vocabulary string of `id` (as the chat template sees special tokens).
    pub fn piece(&self, id: u32) -> String {
        self.tokens.get(id as usize).cloned().unwrap_or_default()
    }
}

/// What differs between the two tokenizer families around the shared BPE model.
struct Parts<'a> {
    normalizer: Json,
    pre_tokenizer: Json,
    decoder: Json,
    unk_token: Option<&'a str>,
    fuse_unk: bool,
    byte_fallback: bool,
}

/// tokenizer.json, as `tokenizers` reads it.
#[derive(serde::Serialize)]
struct TokenizerJson<'a> {
    version: &'static str,
    added_tokens: Vec<Json>,
    normalizer: Json,
    pre_tokenizer: Json,
    post_processor: Json,
    decoder: Json,
    model: BpeJson<'a>,
}

#[derive(serde::Serialize)]
struct BpeJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    dropout: Option<f32>,
    unk_token: Option<&'a str>,
    continuing_subword_prefix: Option<&'a str>,
    end_of_word_suffix: Option<&'a str>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    vocab: Vocab<'a>,
    merges: Vec<(&'a str, &'a str)>,
}

/// Token strings as the `{"token": id}` map, ids by position.
struct Vocab<'a>(&'a [String]);

impl serde::Serialize for Vocab<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (i, t) in self.0.iter().enumerate() {
            m.serialize_entry(t, &i)?;
        }
        m.end()
    }
}

fn invalid(file: &str, what: impl Into<String>) -> TokenizerError {
    TokenizerError::Invalid {
        file: file.to_string(),
        what: what.into(),
    }
}

// The regexes llama.cpp uses for each `tokenizer.ggml.pre` (llama-vocab.cpp), as Hugging Face
// Split pre-tokenizers.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn gpt2_pre_tokenizer(pre: &str, file: &str) -> Result<Json> {
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => byte_level(true),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
        }),
        "llama3" | "llama-bpe" | "llama-v3" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => json!({
            "type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]
        }),
        "qwen2" | "qwen2.5" | "qwen-2.5" | "deepseek-r1-qwen" | "stablelm2" => json!({
            "type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]
        }),
        other => {
            return Err(invalid(
                file,
                format!(
                    "tokenizer.ggml.pre '{other}' is not supported; supported: default, gpt2, smollm, starcoder, \
                     llama3/llama-bpe, qwen2"
                ),
            ))
        }
    })
}

/// Merges for a SentencePiece vocabulary: every pair of pieces whose concatenation is also a
/// piece, ranked by that piece's score (higher first), as Hugging Face's converter does.
fn spm_merges(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        for (split, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(split);
            if let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b)) {
                merges.push((scores.get(id).copied().unwrap_or(0.0), id, ia, ib));
            }
        }
    }
    merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    merges
        .into_iter()
        .map(|(_, _, a, b)| (tokens[a].clone(), tokens[b].clone()))
        .collect()
}

/// A metadata array whose every element converts, or None when the key is absent.
fn array<T>(
    meta: &BTreeMap<String, Value>,
    file: &str,
    key: &str,
    what: &str,
    convert: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(v) = meta.get(key) else {
        return Ok(None);
    };
    v.as_array()
        .ok_or_else(|| invalid(file, format!("{key} is not an array")))?
        .iter()
        .map(|x| convert(x).ok_or_else(|| invalid(file, format!("{key} holds a non-{what}"))))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

pub fn from_gguf_metadata(meta: &BTreeMap<String, Value>, file: &str) -> Result<TokenizerSpec> {
    let model = meta
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .ok_or_else(|| TokenizerError::Missing {
            file: file.into(),
            what: "no tokenizer.ggml.model in the GGUF metadata".into(),
        })?;
    let str_array = |key: &str| array(meta, file, key, "string", |x| x.as_str().map(String::from));
    let num_array = |key: &str| array(meta, file, key, "number", Value::as_f64);
    let id = |key: &str| meta.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);

    let tokens = str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| invalid(file, "tokenizer.ggml.tokens is missing"))?;
    if tokens.is_empty() {
        return Err(invalid(file, "tokenizer.ggml.tokens is empty"));
    }
    let n = tokens.len();
    let types = num_array("tokenizer.ggml.token_type")?.unwrap_or_else(|| vec![1.0; n]);
    if types.len() != n {
        return Err(invalid(
            file,
            format!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                types.len()
            ),
        ));
    }
    let check_id = |key: &str| -> Result<Option<u32>> {
        match id(key) {
            Some(i) if i as usize >= n => Err(invalid(
                file,
                format!("{key} = {i} is outside the vocabulary of {n}"),
            )),
            other => Ok(other),
        }
    };
    let bos = check_id("tokenizer.ggml.bos_token_id")?;
    let eos = check_id("tokenizer.ggml.eos_token_id")?;
    let eot = check_id("tokenizer.ggml.eot_token_id")?;
    let unk = check_id("tokenizer.ggml.unknown_token_id")?;

    if tokens
        .iter()
        .map(String::as_str)
        .collect::<HashSet<_>>()
        .len()
        != n
    {
        return Err(invalid(file, "tokenizer.ggml.tokens has duplicate entries"));
    }

    let mut added = Vec::new();
    for (i, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        let ty = ty as i64;
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == TOKEN_CONTROL
            }));
        }
    }

    // The merges as owned pairs (SentencePiece's are derived from scores), borrowed below.
    let merge_pairs: Vec<(String, String)>;
    let (add_bos_default, parts) = match model {
        "gpt2" => {
            let merges = str_array("tokenizer.ggml.merges")?.ok_or_else(|| invalid(file, "tokenizer.ggml.merges is missing"))?;
            merge_pairs = merges
                .into_iter()
                .map(|m| {
                    let (a, b) = m.split_once(' ').ok_or_else(|| invalid(file, format!("merge '{m}' has no space")))?;
                    Ok((a.to_string(), b.to_string()))
                })
                .collect::<Result<_>>()?;
            let pre = meta.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
            (
                false,
                Parts {
                    normalizer: Json::Null,
                    pre_tokenizer: gpt2_pre_tokenizer(pre, file)?,
                    decoder: json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                    unk_token: None,
                    fuse_unk: false,
                    byte_fallback: false,
                },
            )
        }
        "llama" => {
            let scores = num_array("tokenizer.ggml.scores")?.unwrap_or_else(|| vec![0.0; n]);
            // Byte tokens (<0x41>) are only reached through byte fallback, never merged.
            let mergeable: Vec<String> = tokens
                .iter()
                .zip(&types)
                .map(|(t, &ty)| if ty as i64 == TOKEN_BYTE || ty as i64 == TOKEN_CONTROL { String::new() } else { t.clone() })
                .collect();
            merge_pairs = spm_merges(&mergeable, &scores)
                .into_iter()
                .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                .collect();
            let add_prefix = meta.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.as_bool()).unwrap_or(true);
            let mut normalizers = vec![];
            if add_prefix {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_prefix {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            (
                true,
                Parts {
                    normalizer: json!({"type": "Sequence", "normalizers": normalizers}),
                    pre_tokenizer: Json::Null,
                    decoder: json!({"type": "Sequence", "decoders": decoders}),
                    unk_token: unk.map(|u| tokens[u as usize].as_str()),
                    fuse_unk: true,
                    byte_fallback: true,
                },
            )
        }
        other => {
            return Err(invalid(
                file,
                format!("tokenizer.ggml.model '{other}' is not supported; supported: gpt2 (byte-level BPE), llama (SentencePiece)"),
            ))
        }
    };
    // Serialized straight from borrowed data: a serde_json::Value tree of the vocabulary and
    // merges (json! copies what it interpolates) had set the peak memory of a whole
    // generate run, ~25 MB above the model itself.
    let text = serde_json::to_string(&TokenizerJson {
        version: "1.0",
        added_tokens: added,
        normalizer: parts.normalizer,
        pre_tokenizer: parts.pre_tokenizer,
        post_processor: Json::Null,
        decoder: parts.decoder,
        model: BpeJson {
            kind: "BPE",
            dropout: None,
            unk_token: parts.unk_token,
            continuing_subword_prefix: None,
            end_of_word_suffix: None,
            fuse_unk: parts.fuse_unk,
            byte_fallback: parts.byte_fallback,
            ignore_merges: false,
            vocab: Vocab(&tokens),
            merges: merge_pairs
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect(),
        },
    })
    .map_err(|e| invalid(file, format!("writing the tokenizer: {e}")))?;
    drop(merge_pairs);
    let tokenizer: tokenizers::Tokenizer = text
        .parse()
        .map_err(|e: tokenizers::Error| invalid(file, format!("building the tokenizer: {e}")))?;
    drop(text);
    let add_bos = meta
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
        .unwrap_or(add_bos_default);
    let mut stop_ids: Vec<u32> = eos.into_iter().chain(eot).collect();
    // Chat models end a turn with an end-of-turn control token that the metadata does not
    // always name as EOS; llama.cpp treats these as end-of-generation too.
    for (i, t) in tokens.iter().enumerate() {
        if types[i] as i64 == TOKEN_CONTROL
            && matches!(
                t.as_str(),
                "<|im_end|>"
                    | "<|eot_id|>"
                    | "<|end_of_text|>"
                    | "<|endoftext|>"
                    | "<end_of_turn>"
                    | "</s>"
            )
        {
            stop_ids.push(i as u32);
        }
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    Ok(TokenizerSpec {
        tokenizer,
        tokens,
        bos,
        eos,
        stop_ids,
        add_bos,
    })
}

/// The `tokenizer.ggml.pre` names whose pre-tokenizer is distinct, in the order they are
/// tried when a tokenizer.json is written back to GGUF.
const PRE_NAMES: [&str; 4] = ["gpt-2", "smollm", "llama-bpe", "qwen2"];

/// The `tokenizer.ggml.*` metadata of a byte-level BPE tokenizer.json (the inverse of
/// `from_gguf_metadata`), for a model with `rows` embedding rows: tokens, their types
/// (normal, control for special added tokens, user-defined for others, unused for padding
/// rows, as llama.cpp's converter writes them), merges, and the pre-tokenizer's name.
pub fn to_gguf_metadata(
    tokenizer_json: &str,
    rows: usize,
    file: &str,
) -> Result<BTreeMap<String, Value>> {
    let t: Json = serde_json::from_str(tokenizer_json)
        .map_err(|e| invalid(file, format!("not JSON: {e}")))?;
    let model = &t["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true {
        return Err(invalid(
            file,
            "only byte-level BPE tokenizers can be written to GGUF so far (this one is not)",
        ));
    }
    if !t["normalizer"].is_null() {
        return Err(invalid(
            file,
            "a byte-level BPE tokenizer with a normalizer has no GGUF equivalent",
        ));
    }
    let pre = PRE_NAMES
        .into_iter()
        .find(|name| gpt2_pre_tokenizer(name, file).is_ok_and(|p| p == t["pre_tokenizer"]))
        .ok_or_else(|| {
            invalid(
                file,
                format!(
                    "pre_tokenizer {} matches none of llama.cpp's that slm knows ({})",
                    t["pre_tokenizer"],
                    PRE_NAMES.join(", ")
                ),
            )
        })?;
    let mut tokens: Vec<Option<String>> = vec![None; rows];
    let mut types = vec![1i32; rows];
    let mut put = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            invalid(
                file,
                format!("token {text:?} has id {id}, past the model's {rows} rows"),
            )
        })?;
        *slot = Some(text.to_string());
        types[id as usize] = ty;
        Ok(())
    };
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| invalid(file, "model.vocab is not an object"))?;
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| invalid(file, format!("token {text:?} has no id")))?;
        put(id, text, 1)?;
    }
    for a in t["added_tokens"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let (Some(id), Some(text)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(invalid(file, "an added token without id or content"));
        };
        let ty = if a["special"] == true {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        put(id, text, ty as i32)?;
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            Value::String(t.unwrap_or_else(|| {
                types[i] = 5; // unused
                format!("[PAD{i}]")
            }))
        })
        .collect();
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| invalid(file, "model.merges is not a list"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => Ok(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            )),
            other => Err(invalid(file, format!("merge {other} is not a pair"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut m = BTreeMap::new();
    m.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
    m.insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
    m.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens));
    m.insert(
        "tokenizer.ggml.token_type".into(),
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    m.insert(
        "tokenizer.ggml.merges".into(),
        Value::Array(merges.into_iter().map(Value::String).collect()),
    );
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arr(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    #[test]
    fn sentencepiece_vocab_merges_by_score() {
        let tokens = [
            "<unk>",
            "<s>",
            "</s>",
            "\u{2581}",
            "h",
            "i",
            "hi",
            "\u{2581}hi",
            "<0x21>",
        ];
        let mut meta = BTreeMap::new();
        meta.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        meta.insert("tokenizer.ggml.tokens".into(), arr(&tokens));
        meta.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(
                [0., 0., 0., -1., -2., -3., -0.5, -0.1, 0.]
                    .iter()
                    .map(|&s| Value::F32(s))
                    .collect(),
            ),
        );
        meta.insert(
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                [2, 3, 3, 1, 1, 1, 1, 1, 6]
                    .iter()
                    .map(|&t| Value::I32(t))
                    .collect(),
            ),
        );
        meta.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
        let spec = from_gguf_metadata(&meta, "t.gguf").unwrap();
        let enc = spec.tokenizer.encode("hi!", false).unwrap();
        // "▁hi" is one piece; "!" is not in the vocabulary and falls back to its byte token.
        assert_eq!(enc.get_ids(), &[7, 8]);
        assert!(spec.add_bos);
        assert_eq!(spec.tokenizer.decode(&[7, 8], true).unwrap(), "hi!");
    }

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let mut meta = BTreeMap::new();
        meta.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        meta.insert("tokenizer.ggml.tokens".into(), arr(&["a", "b"]));
        meta.insert("tokenizer.ggml.merges".into(), arr(&["a b"]));
        meta.insert("tokenizer.ggml.pre".into(), Value::String("mystery".into()));
        let err = from_gguf_metadata(&meta, "m.gguf")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("mystery") && err.contains("m.gguf"), "{err}");
    }
}
