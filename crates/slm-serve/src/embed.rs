//! `/v1/embeddings`: OpenAI's request and answer over a sentence encoder.

use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use slm_runtime::embed::SentenceEncoder;

use crate::error::ApiError;

/// Inputs one request may embed (OpenAI's own limit).
pub const MAX_INPUTS: usize = 2048;

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: Input,
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

fn token_input(n: usize) -> ApiError {
    ApiError::field(
        "input",
        format!("input holds {n} token ids; this server embeds text, send the text"),
    )
}

pub async fn respond(model: Arc<SentenceEncoder>, r: EmbeddingRequest) -> Result<Value, ApiError> {
    let texts = match r.input {
        Input::One(s) => vec![s],
        Input::Many(v) => v,
        Input::Tokens(ids) => return Err(token_input(ids.len())),
        Input::TokenLists(lists) => return Err(token_input(lists.iter().map(Vec::len).sum())),
    };
    if texts.is_empty() || texts.len() > MAX_INPUTS {
        return Err(ApiError::field(
            "input",
            format!("{} inputs; send 1 to {MAX_INPUTS}", texts.len()),
        ));
    }
    let base64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::field(
                "encoding_format",
                format!("encoding_format '{other}' is not 'float' or 'base64'"),
            ))
        }
    };
    if let Some(d) = r.dimensions {
        if d != model.dim as i64 {
            return Err(ApiError::field(
                "dimensions",
                format!(
                    "this model's embeddings have {} dimensions, not {d}",
                    model.dim
                ),
            ));
        }
    }
    let name = model.name.clone();
    let (vectors, tokens) = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tokens: usize = refs
            .iter()
            .map(|t| model.tokens(t).map(|v| v.len()))
            .sum::<Result<usize, _>>()?;
        Ok::<_, slm_runtime::embed::EmbedError>((model.embed(&refs)?, tokens))
    })
    .await
    .map_err(|e| ApiError::internal(format!("embedding: {e}")))?
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "model": name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
}
