//! The in-guest model endpoint's HTTP/1.1 request parser
//! (guest-init/src/model/http.rs): arbitrary bytes as what an agent sends
//! on the loopback socket, with a small and the default body limit. It must
//! never panic; a head it accepts must hold only what the relay may
//! forward (a relative target, token header names, no CR, LF or NUL in
//! values, no hop-by-hop header), a body it reads must respect the limit,
//! and every refusal must render as a well-formed HTTP response.
//!
//! The init is a binary crate: the parser is compiled in here from its
//! file, with the one constant it takes from its parent module.

#![no_main]

use std::io::BufReader;

use libfuzzer_sys::fuzz_target;

/// As in guest-init/src/model/mod.rs.
const MAX_BODY: u64 = airlock_protocol::limits::MAX_MODEL_BODY;

#[path = "../../guest-init/src/model/http.rs"]
#[allow(dead_code)]
mod http;

fn check_refusal(refusal: &http::Refusal) {
    let mut out = Vec::new();
    http::write_refusal(&mut out, refusal).expect("a Vec takes it");
    let text = String::from_utf8(out).expect("refusals are UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 "), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .parse()
        .expect("a number");
    assert_eq!(length, body.len());
    assert!(body.starts_with(r#"{"type":"error""#), "{body}");
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the body limit: tiny (to reach the limits) or
    // the default.
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    let max_body = if pick & 1 == 0 { 64 } else { MAX_BODY };
    let mut reader = BufReader::with_capacity(1 + usize::from(pick >> 1), data);
    let head = match http::read_head(&mut reader, max_body) {
        Ok(Some(head)) => head,
        Ok(None) => return,
        Err((_, refusal)) => return check_refusal(&refusal),
    };
    assert!(head.target.starts_with('/'), "{:?}", head.target);
    assert!(!head.method.is_empty());
    for (name, value) in &head.headers {
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':'),
            "{name:?}"
        );
        assert!(
            !value.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0)),
            "{value:?}"
        );
        assert!(!http::HOP_BY_HOP.contains(&name.to_ascii_lowercase().as_str()), "{name}");
    }
    let mut got: u64 = 0;
    let mut sink = |piece: &[u8]| {
        got += piece.len() as u64;
        Ok(())
    };
    let read = match head.body {
        http::Body::None => Ok(()),
        http::Body::Length(n) => {
            assert!(n <= max_body, "{n} > {max_body}");
            http::copy_exact(&mut reader, n, &mut sink)
        }
        http::Body::Chunked => http::read_chunked(&mut reader, max_body, &mut sink),
    };
    match read {
        Ok(()) => assert!(got <= max_body, "{got} > {max_body}"),
        Err(refusal) => check_refusal(&refusal),
    }
});
