use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use airlock_protocol::limits::{MAX_AUDIT_VALUE, MAX_HTTP_CHUNK};
use airlock_protocol::{read_frame, write_frame, Message};

use super::*;
use std::sync::mpsc::Sender;
use std::sync::Mutex;

/// Hands the host end of each new connection to the test.
struct FakeRelay(Mutex<Sender<UnixStream>>);

impl Relay for FakeRelay {
    type Conn = UnixStream;
    fn connect(&self) -> io::Result<UnixStream> {
        let (guest, host) = UnixStream::pair()?;
        guest.set_read_timeout(Some(Duration::from_secs(10)))?;
        host.set_read_timeout(Some(Duration::from_secs(10)))?;
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .send(host)
            .map_err(io::Error::other)?;
        Ok(guest)
    }
}

fn fake_relay() -> (FakeRelay, Receiver<UnixStream>) {
    let (tx, rx) = mpsc::channel();
    (FakeRelay(Mutex::new(tx)), rx)
}

/// No host at all: the vsock connect is refused.
struct DownRelay;

impl Relay for DownRelay {
    type Conn = UnixStream;
    fn connect(&self) -> io::Result<UnixStream> {
        Err(io::Error::from_raw_os_error(libc::ECONNRESET))
    }
}

/// A server on an ephemeral port of the test machine's loopback.
fn server<R: Relay>(relay: R, max: usize) -> SocketAddrV4 {
    server_with(
        relay,
        Limits {
            connections: max,
            ..Limits::DEFAULT
        },
    )
}

fn server_with<R: Relay>(relay: R, limits: Limits) -> SocketAddrV4 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
        panic!("not v4")
    };
    spawn_server_with(listener, relay, limits, None).expect("server");
    addr
}

fn client(addr: SocketAddrV4) -> TcpStream {
    let c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    c
}

/// Sends `request` and reads the whole response.
fn exchange(addr: SocketAddrV4, request: &[u8]) -> Vec<u8> {
    let mut c = client(addr);
    c.write_all(request).expect("send");
    let mut response = Vec::new();
    c.read_to_end(&mut response).expect("read");
    response
}

/// (status, lower-cased headers, body) of a raw response; a chunked body is
/// decoded (and must end with its last chunk).
fn parse_response(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head end");
    let head = std::str::from_utf8(&raw[..end]).expect("utf-8 head");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .expect("status line")
        .split(' ')
        .nth(1)
        .expect("status")
        .parse()
        .expect("number");
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header");
            (n.to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let mut body = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v == "chunked");
    if !chunked {
        return (status, headers, body.to_vec());
    }
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk line");
        let size = usize::from_str_radix(std::str::from_utf8(&body[..eol]).expect("hex"), 16)
            .expect("size");
        body = &body[eol + 2..];
        if size == 0 {
            assert_eq!(body, b"\r\n", "the last chunk ends the body");
            break;
        }
        out.extend_from_slice(&body[..size]);
        assert_eq!(&body[size..size + 2], b"\r\n");
        body = &body[size + 2..];
    }
    (status, headers, out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// What a fake host read: the request head and its whole body.
fn read_request(host: &mut UnixStream) -> (Message, Vec<u8>) {
    let head = read_frame(&mut *host).expect("request");
    let mut body = Vec::new();
    loop {
        match read_frame(&mut *host).expect("body frame") {
            Message::HttpBody(d) => {
                assert!(d.len() <= MAX_HTTP_CHUNK);
                body.extend_from_slice(&d);
            }
            Message::HttpEnd => return (head, body),
            other => panic!("{other:?}"),
        }
    }
}

fn respond(host: &mut UnixStream, status: u16, headers: &[(&str, &str)], chunks: &[&[u8]]) {
    let headers = headers
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    write_frame(&mut *host, &Message::HttpResponse { status, headers }).expect("response");
    for c in chunks {
        write_frame(&mut *host, &Message::HttpBody(c.to_vec())).expect("body");
    }
    write_frame(&mut *host, &Message::HttpEnd).expect("end");
}

fn error_message(body: &[u8]) -> String {
    let text = std::str::from_utf8(body).expect("utf-8");
    assert!(
        text.starts_with(r#"{"type":"error","error":{"type":""#),
        "{text}"
    );
    text.to_owned()
}

#[test]
fn a_request_is_relayed_without_hop_by_hop_headers_and_the_answer_comes_back() {
    let (relay, hosts) = fake_relay();
    let addr = server(relay, 4);
    let host = thread::spawn(move || {
        let mut host = hosts.recv().expect("a connection");
        let got = read_request(&mut host);
        respond(
            &mut host,
            200,
            &[
                ("content-type", "application/json"),
                ("connection", "keep-alive"),
                ("x-request-id", "r1"),
            ],
            &[b"{\"ok\":", b"true}"],
        );
        got
    });
    let body = br#"{"model":"m","max_tokens":5}"#;
    let request = format!(
        "POST /v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1:8088\r\nContent-Type: application/json\r\n\
         x-api-key: airlock-placeholder\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Authorization: Basic eA==\r\nTE: trailers\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut raw = request.into_bytes();
    raw.extend_from_slice(body);
    let (status, headers, got_body) = parse_response(&exchange(addr, &raw));
    let (head, relayed_body) = host.join().expect("host");
    assert_eq!(
        head,
        Message::HttpRequest {
            method: "POST".into(),
            target: "/v1/messages?beta=true".into(),
            headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("x-api-key".into(), "airlock-placeholder".into()),
            ],
        }
    );
    assert_eq!(relayed_body, body);
    assert_eq!(status, 200);
    assert_eq!(got_body, b"{\"ok\":true}");
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    assert_eq!(header(&headers, "x-request-id"), Some("r1"));
    assert_eq!(header(&headers, "connection"), Some("close"));
    assert_eq!(header(&headers, "transfer-encoding"), Some("chunked"));
    assert_eq!(headers.iter().filter(|(n, _)| n == "connection").count(), 1);
}

#[test]
fn a_chunked_request_body_is_decoded_and_a_content_length_answer_kept() {
    let (relay, hosts) = fake_relay();
    let addr = server(relay, 4);
    // A body of 100 KiB in uneven chunks: relayed in frames of ≤ 64 KiB.
    let data: Vec<u8> = (0..100 * 1024u32)
        .map(|i| u8::try_from(i % 251).expect("small"))
        .collect();
    let host = thread::spawn(move || {
        let mut host = hosts.recv().expect("a connection");
        let got = read_request(&mut host);
        respond(&mut host, 201, &[("Content-Length", "5")], &[b"he", b"llo"]);
        got
    });
    let mut raw =
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let mut rest = &data[..];
    for size in [1usize, 70_000, 10, 4096] {
        let (piece, tail) = rest.split_at(size);
        raw.extend_from_slice(format!("{size:X};ext=1\r\n").as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
        rest = tail;
    }
    raw.extend_from_slice(format!("{:x}\r\n", rest.len()).as_bytes());
    raw.extend_from_slice(rest);
    raw.extend_from_slice(b"\r\n0\r\nX-Trailer: dropped\r\n\r\n");
    let (status, headers, body) = parse_response(&exchange(addr, &raw));
    let (head, relayed) = host.join().expect("host");
    assert!(
        matches!(head, Message::HttpRequest { ref headers, .. } if headers.is_empty()),
        "{head:?}"
    );
    assert_eq!(relayed, data);
    assert_eq!(status, 201);
    assert_eq!(header(&headers, "content-length"), Some("5"));
    assert_eq!(header(&headers, "transfer-encoding"), None);
    assert_eq!(body, b"hello");
}

#[test]
fn server_sent_events_reach_the_agent_before_the_host_sends_the_rest() {
    let (relay, hosts) = fake_relay();
    let addr = server(relay, 4);
    let (seen_tx, seen_rx) = mpsc::channel::<()>();
    let host = thread::spawn(move || {
        let mut host = hosts.recv().expect("a connection");
        read_request(&mut host);
        let headers = vec![("content-type".into(), "text/event-stream".into())];
        write_frame(
            &mut host,
            &Message::HttpResponse {
                status: 200,
                headers,
            },
        )
        .expect("head");
        write_frame(
            &mut host,
            &Message::HttpBody(b"event: message_start\ndata: {}\n\n".to_vec()),
        )
        .expect("ev1");
        // The rest only once the agent has the first event.
        seen_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the first event never reached the agent");
        write_frame(
            &mut host,
            &Message::HttpBody(b"event: message_stop\ndata: {}\n\n".to_vec()),
        )
        .expect("ev2");
        write_frame(&mut host, &Message::HttpEnd).expect("end");
    });
    let mut c = client(addr);
    c.write_all(b"POST /v1/messages HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        .expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&got, b"event: message_start") {
        let n = c.read(&mut buf).expect("the first event");
        assert!(n > 0, "closed before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!contains(&got, b"event: message_stop"));
    seen_tx.send(()).expect("signal");
    c.read_to_end(&mut got).expect("the rest");
    host.join().expect("host");
    let (status, _, body) = parse_response(&got);
    assert_eq!(status, 200);
    assert_eq!(
        body,
        b"event: message_start\ndata: {}\n\nevent: message_stop\ndata: {}\n\n"
    );
}

#[test]
fn absolute_urls_and_malformed_heads_are_refused_before_the_host_is_asked() {
    let (relay, hosts) = fake_relay();
    let addr = server(relay, 4);
    for (request, status) in [
        (&b"GET http://evil.example/v1/models HTTP/1.1\r\n\r\n"[..], 400),
        (b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\n\r\n", 400),
        (b"get /v1/models HTTP/1.1\r\n\r\n", 501),
        (b"GET /v1/models HTTP/2.0\r\n\r\n", 505),
        (b"GET /v1/models HTTP/1.1\nHost: x\n\n", 400),
        (b"GET /v1 models HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nA: b\x01c\r\n\r\n", 400),
        (b"POST /v1/messages HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST /v1/messages HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST /v1/messages HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST /v1/messages HTTP/1.1\r\nExpect: magic\r\n\r\n", 417),
    ] {
        let (got, _, body) = parse_response(&exchange(addr, request));
        assert_eq!(got, status, "{}", String::from_utf8_lossy(request));
        let text = error_message(&body);
        assert!(text.contains("invalid_request_error"), "{text}");
    }
    let (_, _, body) = parse_response(&exchange(
        addr,
        b"GET http://evil.example/ HTTP/1.1\r\n\r\n",
    ));
    assert!(error_message(&body).contains("an absolute URL is refused"));
    assert!(hosts.try_recv().is_err(), "the host was asked");
}

#[test]
fn oversize_heads_and_bodies_are_refused() {
    const LIMIT: u64 = 8 << 20;
    let (relay, hosts) = fake_relay();
    // The host's limit, as airlock.model_max_body passes it.
    let addr = server_with(
        relay,
        Limits {
            connections: 4,
            body: LIMIT,
            ..Limits::DEFAULT
        },
    );
    let mut big_head = b"GET /v1/models HTTP/1.1\r\n".to_vec();
    for i in 0..2000 {
        big_head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "y".repeat(40)).as_bytes());
    }
    big_head.extend_from_slice(b"\r\n");
    let (status, _, _) = parse_response(&exchange(addr, &big_head));
    assert_eq!(status, 431);
    let long_value = format!(
        "GET /v1/models HTTP/1.1\r\nX-Long: {}\r\n\r\n",
        "v".repeat(9000)
    );
    assert_eq!(
        parse_response(&exchange(addr, long_value.as_bytes())).0,
        431
    );
    let many = format!(
        "GET /v1/models HTTP/1.1\r\n{}\r\n",
        "X-A: 1\r\n".repeat(101)
    );
    assert_eq!(parse_response(&exchange(addr, many.as_bytes())).0, 431);
    let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
    assert_eq!(
        parse_response(&exchange(addr, long_target.as_bytes())).0,
        414
    );
    let declared = format!(
        "POST /v1/messages HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        LIMIT + 1
    );
    let (status, headers, body) = parse_response(&exchange(addr, declared.as_bytes()));
    assert_eq!(status, 413);
    assert!(error_message(&body).contains("request_too_large"));
    assert!(error_message(&body).contains("--model-max-request-bytes"));
    assert_eq!(header(&headers, "x-should-retry"), Some("false"));
    assert!(hosts.try_recv().is_err(), "the host was asked");

    // A chunked body is only known to be too large as it comes: the host
    // connection is dropped without HttpEnd, the agent gets a 413.
    let host = thread::spawn(move || {
        let mut host = hosts.recv().expect("a connection");
        let mut frames = 0;
        let end = loop {
            match read_frame(&mut host) {
                Ok(Message::HttpEnd) => break "HttpEnd",
                Ok(_) => frames += 1,
                Err(_) => break "closed",
            }
        };
        (frames, end)
    });
    let mut c = client(addr);
    c.write_all(b"POST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .expect("head");
    let chunk = vec![b'x'; 1 << 20];
    let mut response = Vec::new();
    for _ in 0..9 {
        let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
        piece.extend_from_slice(&chunk);
        piece.extend_from_slice(b"\r\n");
        if c.write_all(&piece).is_err() {
            break;
        }
    }
    let _ = c.read_to_end(&mut response);
    assert_eq!(parse_response(&response).0, 413);
    let (frames, end) = host.join().expect("host");
    assert_eq!(end, "closed", "the host must not see a complete request");
    assert!(frames >= 2, "the body was being streamed ({frames} frames)");
}

#[test]
fn an_unreachable_host_is_an_api_shaped_502() {
    let addr = server(DownRelay, 4);
    let (status, headers, body) = parse_response(&exchange(
        addr,
        b"POST /v1/messages HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    ));
    assert_eq!(status, 502);
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let text = error_message(&body);
    assert!(text.contains(r#""type":"api_error""#), "{text}");
    assert!(
        text.contains("cannot reach the host's model proxy"),
        "{text}"
    );
}

#[test]
fn a_host_that_breaks_off_is_a_502_or_a_visibly_cut_answer() {
    let (relay, hosts) = fake_relay();
    let addr = server(relay, 4);
    let host = thread::spawn(move || {
        // Before the response: closes.
        let mut host = hosts.recv().expect("a connection");
        read_request(&mut host);
        drop(host);
        // Mid-body: closes after one chunk.
        let mut host = hosts.recv().expect("a connection");
        read_request(&mut host);
        let headers = vec![];
        write_frame(
            &mut host,
            &Message::HttpResponse {
                status: 200,
                headers,
            },
        )
        .expect("head");
        write_frame(&mut host, &Message::HttpBody(b"part".to_vec())).expect("body");
    });
    let request = b"GET /v1/models HTTP/1.1\r\n\r\n";
    let (status, _, body) = parse_response(&exchange(addr, request));
    assert_eq!(status, 502);
    assert!(error_message(&body).contains("the host closed the connection"));
    let raw = exchange(addr, request);
    host.join().expect("host");
    assert!(
        raw.ends_with(b"4\r\npart\r\n"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn http10_answers_end_with_the_connection_and_expect_continue_is_answered() {
    let (relay, hosts) = fake_relay();
    let addr = server(relay, 4);
    let host = thread::spawn(move || {
        let mut host = hosts.recv().expect("a connection");
        read_request(&mut host);
        respond(&mut host, 200, &[], &[b"old", b"-style"]);
        let mut host = hosts.recv().expect("a connection");
        let got = read_request(&mut host);
        respond(&mut host, 200, &[], &[]);
        got
    });
    let raw = exchange(addr, b"GET /v1/models HTTP/1.0\r\n\r\n");
    let (status, headers, body) = parse_response(&raw);
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "transfer-encoding"), None);
    assert_eq!(body, b"old-style");

    let mut c = client(addr);
    c.write_all(b"POST /v1/messages HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        .expect("head");
    let mut interim = [0u8; 25];
    c.read_exact(&mut interim).expect("100 Continue");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.write_all(b"abc").expect("body");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).expect("answer");
    assert_eq!(parse_response(&rest).0, 200);
    let (head, body) = host.join().expect("host");
    assert_eq!(body, b"abc");
    assert!(
        matches!(head, Message::HttpRequest { ref headers, .. } if headers.is_empty()),
        "{head:?}"
    );
}

#[test]
fn beyond_the_connection_limit_the_agent_gets_429() {
    let (relay, hosts) = fake_relay();
    let addr = server(relay, 2);
    // Two requests the host holds open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = client(addr);
        c.write_all(b"GET /v1/models HTTP/1.1\r\n\r\n")
            .expect("send");
        held.push((
            c,
            hosts
                .recv_timeout(Duration::from_secs(10))
                .expect("relayed"),
        ));
    }
    let (status, _, body) = parse_response(&exchange(addr, b"GET /v1/models HTTP/1.1\r\n\r\n"));
    assert_eq!(status, 429);
    assert!(error_message(&body).contains("rate_limit_error"));
    // Once one ends, a new request is served again.
    let (mut c, mut host) = held.pop().expect("held");
    read_request(&mut host);
    respond(&mut host, 200, &[], &[b"x"]);
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).expect("answer");
    assert_eq!(parse_response(&raw).0, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let next = thread::spawn(move || {
        let mut host = hosts
            .recv_timeout(Duration::from_secs(10))
            .expect("relayed");
        read_request(&mut host);
        respond(&mut host, 200, &[], &[b"y"]);
    });
    loop {
        let (status, _, _) = parse_response(&exchange(addr, b"GET /v1/models HTTP/1.1\r\n\r\n"));
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        assert!(Instant::now() < deadline, "the slot was never freed");
        thread::sleep(Duration::from_millis(20));
    }
    next.join().expect("host");
}

#[test]
fn a_client_that_trickles_its_request_loses_its_slot_at_the_deadline() {
    let (relay, hosts) = fake_relay();
    let addr = server_with(
        relay,
        Limits {
            connections: 1,
            request_deadline: Duration::from_millis(600),
            ..Limits::DEFAULT
        },
    );
    let mut c = client(addr);
    c.write_all(b"GET /v1/models HTTP/1.1\r\n").expect("send");
    // One byte every 50 ms: each read succeeds, the request never ends.
    // Only the deadline answers it (the per-read timeout never fires,
    // and this client gives up reading after 10 s).
    let mut response = Vec::new();
    for _ in 0..100 {
        thread::sleep(Duration::from_millis(50));
        if c.write_all(b"X").is_err() {
            break;
        }
        let _ = c.set_nonblocking(true);
        let mut buf = [0u8; 4096];
        if let Ok(n) = c.read(&mut buf) {
            response.extend_from_slice(&buf[..n]);
        }
        let _ = c.set_nonblocking(false);
        if !response.is_empty() {
            break;
        }
    }
    let _ = c.read_to_end(&mut response);
    assert_eq!(
        parse_response(&response).0,
        408,
        "{}",
        String::from_utf8_lossy(&response)
    );
    assert!(hosts.try_recv().is_err(), "the host was asked");
    // The slot is free again (the lingering close is bounded too).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = parse_response(&exchange(addr, b"GET http://x/ HTTP/1.1\r\n\r\n"));
        if status == 400 {
            break;
        }
        assert_eq!(status, 429);
        assert!(Instant::now() < deadline, "the slot was never freed");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_endpoints_own_answers_are_reported_as_audit_claims() {
    let (wake_rx, wake_tx) = UnixStream::pair().expect("socketpair");
    let (reporter, reports) = Reporter::new(wake_tx);
    let (relay, hosts) = fake_relay();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
        panic!("not v4")
    };
    spawn_server_with(listener, relay, Limits::DEFAULT, Some(reporter)).expect("server");
    let field = |m: &Message, name: &str| match m {
        Message::AuditEvent { kind, fields } => {
            assert_eq!(kind, "model.refused");
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        }
        other => panic!("{other:?}"),
    };
    // Relayed: the host saw it, nothing to report.
    let host = thread::spawn(move || {
        let mut host = hosts.recv().expect("a connection");
        read_request(&mut host);
        respond(&mut host, 403, &[], &[b"{}"]);
    });
    assert_eq!(
        parse_response(&exchange(addr, b"GET /v1/models HTTP/1.1\r\n\r\n")).0,
        403
    );
    host.join().expect("host");
    // Refused by the endpoint itself: reported, and the session woken.
    let target = format!("http://evil.example/{}", "a".repeat(5000));
    let request = format!("POST {target} HTTP/1.1\r\n\r\n");
    assert_eq!(parse_response(&exchange(addr, request.as_bytes())).0, 400);
    let report = reports
        .recv_timeout(Duration::from_secs(10))
        .expect("a report");
    assert_eq!(field(&report, "status").as_deref(), Some("400"));
    let seen = field(&report, "request").expect("the request");
    assert!(seen.starts_with("POST http://evil.example/aaa"), "{seen}");
    assert_eq!(seen.len(), MAX_AUDIT_VALUE, "bounded");
    assert!(field(&report, "reason")
        .expect("reason")
        .contains("absolute URL"));
    let mut byte = [0u8; 1];
    (&wake_rx).read_exact(&mut byte).expect("woken");
    // A head that never names a request: reported without one.
    assert_eq!(
        parse_response(&exchange(addr, b"\x16\x03\x01 TLS?\r\n\r\n")).0,
        400
    );
    let report = reports
        .recv_timeout(Duration::from_secs(10))
        .expect("a report");
    assert_eq!(field(&report, "request"), None);
    assert!(reports.try_recv().is_err(), "one report per refusal");
}

#[test]
fn the_agent_env_points_at_the_endpoint_unless_the_run_sets_it() {
    let env = agent_env(&[]);
    let get = |env: &[(String, String)], n: &str| {
        env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
    };
    assert_eq!(
        get(&env, "ANTHROPIC_BASE_URL").as_deref(),
        Some("http://127.0.0.1:8088")
    );
    assert_eq!(
        get(&env, "OPENAI_BASE_URL").as_deref(),
        Some("http://127.0.0.1:8088/v1")
    );
    assert_eq!(
        get(&env, "ANTHROPIC_API_KEY").as_deref(),
        Some(PLACEHOLDER_KEY)
    );
    assert_eq!(
        get(&env, "OPENAI_API_KEY").as_deref(),
        Some(PLACEHOLDER_KEY)
    );
    assert_eq!(env.len(), 4);
    let mine = vec![(
        "OPENAI_BASE_URL".to_owned(),
        "http://elsewhere/v1".to_owned(),
    )];
    let env = agent_env(&mine);
    assert_eq!(env.len(), 3);
    assert_eq!(get(&env, "OPENAI_BASE_URL"), None);
}

#[test]
fn json_errors_escape_their_message() {
    let r = Refusal::bad("a \"quoted\"\\ line\nand \u{1} more");
    assert_eq!(
        r.body(),
        r#"{"type":"error","error":{"type":"invalid_request_error","message":"a \"quoted\"\\ line\nand \u0001 more"}}"#
    );
}

/// Claude Code's connectivity probe is answered here, never relayed.
#[test]
fn the_hello_probe_is_answered_by_the_endpoint() {
    let (relay, hosts) = fake_relay();
    let addr = server(relay, 4);
    let (status, headers, body) = parse_response(&exchange(
        addr,
        b"HEAD /api/hello HTTP/1.1\r\nHost: x\r\n\r\n",
    ));
    assert_eq!(status, 200);
    assert!(body.is_empty(), "a HEAD answer has no body");
    assert_eq!(
        header(&headers, "content-length"),
        Some(HELLO_BODY.len().to_string().as_str())
    );
    let (status, _, body) = parse_response(&exchange(addr, b"GET /api/hello?x=1 HTTP/1.1\r\n\r\n"));
    assert_eq!((status, body.as_slice()), (200, HELLO_BODY.as_bytes()));
    assert!(hosts.try_recv().is_err(), "the probe was relayed");
    // Any other method or path on it goes to the host (and its rules).
    let (relay, hosts) = fake_relay();
    let addr = server(relay, 4);
    let host = thread::spawn(move || {
        let mut host = hosts.recv().expect("a connection");
        let (head, _) = read_request(&mut host);
        respond(&mut host, 404, &[], &[b"{}"]);
        head
    });
    let (status, _, _) = parse_response(&exchange(
        addr,
        b"POST /api/hello HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    ));
    assert_eq!(status, 404);
    assert!(matches!(
        host.join().expect("host"),
        Message::HttpRequest { method, .. } if method == "POST"
    ));
}

/// The default limit is the host's largest: a body over the old 8 MiB
/// goes through; the host's smaller limit is taken, a larger one capped.
#[test]
fn the_body_limit_is_the_hosts() {
    let (relay, hosts) = fake_relay();
    let addr = server(relay, 4);
    let size = (9 << 20) + 1;
    let host = thread::spawn(move || {
        let mut host = hosts.recv().expect("a connection");
        let (_, body) = read_request(&mut host);
        respond(&mut host, 200, &[], &[b"{}"]);
        body.len()
    });
    let mut request =
        format!("POST /v1/messages HTTP/1.1\r\nContent-Length: {size}\r\n\r\n").into_bytes();
    request.resize(request.len() + size, b'x');
    let (status, _, _) = parse_response(&exchange(addr, &request));
    assert_eq!(status, 200);
    assert_eq!(host.join().expect("host"), size);
    let listener = |max| {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let std::net::SocketAddr::V4(a) = l.local_addr().expect("addr") else {
            panic!("not v4")
        };
        spawn_server(l, DownRelay, None, max).expect("server");
        a
    };
    let small = listener(Some(100));
    let (status, _, body) = parse_response(&exchange(
        small,
        b"POST /v1/messages HTTP/1.1\r\nContent-Length: 101\r\n\r\n",
    ));
    assert_eq!(status, 413);
    assert!(error_message(&body).contains("limit of 100 bytes"));
    let huge = listener(Some(u64::MAX));
    let declared = format!(
        "POST /v1/messages HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY + 1
    );
    assert_eq!(parse_response(&exchange(huge, declared.as_bytes())).0, 413);
}
