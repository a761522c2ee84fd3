//! `Hub::pull` against servers that misbehave: never answer, stall, trickle, send without
//! end, or list names and commits that would change the URL. Each test runs its own server
//! on a local port; timeouts are scaled down (seconds, not minutes) so the suite stays quick,
//! and each test says what its scale stands for.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest;
use slm_hub::{Error, Hub, Progress, Store, Timeouts};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

mod common;
use common::{read_request, Request};

type Handler = dyn Fn(Request, &mut TcpStream, usize) + Send + Sync;

/// Serves each connection on its own thread with `handle(request, stream, n)`, n counting
/// the requests for files (not listings); returns the base URL and the log of raw paths.
fn serve(listing: String, handle: Box<Handler>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let (l, handle, listing) = (log.clone(), Arc::new(handle), Arc::new(listing));
    let count = Arc::new(Mutex::new(0usize));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (l, h, listing, count) =
                (l.clone(), handle.clone(), listing.clone(), count.clone());
            std::thread::spawn(move || {
                let mut s = stream;
                let req = read_request(&s);
                l.lock().unwrap().push(req.raw_path.clone());
                if req.path.starts_with("/api/") {
                    head(&mut s, "200 OK", Some(listing.len()), None);
                    let _ = s.write_all(listing.as_bytes());
                    return;
                }
                let n = {
                    let mut c = count.lock().unwrap();
                    *c += 1;
                    *c
                };
                h(req, &mut s, n);
            });
        }
    });
    (url, log)
}

fn head(s: &mut TcpStream, status: &str, len: Option<usize>, range: Option<(usize, usize)>) {
    let mut h = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    if let Some(n) = len {
        h += &format!("Content-Length: {n}\r\n");
    }
    if let Some((from, total)) = range {
        h += &format!("Content-Range: bytes {from}-{}/{total}\r\n", total - 1);
    }
    h += "\r\n";
    let _ = s.write_all(h.as_bytes());
}

fn listing(name: &str, bytes: &[u8], with_size: bool) -> String {
    let mut f = serde_json::json!({"rfilename": name});
    if with_size {
        f["lfs"] = serde_json::json!({
            "sha256": hex::encode(sha2::Sha256::digest(bytes)),
            "size": bytes.len(),
        });
    }
    serde_json::json!({"sha": SHA, "siblings": [f]}).to_string()
}

fn content(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn hub(url: &str, idle_s: f64) -> Hub {
    let d = Duration::from_secs_f64(idle_s);
    Hub::with_timeouts(
        url,
        None,
        Timeouts {
            connect: d,
            headers: d,
            idle: d,
        },
    )
}

fn pull(hub: &Hub, store: &Store, file: &str) -> Result<std::path::PathBuf, Error> {
    hub.pull(store, "test/m", "main", Some(file), &mut |_: Progress| {})
}

/// A server that accepts and never sends a header: the header timeout ends the wait.
#[test]
fn a_server_that_never_answers_times_out() {
    let bytes = content(1000);
    let (url, _) = serve(
        listing("m.gguf", &bytes, true),
        Box::new(|_, _s, _| std::thread::sleep(Duration::from_secs(30))),
    );
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let err = pull(&hub(&url, 1.0), &Store::new(dir.path()), "m.gguf").unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        t.elapsed()
    );
    assert!(err.to_string().to_lowercase().contains("timeout"), "{err}");
}

/// A transfer that runs six times longer than the idle timeout, never pausing as long as
/// it: it completes. (At the default 60 s idle timeout this is a six-minute download; the old
/// total deadline of 60 s failed every download longer than a minute.)
#[test]
fn a_slow_transfer_is_not_cut_off() {
    let bytes = content(60_000);
    let served = bytes.clone();
    let (url, _) = serve(
        listing("m.gguf", &bytes, true),
        Box::new(move |_, s, _| {
            head(s, "200 OK", Some(served.len()), None);
            for chunk in served.chunks(1000) {
                let _ = s.write_all(chunk);
                std::thread::sleep(Duration::from_millis(100));
            }
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let path = pull(&hub(&url, 1.0), &Store::new(dir.path()), "m.gguf").unwrap();
    assert!(t.elapsed() > Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(std::fs::read(path).unwrap(), bytes);
}

/// A transfer that stops sending (without closing) fails after the idle timeout, keeps what
/// arrived, and the next pull resumes from there with a Range request.
#[test]
fn a_stalled_transfer_fails_then_resumes() {
    let bytes = content(50_000);
    let served = bytes.clone();
    let (url, log) = serve(
        listing("m.gguf", &bytes, true),
        Box::new(move |req, s, n| {
            let from = req.range_from().unwrap_or(0);
            let body = &served[from..];
            match req.range_from() {
                Some(_) => head(
                    s,
                    "206 Partial Content",
                    Some(body.len()),
                    Some((from, served.len())),
                ),
                None => head(s, "200 OK", Some(body.len()), None),
            }
            if n == 1 {
                let _ = s.write_all(&body[..20_000]);
                let _ = s.flush();
                std::thread::sleep(Duration::from_secs(30));
            } else {
                let _ = s.write_all(body);
            }
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let h = hub(&url, 1.0);
    let t = Instant::now();
    let err = pull(&h, &store, "m.gguf").unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        matches!(err, Error::Interrupted { got: 20_000, .. }),
        "{err}"
    );
    let path = pull(&h, &store, "m.gguf").unwrap();
    assert_eq!(std::fs::read(path).unwrap(), bytes);
    assert!(log.lock().unwrap().len() >= 4);
}

/// No size in the listing and no Content-Length, and a body without end: the download stops
/// at the limit and its part file is removed.
#[test]
fn an_endless_body_without_a_listed_size_stops_at_the_limit() {
    let (url, _) = serve(
        listing("m.gguf", b"", false),
        Box::new(|_, s, _| {
            head(s, "200 OK", None, None);
            let chunk = vec![7u8; 64 << 10];
            while s.write_all(&chunk).is_ok() {}
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let h = hub(&url, 2.0).with_max_unlisted_bytes(1 << 20);
    let err = pull(&h, &store, "m.gguf").unwrap_err().to_string();
    assert!(
        err.contains("no size was listed") && err.contains("1048576"),
        "{err}"
    );
    let left: u64 = walk(dir.path())
        .iter()
        .map(|p| p.metadata().unwrap().len())
        .sum();
    assert_eq!(left, 0, "{:?}", walk(dir.path()));
    // An announced length over the limit is refused before the body.
    let (url, _) = serve(
        listing("m.gguf", b"", false),
        Box::new(|_, s, _| head(s, "200 OK", Some(5 << 20), None)),
    );
    let err = pull(
        &hub(&url, 2.0).with_max_unlisted_bytes(1 << 20),
        &store,
        "m.gguf",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("5242880"), "{err}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The listing's commit goes into every URL: anything but a 40-digit hex id is refused.
#[test]
fn a_listed_commit_that_is_not_a_commit_id_is_refused() {
    let bytes = content(10);
    let bad = listing("m.gguf", &bytes, true).replace(SHA, "../../../etc");
    let (url, log) = serve(
        bad,
        Box::new(|_, _, _| panic!("no file should be asked for")),
    );
    let dir = tempfile::tempdir().unwrap();
    let err = pull(&hub(&url, 2.0), &Store::new(dir.path()), "m.gguf")
        .unwrap_err()
        .to_string();
    assert!(err.contains("40-digit"), "{err}");
    assert_eq!(log.lock().unwrap().len(), 1);
}

/// A file name with URL syntax in it is fetched by its whole name.
#[test]
fn file_names_are_percent_encoded() {
    let name = "a#b?c d%.gguf";
    let bytes = content(3000);
    let served = bytes.clone();
    let (url, log) = serve(
        listing(name, &bytes, true),
        Box::new(move |req, s, _| {
            if req.path == format!("/test/m/resolve/{SHA}/a#b?c d%.gguf") {
                head(s, "200 OK", Some(served.len()), None);
                let _ = s.write_all(&served);
            } else {
                head(s, "404 Not Found", Some(0), None);
            }
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = pull(&hub(&url, 2.0), &Store::new(dir.path()), name).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), bytes);
    let log = log.lock().unwrap();
    assert!(log[1].ends_with("/a%23b%3Fc%20d%25.gguf"), "{log:?}");
}
