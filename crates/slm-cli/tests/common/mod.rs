//! What the CLI tests share: running the binary, and a small corpus with its tokenizer and
//! shards.
// Each test binary includes this module and uses a different part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

pub fn slm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_slm"))
}

/// Runs `cmd`, fails the test with its stderr unless it succeeds, and returns its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd`, fails the test if it succeeds, and returns its stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// In `dir`: corpus/ (30 documents of 400 seeded words from a ten-word sea vocabulary),
/// tok.json (a 300-token BPE) and shards/.
pub fn corpus_tokenizer_shards(dir: &Path) {
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let words = [
        "the", "whale", "ship", "sea", "captain", "white", "deep", "sailed", "under", "storm",
    ];
    let mut x = 7u64;
    for d in 0..30 {
        let mut text = String::new();
        for _ in 0..400 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push_str(words[(x >> 60) as usize % words.len()]);
            text.push(if (x >> 20).is_multiple_of(9) {
                '.'
            } else {
                ' '
            });
        }
        std::fs::write(corpus.join(format!("{d:02}.txt")), text).unwrap();
    }
    ok(slm()
        .args([
            "tokenizer",
            "train",
            "corpus",
            "--vocab",
            "300",
            "-o",
            "tok.json",
        ])
        .current_dir(dir));
    ok(slm()
        .args([
            "data",
            "prepare",
            "corpus",
            "--tokenizer",
            "tok.json",
            "-o",
            "shards",
        ])
        .current_dir(dir));
}

/// Trains a tiny model on the shards in `dir` (see `corpus_tokenizer_shards`) and returns its
/// model folder.
pub fn train_tiny(dir: &Path, name: &str, kv_heads: usize, tied: bool) -> std::path::PathBuf {
    train_tiny_context(dir, name, kv_heads, tied, 32)
}

/// `train_tiny` with `context` positions.
pub fn train_tiny_context(
    dir: &Path,
    name: &str,
    kv_heads: usize,
    tied: bool,
    context: usize,
) -> std::path::PathBuf {
    let recipe = dir.join(format!("{name}.toml"));
    std::fs::write(
        &recipe,
        format!(
            r#"[run]
out = "{name}"
seed = 5
[data]
shards = "shards"
tokenizer = "tok.json"
[model]
d_model = 64
layers = 2
heads = 4
kv_heads = {kv_heads}
ffn = 96
context = {context}
tied_embeddings = {tied}
rope_theta = 500.0
[budget]
tokens = 20480
[optim]
batch = 8
lr = 1e-2
warmup = 5
"#
        ),
    )
    .unwrap();
    ok(slm().arg("train").arg(&recipe).current_dir(dir));
    dir.join(name).join("model")
}

/// `slm serve` running on a free loopback port, killed when dropped.
pub struct Server {
    child: Option<std::process::Child>,
    pub base: String,
}

impl Server {
    /// Starts `slm serve ARGS --port 0` and waits until /health answers 200.
    pub fn start(args: &[&str]) -> Server {
        use std::io::BufRead;
        let mut child = slm()
            .arg("serve")
            .args(args)
            .args(["--port", "0"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(|l| l.ok())
            {
                if !sent {
                    if let Some(rest) = line.strip_prefix("listening on http://") {
                        let addr = rest.split('/').next().unwrap_or("").to_string();
                        let _ = tx.send(addr);
                        sent = true;
                        continue;
                    }
                }
                eprintln!("[slm serve] {line}");
            }
        });
        let addr = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("slm serve printed no address");
        let server = Server {
            child: Some(child),
            base: format!("http://{addr}"),
        };
        let t = std::time::Instant::now();
        loop {
            if let Ok((200, _)) = server.request("GET", "/health", &[], b"") {
                return server;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(120),
                "slm serve never became healthy"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// A handle on a server another `Server` started (for requests from other threads); it
    /// does not own the process.
    pub fn attach(base: &str) -> Server {
        Server {
            child: None,
            base: base.to_string(),
        }
    }

    pub fn addr(&self) -> &str {
        self.base.strip_prefix("http://").unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a started server").id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        let child = self.child.as_mut().expect("a started server");
        child.try_wait().unwrap().is_none()
    }

    /// Sends `bytes`, then closes the connection without reading.
    pub fn raw_then_close(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(self.addr())?;
        s.write_all(bytes)?;
        s.shutdown(std::net::Shutdown::Both)
    }

    /// One HTTP/1.1 request on a fresh connection: (status, body). Written by hand so that
    /// tests can send what no client library would (broken bodies, lying lengths).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(u16, String)> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr(),
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.raw(&[head.as_bytes(), body].concat())
    }

    /// Sends `bytes` as they are and reads the answer until the server closes.
    pub fn raw(&self, bytes: &[u8]) -> std::io::Result<(u16, String)> {
        self.raw_with_head(bytes)
            .map(|(status, _, body)| (status, body))
    }

    /// As `raw`, with the response's head (status line and headers, lower-cased).
    pub fn raw_with_head(&self, bytes: &[u8]) -> std::io::Result<(u16, String, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.addr())?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
        // The server may answer (413) and close before it has read everything.
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {text:?}")))?;
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Ok((status, head.to_lowercase(), body.to_string()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `$SLM_PYTHON`, else `python3`, checked to import `modules`.
pub fn python_with(modules: &str) -> String {
    let py = std::env::var("SLM_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{py} cannot import {modules} (set SLM_PYTHON; .ci/run installs requirements-dev.txt)"
    );
    py
}

/// Runs a Python test script with `args`; fails the test with its output unless it succeeds,
/// and returns its stdout.
pub fn run_python(py: &str, script: &str, args: &[&str]) -> String {
    let out = Command::new(py).arg(script).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{script}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The logits slm's model in `model_dir` gives each row of token ids, at every position.
pub fn model_logits(model_dir: &Path, rows: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    use candle_core::{Device, Tensor};
    let m = slm_model::load(model_dir, &Device::Cpu).unwrap().model;
    rows.iter()
        .map(|r| {
            let x = Tensor::new(r.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            m.forward(&x, None, false)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2()
                .unwrap()
        })
        .collect()
}

/// A run's training loss at each update, from its metrics.jsonl.
pub fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// Runs `slm train RECIPE` in `dir`, killing it (SIGKILL) at seeded random moments within
/// the first 35% of `run_ms` (how long an unbroken run took) and resuming it, until a run
/// ends by itself (at most 40 tries), then finishes it if the last kill left it unfinished
/// (no model folder in `run`). `after_kill` checks the run folder after each kill. Returns
/// the number of kills.
pub fn kill_and_resume(
    dir: &Path,
    recipe: &Path,
    run: &Path,
    run_ms: u64,
    after_kill: impl Fn(),
) -> usize {
    let mut seed = 12345u64;
    let mut kills = 0;
    for attempt in 0..40 {
        let mut cmd = slm();
        cmd.arg("train").arg(recipe).current_dir(dir);
        if attempt > 0 {
            cmd.arg("--resume");
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let wait_ms = run_ms / 20 + (seed >> 33) % (run_ms * 3 / 10).max(1);
        std::thread::sleep(std::time::Duration::from_millis(wait_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
            after_kill();
            continue;
        }
        assert!(child.wait().unwrap().success(), "resumed run failed");
        break;
    }
    if !run.join("model").exists() {
        ok(slm()
            .arg("train")
            .arg(recipe)
            .arg("--resume")
            .current_dir(dir));
    }
    kills
}

/// Copies the files of folder `from` (not its subfolders) into `to`, made if missing.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
