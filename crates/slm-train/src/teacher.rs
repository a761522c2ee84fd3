//! A distillation run's teacher: any model slm loads (a folder, or a GGUF file run by its
//! own quantized kernels), run forward on each micro-batch's inputs. Its logits are made
//! chunk by chunk as the student's fused head reaches them, or reduced to a top k per
//! position (what a cache of teacher targets holds); no batch x vocabulary tensor is kept.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use slm_model::{Head, Llama};

use crate::run::{Result, TrainError};

/// A teacher's top k per position (row-major, rows x k), and the log of each row's
/// remaining mass: `kd::TeacherSource::TopK`'s data.
pub struct TopK {
    pub k: usize,
    pub ids: Vec<u32>,
    pub logp: Vec<f32>,
    pub rest: Vec<f32>,
}

impl TopK {
    pub fn source(&self) -> slm_kernels::kd::TeacherSource<'_, f32> {
        slm_kernels::kd::TeacherSource::TopK {
            k: self.k,
            ids: &self.ids,
            logp: &self.logp,
            rest: &self.rest,
        }
    }
}

pub struct TeacherModel {
    model: Llama,
    pub path: PathBuf,
    /// sha256 of the weights' file (a GGUF, or a folder's model.safetensors), for lineage.
    pub sha256: String,
    /// The student's vocabulary: logits past it (padding rows of the teacher's embedding,
    /// common in Qwen) are dropped.
    vocab: usize,
}

fn setup(msg: String) -> TrainError {
    TrainError::Setup(msg)
}

/// sha256 of a model's weights: a GGUF file, or a folder's model.safetensors (its index,
/// when sharded).
pub fn weights_sha256(path: &Path) -> Result<String> {
    let weights = if path.is_dir() {
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    };
    match weights.is_file() || !path.is_dir() {
        true => file_sha256(&weights),
        false => file_sha256(&path.join("model.safetensors.index.json")),
    }
}

fn file_sha256(path: &Path) -> Result<String> {
    slm_data::file_sha256(path).map_err(crate::run::io(path))
}

impl TeacherModel {
    /// Loads the teacher at `path` for a student of `vocab` tokens and `context` positions
    /// whose tokenizer is `student` (named `student_name` in errors): both must be the same
    /// tokenizer, and the teacher's context at least the student's.
    pub fn open(
        path: &Path,
        student: &tokenizers::Tokenizer,
        student_name: &Path,
        vocab: usize,
        context: usize,
    ) -> Result<Self> {
        let name = path.display();
        let loaded = slm_model::load(path, &Device::Cpu)
            .map_err(|e| setup(format!("teacher.model: {e}")))?;
        let cfg = loaded.model.config();
        if cfg.head != Head::Lm {
            return Err(setup(format!(
                "teacher.model {name} has a {}; a teacher needs its language-model head",
                cfg.head.describe()
            )));
        }
        let tok = slm_tokenizer::Tokenizer::for_model(&loaded.source)
            .map_err(|e| setup(format!("teacher.model {name}: {e}")))?;
        let (theirs, ours) = (tok.inner.get_vocab(true), student.get_vocab(true));
        let differ = ours
            .iter()
            .filter(|(t, id)| theirs.get(*t) != Some(id))
            .count();
        if differ > 0 || theirs.len() != ours.len() {
            return Err(setup(format!(
                "teacher.model {name}: its tokenizer differs from the student's ({}): {differ} of \
                 the student's {} tokens have another id or none, and the teacher has {} tokens. \
                 Distillation compares the two distributions token by token: make the shards \
                 with the teacher's tokenizer (`slm export {name} --format hf` writes its \
                 tokenizer.json)",
                student_name.display(),
                ours.len(),
                theirs.len()
            )));
        }
        if cfg.vocab_size < vocab {
            return Err(setup(format!(
                "teacher.model {name}: its output has {} rows, fewer than the student's \
                 vocabulary of {vocab}",
                cfg.vocab_size
            )));
        }
        if cfg.max_position_embeddings < context {
            return Err(setup(format!(
                "teacher.model {name}: its context of {} positions is shorter than the \
                 student's {context}",
                cfg.max_position_embeddings
            )));
        }
        let sha256 = weights_sha256(path)?;
        Ok(Self {
            model: loaded.model,
            path: path.to_path_buf(),
            sha256,
            vocab,
        })
    }

    /// The teacher's final-norm hidden states of `inputs` (`batch` rows of equal length,
    /// row-major): one row per position, (batch x positions, width).
    pub fn hidden(&self, inputs: &[u32], batch: usize) -> Result<Tensor> {
        let t = inputs.len() / batch;
        let ids = Tensor::from_slice(inputs, (batch, t), &Device::Cpu)?;
        let h = self.model.hidden(&ids)?;
        let d = h.dim(2)?;
        Ok(h.reshape((batch * t, d))?)
    }

    /// The logits of rows `first..first + rows` of `hidden` over the student's vocabulary,
    /// into `out` (rows x vocabulary).
    pub fn logits(
        &self,
        hidden: &Tensor,
        first: usize,
        rows: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let z = self.model.project(&hidden.narrow(0, first, rows)?)?;
        let z = z
            .narrow(1, 0, self.vocab)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        out[..rows * self.vocab].copy_from_slice(&z);
        Ok(())
    }

    /// The top `k` of every row of `hidden` at `temperature` (`kd::top_k`), its logits made
    /// a chunk of rows at a time.
    pub fn top_k(&self, hidden: &Tensor, k: usize, temperature: f64) -> Result<TopK> {
        use rayon::prelude::*;
        let (n, v) = (hidden.dim(0)?, self.vocab);
        let k = k.min(v);
        let chunk = (slm_kernels::head::HEAD_CHUNK_VALUES / v).clamp(1, n.max(1));
        let mut logits = vec![0f32; chunk * v];
        let mut top = TopK {
            k,
            ids: Vec::with_capacity(n * k),
            logp: Vec::with_capacity(n * k),
            rest: Vec::with_capacity(n),
        };
        for first in (0..n).step_by(chunk) {
            let rows = chunk.min(n - first);
            self.logits(hidden, first, rows, &mut logits)?;
            let per_row: Vec<(Vec<u32>, Vec<f32>, f32)> = logits[..rows * v]
                .par_chunks(v)
                .map_init(Vec::new, |scratch, z| {
                    let (mut ids, mut logp) = (Vec::with_capacity(k), Vec::with_capacity(k));
                    let rest =
                        slm_kernels::kd::top_k(z, temperature, k, scratch, &mut ids, &mut logp);
                    (ids, logp, rest)
                })
                .collect();
            for (ids, logp, rest) in per_row {
                top.ids.extend(ids);
                top.logp.extend(logp);
                top.rest.push(rest);
            }
        }
        // As a cache stores them, so online and cached runs compute alike.
        crate::kd_cache::round_log_probs(&mut top.logp);
        Ok(top)
    }
}
