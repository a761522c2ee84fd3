//! `Hub::pull` against a local HTTP server that answers like huggingface.co: the listing API,
//! `resolve` URLs that redirect LFS files to a CDN path, and Range requests.

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha1::Digest;

mod common;
use slm_hub::{Error, Hub, Progress, Store};

struct File {
    name: String,
    bytes: Vec<u8>,
    lfs: bool,
}

#[derive(Default)]
struct Behaviour {
    /// Send only this many bytes of the named file once, then drop the connection.
    cut: Option<(String, usize)>,
    /// Serve these bytes instead of the listed content (a corrupted mirror).
    corrupt: Option<(String, Vec<u8>)>,
}

struct Server {
    url: String,
    log: Arc<Mutex<Vec<String>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn sha256(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

fn git_sha1(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex::encode(h.finalize())
}

fn listing(files: &[File]) -> String {
    let siblings: Vec<serde_json::Value> = files
        .iter()
        .map(|f| {
            let mut s = serde_json::json!({
                "rfilename": f.name,
                "size": f.bytes.len(),
                "blobId": git_sha1(f.name.as_bytes()), // LFS pointers' blob id: not the content
            });
            if f.lfs {
                s["lfs"] = serde_json::json!({"sha256": sha256(&f.bytes), "size": f.bytes.len(), "pointerSize": 132});
            } else {
                s["blobId"] = git_sha1(&f.bytes).into();
            }
            s
        })
        .collect();
    serde_json::json!({"id": "test/model", "sha": SHA, "siblings": siblings}).to_string()
}

fn serve(repos: HashMap<String, Vec<File>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let behaviour = Arc::new(Mutex::new(Behaviour::default()));
    let repos = Arc::new(repos);
    let (l, b) = (log.clone(), behaviour.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (repos, l, b) = (repos.clone(), l.clone(), b.clone());
            std::thread::spawn(move || handle(stream, &repos, &l, &b));
        }
    });
    Server {
        url,
        log,
        behaviour,
    }
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    if !headers.iter().any(|(k, _)| *k == "Content-Length") {
        head += &format!("Content-Length: {}\r\n", body.len());
    }
    head += "\r\n";
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn handle(
    mut s: TcpStream,
    repos: &HashMap<String, Vec<File>>,
    log: &Mutex<Vec<String>>,
    behaviour: &Mutex<Behaviour>,
) {
    let req = common::read_request(&s);
    let (path, range) = (req.raw_path, req.range);
    log.lock().unwrap().push(match &range {
        Some(r) => format!("{path} {r}"),
        None => path.clone(),
    });

    if let Some(rest) = path.strip_prefix("/api/models/") {
        let repo = rest.split("/revision/").next().unwrap();
        return match repos.get(repo) {
            Some(files) => respond(&mut s, "200 OK", &[], listing(files).as_bytes()),
            None => respond(
                &mut s,
                "404 Not Found",
                &[],
                b"{\"error\":\"Repository not found\"}",
            ),
        };
    }
    // /cdn/SHA256 serves LFS content, as the hub's CDN does after the redirect.
    let (file, direct) = if let Some(h) = path.strip_prefix("/cdn/") {
        let f = repos
            .values()
            .flatten()
            .find(|f| f.lfs && sha256(&f.bytes) == h);
        (f, true)
    } else {
        let mut it = path.splitn(5, '/').skip(1); // owner, name, "resolve", sha/file
        let (owner, name, _resolve, rest) = (it.next(), it.next(), it.next(), it.next());
        let file = rest.and_then(|r| r.split_once('/')).map(|(_, f)| f);
        let f = match (owner, name, file) {
            (Some(o), Some(n), Some(file)) => repos
                .get(&format!("{o}/{n}"))
                .and_then(|fs| fs.iter().find(|f| f.name == file)),
            _ => None,
        };
        (f, false)
    };
    let Some(f) = file else {
        return respond(&mut s, "404 Not Found", &[], b"Entry not found");
    };
    if f.lfs && !direct {
        let loc = format!("/cdn/{}", sha256(&f.bytes));
        return respond(&mut s, "302 Found", &[("Location", loc)], b"");
    }
    let mut b = behaviour.lock().unwrap();
    let bytes = match &b.corrupt {
        Some((n, bytes)) if *n == f.name => bytes.clone(),
        _ => f.bytes.clone(),
    };
    let start: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let body = &bytes[start.min(bytes.len())..];
    let mut headers = vec![("Content-Length", body.len().to_string())];
    let status = if range.is_some() {
        headers.push((
            "Content-Range",
            format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len()),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    if let Some((n, at)) = b.cut.clone() {
        if n == f.name {
            b.cut = None;
            drop(b);
            // Promise the whole body, send part of it, hang up.
            respond(&mut s, status, &headers, &body[..at]);
            let _ = s.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
    drop(b);
    respond(&mut s, status, &headers, body);
}

fn weights(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

fn folder_repo() -> Vec<File> {
    vec![
        File {
            name: "config.json".into(),
            bytes: br#"{"model_type":"llama"}"#.to_vec(),
            lfs: false,
        },
        File {
            name: "model.safetensors".into(),
            bytes: weights(3 << 20, 1),
            lfs: true,
        },
        File {
            name: "tokenizer.json".into(),
            bytes: b"{\"model\":{}}".to_vec(),
            lfs: false,
        },
        File {
            name: "README.md".into(),
            bytes: b"# a model".to_vec(),
            lfs: false,
        },
    ]
}

fn setup() -> (Server, Hub, Store, tempfile::TempDir) {
    let mut repos = HashMap::new();
    repos.insert("test/model".to_string(), folder_repo());
    repos.insert(
        "test/gguf".to_string(),
        vec![
            File {
                name: "m.Q4_0.gguf".into(),
                bytes: weights(1000, 2),
                lfs: true,
            },
            File {
                name: "m.Q8_0.gguf".into(),
                bytes: weights(2000, 3),
                lfs: true,
            },
        ],
    );
    let server = serve(repos);
    let hub = Hub::new(&server.url, None);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    (server, hub, store, dir)
}

fn quiet() -> impl FnMut(Progress) {
    |_| {}
}

#[test]
fn pulls_a_model_folder_verified_and_skips_it_the_second_time() {
    let (server, hub, store, _dir) = setup();
    let path = hub
        .pull(&store, "test/model", "main", None, &mut quiet())
        .unwrap();
    assert_eq!(path, store.root().join("models/test/model"));
    for f in folder_repo() {
        let p = path.join(&f.name);
        if f.name == "README.md" {
            assert!(!p.exists(), "README.md is not part of a model");
        } else {
            assert_eq!(std::fs::read(&p).unwrap(), f.bytes, "{}", f.name);
        }
    }
    assert!(server
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("/cdn/")));
    let leftovers: Vec<_> = std::fs::read_dir(&path)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty());
    assert_eq!(store.resolve("test/model"), Some(path.clone()));

    server.log.lock().unwrap().clear();
    let mut cached = 0;
    hub.pull(&store, "test/model", "main", None, &mut |p| {
        if let Progress::Done { cached: true, .. } = p {
            cached += 1
        }
    })
    .unwrap();
    assert_eq!(cached, 3);
    let log = server.log.lock().unwrap();
    assert!(log.iter().all(|l| l.starts_with("/api/")), "{log:?}");
}

#[test]
fn resumes_an_interrupted_transfer_with_a_range_request() {
    let (server, hub, store, _dir) = setup();
    let cut = 1_000_000;
    server.behaviour.lock().unwrap().cut = Some(("model.safetensors".into(), cut));
    let err = hub
        .pull(&store, "test/model", "main", None, &mut quiet())
        .unwrap_err();
    assert!(matches!(err, Error::Interrupted { .. }), "{err}");
    assert!(
        err.to_string().contains("run the same command again"),
        "{err}"
    );
    let part = store
        .root()
        .join("models/test/model/model.safetensors.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), cut as u64);

    let mut resumed_from = None;
    let path = hub
        .pull(&store, "test/model", "main", None, &mut |p| {
            if let Progress::Start { file, from, .. } = p {
                if file == "model.safetensors" {
                    resumed_from = Some(from)
                }
            }
        })
        .unwrap();
    assert_eq!(resumed_from, Some(cut as u64));
    assert!(server
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("/cdn/") && l.ends_with(&format!("bytes={cut}-"))));
    assert_eq!(
        std::fs::read(path.join("model.safetensors")).unwrap(),
        folder_repo()[1].bytes
    );
    assert!(!part.exists());
}

#[test]
fn rejects_content_that_does_not_match_the_listed_checksum() {
    let (server, hub, store, _dir) = setup();
    let mut bad = folder_repo()[1].bytes.clone();
    bad[12345] ^= 1;
    server.behaviour.lock().unwrap().corrupt = Some(("model.safetensors".into(), bad));
    let err = hub
        .pull(&store, "test/model", "main", None, &mut quiet())
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Checksum { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("sha256"),
        "{msg}"
    );
    let dir = store.root().join("models/test/model");
    assert!(!dir.join("model.safetensors").exists());
    assert!(!dir.join("model.safetensors.part").exists());

    // A corrupted small file is caught by its git blob id.
    std::fs::remove_file(dir.join("config.json")).unwrap();
    server.behaviour.lock().unwrap().corrupt =
        Some(("config.json".into(), br#"{"model_type":"llamb"}"#.to_vec()));
    let msg = hub
        .pull(&store, "test/model", "main", None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("config.json") && msg.contains("git-sha1"),
        "{msg}"
    );
}

#[test]
fn gguf_repositories_need_a_file_choice_when_they_hold_several() {
    let (_server, hub, store, _dir) = setup();
    let msg = hub
        .pull(&store, "test/gguf", "main", None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("--file") && msg.contains("m.Q4_0.gguf"),
        "{msg}"
    );
    let path = hub
        .pull(
            &store,
            "test/gguf",
            "main",
            Some("m.Q8_0.gguf"),
            &mut quiet(),
        )
        .unwrap();
    assert_eq!(path, store.root().join("models/test/gguf/m.Q8_0.gguf"));
    assert_eq!(std::fs::read(&path).unwrap(), weights(2000, 3));
    assert_eq!(store.resolve("test/gguf"), Some(path.clone()));
    assert_eq!(store.resolve("test/gguf/m.Q8_0.gguf"), Some(path));
    assert_eq!(store.resolve("test/gguf/../model"), None);
}

#[test]
fn unknown_repositories_and_bad_ids_are_clear_errors() {
    let (_server, hub, store, _dir) = setup();
    let msg = hub
        .pull(&store, "test/missing", "main", None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("404") && msg.contains("no such repository"),
        "{msg}"
    );
    let msg = hub
        .pull(&store, "../../etc", "main", None, &mut quiet())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("OWNER/NAME"), "{msg}");
}
