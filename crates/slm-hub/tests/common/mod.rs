//! What the hub tests' local servers share: reading one HTTP request.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpStream;

/// A request as the test servers see it.
pub struct Request {
    /// The path as sent (percent-encoded, with any query).
    pub raw_path: String,
    /// The path percent-decoded, without the query.
    pub path: String,
    /// The Range header's value.
    pub range: Option<String>,
}

impl Request {
    /// N of a `bytes=N-` range.
    pub fn range_from(&self) -> Option<usize> {
        self.range
            .as_deref()?
            .strip_prefix("bytes=")?
            .strip_suffix('-')?
            .parse()
            .ok()
    }
}

fn decode(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match (b[i], p.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16))) {
            (b'%', Some(Ok(v))) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn read_request(s: &TcpStream) -> Request {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let raw_path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    Request {
        path: decode(raw_path.split('?').next().unwrap_or("")),
        raw_path,
        range,
    }
}
