//! The recipe: one TOML file per run. Unknown keys are errors (a typo must not silently fall
//! back to a default), and so are values out of range, each naming its key.
//!
//! ```toml
//! [run]
//! out = "runs/tiny"          # the run folder: checkpoints, metrics.jsonl, report, model/
//! seed = 0
//! [data]
//! shards = "shards"          # from `slm data prepare`
//! tokenizer = "tokenizer.json"
//! [model]                    # a new model of this shape, or parent = "runs/base/model"
//! d_model = 256
//! layers = 4
//! heads = 4
//! kv_heads = 4
//! ffn = 688
//! context = 256
//! [budget]
//! tokens = 2_000_000         # or minutes = 10
//! [optim]
//! batch = 16
//! lr = 1e-3
//! ```
//! Relative paths are relative to the recipe's folder.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: {msg}", path.display())]
    Parse { path: PathBuf, msg: String },
    #[error("{}: {key} = {value}: {expected}", path.display())]
    Value {
        path: PathBuf,
        key: &'static str,
        value: String,
        expected: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub run: Run,
    pub data: Data,
    pub model: ModelShape,
    #[serde(default)]
    pub objective: Objective,
    /// Train low-rank adapters over the frozen parent instead of every weight.
    pub lora: Option<Lora>,
    /// The teacher of a distillation run (`objective.kind = "kd"`).
    pub teacher: Option<TeacherSpec>,
    pub budget: Budget,
    #[serde(default)]
    pub optim: Optim,
    #[serde(default)]
    pub eval: Eval,
    #[serde(default)]
    pub checkpoint: Checkpoint,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Run {
    pub out: PathBuf,
    #[serde(default)]
    pub seed: u64,
}

/// Pretraining reads token shards (`shards`, made with `tokenizer`); fine-tuning reads a
/// task file (`train`, and `valid` or a held-out `valid_fraction` of it) with the parent
/// model's tokenizer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Data {
    pub shards: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub train: Option<PathBuf>,
    pub valid: Option<PathBuf>,
    pub valid_fraction: Option<f64>,
}

impl Data {
    /// The shards of a pretraining run (`validate` made sure it has them).
    pub fn shards(&self) -> &Path {
        self.shards
            .as_deref()
            .expect("validated: lm runs have data.shards")
    }
}

/// Either a new model's shape, or `parent`: a model folder (Hugging Face layout, as `slm train`
/// writes) or a GGUF file, whose shape and weights the run continues from (a LoRA run keeps a
/// GGUF parent's quantized projections in their blocks). With a parent only `context` may
/// be given (at most the parent's).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub parent: Option<PathBuf>,
    pub d_model: Option<usize>,
    pub layers: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub ffn: Option<usize>,
    pub context: Option<usize>,
    pub tied_embeddings: Option<bool>,
    pub rope_theta: Option<f64>,
}

/// What the model is trained to do: next-token prediction, or a label per text (`classify`,
/// a sequence-classification head) or per word (`tag`, a token-classification head over
/// BIO tags), both fine-tuning `model.parent`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum Objective {
    #[default]
    Lm,
    /// Pretraining on token shards taught by `[teacher]`: each position's loss is the
    /// divergence from the teacher's distribution, mixed with the next-token cross-entropy.
    Kd,
    Classify(Labels),
    Tag(Labels),
    /// Chat fine-tuning: conversations rendered with the parent's chat template, the loss on
    /// what the assistant writes.
    Sft(Sft),
}

/// `kind = "sft"`'s settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Sft {
    /// Several conversations per row, each attending only within itself (default); false:
    /// one per row, padded.
    pub pack: bool,
}

impl Default for Sft {
    fn default() -> Self {
        Self { pack: true }
    }
}

/// `[teacher]`: the model a distillation run learns from, and the loss's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    /// Any model slm loads (a folder or a GGUF file, quantized or not) with the student's
    /// tokenizer.
    pub model: PathBuf,
    /// Softens both distributions (logits / T); the divergence is scaled by T².
    #[serde(default = "one")]
    pub temperature: f64,
    /// The distillation term's weight; the next-token cross-entropy gets 1 - alpha.
    #[serde(default = "half")]
    pub alpha: f64,
    /// Compare the teacher's top k tokens and the mass of the rest (0: the whole vocabulary).
    #[serde(default)]
    pub top_k: usize,
    /// "forward" (KL(teacher ‖ student)), "reverse" (KL(student ‖ teacher)) or "jsd" (TRL's
    /// generalised Jensen-Shannon divergence with `beta`).
    #[serde(default)]
    pub loss: KdLoss,
    /// A cache of the teacher's targets (`slm distill cache`) to read instead of running
    /// the teacher: made from the run's shards by `model` at `temperature` and model.context
    /// (its top k is the run's).
    pub cache: Option<PathBuf>,
    /// The teacher's share of the "jsd" mixture, strictly between 0 and 1.
    #[serde(default = "half")]
    pub beta: f64,
}

fn one() -> f64 {
    1.0
}

fn half() -> f64 {
    0.5
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum KdLoss {
    #[default]
    Forward,
    Reverse,
    Jsd,
}

/// A temperature past this flattens any distribution slm trains to uniform.
pub const MAX_TEMPERATURE: f64 = 1000.0;

/// A top-k larger than this is no longer a sparse target (the whole vocabulary: 0).
pub const MAX_TOP_K: usize = 4096;

impl TeacherSpec {
    /// The kernels' settings of the loss.
    pub fn distill(&self) -> slm_kernels::kd::Distill {
        use slm_kernels::kd::Divergence;
        slm_kernels::kd::Distill {
            temperature: self.temperature,
            alpha: self.alpha,
            divergence: match self.loss {
                KdLoss::Forward => Divergence::Forward,
                KdLoss::Reverse => Divergence::Reverse,
                KdLoss::Jsd => Divergence::Jsd { beta: self.beta },
            },
        }
    }
}

/// A head's labels and how the training rows are weighed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Labels {
    /// The labels in id order; by default those of the training file, sorted.
    pub labels: Option<Vec<String>>,
    /// Rows with these labels are left out (three-way sentiment data trained as two-way:
    /// `skip_labels = ["neutral"]`); any other label outside `labels` is an error.
    pub skip_labels: Vec<String>,
    /// "balanced" weighs each label by n / (labels x its count), as scikit-learn's
    /// class_weight does; or one weight per label.
    pub class_weights: Option<ClassWeights>,
    /// Tagging only: feed each sentence twice and read the tags in the second copy, where
    /// every word has seen the whole sentence (a causal model's tokens otherwise see only
    /// the words before them). The model folder records it, so eval and predict echo too.
    pub echo: bool,
}

/// `[lora]`: rank, alpha (the adapters' output is scaled by alpha / rank, as PEFT does),
/// dropout (of the adapters' input in training, as PEFT's lora_dropout) and the projections
/// adapted (PEFT's names, q_proj ... down_proj, or short: q, k, v, o, gate, up, down; default
/// all seven).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Lora {
    pub r: usize,
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "all_targets")]
    pub targets: Vec<String>,
}

fn all_targets() -> Vec<String> {
    slm_model::Role::LORA_TARGETS
        .iter()
        .map(|t| t.1.to_string())
        .collect()
}

/// Adapters wider than this rank are no longer low-rank for any model slm trains.
const MAX_LORA_RANK: usize = 4096;

impl Lora {
    /// The trainer's settings: the targets as roles (validated names).
    pub fn config(&self) -> crate::trainer::LoraConfig {
        let targets = slm_model::Role::LORA_TARGETS
            .iter()
            .filter(|(_, name)| {
                self.targets
                    .iter()
                    .any(|t| t == name || format!("{t}_proj") == *name)
            })
            .map(|t| t.0)
            .collect();
        crate::trainer::LoraConfig {
            rank: self.r,
            alpha: self.alpha,
            targets,
            dropout: self.dropout,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ClassWeights {
    Named(String),
    Each(Vec<f64>),
}

impl Objective {
    /// The head's settings of a classify or tag run.
    pub fn labels(&self) -> Option<&Labels> {
        match self {
            Objective::Lm | Objective::Kd | Objective::Sft(_) => None,
            Objective::Classify(l) | Objective::Tag(l) => Some(l),
        }
    }

    /// Whether the run fine-tunes `model.parent` on a task file (rather than pretraining on
    /// token shards).
    pub fn fine_tunes(&self) -> bool {
        !matches!(self, Objective::Lm | Objective::Kd)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub tokens: Option<u64>,
    pub minutes: Option<f64>,
    /// Passes over a task file (fine-tuning).
    pub epochs: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Optim {
    /// Sequences per micro-batch.
    pub batch: usize,
    /// Micro-batches per update.
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr_ratio: f64,
    /// Updates of linear warmup.
    pub warmup: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Global gradient-norm limit (0: no clipping).
    pub grad_clip: f64,
}

impl Default for Optim {
    fn default() -> Self {
        Self {
            batch: 16,
            grad_accum: 1,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Eval {
    /// Updates between validation passes (0: only at the end).
    pub interval: u64,
    /// Validation batches per pass.
    pub batches: usize,
}

impl Default for Eval {
    fn default() -> Self {
        Self {
            interval: 200,
            batches: 16,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Checkpoint {
    /// Updates between checkpoints (0: only at the end and on Ctrl-C).
    pub interval: u64,
    /// Checkpoints kept; older ones are deleted.
    pub keep: usize,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Self {
            interval: 200,
            keep: 2,
        }
    }
}

/// Sequences per micro-batch: far above what fits in memory for any useful context, low
/// enough that the product with the other bounds cannot overflow.
const MAX_BATCH: usize = 1 << 16;
/// Micro-batches per update: a larger effective batch is a larger `batch` or a longer run.
const MAX_GRAD_ACCUM: usize = 1 << 12;
const MAX_EVAL_BATCHES: usize = 1 << 16;
const MAX_KEEP: usize = 1 << 16;
/// A year: a time budget is turned into a number of updates, which must stay finite.
const MAX_MINUTES: f64 = 525_600.0;
/// Passes over a task file: fine-tuning takes a few; the bound keeps the update count finite.
const MAX_EPOCHS: f64 = 10_000.0;

impl Recipe {
    /// Reads, resolves relative paths against the recipe's folder, and validates.
    pub fn load(path: &Path) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|err| RecipeError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        let mut r = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let d = &mut r.data;
        let optional = [
            d.shards.as_mut(),
            d.tokenizer.as_mut(),
            d.train.as_mut(),
            d.valid.as_mut(),
            r.model.parent.as_mut(),
        ];
        let teacher = r
            .teacher
            .as_mut()
            .map(|t| std::iter::once(&mut t.model).chain(t.cache.as_mut()));
        let all = std::iter::once(&mut r.run.out)
            .chain(optional.into_iter().flatten())
            .chain(teacher.into_iter().flatten());
        for p in all {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(r)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, RecipeError> {
        let r: Recipe = toml::from_str(text).map_err(|e| RecipeError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string().trim_end().to_string(),
        })?;
        r.validate(path)?;
        Ok(r)
    }

    fn validate(&self, path: &Path) -> Result<(), RecipeError> {
        let bad = |key: &'static str, value: String, expected: &str| {
            Err(RecipeError::Value {
                path: path.to_path_buf(),
                key,
                value,
                expected: expected.into(),
            })
        };
        self.validate_task(path)?;
        match (&self.objective, &self.teacher) {
            (Objective::Kd, None) => {
                return bad(
                    "teacher",
                    "(missing)".into(),
                    "objective.kind = \"kd\" learns from a [teacher] (model = ...)",
                )
            }
            (Objective::Kd, Some(t)) => {
                if !(t.temperature > 0.0 && t.temperature <= MAX_TEMPERATURE) {
                    return bad(
                        "teacher.temperature",
                        t.temperature.to_string(),
                        &format!("expected 0 < temperature <= {MAX_TEMPERATURE}"),
                    );
                }
                if !(0.0..=1.0).contains(&t.alpha) {
                    return bad(
                        "teacher.alpha",
                        t.alpha.to_string(),
                        "expected 0 <= alpha <= 1 (the distillation term's weight)",
                    );
                }
                if t.top_k > MAX_TOP_K {
                    return bad(
                        "teacher.top_k",
                        t.top_k.to_string(),
                        &format!("expected at most {MAX_TOP_K} (0: the whole vocabulary)"),
                    );
                }
                if t.loss == KdLoss::Jsd && !(t.beta > 0.0 && t.beta < 1.0) {
                    return bad(
                        "teacher.beta",
                        t.beta.to_string(),
                        "expected 0 < beta < 1 (its limits are loss = \"forward\" and \"reverse\")",
                    );
                }
            }
            (_, Some(_)) => {
                return bad(
                    "teacher",
                    "(set)".into(),
                    "a teacher is for objective.kind = \"kd\"",
                )
            }
            _ => {}
        }
        if let Some(l) = &self.lora {
            let bad = |key: &'static str, value: String, expected: String| {
                Err(RecipeError::Value {
                    path: path.to_path_buf(),
                    key,
                    value,
                    expected,
                })
            };
            if self.model.parent.is_none() {
                return bad(
                    "lora",
                    "{..}".into(),
                    "adapters train over a model: give model.parent".into(),
                );
            }
            if l.r == 0 || l.r > MAX_LORA_RANK {
                return bad(
                    "lora.r",
                    l.r.to_string(),
                    format!("expected 1 to {MAX_LORA_RANK}"),
                );
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                return bad(
                    "lora.alpha",
                    l.alpha.to_string(),
                    "expected a positive number".into(),
                );
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return bad(
                    "lora.dropout",
                    l.dropout.to_string(),
                    "expected 0 <= dropout < 1".into(),
                );
            }
            let known = all_targets();
            if l.targets.is_empty() {
                return bad(
                    "lora.targets",
                    "[]".into(),
                    format!("expected some of {known:?}"),
                );
            }
            if let Some(t) = l
                .targets
                .iter()
                .find(|t| !known.iter().any(|k| k == *t || *k == format!("{t}_proj")))
            {
                return bad(
                    "lora.targets",
                    format!("{t:?}"),
                    format!(
                        "the model has no projection {t:?}; LoRA adapts {known:?} (or q, k, v, o, gate, up, down)"
                    ),
                );
            }
        }
        let m = &self.model;
        let shape = [
            ("model.d_model", m.d_model),
            ("model.layers", m.layers),
            ("model.heads", m.heads),
            ("model.ffn", m.ffn),
            ("model.context", m.context),
        ];
        if m.parent.is_some() {
            let shape_keys = [
                ("model.d_model", m.d_model.is_some()),
                ("model.layers", m.layers.is_some()),
                ("model.heads", m.heads.is_some()),
                ("model.kv_heads", m.kv_heads.is_some()),
                ("model.ffn", m.ffn.is_some()),
                ("model.tied_embeddings", m.tied_embeddings.is_some()),
                ("model.rope_theta", m.rope_theta.is_some()),
            ];
            if let Some((key, _)) = shape_keys.iter().find(|(_, set)| *set) {
                return bad(
                    key,
                    "(set)".into(),
                    "the shape comes from model.parent; give one or the other",
                );
            }
        } else if let Some((key, _)) = shape.iter().find(|(_, v)| v.is_none()) {
            return bad(
                key,
                "(missing)".into(),
                "a new model needs its shape (or model.parent)",
            );
        }
        let counts = [
            ("optim.batch", Some(self.optim.batch)),
            ("optim.grad_accum", Some(self.optim.grad_accum)),
            ("eval.batches", Some(self.eval.batches)),
            ("checkpoint.keep", Some(self.checkpoint.keep)),
        ];
        if let Some((key, _)) = shape.iter().chain(&counts).find(|(_, v)| *v == Some(0)) {
            return bad(key, "0".into(), "expected a positive integer");
        }
        // Every size is bounded before anything is sized from it (slm_format::limits); the
        // memory the whole shape needs is checked against the machine when the run starts.
        use slm_model::limits;
        let bounds = [
            ("model.d_model", m.d_model, limits::MAX_HIDDEN),
            ("model.layers", m.layers, limits::MAX_LAYERS),
            ("model.heads", m.heads, limits::MAX_HEADS),
            ("model.kv_heads", m.kv_heads, limits::MAX_HEADS),
            ("model.ffn", m.ffn, limits::MAX_FFN),
            ("model.context", m.context, limits::MAX_CONTEXT),
            ("optim.batch", Some(self.optim.batch), MAX_BATCH),
            (
                "optim.grad_accum",
                Some(self.optim.grad_accum),
                MAX_GRAD_ACCUM,
            ),
            ("eval.batches", Some(self.eval.batches), MAX_EVAL_BATCHES),
            ("checkpoint.keep", Some(self.checkpoint.keep), MAX_KEEP),
        ];
        for (key, v, max) in bounds {
            if let Some(v) = v.filter(|&v| v > max) {
                return bad(
                    key,
                    v.to_string(),
                    &format!("expected at most {max} (slm's limits, see the README)"),
                );
            }
        }
        if let (Some(d_model), Some(heads)) = (m.d_model, m.heads) {
            if !d_model.is_multiple_of(heads) || !(d_model / heads).is_multiple_of(2) {
                return bad(
                    "model.heads",
                    heads.to_string(),
                    &format!("d_model {d_model} must split into heads of an even size"),
                );
            }
            let kv = m.kv_heads.unwrap_or(heads);
            if kv == 0 || !heads.is_multiple_of(kv) {
                return bad(
                    "model.kv_heads",
                    kv.to_string(),
                    &format!("expected a divisor of heads ({heads})"),
                );
            }
        }
        if let Some(theta) = m.rope_theta {
            if !(theta.is_finite() && theta > 1.0) {
                return bad(
                    "model.rope_theta",
                    theta.to_string(),
                    "expected a finite number above 1",
                );
            }
        }
        let b = &self.budget;
        if [b.tokens.is_some(), b.minutes.is_some(), b.epochs.is_some()]
            .iter()
            .filter(|x| **x)
            .count()
            != 1
        {
            return bad(
                "budget",
                "{..}".into(),
                "expected exactly one of tokens, minutes or epochs",
            );
        }
        if let Objective::Classify(Labels { echo: true, .. }) = self.objective {
            return bad(
                "objective.echo",
                "true".into(),
                "echo applies to kind = \"tag\" (a classify head already reads the last token, which has seen the whole text)",
            );
        }
        if let Some(e) = b.epochs {
            if !self.objective.fine_tunes() {
                return bad(
                    "budget.epochs",
                    e.to_string(),
                    "pretraining samples windows from shards; give tokens or minutes",
                );
            }
            if !(e > 0.0 && e <= MAX_EPOCHS) {
                return bad(
                    "budget.epochs",
                    e.to_string(),
                    &format!("expected a number of passes in (0, {MAX_EPOCHS}]"),
                );
            }
        }
        match (self.budget.tokens, self.budget.minutes) {
            (Some(0), _) => return bad("budget.tokens", "0".into(), "expected > 0"),
            (_, Some(x)) if !(x > 0.0 && x <= MAX_MINUTES) => {
                return bad(
                    "budget.minutes",
                    x.to_string(),
                    &format!("expected a number of minutes in (0, {MAX_MINUTES}] (a year)"),
                )
            }
            (Some(tokens), None) => {
                if let (Some(ctx), None) = (m.context, &m.parent) {
                    let per_update = (self.optim.batch * self.optim.grad_accum * ctx) as u64;
                    if per_update > tokens {
                        return bad(
                            "optim.grad_accum",
                            self.optim.grad_accum.to_string(),
                            &format!(
                                "one update takes batch {} x grad_accum {} x context {ctx} = {per_update} tokens, more than budget.tokens {tokens}",
                                self.optim.batch, self.optim.grad_accum
                            ),
                        );
                    }
                }
            }
            _ => {}
        }
        let o = &self.optim;
        if !(o.lr > 0.0 && o.lr < 1.0) {
            return bad("optim.lr", o.lr.to_string(), "expected 0 < lr < 1");
        }
        for (key, v) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(key, v.to_string(), "expected 0 <= beta < 1");
            }
        }
        for (key, v) in [
            ("optim.min_lr_ratio", o.min_lr_ratio),
            ("optim.weight_decay", o.weight_decay),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(key, v.to_string(), "expected a number in [0, 1]");
            }
        }
        if o.grad_clip.is_nan() || o.grad_clip < 0.0 {
            return bad("optim.grad_clip", o.grad_clip.to_string(), "expected >= 0");
        }
        Ok(())
    }

    /// Which data keys the objective reads, and a fine-tuning run's parent and head settings.
    fn validate_task(&self, path: &Path) -> Result<(), RecipeError> {
        let bad = |key: &'static str, value: &str, expected: &str| {
            Err(RecipeError::Value {
                path: path.to_path_buf(),
                key,
                value: value.to_string(),
                expected: expected.into(),
            })
        };
        let d = &self.data;
        let set = |x: bool| if x { "(set)" } else { "(missing)" };
        if !self.objective.fine_tunes() {
            if d.shards.is_none() || d.tokenizer.is_none() {
                let key = if d.shards.is_none() {
                    "data.shards"
                } else {
                    "data.tokenizer"
                };
                return bad(
                    key,
                    "(missing)",
                    "pretraining reads token shards and their tokenizer",
                );
            }
            if let Some((key, _)) = [("data.train", &d.train), ("data.valid", &d.valid)]
                .into_iter()
                .find(|(_, v)| v.is_some())
            {
                return bad(
                    key,
                    "(set)",
                    "task files are for objective.kind classify, tag or sft",
                );
            }
            return Ok(());
        }
        if d.train.is_none() {
            return bad(
                "data.train",
                "(missing)",
                "fine-tuning reads a task file (JSON Lines)",
            );
        }
        if d.shards.is_some() {
            return bad(
                "data.shards",
                set(true),
                "fine-tuning reads data.train, not shards",
            );
        }
        if self.model.parent.is_none() {
            return bad(
                "model.parent",
                "(missing)",
                "fine-tuning starts from a model folder (slm export MODEL.gguf --format hf)",
            );
        }
        match (d.valid.is_some(), d.valid_fraction) {
            (true, Some(f)) => {
                return bad(
                    "data.valid_fraction",
                    &f.to_string(),
                    "give data.valid or data.valid_fraction, not both",
                )
            }
            (_, Some(f)) if !(f > 0.0 && f < 1.0) => {
                return bad(
                    "data.valid_fraction",
                    &f.to_string(),
                    "expected 0 < fraction < 1",
                )
            }
            _ => {}
        }
        let Some(labels) = self.objective.labels() else {
            return Ok(());
        };
        if let Some(l) = &labels.labels {
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = l.iter().find(|x| !seen.insert(*x)) {
                return bad("objective.labels", dup, "each label once");
            }
            if l.len() < 2 || l.len() > slm_model::limits::MAX_LABELS {
                return bad(
                    "objective.labels",
                    &l.len().to_string(),
                    "expected 2 or more labels",
                );
            }
        }
        match &labels.class_weights {
            Some(ClassWeights::Named(n)) if n != "balanced" => {
                return bad(
                    "objective.class_weights",
                    n,
                    "expected \"balanced\" or a list",
                )
            }
            Some(ClassWeights::Each(w)) if !w.iter().all(|x| x.is_finite() && *x >= 0.0) => {
                return bad(
                    "objective.class_weights",
                    &format!("{w:?}"),
                    "expected finite weights >= 0",
                )
            }
            _ => {}
        }
        Ok(())
    }

    /// The model configuration this recipe describes, for a tokenizer of `vocab` tokens: the
    /// new shape, or the configuration of the parent at `parent`'s path (read by
    /// `crate::parent`).
    pub fn config(
        &self,
        vocab: usize,
        eos: u32,
        parent: Option<(&Path, &slm_model::Config)>,
    ) -> Result<slm_model::Config, RecipeError> {
        let m = &self.model;
        if let Some((path, parent)) = parent {
            let mut cfg = parent.clone();
            let bad = |key: &'static str, value: String, expected: String| RecipeError::Value {
                path: path.to_path_buf(),
                key,
                value,
                expected,
            };
            if cfg.vocab_size != vocab {
                return Err(bad(
                    "vocab_size",
                    cfg.vocab_size.to_string(),
                    format!("the shards' tokenizer has {vocab} tokens; train the parent's tokenizer's shards"),
                ));
            }
            if let Some(ctx) = m.context {
                if ctx > cfg.max_position_embeddings {
                    return Err(bad(
                        "max_position_embeddings",
                        cfg.max_position_embeddings.to_string(),
                        format!("the recipe's model.context {ctx} is longer"),
                    ));
                }
                cfg.max_position_embeddings = ctx;
            }
            cfg.eos_token_id = cfg.eos_token_id.or(Some(eos));
            return Ok(cfg);
        }
        let (d, heads) = (m.d_model.unwrap_or(0), m.heads.unwrap_or(1));
        Ok(slm_model::Config {
            arch: slm_model::Arch::Llama,
            vocab_size: vocab,
            hidden_size: d,
            intermediate_size: m.ffn.unwrap_or(0),
            num_hidden_layers: m.layers.unwrap_or(0),
            num_attention_heads: heads,
            num_key_value_heads: m.kv_heads.unwrap_or(heads),
            head_dim: d / heads,
            rms_norm_eps: 1e-5,
            rope_theta: m.rope_theta.unwrap_or(10_000.0),
            rope_scaling: None,
            max_position_embeddings: m.context.unwrap_or(0),
            tie_word_embeddings: m.tied_embeddings.unwrap_or(true),
            attention_bias: false,
            bos_token_id: None,
            eos_token_id: Some(eos),
            head: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[run]
out = "runs/t"
[data]
shards = "s"
tokenizer = "tokenizer.json"
[model]
d_model = 64
layers = 2
heads = 4
ffn = 128
context = 32
[budget]
tokens = 10000
"#;

    fn err(text: &str) -> String {
        Recipe::parse(text, Path::new("r.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn defaults_fill_the_optional_sections() {
        let r = Recipe::parse(GOOD, Path::new("r.toml")).unwrap();
        assert_eq!(r.optim, Optim::default());
        assert_eq!(r.objective, Objective::Lm);
        assert_eq!(r.config(100, 0, None).unwrap().num_key_value_heads, 4);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = err(&GOOD.replace("[budget]", "[budget]\nepochs = 3"));
        assert!(e.contains("r.toml") && e.contains("epochs"), "{e}");
        let e = err(&format!("{GOOD}\n[optim]\nlearning_rate = 0.1\n"));
        assert!(e.contains("learning_rate"), "{e}");
        let e = err(&format!("{GOOD}\n[optim]\nlr = 3.0\n"));
        assert!(e.contains("optim.lr = 3"), "{e}");
        let e = err(&GOOD.replace("heads = 4", "heads = 5"));
        assert!(e.contains("model.heads = 5"), "{e}");
        let e = err(&GOOD.replace("heads = 4", "heads = 4\nkv_heads = 3"));
        assert!(e.contains("model.kv_heads = 3"), "{e}");
        let e = err(&GOOD.replace("tokens = 10000", "tokens = 10000\nminutes = 2"));
        assert!(
            e.contains("exactly one of tokens, minutes or epochs"),
            "{e}"
        );
        let e = err(&GOOD.replace("context = 32", "context = \"long\""));
        assert!(e.contains("context"), "{e}");
        let e = err(&format!("{GOOD}\n[objective]\nkind = \"telepathy\"\n"));
        assert!(e.contains("telepathy"), "{e}");
        let e = err(&GOOD.replace("[run]\n", "[run]\nseed = -1\n"));
        assert!(e.contains("seed"), "{e}");
        let e = err(&GOOD.replace("ffn = 128\n", ""));
        assert!(e.contains("model.ffn = (missing)"), "{e}");
        let e = err(&GOOD.replace("[model]\n", "[model]\nparent = \"runs/base/model\"\n"));
        assert!(
            e.contains("model.d_model") && e.contains("model.parent"),
            "{e}"
        );
    }

    const TASK: &str = r#"
[run]
out = "runs/t"
[data]
train = "train.jsonl"
[model]
parent = "base"
[objective]
kind = "classify"
[budget]
epochs = 2
"#;

    #[test]
    fn fine_tuning_recipes_read_task_files_and_name_what_is_wrong() {
        let r = Recipe::parse(TASK, Path::new("r.toml")).unwrap();
        assert_eq!(r.objective.labels(), Some(&Labels::default()));
        let r = Recipe::parse(
            &TASK.replace(
                "kind = \"classify\"",
                "kind = \"tag\"\nclass_weights = \"balanced\"\nskip_labels = [\"x\"]",
            ),
            Path::new("r.toml"),
        )
        .unwrap();
        assert!(matches!(r.objective, Objective::Tag(_)));
        let r = Recipe::parse(
            &format!("{TASK}[lora]\nr = 8\nalpha = 16\ntargets = [\"q\", \"v_proj\"]\n"),
            Path::new("r.toml"),
        )
        .unwrap();
        let l = r.lora.unwrap().config();
        assert_eq!(l.targets, vec![slm_model::Role::Q, slm_model::Role::V]);
        for (text, want) in [
            (
                TASK.replace("train = \"train.jsonl\"", ""),
                "data.train = (missing)",
            ),
            (
                TASK.replace("train = ", "shards = \"s\"\ntrain = "),
                "data.shards",
            ),
            (
                TASK.replace("parent = \"base\"", "context = 8"),
                "model.parent = (missing)",
            ),
            (
                TASK.replace(
                    "[data]",
                    "[data]\nvalid = \"v.jsonl\"\nvalid_fraction = 0.2",
                ),
                "not both",
            ),
            (
                TASK.replace("[data]", "[data]\nvalid_fraction = 1.5"),
                "data.valid_fraction = 1.5",
            ),
            (
                TASK.replace(
                    "kind = \"classify\"",
                    "kind = \"classify\"\nclass_weights = \"even\"",
                ),
                "objective.class_weights = even",
            ),
            (
                TASK.replace(
                    "kind = \"classify\"",
                    "kind = \"classify\"\nlabels = [\"a\", \"a\"]",
                ),
                "objective.labels = a",
            ),
            (
                TASK.replace("epochs = 2", "epochs = 0"),
                "budget.epochs = 0",
            ),
            (
                GOOD.replace("tokens = 10000", "epochs = 1"),
                "budget.epochs = 1",
            ),
            (format!("{TASK}[lora]\nr = 0\nalpha = 16\n"), "lora.r = 0"),
            (
                format!("{TASK}[lora]\nr = 4\nalpha = 16\ntargets = [\"wq\"]\n"),
                "no projection \"wq\"",
            ),
            (
                format!("{TASK}[lora]\nr = 4\nalpha = 16\ndropout = 1.0\n"),
                "lora.dropout = 1",
            ),
            (
                format!("{GOOD}[lora]\nr = 4\nalpha = 16\n"),
                "give model.parent",
            ),
        ] {
            let e = err(&text);
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
