//! The model a fine-tuning run starts from (`model.parent`): a Hugging Face folder, or a GGUF
//! file. Its configuration, tokenizer (with tokenizer.json's bytes, which shards are keyed
//! to) and weights, widened to f32 in Hugging Face's layout; a LoRA run over a GGUF file keeps
//! the projections the file stores in a block type in their blocks (`blocks`), so the frozen
//! base takes the file's size in memory, not four bytes a weight.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use slm_model::params::Role;
use slm_model::{Config, GgufFile, ModelSource};

use crate::run::{Result, TrainError};
use crate::trainer::BlockBase;

pub struct Parent {
    pub path: PathBuf,
    /// The parent's own configuration.
    pub cfg: Config,
    pub tokenizer: slm_tokenizer::Tokenizer,
    /// tokenizer.json: the folder's bytes, or the GGUF's vocabulary serialized.
    pub tokenizer_json: Vec<u8>,
    /// tokenizer_config.json's settings (the chat template among them).
    pub tokenizer_config: serde_json::Value,
    gguf: Option<GgufFile>,
}

fn setup(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Setup(format!("{}: {e}", path.display()))
}

/// An error that names its file already (the GGUF reader's, the configuration's, the
/// tokenizer's).
fn named(e: impl std::fmt::Display) -> TrainError {
    TrainError::Setup(e.to_string())
}

/// The configuration of the model at `path` (a folder's config.json, or a GGUF's metadata).
pub fn config_of(path: &Path) -> Result<Config> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|err| TrainError::Io {
            path: cfg_path.clone(),
            err,
        })?;
        Config::from_hf_json(&text, &cfg_path.display().to_string()).map_err(named)
    } else {
        let file = GgufFile::open(path).map_err(named)?;
        Config::from_gguf(&file).map_err(named)
    }
}

impl Parent {
    pub fn open(path: &Path) -> Result<Self> {
        // A GGUF file is parsed once: its source (tokenizer metadata) is made from the open file.
        let gguf = if path.is_dir() {
            None
        } else {
            Some(GgufFile::open(path).map_err(named)?)
        };
        let source = match &gguf {
            Some(file) => ModelSource::of_gguf(file),
            None => ModelSource::HfFolder {
                dir: path.to_path_buf(),
            },
        };
        let tokenizer = slm_tokenizer::Tokenizer::for_model(&source).map_err(named)?;
        let Some(file) = gguf else {
            let read = |name: &str| {
                let p = path.join(name);
                std::fs::read(&p).map_err(|err| TrainError::Io { path: p, err })
            };
            let cfg = config_of(path)?;
            let tokenizer_config = match read("tokenizer_config.json") {
                Ok(bytes) => serde_json::from_slice(&bytes)
                    .map_err(|e| setup(&path.join("tokenizer_config.json"), e))?,
                Err(_) => tokenizer.config_json(cfg.max_position_embeddings),
            };
            return Ok(Self {
                path: path.to_path_buf(),
                tokenizer_json: read("tokenizer.json")?,
                tokenizer_config,
                cfg,
                tokenizer,
                gguf: None,
            });
        };
        let cfg = Config::from_gguf(&file).map_err(named)?;
        // llama3 scaling arrives as per-pair divisors the trainer's RoPE does not take (nor
        // config.json, so `slm export` refuses it too).
        if file.tensor_info("rope_freqs.weight").is_some() {
            return Err(setup(
                path,
                "rope scaling stored as rope_freqs.weight: training does not apply it yet; \
                 fine-tune the model's Hugging Face folder instead",
            ));
        }
        tokenizer
            .check_fits(cfg.vocab_size, &source)
            .map_err(named)?;
        let tokenizer_json = tokenizer
            .inner
            .to_string(false)
            .map_err(|e| setup(path, format!("serializing the tokenizer: {e}")))?
            .into_bytes();
        Ok(Self {
            path: path.to_path_buf(),
            tokenizer_config: tokenizer.config_json(cfg.max_position_embeddings),
            cfg,
            tokenizer,
            tokenizer_json,
            gguf: Some(file),
        })
    }

    /// The projections of `cfg` (the run's configuration: the parent's layers) a LoRA run
    /// keeps in the GGUF's blocks: every fused projection (q|k|v, o, gate|up, down) whose
    /// parts the file stores in a type slm's block kernels take. None for a folder.
    pub fn blocks(&self, cfg: &Config) -> Result<BlockBase> {
        let Some(file) = &self.gguf else {
            return Ok(BlockBase::new());
        };
        let params = cfg.params();
        let mut base = HashMap::new();
        for l in 0..cfg.num_hidden_layers {
            for group in crate::trainer::FUSED {
                let mut held = Vec::new();
                for &role in group {
                    let p = params
                        .iter()
                        .find(|p| p.role == role && p.layer == Some(l))
                        .expect("Config::params lists every projection");
                    if let Some(m) = slm_model::hf_layout::hf_blocks(file, cfg, p)? {
                        held.push((role, m));
                    }
                }
                if held.len() == group.len() {
                    base.extend(held.into_iter().map(|(role, m)| ((l, role), m)));
                }
            }
        }
        Ok(base)
    }

    /// The parent's tensors whose Hugging Face names `wanted` selects, in f32 (the GGUF's
    /// widened and in Hugging Face's layout).
    pub fn weights(&self, wanted: impl Fn(&str) -> bool) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        match &self.gguf {
            Some(file) => {
                for spec in self.cfg.params().iter().filter(|p| wanted(&p.name())) {
                    let v = slm_model::hf_layout::hf_values(file, &self.cfg, spec)?;
                    out.insert(
                        spec.name(),
                        Tensor::from_vec(v, spec.shape.as_slice(), &Device::Cpu)?,
                    );
                }
            }
            None => {
                let files = slm_model::safetensors_files(&self.path)
                    .map_err(|e| TrainError::Setup(e.to_string()))?;
                for f in &files {
                    for (name, t) in candle_core::safetensors::load(f, &Device::Cpu)? {
                        if wanted(&name) {
                            out.insert(name, t.to_dtype(DType::F32)?);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Sets `vars` to the parent's weights, after checking that the run's tokenizer
    /// (`tok_json`) is the parent's own. Every variable is read but a new head's, which
    /// keeps its initialisation; the parent's output projection, if it has one, is not part
    /// of a classifier's model.
    pub fn load(&self, vars: &VarMap, tok_json: &[u8]) -> Result<()> {
        if slm_data::tokenizer_sha256(&self.tokenizer_json) != slm_data::tokenizer_sha256(tok_json)
        {
            return Err(TrainError::Setup(format!(
                "{}: the parent's tokenizer differs from data.tokenizer; prepare the shards with \
                 the parent's tokenizer.json",
                self.path.display()
            )));
        }
        let data = vars.data().lock().expect("var map lock");
        let mut weights = self.weights(|name| data.contains_key(name))?;
        for (name, var) in data.iter() {
            let new_head = matches!(
                slm_model::params::parse_hf_name(name),
                Some((Role::Score | Role::ScoreBias, _))
            );
            let t = match weights.remove(name) {
                Some(t) => t,
                None if new_head => continue,
                None => return Err(setup(&self.path, format!("no tensor {name}"))),
            };
            if t.shape() != var.shape() {
                return Err(setup(
                    &self.path,
                    format!(
                        "{name} has shape {:?}, its config implies {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(&t)?;
        }
        Ok(())
    }

    /// The files beside the weights that a model folder made from this parent keeps:
    /// tokenizer.json, tokenizer_config.json and generation_config.json.
    pub fn tokenizer_files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json");
        let folder_file = self
            .gguf
            .is_none()
            .then(|| std::fs::read(self.path.join("generation_config.json")).ok())
            .flatten();
        let generation = folder_file.unwrap_or_else(|| {
            json(&serde_json::json!({
                "bos_token_id": self.cfg.bos_token_id,
                "eos_token_id": self.cfg.eos_token_id
            }))
        });
        vec![
            ("tokenizer.json", self.tokenizer_json.clone()),
            ("tokenizer_config.json", json(&self.tokenizer_config)),
            ("generation_config.json", generation),
        ]
    }
}
