//! The request bodies of OpenAI's chat and text completion endpoints, read into a `Job`
//! with every field checked, and the JSON of their answers.

use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

use slm_runtime::engine::{Job, TokenLogprob, Usage};
use slm_runtime::json_constraint::JsonGrammar;
use slm_runtime::SamplingParams;
use slm_tokenizer::{Message, Tokenizer};

use crate::error::ApiError;

/// Bounds on what a request may ask for.
pub const MAX_STOPS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
pub const MAX_TOP_LOGPROBS: u32 = 20;
pub const MAX_MESSAGES: usize = 4096;

/// The fields of both completion endpoints (each reads its own; unknown fields are ignored,
/// as OpenAI's clients send some this server has no use for).
#[derive(Debug, Deserialize, Default)]
pub struct GenRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub prompt: Option<Prompt>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    /// Chat: a bool (with `top_logprobs`); completions: the number of alternatives.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub response_format: Option<ResponseFormat>,
    /// llama-server's extension: generate max_tokens tokens whatever the model says.
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
}

/// Parses a body, naming the field that is wrong.
pub fn parse_as<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad(format!("the body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::bad(format!("the body is not a request object: {inner}"))
        } else {
            ApiError::field(&path, format!("{path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad(format!("the body is not valid JSON: {e}")))?;
    Ok(value)
}

/// The text of a chat message's content (text parts joined; other parts refused).
fn content_text(m: &ChatMessage, i: usize) -> Result<String, ApiError> {
    match &m.content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => out.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::field(
                            &format!("messages[{i}].content"),
                            format!("content parts of type '{kind}' are not supported; send text"),
                        ))
                    }
                }
            }
            Ok(out)
        }
    }
}

/// The prompt tokens of a chat request: its messages through the model's chat template.
pub fn chat_prompt(r: &GenRequest, tok: &Tokenizer) -> Result<Vec<u32>, ApiError> {
    let Some(messages) = &r.messages else {
        return Err(ApiError::field("messages", "messages is required"));
    };
    if messages.is_empty() {
        return Err(ApiError::field("messages", "messages is empty"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::field(
            "messages",
            format!("{} messages; at most {MAX_MESSAGES}", messages.len()),
        ));
    }
    let mut list = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::field(
                &format!("messages[{i}].role"),
                format!(
                    "role '{}' is not one of system, developer, user, assistant, tool",
                    m.role
                ),
            ));
        }
        // OpenAI's newer "developer" role is the system prompt of templates that predate it.
        let role = if m.role == "developer" {
            "system"
        } else {
            &m.role
        };
        list.push(Message::new(role, content_text(m, i)?));
    }
    let Some(template) = &tok.chat_template else {
        return Err(ApiError::bad(
            "this model has no chat template; use /v1/completions with a prompt",
        ));
    };
    let text = template
        .render(&list, true)
        .map_err(|e| ApiError::bad(format!("the chat template failed on these messages: {e}")))?;
    tok.encode(&text, false)
        .map_err(|e| ApiError::internal(format!("tokenizer: {e}")))
}

/// The prompt tokens of a text completion request.
pub fn completion_prompt(r: &GenRequest, tok: &Tokenizer) -> Result<Vec<u32>, ApiError> {
    let text = match &r.prompt {
        None => return Err(ApiError::field("prompt", "prompt is required")),
        Some(Prompt::Text(t)) => t.clone(),
        Some(Prompt::Texts(ts)) if ts.len() == 1 => ts[0].clone(),
        Some(Prompt::Texts(ts)) => {
            return Err(ApiError::field(
                "prompt",
                format!("{} prompts in one request; send one per request", ts.len()),
            ))
        }
        Some(Prompt::Tokens(ids)) => {
            check_token_ids(ids, tok, "prompt")?;
            return Ok(ids.clone());
        }
    };
    tok.encode(&text, true)
        .map_err(|e| ApiError::internal(format!("tokenizer: {e}")))
}

/// Refuses token ids (in field `param`) that the tokenizer does not have.
pub fn check_token_ids(ids: &[u32], tok: &Tokenizer, param: &str) -> Result<(), ApiError> {
    let vocab = tok.vocab_size();
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(ApiError::field(
            param,
            format!("token id {bad} is not below the vocabulary size {vocab}"),
        )),
        None => Ok(()),
    }
}

/// The job a request asks for, with its prompt, checked against the context `ctx`.
/// `chat`: the endpoint (logprobs is a bool there, a count in completions).
pub fn job(
    r: &GenRequest,
    prompt: Vec<u32>,
    ctx: usize,
    chat: bool,
    default_max: Option<usize>,
) -> Result<Job, ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::field("prompt", "the prompt is empty"));
    }
    if let Some(n) = r.n {
        if n != 1 {
            return Err(ApiError::field(
                "n",
                format!("n = {n}: this server returns one choice per request"),
            ));
        }
    }
    if prompt.len() >= ctx {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::field(
                if chat { "messages" } else { "prompt" },
                format!(
                    "the prompt is {} tokens; this model's context is {ctx} tokens",
                    prompt.len()
                ),
            )
        });
    }
    let room = ctx - prompt.len();
    let (name, asked) = match (r.max_completion_tokens, r.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = match asked {
        None => default_max.unwrap_or(room).min(room),
        Some(m) if m < 1 => {
            return Err(ApiError::field(
                name,
                format!("{name} = {m}; it must be >= 1"),
            ))
        }
        Some(m) if m as u64 > room as u64 => {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::field(
                    name,
                    format!(
                        "{name} = {m} with a prompt of {} tokens exceeds this model's context \
                         of {ctx} tokens (at most {room})",
                        prompt.len()
                    ),
                )
            })
        }
        Some(m) => m as usize,
    };
    let d = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: r.temperature.unwrap_or(d.temperature),
        top_k: r.top_k.map_or(d.top_k, |k| k as usize),
        top_p: r.top_p.unwrap_or(d.top_p),
        min_p: r.min_p.unwrap_or(d.min_p),
        repeat_penalty: r.repeat_penalty.unwrap_or(d.repeat_penalty),
        presence_penalty: r.presence_penalty.unwrap_or(0.0),
        frequency_penalty: r.frequency_penalty.unwrap_or(0.0),
        seed: match r.seed {
            Some(s) => s as u64,
            None => unique_u64(),
        },
        ..d
    };
    if let Err(e) = sampling.validate() {
        return Err(ApiError::bad(e));
    }
    let stop = match &r.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::field(
            "stop",
            format!("at most {MAX_STOPS} stop strings of at most {MAX_STOP_BYTES} bytes each"),
        ));
    }
    let logprobs = if chat {
        match &r.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(top_logprobs(r.top_logprobs, "top_logprobs")?),
            Some(v) => {
                return Err(ApiError::field(
                    "logprobs",
                    format!("logprobs is {v}; expected true or false"),
                ))
            }
        }
    } else {
        match &r.logprobs {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(top_logprobs(n.as_i64(), "logprobs")?),
            Some(v) => {
                return Err(ApiError::field(
                    "logprobs",
                    format!("logprobs is {v}; expected a number of alternatives (0 to 5)"),
                ))
            }
        }
    };
    if r.top_logprobs.is_some() && chat && logprobs.is_none() {
        return Err(ApiError::field(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        ));
    }
    Ok(Job {
        prompt,
        max_tokens,
        sampling,
        stop,
        logprobs,
        deadline: None,
        json: response_format(r)?.map(Arc::new),
        ignore_eos: r.ignore_eos.unwrap_or(false),
    })
}

/// The grammar `response_format` asks the output to follow: any JSON object (`json_object`)
/// or the documents of a JSON Schema (`json_schema`).
fn response_format(r: &GenRequest) -> Result<Option<JsonGrammar>, ApiError> {
    let Some(f) = &r.response_format else {
        return Ok(None);
    };
    match f.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(JsonGrammar::object())),
        "json_schema" => {
            let schema = f
                .json_schema
                .as_ref()
                .and_then(|j| j.schema.as_ref())
                .ok_or_else(|| {
                    ApiError::field(
                        "response_format.json_schema.schema",
                        "json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                    )
                })?;
            JsonGrammar::from_schema(schema)
                .map(Some)
                .map_err(|e| ApiError::field("response_format.json_schema.schema", e))
        }
        other => Err(ApiError::field(
            "response_format.type",
            format!("response_format type '{other}' is not text, json_object or json_schema"),
        )),
    }
}

fn top_logprobs(n: Option<i64>, name: &str) -> Result<usize, ApiError> {
    match n {
        None => Ok(0),
        Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::field(
            name,
            format!("{name} = {n}; it must be in 0..={MAX_TOP_LOGPROBS}"),
        )),
    }
}

/// A number different per call (a seed for a request that names none, as OpenAI's sampling
/// differs per request; a response id).
pub fn unique_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15))
    .wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// A token's text for logprobs (special tokens included, as they were generated).
fn piece(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Chat logprobs: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`.
pub fn chat_logprobs(tok: &Tokenizer, lps: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = piece(tok, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.id, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|&(i, p)| entry(i, p)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// Completion logprobs: `{tokens, token_logprobs, top_logprobs, text_offset}` from `offset`.
pub fn completion_logprobs(tok: &Tokenizer, lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut tokens = Vec::new();
    let mut token_lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for l in lps {
        let t = piece(tok, l.id);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        token_lps.push(l.logprob);
        let top: serde_json::Map<String, Value> = l
            .top
            .iter()
            .map(|&(i, p)| (piece(tok, i), json!(p)))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets})
}
