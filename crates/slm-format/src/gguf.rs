//! GGUF reader.
//!
//! Written by hand rather than using `candle_core::quantized::gguf_file` because that reader trusts
//! every length in the file: a corrupt string or array length becomes a `vec![0; len]` of that
//! size, and tensor extents are never checked against the file. Here every count is checked
//! against the bytes that remain before anything is allocated, so a bad file is an error that
//! names what is wrong, never a panic or an allocation larger than the file. Tensor bytes stay in
//! the memory map until a tensor is asked for.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

const MAGIC: &[u8; 4] = b"GGUF";
pub(crate) const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml supports at most 4 dimensions (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
/// Nested arrays are legal in GGUF but no model uses more than one level; a bound keeps a
/// malicious file from recursing without end.
const MAX_ARRAY_DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a regular file (a model is a .gguf file or a Hugging Face folder)")]
    NotAFile { path: PathBuf },
    #[error("{path}: not a GGUF file (magic is {found:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: [u8; 4] },
    #[error("{path}: GGUF version {version} is not supported (expected 2 or 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: truncated or corrupt at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: usize,
        what: String,
    },
    #[error("{path}: tensor '{tensor}': {what}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        what: String,
    },
    #[error("{path}: metadata key '{key}': {what}")]
    Metadata {
        path: PathBuf,
        key: String,
        what: String,
    },
}

pub type Result<T> = std::result::Result<T, GgufError>;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    /// Short human-readable rendering for `slm info`: long arrays are summarised.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.chars().count() > 80 => {
                let head: String = s.chars().take(77).collect();
                format!("{head:?}...")
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) if a.len() > 8 => format!("[{} items]", a.len()),
            Value::Array(a) => {
                let items: Vec<String> = a.iter().map(Value::summary).collect();
                format!("[{}]", items.join(", "))
            }
            Value::F32(v) => format!("{v}"),
            Value::F64(v) => format!("{v}"),
            Value::Bool(v) => format!("{v}"),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// Where one tensor lives in the file and what it is.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in candle order (slowest first); GGUF stores them fastest first.
    pub dims: Vec<usize>,
    pub dtype: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub len: usize,
}

/// A parsed GGUF file: metadata and tensor table read eagerly, tensor bytes memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// The metadata keys in file order (a rewrite that keeps them keeps the file's bytes).
    key_order: Vec<String>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // A device or a pipe is not a model, whatever it reads as.
        if !file.metadata().map_err(io)?.is_file() {
            return Err(GgufError::NotAFile { path });
        }
        // SAFETY: the map is read-only; a concurrent writer truncating the file could fault, as
        // with every mmap-based model loader (llama.cpp does the same).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (version, metadata, key_order, tensors) = parse(&path, &mmap)?;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path,
            mmap,
            version,
            metadata,
            key_order,
            tensors,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata entries in the order the file holds them.
    pub fn metadata_in_file_order(&self) -> Vec<(String, Value)> {
        self.key_order
            .iter()
            .map(|k| (k.clone(), self.metadata[k].clone()))
            .collect()
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn meta_err(&self, key: &str, what: impl Into<String>) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            what: what.into(),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    self.meta_err(key, format!("expected an unsigned integer, found {v:?}"))
                })
            })
            .transpose()
    }
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.meta_err(key, format!("expected a number, found {v:?}")))
            })
            .transpose()
    }
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    self.meta_err(key, format!("expected a string, found {}", v.summary()))
                })
            })
            .transpose()
    }
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.meta_err(key, format!("expected a bool, found {v:?}")))
            })
            .transpose()
    }
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)?
            .ok_or_else(|| self.meta_err(key, "missing (required for this architecture)"))
    }
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.get_str(key)?
            .ok_or_else(|| self.meta_err(key, "missing (required for this architecture)"))
    }
    /// A string array (token lists, merges).
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.meta_err(key, "expected an array of strings"))?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .ok_or_else(|| self.meta_err(key, format!("item {i} is not a string")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    /// A numeric array (token types, scores).
    pub fn get_f64_array(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.meta_err(key, "expected an array of numbers"))?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64()
                    .ok_or_else(|| self.meta_err(key, format!("item {i} is not a number")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Raw bytes of a tensor as stored in the file.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.start..info.start + info.len]
    }

    /// Tells the kernel a tensor's mapped pages are no longer needed once copied, so they
    /// leave this process's resident set (they stay in the page cache). Without it a load
    /// holds the file's pages and the copies at once: peak memory near twice the model.
    pub fn release(&self, info: &TensorInfo) {
        release_pages(&self.mmap, info.start, info.len);
    }
}

/// Hands the whole pages of `map[start..start + len]` back to the kernel: they leave the
/// process's resident set (staying in the page cache), and a later read faults them in again.
/// Only pages inside the range, since neighbours may still be read.
pub fn release_pages(map: &Mmap, start: usize, len: usize) {
    let page = 4096;
    let first = start.next_multiple_of(page);
    let end = (start + len) / page * page;
    if end > first {
        // SAFETY: the map is read-only and backed by a file slm does not write, so dropping
        // its pages loses nothing.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first)
        };
    }
}

/// The tensor storage types slm reads, by ggml's names. Sizes are ggml's (`ggml_blck_size`,
/// `ggml_type_size`), so a tensor's byte length is checked against the file without knowing
/// how its blocks compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl GgmlType {
    pub const ALL: [GgmlType; 15] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
    ];

    pub fn name(self) -> &'static str {
        self.info().0
    }
    /// Values per block.
    pub fn block_size(self) -> usize {
        self.info().1
    }
    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.info().2
    }
    /// ggml's type id, as the tensor table stores it.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
        }
    }
    fn info(self) -> (&'static str, usize, usize) {
        match self {
            GgmlType::F32 => ("F32", 1, 4),
            GgmlType::F16 => ("F16", 1, 2),
            GgmlType::BF16 => ("BF16", 1, 2),
            GgmlType::Q4_0 => ("Q4_0", 32, 18),
            GgmlType::Q4_1 => ("Q4_1", 32, 20),
            GgmlType::Q5_0 => ("Q5_0", 32, 22),
            GgmlType::Q5_1 => ("Q5_1", 32, 24),
            GgmlType::Q8_0 => ("Q8_0", 32, 34),
            GgmlType::Q8_1 => ("Q8_1", 32, 36),
            GgmlType::Q2K => ("Q2_K", 256, 84),
            GgmlType::Q3K => ("Q3_K", 256, 110),
            GgmlType::Q4K => ("Q4_K", 256, 144),
            GgmlType::Q5K => ("Q5_K", 256, 176),
            GgmlType::Q6K => ("Q6_K", 256, 210),
            GgmlType::Q8K => ("Q8_K", 256, 292),
        }
    }
}

/// The type of ggml type id `id`, or why slm cannot read it.
fn ggml_type(id: u32) -> std::result::Result<GgmlType, String> {
    if let Some(t) = GgmlType::ALL.into_iter().find(|t| t.id() == id) {
        return Ok(t);
    }
    let name = match id {
        4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    };
    Err(format!(
        "tensor type {name} (ggml type id {id}) is not supported; supported: F32, F16, BF16, \
         Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"
    ))
}

struct Reader<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, what: impl Into<String>) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            offset: self.pos,
            what: what.into(),
        }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "{what} needs {n} bytes but only {} remain",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returned N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A length or count: must fit in the bytes that remain, given each item's minimum size.
    fn count(&mut self, what: &str, min_item_size: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let need = n.checked_mul(min_item_size as u64);
        match need {
            Some(need) if need <= self.remaining() as u64 => Ok(n as usize),
            _ => Err(self.corrupt(format!(
                "{what} is {n}, more than the {} bytes left in the file can hold",
                self.remaining()
            ))),
        }
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Corrupt {
            path: self.path.to_path_buf(),
            offset: at,
            what: format!("{what} is not valid UTF-8"),
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(
                        self.corrupt(format!("bool value of '{key}' is {b}, expected 0 or 1"))
                    )
                }
            },
            8 => Value::String(self.string(&format!("string value of '{key}'"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(format!(
                        "arrays nested deeper than {MAX_ARRAY_DEPTH} in '{key}'"
                    )));
                }
                let item_ty = self.u32(key)?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => 8,  // a string is at least its u64 length
                    9 => 12, // an array is at least its type and length
                    t => {
                        return Err(self.corrupt(format!("array '{key}' has unknown item type {t}")))
                    }
                };
                let n = self.count(&format!("length of array '{key}'"), min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.corrupt(format!("metadata '{key}' has unknown value type {t}"))),
        })
    }
}

type Parsed = (u32, BTreeMap<String, Value>, Vec<String>, Vec<TensorInfo>);

fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let mut r = Reader { path, buf, pos: 0 };
    let magic: [u8; 4] = r.array("magic").map_err(|_| GgufError::BadMagic {
        path: path.to_path_buf(),
        found: [0; 4],
    })?;
    if &magic != MAGIC {
        return Err(GgufError::BadMagic {
            path: path.to_path_buf(),
            found: magic,
        });
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Version {
            path: path.to_path_buf(),
            version,
        });
    }
    // Each tensor entry takes at least 8 (name len) + 4 (n_dims) + 4 (type) + 8 (offset) bytes,
    // each metadata entry at least 8 (key len) + 4 (type) + 1.
    let n_tensors = r.count("tensor count", 24)?;
    let n_kv = r.count("metadata count", 13)?;

    let mut metadata = BTreeMap::new();
    let mut key_order = Vec::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32(&key)?;
        let value = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.corrupt(format!("metadata key '{key}' appears twice")));
        }
        key_order.push(key);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
            _ => {
                return Err(GgufError::Metadata {
                    path: path.to_path_buf(),
                    key: "general.alignment".into(),
                    what: format!("{v:?} is not a power of two up to 1 MiB"),
                })
            }
        },
    };

    struct Raw {
        name: String,
        dims: Vec<usize>,
        dtype: GgmlType,
        offset: u64,
        len: usize,
    }
    let mut raw = Vec::with_capacity(n_tensors);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let terr = |what: String| GgufError::Tensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            what,
        };
        if !seen.insert(name.clone()) {
            return Err(terr("appears twice in the tensor table".into()));
        }
        let n_dims = r.u32("tensor rank")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(terr(format!(
                "has {n_dims} dimensions, expected 1 to {MAX_DIMS}"
            )));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(r.u64("tensor dimension")?);
        }
        let ty = r.u32("tensor type")?;
        let offset = r.u64("tensor offset")?;
        let dtype = ggml_type(ty).map_err(terr)?;
        if ne.contains(&0) {
            return Err(terr(format!("has a zero dimension {ne:?}")));
        }
        let elems = ne
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&e| e <= buf.len() as u64 * 256)
            .ok_or_else(|| {
                terr(format!(
                    "dimensions {ne:?} are impossibly large for this file"
                ))
            })?;
        let block = dtype.block_size() as u64;
        if ne[0] % block != 0 {
            return Err(terr(format!(
                "row length {} is not a multiple of the {} block size {block}",
                ne[0],
                dtype.name()
            )));
        }
        let len = elems / block * dtype.type_size() as u64;
        if offset % alignment != 0 {
            return Err(terr(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let dims = ne.iter().rev().map(|&d| d as usize).collect();
        raw.push(Raw {
            name,
            dims,
            dtype,
            offset,
            len: len as usize,
        });
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let start = data_start.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.len as u64));
        match (start, end) {
            (Some(s), Some(e)) if e <= buf.len() as u64 => tensors.push(TensorInfo {
                name: t.name,
                dims: t.dims,
                dtype: t.dtype,
                start: s as usize,
                len: t.len,
            }),
            _ => {
                return Err(GgufError::Tensor {
                    path: path.to_path_buf(),
                    tensor: t.name,
                    what: format!(
                        "data [{}+{}, {} bytes] runs past the end of the file ({} bytes): truncated download?",
                        data_start,
                        t.offset,
                        t.len,
                        buf.len()
                    ),
                })
            }
        }
    }
    // Tensors may not share bytes: an overlap means a changed type or offset, and the model
    // would read one tensor's data as another's.
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.start);
    for w in order.windows(2) {
        let (a, b) = (w[0], w[1]);
        if a.start + a.len > b.start {
            return Err(GgufError::Tensor {
                path: path.to_path_buf(),
                tensor: a.name.clone(),
                what: format!(
                    "its {} bytes of {} data at [{}, {}) run into tensor '{}' at byte {}: a corrupt tensor table",
                    a.len,
                    a.dtype.name(),
                    a.start,
                    a.start + a.len,
                    b.name,
                    b.start
                ),
            });
        }
    }
    Ok((version, metadata, key_order, tensors))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a tiny valid GGUF in memory.
    pub(crate) fn tiny_gguf() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&2u64.to_le_bytes()); // kv
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "list");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        for v in [1u32, 2, 3] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        s(&mut b, "w");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for i in 0..8 {
            b.extend_from_slice(&(i as f32).to_le_bytes());
        }
        b
    }

    #[test]
    fn parses_a_hand_built_file() {
        let bytes = tiny_gguf();
        let (v, meta, order, tensors) = parse(Path::new("t.gguf"), &bytes).unwrap();
        assert_eq!(v, 3);
        assert_eq!(order, ["general.architecture", "list"]);
        assert_eq!(meta["general.architecture"].as_str(), Some("llama"));
        assert_eq!(meta["list"].as_array().unwrap().len(), 3);
        assert_eq!(tensors[0].dims, vec![2, 4]);
        assert_eq!(tensors[0].len, 32);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = tiny_gguf();
        for n in 0..bytes.len() {
            assert!(
                parse(Path::new("t.gguf"), &bytes[..n]).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
    }

    #[test]
    fn huge_lengths_are_rejected_before_allocating() {
        let mut bytes = tiny_gguf();
        // The array length of "list" sits after magic, version, counts, first kv, key "list", type, item type.
        let pos = bytes.windows(4).position(|w| w == b"list").unwrap() + 4 + 4 + 4;
        bytes[pos..pos + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = parse(Path::new("t.gguf"), &bytes).unwrap_err().to_string();
        assert!(err.contains("length of array 'list'"), "{err}");
    }
}
