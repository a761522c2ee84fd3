//! `$SLM_HOME/models/OWNER/NAME/`: one folder per pulled repository, in the repository's layout.

use std::path::{Path, PathBuf};

use crate::{check_repo_id, Result};

pub struct Store {
    root: PathBuf,
}

impl Store {
    /// `$SLM_HOME`, or `~/.cache/slm` when it is not set.
    pub fn from_env() -> Self {
        let root = std::env::var_os("SLM_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
                    .join(".cache/slm")
            });
        Self::new(root)
    }

    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn model_dir(&self, repo: &str) -> Result<PathBuf> {
        check_repo_id(repo)?;
        Ok(self.root.join("models").join(repo))
    }

    /// The loadable path for a name in the store: `OWNER/NAME` (its folder when it holds
    /// config.json, else its only .gguf file) or `OWNER/NAME/FILE`. None when not stored.
    pub fn resolve(&self, name: &str) -> Option<PathBuf> {
        let mut parts = name.splitn(3, '/');
        let repo = format!("{}/{}", parts.next()?, parts.next()?);
        let dir = self.model_dir(&repo).ok()?;
        if let Some(file) = parts.next() {
            let p = dir.join(file);
            let inside = !file.split('/').any(|c| c == ".." || c.is_empty());
            return (inside && p.is_file()).then_some(p);
        }
        if dir.join("config.json").is_file() {
            return Some(dir);
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    }
}
