//! Where a model's files are and what they say without loading its weights: a GGUF file
//! (metadata and tensor table) or a Hugging Face folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::gguf::{GgufError, GgufFile, Value};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    File(#[from] FileError),
}

/// Where a loaded model came from; the tokenizer and chat template are read from the same place.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A GGUF file; its metadata (with the tokenizer) is kept, its tensor bytes are not.
    Gguf {
        path: PathBuf,
        metadata: BTreeMap<String, Value>,
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

/// A model's files that are missing, unreadable or malformed (other than GGUF's own errors).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct FileError {
    pub path: PathBuf,
    pub what: String,
}

pub fn files_err(path: &Path, what: impl Into<String>) -> FileError {
    FileError {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// The safetensors files of a Hugging Face folder: one file or an index of shards.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, FileError> {
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

/// What `slm_model::load` would report as the model's source, read without the weights: the GGUF
/// metadata (the tokenizer is built from it), or the folder. A caller that builds the
/// tokenizer from this before loading lets the weights reuse the memory that construction
/// frees (~30 MB for a 49k vocabulary), which otherwise sits on top of the weights as the
/// process's peak.
pub fn source(path: &Path) -> Result<ModelSource, SourceError> {
    if path.is_dir() {
        return Ok(ModelSource::HfFolder {
            dir: path.to_path_buf(),
        });
    }
    if !path.exists() {
        return Err(files_err(path, "no such file or folder").into());
    }
    Ok(ModelSource::of_gguf(&GgufFile::open(path)?))
}

impl ModelSource {
    /// The source of an opened GGUF file.
    pub fn of_gguf(file: &GgufFile) -> ModelSource {
        let mut tensor_types = BTreeMap::new();
        for t in &file.tensors {
            *tensor_types.entry(t.dtype.name().to_string()).or_insert(0) += 1;
        }
        let file_bytes = std::fs::metadata(file.path()).map(|m| m.len()).unwrap_or(0);
        ModelSource::Gguf {
            path: file.path().to_path_buf(),
            metadata: file.metadata.clone(),
            tensor_types,
            file_bytes,
        }
    }
}
