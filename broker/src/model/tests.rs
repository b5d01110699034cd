//! The proxy end to end over a socket pair (the guest's side played here)
//! and a fake upstream on a loopback port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use airlock_protocol::{read_frame, write_frame, Message};
use serde_json::Value;

use super::config::{Key, Secret, Settings, Upstream};
use super::policy::Policy;
use super::proxy::Proxy;
use crate::audit::log::{Memory, TEST_LIMITS};
use crate::audit::AuditLog;

const REAL_KEY: &str = "sk-real-host-key-0123456789";

/// What the fake upstream got.
#[derive(Debug)]
struct Got {
    head: String,
    body: Vec<u8>,
}

/// Reads a request's head and its `content-length` body.
fn read_got<R: BufRead>(mut r: R) -> Got {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    let _ = r.read_exact(&mut body);
    Got { head, body }
}

/// A fake upstream: serves one connection at a time; for each, sends what
/// `pieces` holds, waiting on `gate` (if any) after the second (the head
/// and the first body chunk).
fn upstream(
    pieces: Vec<Vec<u8>>,
    gate: Option<mpsc::Receiver<()>>,
) -> (String, mpsc::Receiver<Got>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let got = read_got(BufReader::new(stream.try_clone().expect("clone")));
            let _ = tx.send(got);
            for (i, piece) in pieces.iter().enumerate() {
                let _ = stream.write_all(piece);
                let _ = stream.flush();
                // After the response head and the first chunk.
                if i == 1 {
                    if let Some(g) = &gate {
                        let _ = g.recv_timeout(Duration::from_secs(20));
                    }
                }
            }
        }
    });
    (format!("http://{addr}"), rx)
}

fn chunked(parts: &[&str]) -> Vec<Vec<u8>> {
    let mut out = vec![b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nset-cookie: a=b\r\nrequest-id: req_1\r\n\r\n".to_vec()];
    for p in parts {
        out.push(format!("{:x}\r\n{p}\r\n", p.len()).into_bytes());
    }
    out.push(b"0\r\n\r\n".to_vec());
    out
}

fn json_reply(status: u16, body: &str) -> Vec<Vec<u8>> {
    vec![format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()]
}

fn settings(url: Option<&str>, policy: Policy) -> Settings {
    let key = Key {
        secret: Secret::for_tests(REAL_KEY),
        source: "test".into(),
    };
    Settings {
        anthropic_upstream: url.map(|u| Upstream::parse(u).expect("url")),
        openai_upstream: url.map(|u| Upstream::parse(u).expect("url")),
        anthropic_key: Some(key.clone()),
        openai_key: Some(key),
        ca: None,
        policy,
        anthropic_auth: super::config::AnthropicAuth::ApiKey,
        openai_headers: Vec::new(),
    }
}

struct Harness {
    proxy: std::sync::Arc<Proxy>,
    audit: Memory,
}

impl Harness {
    fn new(settings: Settings) -> Harness {
        let (log, audit) = AuditLog::memory(TEST_LIMITS, None);
        Harness {
            proxy: std::sync::Arc::new(Proxy::new(settings, log)),
            audit,
        }
    }

    /// A guest connection served by the proxy in a thread.
    fn connect(&self) -> (UnixStream, thread::JoinHandle<()>) {
        let (guest, host) = UnixStream::pair().expect("pair");
        let proxy = std::sync::Arc::clone(&self.proxy);
        let t = thread::spawn(move || {
            proxy.serve(&host);
            let _ = host.shutdown(std::net::Shutdown::Both);
        });
        guest
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        (guest, t)
    }

    /// Sends one request and reads the whole answer.
    fn call(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let (mut guest, t) = self.connect();
        send_request(&mut guest, method, target, headers, body);
        let answer = read_answer(&mut guest);
        t.join().expect("proxy thread");
        answer
    }

    fn records(&self, kind: &str) -> Vec<Value> {
        self.audit
            .bytes()
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice::<Value>(l).expect("record"))
            .filter(|r| r["kind"] == kind)
            .map(|r| r["fields"].clone())
            .collect()
    }
}

fn send_request(
    guest: &mut UnixStream,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let headers = headers
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    write_frame(
        &mut *guest,
        &Message::HttpRequest {
            method: method.into(),
            target: target.into(),
            headers,
        },
    )
    .expect("head");
    for chunk in body.chunks(64 * 1024) {
        write_frame(&mut *guest, &Message::HttpBody(chunk.to_vec())).expect("body");
    }
    write_frame(&mut *guest, &Message::HttpEnd).expect("end");
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    chunks: Vec<Vec<u8>>,
    ended: bool,
}

impl Answer {
    fn body(&self) -> Vec<u8> {
        self.chunks.concat()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body()).expect("json body")
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn read_head(guest: &mut UnixStream) -> (u16, Vec<(String, String)>) {
    match read_frame(&mut *guest).expect("response head") {
        Message::HttpResponse { status, headers } => (status, headers),
        other => panic!("not a response head: {other:?}"),
    }
}

fn read_answer(guest: &mut UnixStream) -> Answer {
    let (status, headers) = read_head(guest);
    let mut chunks = Vec::new();
    let mut ended = false;
    loop {
        match read_frame(&mut *guest) {
            Ok(Message::HttpBody(d)) => chunks.push(d),
            Ok(Message::HttpEnd) => {
                ended = true;
                break;
            }
            _ => break,
        }
    }
    Answer {
        status,
        headers,
        chunks,
        ended,
    }
}

const SSE_1: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":11,\"output_tokens\":1}}}\n\n";
const SSE_2: &str = "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":6}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

#[test]
fn forwards_with_the_real_key_and_streams_incrementally() {
    let (gate_tx, gate) = mpsc::channel();
    let (url, got) = upstream(chunked(&[SSE_1, SSE_2]), Some(gate));
    let h = Harness::new(settings(Some(&url), Policy::default()));
    let (mut guest, t) = h.connect();
    let body = br#"{"model":"claude-x","stream":true,"messages":[]}"#;
    send_request(
        &mut guest,
        "POST",
        "/v1/messages",
        &[
            ("x-api-key", "placeholder-from-guest"),
            ("Authorization", "Bearer guest-token"),
            ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json"),
            ("Cookie", "c=1"),
        ],
        body,
    );
    let (status, headers) = read_head(&mut guest);
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(n, v)| n == "request-id" && v == "req_1"));
    assert!(!headers
        .iter()
        .any(|(n, _)| n == "set-cookie" || n == "transfer-encoding"));
    // The first event arrives while the upstream still holds back the rest.
    let Message::HttpBody(first) = read_frame(&mut guest).expect("first chunk") else {
        panic!("not a body chunk")
    };
    assert_eq!(first, SSE_1.as_bytes());
    gate_tx.send(()).expect("release");
    let rest = read_answer_rest(&mut guest);
    assert_eq!(rest, SSE_2.as_bytes());
    t.join().expect("proxy");

    let got = got
        .recv_timeout(Duration::from_secs(5))
        .expect("upstream got it");
    let head = got.head.to_ascii_lowercase();
    assert!(head.starts_with("post /v1/messages http/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("x-api-key: {}\r\n", REAL_KEY.to_ascii_lowercase())),
        "{head}"
    );
    assert_eq!(head.matches("x-api-key").count(), 1, "{head}");
    assert!(
        !head.contains("placeholder") && !head.contains("guest-token") && !head.contains("cookie"),
        "{head}"
    );
    assert!(!head.contains("authorization"), "{head}");
    assert!(head.contains("anthropic-version: 2023-06-01\r\n"));
    assert!(
        head.contains(&format!("host: {}\r\n", url.trim_start_matches("http://"))),
        "{head}"
    );
    assert_eq!(got.body, body);

    let calls = h.records(super::kind::CALL);
    assert_eq!(calls.len(), 1);
    let c = &calls[0];
    assert_eq!(c["status"], 200);
    assert_eq!(c["model"], "claude-x");
    assert_eq!(
        (c["input_tokens"].as_u64(), c["output_tokens"].as_u64()),
        (Some(11), Some(6))
    );
    assert_eq!(c["complete"], true);
    assert_eq!(
        c["request_sha256"],
        crate::audit::record::hex(&<sha2::Sha256 as sha2::Digest>::digest(body))
    );
    assert_eq!(c["response_bytes"], SSE_1.len() + SSE_2.len());
    let dropped: Vec<&str> = c["dropped_headers"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(dropped, ["x-api-key", "authorization", "cookie"]);
    assert!(!String::from_utf8_lossy(&h.audit.bytes()).contains(REAL_KEY));
}

fn read_answer_rest(guest: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        match read_frame(&mut *guest).expect("frame") {
            Message::HttpBody(d) => out.extend_from_slice(&d),
            Message::HttpEnd => return out,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// An OpenAI stream goes upstream byte for byte as the client sent it
/// (no `stream_options` added) and comes back byte for byte (no extra
/// usage chunk with `choices: []`); with the usage the client asked for,
/// it is counted; without, under a token budget, the call is charged its
/// reservation.
#[test]
fn openai_gets_a_bearer_key_and_the_stream_is_untouched() {
    let plain =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
    let (url, got) = upstream(chunked(&[plain]), None);
    let h = Harness::new(settings(Some(&url), Policy::default()));
    let body = br#"{"model":"gpt-x","stream":true,"messages":[{"role":"user","content":"x"}]}"#;
    let a = h.call(
        "POST",
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-placeholder")],
        body,
    );
    assert_eq!((a.status, a.ended), (200, true));
    assert_eq!(
        a.body(),
        plain.as_bytes(),
        "the client saw a changed stream"
    );
    let got = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
    assert!(
        got.head
            .contains(&format!("authorization: Bearer {REAL_KEY}\r\n")),
        "{}",
        got.head
    );
    assert!(!got.head.contains("sk-placeholder"));
    assert_eq!(got.body, body, "the request was changed");
    let c = &h.records(super::kind::CALL)[0];
    assert!(c.get("include_usage_added").is_none(), "{c}");
    assert!(c["forwarded_sha256"].is_null(), "{c}");
    assert!(c["output_tokens"].is_null(), "{c}");

    // Asked for by the client: counted.
    let with_usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\ndata: [DONE]\n\n";
    let (url, got) = upstream(chunked(&[with_usage]), None);
    let h = Harness::new(settings(Some(&url), Policy::default()));
    let body = br#"{"model":"gpt-x","stream":true,"stream_options":{"include_usage":true}}"#;
    let a = h.call("POST", "/v1/chat/completions", &[], body);
    assert_eq!(a.body(), with_usage.as_bytes());
    assert_eq!(
        got.recv_timeout(Duration::from_secs(5)).expect("up").body,
        body
    );
    let c = &h.records(super::kind::CALL)[0];
    assert_eq!(
        (c["input_tokens"].as_u64(), c["output_tokens"].as_u64()),
        (Some(3), Some(4))
    );

    // Under a token budget, only the documented cap lowering changes the
    // body; no usage comes back, so the reservation is charged.
    let (url, got) = upstream(chunked(&[plain]), None);
    let policy = Policy {
        max_tokens_per_run: Some(100),
        ..Policy::default()
    };
    let h = Harness::new(settings(Some(&url), policy));
    let body = br#"{"model":"gpt-x","stream":true,"max_completion_tokens":500}"#;
    let a = h.call("POST", "/v1/chat/completions", &[], body);
    assert_eq!(a.body(), plain.as_bytes());
    let sent = got.recv_timeout(Duration::from_secs(5)).expect("up").body;
    assert_eq!(
        String::from_utf8_lossy(&sent),
        r#"{"model":"gpt-x","stream":true,"max_completion_tokens":100}"#,
        "byte for byte but the cap"
    );
    let c = &h.records(super::kind::CALL)[0];
    assert_eq!(c["charged"]["output"], 100, "{c}");
}

#[test]
fn refusals_are_api_shaped_and_audited() {
    let (url, got) = upstream(json_reply(200, "{}"), None);
    let policy = Policy {
        allowed_models: Some(vec!["ok-model".into()]),
        max_request_bytes: 100,
        ..Policy::default()
    };
    let h = Harness::new(settings(Some(&url), policy));
    let anthropic = [("anthropic-version", "2023-06-01")];
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        &'a [u8],
        u16,
        &'a str,
    );
    let cases: &[Case] = &[
        (
            "POST",
            "/v1/complete",
            &anthropic,
            b"{}",
            404,
            "path_not_allowed",
        ),
        (
            "POST",
            "/v1/files",
            &anthropic,
            b"{}",
            403,
            "outside_the_run",
        ),
        (
            "POST",
            "/v1/messages?debug=1",
            &anthropic,
            br#"{"model":"ok-model"}"#,
            400,
            "query_not_allowed",
        ),
        (
            "GET",
            "/v1/messages",
            &anthropic,
            b"",
            405,
            "method_not_allowed",
        ),
        (
            "POST",
            "/v1/messages",
            &[("host", "api.evil.example")],
            br#"{"model":"ok-model"}"#,
            403,
            "other_host",
        ),
        (
            "POST",
            "/v1/messages",
            &[],
            &[b'x'; 101],
            413,
            "body_too_large",
        ),
        ("POST", "/v1/messages", &[], b"not json", 400, "bad_body"),
        (
            "POST",
            "/v1/chat/completions",
            &[],
            br#"{"model":"other"}"#,
            403,
            "model_not_allowed",
        ),
    ];
    for (method, target, headers, body, status, reason) in cases {
        let a = h.call(method, target, headers, body);
        assert_eq!(a.status, *status, "{method} {target}");
        assert!(a.ended);
        assert_eq!(a.header("x-airlock-denied"), Some(*reason));
        assert_eq!(a.header("x-should-retry"), Some("false"), "{target}");
        let v = a.json();
        if *target == "/v1/chat/completions" {
            assert_eq!(v["error"]["code"], *reason, "{v}");
        } else {
            assert_eq!(v["type"], "error", "{v}");
            assert!(v["error"]["message"].is_string());
        }
    }
    let denied = h.records(super::kind::DENIED);
    let reasons: Vec<&str> = denied.iter().filter_map(|d| d["reason"].as_str()).collect();
    assert_eq!(reasons, cases.iter().map(|c| c.5).collect::<Vec<_>>());
    // Each reason told once on stderr; the same refusal again is not.
    assert_eq!(h.proxy.told(), reasons);
    let a = h.call("POST", "/v1/complete", &anthropic, b"{}");
    assert_eq!(a.status, 404);
    assert_eq!(h.proxy.told(), reasons);
    assert!(
        got.try_recv().is_err(),
        "a refused call reached the upstream"
    );
}

#[test]
fn the_request_budget_holds_under_a_flood() {
    let policy = Policy {
        max_requests: 2,
        ..Policy::default()
    };
    let (url, got) = upstream_n(2, r#"{"usage":{"input_tokens":1,"output_tokens":1}}"#);
    let h = Harness::new(settings(Some(&url), policy));
    let statuses: Vec<u16> = (0..12)
        .map(|_| {
            h.call("POST", "/v1/messages", &[], br#"{"model":"m"}"#)
                .status
        })
        .collect();
    assert_eq!(&statuses[..2], [200, 200]);
    assert!(statuses[2..].iter().all(|s| *s == 429), "{statuses:?}");
    assert_eq!(got.iter().take(2).count(), 2);
    assert_eq!(h.records(super::kind::DENIED).len(), 10);
    assert_eq!(
        crate::audit::records::fields(&h.proxy.summary())["requests_admitted"],
        2
    );
}

/// A fake upstream that answers `n` connections with the same JSON.
fn upstream_n(n: usize, body: &'static str) -> (String, mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming().take(n) {
            let Ok(mut stream) = stream else { return };
            let mut buf = vec![0u8; 65536];
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(&json_reply(200, body).concat());
            let _ = tx.send(());
        }
    });
    (format!("http://{addr}"), rx)
}

#[test]
fn token_budget_counts_the_usage() {
    let policy = Policy {
        max_tokens_per_run: Some(10),
        ..Policy::default()
    };
    let (url, _got) = upstream_n(1, r#"{"usage":{"input_tokens":8,"output_tokens":4}}"#);
    let h = Harness::new(settings(Some(&url), policy));
    assert_eq!(
        h.call("POST", "/v1/messages", &[], br#"{"model":"m"}"#)
            .status,
        200
    );
    let a = h.call("POST", "/v1/messages", &[], br#"{"model":"m"}"#);
    assert_eq!(a.status, 429);
    assert_eq!(a.json()["error"]["type"], "rate_limit_error");
}

/// Under a token budget no call asks the upstream for more output than the
/// run has left; the audit record says what the agent asked and what went.
#[test]
fn output_is_capped_at_the_tokens_left() {
    let policy = Policy {
        max_tokens_per_run: Some(100),
        ..Policy::default()
    };
    let usage = r#"{"usage":{"input_tokens":30,"output_tokens":10}}"#;
    let (url, got) = upstream(json_reply(200, usage), None);
    let h = Harness::new(settings(Some(&url), policy));
    let sent = |body: &[u8], target: &str| {
        assert_eq!(h.call("POST", target, &[], body).status, 200);
        let got = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
        serde_json::from_slice::<Value>(&got.body).expect("json")
    };
    // Anthropic: 4096 asked, the whole budget left.
    let first = sent(
        br#"{"model":"m","max_tokens":4096,"messages":[]}"#,
        "/v1/messages",
    );
    assert_eq!(first["max_tokens"], 100);
    assert_eq!(
        first["messages"],
        serde_json::json!([]),
        "the rest unchanged"
    );
    // 40 used: a small ask goes through as it is, byte for byte.
    let body = br#"{"model":"m","max_tokens":16}"#;
    assert_eq!(sent(body, "/v1/messages")["max_tokens"], 16);
    // 80 used: OpenAI without a cap gets one; the older field is honoured.
    let openai = sent(br#"{"model":"m","messages":[]}"#, "/v1/chat/completions");
    assert_eq!(openai["max_completion_tokens"], 20);
    assert!(openai.get("max_tokens").is_none());
    let calls = h.records(super::kind::CALL);
    let capped: Vec<&Value> = calls.iter().map(|c| &c["max_tokens_capped"]).collect();
    assert_eq!(
        capped[0],
        &serde_json::json!({"field": "max_tokens", "asked": 4096, "sent": 100})
    );
    assert!(capped[1].is_null(), "{calls:?}");
    assert_eq!(calls[1]["forwarded_sha256"], Value::Null, "sent unchanged");
    assert_eq!(
        capped[2],
        &serde_json::json!({"field": "max_completion_tokens", "asked": null, "sent": 20})
    );
    assert!(calls[0]["forwarded_sha256"].is_string());
    assert_ne!(calls[0]["forwarded_sha256"], calls[0]["request_sha256"]);
}

#[test]
fn the_older_openai_field_is_capped_when_it_is_the_one_given() {
    let policy = Policy {
        max_tokens_per_run: Some(50),
        ..Policy::default()
    };
    let (url, got) = upstream(json_reply(200, "{}"), None);
    let h = Harness::new(settings(Some(&url), policy));
    let a = h.call(
        "POST",
        "/v1/chat/completions",
        &[],
        br#"{"model":"m","max_tokens":999}"#,
    );
    assert_eq!(a.status, 200);
    let got = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
    let sent: Value = serde_json::from_slice(&got.body).expect("json");
    assert_eq!(sent["max_tokens"], 50);
    assert!(sent.get("max_completion_tokens").is_none());
}

#[test]
fn no_upstream_means_403_and_unreachable_means_502() {
    let h = Harness::new(Settings::default());
    let a = h.call("POST", "/v1/messages", &[], br#"{"model":"m"}"#);
    assert_eq!(a.status, 403);
    assert_eq!(a.json()["error"]["type"], "permission_error");
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("--model-upstream"));

    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let h = Harness::new(settings(
        Some(&format!("http://127.0.0.1:{port}")),
        Policy::default(),
    ));
    let a = h.call("POST", "/v1/chat/completions", &[], br#"{"model":"m"}"#);
    assert_eq!(a.status, 502);
    assert_eq!(a.json()["error"]["code"], "upstream_unreachable");
    let c = &h.records(super::kind::CALL)[0];
    assert_eq!(c["status"], 502);
    assert!(c["error"].is_string());
}

#[test]
fn garbage_on_the_port_is_audited_and_harmless() {
    let h = Harness::new(Settings::default());
    for garbage in [&b"\xff\xff\xff\xff"[..], b"\x05\x00\x00\x00\x03hello", b""] {
        let (mut guest, t) = h.connect();
        let _ = guest.write_all(garbage);
        let _ = guest.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = guest.read_to_end(&mut rest);
        assert!(rest.is_empty(), "answered garbage");
        t.join().expect("no panic");
    }
    // A body frame before the head, and a second head.
    let (mut guest, t) = h.connect();
    write_frame(&mut guest, &Message::HttpEnd).expect("write");
    t.join().expect("no panic");
    assert_eq!(h.records(super::kind::PROTOCOL_ERROR).len(), 4);
}

#[test]
fn the_port_serves_many_connections_at_once_and_sums_up_at_the_end() {
    let dir = crate::paths::TestDir::new("model-port");
    let uds = dir.path().join("vsock");
    let (log, audit) = AuditLog::memory(TEST_LIMITS, None);
    let (port, model) = super::port(&Settings::default(), &uds, &log).expect("listen");
    let server = crate::door::ports::PortServer::start(vec![port], &log).expect("serve");
    let path = crate::engine::port_path(&uds, airlock_protocol::MODEL_PORT);
    // More than MAX_CONCURRENT connections, all open at once, each answered.
    let mut guests: Vec<UnixStream> = (0..super::MAX_CONCURRENT + 8)
        .map(|_| UnixStream::connect(&path).expect("connect"))
        .collect();
    for g in &mut guests {
        g.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        send_request(g, "POST", "/v1/messages", &[], br#"{"model":"m"}"#);
    }
    for g in &mut guests {
        let a = read_answer(g);
        assert_eq!((a.status, a.ended), (403, true));
    }
    drop(server);
    drop(model);
    let h = Harness {
        proxy: std::sync::Arc::new(Proxy::new(Settings::default(), log)),
        audit,
    };
    let summary = h.records(super::kind::SUMMARY);
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0]["denied"], super::MAX_CONCURRENT + 8);
    assert_eq!(summary[0]["unfinished_at_end"], 0);
    assert_eq!(
        h.records(super::kind::DENIED).len(),
        super::MAX_CONCURRENT + 8
    );
    // The socket is gone.
    assert!(UnixStream::connect(&path).is_err());
}

#[test]
fn https_goes_through_rustls() {
    // A plain-TCP server where TLS is expected: the handshake fails, the
    // agent gets a 502 naming it, nothing panics (the TLS stack is wired).
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            let Ok(mut s) = stream else { return };
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let h = Harness::new(settings(
        Some(&format!("https://{addr}")),
        Policy::default(),
    ));
    let a = h.call("POST", "/v1/messages", &[], br#"{"model":"m"}"#);
    assert_eq!(a.status, 502);
    let c = &h.records(super::kind::CALL)[0];
    let error = c["error"].as_str().unwrap_or_default().to_ascii_lowercase();
    assert!(
        error.contains("tls")
            || error.contains("record")
            || error.contains("handshake")
            || error.contains("corrupt"),
        "{error}"
    );
}

/// A CA (PEM) and a server certificate it signed for `names`, with its key.
pub(super) struct Pki {
    pub(super) ca: String,
    cert: String,
    key: String,
}

pub(super) fn pki(ca_name: &str, names: &[&str]) -> Pki {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .expect("params")
        .signed_by(&key, &ca)
        .expect("sign");
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// What the TLS upstream saw of one connection: the request, or why the
/// handshake failed.
type Seen = Result<Got, String>;

/// A fake HTTPS upstream (rustls) serving `pki`'s certificate: answers
/// each connection with `pieces`.
fn tls_upstream(pki: &Pki, pieces: Vec<Vec<u8>>) -> (u16, mpsc::Receiver<Seen>) {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(pki.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pki.key.as_bytes()).expect("key");
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { return };
            let _ = sock.set_read_timeout(Some(Duration::from_secs(20)));
            let mut conn =
                rustls::ServerConnection::new(std::sync::Arc::clone(&config)).expect("conn");
            let mut failed = None;
            while conn.is_handshaking() {
                if let Err(e) = conn.complete_io(&mut sock) {
                    failed = Some(e.to_string());
                    break;
                }
            }
            if let Some(e) = failed {
                let _ = tx.send(Err(e));
                continue;
            }
            let mut tls = rustls::StreamOwned::new(conn, sock);
            let _ = tx.send(Ok(read_got(BufReader::new(&mut tls))));
            for piece in &pieces {
                let _ = tls.write_all(piece);
                let _ = tls.flush();
            }
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    (port, rx)
}

/// `settings` for `url`, trusting the CA in `ca_pem` (written to `dir`).
fn settings_with_ca(url: &str, ca_pem: &str, dir: &crate::paths::TestDir) -> Settings {
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, ca_pem).expect("write ca");
    Settings {
        ca: Some(super::config::CaFile::load(&path).expect("load ca")),
        ..settings(Some(url), Policy::default())
    }
}

const STREAM_BODY: &[u8] = br#"{"model":"claude-x","stream":true,"messages":[]}"#;

#[test]
fn https_with_model_ca_goes_end_to_end_with_the_real_key() {
    let dir = crate::paths::TestDir::new("model-ca-ok");
    let pki = pki("Airlock Test CA", &["127.0.0.1", "localhost"]);
    let (port, seen) = tls_upstream(&pki, chunked(&[SSE_1, SSE_2]));
    // By IP address and by name: the certificate holds both.
    for host in ["127.0.0.1", "localhost"] {
        let h = Harness::new(settings_with_ca(
            &format!("https://{host}:{port}"),
            &pki.ca,
            &dir,
        ));
        let a = h.call(
            "POST",
            "/v1/messages",
            &[("x-api-key", "placeholder-from-guest")],
            STREAM_BODY,
        );
        assert_eq!((a.status, a.ended), (200, true), "{host}: {a:?}");
        assert_eq!(a.body(), format!("{SSE_1}{SSE_2}").as_bytes());
        let got = seen
            .recv_timeout(Duration::from_secs(10))
            .expect("the upstream saw a connection")
            .expect("the handshake succeeded");
        let head = got.head.to_ascii_lowercase();
        assert!(
            head.contains(&format!("x-api-key: {}\r\n", REAL_KEY.to_ascii_lowercase())),
            "{head}"
        );
        assert!(!head.contains("placeholder"), "{head}");
        assert_eq!(got.body, STREAM_BODY);
        let c = &h.records(super::kind::CALL)[0];
        assert_eq!(c["status"], 200);
        assert_eq!(c["complete"], true);
        assert!(c["error"].is_null(), "{c}");
        assert_eq!(
            (c["input_tokens"].as_u64(), c["output_tokens"].as_u64()),
            (Some(11), Some(6))
        );
    }
}

/// Calls `url` through a proxy with `settings`; the call must fail at the
/// TLS handshake: the agent gets an API-shaped 502 naming it, the call is
/// audited with the error, the upstream saw no request. Returns the error.
fn refused_at_handshake(settings: Settings, seen: &mpsc::Receiver<Seen>) -> String {
    let h = Harness::new(settings);
    let a = h.call("POST", "/v1/messages", &[], STREAM_BODY);
    assert_eq!((a.status, a.ended), (502, true), "{a:?}");
    let v = a.json();
    assert_eq!(v["type"], "error", "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("TLS") && message.contains("certificate"),
        "{message}"
    );
    let c = &h.records(super::kind::CALL)[0];
    assert_eq!(c["status"], 502);
    assert_eq!(c["complete"], true);
    assert!(c["upstream_head_ms"].is_null());
    let error = c["error"].as_str().expect("an error").to_owned();
    match seen.recv_timeout(Duration::from_secs(10)) {
        Ok(Err(_)) => {}
        other => panic!("the upstream should have seen a failed handshake: {other:?}"),
    }
    assert!(!String::from_utf8_lossy(&h.audit.bytes()).contains(REAL_KEY));
    error
}

#[test]
fn https_without_the_ca_is_refused_as_untrusted() {
    let test_ca = pki("Airlock Test CA", &["127.0.0.1"]);
    let (port, seen) = tls_upstream(&test_ca, chunked(&[SSE_1]));
    let url = format!("https://127.0.0.1:{port}");
    // The built-in roots alone do not know the test CA.
    let error = refused_at_handshake(settings(Some(&url), Policy::default()), &seen);
    assert!(error.contains("UnknownIssuer"), "{error}");
    // Nor does another CA.
    let dir = crate::paths::TestDir::new("model-ca-other");
    let other = pki("Another CA", &["127.0.0.1"]);
    let error = refused_at_handshake(settings_with_ca(&url, &other.ca, &dir), &seen);
    assert!(error.contains("UnknownIssuer"), "{error}");
}

#[test]
fn https_with_the_ca_but_another_name_is_refused() {
    let dir = crate::paths::TestDir::new("model-ca-name");
    let pki = pki("Airlock Test CA", &["gateway.internal.example"]);
    let (port, seen) = tls_upstream(&pki, chunked(&[SSE_1]));
    let error = refused_at_handshake(
        settings_with_ca(&format!("https://127.0.0.1:{port}"), &pki.ca, &dir),
        &seen,
    );
    assert!(error.contains("not valid for name"), "{error}");
}

/// A fake upstream serving each connection in a thread of its own: it
/// passes on what it got at once, then holds its answer (`reply` of the
/// request) until `release` is set.
fn held_upstream(
    reply: fn(&Got) -> String,
) -> (
    String,
    mpsc::Receiver<Got>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    let release = std::sync::Arc::new(AtomicBool::new(false));
    let held = std::sync::Arc::clone(&release);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let (tx, held) = (tx.clone(), std::sync::Arc::clone(&held));
            thread::spawn(move || {
                let got = read_got(BufReader::new(stream.try_clone().expect("clone")));
                let body = reply(&got);
                let _ = tx.send(got);
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while !held.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(5));
                }
                let _ = stream.write_all(&json_reply(200, &body).concat());
            });
        }
    });
    (format!("http://{addr}"), rx, release)
}

/// The output caps an upstream got: `n ×` the largest cap field.
fn sent_output(got: &Got) -> u64 {
    let v: Value = serde_json::from_slice(&got.body).expect("json");
    let cap = ["max_tokens", "max_completion_tokens"]
        .iter()
        .filter_map(|f| v[*f].as_u64())
        .max()
        .expect("a cap was sent");
    cap * v["n"].as_u64().unwrap_or(1)
}

/// The usage a model that spends every token it may would report.
fn greedy_usage(got: &Got) -> String {
    let input = got.body.len() as u64 / 4;
    let output = sent_output(got);
    if got.head.starts_with("POST /v1/chat/completions") {
        format!(r#"{{"usage":{{"prompt_tokens":{input},"completion_tokens":{output}}}}}"#)
    } else {
        format!(r#"{{"usage":{{"input_tokens":{input},"output_tokens":{output}}}}}"#)
    }
}

/// Twelve calls at once under a budget of 1000 tokens, each asking for
/// 300 tokens of output (OpenAI's with n = 2): all are in flight together
/// (the upstream answers none until every call was forwarded or refused),
/// yet the output caps sent upstream, times n, add up to no more than the
/// budget, and so does the output a greedy model reports; the rest are
/// refused with the API's 429, and every call's reservation is recorded.
#[test]
fn concurrent_calls_cannot_spend_more_than_the_budget() {
    const BUDGET: u64 = 1000;
    let policy = Policy {
        max_tokens_per_run: Some(BUDGET),
        ..Policy::default()
    };
    let (url, got, release) = held_upstream(greedy_usage);
    let h = Harness::new(settings(Some(&url), policy));
    let (done_tx, done) = mpsc::channel();
    let mut received = Vec::new();
    let mut answers = Vec::new();
    thread::scope(|s| {
        for i in 0..12 {
            let (h, done_tx) = (&h, done_tx.clone());
            s.spawn(move || {
                let a = if i % 3 == 0 {
                    h.call(
                        "POST",
                        "/v1/chat/completions",
                        &[],
                        br#"{"model":"gpt-x","n":2,"max_completion_tokens":150,"messages":[{"role":"user","content":"hello"}]}"#,
                    )
                } else {
                    h.call(
                        "POST",
                        "/v1/messages",
                        &[],
                        br#"{"model":"claude-x","max_tokens":300,"messages":[{"role":"user","content":"hello"}]}"#,
                    )
                };
                let _ = done_tx.send(a);
            });
        }
        // Until every call is either at the upstream (held) or answered.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while received.len() + answers.len() < 12 && std::time::Instant::now() < deadline {
            while let Ok(g) = got.try_recv() {
                received.push(g);
            }
            while let Ok(a) = done.try_recv() {
                answers.push(a);
            }
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(received.len() + answers.len(), 12, "calls got stuck");
        assert!(
            answers.iter().all(|a| a.status == 429),
            "a call was answered while the upstream held them all: {answers:?}"
        );
        release.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    while let Ok(a) = done.try_recv() {
        answers.push(a);
    }
    assert_eq!(answers.len(), 12);
    let forwarded = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(forwarded, received.len());
    assert!(forwarded >= 2, "fewer than two calls in flight together");
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
    assert!(!refused.is_empty(), "12 × 300 fit in {BUDGET}?");
    for a in &refused {
        assert_eq!(a.status, 429, "{a:?}");
        assert_eq!(a.header("x-airlock-denied"), Some("token_budget"));
    }
    let sent: u64 = received.iter().map(sent_output).sum();
    assert!(
        sent <= BUDGET,
        "{sent} tokens of output asked of the upstream"
    );
    let calls = h.records(super::kind::CALL);
    assert_eq!(calls.len(), forwarded);
    let reported: u64 = calls
        .iter()
        .map(|c| c["output_tokens"].as_u64().expect("output"))
        .sum();
    assert_eq!(reported, sent, "the greedy model spent every cap");
    assert!(reported <= BUDGET);
    let reserved: u64 = calls
        .iter()
        .map(|c| c["reserved"]["output"].as_u64().expect("reserved"))
        .sum();
    assert_eq!(reserved, sent, "each call reserved what it was sent");
    for c in &calls {
        assert_eq!(c["charged"]["output"], c["output_tokens"], "{c}");
        // Which calls got through depends on scheduling; each reserved for
        // all of its choices.
        let chat = c["target"] == "/v1/chat/completions";
        assert_eq!(c["reserved"]["n"], if chat { 2 } else { 1 }, "{c}");
    }
    // Every reservation was settled.
    assert_eq!(
        crate::audit::records::fields(&h.proxy.summary())["output_tokens"].as_u64(),
        Some(reported)
    );
}

/// OpenAI's `n` multiplies the output: a call's cap is what is left shared
/// by its choices; an `n` no token can be left for is refused (429), one
/// that is not a positive integer is a bad body (400).
#[test]
fn openai_n_is_accounted() {
    let policy = Policy {
        max_tokens_per_run: Some(100),
        ..Policy::default()
    };
    let (url, got) = upstream(json_reply(200, "{}"), None);
    let h = Harness::new(settings(Some(&url), policy));
    for (n, status, reason) in [
        ("0", 400, "bad_body"),
        ("-1", 400, "bad_body"),
        ("1.5", 400, "bad_body"),
        ("\"2\"", 400, "bad_body"),
        ("101", 429, "token_budget"),
    ] {
        let body = format!(r#"{{"model":"m","n":{n}}}"#);
        let a = h.call("POST", "/v1/chat/completions", &[], body.as_bytes());
        assert_eq!(a.status, status, "n = {n}");
        assert_eq!(a.header("x-airlock-denied"), Some(reason), "n = {n}");
    }
    assert!(got.try_recv().is_err(), "a refused call went upstream");
    // n = 4 of 100 left: 25 each, in both cap fields, 100 reserved. The
    // upstream reports no usage: the call is charged what it reserved.
    let a = h.call(
        "POST",
        "/v1/chat/completions",
        &[],
        br#"{"model":"m","n":4,"max_tokens":1000,"max_completion_tokens":60}"#,
    );
    assert_eq!(a.status, 200);
    let got = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
    let sent: Value = serde_json::from_slice(&got.body).expect("json");
    assert_eq!(
        (
            sent["max_completion_tokens"].as_u64(),
            sent["max_tokens"].as_u64()
        ),
        (Some(25), Some(25))
    );
    let c = &h.records(super::kind::CALL)[0];
    assert_eq!(
        c["max_tokens_capped"],
        serde_json::json!({"field": "max_completion_tokens", "asked": 60, "sent": 25, "also": "max_tokens"})
    );
    assert_eq!(c["reserved"]["output"], 100);
    assert_eq!(c["reserved"]["n"], 4);
    assert_eq!(c["charged"]["output"], 100);
    // Nothing is left.
    let a = h.call("POST", "/v1/messages", &[], br#"{"model":"m"}"#);
    assert_eq!(a.status, 429);
}

/// A reflecting upstream: it answers with the request's headers echoed in
/// its response headers and, as server-sent events, in its body (with a
/// second, OpenAI key it knows of), written in 1- and 3-byte HTTP chunks
/// so that every key straddles chunk boundaries.
fn reflecting_upstream(other_key: &'static str) -> (String, mpsc::Receiver<Got>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let got = read_got(BufReader::new(stream.try_clone().expect("clone")));
            let key = got
                .head
                .lines()
                .find_map(|l| l.strip_prefix("x-api-key: "))
                .unwrap_or_default()
                .to_owned();
            let mut head = String::from(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n",
            );
            head.push_str(&format!("anthropic-echo-x-api-key: {key}\r\n"));
            head.push_str(&format!("request-id: req_{key}_1\r\n"));
            head.push_str(&format!("anthropic-{}: 1\r\n", key.to_ascii_lowercase()));
            head.push_str("\r\n");
            let dump = got.head.replace("\r\n", "\\n");
            let body = format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"usage\":{{\"input_tokens\":3,\"output_tokens\":1}}}}}}\n\n\
                 event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"delta\":{{\"type\":\"text_delta\",\"text\":\"you sent: {dump}\"}}}}\n\n\
                 event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"delta\":{{\"type\":\"text_delta\",\"text\":\"and the other key is {other_key}, shouting: {upper}\"}}}}\n\n\
                 event: message_stop\ndata: {{\"type\":\"message_stop\"}}\n\n",
                upper = key.to_ascii_uppercase(),
            );
            let _ = tx.send(got);
            let _ = stream.write_all(head.as_bytes());
            let mut rest = body.as_bytes();
            let mut odd = true;
            while !rest.is_empty() {
                let n = rest.len().min(if odd { 1 } else { 3 });
                odd = !odd;
                let _ = stream.write_all(format!("{n:x}\r\n").as_bytes());
                let _ = stream.write_all(&rest[..n]);
                let _ = stream.write_all(b"\r\n");
                let _ = stream.flush();
                rest = &rest[n..];
                thread::sleep(Duration::from_micros(200));
            }
            let _ = stream.write_all(b"0\r\n\r\n");
        }
    });
    (format!("http://{addr}"), rx)
}

fn has_ci(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// An upstream that reflects the request never shows the guest a key: not
/// in a header value, not in a header name (dropped), not in the streamed
/// body however it is split, in any case, nor the other provider's key;
/// lengths are kept (a same-length mask), the scrub is audited and the
/// usage is still read.
#[test]
fn a_reflecting_upstream_never_shows_the_key_to_the_guest() {
    const OTHER_KEY: &str = "sk-openai-other-key-987654321";
    let (url, got) = reflecting_upstream(OTHER_KEY);
    let mut s = settings(Some(&url), Policy::default());
    s.openai_key = Some(Key {
        secret: Secret::for_tests(OTHER_KEY),
        source: "test".into(),
    });
    let h = Harness::new(s);
    let a = h.call(
        "POST",
        "/v1/messages",
        &[
            ("x-api-key", "placeholder"),
            ("anthropic-version", "2023-06-01"),
        ],
        STREAM_BODY,
    );
    let got = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
    assert!(
        got.head.contains(REAL_KEY),
        "the upstream did not get the key"
    );
    assert_eq!((a.status, a.ended), (200, true), "{a:?}");
    let body = a.body();
    let headers: Vec<u8> = a
        .headers
        .iter()
        .flat_map(|(n, v)| format!("{n}: {v}\n").into_bytes())
        .collect();
    for key in [REAL_KEY, OTHER_KEY] {
        assert!(!has_ci(&body, key), "{key} in the body");
        assert!(!has_ci(&headers, key), "{key} in the headers");
    }
    assert!(
        a.chunks.len() > 10,
        "the body did not stream: {}",
        a.chunks.len()
    );
    assert!(
        has_ci(&body, "you sent: POST /v1/messages"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let mask: String = super::scrub::mask(REAL_KEY.len()).map(char::from).collect();
    assert!(
        has_ci(&body, &format!("x-api-key: {mask}")),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(a.header("anthropic-echo-x-api-key"), Some(mask.as_str()));
    assert_eq!(
        a.header("request-id"),
        Some(format!("req_{mask}_1").as_str())
    );
    assert!(
        !a.headers.iter().any(|(n, _)| n.starts_with("anthropic-sk")),
        "{:?}",
        a.headers
    );
    let c = &h.records(super::kind::CALL)[0];
    assert_eq!(
        c["scrubbed"],
        serde_json::json!({"headers": 3, "body": 3}),
        "{c}"
    );
    assert_eq!(c["response_bytes"].as_u64(), Some(body.len() as u64));
    assert_eq!(c["input_tokens"], 3);
    assert!(!String::from_utf8_lossy(&h.audit.bytes()).contains(REAL_KEY));
}

/// Without a key in the answer nothing is masked and nothing recorded.
#[test]
fn answers_without_a_key_are_untouched() {
    let (url, _got) = upstream(chunked(&[SSE_1, SSE_2]), None);
    let h = Harness::new(settings(Some(&url), Policy::default()));
    let a = h.call("POST", "/v1/messages", &[], STREAM_BODY);
    assert_eq!(a.body(), format!("{SSE_1}{SSE_2}").as_bytes());
    assert!(h.records(super::kind::CALL)[0]["scrubbed"].is_null());
}

const ANTHROPIC_ONLY_KEY: &str = "sk-ant-only-for-anthropic-111";
const OPENAI_ONLY_KEY: &str = "sk-openai-only-for-openai-222";

/// Both keys, distinct, and the upstreams given.
fn routed(anthropic: Option<&str>, openai: Option<&str>) -> Settings {
    let key = |k: &str| Key {
        secret: Secret::for_tests(k),
        source: "test".into(),
    };
    Settings {
        anthropic_upstream: anthropic.map(|u| Upstream::parse(u).expect("url")),
        openai_upstream: openai.map(|u| Upstream::parse(u).expect("url")),
        anthropic_key: Some(key(ANTHROPIC_ONLY_KEY)),
        openai_key: Some(key(OPENAI_ONLY_KEY)),
        ca: None,
        policy: Policy::default(),
        anthropic_auth: super::config::AnthropicAuth::ApiKey,
        openai_headers: Vec::new(),
    }
}

/// With both keys set and an Anthropic-only upstream, the OpenAI key never
/// reaches it: OpenAI calls (chat, and /v1/models as OpenAI) get an
/// API-shaped 403 naming the flag that would route them, and Anthropic
/// calls carry the Anthropic key alone.
#[test]
fn the_openai_key_never_reaches_an_anthropic_only_upstream() {
    let (url, got) = upstream(json_reply(200, "{}"), None);
    let h = Harness::new(routed(Some(&url), None));
    let a = h.call(
        "POST",
        "/v1/chat/completions",
        &[("authorization", "Bearer placeholder")],
        br#"{"model":"gpt-x","messages":[]}"#,
    );
    assert_eq!((a.status, a.ended), (403, true));
    assert_eq!(a.json()["error"]["code"], "no_upstream_for_api");
    let message = a.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("--model-upstream openai=URL"), "{message}");
    assert!(
        !message.contains(&url),
        "the upstream's URL is shown: {message}"
    );
    let a = h.call("GET", "/v1/models", &[("authorization", "Bearer x")], b"");
    assert_eq!(a.status, 403);
    assert!(
        got.try_recv().is_err(),
        "an OpenAI call reached the upstream"
    );
    let denied = h.records(super::kind::DENIED);
    assert_eq!(denied.len(), 2);
    assert!(denied.iter().all(|d| d["reason"] == "no_upstream_for_api"));
    // The Anthropic call goes, with the Anthropic key only.
    let a = h.call(
        "POST",
        "/v1/messages",
        &[("anthropic-version", "2023-06-01")],
        br#"{"model":"claude-x","messages":[]}"#,
    );
    assert_eq!(a.status, 200);
    let g = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
    assert!(
        g.head
            .contains(&format!("x-api-key: {ANTHROPIC_ONLY_KEY}\r\n")),
        "{}",
        g.head
    );
    assert!(!g.head.contains(OPENAI_ONLY_KEY), "{}", g.head);
    assert!(
        !g.head.to_ascii_lowercase().contains("authorization"),
        "{}",
        g.head
    );
    assert!(got.try_recv().is_err(), "more than one call went upstream");
}

/// A gateway serving both: each call carries only its own provider's key;
/// two upstreams, one each: each gets only its own provider's calls.
#[test]
fn each_provider_key_goes_only_to_its_routes() {
    let (url, got) = upstream(json_reply(200, "{}"), None);
    let h = Harness::new(routed(Some(&url), Some(&url)));
    assert_eq!(
        h.call("POST", "/v1/chat/completions", &[], br#"{"model":"g"}"#)
            .status,
        200
    );
    let g = got
        .recv_timeout(Duration::from_secs(5))
        .expect("openai call");
    assert!(
        g.head.starts_with("POST /v1/chat/completions"),
        "{}",
        g.head
    );
    assert!(g
        .head
        .contains(&format!("authorization: Bearer {OPENAI_ONLY_KEY}\r\n")));
    assert!(!g.head.contains(ANTHROPIC_ONLY_KEY) && !g.head.contains("x-api-key"));
    assert_eq!(
        h.call("POST", "/v1/messages", &[], br#"{"model":"c"}"#)
            .status,
        200
    );
    let g = got
        .recv_timeout(Duration::from_secs(5))
        .expect("anthropic call");
    assert!(g
        .head
        .contains(&format!("x-api-key: {ANTHROPIC_ONLY_KEY}\r\n")));
    assert!(!g.head.contains(OPENAI_ONLY_KEY) && !g.head.contains("authorization"));

    let (a_url, a_got) = upstream(json_reply(200, "{}"), None);
    let (o_url, o_got) = upstream(json_reply(200, "{}"), None);
    let h = Harness::new(routed(Some(&a_url), Some(&o_url)));
    assert_eq!(
        h.call("POST", "/v1/chat/completions", &[], br#"{"model":"g"}"#)
            .status,
        200
    );
    assert_eq!(
        h.call("POST", "/v1/messages", &[], br#"{"model":"c"}"#)
            .status,
        200
    );
    let a = a_got
        .recv_timeout(Duration::from_secs(5))
        .expect("anthropic upstream");
    let o = o_got
        .recv_timeout(Duration::from_secs(5))
        .expect("openai upstream");
    assert!(a.head.starts_with("POST /v1/messages") && a.head.contains(ANTHROPIC_ONLY_KEY));
    assert!(o.head.starts_with("POST /v1/chat/completions") && o.head.contains(OPENAI_ONLY_KEY));
    assert!(a_got.try_recv().is_err() && o_got.try_recv().is_err());
    assert!(!a.head.contains(OPENAI_ONLY_KEY) && !o.head.contains(ANTHROPIC_ONLY_KEY));
}

/// A call the upstream never answered releases what it reserved: the next
/// call may have the whole budget again.
#[test]
fn an_unreachable_call_releases_its_reservation() {
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let policy = Policy {
        max_tokens_per_run: Some(100),
        ..Policy::default()
    };
    let h = Harness::new(settings(Some(&format!("http://127.0.0.1:{port}")), policy));
    for _ in 0..3 {
        let a = h.call(
            "POST",
            "/v1/messages",
            &[],
            br#"{"model":"m","max_tokens":500}"#,
        );
        assert_eq!(a.status, 502);
    }
    let calls = h.records(super::kind::CALL);
    assert_eq!(calls.len(), 3);
    for c in &calls {
        assert_eq!(c["max_tokens_capped"]["sent"], 100, "{c}");
        assert_eq!(c["reserved"]["output"], 100, "{c}");
        assert_eq!(c["charged"], serde_json::json!({"input": 0, "output": 0}));
    }
    let summary = crate::audit::records::fields(&h.proxy.summary());
    assert_eq!(
        (
            summary["input_tokens"].as_u64(),
            summary["output_tokens"].as_u64()
        ),
        (Some(0), Some(0))
    );
}

/// A top-level key named twice is refused: parsers differ on which value
/// counts, so airlock could check one model or cap and the upstream use
/// the other.
#[test]
fn a_key_named_twice_is_refused() {
    let policy = Policy {
        allowed_models: Some(vec!["cheap".into()]),
        max_tokens_per_run: Some(100),
        ..Policy::default()
    };
    let (url, got) = upstream(json_reply(200, "{}"), None);
    let h = Harness::new(settings(Some(&url), policy));
    for body in [
        &br#"{"model":"cheap","max_tokens":100000,"max_tokens":10}"#[..],
        br#"{"model":"expensive","model":"cheap"}"#,
        br#"{"model":"cheap","n":50,"n":1}"#,
        br#"{"model":"cheap","max_tokens":5,"max\u005ftokens":9}"#,
    ] {
        let a = h.call("POST", "/v1/chat/completions", &[], body);
        assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(a.json()["error"]["code"], "bad_body");
    }
    assert!(got.try_recv().is_err(), "a refused call went upstream");
    // Repeated keys deeper in are the upstream's business.
    let a = h.call(
        "POST",
        "/v1/messages",
        &[],
        br#"{"model":"cheap","max_tokens":5,"metadata":{"a":1,"a":2}}"#,
    );
    assert_eq!(a.status, 200);
}

/// An agent that goes away in the middle of a stream is charged what its
/// call reserved, not the running count it had read so far.
#[test]
fn a_stream_cut_short_is_charged_its_reservation() {
    let (gate_tx, gate) = mpsc::channel();
    let (url, _got) = upstream(chunked(&[SSE_1, SSE_2]), Some(gate));
    let policy = Policy {
        max_tokens_per_run: Some(100),
        ..Policy::default()
    };
    let h = Harness::new(settings(Some(&url), policy));
    let (mut guest, t) = h.connect();
    send_request(&mut guest, "POST", "/v1/messages", &[], STREAM_BODY);
    let (status, _) = read_head(&mut guest);
    assert_eq!(status, 200);
    let Message::HttpBody(first) = read_frame(&mut guest).expect("first chunk") else {
        panic!("not a body chunk")
    };
    assert_eq!(first, SSE_1.as_bytes());
    drop(guest);
    gate_tx.send(()).expect("release");
    t.join().expect("proxy");
    let c = &h.records(super::kind::CALL)[0];
    assert_eq!(c["complete"], false, "{c}");
    assert_eq!(c["reserved"]["output"], 100);
    assert_eq!(c["charged"]["output"], 100, "{c}");
    assert_eq!(c["charged"]["input"], 11, "{c}");
    let a = h.call("POST", "/v1/messages", &[], br#"{"model":"m"}"#);
    assert_eq!(a.status, 429);
}

/// A model name from the guest goes into every record and message about the
/// call: a long one is refused before anything is written, and recorded
/// cut, so that a thousand denied calls cannot fill the audit log.
#[test]
fn a_long_model_name_cannot_fill_the_audit_log() {
    let h = Harness::new(Settings::default());
    // A few KiB (past the model-name limit) and half a MiB (past the
    // body reader's limit on any one field).
    for len in [3000, 512 * 1024] {
        let name = "A".repeat(len);
        let body = format!(r#"{{"model":"{name}","max_tokens":1,"messages":[]}}"#);
        for _ in 0..10 {
            let a = h.call("POST", "/v1/messages", &[], body.as_bytes());
            assert_eq!(a.status, 400, "{a:?}");
        }
    }
    let denied = h.records(super::kind::DENIED);
    assert_eq!(denied.len(), 20);
    for (i, d) in denied.iter().enumerate() {
        let recorded = d["model"].as_str().unwrap_or_default();
        let want = if i < 10 { 256 } else { 0 };
        assert_eq!(recorded.len(), want, "the name, cut or left out: {d}");
        assert!(
            d.to_string().len() < 4096,
            "a {} byte record",
            d.to_string().len()
        );
    }
    assert!(h.audit.bytes().len() < 100 * 1024);
}

/// What real clients send goes through as they sent it: Claude Code's
/// `POST /v1/messages?beta=true` with its headers, the SDKs'
/// `count_tokens`, `models/{id}`, OpenAI Responses and embeddings; each
/// target reaches the upstream exactly.
#[test]
fn real_clients_routes_pass_exactly() {
    let (url, got) = upstream(json_reply(200, "{}"), None);
    let h = Harness::new(settings(Some(&url), Policy::default()));
    let claude = [
        ("anthropic-version", "2023-06-01"),
        (
            "anthropic-beta",
            "claude-code-20250219,interleaved-thinking-2025-05-14",
        ),
        ("x-app", "cli"),
        ("x-claude-code-session-id", "0b6c-session"),
        ("anthropic-dangerous-direct-browser-access", "true"),
        ("x-stainless-retry-count", "0"),
        ("x-api-key", "airlock-placeholder"),
    ];
    let body = br#"{"model":"claude-x","max_tokens":32000,"messages":[]}"#;
    for (method, target, body) in [
        ("POST", "/v1/messages?beta=true", &body[..]),
        (
            "POST",
            "/v1/messages/count_tokens?beta=true",
            br#"{"model":"claude-x","messages":[]}"#,
        ),
        (
            "POST",
            "/v1/messages/count_tokens",
            br#"{"model":"claude-x","messages":[]}"#,
        ),
        ("GET", "/v1/models/claude-x?beta=true", b""),
        ("GET", "/v1/models?limit=5&beta=true", b""),
    ] {
        let a = h.call(method, target, &claude, body);
        assert_eq!(a.status, 200, "{method} {target}");
        let g = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
        assert!(
            g.head
                .starts_with(&format!("{method} {target} HTTP/1.1\r\n")),
            "{}",
            g.head
        );
        assert_eq!(g.body, body, "{target}: the body was changed");
        let head = g.head.to_ascii_lowercase();
        for (name, value) in &claude[..6] {
            assert!(
                head.contains(&format!("{name}: {}\r\n", value.to_ascii_lowercase())),
                "{name} not forwarded: {head}"
            );
        }
        assert!(!head.contains("airlock-placeholder"), "{head}");
    }
    let openai = [("authorization", "Bearer airlock-placeholder")];
    for target in ["/v1/responses", "/v1/embeddings"] {
        let body = br#"{"model":"gpt-x","input":"hi"}"#;
        assert_eq!(
            h.call("POST", target, &openai, body).status,
            200,
            "{target}"
        );
        let g = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
        assert!(g.head.starts_with(&format!("POST {target} ")), "{}", g.head);
        assert_eq!(g.body, body);
    }
    let dropped = &h.records(super::kind::CALL)[0]["dropped_headers"];
    assert_eq!(dropped, &serde_json::json!(["x-api-key"]), "{dropped}");
}

/// `count_tokens` and the model list spend no tokens: with the token
/// budget spent they still go (and count as requests); a generating call
/// is refused with a 429 that says not to retry and names the flag.
/// Responses' `max_output_tokens` is lowered and reserved like the other
/// caps; a background response is refused.
#[test]
fn count_tokens_is_free_and_responses_are_capped() {
    let policy = Policy {
        max_tokens_per_run: Some(100),
        ..Policy::default()
    };
    let usage = r#"{"usage":{"input_tokens":60,"output_tokens":40}}"#;
    let (url, got) = upstream(json_reply(200, usage), None);
    let h = Harness::new(settings(Some(&url), policy));
    let a = h.call(
        "POST",
        "/v1/responses",
        &[],
        br#"{"model":"gpt-x","input":"hi","max_output_tokens":5000}"#,
    );
    assert_eq!(a.status, 200);
    let sent: Value =
        serde_json::from_slice(&got.recv_timeout(Duration::from_secs(5)).expect("up").body)
            .expect("json");
    assert_eq!(sent["max_output_tokens"], 100);
    let c = &h.records(super::kind::CALL)[0];
    assert_eq!(
        c["max_tokens_capped"],
        serde_json::json!({"field": "max_output_tokens", "asked": 5000, "sent": 100})
    );
    assert_eq!(c["reserved"]["output"], 100);
    // 100 used: the budget is spent.
    let a = h.call("POST", "/v1/messages?beta=true", &[], br#"{"model":"m"}"#);
    assert_eq!(a.status, 429);
    assert_eq!(a.header("x-should-retry"), Some("false"));
    let message = a.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("--model-max-tokens"), "{message}");
    for (method, target, body) in [
        (
            "POST",
            "/v1/messages/count_tokens?beta=true",
            &br#"{"model":"m","messages":[]}"#[..],
        ),
        ("GET", "/v1/models", b""),
    ] {
        let a = h.call(method, target, &[], body);
        assert_eq!(a.status, 200, "{target}");
        got.recv_timeout(Duration::from_secs(5)).expect("up");
    }
    let calls = h.records(super::kind::CALL);
    assert!(calls[1]["reserved"].is_null() && calls[1]["max_tokens_capped"].is_null());
    assert_eq!(
        crate::audit::records::fields(&h.proxy.summary())["requests_admitted"],
        3
    );
    let a = h.call(
        "POST",
        "/v1/responses",
        &[],
        br#"{"model":"gpt-x","input":"hi","background":true}"#,
    );
    assert_eq!(
        (a.status, a.header("x-airlock-denied")),
        (403, Some("outside_the_run"))
    );
    assert!(got.try_recv().is_err(), "a refused call went upstream");
}

/// The upstream's retry advice and rate-limit headers reach the client
/// unchanged, on a 429 of its own.
#[test]
fn the_upstreams_retry_headers_pass_unchanged() {
    let body = r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
    let reply = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nx-should-retry: true\r\n\
         retry-after: 7\r\nretry-after-ms: 6500\r\nanthropic-ratelimit-tokens-remaining: 0\r\n\
         x-ratelimit-reset-requests: 1s\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (url, _got) = upstream(vec![reply.into_bytes()], None);
    let h = Harness::new(settings(Some(&url), Policy::default()));
    let a = h.call("POST", "/v1/messages", &[], br#"{"model":"m"}"#);
    assert_eq!(a.status, 429);
    for (name, value) in [
        ("x-should-retry", "true"),
        ("retry-after", "7"),
        ("retry-after-ms", "6500"),
        ("anthropic-ratelimit-tokens-remaining", "0"),
        ("x-ratelimit-reset-requests", "1s"),
    ] {
        assert_eq!(a.header(name), Some(value), "{name}");
    }
    assert_eq!(a.body(), body.as_bytes());
    assert!(a.header("x-airlock-denied").is_none());
}

/// With `--model-auth bearer` the OAuth token goes to the Anthropic
/// upstream as `Authorization: Bearer` (never as `x-api-key`), with the
/// OAuth beta added to the client's list; the guest's own credentials are
/// dropped; the token is masked in what comes back and never audited.
#[test]
fn an_oauth_token_goes_upstream_as_a_bearer_token() {
    const TOKEN: &str = "sk-ant-oat01-subscription-token-42";
    let reply = format!(r#"{{"echo":"{TOKEN}","usage":{{"input_tokens":1,"output_tokens":1}}}}"#);
    let reply: &'static str = Box::leak(reply.into_boxed_str());
    let (url, got) = upstream(json_reply(200, reply), None);
    let mut s = routed(Some(&url), Some(&url));
    s.anthropic_key = Some(Key {
        secret: Secret::for_tests(TOKEN),
        source: "$CLAUDE_CODE_OAUTH_TOKEN".into(),
    });
    s.anthropic_auth = super::config::AnthropicAuth::Bearer;
    let h = Harness::new(s);
    let a = h.call(
        "POST",
        "/v1/messages?beta=true",
        &[
            ("x-api-key", "airlock-placeholder"),
            ("authorization", "Bearer guest-token"),
            ("anthropic-beta", "claude-code-20250219"),
        ],
        br#"{"model":"claude-x","messages":[]}"#,
    );
    assert_eq!(a.status, 200);
    assert!(
        !String::from_utf8_lossy(&a.body()).contains(TOKEN),
        "the token came back"
    );
    let g = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
    let head = g.head.to_ascii_lowercase();
    assert!(
        g.head
            .contains(&format!("authorization: Bearer {TOKEN}\r\n")),
        "{}",
        g.head
    );
    assert_eq!(head.matches("authorization").count(), 1, "{head}");
    assert!(
        !head.contains("x-api-key") && !head.contains("guest-token"),
        "{head}"
    );
    assert!(
        head.contains("anthropic-beta: claude-code-20250219,oauth-2025-04-20\r\n"),
        "{head}"
    );
    // Without a beta list of the guest's: the OAuth beta alone. OpenAI
    // calls keep their own key.
    assert_eq!(
        h.call("POST", "/v1/messages", &[], br#"{"model":"c"}"#)
            .status,
        200
    );
    let g = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
    assert!(
        g.head.contains("anthropic-beta: oauth-2025-04-20\r\n"),
        "{}",
        g.head
    );
    assert_eq!(
        h.call("POST", "/v1/chat/completions", &[], br#"{"model":"g"}"#)
            .status,
        200
    );
    let g = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
    assert!(g
        .head
        .contains(&format!("authorization: Bearer {OPENAI_ONLY_KEY}\r\n")));
    assert!(!g.head.contains(TOKEN) && !g.head.contains("anthropic-beta"));
    assert!(!String::from_utf8_lossy(&h.audit.bytes()).contains(TOKEN));
}

/// The host's OpenAI organization and project go with OpenAI calls only;
/// the guest's are dropped.
#[test]
fn openai_account_headers_are_the_hosts() {
    let (url, got) = upstream(json_reply(200, "{}"), None);
    let mut s = routed(Some(&url), Some(&url));
    s.openai_headers = vec![("openai-project".into(), "proj_host".into())];
    let h = Harness::new(s);
    let guest = [
        ("OpenAI-Project", "proj_guest"),
        ("OpenAI-Organization", "org_guest"),
    ];
    assert_eq!(
        h.call("POST", "/v1/chat/completions", &guest, br#"{"model":"g"}"#)
            .status,
        200
    );
    let g = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
    let head = g.head.to_ascii_lowercase();
    assert!(head.contains("openai-project: proj_host\r\n"), "{head}");
    assert!(
        !head.contains("guest") && !head.contains("openai-organization"),
        "{head}"
    );
    assert_eq!(
        h.call("POST", "/v1/messages", &guest, br#"{"model":"c"}"#)
            .status,
        200
    );
    let g = got.recv_timeout(Duration::from_secs(5)).expect("upstream");
    assert!(
        !g.head.to_ascii_lowercase().contains("openai-"),
        "{}",
        g.head
    );
}
