//! The local model store and downloads into it from the Hugging Face hub (or any server that
//! speaks the same API, e.g. a mirror named by `HF_ENDPOINT`).
//!
//! A pull lists the repository's files with their checksums (`/api/models/{repo}/revision/
//! {rev}?blobs=true`), picks the ones a model needs, and fetches each from `/{repo}/resolve/
//! {sha}/{file}` into `FILE.part`, resuming with an HTTP Range request when a part is already
//! there. A file is renamed into place only after its SHA-256 (LFS files) or git blob SHA-1
//! (small files) matches the listing, so the store never holds a corrupt or truncated file.

mod download;
mod store;

use std::path::PathBuf;

pub use download::Progress;
pub use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid repository id {0:?}: expected OWNER/NAME (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")]
    RepoId(String),
    // The cause is part of the message (not a `source`) so it is printed once.
    #[error("{url}: {err}")]
    Http { url: String, err: Box<ureq::Error> },
    #[error("{url}: HTTP {status}{hint}")]
    Status {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("{url}: unexpected response: {msg}")]
    BadResponse { url: String, msg: String },
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{file}: transfer interrupted after {got} of {total} bytes ({reason}); run the same command again to resume")]
    Interrupted {
        file: String,
        got: u64,
        total: u64,
        reason: String,
    },
    #[error("{file}: checksum mismatch: expected {algo} {expected}, got {actual}; the download was discarded")]
    Checksum {
        file: String,
        algo: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{repo}: {msg}")]
    Selection { repo: String, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |err| Error::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// One file of a repository as the hub lists it.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    pub name: String,
    pub size: Option<u64>,
    pub checksum: Option<Checksum>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// LFS files: SHA-256 of the content.
    Sha256(String),
    /// Files kept in git: SHA-1 of `blob {len}\0{content}`.
    GitSha1(String),
}

/// A client for the hub's HTTP API.
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// Bytes a file whose listing gives no size may take (`limits::MAX_DOWNLOAD_BYTES`).
    pub(crate) max_unlisted_bytes: u64,
    pub(crate) idle_timeout: std::time::Duration,
}

/// How long a pull waits. There is no deadline for a whole body: a large file on a slow line
/// takes as long as it takes, and only silence ends it.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: std::time::Duration,
    /// From sending a request to the end of the response's headers.
    pub headers: std::time::Duration,
    /// The longest wait for the next bytes of a body (an idle connection, not a slow one).
    pub idle: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = std::time::Duration::from_secs;
        Self {
            connect: s(30),
            headers: s(60),
            idle: s(60),
        }
    }
}

impl Hub {
    /// `HF_ENDPOINT` (default https://huggingface.co) and `HF_TOKEN`, as huggingface_hub reads them.
    pub fn from_env() -> Self {
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        Self::new(&endpoint, std::env::var("HF_TOKEN").ok())
    }

    pub fn new(endpoint: &str, token: Option<String>) -> Self {
        Self::with_timeouts(endpoint, token, Timeouts::default())
    }

    pub fn with_timeouts(endpoint: &str, token: Option<String>, t: Timeouts) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(t.connect))
            .timeout_recv_response(Some(t.headers))
            // Each read may wait this long: a stalled transfer fails instead of hanging (the
            // next run resumes it), a slow one goes on.
            .timeout_per_read(Some(t.idle))
            .timeout_recv_body(None)
            .user_agent(concat!("slm/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            agent,
            max_unlisted_bytes: slm_format::limits::MAX_DOWNLOAD_BYTES,
            idle_timeout: t.idle,
        }
    }

    /// Lowers the size limit for files whose listing gives no size (for tests).
    pub fn with_max_unlisted_bytes(mut self, n: u64) -> Self {
        self.max_unlisted_bytes = n;
        self
    }

    fn get(&self, url: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let req = self.agent.get(url);
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// The commit a revision (branch, tag or sha) points to, and the files at that commit.
    pub fn list(&self, repo: &str, revision: &str) -> Result<(String, Vec<RemoteFile>)> {
        check_repo_id(repo)?;
        let url = format!(
            "{}/api/models/{repo}/revision/{}?blobs=true",
            self.endpoint,
            percent_encode(revision)
        );
        let resp = self.get(&url).call().map_err(|e| Error::Http {
            url: url.clone(),
            err: Box::new(e),
        })?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(Error::Status {
                url,
                status,
                hint: status_hint(status),
            });
        }
        let body = resp
            .into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| Error::Http {
                url: url.clone(),
                err: Box::new(e),
            })?;
        parse_listing(&url, &body)
    }

    /// Downloads what a model needs from `repo` into the store and returns the path to load:
    /// the model folder, or the GGUF file when the repository holds GGUF files. With `file`,
    /// only that file is fetched.
    pub fn pull(
        &self,
        store: &Store,
        repo: &str,
        revision: &str,
        file: Option<&str>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<PathBuf> {
        let (sha, files) = self.list(repo, revision)?;
        let wanted = select_files(repo, &files, file)?;
        let dir = store.model_dir(repo)?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        for f in &wanted {
            let path: Vec<String> = f.name.split('/').map(percent_encode).collect();
            let url = format!("{}/{repo}/resolve/{sha}/{}", self.endpoint, path.join("/"));
            download::fetch(self, &url, f, &dir.join(&f.name), progress)?;
        }
        Ok(match wanted.as_slice() {
            [one] if one.name.ends_with(".gguf") => dir.join(&one.name),
            _ => dir,
        })
    }
}

/// `s` with every byte outside RFC 3986's unreserved set percent-encoded (a '/' too), so a
/// name like `a#b?c.gguf` reaches the server as one path segment.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn status_hint(status: u16) -> &'static str {
    match status {
        401 | 403 => " (gated or private: set HF_TOKEN to a token with access)",
        404 => " (no such repository, revision or file)",
        429 => " (rate limited: try again later)",
        _ => "",
    }
}

pub(crate) fn check_repo_id(repo: &str) -> Result<()> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match repo.split_once('/') {
        Some((owner, name)) if ok_part(owner) && ok_part(name) => Ok(()),
        _ => Err(Error::RepoId(repo.to_string())),
    }
}

fn parse_listing(url: &str, body: &str) -> Result<(String, Vec<RemoteFile>)> {
    let bad = |msg: &str| Error::BadResponse {
        url: url.to_string(),
        msg: msg.to_string(),
    };
    let v: serde_json::Value =
        serde_json::from_str(body).map_err(|e| bad(&format!("not JSON: {e}")))?;
    let sha = v["sha"]
        .as_str()
        .ok_or_else(|| bad("no \"sha\" (commit) in the listing"))?
        .to_string();
    // The commit becomes part of every file's URL: a git object id and nothing else.
    if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(&format!(
            "\"sha\" is {sha:?}, expected a 40-digit hexadecimal commit id"
        )));
    }
    let siblings = v["siblings"]
        .as_array()
        .ok_or_else(|| bad("no \"siblings\" array in the listing"))?;
    let mut files = Vec::with_capacity(siblings.len());
    for s in siblings {
        let name = s["rfilename"]
            .as_str()
            .ok_or_else(|| bad("a sibling without \"rfilename\""))?;
        // The name becomes a path under the store: no absolute paths, no climbing out.
        if name.is_empty()
            || name.starts_with('/')
            || name.contains('\\')
            || name
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(bad(&format!("unsafe file name {name:?}")));
        }
        let lfs = &s["lfs"];
        let checksum = if let Some(h) = lfs["sha256"].as_str() {
            Some(Checksum::Sha256(h.to_ascii_lowercase()))
        } else {
            s["blobId"]
                .as_str()
                .map(|h| Checksum::GitSha1(h.to_ascii_lowercase()))
        };
        let size = lfs["size"].as_u64().or_else(|| s["size"].as_u64());
        files.push(RemoteFile {
            name: name.to_string(),
            size,
            checksum,
        });
    }
    Ok((sha, files))
}

/// The files a model folder needs: config, weights, tokenizer; or one GGUF file.
fn select_files(repo: &str, files: &[RemoteFile], file: Option<&str>) -> Result<Vec<RemoteFile>> {
    if let Some(want) = file {
        return match files.iter().find(|f| f.name == want) {
            Some(f) => Ok(vec![f.clone()]),
            None => Err(Error::Selection {
                repo: repo.into(),
                msg: format!(
                    "no file {want:?}; the repository has: {}",
                    names(files.iter())
                ),
            }),
        };
    }
    const FOLDER: [&str; 6] = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "model.safetensors.index.json",
    ];
    let has_config = files.iter().any(|f| f.name == "config.json");
    let safetensors = files
        .iter()
        .any(|f| f.name.ends_with(".safetensors") && !f.name.contains('/'));
    if has_config && safetensors {
        return Ok(files
            .iter()
            .filter(|f| {
                FOLDER.contains(&f.name.as_str())
                    || (f.name.ends_with(".safetensors") && !f.name.contains('/'))
            })
            .cloned()
            .collect());
    }
    let ggufs: Vec<&RemoteFile> = files.iter().filter(|f| f.name.ends_with(".gguf")).collect();
    match ggufs.as_slice() {
        [one] => Ok(vec![(*one).clone()]),
        [] => Err(Error::Selection {
            repo: repo.into(),
            msg: format!(
                "neither config.json with .safetensors weights nor a .gguf file; it has: {}",
                names(files.iter())
            ),
        }),
        many => Err(Error::Selection {
            repo: repo.into(),
            msg: format!(
                "{} GGUF files; choose one with --file: {}",
                many.len(),
                names(many.iter().copied())
            ),
        }),
    }
}

fn names<'a>(files: impl Iterator<Item = &'a RemoteFile>) -> String {
    files
        .map(|f| f.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str) -> RemoteFile {
        RemoteFile {
            name: name.into(),
            size: Some(1),
            checksum: None,
        }
    }

    #[test]
    fn repo_ids_are_owner_slash_name() {
        assert!(check_repo_id("HuggingFaceTB/SmolLM2-135M").is_ok());
        for bad in ["noslash", "a/b/c", "../x", "a/..", "/abs", "a b/c", ""] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn picks_folder_files_or_the_single_gguf() {
        let folder = [
            f("config.json"),
            f("model.safetensors"),
            f("tokenizer.json"),
            f("README.md"),
            f("onnx/model.onnx"),
        ];
        let got: Vec<String> = select_files("a/b", &folder, None)
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert_eq!(got, ["config.json", "model.safetensors", "tokenizer.json"]);

        let two = [f("m.Q4_0.gguf"), f("m.Q8_0.gguf")];
        let err = select_files("a/b", &two, None).unwrap_err().to_string();
        assert!(
            err.contains("--file") && err.contains("m.Q8_0.gguf"),
            "{err}"
        );
        assert_eq!(
            select_files("a/b", &two, Some("m.Q8_0.gguf")).unwrap()[0].name,
            "m.Q8_0.gguf"
        );
        assert!(select_files("a/b", &two, Some("x.gguf"))
            .unwrap_err()
            .to_string()
            .contains("m.Q4_0.gguf"));
    }

    #[test]
    fn listing_rejects_paths_that_escape_the_store() {
        for name in ["../evil", "/etc/passwd", "a//b", "a/./b", "a\\b"] {
            let body = format!(
                r#"{{"sha":"0123456789abcdef0123456789abcdef01234567","siblings":[{{"rfilename":"{}"}}]}}"#,
                name.replace('\\', "\\\\")
            );
            let err = parse_listing("u", &body).unwrap_err().to_string();
            assert!(err.contains("unsafe file name"), "{name}: {err}");
        }
    }
}
