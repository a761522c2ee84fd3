//! GGUF file -> Hugging Face folder, in F32, F16 or BF16: config.json from the GGUF's
//! hyperparameters, every parameter of `Config::params` dequantized under its Hugging Face
//! name (q and k rows put back in Hugging Face's order, which llama.cpp's converter permuted
//! for Llama-architecture files), tokenizer.json built from `tokenizer.ggml.*`, and
//! tokenizer_config.json with the chat template and special tokens. Tensors are converted
//! one at a time while the safetensors file is written, so no copy of the whole model is built
//! (the peak is a few copies of the largest tensor, plus the input's mapped pages), and
//! the folder appears whole or not at all (written under a temporary name, then renamed).
//!
//! And the way back, `hf_to_gguf`: a folder as a GGUF file with llama.cpp's converter's
//! metadata, the tokenizer as `tokenizer.ggml.*`, each tensor read through its own map.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use slm_model::gguf::GgufFile;
use slm_model::hf_layout::{permute_rows, permuted_heads};
use slm_model::{Config, ModelSource, Param, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    BF16,
}

impl FloatType {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "bf16" => Some(Self::BF16),
            _ => None,
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }
    fn safetensors(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::F16 => safetensors::Dtype::F16,
            Self::BF16 => safetensors::Dtype::BF16,
        }
    }
    /// Little-endian values of this type as f32 (exact: every F16 and BF16 value is one),
    /// converted on all cores (a large embedding's conversion was a tenth of a quantization).
    pub fn values(self, bytes: &[u8]) -> Vec<f32> {
        use rayon::prelude::*;
        let width = self.width();
        let mut out = vec![0f32; bytes.len() / width];
        const PART: usize = 1 << 16;
        out.par_chunks_mut(PART)
            .zip(bytes.par_chunks(PART * width))
            .for_each(|(o, b)| {
                let each = b.chunks_exact(width);
                match self {
                    Self::F32 => o.iter_mut().zip(each).for_each(|(o, c)| {
                        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }),
                    Self::F16 => o.iter_mut().zip(each).for_each(|(o, c)| {
                        *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                    }),
                    Self::BF16 => o.iter_mut().zip(each).for_each(|(o, c)| {
                        *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                    }),
                }
            });
        out
    }
    /// Bytes per value.
    fn width(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
    /// The GGUF float type `t` as a `FloatType`, if it is one.
    pub fn of_ggml(t: slm_model::gguf::GgmlType) -> Option<Self> {
        use slm_model::gguf::GgmlType;
        match t {
            GgmlType::F32 => Some(Self::F32),
            GgmlType::F16 => Some(Self::F16),
            GgmlType::BF16 => Some(Self::BF16),
            _ => None,
        }
    }
    pub fn bytes(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Self::F16 => values
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Self::BF16 => values
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Gguf(#[from] slm_model::gguf::GgufError),
    #[error(transparent)]
    Config(#[from] slm_model::config::ConfigError),
    #[error(transparent)]
    Tokenizer(#[from] slm_tokenizer::TokenizerError),
    #[error("{path}: {what}")]
    Model { path: PathBuf, what: String },
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |err| ExportError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// One parameter, read from the GGUF and converted when the safetensors writer asks for it.
struct LazyTensor<'a> {
    file: &'a GgufFile,
    cfg: &'a Config,
    param: Param,
    ty: FloatType,
    failed: &'a std::sync::Mutex<Option<String>>,
}

impl LazyTensor<'_> {
    fn values(&self) -> Result<Vec<f32>, String> {
        slm_model::hf_layout::hf_values(self.file, self.cfg, &self.param).map_err(|e| e.to_string())
    }
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.ty.safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.param.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.values() {
            Ok(v) => Cow::Owned(self.ty.bytes(&v)),
            Err(e) => {
                // The writer cannot fail from here: the bytes are zeros of the right length,
                // the error is kept, and the whole folder is discarded.
                self.failed.lock().expect("lock").get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.param.len() * self.ty.safetensors().bitsize() / 8
    }
}

/// Writes the GGUF model at `gguf` as a Hugging Face folder `out` (which must not exist).
pub fn gguf_to_hf(gguf: &Path, out: &Path, ty: FloatType) -> Result<(), ExportError> {
    if out.exists() {
        return Err(ExportError::Io {
            path: out.to_path_buf(),
            err: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; choose a new folder",
            ),
        });
    }
    let file = GgufFile::open(gguf)?;
    let cfg = Config::from_gguf(&file)?;
    let model_err = |what: String| ExportError::Model {
        path: gguf.to_path_buf(),
        what,
    };
    // llama3 scaling arrives as per-pair divisors; config.json would need the rule's
    // parameters, which the divisors do not carry.
    if file.tensor_info("rope_freqs.weight").is_some() {
        return Err(model_err(
            "rope scaling stored as rope_freqs.weight cannot be written as a config.json rope_scaling yet".into(),
        ));
    }
    let source = ModelSource::of_gguf(&file);
    let tok = slm_tokenizer::Tokenizer::for_model(&source)?;
    tok.check_fits(cfg.vocab_size, &source)?;

    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".into()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = write_folder(&file, &cfg, &tok, ty, &tmp).and_then(|()| {
        std::fs::rename(&tmp, out).map_err(io(out))?;
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_folder(
    file: &GgufFile,
    cfg: &Config,
    tok: &slm_tokenizer::Tokenizer,
    ty: FloatType,
    dir: &Path,
) -> Result<(), ExportError> {
    let mut config = cfg.to_hf_json();
    config["torch_dtype"] = ty.torch_name().into();
    let tcfg = tok.config_json(cfg.max_position_embeddings);
    let generation =
        serde_json::json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id});
    let tokenizer_json = tok.inner.to_string(false).map_err(|e| ExportError::Model {
        path: file.path().to_path_buf(),
        what: format!("serializing the tokenizer: {e}"),
    })?;
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json");
    for (name, bytes) in [
        ("config.json", json(&config)),
        ("tokenizer_config.json", json(&tcfg)),
        ("generation_config.json", json(&generation)),
        ("tokenizer.json", tokenizer_json.into_bytes()),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(io(&p))?;
    }
    let failed = std::sync::Mutex::new(None);
    let tensors: Vec<(String, LazyTensor)> = cfg
        .params()
        .into_iter()
        .map(|param| {
            (
                param.role.hf_name(param.layer),
                LazyTensor {
                    file,
                    cfg,
                    param,
                    ty,
                    failed: &failed,
                },
            )
        })
        .collect();
    let st = dir.join("model.safetensors");
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(meta), &st).map_err(|e| ExportError::Model {
        path: st.clone(),
        what: e.to_string(),
    })?;
    // The safetensors crate writes through a private temporary file (mode 0600); the folder's
    // files are all readable alike.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o644)).map_err(io(&st))?;
    }
    if let Some(what) = failed.into_inner().expect("lock") {
        return Err(ExportError::Model {
            path: file.path().to_path_buf(),
            what,
        });
    }
    for f in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        std::fs::File::open(f.path())
            .and_then(|f| f.sync_all())
            .map_err(io(&f.path()))?;
    }
    Ok(())
}

impl FloatType {
    fn ggml(self) -> slm_model::gguf::GgmlType {
        match self {
            Self::F32 => slm_model::gguf::GgmlType::F32,
            Self::F16 => slm_model::gguf::GgmlType::F16,
            Self::BF16 => slm_model::gguf::GgmlType::BF16,
        }
    }
    /// llama.cpp's `llama_ftype` for a file of this type (general.file_type).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::BF16 => 32,
        }
    }
}

/// The lineage of an slm-made folder (its slm.json) as GGUF metadata: the parent it was
/// trained from as general.base_model (llama.cpp's converter's keys), and the whole record,
/// data hashes and training figures included, as `slm.lineage` (JSON).
fn lineage(dir: &Path) -> Result<Vec<(String, slm_model::gguf::Value)>, ExportError> {
    use slm_model::gguf::Value;
    let path = dir.join("slm.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Vec::new());
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| ExportError::Model {
        path: path.clone(),
        what: format!("not JSON: {e}"),
    })?;
    let mut m = vec![("slm.lineage".to_string(), Value::String(json.to_string()))];
    if let Some(parent) = json.get("parent").and_then(|p| p.as_str()) {
        m.push(("general.base_model.count".into(), Value::U32(1)));
        m.push((
            "general.base_model.0.name".into(),
            Value::String(parent.to_string()),
        ));
    }
    Ok(m)
}

/// The GGUF metadata llama.cpp's converter writes for `cfg`: the architecture's
/// hyperparameters; the tokenizer and chat template are added by the caller.
fn gguf_hparams(
    cfg: &Config,
    name: &str,
    ty: FloatType,
) -> std::collections::BTreeMap<String, slm_model::gguf::Value> {
    use slm_model::gguf::Value;
    let a = cfg.arch.gguf_name();
    let u = |v: usize| Value::U32(v as u32);
    let mut m = std::collections::BTreeMap::new();
    m.insert("general.architecture".into(), Value::String(a.into()));
    m.insert("general.name".into(), Value::String(name.into()));
    m.insert("general.file_type".into(), Value::U32(ty.file_type()));
    let k = |s: &str| format!("{a}.{s}");
    m.insert(k("vocab_size"), u(cfg.vocab_size));
    m.insert(k("context_length"), u(cfg.max_position_embeddings));
    m.insert(k("embedding_length"), u(cfg.hidden_size));
    m.insert(k("feed_forward_length"), u(cfg.intermediate_size));
    m.insert(k("block_count"), u(cfg.num_hidden_layers));
    m.insert(k("attention.head_count"), u(cfg.num_attention_heads));
    m.insert(k("attention.head_count_kv"), u(cfg.num_key_value_heads));
    m.insert(k("rope.freq_base"), Value::F32(cfg.rope_theta as f32));
    m.insert(k("rope.dimension_count"), u(cfg.head_dim));
    m.insert(
        k("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    );
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size {
        m.insert(k("attention.key_length"), u(cfg.head_dim));
        m.insert(k("attention.value_length"), u(cfg.head_dim));
    }
    m
}

/// Writes the Hugging Face folder `dir` (config.json, safetensors, tokenizer.json,
/// tokenizer_config.json) as the GGUF file `out`, weights in `ty` (norms and biases in F32,
/// as llama.cpp's converter keeps them), with the tokenizer, special tokens and chat template
/// as `tokenizer.ggml.*` metadata. Tensors are read and converted one at a time.
pub fn hf_to_gguf(dir: &Path, out: &Path, ty: FloatType) -> Result<(), ExportError> {
    use slm_model::gguf::Value;
    let model_err = |path: &Path, what: String| ExportError::Model {
        path: path.to_path_buf(),
        what,
    };
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let cfg = Config::from_hf_json(&text, &cfg_path.display().to_string())?;
    if cfg.rope_scaling.is_some() {
        return Err(model_err(
            &cfg_path,
            "rope_scaling (llama3) is not written to GGUF yet".into(),
        ));
    }
    let tok = slm_tokenizer::Tokenizer::from_folder(dir)?;
    let tj = dir.join("tokenizer.json");
    let tj_text = std::fs::read_to_string(&tj).map_err(io(&tj))?;
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let mut meta = gguf_hparams(&cfg, &name, ty);
    meta.extend(slm_tokenizer::to_gguf_metadata(
        &tj_text,
        cfg.vocab_size,
        &tj.display().to_string(),
    )?);
    if let Some(b) = tok.bos {
        meta.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(b));
    }
    if let Some(e) = tok.eos.or(cfg.eos_token_id) {
        meta.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(e));
    }
    meta.insert(
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(tok.add_bos),
    );
    meta.extend(lineage(dir)?);
    let tc = dir.join("tokenizer_config.json");
    if let Ok(text) = std::fs::read_to_string(&tc) {
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| model_err(&tc, e.to_string()))?;
        if let Some(t) = v["chat_template"].as_str() {
            meta.insert("tokenizer.chat_template".into(), Value::String(t.into()));
        }
    }

    let st = Safetensors::open(dir)?;
    let params = cfg.params();
    let names: Vec<String> = params.iter().map(|p| p.gguf_name()).collect();
    let types: Vec<slm_model::gguf::GgmlType> = params
        .iter()
        .map(|p| {
            if p.shape.len() == 1 {
                slm_model::gguf::GgmlType::F32
            } else {
                ty.ggml()
            }
        })
        .collect();
    let specs: Vec<slm_model::gguf_write::TensorSpec> = (0..params.len())
        .map(|i| slm_model::gguf_write::TensorSpec {
            name: &names[i],
            dims: &params[i].shape,
            dtype: types[i],
        })
        .collect();
    let write = slm_model::gguf_write::write_gguf_streamed(
        out,
        &meta.into_iter().collect::<Vec<_>>(),
        &specs,
        |i| {
            let p = &params[i];
            let hf = p.role.hf_name(p.layer);
            let v = st.values(&hf, &p.shape)?;
            let cols = if p.role.is_bias() { 1 } else { cfg.hidden_size };
            let v = match permuted_heads(&cfg, p.role) {
                Some(heads) => permute_rows(&v, heads, cols),
                None => v,
            };
            Ok(match types[i] {
                slm_model::gguf::GgmlType::F32 => FloatType::F32.bytes(&v),
                _ => ty.bytes(&v),
            })
        },
    );
    write.map_err(|e| model_err(out, e.to_string()))
}

/// The safetensors files of a folder, each read through its own map so that a tensor's pages
/// are handed back once it is converted: converting a model then holds about one tensor, not
/// the whole input, in memory.
struct Safetensors {
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    /// Tensor name -> where it lies.
    index: std::collections::HashMap<String, Located>,
}

struct Located {
    map: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl Safetensors {
    fn open(dir: &Path) -> Result<Self, ExportError> {
        let bad = |path: &Path, what: String| ExportError::Model {
            path: path.to_path_buf(),
            what,
        };
        let files = slm_model::safetensors_files(dir).map_err(|e| bad(dir, e.to_string()))?;
        let mut maps = Vec::new();
        let mut index = std::collections::HashMap::new();
        for f in files {
            let file = std::fs::File::open(&f).map_err(io(&f))?;
            // SAFETY: a read-only map of a file this function does not modify.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&f))?;
            // Checks the header and every tensor's extent against the file.
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map)
                .map_err(|e| bad(&f, format!("bad safetensors: {e}")))?;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                index.insert(
                    name,
                    Located {
                        map: maps.len(),
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: 8 + n + a,
                        end: 8 + n + b,
                    },
                );
            }
            maps.push((f, map));
        }
        Ok(Self { maps, index })
    }

    /// Tensor `name` as f32 values, checked against `shape`; its pages are released after.
    fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let t = self
            .index
            .get(name)
            .ok_or_else(|| format!("no tensor {name} in the folder's safetensors"))?;
        let (path, map) = &self.maps[t.map];
        if t.shape.as_slice() != shape {
            return Err(format!(
                "{name} has shape {:?}, config.json implies {shape:?}",
                t.shape
            ));
        }
        let bytes = &map[t.start..t.end];
        let float = match t.dtype {
            safetensors::Dtype::F32 => Some(FloatType::F32),
            safetensors::Dtype::F16 => Some(FloatType::F16),
            safetensors::Dtype::BF16 => Some(FloatType::BF16),
            _ => None,
        };
        let v = float.map(|f| f.values(bytes)).ok_or_else(|| {
            format!(
                "{}: tensor '{name}' is stored as {:?}; model weights must be F32, F16 or BF16",
                path.display(),
                t.dtype
            )
        })?;
        slm_model::gguf::release_pages(map, t.start, t.end - t.start);
        Ok(v)
    }
}

/// Writes a LoRA adapter folder (PEFT's layout) over the Hugging Face base folder `base` as
/// the LoRA GGUF llama.cpp's `--lora` loads (convert_lora_to_gguf.py's file): general.type
/// "adapter", adapter.type "lora", adapter.lora.alpha, the base's hyperparameters, and per
/// adapted tensor `NAME.lora_a` (rank x inputs) and `NAME.lora_b` (outputs x rank), B's rows
/// of q and k permuted as the base's are. Only a language model's adapters: llama.cpp has no
/// classifier head to carry.
pub fn lora_to_gguf(
    adapter_dir: &Path,
    base: &Path,
    out: &Path,
    ty: FloatType,
) -> Result<(), ExportError> {
    use slm_model::gguf::Value;
    let model_err = |path: &Path, what: String| ExportError::Model {
        path: path.to_path_buf(),
        what,
    };
    let adapter = slm_train::adapter::read(adapter_dir, base)
        .map_err(|e| model_err(adapter_dir, e.to_string()))?;
    let cfg = &adapter.config;
    if cfg.head != slm_model::Head::Lm {
        return Err(model_err(
            adapter_dir,
            format!(
                "the adapter trains a {}, which llama.cpp's --lora cannot carry; merge it \
                 (slm lora merge) and use the model folder",
                cfg.head.describe()
            ),
        ));
    }
    let name = adapter_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "adapter".into());
    let mut meta = gguf_hparams(cfg, &name, ty);
    meta.insert("general.type".into(), Value::String("adapter".into()));
    meta.insert("adapter.type".into(), Value::String("lora".into()));
    meta.insert(
        "adapter.lora.alpha".into(),
        Value::F32(adapter.lora.alpha as f32),
    );
    let params = cfg.lora_params(adapter.lora.rank, &adapter.lora.targets);
    let names: Vec<String> = params.iter().map(|p| p.gguf_name()).collect();
    let specs: Vec<slm_model::gguf_write::TensorSpec> = params
        .iter()
        .zip(&names)
        .map(|(p, n)| slm_model::gguf_write::TensorSpec {
            name: n,
            dims: &p.shape,
            dtype: ty.ggml(),
        })
        .collect();
    let write = slm_model::gguf_write::write_gguf_streamed(
        out,
        &meta.into_iter().collect::<Vec<_>>(),
        &specs,
        |i| {
            let p = &params[i];
            let v: Vec<f32> = adapter.tensors[&p.name()]
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| e.to_string())?;
            let rank = adapter.lora.rank;
            let v = match (p.role, p.target.and_then(|t| permuted_heads(cfg, t))) {
                (Role::LoraB, Some(heads)) => permute_rows(&v, heads, rank),
                _ => v,
            };
            Ok(ty.bytes(&v))
        },
    );
    write.map_err(|e| model_err(out, e.to_string()))
}
