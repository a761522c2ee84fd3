//! Multiple choice by log-likelihood, exactly as lm-evaluation-harness scores it.
//!
//! - Each option's score is the sum of the log-probabilities of its continuation tokens
//!   given the context. Context and continuation are tokenized together and split at the
//!   context boundary (lm-eval's `_encode_pair`): trailing whitespace of the context moves to
//!   the continuation, the whole text is encoded, and the continuation is what follows the
//!   context's own encoding.
//! - acc is right when the highest sum is the answer; acc_norm divides each sum by the
//!   option's length in characters first (Python's `len`), acc_bytes by its length in UTF-8
//!   bytes (lm-eval's newer `acc_bytes`). Ties go to the first option, as numpy's argmax.
//! - The context is run once per question and every option attends to its keys and values
//!   (a packed forward, see `slm_model::packed`), with many questions in one pass.

use std::collections::BTreeMap;

use indicatif::{ProgressBar, ProgressStyle};
use slm_kernels::exp::all_log_sum_exp;
use slm_model::{Llama, Pack};
use slm_tokenizer::Tokenizer;

use crate::metrics::{self, Metric};
use crate::task::Doc;
use crate::{EvalError, SplitMix};

#[derive(Debug, Clone)]
pub struct ChoiceOptions {
    /// Solved examples from the same file before each question ("\n\n" between them).
    pub shots: usize,
    /// Seed of the few-shot draw.
    pub seed: u64,
    /// Rows per packed forward pass (a question's rows are never split).
    pub batch_tokens: usize,
    pub progress: bool,
}

impl Default for ChoiceOptions {
    fn default() -> Self {
        Self {
            shots: 0,
            seed: 1234,
            batch_tokens: 2048,
            progress: false,
        }
    }
}

/// What the model said about one document: the log-likelihood of each option and how many
/// tokens each continuation had.
#[derive(Debug, Clone, PartialEq)]
pub struct DocScore {
    pub lls: Vec<f64>,
    pub tokens: Vec<usize>,
}

/// lm-eval's `_encode_pair`: (context tokens, continuation tokens). With a model that wants
/// BOS, BOS starts the context; an empty context is BOS (or EOS, lm-eval's end-of-text).
pub fn encode_pair(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>), EvalError> {
    let start: Vec<u32> = match (tok.add_bos, tok.bos) {
        (true, Some(b)) => vec![b],
        _ => vec![],
    };
    let kept = context.trim_end();
    let moved = &context[kept.len()..];
    let continuation = format!("{moved}{continuation}");
    if kept.is_empty() {
        let first = tok.bos.filter(|_| tok.add_bos).or(tok.eos).or(tok.bos);
        let Some(first) = first else {
            return Err(EvalError::EmptyContext);
        };
        return Ok((vec![first], tok.encode(&continuation, false)?));
    }
    let whole = tok.encode(&format!("{kept}{continuation}"), false)?;
    let ctx = tok.encode(kept, false)?;
    let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    Ok(([start, ctx].concat(), cont))
}

/// A context and the continuations scored after it; `first` is the document's option index
/// of the first continuation.
struct Unit {
    doc: usize,
    first: usize,
    context: Vec<u32>,
    continuations: Vec<Vec<u32>>,
}

impl Unit {
    fn rows(&self) -> usize {
        self.context.len()
            + self
                .continuations
                .iter()
                .map(|c| c.len().saturating_sub(1))
                .sum::<usize>()
    }
}

/// The few-shot prefix of document `i`: `shots` other documents, solved, drawn with a seed
/// per document so that any subset of documents gets the same prompts.
fn prefix(docs: &[Doc], i: usize, shots: usize, seed: u64) -> String {
    if shots == 0 || docs.len() < 2 {
        return String::new();
    }
    let mut rng = SplitMix(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut picked: Vec<usize> = Vec::with_capacity(shots);
    let want = shots.min(docs.len() - 1);
    while picked.len() < want {
        let j = rng.below(docs.len());
        if j != i && !picked.contains(&j) {
            picked.push(j);
        }
    }
    let mut s: String = picked
        .iter()
        .map(|&j| docs[j].demonstration())
        .collect::<Vec<_>>()
        .join("\n\n");
    s.push_str("\n\n");
    s
}

fn units_of(
    model: &Llama,
    tok: &Tokenizer,
    docs: &[Doc],
    i: usize,
    opts: &ChoiceOptions,
) -> Result<Vec<Unit>, EvalError> {
    let max_len = model.config.max_position_embeddings;
    let vocab = model.config.vocab_size;
    let pre = prefix(docs, i, opts.shots, opts.seed);
    let mut units: Vec<Unit> = Vec::new();
    for (option, (ctx, cont)) in docs[i].requests(&pre).iter().enumerate() {
        let (c, k) = encode_pair(tok, ctx, cont)?;
        // A tokenizer larger than the model's vocabulary: fail, rather than read another
        // row's logit.
        if let Some(&token) = c.iter().chain(&k).find(|&&t| t as usize >= vocab) {
            return Err(EvalError::TokenOutOfRange { token, vocab });
        }
        match units.last_mut() {
            // Options after the same context share its rows.
            Some(u) if u.context == c => u.continuations.push(k),
            _ => units.push(Unit {
                doc: i,
                first: option,
                context: c,
                continuations: vec![k],
            }),
        }
    }
    for u in &mut units {
        let longest = u.continuations.iter().map(Vec::len).max().unwrap_or(0);
        if longest > max_len {
            return Err(EvalError::TooLong {
                doc: i,
                tokens: longest,
                max: max_len,
            });
        }
        // As lm-eval: a context too long for the model loses its beginning.
        let room = max_len + 1 - longest.max(1);
        if u.context.len() > room {
            u.context.drain(..u.context.len() - room);
        }
    }
    Ok(units)
}

/// Runs `units` as one packed forward and adds each continuation's log-likelihood to `lls`.
fn score_pack(model: &Llama, units: &[Unit], lls: &mut [Vec<f64>]) -> Result<(), EvalError> {
    let mut pack = Pack::new();
    let mut ids = Vec::new();
    let mut rows: Vec<u32> = Vec::new();
    // (index into rows, target token, doc, option)
    let mut targets: Vec<(usize, u32, usize, usize)> = Vec::new();
    for u in units {
        let root = pack.push_root(u.context.len());
        ids.extend_from_slice(&u.context);
        rows.push((ids.len() - 1) as u32);
        let last = rows.len() - 1;
        for (j, cont) in u.continuations.iter().enumerate() {
            let option = u.first + j;
            let Some((&first, rest)) = cont.split_first() else {
                continue;
            };
            targets.push((last, first, u.doc, option));
            if rest.is_empty() {
                continue;
            }
            pack.push_child(root, rest.len());
            for (&fed, &next) in cont.iter().zip(rest) {
                ids.push(fed);
                rows.push((ids.len() - 1) as u32);
                targets.push((rows.len() - 1, next, u.doc, option));
            }
        }
    }
    let hidden = model.hidden_packed(&ids, &pack, &rows)?;
    // The logits a chunk of rows at a time, each reduced to its log-sum-exp and the targets'
    // logits at once: a whole pack's rows x vocabulary was hundreds of megabytes (2,048 rows of
    // SmolLM2's 49,152). Targets in row order (a stable sort: each option's own targets keep
    // their order, so its sum adds up as before) serve the chunks in one pass.
    targets.sort_by_key(|t| t.0);
    let mut next = targets.iter().peekable();
    for range in head_chunks(rows.len()) {
        model.project_with(
            &hidden.narrow(0, range.start, range.len())?,
            |logits, vocab| {
                let lse = all_log_sum_exp(logits, vocab);
                while let Some(&&(r, t, doc, option)) = next.peek() {
                    if r >= range.end {
                        break;
                    }
                    let i = r - range.start;
                    // Token ids were checked against the vocabulary in `units_of`.
                    lls[doc][option] += logits[i * vocab + t as usize] as f64 - lse[i];
                    next.next();
                }
            },
        )?;
    }
    Ok(())
}

/// Rows of logits made at a time.
const HEAD_ROWS: usize = 64;

/// `0..n` in chunks of `HEAD_ROWS`, the last one stretched rather than left under 8 rows: a
/// K-quant head sums a batch of fewer than 8 rows in other roundings than a larger one
/// (slm_kernels::kquant), and a row's logits should not depend on where a chunk ends.
fn head_chunks(n: usize) -> Vec<std::ops::Range<usize>> {
    let mut v: Vec<std::ops::Range<usize>> = (0..n)
        .step_by(HEAD_ROWS)
        .map(|s| s..(s + HEAD_ROWS).min(n))
        .collect();
    if v.len() > 1 && v.last().is_some_and(|r| r.len() < 8) {
        let last = v.pop().expect("two or more");
        v.last_mut().expect("one or more").end = last.end;
    }
    v
}

/// Scores every document: the log-likelihood of each option. Also returns the number of
/// tokens run through the model.
pub fn score(
    model: &Llama,
    tok: &Tokenizer,
    docs: &[Doc],
    opts: &ChoiceOptions,
) -> Result<(Vec<DocScore>, usize), EvalError> {
    let mut lls: Vec<Vec<f64>> = docs.iter().map(|d| vec![0.0; d.options()]).collect();
    let mut tokens: Vec<Vec<usize>> = docs.iter().map(|d| vec![0; d.options()]).collect();
    let bar = if opts.progress {
        ProgressBar::new(docs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} docs  {per_sec}  eta {eta}  {msg}")
            .expect("static template"),
    );
    let mut pending: Vec<Unit> = Vec::new();
    let mut rows = 0;
    let mut total_rows = 0;
    let mut done = 0; // documents whose every option is scored
    let mut correct = 0usize;
    let mut flush =
        |pending: &mut Vec<Unit>, lls: &mut Vec<Vec<f64>>, upto: usize| -> Result<(), EvalError> {
            if !pending.is_empty() {
                score_pack(model, pending, lls)?;
                pending.clear();
            }
            while done < upto {
                correct += usize::from(metrics::argmax(&lls[done]) == docs[done].answer());
                done += 1;
            }
            bar.set_position(done as u64);
            bar.set_message(format!("acc {:.4}", correct as f64 / done.max(1) as f64));
            Ok(())
        };
    for (i, doc_tokens) in tokens.iter_mut().enumerate() {
        for u in units_of(model, tok, docs, i, opts)? {
            for (j, c) in u.continuations.iter().enumerate() {
                doc_tokens[u.first + j] = c.len();
            }
            let r = u.rows();
            if rows + r > opts.batch_tokens && !pending.is_empty() {
                // Every document before i is complete once the pending pack is scored.
                flush(&mut pending, &mut lls, i)?;
                rows = 0;
            }
            rows += r;
            total_rows += r;
            pending.push(u);
        }
    }
    flush(&mut pending, &mut lls, docs.len())?;
    bar.finish_and_clear();
    let scores = lls
        .into_iter()
        .zip(tokens)
        .map(|(lls, tokens)| DocScore { lls, tokens })
        .collect();
    Ok((scores, total_rows))
}

/// acc, acc_norm and acc_bytes over the documents, with standard errors.
pub fn metrics(docs: &[Doc], scores: &[DocScore]) -> BTreeMap<String, Metric> {
    let mut acc = Vec::with_capacity(docs.len());
    let mut acc_norm = Vec::with_capacity(docs.len());
    let mut acc_bytes = Vec::with_capacity(docs.len());
    for (d, s) in docs.iter().zip(scores) {
        let gold = d.answer();
        let hit = |lens: Vec<f64>| -> f64 {
            let normed: Vec<f64> = s.lls.iter().zip(&lens).map(|(l, n)| l / n).collect();
            f64::from(u8::from(metrics::argmax(&normed) == gold))
        };
        acc.push(f64::from(u8::from(metrics::argmax(&s.lls) == gold)));
        acc_norm.push(hit(d
            .norm_texts()
            .iter()
            .map(|t| t.chars().count() as f64)
            .collect()));
        acc_bytes.push(hit(d.norm_texts().iter().map(|t| t.len() as f64).collect()));
    }
    BTreeMap::from([
        ("acc".to_string(), metrics::mean(&acc)),
        ("acc_norm".to_string(), metrics::mean(&acc_norm)),
        ("acc_bytes".to_string(), metrics::mean(&acc_bytes)),
    ])
}

/// Predicted option per document (argmax of the raw log-likelihood).
pub fn predictions(scores: &[DocScore]) -> Vec<usize> {
    scores.iter().map(|s| metrics::argmax(&s.lls)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row in exactly one chunk, in order, and no chunk but a lone one under 8 rows.
    #[test]
    fn head_chunks_cover_the_rows_without_a_short_tail() {
        for n in [0, 1, 7, 8, 63, 64, 65, 71, 72, 130, 200] {
            let c = head_chunks(n);
            let flat: Vec<usize> = c.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(flat, (0..n).collect::<Vec<_>>(), "n = {n}");
            if c.len() > 1 {
                assert!(c.iter().all(|r| r.len() >= 8), "n = {n}: {c:?}");
            }
        }
        assert_eq!(head_chunks(130), vec![0..64, 64..130]);
    }
}
