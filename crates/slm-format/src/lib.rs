//! slm-format: model files as they lie on disk, read without any tensor compute: the GGUF
//! container (metadata, tensor table, bytes left in the memory map), the one configuration of
//! the Llama family from a Hugging Face config.json or GGUF metadata, the one description of
//! its parameters (`params`), and where a model's
//! files are (`ModelSource`). The tokenizer reads GGUF metadata through this crate without
//! compiling a kernel; slm-model turns the tensors into a model.

pub mod assets;
pub mod config;
pub mod gguf;
pub mod gguf_write;
pub mod limits;
pub mod params;
pub mod source;

pub use config::{Arch, Config, ConfigError, Head};
pub use gguf::{GgmlType, GgufError, GgufFile};
pub use params::{Param, Role};
pub use source::{files_err, safetensors_files, source, FileError, ModelSource, SourceError};
