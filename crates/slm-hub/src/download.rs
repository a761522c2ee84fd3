//! One file: resume from `FILE.part`, verify, then rename into place.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha1::Digest;

use crate::{io_err, Checksum, Error, Hub, RemoteFile, Result};

/// What a pull reports while it works, for a progress bar.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A file starts (or resumes at `from` bytes).
    Start {
        file: String,
        total: Option<u64>,
        from: u64,
    },
    /// More bytes of the current file arrived.
    Advance(u64),
    /// The current file is verified and in place (`cached`: it already was).
    Done { file: String, cached: bool },
}

enum Hasher {
    Sha256(sha2::Sha256),
    GitSha1(sha1::Sha1),
    None,
}

impl Hasher {
    fn new(checksum: Option<&Checksum>, size: Option<u64>) -> Self {
        match (checksum, size) {
            (Some(Checksum::Sha256(_)), _) => Self::Sha256(sha2::Sha256::new()),
            (Some(Checksum::GitSha1(_)), Some(n)) => {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {n}\0").as_bytes());
                Self::GitSha1(h)
            }
            _ => Self::None,
        }
    }
    fn update(&mut self, b: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(b),
            Self::GitSha1(h) => h.update(b),
            Self::None => {}
        }
    }
    fn finish(self) -> Option<String> {
        match self {
            Self::Sha256(h) => Some(hex::encode(h.finalize())),
            Self::GitSha1(h) => Some(hex::encode(h.finalize())),
            Self::None => None,
        }
    }
}

fn hash_file(path: &Path, hasher: &mut Hasher, len: u64) -> Result<()> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = f.read(&mut buf[..want]).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

fn verify(file: &RemoteFile, hasher: Hasher) -> Result<()> {
    let (Some(expected), Some(actual)) = (&file.checksum, hasher.finish()) else {
        tracing::warn!("{}: the hub lists no checksum; not verified", file.name);
        return Ok(());
    };
    let (algo, want) = match expected {
        Checksum::Sha256(h) => ("sha256", h),
        Checksum::GitSha1(h) => ("git-sha1", h),
    };
    if *want != actual {
        return Err(Error::Checksum {
            file: file.name.clone(),
            algo,
            expected: want.clone(),
            actual,
        });
    }
    Ok(())
}

/// Downloads `url` to `dest` unless `dest` is already there with the right checksum.
pub(crate) fn fetch(
    hub: &Hub,
    url: &str,
    file: &RemoteFile,
    dest: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    if let Ok(meta) = std::fs::metadata(dest) {
        if file.size.is_none_or(|n| n == meta.len()) {
            let mut h = Hasher::new(file.checksum.as_ref(), Some(meta.len()));
            hash_file(dest, &mut h, meta.len())?;
            if verify(file, h).is_ok() {
                progress(Progress::Done {
                    file: file.name.clone(),
                    cached: true,
                });
                return Ok(());
            }
        }
        tracing::info!(
            "{}: stored copy differs from the hub; downloading again",
            dest.display()
        );
    }

    let part = dest.with_file_name(format!(
        "{}.part",
        dest.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("download")
    ));
    let mut from = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if file.size.is_some_and(|n| from > n) {
        from = 0;
    }
    let mut req = hub.get(url);
    if from > 0 {
        req = req.header("Range", format!("bytes={from}-"));
    }
    let resp = req.call().map_err(|e| Error::Http {
        url: url.into(),
        err: Box::new(e),
    })?;
    let status = resp.status().as_u16();
    let total = match status {
        200 => {
            from = 0;
            content_length(&resp).or(file.size)
        }
        206 => {
            let (start, total) = content_range(&resp).ok_or_else(|| Error::BadResponse {
                url: url.into(),
                msg: "206 without a valid Content-Range".into(),
            })?;
            if start != from {
                return Err(Error::BadResponse {
                    url: url.into(),
                    msg: format!("asked for bytes from {from}, got a range from {start}"),
                });
            }
            total.or(file.size)
        }
        // The part already holds every byte.
        416 if from > 0 && file.size == Some(from) => Some(from),
        _ => {
            return Err(Error::Status {
                url: url.into(),
                status,
                hint: crate::status_hint(status),
            })
        }
    };
    let limit = file.size.unwrap_or(hub.max_unlisted_bytes);
    if total.is_some_and(|t| t > limit) {
        return Err(Error::BadResponse {
            url: url.into(),
            msg: format!(
                "the server announces {} bytes, more than the {limit} a file may have here",
                total.unwrap_or(0)
            ),
        });
    }
    if let (Some(t), Some(n)) = (total, file.size) {
        if t != n {
            return Err(Error::BadResponse {
                url: url.into(),
                msg: format!("the server sends {t} bytes but the listing says {n}"),
            });
        }
    }
    progress(Progress::Start {
        file: file.name.clone(),
        total,
        from,
    });

    let mut hasher = Hasher::new(file.checksum.as_ref(), total);
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&part)
        .map_err(io_err(&part))?;
    if from > 0 {
        hash_file(&part, &mut hasher, from)?;
    }
    out.set_len(from).map_err(io_err(&part))?;
    out.seek(SeekFrom::Start(from)).map_err(io_err(&part))?;

    let mut got = from;
    if status != 416 {
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    out.sync_data().ok();
                    return Err(Error::Interrupted {
                        file: file.name.clone(),
                        got,
                        total: total.unwrap_or(0),
                        reason: if e.kind() == std::io::ErrorKind::TimedOut {
                            format!("no data for {} s", hub.idle_timeout.as_secs_f64())
                        } else {
                            e.to_string()
                        },
                    });
                }
            };
            // Unbuffered on purpose: what arrived is on disk for the next resume.
            out.write_all(&buf[..n]).map_err(io_err(&part))?;
            hasher.update(&buf[..n]);
            got += n as u64;
            // A body longer than announced, or without an announced length longer than any
            // file may be, is not the file.
            if got > total.unwrap_or(limit) {
                drop(out);
                let _ = std::fs::remove_file(&part);
                return Err(Error::BadResponse {
                    url: url.into(),
                    msg: match total {
                        Some(t) => format!("more than the announced {t} bytes"),
                        None => format!(
                            "no size was listed or announced and the body passed {limit} bytes \
                             (the hub's largest file); the partial download was removed"
                        ),
                    },
                });
            }
            progress(Progress::Advance(n as u64));
        }
    }
    out.sync_all().map_err(io_err(&part))?;
    drop(out);
    if let Some(t) = total {
        if got != t {
            return Err(Error::Interrupted {
                file: file.name.clone(),
                got,
                total: t,
                reason: "connection closed early".into(),
            });
        }
    }
    if let Err(e) = verify(file, hasher) {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, dest).map_err(io_err(dest))?;
    if let Some(dir) = dest.parent() {
        // Make the rename itself durable.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    progress(Progress::Done {
        file: file.name.clone(),
        cached: false,
    });
    Ok(())
}

fn header<'a>(resp: &'a ureq::http::Response<ureq::Body>, name: &str) -> Option<&'a str> {
    resp.headers().get(name)?.to_str().ok()
}

fn content_length(resp: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    header(resp, "content-length")?.trim().parse().ok()
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`).
fn content_range(resp: &ureq::http::Response<ureq::Body>) -> Option<(u64, Option<u64>)> {
    let v = header(resp, "content-range")?
        .trim()
        .strip_prefix("bytes ")?;
    let (range, total) = v.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()))
}
