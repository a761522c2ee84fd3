//! Task specifications (`choice:FILE`, `classify:FILE`, `perplexity:FILE`, named suites)
//! and running one on a model into a results entry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use slm_model::Llama;
use slm_tokenizer::Tokenizer;

use crate::choice::{self, ChoiceOptions};
use crate::metrics::{self, Metric};
use crate::results::TaskResult;
use crate::task::{self, TaskError};
use crate::EvalError;
use slm_data::file_sha256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Choice,
    Classify,
    Tag,
    Perplexity,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Choice => "choice",
            Kind::Classify => "classify",
            Kind::Tag => "tag",
            Kind::Perplexity => "perplexity",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub name: String,
    pub kind: Kind,
    pub file: PathBuf,
    /// The metric the task is reported by.
    pub primary: String,
}

impl TaskSpec {
    /// `KIND:FILE`; the task is named after the file.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let Some((kind, file)) = spec.split_once(':') else {
            return Err(format!(
                "--task {spec:?}: expected KIND:FILE with KIND one of choice, classify, tag, perplexity"
            ));
        };
        let (kind, primary) = match kind {
            "choice" => (Kind::Choice, "acc"),
            "classify" => (Kind::Classify, "acc"),
            "tag" => (Kind::Tag, "f1"),
            "perplexity" => (Kind::Perplexity, "ppl"),
            other => {
                return Err(format!(
                "--task {spec:?}: unknown kind {other:?} (expected choice, classify, tag or perplexity)"
            ))
            }
        };
        let file = PathBuf::from(file);
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.display().to_string());
        // A known benchmark's file keeps the name and metric it is reported by.
        let (name, primary) = match file
            .file_name()
            .and_then(|f| CORE.iter().find(|t| t.1 == kind && f == t.2))
        {
            Some(&(task, _, _, known)) => (task.to_string(), known),
            None => (name, primary),
        };
        Ok(Self {
            name,
            kind,
            file,
            primary: primary.into(),
        })
    }
}

/// Named sets of tasks: (name, kind, file name, primary metric, as lm-eval reports it).
const CORE: &[(&str, Kind, &str, &str)] = &[
    ("hellaswag", Kind::Choice, "hellaswag.jsonl", "acc_norm"),
    ("arc_easy", Kind::Choice, "arc_easy.jsonl", "acc"),
    ("piqa", Kind::Choice, "piqa.jsonl", "acc_norm"),
    ("boolq", Kind::Choice, "boolq.jsonl", "acc"),
    ("sst2", Kind::Choice, "sst2_choice.jsonl", "acc"),
    ("rte", Kind::Choice, "rte_choice.jsonl", "acc"),
];

pub const SUITES: &[&str] = &["core"];

/// The tasks of suite `name`, their files in `dir`.
pub fn suite(name: &str, dir: &Path) -> Result<Vec<TaskSpec>, String> {
    let table = match name {
        "core" => CORE,
        other => {
            return Err(format!(
                "--suite {other:?}: unknown suite (known: {})",
                SUITES.join(", ")
            ))
        }
    };
    let mut specs = Vec::new();
    for &(task, kind, file, primary) in table {
        let file = dir.join(file);
        if !file.is_file() {
            return Err(format!(
                "suite {name}: {} is missing; --evals (or SLM_EVALS) must name a folder with {}",
                file.display(),
                table.iter().map(|t| t.2).collect::<Vec<_>>().join(", ")
            ));
        }
        specs.push(TaskSpec {
            name: task.into(),
            kind,
            file,
            primary: primary.into(),
        });
    }
    Ok(specs)
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub choice: ChoiceOptions,
    /// First N documents only.
    pub limit: Option<usize>,
    /// Perplexity window.
    pub ctx: usize,
    /// Zero-shot prompt for classify files (see `task::read_classify`).
    pub prompt: Option<String>,
    /// Recorded in the results ("ggml": see `results::TaskResult`).
    pub arithmetic: String,
}

/// Runs one task on the model.
pub fn run(
    model: &Llama,
    tok: &Tokenizer,
    spec: &TaskSpec,
    opts: &RunOptions,
) -> Result<TaskResult, EvalError> {
    let t0 = Instant::now();
    let file = spec.file.display().to_string();
    let sha = file_sha256(&spec.file).map_err(|source| TaskError::Io {
        file: file.clone(),
        source,
    })?;
    let mut confusion = Vec::new();
    let head = &model.config.head;
    let (n, metrics, tokens, labels) = match spec.kind {
        Kind::Classify | Kind::Tag if *head != slm_model::Head::Lm => {
            let s = match spec.kind {
                Kind::Classify => crate::heads::eval_classify(model, tok, &spec.file, opts.limit)?,
                _ => crate::heads::eval_tag(model, tok, &spec.file, opts.limit)?,
            };
            confusion = s.confusion;
            (s.n, s.metrics, s.tokens, head.labels().to_vec())
        }
        Kind::Tag => {
            return Err(EvalError::Head(
                "tag: the model has a language-model head; tagging needs a token-classification \
                 head (train one with objective.kind = \"tag\")"
                    .into(),
            ))
        }
        _ if *head != slm_model::Head::Lm => {
            return Err(EvalError::Head(format!(
                "{}: the model has a {}; it scores only classify: and tag: tasks",
                spec.kind.as_str(),
                head.describe()
            )))
        }
        Kind::Perplexity => {
            let text = std::fs::read_to_string(&spec.file).map_err(|source| TaskError::Io {
                file: file.clone(),
                source,
            })?;
            let mut ids = tok.encode(&text, false)?;
            if let Some(limit) = opts.limit {
                ids.truncate(limit.saturating_mul(opts.ctx));
            }
            let bos = if tok.add_bos { tok.bos } else { None };
            let p =
                crate::perplexity::perplexity(model, &ids, opts.ctx, bos, opts.choice.progress)?;
            let m = BTreeMap::from([(
                "ppl".to_string(),
                Metric {
                    value: p.ppl,
                    stderr: p.stderr,
                },
            )]);
            (p.windows, m, p.windows * opts.ctx, Vec::new())
        }
        Kind::Choice | Kind::Classify => {
            let (mut docs, labels) = match spec.kind {
                Kind::Choice => (task::read_choice(&spec.file)?, Vec::new()),
                _ => task::read_classify(&spec.file, opts.prompt.as_deref())?,
            };
            if let Some(limit) = opts.limit {
                docs.truncate(limit);
            }
            let (scores, tokens) = choice::score(model, tok, &docs, &opts.choice)?;
            let mut m = choice::metrics(&docs, &scores);
            if spec.kind == Kind::Classify {
                let gold: Vec<usize> = docs.iter().map(|d| d.answer()).collect();
                let pred = choice::predictions(&scores);
                m.insert(
                    "macro_f1".into(),
                    metrics::macro_f1_bootstrap(&gold, &pred, labels.len(), 1000),
                );
            }
            (docs.len(), m, tokens, labels)
        }
    };
    Ok(TaskResult {
        name: spec.name.clone(),
        kind: spec.kind.as_str().into(),
        file,
        file_sha256: sha,
        n,
        shots: if spec.kind == Kind::Perplexity {
            0
        } else {
            opts.choice.shots
        },
        limit: opts.limit,
        primary: spec.primary.clone(),
        metrics,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
        arithmetic: opts.arithmetic.clone(),
        labels,
        confusion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_name_themselves_after_the_file() {
        let s = TaskSpec::parse("choice:evals/arc_easy.jsonl").unwrap();
        assert_eq!((s.name.as_str(), s.kind), ("arc_easy", Kind::Choice));
        let s = TaskSpec::parse("choice:x/sst2_choice.jsonl").unwrap();
        assert_eq!((s.name.as_str(), s.primary.as_str()), ("sst2", "acc"));
        let s = TaskSpec::parse("choice:hellaswag.jsonl").unwrap();
        assert_eq!(s.primary, "acc_norm");
        let s = TaskSpec::parse("choice:my_task.jsonl").unwrap();
        assert_eq!((s.name.as_str(), s.primary.as_str()), ("my_task", "acc"));
        assert!(TaskSpec::parse("arc_easy.jsonl")
            .unwrap_err()
            .contains("KIND:FILE"));
        assert!(TaskSpec::parse("vote:x")
            .unwrap_err()
            .contains("unknown kind \"vote\""));
    }

    #[test]
    fn a_suite_names_its_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let err = suite("core", dir.path()).unwrap_err();
        assert!(err.contains("hellaswag.jsonl is missing"), "{err}");
        assert!(suite("nope", dir.path())
            .unwrap_err()
            .contains("unknown suite"));
    }
}
