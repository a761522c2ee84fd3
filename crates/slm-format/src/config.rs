//! One configuration for the Llama family (Llama, SmolLM, Qwen2, Mistral), read from a Hugging
//! Face `config.json` or from GGUF metadata. The differences between the members are switches
//! here, not separate model files.

use serde::{Deserialize, Serialize};

use crate::gguf::{GgufError, GgufFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

impl Arch {
    /// The transformers class prefix ("Llama" of "LlamaForCausalLM").
    pub fn hf_prefix(self) -> &'static str {
        match self {
            Arch::Llama => "Llama",
            Arch::Qwen2 => "Qwen2",
            Arch::Mistral => "Mistral",
        }
    }
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "llama",
        }
    }
}

/// Llama 3 "rope_scaling": long wavelengths are stretched by `factor`, short ones kept, with a
/// smooth ramp between.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// What reads the final hidden states. Each is a transformers class over the same base model
/// (`model.*` tensors): `Lm` is `...ForCausalLM`, the others label text with a `score` layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Head {
    /// Next-token logits: `lm_head`, or the embedding when tied.
    #[default]
    Lm,
    /// One label per sequence, from its last token's state (`...ForSequenceClassification`:
    /// `score.weight`, no bias). `pad_token_id` marks padding, which transformers skips to
    /// find each row's last token.
    Sequence {
        labels: Vec<String>,
        pad_token_id: Option<u32>,
    },
    /// One label per token (`...ForTokenClassification`: `score.weight` and `score.bias`).
    /// `echo` (config.json's `slm_echo`): the words are fed twice and each word's label read
    /// at its first token in the second copy, which has seen the whole sentence through
    /// causal attention ("echo embeddings", Springer et al. 2024). transformers runs the same
    /// network; only the input is doubled.
    Token { labels: Vec<String>, echo: bool },
}

impl Head {
    /// The labels of a classification head, in id order (none for `Lm`).
    pub fn labels(&self) -> &[String] {
        match self {
            Head::Lm => &[],
            Head::Sequence { labels, .. } | Head::Token { labels, .. } => labels,
        }
    }

    /// The transformers class suffix (`ForCausalLM`, ...).
    fn class_suffix(&self) -> &'static str {
        match self {
            Head::Lm => "ForCausalLM",
            Head::Sequence { .. } => "ForSequenceClassification",
            Head::Token { .. } => "ForTokenClassification",
        }
    }

    /// How a user names it: "language-model", "sequence classification", ...
    pub fn describe(&self) -> &'static str {
        match self {
            Head::Lm => "language-model head",
            Head::Sequence { .. } => "sequence-classification head",
            Head::Token { .. } => "token-classification head",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3Scaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub head: Head,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{file}: {what}")]
    Invalid { file: String, what: String },
}

fn invalid(file: &str, what: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_string(),
        what: what.into(),
    }
}

/// The subset of a Hugging Face config.json that the Llama family uses.
#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
    id2label: Option<std::collections::BTreeMap<String, String>>,
    pad_token_id: Option<serde_json::Value>,
    slm_echo: Option<bool>,
}

/// An id too large for u32 becomes u32::MAX, which `validate` then refuses as out of range.
fn saturate_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn first_id(v: &Option<serde_json::Value>) -> Option<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(saturate_u32),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|n| n.as_u64()).map(saturate_u32),
        _ => None,
    }
}

/// The head an `architectures` class names, its labels from `id2label` (ids 0..n, each once).
fn head_from_hf(
    class: &str,
    id2label: Option<&std::collections::BTreeMap<String, String>>,
    pad_token_id: Option<u32>,
    echo: Option<bool>,
) -> Result<Head, String> {
    let sequence = class.ends_with("ForSequenceClassification");
    let token = class.ends_with("ForTokenClassification");
    let echo = echo.unwrap_or(false);
    if echo && !token {
        return Err(format!(
            "slm_echo is true, but only a token-classification head reads an echoed input ({class})"
        ));
    }
    if !sequence && !token {
        return Ok(Head::Lm);
    }
    let map = id2label.ok_or_else(|| format!("{class} needs id2label (its labels)"))?;
    crate::limits::check(
        "the number of labels (id2label)",
        map.len(),
        crate::limits::MAX_LABELS,
    )?;
    let mut labels = vec![None; map.len()];
    for (id, label) in map {
        let i = id
            .parse::<usize>()
            .ok()
            .filter(|&i| i < labels.len())
            .ok_or_else(|| {
                format!(
                    "id2label has key {id:?}; expected the ids 0 to {}",
                    labels.len() - 1
                )
            })?;
        labels[i] = Some(label.clone());
    }
    let labels: Vec<String> = labels
        .into_iter()
        .map(|l| l.expect("each id once"))
        .collect();
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = labels.iter().find(|l| !seen.insert(l.as_str())) {
        return Err(format!("id2label names {dup:?} twice"));
    }
    Ok(if sequence {
        Head::Sequence {
            labels,
            pad_token_id,
        }
    } else {
        Head::Token { labels, echo }
    })
}

impl Config {
    pub fn from_hf_json(text: &str, file: &str) -> Result<Self, ConfigError> {
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| invalid(file, e.to_string()))?;
        let ty = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_default();
        let class = hf
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .unwrap_or_default();
        let base = [
            "ForCausalLM",
            "ForSequenceClassification",
            "ForTokenClassification",
        ]
        .iter()
        .find_map(|s| ty.strip_suffix(s))
        .unwrap_or(&ty);
        let arch = match base {
            "llama" | "Llama" => Arch::Llama,
            "qwen2" | "Qwen2" => Arch::Qwen2,
            "mistral" | "Mistral" => Arch::Mistral,
            other => {
                return Err(invalid(
                    file,
                    format!(
                        "model_type '{other}' is not supported; supported: llama, qwen2, mistral"
                    ),
                ))
            }
        };
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(invalid(
                    file,
                    format!("hidden_act '{act}' is not supported (expected silu)"),
                ));
            }
        }
        let rope_scaling = match &hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let ty = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                match ty {
                    "llama3" => Some(
                        serde_json::from_value::<Llama3Scaling>(v.clone())
                            .map_err(|e| invalid(file, format!("rope_scaling: {e}")))?,
                    ),
                    "default" => None,
                    other => {
                        return Err(invalid(
                            file,
                            format!(
                                "rope_scaling type '{other}' is not supported (expected llama3)"
                            ),
                        ))
                    }
                }
            }
        };
        let heads = hf.num_attention_heads;
        if heads == 0 || !hf.hidden_size.is_multiple_of(heads) && hf.head_dim.is_none() {
            return Err(invalid(
                file,
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {heads}",
                    hf.hidden_size
                ),
            ));
        }
        let cfg = Config {
            arch,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / heads),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            attention_bias: hf.attention_bias.unwrap_or(arch == Arch::Qwen2),
            bos_token_id: first_id(&hf.bos_token_id),
            eos_token_id: first_id(&hf.eos_token_id),
            head: head_from_hf(
                &class,
                hf.id2label.as_ref(),
                first_id(&hf.pad_token_id),
                hf.slm_echo,
            )
            .map_err(|what| invalid(file, what))?,
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Reads the architecture from GGUF metadata. `tie_word_embeddings` follows from whether the
    /// file carries a separate `output.weight`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ConfigError> {
        let file = g.path().display().to_string();
        let arch_name = g.require_str("general.architecture")?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(invalid(
                    &file,
                    format!("general.architecture '{other}' is not supported; supported: llama, qwen2 (Mistral GGUFs use llama)"),
                ))
            }
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let as_usize = |v: u64, key: &str| {
            usize::try_from(v).map_err(|_| invalid(&file, format!("{key} = {v} is too large")))
        };
        let hidden = as_usize(g.require_u64(&k("embedding_length"))?, "embedding_length")?;
        let heads = as_usize(g.require_u64(&k("attention.head_count"))?, "head_count")?;
        let kv_heads = match g.get_u64(&k("attention.head_count_kv"))? {
            Some(v) => as_usize(v, "head_count_kv")?,
            None => heads,
        };
        if heads == 0 {
            return Err(invalid(
                &file,
                format!("{} is 0", k("attention.head_count")),
            ));
        }
        let head_dim = match g.get_u64(&k("attention.key_length"))? {
            Some(v) => as_usize(v, "key_length")?,
            None if hidden.is_multiple_of(heads) => hidden / heads,
            None => {
                return Err(invalid(
                    &file,
                    format!(
                    "{} {hidden} is not divisible by {} {heads} (and no {} gives the head width)",
                    k("embedding_length"),
                    k("attention.head_count"),
                    k("attention.key_length")
                ),
                ))
            }
        };
        // slm rotates every dimension of a head; a partial rotation would compute something
        // else without a word.
        if let Some(n) = g.get_u64(&k("rope.dimension_count"))? {
            if n != head_dim as u64 {
                return Err(invalid(
                    &file,
                    format!(
                        "{} = {n}: slm rotates whole heads, so it must equal the head width {head_dim}",
                        k("rope.dimension_count")
                    ),
                ));
            }
        }
        let vocab_size = match g.get_u64(&k("vocab_size"))? {
            Some(v) => as_usize(v, "vocab_size")?,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|t| t.as_array())
                .map(|a| a.len())
                .or_else(|| g.tensor_info("token_embd.weight").map(|t| t.dims[0]))
                .ok_or_else(|| invalid(&file, "cannot determine the vocabulary size"))?,
        };
        let rope_scaling = match g.get_str(&k("rope.scaling.type"))? {
            None | Some("none") | Some("linear")
                if g.get_f64(&k("rope.scaling.factor"))?.unwrap_or(1.0) == 1.0 =>
            {
                None
            }
            // llama3-style scaling is carried in GGUF as the `rope_freqs.weight` tensor, which
            // the model reads directly.
            _ if g.tensor_info("rope_freqs.weight").is_some() => None,
            Some(other) => {
                return Err(invalid(
                    &file,
                    format!("{} '{other}' is not supported", k("rope.scaling.type")),
                ))
            }
            None => {
                return Err(invalid(
                    &file,
                    format!(
                        "{} without a scaling type is not supported",
                        k("rope.scaling.factor")
                    ),
                ))
            }
        };
        let cfg = Config {
            arch,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: as_usize(
                g.require_u64(&k("feed_forward_length"))?,
                "feed_forward_length",
            )?,
            num_hidden_layers: as_usize(g.require_u64(&k("block_count"))?, "block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: g
                .get_f64(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: g.get_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: match g.get_u64(&k("context_length"))? {
                Some(v) => as_usize(v, "context_length")?,
                None => 2048,
            },
            tie_word_embeddings: g.tensor_info("output.weight").is_none(),
            attention_bias: g.tensor_info("blk.0.attn_q.bias").is_some(),
            bos_token_id: g.get_u64("tokenizer.ggml.bos_token_id")?.map(saturate_u32),
            eos_token_id: g.get_u64("tokenizer.ggml.eos_token_id")?.map(saturate_u32),
            head: Head::Lm,
        };
        cfg.validate(&file)?;
        Ok(cfg)
    }

    /// Every field within its meaning and within slm's limits (`crate::limits`), checked before
    /// anything is sized from it; the error names `file`, the field and the value.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        use crate::limits::*;
        let sizes = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_HIDDEN),
            ("intermediate_size", self.intermediate_size, MAX_FFN),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_CONTEXT,
            ),
        ];
        for (field, value, max) in sizes {
            check(field, value, max).map_err(|what| invalid(file, what))?;
        }
        let pad = match self.head {
            Head::Sequence { pad_token_id, .. } => pad_token_id,
            _ => None,
        };
        let ids = [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", pad),
        ];
        let n_labels = self.head.labels().len();
        let checks: [(bool, String); 6] = [
            (
                self.head == Head::Lm || (2..=MAX_LABELS).contains(&n_labels),
                format!(
                    "a {} with {n_labels} labels; expected 2 to {MAX_LABELS}",
                    self.head.describe()
                ),
            ),
            (
                self.num_attention_heads
                    .is_multiple_of(self.num_key_value_heads),
                format!(
                    "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ),
            (
                self.head_dim.is_multiple_of(2),
                format!(
                    "head_dim {} must be even (RoPE rotates pairs)",
                    self.head_dim
                ),
            ),
            (
                self.rope_theta.is_finite() && self.rope_theta > 1.0,
                format!(
                    "rope_theta {} must be a finite number above 1",
                    self.rope_theta
                ),
            ),
            (
                self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0,
                format!(
                    "rms_norm_eps {} must be a finite number in (0, 1)",
                    self.rms_norm_eps
                ),
            ),
            (
                ids.iter()
                    .all(|(_, id)| id.is_none_or(|id| (id as usize) < self.vocab_size)),
                ids.iter()
                    .filter_map(|(k, id)| id.map(|id| format!("{k} {id}")))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + &format!(
                        ": a special token id must be below vocab_size {}",
                        self.vocab_size
                    ),
            ),
        ];
        for (ok, what) in checks {
            if !ok {
                return Err(invalid(file, what));
            }
        }
        if let Some(s) = &self.rope_scaling {
            let ok = [s.factor, s.low_freq_factor, s.high_freq_factor]
                .iter()
                .all(|x| x.is_finite() && *x > 0.0)
                && s.high_freq_factor > s.low_freq_factor
                && s.original_max_position_embeddings > 0;
            if !ok {
                return Err(invalid(
                    file,
                    format!(
                        "rope_scaling {s:?}: factors must be finite and positive, \
                         high_freq_factor above low_freq_factor, original_max_position_embeddings above 0"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// An error unless the model predicts tokens: a classifier labels text (`slm predict`,
    /// `slm eval --task classify:` or `tag:`) and cannot generate or score continuations.
    pub fn require_lm(&self, file: &str) -> Result<(), ConfigError> {
        match self.head {
            Head::Lm => Ok(()),
            _ => Err(invalid(
                file,
                format!(
                    "the model has a {} (labels {:?}); it labels text (slm predict, slm eval \
                     --task classify: or tag:) rather than predicting tokens",
                    self.head.describe(),
                    self.head.labels()
                ),
            )),
        }
    }

    /// The Hugging Face config.json for this configuration.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [format!("{}{}", self.arch.hf_prefix(), self.head.class_suffix())],
            "model_type": match self.arch { Arch::Llama => "llama", Arch::Qwen2 => "qwen2", Arch::Mistral => "mistral" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "torch_dtype": "float32",
        });
        if let Some(s) = &self.rope_scaling {
            let mut rs = serde_json::to_value(s).expect("plain struct");
            rs["rope_type"] = "llama3".into();
            v["rope_scaling"] = rs;
        }
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = b.into();
        }
        if let Some(e) = self.eos_token_id {
            v["eos_token_id"] = e.into();
        }
        let labels = self.head.labels();
        if !labels.is_empty() {
            let id2label: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l.clone().into()))
                .collect();
            let label2id: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), i.into()))
                .collect();
            v["id2label"] = id2label.into();
            v["label2id"] = label2id.into();
            v["num_labels"] = labels.len().into();
        }
        match self.head {
            Head::Sequence {
                pad_token_id: Some(p),
                ..
            } => v["pad_token_id"] = p.into(),
            Head::Token { echo: true, .. } => v["slm_echo"] = true.into(),
            _ => {}
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":49152,
      "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
      "num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000,"max_position_embeddings":8192,
      "tie_word_embeddings":true,"hidden_act":"silu","bos_token_id":1,"eos_token_id":2}"#;

    #[test]
    fn smollm_config_counts_135m_parameters() {
        let c = Config::from_hf_json(SMOLLM, "config.json").unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_params(), 134_515_008);
        let back = Config::from_hf_json(&c.to_hf_json().to_string(), "x").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn an_echoed_token_head_round_trips_and_only_a_token_head_echoes() {
        let mut c = Config::from_hf_json(SMOLLM, "config.json").unwrap();
        c.head = Head::Token {
            labels: vec!["O".into(), "B-x".into()],
            echo: true,
        };
        let json = c.to_hf_json();
        assert_eq!(json["slm_echo"], true);
        assert_eq!(Config::from_hf_json(&json.to_string(), "x").unwrap(), c);
        let mut seq = json.clone();
        seq["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]);
        let err = Config::from_hf_json(&seq.to_string(), "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("slm_echo") && err.contains("config.json"),
            "{err}"
        );
    }

    #[test]
    fn unknown_model_type_is_named() {
        let bad = SMOLLM.replace("\"llama\"", "\"gpt_neox\"");
        let err = Config::from_hf_json(&bad, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gpt_neox") && err.contains("config.json"),
            "{err}"
        );
    }
}
