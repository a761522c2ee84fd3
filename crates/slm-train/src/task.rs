//! Fine-tuning data for a classifier head: a task file (slm_data::tasks) read, its labels
//! fixed, a validation part set aside, and every row encoded as one fixed-length example:
//! the inputs padded on the right, and targets that are `IGNORE` except where the head
//! learns (a text's last token for `classify`, each word's first token for `tag`).
//!
//! Truncation: a row longer than the run's positions keeps its first tokens. A classified
//! text is then labelled at its last kept token; a tagged word whose first token was cut off
//! carries no target (and `truncated_words` counts it).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use slm_data::tasks;
use slm_kernels::head::IGNORE;
use slm_model::Head;
use slm_tokenizer::Tokenizer;

use crate::init::Rng;
use crate::recipe::{ClassWeights, Labels, Objective, Recipe};
use crate::run::{Result, TrainError};

/// One row, `positions` tokens long, of which the first `len` are the row's own.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub len: usize,
    /// A packed row (several conversations): where each position's conversation begins
    /// (`Trainer::set_starts`). `None`: the row is one sequence.
    pub starts: Option<Vec<u32>>,
}

impl Example {
    /// The positions whose targets count, in order.
    pub fn scored(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        self.targets
            .iter()
            .enumerate()
            .filter(|(_, &t)| t != IGNORE)
            .map(|(i, &t)| (i, t))
    }
}

pub struct TaskData {
    pub head: Head,
    pub train: Vec<Example>,
    pub valid: Vec<Example>,
    pub positions: usize,
    /// Rows left out for a label in `skip_labels`.
    pub skipped: usize,
    /// Rows longer than `positions` (cut to it).
    pub truncated_rows: usize,
    /// Tagged words whose first token lay past `positions` (no target).
    pub truncated_words: usize,
    /// Conversations left out because all their assistant tokens lay past `positions`.
    pub unscored: usize,
    pub class_weights: Option<Vec<f64>>,
}

/// A text or a sentence's words with its label ids, before encoding.
enum Row {
    Text(String, usize),
    Words(Vec<String>, Vec<usize>),
}

fn setup(msg: String) -> TrainError {
    TrainError::Setup(msg)
}

/// `rows` split into training and validation rows: `data.valid_fraction` of them (default
/// 0.1, at least one each way) held out by the run's seed.
pub(crate) fn hold_out<T>(rows: Vec<T>, recipe: &Recipe) -> (Vec<T>, Vec<T>) {
    let fraction = recipe.data.valid_fraction.unwrap_or(0.1);
    let n = rows.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng(recipe.run.seed ^ 0x7a11_da7a);
    for i in (1..n).rev() {
        order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let held = ((n as f64 * fraction).round() as usize).clamp(1, n.saturating_sub(1));
    let held: BTreeSet<usize> = order[..held].iter().copied().collect();
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for (i, r) in rows.into_iter().enumerate() {
        if held.contains(&i) {
            valid.push(r);
        } else {
            train.push(r);
        }
    }
    (train, valid)
}

/// Label ids of `found` (in file order): the recipe's `labels` or the sorted labels seen,
/// less `skip_labels`; a label outside them names the file.
fn label_ids(
    cfg: &Labels,
    found: &BTreeSet<String>,
    what: &str,
    file: &Path,
) -> Result<Vec<String>> {
    let labels: Vec<String> = match &cfg.labels {
        Some(l) => l.clone(),
        None => found
            .iter()
            .filter(|l| !cfg.skip_labels.contains(l))
            .cloned()
            .collect(),
    };
    if let Some(other) = found
        .iter()
        .find(|l| !labels.contains(l) && !cfg.skip_labels.contains(l))
    {
        return Err(setup(format!(
            "{}: {what} '{other}' is not among objective.labels {labels:?}; add it there or to \
             objective.skip_labels",
            file.display()
        )));
    }
    if labels.len() < 2 {
        return Err(setup(format!(
            "{}: {} label(s) {labels:?}; a classifier needs at least 2",
            file.display(),
            labels.len()
        )));
    }
    Ok(labels)
}

/// Reads a task file's rows; `None` ids are rows to skip.
fn read_rows(objective: &Objective, path: &Path) -> Result<(Vec<RawRow>, BTreeSet<String>)> {
    let mut found = BTreeSet::new();
    let rows = match objective {
        Objective::Classify(_) => tasks::read_labeled(path)?
            .into_iter()
            .map(|r| {
                found.insert(r.label.clone());
                RawRow::Text(r.text, r.label)
            })
            .collect(),
        _ => tasks::read_tagging(path)?
            .into_iter()
            .map(|r| {
                found.extend(r.tags.iter().cloned());
                RawRow::Words(r.tokens, r.tags)
            })
            .collect(),
    };
    Ok((rows, found))
}

enum RawRow {
    Text(String, String),
    Words(Vec<String>, Vec<String>),
}

/// The rows whose labels are kept, as label ids.
fn to_ids(rows: Vec<RawRow>, labels: &[String], skip: &[String]) -> (Vec<Row>, usize) {
    let id: HashMap<&str, usize> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let mut skipped = 0;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        match r {
            RawRow::Text(text, label) => match id.get(label.as_str()) {
                Some(&i) => out.push(Row::Text(text, i)),
                None => {
                    debug_assert!(skip.contains(&label));
                    skipped += 1;
                }
            },
            RawRow::Words(words, tags) => {
                if tags.iter().any(|t| !id.contains_key(t.as_str())) {
                    skipped += 1;
                    continue;
                }
                let ids = tags.iter().map(|t| id[t.as_str()]).collect();
                out.push(Row::Words(words, ids));
            }
        }
    }
    (out, skipped)
}

/// A row's token ids and, per target, its position and label id (before truncation).
type Encoded = (Vec<u32>, Vec<(usize, u32)>);

fn encode(tok: &Tokenizer, row: &Row, echo: bool) -> Result<Encoded> {
    let err = |e: slm_tokenizer::TokenizerError| setup(format!("cannot tokenize a row: {e}"));
    Ok(match row {
        Row::Text(text, label) => {
            let ids = tok.encode(text, true).map_err(err)?;
            let at = ids.len().saturating_sub(1);
            (ids, vec![(at, *label as u32)])
        }
        Row::Words(words, tags) => {
            let (ids, first) = match echo {
                false => tok.encode_words(words),
                true => tok.encode_words_echoed(words),
            }
            .map_err(err)?;
            let t = first
                .into_iter()
                .zip(tags)
                .map(|(p, &t)| (p, t as u32))
                .collect();
            (ids, t)
        }
    })
}

/// The run's fine-tuning data: labels fixed, a validation part, each row an example of
/// `positions` tokens (model.context, else the longest row's length within `max_positions`).
pub fn load(recipe: &Recipe, tok: &Tokenizer, pad: u32, max_positions: usize) -> Result<TaskData> {
    let obj = &recipe.objective;
    let cfg = obj.labels().expect("a fine-tuning objective");
    let train_path = recipe.data.train.as_deref().expect("validated");
    let (train_raw, found) = read_rows(obj, train_path)?;
    let (valid_raw, valid_found) = match &recipe.data.valid {
        Some(p) => {
            let (r, f) = read_rows(obj, p)?;
            (Some(r), f)
        }
        None => (None, BTreeSet::new()),
    };
    let what = match obj {
        Objective::Classify(_) => "label",
        _ => "tag",
    };
    let labels = label_ids(cfg, &found, what, train_path)?;
    if let Some(p) = &recipe.data.valid {
        label_ids(
            &Labels {
                labels: Some(labels.clone()),
                ..cfg.clone()
            },
            &valid_found,
            what,
            p,
        )?;
    }
    if let Objective::Tag(_) = obj {
        // Labels are a set, not a sequence: each must be a tag BIO allows.
        if let Some(l) = labels
            .iter()
            .find(|l| tasks::check_bio(&[l.replace("I-", "B-")]).is_err())
        {
            return Err(setup(format!("tag label '{l}' is not O, B-TYPE or I-TYPE")));
        }
    }
    let (train_rows, skipped_t) = to_ids(train_raw, &labels, &cfg.skip_labels);
    let (train_rows, valid_rows, skipped_v) = match valid_raw {
        Some(v) => {
            let (v, s) = to_ids(v, &labels, &cfg.skip_labels);
            (train_rows, v, s)
        }
        None => {
            let (train, valid) = hold_out(train_rows, recipe);
            (train, valid, 0)
        }
    };
    if train_rows.is_empty() || valid_rows.is_empty() {
        return Err(setup(format!(
            "{}: {} training and {} validation rows remain; both need at least one",
            train_path.display(),
            train_rows.len(),
            valid_rows.len()
        )));
    }
    let train_enc: Vec<_> = train_rows
        .iter()
        .map(|r| encode(tok, r, cfg.echo))
        .collect::<Result<_>>()?;
    let valid_enc: Vec<_> = valid_rows
        .iter()
        .map(|r| encode(tok, r, cfg.echo))
        .collect::<Result<_>>()?;
    let longest = train_enc
        .iter()
        .chain(&valid_enc)
        .map(|(ids, _)| ids.len())
        .max()
        .unwrap_or(1);
    let positions = recipe
        .model
        .context
        .unwrap_or_else(|| longest.min(max_positions))
        .max(1);
    let mut truncated_rows = 0;
    let mut truncated_words = 0;
    let mut build = |encoded: Vec<Encoded>| -> Vec<Example> {
        encoded
            .into_iter()
            .map(|(mut ids, targets)| {
                if ids.len() > positions {
                    truncated_rows += 1;
                    ids.truncate(positions);
                }
                let mut t = vec![IGNORE; positions];
                for (p, label) in targets {
                    match matches!(obj, Objective::Classify(_)) {
                        true => t[p.min(ids.len() - 1)] = label,
                        false if p < positions => t[p] = label,
                        false => truncated_words += 1,
                    }
                }
                let len = ids.len();
                ids.resize(positions, pad);
                Example {
                    inputs: ids,
                    targets: t,
                    len,
                    starts: None,
                }
            })
            .collect()
    };
    let train = build(train_enc);
    let mut valid = build(valid_enc);
    // Validation in order of length: each batch runs over its own longest row only.
    valid.sort_by_key(|e| e.len);
    let class_weights = match &cfg.class_weights {
        None => None,
        Some(ClassWeights::Each(w)) if w.len() != labels.len() => {
            return Err(setup(format!(
                "objective.class_weights has {} weights for the {} labels {labels:?}",
                w.len(),
                labels.len()
            )))
        }
        Some(ClassWeights::Each(w)) => Some(w.clone()),
        Some(ClassWeights::Named(_)) => {
            // "balanced": n / (labels x count), over the training targets.
            let mut count = vec![0usize; labels.len()];
            for e in &train {
                for (_, t) in e.scored() {
                    count[t as usize] += 1;
                }
            }
            let n: usize = count.iter().sum();
            Some(
                count
                    .iter()
                    .map(|&c| match c {
                        0 => 0.0,
                        c => n as f64 / (labels.len() * c) as f64,
                    })
                    .collect(),
            )
        }
    };
    let head = match obj {
        Objective::Classify(_) => Head::Sequence {
            labels,
            pad_token_id: Some(pad),
        },
        _ => Head::Token {
            labels,
            echo: cfg.echo,
        },
    };
    Ok(TaskData {
        head,
        train,
        valid,
        positions,
        skipped: skipped_t + skipped_v,
        truncated_rows,
        truncated_words,
        unscored: 0,
        class_weights,
    })
}

/// The order examples are drawn in: one pass after another over the training rows, each
/// pass in its own order drawn from the seed and the pass (so a resumed run sees what an
/// unbroken one would), with rows of like length brought together into batches: within each
/// stretch of `GROUP` batches the rows are sorted by length, and the batches then shuffled,
/// so a batch's positions are those of its own longest row rather than of the longest row
/// in the file (as transformers' group_by_length does).
pub struct Order {
    seed: u64,
    lens: Vec<usize>,
    batch: usize,
    pass: Option<(u64, Vec<usize>)>,
}

/// Batches per stretch whose rows are sorted by length.
const GROUP: usize = 32;

impl Order {
    pub fn new(seed: u64, lens: Vec<usize>, batch: usize) -> Self {
        Self {
            seed,
            lens,
            batch: batch.max(1),
            pass: None,
        }
    }

    fn shuffle(v: &mut [usize], rng: &mut Rng) {
        for j in (1..v.len()).rev() {
            v.swap(j, (rng.next_u64() % (j as u64 + 1)) as usize);
        }
    }

    /// The index of the `i`-th example drawn in the run.
    pub fn at(&mut self, i: u64) -> usize {
        let n = self.lens.len() as u64;
        let pass = i / n;
        if self.pass.as_ref().is_none_or(|(p, _)| *p != pass) {
            let mut order: Vec<usize> = (0..self.lens.len()).collect();
            let mut rng = Rng(self.seed ^ pass.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            Self::shuffle(&mut order, &mut rng);
            let mut grouped = Vec::with_capacity(order.len());
            for stretch in order.chunks_mut(GROUP * self.batch) {
                stretch.sort_by_key(|&e| self.lens[e]);
                let mut batches: Vec<usize> = (0..stretch.len().div_ceil(self.batch)).collect();
                Self::shuffle(&mut batches, &mut rng);
                for b in batches {
                    let end = ((b + 1) * self.batch).min(stretch.len());
                    grouped.extend_from_slice(&stretch[b * self.batch..end]);
                }
            }
            self.pass = Some((pass, grouped));
        }
        self.pass.as_ref().expect("set above").1[(i % n) as usize]
    }
}

/// A micro-batch: `rows` cut to the longest row's length `positions`.
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub positions: usize,
    /// Where each position's sequence begins, when a row is packed.
    pub starts: Option<Vec<u32>>,
}

impl Batch {
    /// Sets the trainer's positions and packing for this batch.
    pub fn configure(&self, trainer: &mut crate::trainer::Trainer) -> Result<()> {
        trainer.set_positions(self.positions)?;
        trainer.set_starts(self.starts.as_deref())?;
        Ok(())
    }
}

/// The micro-batch of `rows`: each cut to the longest row's length, with the packed rows'
/// starts (0 for a row that is one sequence) when any row is packed.
pub fn batch_of<'a>(rows: impl Iterator<Item = &'a Example> + Clone) -> Batch {
    let t = rows.clone().map(|e| e.len).max().unwrap_or(1).max(1);
    let packed = rows.clone().any(|e| e.starts.is_some());
    let (mut inputs, mut targets, mut starts) = (Vec::new(), Vec::new(), Vec::new());
    for e in rows {
        inputs.extend_from_slice(&e.inputs[..t]);
        targets.extend_from_slice(&e.targets[..t]);
        if packed {
            match &e.starts {
                Some(s) => starts.extend_from_slice(&s[..t]),
                None => starts.extend(std::iter::repeat_n(0, t)),
            }
        }
    }
    Batch {
        inputs,
        targets,
        positions: t,
        starts: packed.then_some(starts),
    }
}

/// Validation: the mean loss over the scored positions and the share predicted right
/// (texts for `classify`, words for `tag`), with a count per (gold, predicted) label pair.
pub struct Validation {
    pub loss: f32,
    pub accuracy: f64,
    pub confusion: Vec<Vec<u64>>,
}

/// Runs the validation examples through the trainer, `batch` at a time (the last batch
/// filled up with copies of its first example, whose results are dropped).
pub fn validate(
    trainer: &mut crate::trainer::Trainer,
    valid: &[Example],
    batch: usize,
    labels: usize,
) -> Result<Validation> {
    let mut confusion = vec![vec![0u64; labels]; labels];
    let (mut loss, mut right, mut n) = (0f64, 0u64, 0u64);
    for chunk in valid.chunks(batch) {
        let filled = (0..batch).map(|b| chunk.get(b).unwrap_or(&chunk[0]));
        let mb = batch_of(filled);
        let (inputs, positions) = (&mb.inputs, mb.positions);
        let mut rows = Vec::new();
        let mut gold = Vec::new();
        for (b, e) in chunk.iter().enumerate() {
            for (p, t) in e.scored() {
                rows.push(b * positions + p);
                gold.push(t as usize);
            }
        }
        mb.configure(trainer)?;
        let logits = trainer.head_logits(inputs, &rows)?;
        for (row, &g) in logits.chunks_exact(labels).zip(&gold) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let lse = max as f64
                + row
                    .iter()
                    .map(|&x| ((x - max) as f64).exp())
                    .sum::<f64>()
                    .ln();
            loss += lse - row[g] as f64;
            // The first of equal logits, as argmax does everywhere in slm.
            let pred = row
                .iter()
                .enumerate()
                .fold(0, |best, (i, &x)| if x > row[best] { i } else { best });
            confusion[g][pred] += 1;
            right += u64::from(pred == g);
            n += 1;
        }
    }
    Ok(Validation {
        loss: (loss / n.max(1) as f64) as f32,
        accuracy: right as f64 / n.max(1) as f64,
        confusion,
    })
}

/// Validation of a language model's head (sft): the mean loss over the scored targets,
/// `batch` rows at a time (the last batch filled up with rows that score nothing).
pub fn validate_lm(
    trainer: &mut crate::trainer::Trainer,
    valid: &[Example],
    batch: usize,
) -> Result<f32> {
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in valid.chunks(batch) {
        let filler = Example {
            targets: vec![IGNORE; chunk[0].targets.len()],
            ..chunk[0].clone()
        };
        let mb = batch_of((0..batch).map(|b| chunk.get(b).unwrap_or(&filler)));
        let n = mb.targets.iter().filter(|&&t| t != IGNORE).count();
        mb.configure(trainer)?;
        total += trainer.loss_targets(&mb.inputs, &mb.targets)? as f64 * n as f64;
        count += n;
    }
    Ok((total / count.max(1) as f64) as f32)
}
