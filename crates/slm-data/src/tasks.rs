//! Fine-tuning task files (JSON Lines, DESIGN.md's formats) read and checked row by row:
//! tagging `{"tokens": [...], "tags": [...]}` with word-level BIO tags, and chat
//! `{"messages": [{"role", "content"}]}`. A bad row is an error naming its file and line.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{DataError, Result};

/// Words in one tagging row; a tweet or a sentence has tens.
pub const MAX_WORDS: usize = 4096;
/// Turns in one conversation.
pub const MAX_TURNS: usize = 4096;

#[derive(Debug, Clone, PartialEq)]
pub struct TagRow {
    pub tokens: Vec<String>,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

/// Each non-empty line of a JSON Lines file as a JSON object, with its 1-based line number.
fn rows(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let text = std::fs::read_to_string(path).map_err(|err| DataError::Io {
        path: path.to_path_buf(),
        err,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| format_err(path, i + 1, what);
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => out.push((i + 1, o)),
            Ok(other) => return Err(bad(format!("expected a JSON object, found {other}"))),
            Err(e) => return Err(bad(format!("not JSON: {e}"))),
        }
    }
    if out.is_empty() {
        return Err(DataError::Empty(format!("{}: no rows", path.display())));
    }
    Ok(out)
}

fn format_err(path: &Path, line: usize, what: String) -> DataError {
    DataError::Format {
        file: PathBuf::from(path),
        line,
        what,
    }
}

/// A list of strings, at most `max` long.
fn strings(
    o: &serde_json::Map<String, Value>,
    key: &str,
    max: usize,
) -> std::result::Result<Vec<String>, String> {
    let list = o
        .get(key)
        .ok_or_else(|| format!("no \"{key}\" field"))?
        .as_array()
        .ok_or_else(|| format!("\"{key}\" is not a list"))?;
    if list.len() > max {
        return Err(format!(
            "\"{key}\" has {} entries; at most {max}",
            list.len()
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("\"{key}\"[{i}] is {v}, not a string"))
        })
        .collect()
}

/// A classification row: the text (a pair's premise and hypothesis joined by a newline)
/// and its label.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRow {
    pub text: String,
    pub label: String,
}

/// A classification file: `{"text", "label"}` or `{"premise", "hypothesis", "label"}`, the
/// label a string (or an integer, as some datasets give them, read as its digits). Other
/// fields (a source, a confidence) are left alone.
pub fn read_labeled(path: &Path) -> Result<Vec<LabelRow>> {
    rows(path)?
        .into_iter()
        .map(|(line, o)| {
            let bad = |what: String| format_err(path, line, what);
            let field = |k: &str| -> std::result::Result<Option<String>, String> {
                match o.get(k) {
                    None => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(other) => Err(format!("\"{k}\" is {other}, not a string")),
                }
            };
            let text = match (field("text"), field("premise"), field("hypothesis")) {
                (Ok(Some(t)), _, _) => t,
                (Ok(None), Ok(Some(p)), Ok(Some(h))) => format!("{p}\n{h}"),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Err(bad(e)),
                _ => {
                    return Err(bad(
                        "expected a \"text\" field, or \"premise\" and \"hypothesis\"".into(),
                    ))
                }
            };
            let label = match o.get("label") {
                Some(Value::String(s)) if !s.is_empty() => s.clone(),
                Some(Value::Number(n)) if n.is_u64() => n.to_string(),
                Some(other) => {
                    return Err(bad(format!(
                        "\"label\" is {other}: expected a non-empty string or an integer"
                    )))
                }
                None => return Err(bad("no \"label\" field".into())),
            };
            Ok(LabelRow { text, label })
        })
        .collect()
}

/// The texts of a file to label: "text", or "premise" and "hypothesis" joined by a newline
/// (as `read_labeled` joins them); labels and other fields are ignored.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    rows(path)?
        .into_iter()
        .map(|(line, o)| {
            let get = |k: &str| o.get(k).and_then(Value::as_str);
            match (get("text"), get("premise"), get("hypothesis")) {
                (Some(t), _, _) => Ok(t.to_string()),
                (None, Some(p), Some(h)) => Ok(format!("{p}\n{h}")),
                _ => Err(format_err(
                    path,
                    line,
                    "expected a \"text\" string, or \"premise\" and \"hypothesis\"".into(),
                )),
            }
        })
        .collect()
}

/// The sentences of a file to tag: each row's "tokens" (1 to `MAX_WORDS` words); tags and
/// other fields are ignored.
pub fn read_words(path: &Path) -> Result<Vec<Vec<String>>> {
    rows(path)?
        .into_iter()
        .map(|(line, o)| {
            let words = strings(&o, "tokens", MAX_WORDS).map_err(|e| format_err(path, line, e))?;
            if words.is_empty() {
                return Err(format_err(path, line, "\"tokens\" is empty".into()));
            }
            Ok(words)
        })
        .collect()
}

/// A tagging file: words and their BIO tags, one row per sentence.
pub fn read_tagging(path: &Path) -> Result<Vec<TagRow>> {
    rows(path)?
        .into_iter()
        .map(|(line, o)| {
            let bad = |what: String| format_err(path, line, what);
            let tokens = strings(&o, "tokens", MAX_WORDS).map_err(bad)?;
            let tags = strings(&o, "tags", MAX_WORDS).map_err(bad)?;
            if tokens.is_empty() {
                return Err(bad("\"tokens\" is empty".into()));
            }
            if tokens.len() != tags.len() {
                return Err(bad(format!(
                    "{} tokens but {} tags: one tag per word",
                    tokens.len(),
                    tags.len()
                )));
            }
            check_bio(&tags).map_err(|e| bad(format!("tags are not valid BIO: {e}")))?;
            Ok(TagRow { tokens, tags })
        })
        .collect()
}

/// A chat file: conversations of system, user and assistant turns; each needs an assistant
/// turn (fine-tuning learns those).
pub fn read_chat(path: &Path) -> Result<Vec<Vec<Turn>>> {
    rows(path)?
        .into_iter()
        .map(|(line, o)| {
            let bad = |what: String| format_err(path, line, what);
            let msgs = o
                .get("messages")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("no \"messages\" list".into()))?;
            if msgs.len() > MAX_TURNS {
                return Err(bad(format!("{} turns; at most {MAX_TURNS}", msgs.len())));
            }
            let mut turns = Vec::with_capacity(msgs.len());
            for (i, m) in msgs.iter().enumerate() {
                let field = |k: &str| m.get(k).and_then(Value::as_str);
                let (Some(role), Some(content)) = (field("role"), field("content")) else {
                    return Err(bad(format!(
                        "messages[{i}] needs string \"role\" and \"content\" fields"
                    )));
                };
                if !matches!(role, "system" | "user" | "assistant") {
                    return Err(bad(format!(
                        "messages[{i}] has role '{role}': expected system, user or assistant"
                    )));
                }
                turns.push(Turn {
                    role: role.to_string(),
                    content: content.to_string(),
                });
            }
            if !turns.iter().any(|t| t.role == "assistant") {
                return Err(bad(
                    "the conversation has no assistant turn: there is nothing to learn from it"
                        .into(),
                ));
            }
            Ok(turns)
        })
        .collect()
}

/// Checks that `tags` are strict BIO: each is `O`, `B-TYPE` or `I-TYPE`, and an `I-TYPE`
/// continues a `B-TYPE` or `I-TYPE` of the same type. The error names the position and tag.
pub fn check_bio<S: AsRef<str>>(tags: &[S]) -> std::result::Result<(), String> {
    let mut prev: Option<&str> = None; // the type of the entity the previous tag is in
    for (i, t) in tags.iter().enumerate() {
        let t = t.as_ref();
        if t == "O" {
            prev = None;
            continue;
        }
        let (kind, begins) = match (t.strip_prefix("B-"), t.strip_prefix("I-")) {
            (Some(k), _) if !k.is_empty() => (k, true),
            (_, Some(k)) if !k.is_empty() => (k, false),
            _ => return Err(format!("tag {i} is '{t}': expected O, B-TYPE or I-TYPE")),
        };
        if !begins && prev != Some(kind) {
            let after = match i {
                0 => "nothing".to_string(),
                _ => format!("'{}'", tags[i - 1].as_ref()),
            };
            return Err(format!(
                "tag {i} is '{t}' but follows {after}: an I- tag must continue a B-{kind} or I-{kind}"
            ));
        }
        prev = Some(kind);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn seq(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn bio_is_checked_strictly_with_the_position_named() {
        assert!(check_bio(&seq("O B-PER I-PER O B-LOC")).is_ok());
        for (tags, want) in [
            ("O I-PER", "tag 1 is 'I-PER' but follows 'O'"),
            ("I-PER", "follows nothing"),
            ("B-PER I-LOC", "tag 1 is 'I-LOC'"),
            ("B-PER X", "tag 1 is 'X': expected O, B-TYPE or I-TYPE"),
            ("B-", "tag 0 is 'B-'"),
        ] {
            let e = check_bio(&seq(tags)).unwrap_err();
            assert!(e.contains(want), "{tags}: {e}");
        }
    }

    #[test]
    fn tagging_rows_are_read_and_bad_ones_named_by_line() {
        let f = file(
            "{\"tokens\": [\"Ann\", \"sailed\"], \"tags\": [\"B-PER\", \"O\"]}\n\n\
             {\"tokens\": [\"to\", \"New\", \"York\"], \"tags\": [\"O\", \"B-LOC\", \"I-LOC\"]}\n",
        );
        let rows = read_tagging(f.path()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].tags, seq("O B-LOC I-LOC"));
        for (text, want) in [
            (
                "{\"tokens\": [\"a\"], \"tags\": [\"I-PER\"]}",
                ":1: tags are not valid BIO: tag 0",
            ),
            (
                "{\"tokens\": [\"a\", \"b\"], \"tags\": [\"O\"]}",
                "2 tokens but 1 tags",
            ),
            ("{\"tokens\": [], \"tags\": []}", "\"tokens\" is empty"),
            (
                "{\"tokens\": [1], \"tags\": [\"O\"]}",
                "\"tokens\"[0] is 1, not a string",
            ),
            ("{\"tags\": [\"O\"]}", "no \"tokens\" field"),
            ("[1]", "expected a JSON object"),
            (
                "{\"tokens\": [\"a\"], \"tags\": [\"O\"]}\n{bad",
                ":2: not JSON",
            ),
            ("", "no rows"),
        ] {
            let e = read_tagging(file(text).path()).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn labeled_rows_take_text_or_pairs_and_name_bad_lines() {
        let f = file(
            "{\"text\": \"fine\", \"label\": \"positive\", \"source\": \"x\"}\n\
             {\"premise\": \"A\", \"hypothesis\": \"B\", \"label\": 1}\n",
        );
        let rows = read_labeled(f.path()).unwrap();
        assert_eq!(rows[0].label, "positive");
        assert_eq!(
            (rows[1].text.as_str(), rows[1].label.as_str()),
            ("A\nB", "1")
        );
        for (text, want) in [
            ("{\"text\": \"x\"}", ":1: no \"label\""),
            ("{\"text\": \"x\", \"label\": 1.5}", "\"label\" is 1.5"),
            ("{\"text\": \"x\", \"label\": \"\"}", "non-empty"),
            ("{\"text\": 3, \"label\": \"a\"}", "\"text\" is 3"),
            (
                "{\"premise\": \"x\", \"label\": \"a\"}",
                "\"premise\" and \"hypothesis\"",
            ),
        ] {
            let e = read_labeled(file(text).path()).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn chat_rows_need_roles_content_and_an_assistant_turn() {
        let f = file(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, \
             {\"role\": \"assistant\", \"content\": \"Hello!\"}]}\n",
        );
        let chats = read_chat(f.path()).unwrap();
        assert_eq!(chats[0][1].content, "Hello!");
        for (text, want) in [
            (
                "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}",
                "no assistant turn",
            ),
            (
                "{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}",
                "role 'bot'",
            ),
            (
                "{\"messages\": [{\"role\": \"user\"}]}",
                "messages[0] needs string",
            ),
            ("{\"text\": \"x\"}", "no \"messages\" list"),
        ] {
            let e = read_chat(file(text).path()).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
