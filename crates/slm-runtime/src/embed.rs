//! Sentence embeddings from a sentence-transformers folder (a BERT encoder such as
//! all-MiniLM-L6-v2), computed as sentence-transformers computes them: the tokenizer's
//! encoding truncated to `max_seq_length`, the encoder (candle-transformers' BERT), the
//! pooling its `1_Pooling/config.json` names (mean over real tokens, CLS or max), then unit
//! length when `modules.json` lists a Normalize module.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};
use slm_model::limits;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("{file}: {what}")]
    File { file: PathBuf, what: String },
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
}

pub struct SentenceEncoder {
    /// The folder's name, as clients ask for the model.
    pub name: String,
    pub dim: usize,
    pub max_tokens: usize,
    model: BertModel,
    tok: tokenizers::Tokenizer,
    pooling: Pooling,
    normalize: bool,
    device: Device,
}

/// Texts encoded together (padded to the longest of them).
const BATCH: usize = 16;

fn read_json(path: &Path) -> Result<serde_json::Value, EmbedError> {
    let bad = |what: String| EmbedError::File {
        file: path.to_path_buf(),
        what,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))
}

impl SentenceEncoder {
    pub fn load(dir: &Path) -> Result<Self, EmbedError> {
        let bad = |file: &Path, what: String| EmbedError::File {
            file: file.to_path_buf(),
            what,
        };
        let cfg_path = dir.join("config.json");
        let cfg_json = read_json(&cfg_path)?;
        if cfg_json.get("model_type").and_then(|t| t.as_str()) != Some("bert") {
            return Err(bad(
                &cfg_path,
                "model_type is not \"bert\": only BERT sentence encoders embed".into(),
            ));
        }
        let config: Config = serde_json::from_value(cfg_json.clone())
            .map_err(|e| bad(&cfg_path, format!("not a BERT config: {e}")))?;
        for (field, v, max) in [
            ("hidden_size", config.hidden_size, limits::MAX_HIDDEN),
            (
                "num_hidden_layers",
                config.num_hidden_layers,
                limits::MAX_LAYERS,
            ),
            (
                "num_attention_heads",
                config.num_attention_heads,
                limits::MAX_HEADS,
            ),
            (
                "intermediate_size",
                config.intermediate_size,
                limits::MAX_FFN,
            ),
            ("vocab_size", config.vocab_size, limits::MAX_VOCAB),
            (
                "max_position_embeddings",
                config.max_position_embeddings,
                limits::MAX_CONTEXT,
            ),
        ] {
            limits::check(field, v, max).map_err(|e| bad(&cfg_path, e))?;
        }
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(bad(
                &cfg_path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    config.hidden_size, config.num_attention_heads
                ),
            ));
        }
        // sentence-transformers' modules: pooling from 1_Pooling, Normalize when listed.
        let modules = read_json(&dir.join("modules.json")).ok();
        let normalize = modules
            .as_ref()
            .and_then(|m| m.as_array())
            .is_some_and(|m| {
                m.iter().any(|x| {
                    x.get("type").and_then(|t| t.as_str())
                        == Some("sentence_transformers.models.Normalize")
                })
            });
        let pool_path = dir.join("1_Pooling/config.json");
        let pooling = match read_json(&pool_path) {
            Err(_) => Pooling::Mean,
            Ok(p) => {
                let on = |k: &str| p.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
                if on("pooling_mode_mean_tokens") {
                    Pooling::Mean
                } else if on("pooling_mode_cls_token") {
                    Pooling::Cls
                } else if on("pooling_mode_max_tokens") {
                    Pooling::Max
                } else {
                    return Err(bad(
                        &pool_path,
                        "no pooling mode slm supports (mean, cls or max tokens)".into(),
                    ));
                }
            }
        };
        let max_seq = read_json(&dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|c| c.get("max_seq_length").and_then(|v| v.as_u64()))
            .map_or(config.max_position_embeddings, |m| m as usize)
            .min(config.max_position_embeddings);
        let tok_path = dir.join("tokenizer.json");
        let mut tok = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| bad(&tok_path, e.to_string()))?;
        tok.with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_seq,
            ..Default::default()
        }))
        .map_err(|e| bad(&tok_path, e.to_string()))?;
        tok.with_padding(None);
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(bad(&weights, "missing".into()));
        }
        let device = Device::Cpu;
        // SAFETY: a read-only map of a file we do not modify, as slm_model::load maps them.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device)
        }
        .map_err(|e| bad(&weights, e.to_string()))?;
        let model = BertModel::load(vb, &config).map_err(|e| bad(&weights, e.to_string()))?;
        let name = dir
            .file_name()
            .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into());
        Ok(Self {
            name,
            dim: config.hidden_size,
            max_tokens: max_seq,
            model,
            tok,
            pooling,
            normalize,
            device,
        })
    }

    /// Token ids of `text` as the encoder sees it (special tokens added, truncated).
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// One embedding per text, in order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(BATCH) {
            let ids = batch
                .iter()
                .map(|t| self.tokens(t))
                .collect::<Result<Vec<_>, _>>()?;
            out.extend(self.embed_ids(&ids)?);
        }
        Ok(out)
    }

    fn embed_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let len = ids.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let n = ids.len();
        let mut flat = vec![0u32; n * len];
        let mut mask = vec![0f32; n * len];
        for (i, row) in ids.iter().enumerate() {
            flat[i * len..i * len + row.len()].copy_from_slice(row);
            mask[i * len..i * len + row.len()].fill(1.0);
        }
        let input = Tensor::from_vec(flat, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let types = input.zeros_like()?;
        let hidden = self.model.forward(&input, &types, Some(&mask))?; // (n, len, dim)
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                sum.broadcast_div(&count)?
            }
            Pooling::Max => {
                // Padding may not win the max: it is pushed far below any real value.
                let m = mask.unsqueeze(2)?;
                let pad = ((m.ones_like()? - &m)? * -1e9)?;
                hidden.broadcast_add(&pad)?.max(1)?
            }
        };
        let pooled = if self.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let p = d.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        d
    }

    const BERT: &str = r#"{"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
        "hidden_act": "gelu", "max_position_embeddings": 16, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0, "initializer_range": 0.02,
        "pad_token_id": 0, "position_embedding_type": "absolute", "use_cache": false,
        "classifier_dropout": null}"#;

    #[test]
    fn folders_that_are_not_sentence_encoders_are_refused_by_name() {
        let err = |d: &tempfile::TempDir| match SentenceEncoder::load(d.path()) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        };
        let e = err(&folder(&[]));
        assert!(
            e.contains("config.json") && e.contains("cannot read"),
            "{e}"
        );
        let e = err(&folder(&[("config.json", r#"{"model_type": "llama"}"#)]));
        assert!(e.contains("only BERT sentence encoders"), "{e}");
        let e = err(&folder(&[("config.json", r#"{"model_type": "bert"}"#)]));
        assert!(e.contains("not a BERT config"), "{e}");
        let huge = BERT.replace("\"hidden_size\": 8", "\"hidden_size\": 99999999");
        let e = err(&folder(&[("config.json", &huge)]));
        assert!(e.contains("hidden_size") && e.contains("limit"), "{e}");
        let odd = BERT.replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 3");
        let e = err(&folder(&[("config.json", &odd)]));
        assert!(e.contains("not a multiple of num_attention_heads 3"), "{e}");
        let e = err(&folder(&[
            ("config.json", BERT),
            (
                "1_Pooling/config.json",
                r#"{"pooling_mode_weightedmean_tokens": true}"#,
            ),
        ]));
        assert!(e.contains("no pooling mode slm supports"), "{e}");
        let e = err(&folder(&[("config.json", BERT)]));
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
