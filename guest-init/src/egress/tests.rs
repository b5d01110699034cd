use std::time::{Duration, Instant};

use super::head::MAX_HEAD;
use super::http::{self, Target};
use super::socks;
use super::*;

#[test]
fn connect_and_absolute_requests_parse() {
    let h = http::parse_head(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443")
        .expect("connect");
    assert_eq!(
        h.target,
        Target::Connect {
            host: "example.com".into(),
            port: 443
        }
    );
    let h = http::parse_head(b"CONNECT [::1]:8443 HTTP/1.1").expect("v6");
    assert_eq!(
        h.target,
        Target::Connect {
            host: "::1".into(),
            port: 8443
        }
    );
    let h = http::parse_head(
        b"GET http://10.0.0.1:8080/a/b?c=d HTTP/1.1\r\nHost: 10.0.0.1:8080\r\n\
          Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n\
          Connection: keep-alive, x-secret\r\nX-Secret: 1\r\nAccept: */*",
    )
    .expect("get");
    assert_eq!(
        h.target,
        Target::Http {
            host: "10.0.0.1".into(),
            port: 8080,
            path: "/a/b?c=d".into()
        }
    );
    let sent = String::from_utf8(http::origin_head(&h)).expect("utf-8");
    assert_eq!(
        sent,
        "GET /a/b?c=d HTTP/1.1\r\nHost: 10.0.0.1:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let h = http::parse_head(b"GET http://example.com HTTP/1.0").expect("no path");
    let sent = String::from_utf8(http::origin_head(&h)).expect("utf-8");
    assert!(
        sent.starts_with("GET / HTTP/1.0\r\nHost: example.com\r\n"),
        "{sent}"
    );
}

#[test]
fn bad_proxy_requests_are_refused_with_a_status() {
    for (head, status) in [
        (&b"GET /local HTTP/1.1"[..], 400),
        (b"GET https://example.com/ HTTP/1.1", 400),
        (b"CONNECT example.com HTTP/1.1", 400),
        (b"CONNECT example.com:0 HTTP/1.1", 400),
        (b"CONNECT exa mple.com:443 HTTP/1.1", 400),
        (b"CONNECT a/b:443 HTTP/1.1", 400),
        (b"GET http://user:pw@example.com/ HTTP/1.1", 400),
        (b"GET http://example.com/ HTTP/2.0", 505),
        (b"get http://example.com/ HTTP/1.1", 400),
        (b"GET http://example.com/ HTTP/1.1\r\nNo colon", 400),
        (b"GET http://example.com/ HTTP/1.1\r\nBad Name: x", 400),
        (b"\xff\xfe", 400),
    ] {
        let got = http::parse_head(head).expect_err(&String::from_utf8_lossy(head));
        assert_eq!(
            got.0,
            status,
            "{}: {}",
            String::from_utf8_lossy(head),
            got.1
        );
    }
    let many: String = (0..200).map(|i| format!("\r\nX-{i}: y")).collect();
    let head = format!("GET http://example.com/ HTTP/1.1{many}");
    assert_eq!(http::parse_head(head.as_bytes()).expect_err("many").0, 431);
}

#[test]
fn heads_are_bounded_in_size_and_time() {
    let long = vec![b'a'; MAX_HEAD + 10];
    let far = Instant::now() + Duration::from_secs(60);
    assert_eq!(
        http::read_head(&mut &long[..], far).expect_err("long").0,
        431
    );
    let cut = b"CONNECT x:1 HTTP/1.1\r\n";
    assert_eq!(http::read_head(&mut &cut[..], far).expect_err("cut").0, 400);
    let past = Instant::now();
    assert_eq!(
        http::read_head(&mut &cut[..], past).expect_err("late").0,
        408
    );
    let (head, rest) = http::read_head(
        &mut &b"CONNECT x:1 HTTP/1.1\r\nA: b\r\n\r\n\x16\x03\x01"[..],
        far,
    )
    .expect("head");
    assert_eq!(head, b"CONNECT x:1 HTTP/1.1\r\nA: b");
    assert_eq!(rest, b"\x16\x03\x01");
}

#[test]
fn refusals_read_as_plain_text() {
    let mut out = Vec::new();
    http::write_error(&mut out, 403, "airlock: denied by default").expect("write");
    let text = String::from_utf8(out).expect("utf-8");
    assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
    assert!(
        text.ends_with("\r\n\r\nairlock: denied by default\n"),
        "{text}"
    );
    assert!(text.contains("content-length: 27\r\n"), "{text}");
}

#[test]
fn socks_handshakes_parse_and_malformed_ones_fail() {
    let mut out = Vec::new();
    let mut greeting = vec![5, 1, 0, 5, 1, 0, 3, 11];
    greeting.extend_from_slice(b"example.com");
    greeting.extend_from_slice(&443u16.to_be_bytes());
    assert_eq!(
        socks::handshake(&mut &greeting[..], &mut out),
        Ok(("example.com".into(), 443))
    );
    assert_eq!(out, [5, 0]);
    let v4 = [5, 2, 2, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80];
    assert_eq!(
        socks::handshake(&mut &v4[..], &mut Vec::new()),
        Ok(("127.0.0.1".into(), 80))
    );
    let mut v6 = vec![5, 1, 0, 5, 1, 0, 4];
    v6.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    v6.extend_from_slice(&[0, 22]);
    assert_eq!(
        socks::handshake(&mut &v6[..], &mut Vec::new()),
        Ok(("::1".into(), 22))
    );
    // Username/password only: no acceptable method.
    let mut out = Vec::new();
    let err = socks::handshake(&mut &[5u8, 1, 2][..], &mut out).expect_err("auth");
    assert_eq!((out, err.0), (vec![5, 0xff], None));
    for (bytes, code) in [
        (&[4u8, 1, 0][..], None),
        (
            &[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80][..],
            Some(socks::COMMAND_NOT_SUPPORTED),
        ),
        (
            &[5, 1, 0, 5, 1, 0, 9][..],
            Some(socks::ADDRESS_NOT_SUPPORTED),
        ),
        (
            &[5, 1, 0, 5, 1, 0, 3, 3, b'a', b'/', b'b', 0, 80][..],
            Some(socks::ADDRESS_NOT_SUPPORTED),
        ),
        (
            &[5, 1, 0, 5, 1, 0, 1, 1, 2, 3, 4, 0, 0][..],
            Some(socks::GENERAL_FAILURE),
        ),
        (&[5, 1, 0, 5, 1][..], None),
        (&[5][..], None),
    ] {
        let err = socks::handshake(&mut &bytes[..], &mut Vec::new()).expect_err("bad");
        assert_eq!(err.0, code, "{bytes:?}: {}", err.1);
    }
}

#[test]
fn host_ports_and_the_agent_env() {
    let p = HostPorts::parse("10255,8080,x,0,3128,8080,1080,8088,65535");
    assert_eq!(p.as_slice(), [10255, 8080, 65535]);
    let many: Vec<String> = (1..100).map(|i| (i + 2000).to_string()).collect();
    assert_eq!(
        HostPorts::parse(&many.join(",")).as_slice().len(),
        MAX_HOST_PORTS
    );
    let env = agent_env(&[("HTTPS_PROXY".into(), "http://mine:1".into())]);
    // Neither case of the user's variable is set by default: the other
    // case would shadow it.
    assert!(env
        .iter()
        .all(|(n, _)| !n.eq_ignore_ascii_case("HTTPS_PROXY")));
    assert!(env.contains(&("http_proxy".into(), "http://127.0.0.1:3128".into())));
    assert!(env.contains(&("HTTP_PROXY".into(), "http://127.0.0.1:3128".into())));
    assert!(env.contains(&("ALL_PROXY".into(), "http://127.0.0.1:3128".into())));
    assert!(env.contains(&("NO_PROXY".into(), "localhost,127.0.0.1".into())));
}
