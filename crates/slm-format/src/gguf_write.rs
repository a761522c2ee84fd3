//! GGUF writer: the inverse of `gguf::parse`, in the layout llama.cpp's `gguf_write_to_file`
//! produces (header, metadata, tensor table, data aligned to `general.alignment`). The file is
//! written beside its destination and renamed into place, so a reader never sees half of it.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::gguf::{GgmlType, Value, DEFAULT_ALIGNMENT};

/// One tensor to write: `dims` outermost first (as `TensorInfo::dims`), `data` its bytes in
/// `dtype`'s block layout.
pub struct TensorOut<'a> {
    pub name: &'a str,
    pub dims: &'a [usize],
    pub dtype: GgmlType,
    pub data: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("tensor '{tensor}': {what}")]
    Tensor { tensor: String, what: String },
    #[error("metadata key '{key}': {what}")]
    Metadata { key: String, what: String },
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, key: &str, v: &Value) -> Result<(), WriteError> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is written as an array of u8.
            let ty = items.first().map(value_type).unwrap_or(0);
            if items.iter().any(|i| value_type(i) != ty) {
                return Err(WriteError::Metadata {
                    key: key.into(),
                    what: "array items of different types".into(),
                });
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, key, i)?;
            }
        }
    }
    Ok(())
}

/// Writes a GGUF version 3 file atomically, tensors given whole.
pub fn write_gguf(
    path: &Path,
    metadata: &BTreeMap<String, Value>,
    tensors: &[TensorOut],
) -> Result<(), WriteError> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name,
            dims: t.dims,
            dtype: t.dtype,
        })
        .collect();
    let entries: Vec<(String, Value)> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    write_gguf_streamed(path, &entries, &specs, |i| Ok(tensors[i].data.to_vec()))
}

/// A tensor's entry in the table: its data comes later, from the caller.
pub struct TensorSpec<'a> {
    pub name: &'a str,
    pub dims: &'a [usize],
    pub dtype: GgmlType,
}

impl TensorSpec<'_> {
    /// Bytes of this tensor's data, or why the dimensions cannot hold its type's blocks.
    pub fn byte_len(&self) -> Result<usize, WriteError> {
        let bad = |what: String| WriteError::Tensor {
            tensor: self.name.into(),
            what,
        };
        let row = *self
            .dims
            .last()
            .ok_or_else(|| bad("no dimensions".into()))?;
        if row % self.dtype.block_size() != 0 {
            return Err(bad(format!(
                "rows of {row} values are not whole {} blocks of {}",
                self.dtype.name(),
                self.dtype.block_size()
            )));
        }
        let elems: usize = self.dims.iter().product();
        Ok(elems / self.dtype.block_size() * self.dtype.type_size())
    }
}

/// Writes a GGUF version 3 file atomically, asking `data(i)` for tensor i's bytes only when
/// they are written, so memory holds one tensor at a time. The metadata entries are written
/// in the order given (keys must be distinct). A failure anywhere leaves neither the file nor
/// its temporary.
pub fn write_gguf_streamed(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>, String>,
) -> Result<(), WriteError> {
    let mut seen = std::collections::BTreeSet::new();
    if let Some((k, _)) = metadata.iter().find(|(k, _)| !seen.insert(k)) {
        return Err(WriteError::Metadata {
            key: k.clone(),
            what: "given twice".into(),
        });
    }
    let alignment = match metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .map(|(_, v)| v)
    {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            v.as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| WriteError::Metadata {
                    key: "general.alignment".into(),
                    what: format!("{v:?} is not a power of two"),
                })?
        }
    } as usize;
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut head, k);
        head.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut head, k, v)?;
    }
    let mut offset = 0usize;
    let mut lens = Vec::with_capacity(tensors.len());
    for t in tensors {
        let len = t.byte_len()?;
        put_str(&mut head, t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&t.dtype.id().to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + len).next_multiple_of(alignment);
        lens.push(len);
    }
    head.resize(head.len().next_multiple_of(alignment), 0);

    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let io = |source| WriteError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = tempfile_in(dir, path).map_err(io)?;
    let mut failed = None;
    let result = (|| {
        let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        w.write_all(&head)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = match data(i) {
                Ok(b) if b.len() == lens[i] => b,
                Ok(b) => {
                    failed = Some(WriteError::Tensor {
                        tensor: t.name.into(),
                        what: format!(
                            "{} bytes of data, its table entry says {}",
                            b.len(),
                            lens[i]
                        ),
                    });
                    return Ok(());
                }
                Err(what) => {
                    failed = Some(WriteError::Tensor {
                        tensor: t.name.into(),
                        what,
                    });
                    return Ok(());
                }
            };
            w.write_all(&bytes)?;
            let pad = bytes.len().next_multiple_of(alignment) - bytes.len();
            w.write_all(&vec![0u8; pad])?;
        }
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() || failed.is_some() {
        let _ = std::fs::remove_file(&tmp);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    result.map_err(io)
}

/// A hidden name beside `path` for the file being written.
fn tempfile_in(dir: &Path, path: &Path) -> std::io::Result<std::path::PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.gguf".into());
    Ok(dir.join(format!(".{name}.{}.tmp", std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    #[test]
    fn a_written_file_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.gguf");
        std::fs::write(&a, crate::gguf::tests::tiny_gguf()).unwrap();
        let g = GgufFile::open(&a).unwrap();
        let out: Vec<TensorOut> = g
            .tensors
            .iter()
            .map(|t| TensorOut {
                name: &t.name,
                dims: &t.dims,
                dtype: t.dtype,
                data: g.tensor_bytes(t),
            })
            .collect();
        let b = dir.path().join("b.gguf");
        write_gguf(&b, &g.metadata, &out).unwrap();
        // Same bytes: the hand-built file follows llama.cpp's layout too.
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let back = GgufFile::open(&b).unwrap();
        assert_eq!(back.metadata, g.metadata);
        let bad = TensorOut {
            name: "w",
            dims: &[2, 4],
            dtype: GgmlType::F16,
            data: &[0; 3],
        };
        let e = write_gguf(&b, &g.metadata, &[bad]).unwrap_err().to_string();
        assert!(
            e.contains("'w'") && e.contains("3 bytes") && e.contains("16"),
            "{e}"
        );
        // A failed write leaves no file and no temporary behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// Entries are written in the order given (and read back in it); a key given twice is
    /// refused by name and leaves nothing behind.
    #[test]
    fn metadata_keeps_its_order_and_a_repeated_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![
            ("z.last_in_sort".to_string(), Value::U32(1)),
            ("a.first_in_sort".to_string(), Value::String("x".into())),
        ];
        let p = dir.path().join("o.gguf");
        write_gguf_streamed(&p, &entries, &[], |_| Ok(Vec::new())).unwrap();
        assert_eq!(
            GgufFile::open(&p).unwrap().metadata_in_file_order(),
            entries
        );
        let mut twice = entries.clone();
        twice.push(("z.last_in_sort".to_string(), Value::U32(2)));
        let q = dir.path().join("twice.gguf");
        let e = write_gguf_streamed(&q, &twice, &[], |_| Ok(Vec::new()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("z.last_in_sort") && e.contains("given twice"),
            "{e}"
        );
        assert!(!q.exists());
    }
}
