//! Hundreds of malformed or hostile requests to `slm serve`: each gets an OpenAI-shaped error
//! with the status the official clients expect, and the server keeps serving a stream that
//! runs meanwhile and every request after.

mod common;

use common::Server;

const KEY: &str = "hostile-test-key";

fn model() -> String {
    slm_model::assets::require("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        .to_str()
        .unwrap()
        .to_string()
}

/// Bodies that are not a request: broken JSON, other JSON values, bytes.
fn broken_bodies() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        "",
        "{",
        "}",
        "[]",
        "null",
        "123",
        "\"text\"",
        "{\"messages\": }",
        "{\"messages\": [}",
        "{'messages': []}",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}}",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"\\ud800\"}], \"max_tokens\": 1e999}",
        "{\"max_tokens\": 5}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    v.push(vec![0xff, 0xfe, 0x00, 0x7b]);
    v.push(b"{\"messages\": \"\xff\xff\"}".to_vec());
    // Nesting deeper than the parser's recursion limit.
    v.push(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes());
    v.push(format!("{{\"messages\": {}{}}}", "[".repeat(500), "]".repeat(500)).into_bytes());
    let mut x = 99u64;
    for _ in 0..40 {
        let n = (x % 200) as usize;
        v.push(
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 56) as u8
                })
                .collect(),
        );
    }
    v
}

/// Well-formed JSON whose fields are wrong: each (field, value) replaces one field of a valid
/// chat request.
fn wrong_fields() -> Vec<(&'static str, &'static str)> {
    vec![
        ("messages", "5"),
        ("messages", "\"hello\""),
        ("messages", "[]"),
        ("messages", "[5]"),
        ("messages", "[{\"content\": \"no role\"}]"),
        ("messages", "[{\"role\": \"wizard\", \"content\": \"x\"}]"),
        ("messages", "[{\"role\": 7, \"content\": \"x\"}]"),
        ("messages", "[{\"role\": \"user\", \"content\": 7}]"),
        ("messages", "[{\"role\": \"user\", \"content\": [{\"type\": \"image_url\"}]}]"),
        ("messages", "[{\"role\": \"user\", \"content\": [{\"text\": \"no type\"}]}]"),
        ("temperature", "\"hot\""),
        ("temperature", "-1"),
        ("temperature", "1e39"),
        ("temperature", "[]"),
        ("top_p", "1.5"),
        ("top_p", "-0.1"),
        ("top_p", "{}"),
        ("top_k", "-1"),
        ("top_k", "1.5"),
        ("top_k", "99999999999"),
        ("min_p", "2"),
        ("repeat_penalty", "0"),
        ("repeat_penalty", "-1"),
        ("presence_penalty", "3"),
        ("frequency_penalty", "-2.5"),
        ("frequency_penalty", "\"x\""),
        ("max_tokens", "-1"),
        ("max_tokens", "0"),
        ("max_tokens", "\"10\""),
        ("max_tokens", "1.5"),
        ("max_tokens", "1000000000000"),
        ("max_tokens", "100000000000000000000000000"),
        ("max_completion_tokens", "-5"),
        ("stop", "5"),
        ("stop", "[1, 2]"),
        ("stop", "[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\",\"j\",\"k\",\"l\",\"m\",\"n\",\"o\",\"p\",\"q\"]"),
        ("seed", "\"x\""),
        ("seed", "1.5"),
        ("n", "2"),
        ("n", "0"),
        ("logprobs", "\"yes\""),
        ("logprobs", "3"),
        ("top_logprobs", "100"),
        ("top_logprobs", "-1"),
        ("stream", "\"yes\""),
        ("stream_options", "5"),
        ("response_format", "5"),
        ("response_format", "{\"type\": \"xml\"}"),
        ("response_format", "{\"type\": \"json_schema\"}"),
        ("response_format", "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": 5}}"),
        ("response_format", "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": {\"type\": \"bogus\"}}}"),
        ("response_format", "{\"type\": \"json_schema\", \"json_schema\": {\"schema\": {\"type\": \"object\", \"properties\": 3}}}"),
    ]
}

fn check_error(what: &str, status: u16, body: &str, allowed: &[u16]) {
    assert!(
        allowed.contains(&status),
        "{what}: status {status}, expected one of {allowed:?}; body {body}"
    );
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: the error body is not JSON ({e}): {body:?}"));
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(
        !msg.is_empty() && v["error"]["type"].is_string(),
        "{what}: not an OpenAI-shaped error: {body}"
    );
}

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn hostile_requests_get_openai_errors_and_the_server_keeps_serving() {
    let mut server = Server::start(&[
        &model(),
        "--api-key",
        KEY,
        "--ctx",
        "256",
        "--parallel",
        "2",
        "--queue",
        "2",
        "--max-body",
        "65536",
    ]);
    let auth = format!("Bearer {KEY}");
    let json_auth = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    // A stream that runs while the hostile requests arrive.
    let addr = server.base.clone();
    let background = {
        let server_base = addr.clone();
        std::thread::spawn(move || {
            let s = Server::attach(&server_base);
            s.request(
                "POST",
                "/v1/completions",
                &[("Authorization", &format!("Bearer {KEY}"))],
                br#"{"prompt": "The sea", "max_tokens": 120, "temperature": 0, "stream": true}"#,
            )
            .unwrap()
        })
    };

    let mut sent = 0;
    let chat = "/v1/chat/completions";
    for body in broken_bodies() {
        for path in [chat, "/v1/completions", "/v1/embeddings", "/tokenize"] {
            let (status, text) = server.request("POST", path, &json_auth, &body).unwrap();
            check_error(
                &format!("{path} {:?}", String::from_utf8_lossy(&body)),
                status,
                &text,
                &[400, 404],
            );
            sent += 1;
        }
    }
    for (field, value) in wrong_fields() {
        let mut req: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}"#,
        )
        .unwrap();
        req.remove(field);
        let mut body = serde_json::to_string(&req).unwrap();
        body.insert_str(1, &format!("\"{field}\": {value}, "));
        let (status, text) = server
            .request("POST", chat, &json_auth, body.as_bytes())
            .unwrap();
        check_error(&format!("{field} = {value}"), status, &text, &[400]);
        sent += 1;
    }
    // Keys: missing, wrong, another scheme, huge.
    let long = format!("Bearer {}", "k".repeat(8000));
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "Basic aG9zdGlsZS10ZXN0LWtleQ==")],
        vec![("Authorization", KEY)],
        vec![("Authorization", long.as_str())],
    ] {
        for (method, path) in [("GET", "/v1/models"), ("POST", chat), ("GET", "/metrics")] {
            let (status, text) = server
                .request(method, path, &headers, br#"{"messages": []}"#)
                .unwrap();
            check_error(
                &format!("{method} {path} with {headers:?}"),
                status,
                &text,
                &[401],
            );
            sent += 1;
        }
    }
    // Unknown model, prompt over the context, oversized body, unknown path, wrong method,
    // embeddings from a server without an embedding model.
    let cases: Vec<(&str, &str, String, u16)> = vec![
        (
            "POST",
            chat,
            r#"{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}"#.into(),
            404,
        ),
        (
            "POST",
            chat,
            format!(
                r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
                "whale ".repeat(400)
            ),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            format!(r#"{{"prompt": "{}"}}"#, "sea ".repeat(300)),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 256}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": [1, 2, 99999999]}"#.into(),
            400,
        ),
        (
            "POST",
            "/v1/completions",
            r#"{"prompt": ["a", "b"]}"#.into(),
            400,
        ),
        (
            "POST",
            chat,
            format!(
                r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
                "x".repeat(70_000)
            ),
            413,
        ),
        ("POST", "/v1/nothing", "{}".into(), 404),
        ("GET", chat, String::new(), 405),
        (
            "POST",
            "/v1/embeddings",
            r#"{"input": "hello"}"#.into(),
            404,
        ),
        (
            "POST",
            "/detokenize",
            r#"{"tokens": [4294967295]}"#.into(),
            400,
        ),
        ("POST", "/tokenize", r#"{"content": 5}"#.into(), 400),
    ];
    for (method, path, body, want) in &cases {
        let (status, text) = server
            .request(method, path, &json_auth, body.as_bytes())
            .unwrap();
        check_error(
            &format!("{method} {path} {:.80}", body),
            status,
            &text,
            &[*want],
        );
        sent += 1;
    }
    // A body shorter than its Content-Length, the connection closed half-way.
    for _ in 0..5 {
        let head = format!(
            "POST {chat} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 500\r\n\r\n{{\"messages\""
        );
        let _ = server.raw_then_close(head.as_bytes());
        sent += 1;
    }
    assert!(sent >= 300, "{sent} hostile requests");

    // More requests than the batch and the queue hold: the extra ones get 429.
    let busy: Vec<_> = (0..8)
        .map(|_| {
            let base = addr.clone();
            std::thread::spawn(move || {
                Server::attach(&base)
                    .request(
                        "POST",
                        "/v1/completions",
                        &[("Authorization", &format!("Bearer {KEY}"))],
                        br#"{"prompt": "Once upon a time", "max_tokens": 60}"#,
                    )
                    .unwrap()
            })
        })
        .collect();
    let statuses: Vec<u16> = busy.into_iter().map(|t| t.join().unwrap().0).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| [200, 429].contains(s)),
        "{statuses:?}"
    );

    let (status, stream) = background.join().unwrap();
    assert_eq!(status, 200);
    let events: Vec<&str> = stream.lines().filter(|l| l.starts_with("data: ")).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{stream}");
    assert!(events.len() > 100, "{} events", events.len());
    let (status, text) = server
        .request(
            "POST",
            chat,
            &json_auth,
            br#"{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}"#,
        )
        .unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(server.alive());
}

/// A preflight (OPTIONS) from `origin` and the head of the answer.
fn preflight(server: &Server, origin: &str) -> String {
    let req = format!(
        "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nOrigin: {origin}\r\n\
         Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization\r\n\r\n"
    );
    server.raw_with_head(req.as_bytes()).unwrap().1
}

#[test]
#[cfg_attr(not(smollm2_q4_1), ignore = "needs ../shared/fetch-assets.sh models")]
fn cross_origin_use_is_off_unless_asked_and_a_public_host_without_a_key_warns() {
    let m = model();
    let closed = Server::start(&[&m]);
    assert!(
        !preflight(&closed, "http://app.test").contains("access-control-allow-origin"),
        "CORS answered without --cors"
    );
    drop(closed);
    let open = Server::start(&[&m, "--cors", "http://app.test"]);
    let head = preflight(&open, "http://app.test");
    assert!(
        head.contains("access-control-allow-origin: http://app.test"),
        "{head}"
    );
    // Another site is not allowed: the one allowed origin is named, never it or "*" (the
    // browser refuses a page whose origin is not the one named).
    let other = preflight(&open, "http://evil.test");
    assert!(
        !other.contains("access-control-allow-origin: http://evil.test")
            && !other.contains("access-control-allow-origin: *"),
        "{other}"
    );
    drop(open);

    // Another host without a key: a loud warning before it listens.
    use std::io::BufRead;
    let mut child = common::slm()
        .args(["serve", &m, "--host", "0.0.0.0", "--port", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut before = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("listening on") {
            break;
        }
        before.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    let warned = before.join("\n");
    assert!(
        warned.contains("WARNING") && warned.contains("--api-key"),
        "{warned}"
    );
}

#[test]
fn serve_refuses_missing_models_and_empty_keys_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let e = common::fails(common::slm().args(["serve", "/no/such/model.gguf"]));
    assert!(
        e.contains("/no/such/model.gguf: no such file or folder"),
        "{e}"
    );
    let empty = dir.path().join("key");
    std::fs::write(&empty, "\n").unwrap();
    let e = common::fails(
        common::slm()
            .args(["serve", "/no/such/model.gguf", "--api-key-file"])
            .arg(&empty),
    );
    assert!(e.contains("the API key is empty"), "{e}");
    let e = common::fails(common::slm().args(["serve", "m.gguf", "--parallel", "0"]));
    assert!(e.contains("--parallel is 0"), "{e}");
}
