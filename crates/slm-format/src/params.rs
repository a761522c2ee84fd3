//! The one description of a Llama-family model's parameters: every tensor's role, Hugging
//! Face name, GGUF name, shape, whether it is a matrix, and whether weight decay applies.
//! Loaders, the trainer's flat layout, initialisation, checkpoints and writers all derive
//! from `Config::params`; nothing else lists the tensors.

use crate::config::{Config, Head};

/// What a tensor is in the model. Layer tensors carry their layer in `Param::layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    O,
    MlpNorm,
    Gate,
    Up,
    Down,
    Embedding,
    FinalNorm,
    /// The output projection when it is not tied to the embedding.
    Head,
    /// A classification head's weight (labels x hidden), in place of the output projection.
    Score,
    /// A token-classification head's bias (one per label).
    ScoreBias,
    /// A low-rank adapter's down projection A (rank x input) beside the projection named by
    /// `Param::target`, and its up projection B (output x rank).
    LoraA,
    LoraB,
}

/// A layer's roles, in the order `Config::params` lists them (q, k and v adjacent, then
/// their biases; gate and up adjacent: the trainer multiplies each group as one matrix).
const LAYER_ROLES: [Role; 12] = [
    Role::AttnNorm,
    Role::Q,
    Role::K,
    Role::V,
    Role::QBias,
    Role::KBias,
    Role::VBias,
    Role::O,
    Role::MlpNorm,
    Role::Gate,
    Role::Up,
    Role::Down,
];

impl Role {
    /// Hugging Face name (after `model.layers.N.` for layer roles) and llama.cpp's GGUF name
    /// (after `blk.N.`).
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Role::AttnNorm => ("input_layernorm.weight", "attn_norm.weight"),
            Role::Q => ("self_attn.q_proj.weight", "attn_q.weight"),
            Role::K => ("self_attn.k_proj.weight", "attn_k.weight"),
            Role::V => ("self_attn.v_proj.weight", "attn_v.weight"),
            Role::QBias => ("self_attn.q_proj.bias", "attn_q.bias"),
            Role::KBias => ("self_attn.k_proj.bias", "attn_k.bias"),
            Role::VBias => ("self_attn.v_proj.bias", "attn_v.bias"),
            Role::O => ("self_attn.o_proj.weight", "attn_output.weight"),
            Role::MlpNorm => ("post_attention_layernorm.weight", "ffn_norm.weight"),
            Role::Gate => ("mlp.gate_proj.weight", "ffn_gate.weight"),
            Role::Up => ("mlp.up_proj.weight", "ffn_up.weight"),
            Role::Down => ("mlp.down_proj.weight", "ffn_down.weight"),
            Role::Embedding => ("model.embed_tokens.weight", "token_embd.weight"),
            Role::FinalNorm => ("model.norm.weight", "output_norm.weight"),
            Role::Head => ("lm_head.weight", "output.weight"),
            // llama.cpp's classifier output (rerankers), LLM_TENSOR_CLS_OUT.
            Role::Score => ("score.weight", "cls.output.weight"),
            Role::ScoreBias => ("score.bias", "cls.output.bias"),
            // Named after their target (`Param::name`).
            Role::LoraA | Role::LoraB => ("", ""),
        }
    }

    /// The Hugging Face (safetensors, checkpoint) name of this role in `layer`.
    pub fn hf_name(self, layer: Option<usize>) -> String {
        let hf = self.names().0;
        match layer {
            Some(l) => format!("model.layers.{l}.{hf}"),
            None => hf.to_string(),
        }
    }

    /// llama.cpp's GGUF name of this role in `layer`.
    pub fn gguf_name(self, layer: Option<usize>) -> String {
        let g = self.names().1;
        match layer {
            Some(l) => format!("blk.{l}.{g}"),
            None => g.to_string(),
        }
    }

    fn in_layer(self) -> bool {
        !matches!(
            self,
            Role::Embedding | Role::FinalNorm | Role::Head | Role::Score | Role::ScoreBias
        )
    }

    pub fn is_norm(self) -> bool {
        matches!(self, Role::AttnNorm | Role::MlpNorm | Role::FinalNorm)
    }

    pub fn is_bias(self) -> bool {
        matches!(
            self,
            Role::QBias | Role::KBias | Role::VBias | Role::ScoreBias
        )
    }

    /// A weight matrix of a linear layer (not the embedding, a norm or a bias).
    pub fn is_linear(self) -> bool {
        matches!(
            self,
            Role::Q
                | Role::K
                | Role::V
                | Role::O
                | Role::Gate
                | Role::Up
                | Role::Down
                | Role::Head
                | Role::Score
        )
    }

    /// Whether AdamW decays it: the linear layers' matrices and adapters; not norms, biases
    /// or the embedding (as nanoGPT and most recipes do).
    pub fn decays(self) -> bool {
        self.is_linear() || matches!(self, Role::LoraA | Role::LoraB)
    }

    /// The projections a LoRA adapter may adapt, by PEFT's module names.
    pub const LORA_TARGETS: [(Role, &'static str); 7] = [
        (Role::Q, "q_proj"),
        (Role::K, "k_proj"),
        (Role::V, "v_proj"),
        (Role::O, "o_proj"),
        (Role::Gate, "gate_proj"),
        (Role::Up, "up_proj"),
        (Role::Down, "down_proj"),
    ];

    /// The projections that write into the residual stream (scaled down at initialisation).
    pub fn writes_residual(self) -> bool {
        matches!(self, Role::O | Role::Down)
    }
}

/// One tensor of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    pub role: Role,
    pub layer: Option<usize>,
    pub shape: Vec<usize>,
    /// The projection a LoRA tensor (`Role::LoraA`, `Role::LoraB`) adapts.
    pub target: Option<Role>,
}

impl Param {
    /// The Hugging Face (safetensors, checkpoint) name; an adapter's is PEFT's
    /// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`).
    pub fn name(&self) -> String {
        match (self.role, self.target) {
            (Role::LoraA | Role::LoraB, Some(t)) => {
                let base = t.hf_name(self.layer);
                let ab = if self.role == Role::LoraA { "A" } else { "B" };
                format!(
                    "base_model.model.{}.lora_{ab}.weight",
                    base.trim_end_matches(".weight")
                )
            }
            _ => self.role.hf_name(self.layer),
        }
    }

    /// llama.cpp's GGUF name; an adapter's is its LoRA GGUF's (`blk.N.attn_q.weight.lora_a`).
    pub fn gguf_name(&self) -> String {
        match (self.role, self.target) {
            (Role::LoraA | Role::LoraB, Some(t)) => {
                let ab = if self.role == Role::LoraA { "a" } else { "b" };
                format!("{}.lora_{ab}", t.gguf_name(self.layer))
            }
            _ => self.role.gguf_name(self.layer),
        }
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The role and layer a Hugging Face name stands for, if it is one of the model's tensors.
pub fn parse_hf_name(name: &str) -> Option<(Role, Option<usize>)> {
    let all = [
        Role::Embedding,
        Role::FinalNorm,
        Role::Head,
        Role::Score,
        Role::ScoreBias,
    ];
    if let Some(r) = all.into_iter().find(|r| r.names().0 == name) {
        return Some((r, None));
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let layer: usize = layer.parse().ok()?;
    let role = LAYER_ROLES.into_iter().find(|r| r.names().0 == rest)?;
    Some((role, Some(layer)))
}

/// Maps a Hugging Face Llama-family tensor name to its GGUF (llama.cpp) name.
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    let (role, layer) = parse_hf_name(hf)?;
    Some(role.gguf_name(layer))
}

impl Config {
    /// Every tensor of the model: each layer's (in `LAYER_ROLES` order, biases only with
    /// `attention_bias`), then the embedding, the final norm and the head: the output
    /// projection unless tied, or a classifier's score weight (and, per token, its bias).
    pub fn params(&self) -> Vec<Param> {
        let (h, f, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let shape = |role: Role| -> Option<Vec<usize>> {
            Some(match role {
                Role::AttnNorm | Role::MlpNorm | Role::FinalNorm => vec![h],
                Role::Q => vec![q, h],
                Role::K | Role::V => vec![kv, h],
                Role::QBias if self.attention_bias => vec![q],
                Role::KBias | Role::VBias if self.attention_bias => vec![kv],
                Role::QBias | Role::KBias | Role::VBias => return None,
                Role::O => vec![h, q],
                Role::Gate | Role::Up => vec![f, h],
                Role::Down => vec![h, f],
                Role::Embedding => vec![self.vocab_size, h],
                Role::Head if self.tie_word_embeddings || self.head != Head::Lm => return None,
                Role::Head => vec![self.vocab_size, h],
                Role::Score if self.head != Head::Lm => vec![self.head.labels().len(), h],
                Role::ScoreBias if matches!(self.head, Head::Token { .. }) => {
                    vec![self.head.labels().len()]
                }
                Role::Score | Role::ScoreBias | Role::LoraA | Role::LoraB => return None,
            })
        };
        let mut v = Vec::new();
        for l in 0..self.num_hidden_layers {
            for role in LAYER_ROLES {
                if let Some(shape) = shape(role) {
                    v.push(Param {
                        role,
                        layer: Some(l),
                        shape,
                        target: None,
                    });
                }
            }
        }
        for role in [
            Role::Embedding,
            Role::FinalNorm,
            Role::Head,
            Role::Score,
            Role::ScoreBias,
        ] {
            if let Some(shape) = shape(role) {
                v.push(Param {
                    role,
                    layer: None,
                    shape,
                    target: None,
                });
            }
        }
        debug_assert!(v.iter().all(|p| p.layer.is_some() == p.role.in_layer()));
        v
    }

    /// A LoRA adapter's tensors over this model: per layer, for each target in layer order,
    /// A (rank x the projection's input) then B (its output x rank).
    pub fn lora_params(&self, rank: usize, targets: &[Role]) -> Vec<Param> {
        let mut v = Vec::new();
        for p in self.params() {
            if p.layer.is_none() || !targets.contains(&p.role) {
                continue;
            }
            let (out, inp) = (p.shape[0], p.shape[1]);
            for (role, shape) in [
                (Role::LoraA, vec![rank, inp]),
                (Role::LoraB, vec![out, rank]),
            ] {
                v.push(Param {
                    role,
                    layer: p.layer,
                    shape,
                    target: Some(p.role),
                });
            }
        }
        v
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(Param::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_are_llama_cpps() {
        assert_eq!(
            hf_to_gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            hf_to_gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(),
            Some("blk.12.attn_output.weight")
        );
        assert_eq!(
            hf_to_gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            hf_to_gguf_name("model.layers.3.self_attn.k_proj.bias").as_deref(),
            Some("blk.3.attn_k.bias")
        );
        assert_eq!(hf_to_gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(hf_to_gguf_name("model.layers.+1.mlp.up_proj.weight"), None);
        assert_eq!(hf_to_gguf_name("model.layers.1.mlp.sideways.weight"), None);
    }

    #[test]
    fn every_name_parses_back_to_its_param() {
        let mut cfg = Config::from_hf_json(
            r#"{"model_type": "llama", "hidden_size": 8, "intermediate_size": 12,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                "vocab_size": 10, "max_position_embeddings": 16}"#,
            "config.json",
        )
        .unwrap();
        for (bias, tie) in [(false, true), (true, false)] {
            cfg.attention_bias = bias;
            cfg.tie_word_embeddings = tie;
            let params = cfg.params();
            let per_layer = if bias { 12 } else { 9 };
            assert_eq!(
                params.len(),
                cfg.num_hidden_layers * per_layer + 2 + usize::from(!tie)
            );
            for p in &params {
                assert_eq!(parse_hf_name(&p.name()), Some((p.role, p.layer)), "{p:?}");
            }
        }
    }
}
