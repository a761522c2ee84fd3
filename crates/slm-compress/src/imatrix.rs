//! Importance matrices in llama-imatrix's GGUF format: per weight matrix, the sum over a
//! calibration text of the squares of each input column (`NAME.in_sum2`) and the number of
//! input rows (`NAME.counts`). Quantization weighs each column's error by their ratio, the
//! mean square activation that multiplies it (`quants`).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use slm_model::gguf::{GgmlType, GgufFile, Value};
use slm_model::gguf_write::{write_gguf, TensorOut};
use slm_model::Llama;

#[derive(Debug, thiserror::Error)]
pub enum ImatrixError {
    #[error("{path}: {what}")]
    File { path: String, what: String },
    #[error(
        "the calibration text has {tokens} tokens; an importance matrix needs at least two \
         windows of --ctx {ctx} ({} tokens), as llama-imatrix does",
        2 * ctx
    )]
    TooShort { tokens: usize, ctx: usize },
    #[error("--ctx {ctx} must be at least 16 (llama-imatrix ignores shorter batches) and at most the model's context length {max}")]
    BadContext { ctx: usize, max: usize },
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error(transparent)]
    Write(#[from] slm_model::gguf_write::WriteError),
}

#[derive(Debug, Clone)]
struct Entry {
    sums: Vec<f32>,
    count: f32,
    /// sums / count: what quantization weighs by (1 where nothing was counted, as
    /// llama-quantize reads it).
    weights: Vec<f32>,
}

impl Entry {
    fn new(sums: Vec<f32>, count: f32) -> Self {
        let weights = if count > 0.0 {
            sums.iter().map(|s| s / count).collect()
        } else {
            vec![1.0; sums.len()]
        };
        Self {
            sums,
            count,
            weights,
        }
    }
}

/// An importance matrix: entries by weight name, and how it was made.
#[derive(Debug, Clone, Default)]
pub struct Imatrix {
    entries: BTreeMap<String, Entry>,
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    pub chunk_size: u32,
    /// The file it was read from (recorded in a quantized model's metadata).
    pub file: String,
}

impl Imatrix {
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Per-column sums of squares and count of the weight `name`.
    pub fn entry(&self, name: &str) -> Option<(&[f32], f32)> {
        self.entries.get(name).map(|e| (e.sums.as_slice(), e.count))
    }

    /// Reads an importance matrix written by llama-imatrix or `slm imatrix`.
    pub fn load(path: &Path) -> Result<Self, ImatrixError> {
        let bad = |what: String| ImatrixError::File {
            path: path.display().to_string(),
            what,
        };
        let file = GgufFile::open(path).map_err(|e| {
            bad(format!(
                "not a GGUF importance matrix ({e}); the legacy .dat format is not read: \
                 convert it with `llama-imatrix --in-file FILE.dat -o FILE.gguf`"
            ))
        })?;
        let mut parts: BTreeMap<
            &str,
            (
                Option<&slm_model::gguf::TensorInfo>,
                Option<&slm_model::gguf::TensorInfo>,
            ),
        > = BTreeMap::new();
        for t in &file.tensors {
            if let Some(n) = t.name.strip_suffix(".in_sum2") {
                parts.entry(n).or_default().0 = Some(t);
            } else if let Some(n) = t.name.strip_suffix(".counts") {
                parts.entry(n).or_default().1 = Some(t);
            }
        }
        if parts.is_empty() {
            return Err(bad(
                "no NAME.in_sum2 / NAME.counts tensors: not an importance matrix".into(),
            ));
        }
        let floats = |t: &slm_model::gguf::TensorInfo| -> Result<Vec<f32>, ImatrixError> {
            if t.dtype != GgmlType::F32 {
                return Err(bad(format!(
                    "tensor '{}' is {}, expected F32",
                    t.name,
                    t.dtype.name()
                )));
            }
            Ok(crate::export::FloatType::F32.values(file.tensor_bytes(t)))
        };
        let mut entries = BTreeMap::new();
        for (name, part) in parts {
            let (Some(s), Some(c)) = part else {
                return Err(bad(format!(
                    "'{name}' has sums without counts or counts without sums"
                )));
            };
            let sums = floats(s)?;
            let counts = floats(c)?;
            if counts.len() != 1 {
                return Err(bad(format!(
                    "'{name}' has {} counts: importance matrices of expert (MoE) layers are not supported",
                    counts.len()
                )));
            }
            if let Some(v) = sums.iter().chain(&counts).find(|v| !v.is_finite()) {
                return Err(bad(format!("'{name}' holds the non-finite value {v}")));
            }
            entries.insert(name.to_string(), Entry::new(sums, counts[0]));
        }
        let u32_of = |k: &str| file.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
        let datasets = file
            .get_str_array("imatrix.datasets")
            .ok()
            .flatten()
            .map(|v| v.into_iter().map(str::to_string).collect())
            .unwrap_or_default();
        Ok(Self {
            entries,
            datasets,
            chunk_count: u32_of("imatrix.chunk_count"),
            chunk_size: u32_of("imatrix.chunk_size"),
            file: path.display().to_string(),
        })
    }

    /// Writes the matrix as llama-imatrix does: entries sorted by name, 1-D F32 tensors.
    pub fn save(&self, path: &Path) -> Result<(), ImatrixError> {
        let mut meta = BTreeMap::new();
        meta.insert("general.type".into(), Value::String("imatrix".into()));
        meta.insert(
            "imatrix.datasets".into(),
            Value::Array(self.datasets.iter().cloned().map(Value::String).collect()),
        );
        meta.insert("imatrix.chunk_count".into(), Value::U32(self.chunk_count));
        meta.insert("imatrix.chunk_size".into(), Value::U32(self.chunk_size));
        let names: Vec<(String, String)> = self
            .entries
            .keys()
            .map(|n| (format!("{n}.in_sum2"), format!("{n}.counts")))
            .collect();
        let data: Vec<(Vec<u8>, Vec<u8>, [usize; 1])> = self
            .entries
            .values()
            .map(|e| {
                (
                    e.sums.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    e.count.to_le_bytes().to_vec(),
                    [e.sums.len()],
                )
            })
            .collect();
        let mut tensors = Vec::new();
        for ((sn, cn), (s, c, dims)) in names.iter().zip(&data) {
            tensors.push(TensorOut {
                name: sn,
                dims: dims.as_slice(),
                dtype: GgmlType::F32,
                data: s,
            });
            tensors.push(TensorOut {
                name: cn,
                dims: &[1],
                dtype: GgmlType::F32,
                data: c,
            });
        }
        write_gguf(path, &meta, &tensors)?;
        Ok(())
    }

    /// The importance of each column of weight `name` with rows of `cols`, if the matrix has
    /// one of that length.
    pub fn weights(&self, name: &str, cols: usize) -> Option<&[f32]> {
        self.entries
            .get(name)
            .map(|e| e.weights.as_slice())
            .filter(|w| w.len() == cols)
    }

    /// Refuses a matrix made for another model: one whose entries name none of `tensors`
    /// (name, dims), or whose entry for a tensor has another length than its rows. (A token
    /// embedding's entry of another length is passed over, as llama-quantize does: some
    /// tools record its lookups.)
    pub fn check_fits(&self, tensors: &[(&str, &[usize])]) -> Result<(), String> {
        let mut matched = 0;
        for (name, dims) in tensors {
            let Some(e) = self.entries.get(*name) else {
                continue;
            };
            matched += 1;
            let cols = dims[dims.len() - 1];
            if e.sums.len() != cols && *name != "token_embd.weight" {
                return Err(format!(
                    "the importance matrix {} has {} values for '{name}', whose rows hold {cols}: \
                     it was made for another model",
                    self.file,
                    e.sums.len()
                ));
            }
        }
        if matched == 0 {
            return Err(format!(
                "none of the {} entries of the importance matrix {} (first: '{}') names a tensor \
                 of this model: it was made for another model",
                self.entries.len(),
                self.file,
                self.entries.keys().next().map_or("", String::as_str)
            ));
        }
        Ok(())
    }

    /// The metadata llama-quantize records about the matrix it used, in its order.
    pub fn provenance(&self) -> Vec<(String, Value)> {
        let mut v = vec![(
            "quantize.imatrix.file".to_string(),
            Value::String(self.file.clone()),
        )];
        if let Some(d) = self.datasets.first() {
            v.push(("quantize.imatrix.dataset".into(), Value::String(d.clone())));
        }
        v.push((
            "quantize.imatrix.entries_count".to_string(),
            Value::U32(self.entries.len() as u32),
        ));
        if self.chunk_count > 0 {
            v.push((
                "quantize.imatrix.chunks_count".into(),
                Value::U32(self.chunk_count),
            ));
        }
        v
    }
}

/// The importance matrix of `model` over `tokens` by llama-imatrix's method: windows of `ctx`
/// tokens, each from an empty cache with its first token replaced by `bos` (a BOS-using
/// model), every projection's input rows squared and summed per column. At most `chunks`
/// windows; `dataset` names the text in the file.
pub fn compute(
    model: &Llama,
    tokens: &[u32],
    ctx: usize,
    bos: Option<u32>,
    chunks: Option<usize>,
    dataset: &str,
    progress: bool,
) -> Result<Imatrix, ImatrixError> {
    let max = model.config.max_position_embeddings;
    if !(16..=max).contains(&ctx) {
        return Err(ImatrixError::BadContext { ctx, max });
    }
    if tokens.len() < 2 * ctx {
        return Err(ImatrixError::TooShort {
            tokens: tokens.len(),
            ctx,
        });
    }
    let n = (tokens.len() / ctx).min(chunks.unwrap_or(usize::MAX));
    let (observed, taps) = model.observed();
    let bar = if progress {
        ProgressBar::new(n as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("imatrix {bar:30} {pos}/{len} chunks  {per_sec}  eta {eta}")
            .expect("static template"),
    );
    for c in 0..n {
        let mut window = tokens[c * ctx..(c + 1) * ctx].to_vec();
        if let Some(b) = bos {
            window[0] = b;
        }
        let mut cache = observed.new_cache();
        let ids = Tensor::new(window.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        observed.forward(&ids, Some(&mut cache), true)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut entries = BTreeMap::new();
    for (name, stats) in taps {
        let s = stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("input statistics poisoned".into()))?;
        if let Some(v) = s.sum2.iter().find(|v| !v.is_finite()) {
            return Err(candle_core::Error::Msg(format!(
                "the inputs of {name} reached the non-finite square sum {v}"
            ))
            .into());
        }
        entries.insert(name, Entry::new(s.sum2.clone(), s.rows as f32));
    }
    Ok(Imatrix {
        entries,
        datasets: vec![dataset.to_string()],
        chunk_count: n as u32,
        chunk_size: ctx as u32,
        file: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An importance-matrix-shaped GGUF in `dir` with `tensors` (name, dtype, f32 values).
    fn file(dir: &Path, name: &str, tensors: &[(&str, GgmlType, Vec<f32>)]) -> std::path::PathBuf {
        let path = dir.join(name);
        let data: Vec<(Vec<u8>, [usize; 1])> = tensors
            .iter()
            .map(|(_, ty, v)| {
                let bytes: Vec<u8> = match ty {
                    GgmlType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    _ => v
                        .iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect(),
                };
                (bytes, [v.len()])
            })
            .collect();
        let outs: Vec<TensorOut> = tensors
            .iter()
            .zip(&data)
            .map(|((n, ty, _), (b, dims))| TensorOut {
                name: n,
                dims: dims.as_slice(),
                dtype: *ty,
                data: b,
            })
            .collect();
        write_gguf(&path, &BTreeMap::new(), &outs).unwrap();
        path
    }

    fn load_err(path: &Path) -> String {
        Imatrix::load(path).unwrap_err().to_string()
    }

    #[test]
    fn files_that_are_not_importance_matrices_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let f32 = GgmlType::F32;
        std::fs::write(d.join("legacy.dat"), [1u8, 0, 0, 0, 5, 0]).unwrap();
        let e = load_err(&d.join("legacy.dat"));
        assert!(
            e.contains("legacy.dat") && e.contains("llama-imatrix --in-file"),
            "{e}"
        );
        let p = file(
            d,
            "model.gguf",
            &[("blk.0.attn_q.weight", f32, vec![1.0; 4])],
        );
        assert!(load_err(&p).contains("not an importance matrix"));
        let p = file(
            d,
            "half.gguf",
            &[
                ("a.in_sum2", GgmlType::F16, vec![1.0; 4]),
                ("a.counts", f32, vec![2.0]),
            ],
        );
        assert!(load_err(&p).contains("'a.in_sum2' is F16, expected F32"));
        let p = file(d, "lonely.gguf", &[("a.in_sum2", f32, vec![1.0; 4])]);
        assert!(load_err(&p).contains("'a' has sums without counts"));
        let p = file(
            d,
            "moe.gguf",
            &[
                ("a.in_sum2", f32, vec![1.0; 4]),
                ("a.counts", f32, vec![2.0, 2.0]),
            ],
        );
        assert!(load_err(&p).contains("2 counts: importance matrices of expert (MoE) layers"));
        let p = file(
            d,
            "nan.gguf",
            &[
                ("a.in_sum2", f32, vec![1.0, f32::NAN]),
                ("a.counts", f32, vec![2.0]),
            ],
        );
        assert!(load_err(&p).contains("'a' holds the non-finite value NaN"));
    }

    #[test]
    fn a_matrix_must_fit_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let f32 = GgmlType::F32;
        let p = file(
            dir.path(),
            "m.gguf",
            &[
                ("blk.0.ffn_up.weight.in_sum2", f32, vec![4.0; 8]),
                ("blk.0.ffn_up.weight.counts", f32, vec![2.0]),
            ],
        );
        let im = Imatrix::load(&p).unwrap();
        assert_eq!(im.weights("blk.0.ffn_up.weight", 8), Some(&[2.0f32; 8][..]));
        assert_eq!(im.weights("blk.0.ffn_up.weight", 16), None);
        im.check_fits(&[("blk.0.ffn_up.weight", &[32, 8])]).unwrap();
        let e = im
            .check_fits(&[("blk.0.ffn_up.weight", &[32, 16])])
            .unwrap_err();
        assert!(
            e.contains("has 8 values for 'blk.0.ffn_up.weight', whose rows hold 16"),
            "{e}"
        );
        let e = im
            .check_fits(&[("blk.0.attn_q.weight", &[8, 8])])
            .unwrap_err();
        assert!(
            e.contains("none of the 1 entries") && e.contains("(first: 'blk.0.ffn_up.weight')"),
            "{e}"
        );
    }
}
