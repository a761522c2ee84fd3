//! slm-model: the Llama-family transformer and the readers for its weights (GGUF and Hugging
//! Face safetensors folders).

pub mod assets;
pub mod attention;
pub mod config;
pub mod fused;
pub mod ggml_math;
pub mod gguf;
pub mod half_matmul;
pub mod kquant;
pub mod llama;
pub mod packed;
pub mod pool;
pub mod quant;
mod scratch;
pub mod tap;
pub mod weights;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

pub use config::{Arch, Config};
pub use gguf::GgufFile;
pub use llama::{Cache, Llama};
pub use packed::Pack;
pub use weights::{Linear, Weights};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Weights(#[from] weights::WeightError),
    #[error("{path}: {what}")]
    Files { path: PathBuf, what: String },
}

/// Where a loaded model came from; the tokenizer and chat template are read from the same place.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A GGUF file; its metadata (with the tokenizer) is kept, its tensor bytes are not.
    Gguf {
        path: PathBuf,
        metadata: BTreeMap<String, gguf::Value>,
        /// Storage types of the tensors, for reporting.
        tensor_types: BTreeMap<String, usize>,
        file_bytes: u64,
    },
    /// A Hugging Face model folder.
    HfFolder { dir: PathBuf },
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf { path, .. } => path,
            ModelSource::HfFolder { dir } => dir,
        }
    }
}

pub struct LoadedModel {
    pub model: Llama,
    pub source: ModelSource,
}

fn files_err(path: &Path, what: impl Into<String>) -> LoadError {
    LoadError::Files {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// The safetensors files of a Hugging Face folder: one file or an index of shards.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| files_err(&index, e.to_string()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| files_err(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| files_err(&index, "no \"weight_map\" object"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for f in map.values() {
            let name = f
                .as_str()
                .ok_or_else(|| files_err(&index, "weight_map values must be file names"))?;
            if name.contains('/') || name.contains("..") {
                return Err(files_err(
                    &index,
                    format!("shard name '{name}' leaves the model folder"),
                ));
            }
            let p = dir.join(name);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        return Ok(files);
    }
    Err(files_err(
        dir,
        "no model.safetensors or model.safetensors.index.json in this folder",
    ))
}

/// Loads a model from a `.gguf` file or a Hugging Face folder.
pub fn load(path: &Path, device: &Device) -> Result<LoadedModel, LoadError> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            files_err(
                &cfg_path,
                format!("cannot read: {e} (a model folder needs config.json)"),
            )
        })?;
        let config = Config::from_hf_json(&text, &cfg_path.display().to_string())?;
        let files = safetensors_files(path)?;
        for f in &files {
            if !f.is_file() {
                return Err(files_err(f, "listed in the index but missing"));
            }
        }
        // SAFETY: read-only maps of files we do not modify; see GgufFile::open.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device) }
            .map_err(|e| files_err(path, format!("bad safetensors: {e}")))?;
        let model = Llama::load(&config, &Weights::Vars(vb), device)?;
        return Ok(LoadedModel {
            model,
            source: ModelSource::HfFolder {
                dir: path.to_path_buf(),
            },
        });
    }
    if !path.exists() {
        return Err(files_err(path, "no such file or folder"));
    }
    let file = GgufFile::open(path)?;
    let config = Config::from_gguf(&file)?;
    let model = Llama::load(
        &config,
        &Weights::Gguf {
            file: &file,
            device: device.clone(),
        },
        device,
    )?;
    Ok(LoadedModel {
        model,
        source: gguf_source(&file),
    })
}

/// What `load` would report as the model's source, read without the weights: the GGUF
/// metadata (the tokenizer is built from it), or the folder. A caller that builds the
/// tokenizer from this before loading lets the weights reuse the memory that construction
/// frees (~30 MB for a 49k vocabulary), which otherwise sits on top of the weights as the
/// process's peak.
pub fn source(path: &Path) -> Result<ModelSource, LoadError> {
    if path.is_dir() {
        return Ok(ModelSource::HfFolder {
            dir: path.to_path_buf(),
        });
    }
    if !path.exists() {
        return Err(files_err(path, "no such file or folder"));
    }
    Ok(gguf_source(&GgufFile::open(path)?))
}

fn gguf_source(file: &GgufFile) -> ModelSource {
    let mut tensor_types = BTreeMap::new();
    for t in &file.tensors {
        *tensor_types
            .entry(gguf::dtype_name(t.dtype).to_string())
            .or_insert(0) += 1;
    }
    let file_bytes = std::fs::metadata(file.path()).map(|m| m.len()).unwrap_or(0);
    ModelSource::Gguf {
        path: file.path().to_path_buf(),
        metadata: file.metadata.clone(),
        tensor_types,
        file_bytes,
    }
}
