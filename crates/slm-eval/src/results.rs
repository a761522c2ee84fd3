//! The results file (`slm eval --out results.json`): what was evaluated, on which model and
//! where it came from, every metric with its standard error, and how long it took.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use slm_model::{LoadedModel, ModelSource};

use crate::metrics::Metric;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub slm_version: String,
    /// When the evaluation finished (RFC 3339, UTC).
    pub created: String,
    pub model: ModelInfo,
    pub threads: usize,
    pub tasks: Vec<TaskResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub path: String,
    /// "gguf" or "hf".
    pub format: String,
    pub parameters: usize,
    /// Storage types of the weights, e.g. "Q4_1 x169, F32 x61", or the folder's dtype.
    pub weights: String,
    /// Where the model came from: slm.json of a folder slm trained (recipe, data, parent,
    /// tokens seen), or the GGUF file's general.* metadata.
    pub lineage: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task's name (the file's stem, or the suite's name for it).
    pub name: String,
    /// "choice", "classify", "tag" or "perplexity".
    pub kind: String,
    pub file: String,
    pub file_sha256: String,
    /// Documents scored (windows, for perplexity).
    pub n: usize,
    pub shots: usize,
    pub limit: Option<usize>,
    /// The metric this task is usually reported by.
    pub primary: String,
    pub metrics: BTreeMap<String, Metric>,
    /// Tokens run through the model.
    pub tokens: usize,
    pub seconds: f64,
    /// "ggml": the model's own kernels, llama.cpp's arithmetic (8-bit activations for
    /// quantized weights). Files written before it was the only path may say "f32" (weights
    /// widened to f32).
    pub arithmetic: String,
    /// Labels of a classification task, in option order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// A classifier head's counts: rows the gold label, columns the predicted one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
}

impl Results {
    pub fn new(model: ModelInfo, threads: usize, tasks: Vec<TaskResult>) -> Self {
        Self {
            slm_version: env!("CARGO_PKG_VERSION").to_string(),
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            model,
            threads,
            tasks,
        }
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// The model's identity and lineage for a results file.
pub fn model_info(m: &LoadedModel) -> ModelInfo {
    let path = m.source.path();
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parameters = m.model.config.num_params();
    match &m.source {
        ModelSource::Gguf {
            metadata,
            tensor_types,
            ..
        } => {
            let lineage: serde_json::Map<String, serde_json::Value> = metadata
                .iter()
                .filter(|(k, _)| k.starts_with("general."))
                .map(|(k, v)| (k.clone(), gguf_json(v)))
                .collect();
            let name = metadata
                .get("general.name")
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .unwrap_or(stem);
            ModelInfo {
                name,
                path: path.display().to_string(),
                format: "gguf".into(),
                parameters,
                weights: tensor_types
                    .iter()
                    .map(|(t, n)| format!("{t} x{n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                lineage: lineage.into(),
            }
        }
        ModelSource::HfFolder { dir } => {
            let read = |f: &str| -> Option<serde_json::Value> {
                serde_json::from_str(&std::fs::read_to_string(dir.join(f)).ok()?).ok()
            };
            let config = read("config.json").unwrap_or_default();
            let name = config
                .get("_name_or_path")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| {
                    dir.file_name()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                });
            ModelInfo {
                name,
                path: dir.display().to_string(),
                format: "hf".into(),
                parameters,
                weights: config
                    .get("torch_dtype")
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown")
                    .to_string(),
                lineage: read("slm.json").unwrap_or_default(),
            }
        }
    }
}

fn gguf_json(v: &slm_model::gguf::Value) -> serde_json::Value {
    if let Some(s) = v.as_str() {
        return s.into();
    }
    if let Some(b) = v.as_bool() {
        return b.into();
    }
    if let Some(i) = v.as_i64() {
        return i.into();
    }
    if let Some(f) = v.as_f64() {
        return f.into();
    }
    match v.as_array() {
        // Long arrays (a tokenizer's vocabulary) are not lineage; say how long they are.
        Some(items) if items.len() <= 64 => items.iter().map(gguf_json).collect(),
        _ => v.summary().into(),
    }
}
