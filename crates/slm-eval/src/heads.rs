//! A model's own classifier head at work: a label per text (`...ForSequenceClassification`,
//! read at the text's last token) or per word (`...ForTokenClassification`, read at each
//! word's first token), as slm's fine-tuning trains them and transformers computes them.
//! Used by `slm eval --task classify:` / `tag:` and `slm predict`.
//!
//! A text longer than the model's context keeps its first tokens (as training cuts it); a
//! word whose first token lies past the context is tagged `O`. A tagger trained with `echo`
//! reads each sentence twice, as it was trained.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::Tensor;
use slm_model::{Head, Llama};
use slm_tokenizer::Tokenizer;

use crate::metrics::{self, Metric};
use crate::EvalError;

fn wrong_head(model: &Llama, want: &str) -> EvalError {
    EvalError::Head(format!(
        "the model has a {}; {want}",
        model.config.head.describe()
    ))
}

fn need_sequence_head(model: &Llama) -> Result<(), EvalError> {
    match model.config.head {
        Head::Sequence { .. } => Ok(()),
        _ => Err(wrong_head(
            model,
            "labelling a text needs a sequence-classification head",
        )),
    }
}

/// Whether the model's token-classification head reads an echoed input.
fn need_token_head(model: &Llama) -> Result<bool, EvalError> {
    match model.config.head {
        Head::Token { echo, .. } => Ok(echo),
        _ => Err(wrong_head(
            model,
            "tagging words needs a token-classification head",
        )),
    }
}

/// The head's logits at every position of `ids` (cut to the model's context).
fn logits(model: &Llama, ids: &[u32]) -> Result<Vec<Vec<f32>>, EvalError> {
    let ids = &ids[..ids.len().min(model.config.max_position_embeddings)];
    if ids.is_empty() {
        return Err(EvalError::Head(
            "an empty text has no token to label".into(),
        ));
    }
    let x = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    Ok(model.forward(&x, None, false)?.squeeze(0)?.to_vec2()?)
}

/// Softmax of one row of logits.
pub fn probabilities(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// The label logits of `text` from a sequence-classification head, and the tokens run.
pub fn classify_text(
    model: &Llama,
    tok: &Tokenizer,
    text: &str,
) -> Result<(Vec<f32>, usize), EvalError> {
    need_sequence_head(model)?;
    let ids = tok.encode(text, true)?;
    let mut rows = logits(model, &ids)?;
    let n = rows.len();
    Ok((rows.pop().expect("at least one token"), n))
}

/// Per word, its label logits (`None` for a word past the context).
pub type WordLogits = Vec<Option<Vec<f32>>>;

/// The label logits of each word from a token-classification head (`None` past the
/// context), and the tokens run.
pub fn tag_words<S: AsRef<str>>(
    model: &Llama,
    tok: &Tokenizer,
    words: &[S],
) -> Result<(WordLogits, usize), EvalError> {
    let (ids, first) = match need_token_head(model)? {
        false => tok.encode_words(words)?,
        true => tok.encode_words_echoed(words)?,
    };
    let rows = logits(model, &ids)?;
    let n = rows.len();
    Ok((first.iter().map(|&p| rows.get(p).cloned()).collect(), n))
}

fn argmax(row: &[f32]) -> usize {
    metrics::argmax(&row.iter().map(|&x| x as f64).collect::<Vec<_>>())
}

/// The ids of `labels` in the head's label list; a label the head lacks names the file,
/// the row and the label.
fn label_ids<'a>(
    model: &Llama,
    file: &Path,
    rows: impl Iterator<Item = (usize, &'a str)>,
) -> Result<Vec<usize>, EvalError> {
    let known = model.config.head.labels();
    let id: HashMap<&str, usize> = known
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    rows.map(|(row, l)| {
        id.get(l).copied().ok_or_else(|| {
            EvalError::Head(format!(
                "{}: row {}: label '{l}' is not one of the model's labels {known:?}",
                file.display(),
                row + 1
            ))
        })
    })
    .collect()
}

/// What a head's evaluation found.
pub struct HeadScores {
    pub n: usize,
    pub tokens: usize,
    pub metrics: BTreeMap<String, Metric>,
    /// Rows gold, columns predicted (classification).
    pub confusion: Vec<Vec<u64>>,
}

/// Accuracy, macro-F1 and the confusion matrix of a sequence-classification head on a
/// `{"text", "label"}` (or premise/hypothesis) file.
pub fn eval_classify(
    model: &Llama,
    tok: &Tokenizer,
    file: &Path,
    limit: Option<usize>,
) -> Result<HeadScores, EvalError> {
    need_sequence_head(model)?;
    let mut rows = slm_data::tasks::read_labeled(file)?;
    if let Some(l) = limit {
        rows.truncate(l);
    }
    let gold = label_ids(
        model,
        file,
        rows.iter().map(|r| r.label.as_str()).enumerate(),
    )?;
    let k = model.config.head.labels().len();
    let mut pred = Vec::with_capacity(rows.len());
    let mut tokens = 0;
    for r in &rows {
        let (l, n) = classify_text(model, tok, &r.text)?;
        tokens += n;
        pred.push(argmax(&l));
    }
    let mut confusion = vec![vec![0u64; k]; k];
    for (&g, &p) in gold.iter().zip(&pred) {
        confusion[g][p] += 1;
    }
    let right: Vec<f64> = gold
        .iter()
        .zip(&pred)
        .map(|(g, p)| f64::from(u8::from(g == p)))
        .collect();
    let metrics = BTreeMap::from([
        ("acc".to_string(), metrics::mean(&right)),
        (
            "macro_f1".to_string(),
            metrics::macro_f1_bootstrap(&gold, &pred, k, 1000),
        ),
    ]);
    Ok(HeadScores {
        n: rows.len(),
        tokens,
        metrics,
        confusion,
    })
}

/// The tags a token-classification head gives each word (`O` past the context).
pub fn predict_tags<S: AsRef<str>>(
    model: &Llama,
    tok: &Tokenizer,
    words: &[S],
) -> Result<(Vec<String>, usize), EvalError> {
    let labels = model.config.head.labels();
    let (rows, n) = tag_words(model, tok, words)?;
    let tags = rows
        .iter()
        .map(|r| {
            r.as_ref()
                .map_or("O".to_string(), |l| labels[argmax(l)].clone())
        })
        .collect();
    Ok((tags, n))
}

/// Entity precision, recall and F1 (micro, and per type as `f1/TYPE`, ...) of a
/// token-classification head on a `{"tokens", "tags"}` file, by seqeval's rules.
pub fn eval_tag(
    model: &Llama,
    tok: &Tokenizer,
    file: &Path,
    limit: Option<usize>,
) -> Result<HeadScores, EvalError> {
    need_token_head(model)?;
    let mut rows = slm_data::tasks::read_tagging(file)?;
    if let Some(l) = limit {
        rows.truncate(l);
    }
    label_ids(
        model,
        file,
        rows.iter()
            .enumerate()
            .flat_map(|(i, r)| r.tags.iter().map(move |t| (i, t.as_str()))),
    )?;
    let mut pred = Vec::with_capacity(rows.len());
    let mut tokens = 0;
    for r in &rows {
        let (tags, n) = predict_tags(model, tok, &r.tokens)?;
        tokens += n;
        pred.push(tags);
    }
    let gold: Vec<Vec<String>> = rows.iter().map(|r| r.tags.clone()).collect();
    let s = crate::entities::score(&gold, &pred);
    let exact = |value| Metric { value, stderr: 0.0 };
    let mut metrics = BTreeMap::from([
        ("precision".to_string(), exact(s.micro.precision)),
        ("recall".to_string(), exact(s.micro.recall)),
        ("f1".to_string(), exact(s.micro.f1)),
    ]);
    for (kind, prf) in &s.per_type {
        metrics.insert(format!("f1/{kind}"), exact(prf.f1));
        metrics.insert(format!("precision/{kind}"), exact(prf.precision));
        metrics.insert(format!("recall/{kind}"), exact(prf.recall));
    }
    Ok(HeadScores {
        n: rows.len(),
        tokens,
        metrics,
        confusion: Vec::new(),
    })
}
