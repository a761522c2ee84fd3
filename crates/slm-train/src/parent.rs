//! The model a fine-tuning run starts from (`model.parent`): a Hugging Face folder, or a GGUF
//! file. Its configuration, tokenizer (with tokenizer.json's bytes, which shards are keyed
//! to) and weights, widened to f32 in Hugging Face's layout; a LoRA run over a GGUF file keeps
//! the projections the file stores in a block type in their blocks (`blocks`), so the frozen
//! base takes the file's size in memory, not four bytes a weight.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
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

impl Parent {
    pub fn open(path: &Path) -> Result<Self> {
        let source = slm_model::source(path).map_err(|e| setup(path, e))?;
        let tokenizer = slm_tokenizer::Tokenizer::for_model(&source).map_err(|e| setup(path, e))?;
        match source {
            ModelSource::Gguf { .. } => {
                let file = GgufFile::open(path).map_err(|e| setup(path, e))?;
                let cfg = Config::from_gguf(&file).map_err(|e| setup(path, e))?;
                tokenizer
                    .check_fits(cfg.vocab_size, &source)
                    .map_err(|e| setup(path, e))?;
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
            ModelSource::HfFolder { .. } => {
                let read = |name: &str| {
                    let p = path.join(name);
                    std::fs::read(&p).map_err(|err| TrainError::Io { path: p, err })
                };
                let cfg_path = path.join("config.json");
                let text = String::from_utf8_lossy(&read("config.json")?).into_owned();
                let cfg = Config::from_hf_json(&text, &cfg_path.display().to_string())
                    .map_err(|e| TrainError::Setup(e.to_string()))?;
                let tokenizer_config = match read("tokenizer_config.json") {
                    Ok(bytes) => serde_json::from_slice(&bytes)
                        .map_err(|e| setup(&path.join("tokenizer_config.json"), e))?,
                    Err(_) => tokenizer.config_json(cfg.max_position_embeddings),
                };
                Ok(Self {
                    path: path.to_path_buf(),
                    tokenizer_json: read("tokenizer.json")?,
                    tokenizer_config,
                    cfg,
                    tokenizer,
                    gguf: None,
                })
            }
        }
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
        let fused: [&[Role]; 4] = [
            &[Role::Q, Role::K, Role::V],
            &[Role::O],
            &[Role::Gate, Role::Up],
            &[Role::Down],
        ];
        for l in 0..cfg.num_hidden_layers {
            for group in fused {
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

    /// Sets `vars` to the parent's weights, after checking that the run's tokenizer
    /// (`tok_json`) is the parent's own. Every variable is read but a new head's, which
    /// keeps its initialisation.
    pub fn load(&self, vars: &VarMap, tok_json: &[u8]) -> Result<()> {
        if slm_data::tokenizer_sha256(&self.tokenizer_json) != slm_data::tokenizer_sha256(tok_json)
        {
            return Err(TrainError::Setup(format!(
                "{}: the parent's tokenizer differs from data.tokenizer; prepare the shards with \
                 the parent's tokenizer.json",
                self.path.display()
            )));
        }
        let mut folder = HashMap::new();
        if self.gguf.is_none() {
            let files = slm_model::safetensors_files(&self.path)
                .map_err(|e| TrainError::Setup(e.to_string()))?;
            for f in &files {
                folder.extend(candle_core::safetensors::load(f, &Device::Cpu)?);
            }
        }
        let specs = self.cfg.params();
        let data = vars.data().lock().expect("var map lock");
        for (name, var) in data.iter() {
            // A new head starts from its initialisation; the parent's output projection, if
            // it has one, is not part of the run's model.
            let role = slm_model::params::parse_hf_name(name);
            let new_head = matches!(role, Some((Role::Score | Role::ScoreBias, _)));
            let t = match &self.gguf {
                Some(file) => {
                    let spec =
                        role.and_then(|(r, l)| specs.iter().find(|p| p.role == r && p.layer == l));
                    match spec {
                        Some(spec) => {
                            let v = slm_model::hf_layout::hf_values(file, &self.cfg, spec)?;
                            candle_core::Tensor::from_vec(v, spec.shape.as_slice(), &Device::Cpu)?
                        }
                        None if new_head => continue,
                        None => {
                            return Err(setup(&self.path, format!("no tensor for {name}")));
                        }
                    }
                }
                None => match folder.remove(name) {
                    Some(t) => t,
                    None if new_head => continue,
                    None => return Err(setup(&self.path, format!("no tensor {name}"))),
                },
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
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
}
