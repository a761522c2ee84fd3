//! `/metrics` in Prometheus' text format, per model: tokens in and out, generation speed,
//! requests running, waiting and cancelled, and KV cache use.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use slm_runtime::engine::Stats;

use crate::{ApiError, AppState};

type Metric = (&'static str, &'static str, &'static str, fn(&Stats) -> f64);

fn count(a: &AtomicU64) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

fn level(a: &AtomicUsize) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

/// Name, type, help and value of each metric, reported per model.
const METRICS: &[Metric] = &[
    (
        "prompt_tokens_total",
        "counter",
        "Prompt tokens computed (not counting those copied from a shared prefix).",
        |s| count(&s.prompt_tokens),
    ),
    (
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens whose keys and values were copied from another sequence.",
        |s| count(&s.cached_prompt_tokens),
    ),
    (
        "tokens_predicted_total",
        "counter",
        "Tokens generated.",
        |s| count(&s.generated_tokens),
    ),
    (
        "requests_total",
        "counter",
        "Requests admitted to the batch.",
        |s| count(&s.requests),
    ),
    (
        "requests_cancelled_total",
        "counter",
        "Requests dropped because their client went away.",
        |s| count(&s.cancelled),
    ),
    (
        "decode_steps_total",
        "counter",
        "Batched forward passes.",
        |s| count(&s.steps),
    ),
    (
        "predicted_tokens_seconds",
        "gauge",
        "Generated tokens per second of generation time, all sequences together.",
        |s| {
            let ns = count(&s.decode_ns);
            if ns > 0.0 {
                count(&s.generated_tokens) / (ns * 1e-9)
            } else {
                0.0
            }
        },
    ),
    (
        "requests_processing",
        "gauge",
        "Sequences in the batch.",
        |s| level(&s.running),
    ),
    (
        "requests_deferred",
        "gauge",
        "Requests waiting for a place in the batch.",
        |s| level(&s.queued),
    ),
    (
        "kv_cache_bytes",
        "gauge",
        "KV cache bytes reserved by running sequences and kept prefixes.",
        |s| level(&s.kv_used),
    ),
    (
        "kv_cache_usage_ratio",
        "gauge",
        "KV cache bytes reserved over the budget.",
        |s| level(&s.kv_used) / level(&s.kv_budget).max(1.0),
    ),
];

pub async fn handler(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    if !state.config.metrics {
        return Err(ApiError::not_found(
            "metrics are off; start the server with --metrics",
        ));
    }
    let models = state.models()?;
    let mut out = String::new();
    for (name, kind, help, value) in METRICS {
        let _ = writeln!(out, "# HELP slm_{name} {help}\n# TYPE slm_{name} {kind}");
        for m in &models.chat {
            let v = value(m.engine.stats());
            let _ = writeln!(out, "slm_{name}{{model=\"{}\"}} {v}", m.name);
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
