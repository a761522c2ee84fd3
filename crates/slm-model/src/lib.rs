//! slm-model: the Llama-family transformer and its weights, loaded from GGUF files and
//! Hugging Face safetensors folders (read through slm-format) onto slm-kernels' matrices.

pub mod attention;
pub mod hf_layout;
pub mod llama;
pub mod weights;

use std::path::Path;

pub use slm_format::source::{safetensors_files, source, ModelSource};
pub use slm_format::{assets, config, gguf, gguf_write, limits, params};
use slm_format::{files_err, FileError, SourceError};
pub use slm_format::{Param, Role};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

pub use config::{Arch, Config, Head};
pub use gguf::GgufFile;
pub use llama::{Cache, Llama};
pub use slm_kernels::packed::{self, Pack};
pub use weights::{Linear, Weights};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Weights(#[from] weights::WeightError),
    #[error(transparent)]
    Files(#[from] FileError),
}

impl From<SourceError> for LoadError {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Gguf(e) => e.into(),
            SourceError::File(e) => e.into(),
        }
    }
}

pub struct LoadedModel {
    pub model: Llama,
    pub source: ModelSource,
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
                return Err(files_err(f, "listed in the index but missing").into());
            }
        }
        // SAFETY: read-only maps of files we do not modify; see GgufFile::open.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .map_err(|e| files_err(path, format!("bad safetensors: {e}")))?;
        // Weights are floats; integer or 8-bit float data would be converted to f32 without
        // meaning anything (candle casts any dtype).
        for (name, view) in st.tensors() {
            use safetensors::Dtype;
            if !matches!(view.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                return Err(files_err(
                    path,
                    format!(
                        "tensor '{name}' is stored as {:?}; model weights must be F32, F16 or BF16",
                        view.dtype()
                    ),
                )
                .into());
            }
        }
        let vb = VarBuilder::from_backend(Box::new(st), DType::F32, device.clone());
        let model = Llama::load(&config, &Weights::Vars(vb), device)?;
        return Ok(LoadedModel {
            model,
            source: ModelSource::HfFolder {
                dir: path.to_path_buf(),
            },
        });
    }
    if !path.exists() {
        return Err(files_err(path, "no such file or folder").into());
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
        source: ModelSource::of_gguf(&file),
    })
}
