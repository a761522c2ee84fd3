//! One training run: recipe in, checkpoints, metrics.jsonl and a model folder out.
//!
//! Everything a run's future depends on — parameters, AdamW moments, the update count, the
//! batch sampler's RNG, the planned number of updates — is in each checkpoint, so a resumed
//! run computes the same losses as one that was never stopped.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use slm_data::Dataset;
use slm_model::{Config, Llama, Weights};

use crate::init::{init_params_except, Rng};
use crate::kd_cache::Cache;
use crate::optim::AdamWConfig;
use crate::parent::Parent;
use crate::recipe::{Objective, Recipe, TeacherSpec};
use crate::schedule::Schedule;
use crate::teacher::TeacherModel;
use crate::trainer::Trainer;
use slm_kernels::kd::{Teacher, TeacherSource};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Recipe(#[from] crate::recipe::RecipeError),
    #[error(transparent)]
    Data(#[from] slm_data::DataError),
    #[error(transparent)]
    Model(#[from] slm_model::weights::WeightError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Setup(String),
    #[error("step {step}: the loss is {loss}; training stopped (lower optim.lr or raise optim.warmup, then resume from the last checkpoint)")]
    Diverged { step: u64, loss: f32 },
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |err| TrainError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// The part of a checkpoint that is not tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    pub step: u64,
    pub tokens: u64,
    pub rng: u64,
    pub total_steps: u64,
    pub elapsed_s: f64,
}

/// What the caller hears after each update.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u64,
    pub total_steps: u64,
    pub tokens: u64,
    pub loss: f32,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub valid_loss: Option<f32>,
    /// A classifier's share of validation targets predicted right.
    pub valid_accuracy: Option<f64>,
}

pub struct Outcome {
    pub state: RunState,
    pub train_loss: f32,
    pub valid_loss: Option<f32>,
    pub valid_accuracy: Option<f64>,
    /// The model folder, written when the run finished its budget.
    pub model_dir: Option<PathBuf>,
    pub interrupted: bool,
}

/// Random training windows of `ctx + 1` tokens, drawn with a counter-based RNG whose whole
/// state is one u64.
fn sample_batch(data: &Dataset, rng: &mut Rng, batch: usize, ctx: usize) -> Vec<u32> {
    let usable: Vec<usize> = data
        .train
        .iter()
        .map(|s| s.len().saturating_sub(ctx + 1))
        .collect();
    let total: usize = usable.iter().sum();
    let mut out = Vec::with_capacity(batch * (ctx + 1));
    for _ in 0..batch {
        let mut at = (rng.next_u64() % (total as u64 + 1)) as usize;
        let (mut i, mut start) = (0, 0);
        for (k, &u) in usable.iter().enumerate() {
            if at <= u && u > 0 {
                i = k;
                start = at;
                break;
            }
            at -= u.min(at);
        }
        out.extend(data.train[i].slice(start, ctx + 1));
    }
    out
}

/// Fixed validation windows spread evenly over the validation shards.
fn valid_batches(data: &Dataset, n: usize, batch: usize, ctx: usize) -> Vec<Vec<u32>> {
    let shards: Vec<&slm_data::Shard> = data.valid.iter().filter(|s| s.len() > ctx).collect();
    let total: usize = shards.iter().map(|s| s.len() - ctx - 1).sum();
    if total == 0 {
        return Vec::new();
    }
    let windows = n * batch;
    let mut all = Vec::with_capacity(windows);
    for w in 0..windows {
        let mut at = w * total / windows;
        for s in &shards {
            let u = s.len() - ctx - 1;
            if at < u {
                all.push(s.slice(at, ctx + 1));
                break;
            }
            at -= u;
        }
    }
    all.chunks(batch).map(|c| c.concat()).collect()
}

fn valid_loss(trainer: &mut Trainer, batches: &[Vec<u32>]) -> Result<Option<f32>> {
    if batches.is_empty() {
        return Ok(None);
    }
    let mut sum = 0f64;
    for b in batches {
        sum += trainer.loss(b)? as f64;
    }
    Ok(Some((sum / batches.len() as f64) as f32))
}

/// The openings of three validation windows, spread over the validation set.
fn sample_prompts(valid: &[Vec<u32>], ctx: usize) -> Vec<Vec<u32>> {
    let windows: Vec<&[u32]> = valid.iter().flat_map(|b| b.chunks(ctx + 1)).collect();
    let n = windows.len().min(3);
    (0..n)
        .map(|i| windows[i * windows.len() / n][..crate::samples::PROMPT_TOKENS.min(ctx)].to_vec())
        .collect()
}

fn write_samples(
    path: &Path,
    model: &Llama,
    tokenizer: &tokenizers::Tokenizer,
    prompts: &[Vec<u32>],
    eos: u32,
    state: &RunState,
) -> Result<()> {
    let seed = state.step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let new = crate::samples::continue_prompts(model, prompts, eos, seed)?;
    let decode = |ids: &[u32]| tokenizer.decode(ids, false).unwrap_or_default();
    let mut lines = String::new();
    for (p, n) in prompts.iter().zip(&new) {
        let s = crate::samples::Sample {
            step: state.step,
            tokens: state.tokens,
            prompt: decode(p),
            text: decode(n),
        };
        lines.push_str(&serde_json::to_string(&s).expect("sample serializes"));
        lines.push('\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    // One write for the whole pass, so a kill cannot leave half a line.
    f.write_all(lines.as_bytes()).map_err(io(path))?;
    f.sync_data().map_err(io(path))
}

fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-"))
                        && p.join("state.json").is_file()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Writes a checkpoint folder under a temporary name, syncs it, then renames it into place:
/// a crash leaves either the whole checkpoint or none of it.
/// A checkpoint holds what trains (`trained`: every weight, or a LoRA run's adapters and
/// head) and its AdamW moments; a frozen base is the parent's, read again on resume.
fn save_checkpoint(
    dir: &Path,
    vars: &VarMap,
    trained: &[String],
    optim_state: &HashMap<String, Tensor>,
    state: &RunState,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = format!("step-{:08}", state.step);
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let weights: HashMap<String, Tensor> = {
        let data = vars.data().lock().expect("var map lock");
        trained
            .iter()
            .map(|n| (n.clone(), data[n].as_tensor().clone()))
            .collect()
    };
    candle_core::safetensors::save(&weights, tmp.join("model.safetensors"))?;
    candle_core::safetensors::save(optim_state, tmp.join("optim.safetensors"))?;
    let json = serde_json::to_vec_pretty(state).expect("state serializes");
    std::fs::write(tmp.join("state.json"), json).map_err(io(&tmp))?;
    for f in ["model.safetensors", "optim.safetensors", "state.json"] {
        sync_file(&tmp.join(f))?;
    }
    let done = dir.join(&name);
    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(&tmp, &done).map_err(io(&done))?;
    sync_file(dir)?;
    let all = checkpoints(dir);
    for old in &all[..all.len().saturating_sub(keep)] {
        // Renamed away first (atomic), so a kill during the deletion never leaves a
        // half-deleted checkpoint that still looks complete; leftovers are swept at start.
        let name = old.file_name().and_then(|n| n.to_str()).unwrap_or("old");
        let trash = dir.join(format!(".{name}.old.tmp"));
        if std::fs::rename(old, &trash).is_ok() {
            let _ = std::fs::remove_dir_all(&trash);
        }
    }
    Ok(done)
}

/// A JSON Lines log without the lines past `step` (written after the checkpoint a resume uses).
fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    if text.is_empty() && step == 0 {
        return Ok(());
    }
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let body = kept.iter().map(|l| format!("{l}\n")).collect::<String>();
    slm_data::shard::write_atomic(path, |f| f.write_all(body.as_bytes()))?;
    Ok(())
}

pub struct RunOptions<'a> {
    pub resume: bool,
    /// Set (by Ctrl-C) to checkpoint and stop after the current update.
    pub stop: &'a AtomicBool,
    pub on_step: &'a mut dyn FnMut(&StepReport),
}

/// What the run trains on: token shards (pretraining) or a task file (a classifier head).
enum Feed {
    Lm {
        data: Dataset,
        valid: Vec<Vec<u32>>,
    },
    Task {
        data: crate::task::TaskData,
        order: crate::task::Order,
    },
}

/// The tokenizer, the configuration and the data of a pretraining run.
fn open_lm(recipe: &Recipe, tok_json: &[u8], parent: Option<&Parent>) -> Result<(Config, Feed)> {
    let shards = recipe.data.shards();
    let data = Dataset::open(shards, &slm_data::tokenizer_sha256(tok_json))?;
    let (vocab, eos) = (data.manifest.vocab_size as usize, data.manifest.eos_id);
    let cfg: Config = recipe.config(vocab, eos, parent.map(|p| (p.path.as_path(), &p.cfg)))?;
    cfg.validate(&shards.display().to_string())
        .map_err(|e| TrainError::Setup(e.to_string()))?;
    let ctx = cfg.max_position_embeddings;
    let longest = data.train.iter().map(|s| s.len()).max().unwrap_or(0);
    if longest < ctx + 1 {
        return Err(TrainError::Setup(format!(
            "{}: the longest training shard has {longest} tokens; model.context {ctx} needs at least {}",
            shards.display(),
            ctx + 1
        )));
    }
    let valid = valid_batches(&data, recipe.eval.batches, recipe.optim.batch, ctx);
    if valid.is_empty() {
        let longest = data.valid.iter().map(|s| s.len()).max().unwrap_or(0);
        if data.manifest.valid.tokens > 0 {
            return Err(TrainError::Setup(format!(
                "{}: the longest validation shard has {longest} tokens, model.context {ctx} needs \
                 {}: prepare the shards with a larger --valid-fraction or lower model.context",
                shards.display(),
                ctx + 1
            )));
        }
        tracing::warn!(
            "{} has no validation tokens: the run reports no validation loss",
            shards.display()
        );
    }
    Ok((cfg, Feed::Lm { data, valid }))
}

/// The parent's configuration with the task's head, and the task's examples. The
/// configuration trains over the examples' positions; the parent's own context is what the
/// model folder keeps.
fn open_task(recipe: &Recipe, parent: &Parent) -> Result<(Config, Feed, usize)> {
    let tok = &parent.tokenizer;
    let name = parent.path.display().to_string();
    let mut cfg = parent.cfg.clone();
    if cfg.head != slm_model::Head::Lm {
        return Err(TrainError::Setup(format!(
            "{name}: the parent already has a {}; fine-tune the language model it was made from",
            cfg.head.describe()
        )));
    }
    let pad = cfg
        .eos_token_id
        .or(tok.eos)
        .ok_or_else(|| TrainError::Setup(format!("{name}: no eos_token_id to pad with")))?;
    let data = match &recipe.objective {
        Objective::Sft(sft) => {
            crate::sft::load(recipe, tok, pad, cfg.max_position_embeddings, sft.pack)?
        }
        _ => crate::task::load(recipe, tok, pad, cfg.max_position_embeddings)?,
    };
    if data.positions > cfg.max_position_embeddings {
        return Err(TrainError::Setup(format!(
            "model.context {} is longer than the parent's context {}",
            data.positions, cfg.max_position_embeddings
        )));
    }
    if data.skipped > 0 {
        tracing::info!(
            "left out {} rows with a label in objective.skip_labels",
            data.skipped
        );
    }
    if data.unscored > 0 {
        tracing::warn!(
            "left out {} conversations with no assistant token in their first {} (model.context)",
            data.unscored,
            data.positions
        );
    }
    if data.truncated_rows > 0 {
        tracing::warn!(
            "{} rows are longer than {} tokens and were cut to their first {} (model.context); {} tagged words lost their target",
            data.truncated_rows, data.positions, data.positions, data.truncated_words
        );
    }
    let parent_ctx = cfg.max_position_embeddings;
    cfg.head = data.head.clone();
    cfg.max_position_embeddings = data.positions;
    cfg.validate(&name)
        .map_err(|e| TrainError::Setup(e.to_string()))?;
    let lens = data.train.iter().map(|e| e.len).collect();
    let order = crate::task::Order::new(recipe.run.seed, lens, recipe.optim.batch);
    Ok((cfg, Feed::Task { data, order }, parent_ctx))
}

/// Where a distillation run's teacher targets come from.
enum Targets {
    Online(Box<TeacherModel>),
    Cached(Cache),
}

/// A distillation run's teacher and the windows it draws (see `kd_cache`).
struct Distillation {
    spec: TeacherSpec,
    targets: Targets,
    windows: Vec<(usize, usize)>,
}

impl Distillation {
    fn open(
        spec: &TeacherSpec,
        data: &Dataset,
        tokenizer: &tokenizers::Tokenizer,
        tok_name: &Path,
        cfg: &Config,
    ) -> Result<Self> {
        let ctx = cfg.max_position_embeddings;
        let windows = crate::kd_cache::windows(data, ctx);
        let targets = match &spec.cache {
            Some(dir) => {
                let sha = crate::teacher::weights_sha256(&spec.model)?;
                let c = Cache::open(dir, data, &sha, ctx, spec.top_k, spec.temperature)?;
                tracing::info!(
                    "teacher targets from {} (top {}, made by {})",
                    dir.display(),
                    c.meta.top_k,
                    c.meta.teacher.display()
                );
                Targets::Cached(c)
            }
            None => {
                let t = TeacherModel::open(&spec.model, tokenizer, tok_name, cfg.vocab_size, ctx)?;
                tracing::info!("teacher {} (sha256 {})", spec.model.display(), t.sha256);
                Targets::Online(Box::new(t))
            }
        };
        Ok(Self {
            spec: spec.clone(),
            targets,
            windows,
        })
    }

    /// The teacher's sha256 (a cache is opened only for the teacher it was made by).
    fn sha256(&self) -> &str {
        match &self.targets {
            Targets::Online(t) => &t.sha256,
            Targets::Cached(c) => &c.meta.teacher_sha256,
        }
    }

    /// One micro-batch: `batch` windows drawn with `rng`, the student's update against the
    /// teacher's targets (its logits made chunk by chunk in the fused head, or a top k).
    fn accumulate(
        &self,
        trainer: &mut Trainer,
        data: &Dataset,
        rng: &mut Rng,
        scale: f32,
    ) -> Result<f32> {
        let t = trainer.positions();
        let batch = trainer.tokens_per_batch() / (t + 1);
        let picked: Vec<usize> = (0..batch)
            .map(|_| (rng.next_u64() % self.windows.len() as u64) as usize)
            .collect();
        let mut tokens = Vec::with_capacity(batch * (t + 1));
        for &w in &picked {
            let (s, start) = self.windows[w];
            tokens.extend(data.train[s].slice(start, t + 1));
        }
        let kd = self.spec.distill();
        let online = match &self.targets {
            Targets::Online(teacher) => {
                let inputs: Vec<u32> = tokens
                    .chunks_exact(t + 1)
                    .flat_map(|row| &row[..t])
                    .copied()
                    .collect();
                Some((teacher, teacher.hidden(&inputs, batch)?))
            }
            Targets::Cached(_) => None,
        };
        let top = match (&self.targets, &online) {
            (Targets::Cached(c), _) => Some(c.targets(&picked)?),
            (_, Some((teacher, hidden))) if self.spec.top_k > 0 => {
                Some(teacher.top_k(hidden, self.spec.top_k, self.spec.temperature)?)
            }
            _ => None,
        };
        if let Some(top) = top {
            let source = top.source();
            return Ok(trainer.accumulate_distilled(&tokens, scale, Teacher { kd, source })?);
        }
        let (teacher, hidden) = online.expect("a run without a cache has its teacher");
        let mut failed = None;
        let mut fill = |first: usize, rows: usize, out: &mut [f32]| {
            if let Err(e) = teacher.logits(&hidden, first, rows, out) {
                failed.get_or_insert(e);
            }
        };
        let source = TeacherSource::Logits(&mut fill);
        let loss = trainer.accumulate_distilled(&tokens, scale, Teacher { kd, source })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(loss),
        }
    }
}

pub fn train(recipe: &Recipe, opts: RunOptions) -> Result<Outcome> {
    let t0 = Instant::now();
    let dev = Device::Cpu;
    let parent = recipe
        .model
        .parent
        .as_deref()
        .map(Parent::open)
        .transpose()?;
    let (tok_json, tok_name) = match (&recipe.data.tokenizer, &parent) {
        (Some(t), _) => (std::fs::read(t).map_err(io(t))?, t.clone()),
        (None, Some(p)) => (p.tokenizer_json.clone(), p.path.clone()),
        (None, None) => unreachable!("validated: pretraining names its tokenizer"),
    };
    let tokenizer = tokenizers::Tokenizer::from_bytes(&tok_json)
        .map_err(|e| TrainError::Setup(format!("{}: {e}", tok_name.display())))?;
    let (cfg, mut feed, saved_ctx) = match &parent {
        Some(p) if recipe.objective.fine_tunes() => open_task(recipe, p)?,
        _ => {
            let (cfg, feed) = open_lm(recipe, &tok_json, parent.as_ref())?;
            let ctx = cfg.max_position_embeddings;
            (cfg, feed, ctx)
        }
    };
    let (batch, ctx) = (recipe.optim.batch, cfg.max_position_embeddings);
    let distill = match (&recipe.teacher, &feed) {
        (Some(spec), Feed::Lm { data, .. }) => {
            Some(Distillation::open(spec, data, &tokenizer, &tok_name, &cfg)?)
        }
        _ => None,
    };
    let need = crate::trainer::memory_bytes(&cfg, batch);
    if let Some(have) = slm_kernels::process::physical_memory_bytes() {
        if need > have as u128 {
            return Err(TrainError::Setup(format!(
                "this recipe needs about {:.1} GB to train ({} parameters, their gradients and \
                 AdamW moments, and the activations of optim.batch {batch} x model.context {ctx}); \
                 this machine has {:.1} GB: lower optim.batch, model.context or the model's size",
                need as f64 / 1e9,
                cfg.num_params(),
                have as f64 / 1e9
            )));
        }
    }
    let out = &recipe.run.out;
    let ckpt_dir = out.join("checkpoints");
    let metrics_path = out.join("metrics.jsonl");
    let samples_path = out.join("samples.jsonl");
    let existing = checkpoints(&ckpt_dir);
    if !opts.resume && !existing.is_empty() {
        return Err(TrainError::Setup(format!(
            "{} already holds checkpoints: resume with --resume, or set run.out to a new folder",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let recipe_text = toml::to_string(recipe).map_err(|e| TrainError::Setup(e.to_string()))?;
    slm_data::shard::write_atomic(&out.join("recipe.toml"), |f| {
        f.write_all(recipe_text.as_bytes())
    })?;

    let lora = recipe.lora.as_ref().map(|l| l.config());
    // A LoRA run over a GGUF parent keeps its quantized projections in their blocks: they
    // are no variables.
    let blocks = match (&parent, &lora) {
        (Some(p), Some(_)) => p.blocks(&cfg)?,
        _ => Default::default(),
    };
    if !blocks.is_empty() {
        tracing::info!(
            "{} of the parent's projections stay in their GGUF blocks",
            blocks.len()
        );
    }
    let vars = init_params_except(&cfg, DType::F32, recipe.run.seed, &dev, |p| {
        p.layer.is_some_and(|l| blocks.contains_key(&(l, p.role)))
    })?;
    if let Some(parent) = &parent {
        parent.load(&vars, &tok_json)?;
    }
    if let Some(l) = &lora {
        crate::adapter::init(&vars, &cfg, l, recipe.run.seed)?;
    }
    // The candle model over the same variables writes the samples of a pretraining run.
    let model = match feed {
        Feed::Lm { .. } => Some(Llama::load(
            &cfg,
            &Weights::Vars(VarBuilder::from_varmap(&vars, DType::F32, &dev)),
            &dev,
        )?),
        Feed::Task { .. } => None,
    };
    let o = &recipe.optim;
    let adam = AdamWConfig {
        beta1: o.beta1,
        beta2: o.beta2,
        eps: 1e-8,
        weight_decay: o.weight_decay,
    };
    let mut trainer = match &lora {
        Some(l) => Trainer::with_lora(&cfg, batch, adam, &vars, l, blocks)?,
        None => Trainer::new(&cfg, batch, adam, &vars)?,
    };
    if let Feed::Task { data, .. } = &feed {
        trainer.set_class_weights(data.class_weights.clone())?;
    }
    let tokens_per_step = (batch * o.grad_accum * ctx) as u64;
    let per_update = (batch * o.grad_accum) as f64;
    let total_steps = match (&feed, recipe.budget.tokens, recipe.budget.epochs) {
        (_, Some(t), _) => t.div_ceil(tokens_per_step).max(1),
        (Feed::Task { data, .. }, _, Some(e)) => {
            ((e * data.train.len() as f64 / per_update).ceil() as u64).max(1)
        }
        _ => 0,
    };
    let mut state = RunState {
        step: 0,
        tokens: 0,
        rng: recipe.run.seed ^ 0x5eed_da7a,
        total_steps,
        elapsed_s: 0.0,
    };
    if opts.resume {
        // The newest checkpoint that reads back whole; one that does not (a truncated file,
        // a state that does not fit the run) is named and passed over for the one before.
        let mut tried: Vec<(PathBuf, String)> = Vec::new();
        for ckpt in existing.iter().rev() {
            match resume_from(ckpt, &vars, &mut trainer, &dev, tokens_per_step, &state) {
                Ok(s) => {
                    for (bad, why) in &tried {
                        tracing::warn!(
                            "checkpoint {} is unusable ({why}); resumed from the previous one, {}",
                            bad.display(),
                            ckpt.display()
                        );
                    }
                    state = s;
                    tracing::info!("resumed from {} (update {})", ckpt.display(), state.step);
                    break;
                }
                Err(e) => tried.push((ckpt.clone(), e.to_string())),
            }
        }
        if !existing.is_empty() && tried.len() == existing.len() {
            let list: Vec<String> = tried
                .iter()
                .map(|(p, why)| format!("{}: {why}", p.display()))
                .collect();
            return Err(TrainError::Setup(format!(
                "no checkpoint of {} can be resumed:\n  {}",
                ckpt_dir.display(),
                list.join("\n  ")
            )));
        }
    }
    // The log holds exactly the updates the starting state has seen: lines a killed run wrote
    // after its last checkpoint are dropped (a fresh run starts an empty log).
    truncate_log(&metrics_path, state.step)?;
    truncate_log(&samples_path, state.step)?;
    if let Ok(entries) = std::fs::read_dir(&ckpt_dir) {
        for e in entries.flatten() {
            let n = e.file_name();
            if n.to_str()
                .is_some_and(|n| n.starts_with('.') && n.ends_with(".tmp"))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(io(&metrics_path))?;
    let prompts = match &feed {
        Feed::Lm { valid, .. } => sample_prompts(valid, ctx),
        Feed::Task { .. } => Vec::new(),
    };
    let mut last_validation = None;
    let mut rng = Rng(state.rng);
    let mut last_loss = f32::NAN;
    let mut last_valid = None;
    let run_start = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut interrupted = false;
    let mut first_four = 0f64;

    while state.total_steps == 0 || state.step < state.total_steps {
        let step_start = Instant::now();
        let mut loss_sum = 0f32;
        // Positions computed: a task's batches run over their longest row only.
        let mut computed = 0u64;
        trainer.zero_grads();
        for micro in 0..o.grad_accum as u64 {
            let scale = 1.0 / o.grad_accum as f32;
            trainer.set_dropout_round(state.step * o.grad_accum as u64 + micro);
            loss_sum += match &mut feed {
                Feed::Lm { data, .. } => {
                    computed += (batch * ctx) as u64;
                    match &distill {
                        Some(kd) => kd.accumulate(&mut trainer, data, &mut rng, scale)?,
                        None => {
                            let toks = sample_batch(data, &mut rng, batch, ctx);
                            trainer.accumulate(&toks, scale)?
                        }
                    }
                }
                Feed::Task { data, order } => {
                    let first = (state.step * o.grad_accum as u64 + micro) * batch as u64;
                    let picked: Vec<usize> =
                        (0..batch as u64).map(|i| order.at(first + i)).collect();
                    let mb = crate::task::batch_of(picked.iter().map(|&i| &data.train[i]));
                    mb.configure(&mut trainer)?;
                    computed += mb.inputs.len() as u64;
                    trainer.accumulate_targets(&mb.inputs, &mb.targets, scale)?
                }
            };
        }
        let loss = loss_sum / o.grad_accum as f32;
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                step: state.step + 1,
                loss,
            });
        }
        let norm = trainer.grad_norm();
        let scale = if o.grad_clip > 0.0 && norm > o.grad_clip {
            o.grad_clip / (norm + 1e-6)
        } else {
            1.0
        };
        // A time budget becomes a number of updates once the speed is known: a first guess
        // after 4 updates, refined after 20 (the first ones run slower while buffers warm up),
        // both before any checkpoint. From then on it is fixed and saved, so the schedule and
        // a resumed run no longer depend on the clock.
        if let Some(minutes) = recipe.budget.minutes {
            if state.step == 4 || (state.step == 20 && state.total_steps > 20) {
                let spent = run_start.elapsed().as_secs_f64();
                let per_step = match state.step {
                    4 => spent / 4.0,
                    _ => (spent - first_four) / 16.0,
                };
                // Evaluation and checkpoints take about 5% on top of the updates.
                let left = (minutes * 60.0 - spent) / 1.05;
                // Saturating: budget.minutes is bounded, but the clock is not ours.
                state.total_steps = state
                    .step
                    .saturating_add((left / per_step).clamp(1.0, 1e15) as u64);
                if state.step == 4 {
                    first_four = spent;
                }
            }
        }
        let sched = Schedule {
            lr: o.lr,
            warmup: o.warmup,
            total: state.total_steps.max(state.step + 1),
            min_ratio: o.min_lr_ratio,
        };
        let lr = sched.at(state.step);
        trainer.step(lr, scale);
        state.step += 1;
        state.tokens += tokens_per_step;
        state.rng = rng.0;
        state.elapsed_s = elapsed_before + run_start.elapsed().as_secs_f64();
        last_loss = loss;
        let tps = computed as f64 / step_start.elapsed().as_secs_f64();
        let finished = state.total_steps != 0 && state.step >= state.total_steps;
        let eval_now = finished
            || (recipe.eval.interval > 0 && state.step.is_multiple_of(recipe.eval.interval));
        if eval_now {
            trainer.write_params(&vars)?;
        }
        let mut accuracy = None;
        let vl = match &feed {
            _ if !eval_now => None,
            Feed::Lm { valid, .. } => valid_loss(&mut trainer, valid)?,
            Feed::Task { data, .. } if data.head == slm_model::Head::Lm => {
                Some(crate::task::validate_lm(&mut trainer, &data.valid, batch)?)
            }
            Feed::Task { data, .. } => {
                let v = crate::task::validate(
                    &mut trainer,
                    &data.valid,
                    batch,
                    data.head.labels().len(),
                )?;
                accuracy = Some(v.accuracy);
                let json = serde_json::json!({
                    "step": state.step,
                    "labels": data.head.labels(),
                    "accuracy": v.accuracy,
                    "loss": v.loss,
                    "confusion": v.confusion,
                });
                let path = out.join("validation.json");
                slm_data::shard::write_atomic(&path, |f| {
                    f.write_all(&serde_json::to_vec_pretty(&json).expect("json"))
                })?;
                let loss = v.loss;
                last_validation = Some(v);
                Some(loss)
            }
        };
        if vl.is_some() {
            last_valid = vl;
        }
        let report_now = vl.is_some();
        let mut line = serde_json::json!({
            "step": state.step, "tokens": state.tokens, "loss": loss, "lr": lr,
            "grad_norm": norm, "tokens_per_s": tps, "elapsed_s": state.elapsed_s,
        });
        match (vl, accuracy) {
            (Some(v), Some(a)) => {
                line["valid_loss"] = v.into();
                line["valid_accuracy"] = a.into();
            }
            (Some(v), None) => {
                line["valid_loss"] = v.into();
                line["valid_ppl"] = (v as f64).exp().into();
            }
            _ => {}
        }
        // One write per line, so a kill cannot leave half a line for the next one to join.
        metrics
            .write_all(format!("{line}\n").as_bytes())
            .map_err(io(&metrics_path))?;
        if report_now {
            metrics.sync_data().map_err(io(&metrics_path))?;
            if let Some(model) = &model {
                let eos = cfg.eos_token_id.unwrap_or(0);
                write_samples(&samples_path, model, &tokenizer, &prompts, eos, &state)?;
            }
            crate::report::write_report(out)?;
        }
        (opts.on_step)(&StepReport {
            step: state.step,
            total_steps: state.total_steps,
            tokens: state.tokens,
            loss,
            lr,
            tokens_per_s: tps,
            valid_loss: vl,
            valid_accuracy: accuracy,
        });
        let stop = opts.stop.load(Ordering::SeqCst);
        let ckpt_now = finished
            || stop
            || (recipe.checkpoint.interval > 0
                && state.step.is_multiple_of(recipe.checkpoint.interval));
        if ckpt_now {
            if !eval_now {
                trainer.write_params(&vars)?;
            }
            metrics.sync_data().map_err(io(&metrics_path))?;
            save_checkpoint(
                &ckpt_dir,
                &vars,
                &trainer.trainable_names(),
                &trainer.state()?,
                &state,
                recipe.checkpoint.keep,
            )?;
        }
        if stop && !finished {
            interrupted = true;
            break;
        }
    }
    let model_dir = if interrupted {
        None
    } else {
        let mut saved = cfg.clone();
        saved.max_position_embeddings = saved_ctx;
        let lineage = match &feed {
            Feed::Lm { data, .. } => serde_json::json!({
                "shards": recipe.data.shards,
                "corpus_sha256": data.manifest.corpus_sha256,
                "tokenizer_sha256": data.manifest.tokenizer_sha256,
                "train_tokens": data.manifest.train.tokens,
                "valid_tokens": data.manifest.valid.tokens,
                // The loss and its settings are the recipe's [teacher].
                "teacher": distill.as_ref().map(|t| serde_json::json!({
                    "model": t.spec.model,
                    "sha256": t.sha256(),
                    "cache": t.spec.cache,
                })),
            }),
            Feed::Task { data, .. } => {
                let sha = |p: &Option<PathBuf>| -> Result<Option<String>> {
                    p.as_ref()
                        .map(|p| slm_data::file_sha256(p).map_err(io(p)))
                        .transpose()
                };
                serde_json::json!({
                    "train": recipe.data.train,
                    "train_sha256": sha(&recipe.data.train)?,
                    "valid": recipe.data.valid,
                    "valid_sha256": sha(&recipe.data.valid)?,
                    "train_rows": data.train.len(),
                    "valid_rows": data.valid.len(),
                    "skipped_rows": data.skipped,
                    "positions": data.positions,
                    "truncated_rows": data.truncated_rows,
                    "class_weights": data.class_weights,
                    "labels": data.head.labels(),
                    "final_valid_accuracy": last_validation.as_ref().map(|v| v.accuracy),
                    "final_valid_confusion": last_validation.as_ref().map(|v| &v.confusion),
                })
            }
        };
        match (&lora, &recipe.model.parent) {
            (Some(l), Some(parent)) => {
                let slm = serde_json::json!({
                    "recipe": recipe,
                    "data": lineage,
                    "parent": parent,
                    "tokens_seen": state.tokens,
                    "updates": state.step,
                    "wall_time_s": state.elapsed_s.max(t0.elapsed().as_secs_f64()),
                    "final_train_loss": last_loss,
                    "final_valid_loss": last_valid,
                });
                let dir = recipe.run.out.join("adapter");
                Some(crate::adapter::write(&dir, &saved, l, &vars, parent, slm)?)
            }
            _ => Some(write_model_folder(
                recipe,
                parent.as_ref(),
                &saved,
                &vars,
                &tok_json,
                &tokenizer,
                lineage,
                &state,
                last_loss,
                last_valid,
                t0,
            )?),
        }
    };
    Ok(Outcome {
        state,
        train_loss: last_loss,
        valid_loss: last_valid,
        valid_accuracy: last_validation.as_ref().map(|v| v.accuracy),
        model_dir,
        interrupted,
    })
}

/// Loads checkpoint `dir` into `vars` and `trainer` and returns its state, after checking
/// that the state belongs to this run: its update count is the folder's, within the planned
/// updates, and its tokens are what that many updates of this recipe see.
fn resume_from(
    dir: &Path,
    vars: &VarMap,
    trainer: &mut Trainer,
    dev: &Device,
    tokens_per_step: u64,
    fresh: &RunState,
) -> Result<RunState> {
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(io(&sp))?;
    let state: RunState = serde_json::from_str(&text)
        .map_err(|e| TrainError::Setup(format!("{}: {e}", sp.display())))?;
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse::<u64>().ok());
    let planned = if fresh.total_steps > 0 {
        fresh.total_steps
    } else {
        state.total_steps
    };
    let consistent = named == Some(state.step)
        && (planned == 0 || state.step <= planned)
        && state.tokens == state.step.saturating_mul(tokens_per_step)
        && state.elapsed_s.is_finite();
    if !consistent {
        return Err(TrainError::Setup(format!(
            "{}: update {}, {} tokens, {} planned does not match the folder's name or this \
             recipe ({tokens_per_step} tokens per update)",
            sp.display(),
            state.step,
            state.tokens,
            state.total_steps
        )));
    }
    let read = |name: &str| -> Result<HashMap<String, Tensor>> {
        let p = dir.join(name);
        candle_core::safetensors::load(&p, dev)
            .map_err(|e| TrainError::Setup(format!("{}: {e}", p.display())))
    };
    let weights = read("model.safetensors")?;
    let optim = read("optim.safetensors")?;
    {
        let data = vars.data().lock().expect("var map lock");
        for name in trainer.trainable_names() {
            let var = &data[&name];
            let t = weights
                .get(&name)
                .ok_or_else(|| TrainError::Setup(format!("{}: no tensor {name}", dir.display())))?;
            var.set(t)
                .map_err(|e| TrainError::Setup(format!("{}: {name}: {e}", dir.display())))?;
        }
    }
    trainer.read_params(vars)?;
    trainer.load_state(&optim, state.step).map_err(|e| {
        TrainError::Setup(format!("{}: {e}", dir.join("optim.safetensors").display()))
    })?;
    Ok(state)
}

/// The ids generation stops at: the end of text, and the end of a chat turn where the
/// vocabulary has ChatML's (slm's own tokenizers and their chat template do), so that a
/// model fine-tuned on conversations ends its reply.
fn stop_ids(cfg: &Config, tokenizer: &tokenizers::Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = cfg.eos_token_id.into_iter().collect();
    if let Some(end) = tokenizer.token_to_id(slm_tokenizer::train::IM_END) {
        if !ids.contains(&end) {
            ids.push(end);
        }
    }
    ids
}

/// `run.out/model/`: a Hugging Face folder (transformers and slm load it) plus slm.json.
#[allow(clippy::too_many_arguments)]
fn write_model_folder(
    recipe: &Recipe,
    parent: Option<&Parent>,
    cfg: &Config,
    vars: &VarMap,
    tok_json: &[u8],
    tokenizer: &tokenizers::Tokenizer,
    data: serde_json::Value,
    state: &RunState,
    train_loss: f32,
    valid_loss: Option<f32>,
    t0: Instant,
) -> Result<PathBuf> {
    let out = &recipe.run.out;
    let dir = out.join("model");
    let tmp = out.join(".model.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let eos = cfg.eos_token_id.unwrap_or(0);
    let eos_text = tokenizer.id_to_token(eos).unwrap_or_default();
    let mut config = cfg.to_hf_json();
    config["torch_dtype"] = "float32".into();
    // A fine-tuned model keeps its parent's tokenizer settings, the chat template with them.
    let tcfg = match parent {
        Some(p) => p.tokenizer_config.clone(),
        None => {
            let mut t = slm_tokenizer::train::tokenizer_config_json(cfg.max_position_embeddings);
            t["eos_token"] = eos_text.clone().into();
            t["pad_token"] = eos_text.into();
            t
        }
    };
    let slm = serde_json::json!({
        "recipe": recipe,
        "data": data,
        "parent": recipe.model.parent,
        "tokens_seen": state.tokens,
        "updates": state.step,
        "wall_time_s": state.elapsed_s.max(t0.elapsed().as_secs_f64()),
        "final_train_loss": train_loss,
        "final_valid_loss": valid_loss,
        "final_valid_ppl": valid_loss.map(|v| (v as f64).exp()),
        "parameters": cfg.num_params(),
    });
    let files: [(&str, Vec<u8>); 5] = [
        (
            "config.json",
            serde_json::to_vec_pretty(&config).expect("json"),
        ),
        ("tokenizer.json", tok_json.to_vec()),
        (
            "tokenizer_config.json",
            serde_json::to_vec_pretty(&tcfg).expect("json"),
        ),
        (
            "generation_config.json",
            serde_json::to_vec_pretty(&serde_json::json!({
                "eos_token_id": stop_ids(cfg, tokenizer),
                "pad_token_id": eos
            }))
            .expect("json"),
        ),
        ("slm.json", serde_json::to_vec_pretty(&slm).expect("json")),
    ];
    for (name, bytes) in files {
        let p = tmp.join(name);
        std::fs::write(&p, bytes).map_err(io(&p))?;
        sync_file(&p)?;
    }
    vars.save(tmp.join("model.safetensors"))?;
    sync_file(&tmp.join("model.safetensors"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    Ok(dir)
}
