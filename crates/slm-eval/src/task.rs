//! Task files (JSON Lines, formats in DESIGN.md) read into multiple-choice documents.
//!
//! Classification and pair files become choice documents too: until a model has a
//! classification head, a label is predicted zero-shot by asking the model which label's
//! text is most likely after a prompt built from the row.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: {what}")]
    Row {
        file: String,
        line: usize,
        what: String,
    },
    #[error("{file}: {what}")]
    File { file: String, what: String },
}

/// One question, scored by the log-likelihood of each option.
#[derive(Debug, Clone, PartialEq)]
pub enum Doc {
    /// One context and several continuations (`{"context", "choices", "answer"}`).
    Choice {
        context: String,
        choices: Vec<String>,
        answer: usize,
    },
    /// One context per option and a shared continuation, scored after each context
    /// (`{"contexts", "continuation", "answer"}`, Winogrande-style partial scoring).
    Contexts {
        contexts: Vec<String>,
        continuation: String,
        answer: usize,
    },
}

impl Doc {
    pub fn answer(&self) -> usize {
        match self {
            Doc::Choice { answer, .. } | Doc::Contexts { answer, .. } => *answer,
        }
    }

    pub fn options(&self) -> usize {
        match self {
            Doc::Choice { choices, .. } => choices.len(),
            Doc::Contexts { contexts, .. } => contexts.len(),
        }
    }

    /// The texts whose lengths normalise acc_norm. lm-evaluation-harness divides by the
    /// length of its "choices": the continuations, or for per-option contexts the contexts.
    pub fn norm_texts(&self) -> &[String] {
        match self {
            Doc::Choice { choices, .. } => choices,
            Doc::Contexts { contexts, .. } => contexts,
        }
    }

    /// The solved example, as a few-shot demonstration.
    pub fn demonstration(&self) -> String {
        match self {
            Doc::Choice {
                context,
                choices,
                answer,
            } => format!("{context}{}", choices[*answer]),
            Doc::Contexts {
                contexts,
                continuation,
                answer,
            } => format!("{}{continuation}", contexts[*answer]),
        }
    }

    /// (context, continuation) per option, each context after `prefix` (few-shot examples).
    pub fn requests(&self, prefix: &str) -> Vec<(String, String)> {
        match self {
            Doc::Choice {
                context, choices, ..
            } => choices
                .iter()
                .map(|c| (format!("{prefix}{context}"), c.clone()))
                .collect(),
            Doc::Contexts {
                contexts,
                continuation,
                ..
            } => contexts
                .iter()
                .map(|c| (format!("{prefix}{c}"), continuation.clone()))
                .collect(),
        }
    }
}

/// A JSON object of a task file.
type Row = serde_json::Map<String, Value>;

/// The rows of a JSON Lines file with their line numbers.
fn read_rows(path: &Path) -> Result<Vec<(usize, Row)>, TaskError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TaskError::Io {
        file: file.clone(),
        source,
    })?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row_err = |what: String| TaskError::Row {
            file: file.clone(),
            line: i + 1,
            what,
        };
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => rows.push((i + 1, m)),
            Ok(_) => return Err(row_err("expected a JSON object".into())),
            Err(e) => return Err(row_err(format!("invalid JSON: {e}"))),
        }
    }
    if rows.is_empty() {
        return Err(TaskError::File {
            file,
            what: "no rows".into(),
        });
    }
    Ok(rows)
}

/// Reads a multiple-choice file: every row `{"context", "choices", "answer"}` or
/// `{"contexts", "continuation", "answer"}`.
pub fn read_choice(path: &Path) -> Result<Vec<Doc>, TaskError> {
    let file = path.display().to_string();
    read_rows(path)?
        .into_iter()
        .map(|(line, row)| {
            choice_doc(&row).map_err(|what| TaskError::Row {
                file: file.clone(),
                line,
                what,
            })
        })
        .collect()
}

fn string(row: &serde_json::Map<String, Value>, key: &str) -> Result<String, String> {
    match row.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("\"{key}\" is {v}, expected a string")),
        None => Err(format!("missing \"{key}\"")),
    }
}

fn strings(row: &serde_json::Map<String, Value>, key: &str) -> Result<Vec<String>, String> {
    let Some(Value::Array(items)) = row.get(key) else {
        return Err(format!("\"{key}\" must be a list of strings"));
    };
    let out: Vec<String> = items
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("\"{key}\" must be a list of strings"))?;
    if out.len() < 2 {
        return Err(format!(
            "\"{key}\" has {} option(s), at least 2 are needed",
            out.len()
        ));
    }
    // An empty option has no tokens: its log-likelihood is 0, the highest possible, so it
    // would always win.
    if let Some(i) = out.iter().position(|o| o.is_empty()) {
        return Err(format!(
            "\"{key}\" option {i} is empty; every option needs text to score"
        ));
    }
    Ok(out)
}

fn answer(row: &serde_json::Map<String, Value>, options: usize) -> Result<usize, String> {
    match row.get("answer") {
        Some(v) => match v.as_u64() {
            Some(a) if (a as usize) < options => Ok(a as usize),
            _ => Err(format!(
                "\"answer\" is {v}, expected an index from 0 to {}",
                options - 1
            )),
        },
        None => Err("missing \"answer\"".into()),
    }
}

fn choice_doc(row: &serde_json::Map<String, Value>) -> Result<Doc, String> {
    if row.contains_key("contexts") {
        let contexts = strings(row, "contexts")?;
        let answer = answer(row, contexts.len())?;
        let continuation = string(row, "continuation")?;
        if continuation.is_empty() {
            return Err("\"continuation\" is empty; it is the text every option scores".into());
        }
        return Ok(Doc::Contexts {
            continuation,
            contexts,
            answer,
        });
    }
    if !row.contains_key("choices") {
        return Err(
            "expected {\"context\", \"choices\", \"answer\"} or {\"contexts\", \"continuation\", \"answer\"}"
                .into(),
        );
    }
    let choices = strings(row, "choices")?;
    Ok(Doc::Choice {
        context: string(row, "context")?,
        answer: answer(row, choices.len())?,
        choices,
    })
}

fn label_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The default zero-shot prompt for a classification (`{"text", "label"}`) or pair
/// (`{"premise", "hypothesis", "label"}`) file, in lm-evaluation-harness's style.
pub fn default_prompt(pairs: bool) -> &'static str {
    if pairs {
        "{premise}\nQuestion: {hypothesis} {labels}?\nAnswer:"
    } else {
        "{text}\nQuestion: Is this {labels}?\nAnswer:"
    }
}

/// A classification or pair file as choice documents: the options are the file's labels (in
/// sorted order, each after a space), the context `prompt` with {text} or {premise} and
/// {hypothesis}, and {labels} ("a, b or c") filled in. Returns the documents and the labels.
pub fn read_classify(
    path: &Path,
    prompt: Option<&str>,
) -> Result<(Vec<Doc>, Vec<String>), TaskError> {
    let file = path.display().to_string();
    let rows = read_rows(path)?;
    let pairs = rows[0].1.contains_key("premise");
    let mut labels = BTreeSet::new();
    let mut parsed = Vec::with_capacity(rows.len());
    for (line, row) in &rows {
        let err = |what: String| TaskError::Row {
            file: file.clone(),
            line: *line,
            what,
        };
        let label = row
            .get("label")
            .and_then(label_text)
            .ok_or_else(|| err("missing \"label\" (a string or number)".into()))?;
        let fields: Vec<(&str, String)> = if pairs {
            vec![
                ("{premise}", string(row, "premise").map_err(&err)?),
                ("{hypothesis}", string(row, "hypothesis").map_err(&err)?),
            ]
        } else {
            vec![("{text}", string(row, "text").map_err(&err)?)]
        };
        labels.insert(label.clone());
        parsed.push((fields, label));
    }
    let labels: Vec<String> = labels.into_iter().collect();
    if labels.len() < 2 {
        return Err(TaskError::File {
            file,
            what: format!(
                "only one label ({:?}); classification needs two or more",
                labels
            ),
        });
    }
    let listed = match labels.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => labels.join(""),
    };
    let template = prompt.unwrap_or(default_prompt(pairs));
    // A prompt without the row's fields would score every row on the same text.
    let needed: &[&str] = if pairs {
        &["{premise}", "{hypothesis}"]
    } else {
        &["{text}"]
    };
    if let Some(missing) = needed.iter().find(|k| !template.contains(**k)) {
        return Err(TaskError::File {
            file,
            what: format!(
                "--prompt {template:?} has no {missing}: each row's text must go into the prompt"
            ),
        });
    }
    let choices: Vec<String> = labels.iter().map(|l| format!(" {l}")).collect();
    let docs = parsed
        .into_iter()
        .map(|(fields, label)| {
            let mut context = template.replace("{labels}", &listed);
            for (k, v) in &fields {
                context = context.replace(k, v);
            }
            Doc::Choice {
                context,
                choices: choices.clone(),
                answer: labels
                    .iter()
                    .position(|l| *l == label)
                    .expect("label was collected"),
            }
        })
        .collect();
    Ok((docs, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::TempPath {
        let mut f = tempfile::Builder::new()
            .suffix(".jsonl")
            .tempfile()
            .unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f.into_temp_path()
    }

    #[test]
    fn both_choice_forms_are_read() {
        let f = file(concat!(
            "{\"context\": \"Q: 2+2?\\nA:\", \"choices\": [\" 4\", \" 5\"], \"answer\": 0}\n",
            "\n",
            "{\"contexts\": [\"The cup is on\", \"The cup is under\"], \"continuation\": \" the table.\", \"answer\": 1}\n"
        ));
        let docs = read_choice(&f).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[0].requests("X\n\n"),
            vec![
                ("X\n\nQ: 2+2?\nA:".to_string(), " 4".to_string()),
                ("X\n\nQ: 2+2?\nA:".to_string(), " 5".to_string())
            ]
        );
        assert_eq!(docs[1].demonstration(), "The cup is under the table.");
        assert_eq!(docs[1].norm_texts()[0], "The cup is on");
    }

    #[test]
    fn bad_rows_name_file_line_and_field() {
        for (text, want) in [
            (
                "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"answer\": 2}",
                ":1: \"answer\" is 2, expected an index from 0 to 1",
            ),
            (
                "\n{\"context\": \"a\", \"choices\": [\" b\"], \"answer\": 0}",
                ":2: \"choices\" has 1 option(s)",
            ),
            (
                "{\"context\": 3, \"choices\": [\" b\", \" c\"], \"answer\": 0}",
                "\"context\" is 3, expected a string",
            ),
            (
                "{\"text\": \"a\"}",
                "expected {\"context\", \"choices\", \"answer\"}",
            ),
            ("[1, 2]", ":1: expected a JSON object"),
            ("{\"context\": ", ":1: invalid JSON"),
            ("", "no rows"),
        ] {
            let f = file(text);
            let err = read_choice(&f).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
            assert!(err.contains(&f.display().to_string()), "{err}");
        }
    }

    #[test]
    fn classification_rows_become_label_choices() {
        let f = file(concat!(
            "{\"text\": \"great film\", \"label\": \"positive\"}\n",
            "{\"text\": \"dull\", \"label\": \"negative\"}\n"
        ));
        let (docs, labels) = read_classify(&f, None).unwrap();
        assert_eq!(labels, vec!["negative", "positive"]);
        assert_eq!(
            docs[0],
            Doc::Choice {
                context: "great film\nQuestion: Is this negative or positive?\nAnswer:".into(),
                choices: vec![" negative".into(), " positive".into()],
                answer: 1
            }
        );
        let f = file("{\"premise\": \"p\", \"hypothesis\": \"h.\", \"label\": 1}\n{\"premise\": \"p\", \"hypothesis\": \"h\", \"label\": 0}\n");
        let (docs, _) = read_classify(&f, Some("{premise} => {hypothesis} [{labels}]")).unwrap();
        assert_eq!(docs[0].requests("")[1].0, "p => h. [0 or 1]");
        let f = file("{\"text\": \"a\", \"label\": \"x\"}\n");
        assert!(read_classify(&f, None)
            .unwrap_err()
            .to_string()
            .contains("only one label"));
    }
}
