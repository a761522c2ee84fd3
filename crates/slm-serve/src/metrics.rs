//! `/metrics` in Prometheus' text format, per model: tokens in and out, generation speed,
//! requests running, waiting and cancelled, and KV cache use.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::{ApiError, AppState};

pub async fn handler(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    if !state.config.metrics {
        return Err(ApiError::not_found(
            "metrics are off; start the server with --metrics",
        ));
    }
    let models = state.models()?;
    let mut out = String::new();
    let mut metric =
        |name: &str, kind: &str, help: &str, values: &mut dyn Iterator<Item = (String, f64)>| {
            let _ = writeln!(out, "# HELP slm_{name} {help}\n# TYPE slm_{name} {kind}");
            for (model, v) in values {
                let _ = writeln!(out, "slm_{name}{{model=\"{model}\"}} {v}");
            }
        };
    let stats = || {
        models
            .chat
            .iter()
            .map(|m| (m.name.clone(), m.engine.stats()))
    };
    let counter =
        |f: fn(&slm_runtime::engine::Stats) -> u64| stats().map(move |(n, s)| (n, f(s) as f64));
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens computed (not counting those copied from a shared prefix).",
        &mut counter(|s| s.prompt_tokens.load(Ordering::Relaxed)),
    );
    metric(
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens whose keys and values were copied from another sequence.",
        &mut counter(|s| s.cached_prompt_tokens.load(Ordering::Relaxed)),
    );
    metric(
        "tokens_predicted_total",
        "counter",
        "Tokens generated.",
        &mut counter(|s| s.generated_tokens.load(Ordering::Relaxed)),
    );
    metric(
        "requests_total",
        "counter",
        "Requests admitted to the batch.",
        &mut counter(|s| s.requests.load(Ordering::Relaxed)),
    );
    metric(
        "requests_cancelled_total",
        "counter",
        "Requests dropped because their client went away.",
        &mut counter(|s| s.cancelled.load(Ordering::Relaxed)),
    );
    metric(
        "decode_steps_total",
        "counter",
        "Batched forward passes.",
        &mut counter(|s| s.steps.load(Ordering::Relaxed)),
    );
    metric(
        "predicted_tokens_seconds",
        "gauge",
        "Generated tokens per second of generation time, all sequences together.",
        &mut stats().map(|(n, s)| {
            let ns = s.decode_ns.load(Ordering::Relaxed) as f64;
            let toks = s.generated_tokens.load(Ordering::Relaxed) as f64;
            (n, if ns > 0.0 { toks / (ns * 1e-9) } else { 0.0 })
        }),
    );
    metric(
        "requests_processing",
        "gauge",
        "Sequences in the batch.",
        &mut stats().map(|(n, s)| (n, s.running.load(Ordering::Relaxed) as f64)),
    );
    metric(
        "requests_deferred",
        "gauge",
        "Requests waiting for a place in the batch.",
        &mut stats().map(|(n, s)| (n, s.queued.load(Ordering::Relaxed) as f64)),
    );
    metric(
        "kv_cache_bytes",
        "gauge",
        "KV cache bytes reserved by running sequences and kept prefixes.",
        &mut stats().map(|(n, s)| (n, s.kv_used.load(Ordering::Relaxed) as f64)),
    );
    metric(
        "kv_cache_usage_ratio",
        "gauge",
        "KV cache bytes reserved over the budget.",
        &mut stats().map(|(n, s)| {
            let budget = s.kv_budget.load(Ordering::Relaxed).max(1) as f64;
            (n, s.kv_used.load(Ordering::Relaxed) as f64 / budget)
        }),
    );
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
