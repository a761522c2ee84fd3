//! Reading a corpus into documents: a text file (one document), a folder of .txt/.md files (one
//! document each, in path order), or JSON Lines with a "text" field (one document per line).

use std::path::{Path, PathBuf};

use crate::{DataError, Result};

#[derive(Debug, Clone)]
pub struct Document {
    /// Where it came from (`file` or `file:line`), for error messages.
    pub source: String,
    pub text: String,
}

/// Text, or a clear error for bytes that are not text (invalid UTF-8 or NUL bytes, which
/// no text editor writes and which a tokenizer would happily learn as tokens).
fn as_text(path: &Path, bytes: Vec<u8>) -> Result<String> {
    if let Some(at) = bytes.iter().position(|&b| b == 0) {
        return Err(DataError::NotText {
            file: path.to_path_buf(),
            what: format!("NUL byte at offset {at}"),
        });
    }
    String::from_utf8(bytes).map_err(|e| DataError::NotText {
        file: path.to_path_buf(),
        what: format!("invalid UTF-8 at byte {}", e.utf8_error().valid_up_to()),
    })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|err| DataError::Io {
        path: path.to_path_buf(),
        err,
    })
}

fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl") | Some("ndjson")
    )
}

fn jsonl_docs(path: &Path, text: &str, out: &mut Vec<Document>) -> Result<()> {
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| DataError::Format {
            file: path.to_path_buf(),
            line: i + 1,
            what,
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let t = v
            .get("text")
            .ok_or_else(|| bad("no \"text\" field".into()))?
            .as_str()
            .ok_or_else(|| bad("\"text\" is not a string".into()))?;
        out.push(Document {
            source: format!("{}:{}", path.display(), i + 1),
            text: t.to_string(),
        });
    }
    Ok(())
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|err| DataError::Io {
        path: dir.to_path_buf(),
        err,
    })?;
    for e in entries {
        let p = e
            .map_err(|err| DataError::Io {
                path: dir.to_path_buf(),
                err,
            })?
            .path();
        if p.is_dir() {
            collect_files(&p, files)?;
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("txt") | Some("md") | Some("jsonl") | Some("ndjson")
        ) {
            files.push(p);
        }
    }
    Ok(())
}

/// Every document of every corpus path, in a fixed order. Empty documents are dropped; a
/// corpus with no text at all is an error.
pub fn read_corpus(paths: &[PathBuf]) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    for p in paths {
        let mut files = Vec::new();
        if p.is_dir() {
            collect_files(p, &mut files)?;
            files.sort();
            if files.is_empty() {
                return Err(DataError::Empty(format!(
                    "{}: no .txt, .md or .jsonl files in this folder",
                    p.display()
                )));
            }
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            return Err(DataError::Io {
                path: p.clone(),
                err: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            });
        }
        for f in files {
            let text = as_text(&f, read(&f)?)?;
            if is_jsonl(&f) {
                jsonl_docs(&f, &text, &mut docs)?;
            } else {
                docs.push(Document {
                    source: f.display().to_string(),
                    text,
                });
            }
        }
    }
    docs.retain(|d| !d.text.trim().is_empty());
    if docs.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::Empty(format!(
            "{}: the corpus holds no text",
            names.join(", ")
        )));
    }
    Ok(docs)
}
