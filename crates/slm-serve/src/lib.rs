//! slm-serve: an OpenAI-compatible HTTP API over slm's continuous-batching engine, and the web
//! chat page. The shapes follow OpenAI's API and llama.cpp's llama-server, so the clients
//! people already use work unchanged.
//!
//! Safe by default: it binds loopback, compares an API key in constant time, allows no
//! cross-origin use unless asked, bounds every request, and its page never treats model output
//! as HTML.

pub mod api;
pub mod error;
pub mod metrics;
mod page;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use slm_runtime::embed::SentenceEncoder;
use slm_runtime::engine::{Engine, EngineConfig, Event, Sink, TokenLogprob};
use slm_tokenizer::Tokenizer;
use tokio::sync::mpsc;

pub use error::ApiError;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// The one origin allowed to call the API from a browser page of another site.
    pub cors: Option<String>,
    pub metrics: bool,
    /// Sequences generating at once, per model.
    pub parallel: usize,
    /// Context per sequence (positions); the model's own when larger.
    pub ctx: usize,
    /// Requests waiting per model beyond the running ones.
    pub queue: usize,
    pub max_body: usize,
    /// How long one request may generate.
    pub timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            cors: None,
            metrics: false,
            parallel: 4,
            ctx: 4096,
            queue: 256,
            max_body: 1 << 20,
            timeout: Duration::from_secs(600),
        }
    }
}

/// A generative model behind its engine.
pub struct ChatModel {
    pub name: String,
    pub engine: Engine,
    pub tok: Arc<Tokenizer>,
}

pub struct Models {
    pub chat: Vec<ChatModel>,
    pub embed: Vec<Arc<SentenceEncoder>>,
}

impl Models {
    fn names(&self) -> Vec<String> {
        self.chat
            .iter()
            .map(|m| m.name.clone())
            .chain(self.embed.iter().map(|e| e.name.clone()))
            .collect()
    }

    /// The chat model a request names (the first one when it names none).
    fn chat(&self, name: Option<&str>) -> Result<&ChatModel, ApiError> {
        match name {
            None | Some("") => self
                .chat
                .first()
                .ok_or_else(|| ApiError::not_found("this server has no generative model")),
            Some(n) => self
                .chat
                .iter()
                .find(|m| m.name == n)
                .ok_or_else(|| ApiError::unknown_model(n, &self.names())),
        }
    }

    /// The embedding model a request names (the first one when it names none).
    fn embedder(&self, name: Option<&str>) -> Result<Arc<SentenceEncoder>, ApiError> {
        let found = match name {
            None | Some("") => self.embed.first(),
            Some(n) => self.embed.iter().find(|e| e.name == n),
        };
        match (found, name) {
            (Some(e), _) => Ok(e.clone()),
            (None, Some(n)) if !n.is_empty() => Err(ApiError::unknown_model(n, &self.names())),
            (None, _) => Err(ApiError::not_found(
                "this server has no embedding model (start it with --embed)",
            )),
        }
    }
}

pub struct AppState {
    pub config: ServeConfig,
    models: OnceLock<Models>,
    /// SHA-256 of the API key: comparing digests takes the same time whatever the key.
    key_digest: Option<[u8; 32]>,
    started: u64,
}

impl AppState {
    pub fn new(config: ServeConfig) -> Arc<Self> {
        let key_digest = config.api_key.as_deref().map(digest);
        Arc::new(Self {
            config,
            models: OnceLock::new(),
            key_digest,
            started: unix_now(),
        })
    }

    /// Makes the models available; until then the API answers 503.
    pub fn set_models(&self, models: Models) {
        let _ = self.models.set(models);
    }

    fn models(&self) -> Result<&Models, ApiError> {
        self.models
            .get()
            .ok_or_else(|| ApiError::unavailable("the models are still loading"))
    }
}

fn digest(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The HTTP routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics::handler))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/", get(page::index))
        .route("/app.js", get(page::script))
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                ..ApiError::bad("this endpoint does not take that method")
            }
        })
        .with_state(state.clone());
    if let Some(origin) = &state.config.cors {
        let origin = HeaderValue::from_str(origin).unwrap_or(HeaderValue::from_static("null"));
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origin)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app
}

async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(want) = &state.key_digest {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|k| digest(k.trim()));
        let ok = given.is_some_and(|g| {
            // No early exit: every byte is compared whatever the first difference.
            std::hint::black_box(g.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b))) == 0
        });
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.models.get() {
        Some(_) => axum::Json(json!({"status": "ok"})).into_response(),
        None => ApiError::unavailable("loading models").into_response(),
    }
}

async fn list_models(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let models = state.models()?;
    // OpenAI's fields, and `kind` so a client (the page) can tell chat from embedding models.
    let entry = |id: &str, kind: &str| json!({"id": id, "object": "model", "created": state.started, "owned_by": "slm", "kind": kind});
    let data: Vec<Value> = models
        .chat
        .iter()
        .map(|m| entry(&m.name, "chat"))
        .chain(models.embed.iter().map(|e| entry(&e.name, "embedding")))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

/// The request body, bounded.
async fn body_bytes(state: &AppState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_body;
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let over = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if over {
            ApiError::too_large(limit)
        } else {
            ApiError::bad(format!("could not read the request body: {e}"))
        }
    })
}

/// Engine events into a channel the HTTP side reads; a dropped receiver (the client went
/// away) closes the sink, and the engine drops the sequence.
struct ChannelSink(mpsc::UnboundedSender<Event>);

impl Sink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn closed(&self) -> bool {
        self.0.is_closed()
    }
}

fn submit(
    model: &ChatModel,
    mut job: slm_runtime::engine::Job,
    timeout: Duration,
) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
    use slm_runtime::engine::SubmitError;
    job.deadline = Some(Instant::now() + timeout);
    let (tx, rx) = mpsc::unbounded_channel();
    model
        .engine
        .submit(job, Box::new(ChannelSink(tx)))
        .map_err(|e| match e {
            SubmitError::QueueFull { .. } => ApiError::busy(e.to_string()),
            SubmitError::Stopped => ApiError::unavailable(e.to_string()),
            _ => ApiError::bad(e.to_string()),
        })?;
    Ok(rx)
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completion,
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Result<Response, ApiError> {
    generate(state, body, Endpoint::Chat).await
}

async fn completions(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    generate(state, body, Endpoint::Completion).await
}

async fn generate(
    state: Arc<AppState>,
    body: Body,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(&state, body).await?;
    let req: api::GenRequest = api::parse_as(&bytes)?;
    let models = state.models()?;
    let model = models.chat(req.model.as_deref())?;
    let tok = model.tok.clone();
    let chat = endpoint == Endpoint::Chat;
    let prompt = if chat {
        api::chat_prompt(&req, &tok)?
    } else {
        api::completion_prompt(&req, &tok)?
    };
    // OpenAI's completions endpoint defaults to 16 tokens; chat to the rest of the context.
    let default_max = (!chat).then_some(16);
    let ctx = model.engine.config().ctx;
    let job = api::job(&req, prompt, ctx, chat, default_max)?;
    let rx = submit(model, job, state.config.timeout)?;
    let reply = Reply {
        id: format!(
            "{}-{:016x}",
            if chat { "chatcmpl" } else { "cmpl" },
            api::unique_u64()
        ),
        model: model.name.clone(),
        created: unix_now(),
        endpoint,
        tok,
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(reply.stream(rx, include_usage))
    } else {
        reply.whole(rx).await
    }
}

/// What one answer needs to shape its JSON.
struct Reply {
    id: String,
    model: String,
    created: u64,
    endpoint: Endpoint,
    tok: Arc<Tokenizer>,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "slm",
            "choices": choices,
        })
    }

    /// Log-probabilities in the endpoint's shape (completions count text offsets from
    /// `offset`), or null when none were asked for.
    fn logprobs(&self, lps: &[TokenLogprob], offset: usize) -> Option<Value> {
        (!lps.is_empty()).then(|| match self.endpoint {
            Endpoint::Chat => api::chat_logprobs(&self.tok, lps),
            Endpoint::Completion => api::completion_logprobs(&self.tok, lps, offset),
        })
    }

    /// The one choice of an answer: the whole message (`chunk` None), or a stream chunk's
    /// delta (`Some(first)`: the first names the role; the last, with `finish`, is empty).
    fn choice(
        &self,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<&str>,
        chunk: Option<bool>,
    ) -> Value {
        let mut c = json!({"index": 0, "logprobs": logprobs, "finish_reason": finish});
        match (self.endpoint, chunk) {
            (Endpoint::Completion, _) => c["text"] = json!(text),
            (Endpoint::Chat, None) => {
                c["message"] = json!({"role": "assistant", "content": text});
            }
            (Endpoint::Chat, Some(first)) => {
                let mut delta = match finish {
                    Some(_) => json!({}),
                    None => json!({ "content": text }),
                };
                if first {
                    delta["role"] = json!("assistant");
                }
                c["delta"] = delta;
            }
        }
        c
    }

    async fn whole(self, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Response, ApiError> {
        let mut text = String::new();
        let mut lps = Vec::new();
        loop {
            match rx.recv().await {
                Some(Event::Text { text: t, logprobs }) => {
                    text.push_str(&t);
                    lps.extend(logprobs);
                }
                Some(Event::Done(u)) => {
                    let logprobs = self.logprobs(&lps, 0);
                    let choice = self.choice(&text, logprobs, Some(u.finish.as_str()), None);
                    let mut body = self.envelope(false, json!([choice]));
                    body["usage"] = api::usage_json(&u);
                    return Ok(axum::Json(body).into_response());
                }
                Some(Event::Failed(e)) => return Err(ApiError::internal(e)),
                None => return Err(ApiError::internal("the engine dropped the request")),
            }
        }
    }

    /// Server-sent events: one chunk per piece of text, a last chunk with the finish reason,
    /// a usage chunk when asked, then `data: [DONE]`.
    fn stream(self, rx: mpsc::UnboundedReceiver<Event>, include_usage: bool) -> Response {
        use tokio_stream::StreamExt;
        let frame = |v: &Value| format!("data: {v}\n\n");
        let mut sent = 0usize;
        let mut first = true;
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |ev| {
            let out = match ev {
                Event::Text { text, logprobs } => {
                    if text.is_empty() && logprobs.is_empty() && !first {
                        String::new()
                    } else {
                        let lp = self.logprobs(&logprobs, sent);
                        sent += text.len();
                        let choice = self.choice(&text, lp, None, Some(first));
                        first = false;
                        frame(&self.envelope(true, json!([choice])))
                    }
                }
                Event::Done(u) => {
                    let choice = self.choice("", None, Some(u.finish.as_str()), Some(false));
                    let mut out = frame(&self.envelope(true, json!([choice])));
                    if include_usage {
                        let mut last = self.envelope(true, json!([]));
                        last["usage"] = api::usage_json(&u);
                        out.push_str(&frame(&last));
                    }
                    out.push_str("data: [DONE]\n\n");
                    out
                }
                Event::Failed(e) => {
                    let mut out = frame(&ApiError::internal(e).body());
                    out.push_str("data: [DONE]\n\n");
                    out
                }
            };
            Ok::<_, std::convert::Infallible>(Bytes::from(out))
        });
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(events))
            .expect("static headers")
    }
}

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    content: String,
    add_special: Option<bool>,
}

async fn tokenize(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let bytes = body_bytes(&state, body).await?;
    let r: TokenizeRequest = api::parse_as(&bytes)?;
    let m = state.models()?.chat(r.model.as_deref())?;
    let tokens = m
        .tok
        .encode(&r.content, r.add_special.unwrap_or(false))
        .map_err(|e| ApiError::bad(format!("tokenizer: {e}")))?;
    Ok(axum::Json(json!({ "tokens": tokens })).into_response())
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

async fn detokenize(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let bytes = body_bytes(&state, body).await?;
    let r: DetokenizeRequest = api::parse_as(&bytes)?;
    let m = state.models()?.chat(r.model.as_deref())?;
    api::check_token_ids(&r.tokens, &m.tok, "tokens")?;
    let content = m
        .tok
        .decode(&r.tokens, false)
        .map_err(|e| ApiError::bad(format!("tokenizer: {e}")))?;
    Ok(axum::Json(json!({ "content": content })).into_response())
}

async fn embeddings(State(state): State<Arc<AppState>>, body: Body) -> Result<Response, ApiError> {
    let bytes = body_bytes(&state, body).await?;
    let r: embed::EmbeddingRequest = api::parse_as(&bytes)?;
    let models = state.models()?;
    let model = models.embedder(r.model.as_deref())?;
    let out = embed::respond(model, r).await?;
    Ok(axum::Json(out).into_response())
}

mod embed;

/// A model file or folder loaded for serving, named as clients will ask for it.
pub fn model_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string());
    name.strip_suffix(".gguf")
        .map(str::to_string)
        .unwrap_or(name)
}

/// Loads the generative models and starts an engine for each.
pub fn load_chat(path: &Path, config: &ServeConfig) -> Result<ChatModel, String> {
    let m = slm_model::load(path, &candle_core::Device::Cpu)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    m.model
        .config
        .require_lm(&path.display().to_string())
        .map_err(|e| e.to_string())?;
    let tok = Tokenizer::for_model(&m.source).map_err(|e| format!("{}: {e}", path.display()))?;
    tok.check_fits(m.model.config.vocab_size, &m.source)
        .map_err(|e| e.to_string())?;
    let mut ec = EngineConfig::new(&m.model, config.parallel, config.ctx);
    ec.queue = config.queue;
    let tok = Arc::new(tok);
    let engine = Engine::start(Arc::new(m.model), tok.clone(), ec);
    Ok(ChatModel {
        name: model_name(path),
        engine,
        tok,
    })
}

/// Binds, then loads the models (the API answers 503 meanwhile), then serves until Ctrl-C.
/// `on_listen` gets the bound address (port 0 picks a free one).
pub fn run(
    config: ServeConfig,
    chat: Vec<PathBuf>,
    embed: Vec<PathBuf>,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the server's runtime: {e}"))?;
    rt.block_on(async move {
        let addr = format!("{}:{}", config.host, config.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let state = AppState::new(config);
        on_listen(local);
        let loader = {
            let state = state.clone();
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                let mut models = Models {
                    chat: Vec::new(),
                    embed: Vec::new(),
                };
                for p in &chat {
                    models.chat.push(load_chat(p, &state.config)?);
                    tracing::info!("loaded {}", p.display());
                }
                for p in &embed {
                    let e = SentenceEncoder::load(p).map_err(|e| e.to_string())?;
                    models.embed.push(Arc::new(e));
                    tracing::info!("loaded {}", p.display());
                }
                state.set_models(models);
                Ok(())
            })
        };
        let app = router(state);
        let server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .into_future(),
        );
        match loader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(format!("loading: {e}")),
        }
        match server.await {
            Ok(r) => r.map_err(|e| format!("server: {e}")),
            Err(e) => Err(format!("server: {e}")),
        }
    })
}
