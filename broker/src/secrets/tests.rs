use super::config::{self, Format, HostPattern};
use super::http::{base64_decode, parse_head};
use super::intercept::rewrite;
use super::*;

fn flags(secrets: &[&str], binds: &[&str]) -> Flags {
    let s: Vec<String> = secrets.iter().map(|s| (*s).to_owned()).collect();
    let b: Vec<String> = binds.iter().map(|s| (*s).to_owned()).collect();
    config::parse(&s, &[], &b, None).expect("flags")
}

fn env(name: &str) -> Option<String> {
    match name {
        "GH" => Some("ghp_realvalue123".into()),
        "API" => Some("api-real-value-9".into()),
        _ => None,
    }
}

fn secrets(binds: &[&str]) -> Secrets {
    Secrets::new(flags(&["GH=env:GH", "API=env:API"], binds), &env).expect("secrets")
}

fn head(text: &str) -> super::http::Head {
    parse_head(text.trim_end().replace('\n', "\r\n").as_bytes()).expect("head")
}

fn ph(s: &Secrets, name: &str) -> String {
    s.entry(name).expect("entry").placeholder.clone()
}

#[test]
fn flags_are_checked() {
    for (secret, bind, want) in [
        ("1X=env:A", None, "the name must be"),
        ("X=foo:bar", None, "the source is env:VAR"),
        ("X=env:", None, "the source is"),
        ("X", None, "expected NAME=env:VAR"),
        ("X=env:A", Some("Y=host"), "no --secret Y"),
        ("X=env:A", Some("X=@nosuch"), "no preset \"nosuch\""),
        ("X=env:A", Some("X=bad host"), "not a host name"),
        ("X=env:A", Some("X=h:header=Host"), "frames the request"),
        ("X=env:A", Some("X=h:wat"), "unknown option"),
        ("X=env:A", Some("X=h:header=a:basic="), "basic=USER"),
    ] {
        let binds: Vec<String> = bind.iter().map(|b| (*b).to_owned()).collect();
        let e = config::parse(&[secret.to_owned()], &[], &binds, None).expect_err(secret);
        assert!(e.contains(want), "{secret} {bind:?}: {e}");
    }
    let f = flags(
        &["GH=env:GH"],
        &[
            "GH=@github",
            "GH=*.Example.COM,localhost:header=X-Token:bearer:url",
        ],
    );
    assert!(f.binds[0]
        .hosts
        .contains(&HostPattern::Name("api.github.com".into())));
    assert_eq!(
        f.binds[0].header,
        Some((
            "authorization".into(),
            Format::Basic("x-access-token".into())
        ))
    );
    let b = &f.binds[1];
    assert_eq!(
        b.hosts,
        vec![
            HostPattern::Below("example.com".into()),
            HostPattern::Name("localhost".into())
        ]
    );
    assert_eq!(b.header, Some(("x-token".into(), Format::Bearer)));
    assert!(b.url);
    assert!(b.hosts[0].matches("a.example.com") && !b.hosts[0].matches("example.com"));
    assert!(!b.hosts[0].matches("a.example.com.evil"));
    let e = Secrets::new(flags(&["X=env:UNSET_FOR_TEST"], &[]), &env).expect_err("unset");
    assert!(e.contains("--secret X: env:UNSET_FOR_TEST"), "{e}");
}

#[test]
fn placeholders_are_random_and_the_guest_gets_only_them() {
    let a = secrets(&["GH=localhost"]);
    let b = secrets(&["GH=localhost"]);
    assert_ne!(ph(&a, "GH"), ph(&b, "GH"));
    assert!(ph(&a, "GH").starts_with(PLACEHOLDER_PREFIX) && ph(&a, "GH").len() == 43);
    let env = a.guest_env();
    let text = format!("{env:?}");
    assert!(!text.contains("ghp_realvalue123") && !text.contains("api-real-value-9"));
    assert!(env.contains(&("AIRLOCK_SECRET_GH".into(), ph(&a, "GH"))));
    assert!(env.contains(&("SSL_CERT_FILE".into(), GUEST_BUNDLE.into())));
    let bundle = std::fs::read_to_string(a.bundle_file().expect("bundle")).expect("read");
    assert!(bundle.contains(a.ca.as_ref().expect("ca").pem()));
    assert!(bundle.matches("BEGIN CERTIFICATE").count() > 100);
    let fields = a.fields().to_string();
    assert!(!fields.contains("ghp_realvalue123") && !fields.contains(&ph(&a, "GH")));
    let dir = a.bundle_file().expect("bundle");
    drop(a);
    assert!(!dir.exists(), "the bundle is removed with the sandbox");
}

#[test]
fn values_go_only_where_bound() {
    let s = secrets(&["GH=localhost", "API=api.example:header=x-api-key"]);
    let gh = ph(&s, "GH");
    let api = ph(&s, "API");
    // Bearer and Basic credentials: replaced.
    let (h, used, _) = rewrite(
        &s,
        "localhost",
        8443,
        &head(&format!("GET /x?q={gh} HTTP/1.1\nHost: localhost:8443\nAuthorization: Bearer {gh}\nAccept-Encoding: gzip\n")),
    )
    .expect("bound");
    assert_eq!(
        h.values("authorization").next(),
        Some("Bearer ghp_realvalue123")
    );
    assert_eq!(
        h.target,
        format!("/x?q={gh}"),
        "the query is not replaced without :url"
    );
    assert_eq!(
        h.values("accept-encoding").collect::<Vec<_>>(),
        ["identity"]
    );
    assert_eq!(used.len(), 1);
    let basic = super::http::base64_encode(format!("x-access-token:{gh}").as_bytes());
    let (h, _, _) = rewrite(
        &s,
        "LOCALHOST",
        443,
        &head(&format!(
            "GET / HTTP/1.1\nHost: localhost\nAuthorization: basic {basic}\n"
        )),
    )
    .expect("basic");
    let sent = h.values("authorization").next().expect("auth");
    let decoded = base64_decode(sent.strip_prefix("Basic ").expect("Basic")).expect("b64");
    assert_eq!(decoded, b"x-access-token:ghp_realvalue123");
    // Another secret's placeholder to this host: refused.
    let e = rewrite(
        &s,
        "localhost",
        443,
        &head(&format!("GET / HTTP/1.1\nHost: localhost\nX-Key: {api}\n")),
    )
    .expect_err("other");
    assert_eq!(
        (e.status, e.reason, e.secret.as_deref()),
        (403, "placeholder_for_other_host", Some("API"))
    );
    // The Host must be the connection's.
    for host in ["evil.example", "localhost:1", "localhost.evil"] {
        let e = rewrite(
            &s,
            "localhost",
            443,
            &head(&format!("GET / HTTP/1.1\nHost: {host}\n")),
        )
        .expect_err(host);
        assert_eq!(e.reason, "host_mismatch");
    }
    let e = rewrite(
        &s,
        "localhost",
        443,
        &head("GET / HTTP/1.1\nHost: localhost\nHost: localhost\n"),
    )
    .expect_err("two hosts");
    assert_eq!(e.reason, "host_mismatch");
    // Case tricks do not make a placeholder.
    let upper = gh.to_ascii_uppercase();
    let (h, used, _) = rewrite(
        &s,
        "localhost",
        443,
        &head(&format!(
            "GET / HTTP/1.1\nHost: localhost\nAuthorization: Bearer {upper}\n"
        )),
    )
    .expect("upper");
    assert_eq!(
        h.values("authorization").next(),
        Some(format!("Bearer {upper}").as_str())
    );
    assert!(used.is_empty());
    // A set header replaces the client's.
    let (h, used, _) = rewrite(
        &s,
        "api.example",
        443,
        &head("POST /v1 HTTP/1.1\nHost: api.example\nX-API-Key: mine\n"),
    )
    .expect("set");
    assert_eq!(
        h.values("x-api-key").collect::<Vec<_>>(),
        ["api-real-value-9"]
    );
    assert_eq!(used[0].secret, "API");
    // Only headers that carry credentials get the value: elsewhere the
    // placeholder stays (a server may store or show those).
    let (h, used, _) = rewrite(
        &s,
        "localhost",
        443,
        &head(&format!(
            "POST / HTTP/1.1\nHost: localhost\nContent-Type: text/{gh}\nX-Private-Token: {gh}\n"
        )),
    )
    .expect("headers");
    assert_eq!(
        h.values("content-type").next(),
        Some(format!("text/{gh}").as_str())
    );
    assert_eq!(h.values("x-private-token").next(), Some("ghp_realvalue123"));
    assert_eq!(used.len(), 1);
    // ... but another secret's placeholder there is still refused.
    let e = rewrite(
        &s,
        "localhost",
        443,
        &head(&format!(
            "GET / HTTP/1.1\nHost: localhost\nUser-Agent: {api}\n"
        )),
    )
    .expect_err("other in a plain header");
    assert_eq!(e.reason, "placeholder_for_other_host");
    // Origin-form only: an absolute-form target names its own authority.
    for line in [
        "GET https://other.example/ HTTP/1.1",
        "CONNECT other.example:443 HTTP/1.1",
        "GET other HTTP/1.1",
    ] {
        let e = rewrite(
            &s,
            "localhost",
            443,
            &head(&format!("{line}\nHost: localhost\n")),
        )
        .expect_err(line);
        assert_eq!((e.status, e.reason), (400, "bad_request"), "{line}");
    }
    // A head that the values would blow up is refused before it is built.
    let big = Secrets::new(
        config::parse(
            &["BIG=env:BIG".to_owned()],
            &[],
            &["BIG=localhost".to_owned()],
            None,
        )
        .expect("flags"),
        &|n| (n == "BIG").then(|| "v".repeat(10_000)),
    )
    .expect("big");
    let many = format!("Authorization: {}\n", ph(&big, "BIG").repeat(20));
    let e = rewrite(
        &big,
        "localhost",
        443,
        &head(&format!("GET / HTTP/1.1\nHost: localhost\n{many}")),
    )
    .map(|_| ())
    .expect_err("big");
    assert_eq!(e.status, 431);
}

#[test]
fn presets_set_their_headers() {
    let s = Secrets::new(
        flags(&["A=env:A", "G=env:G"], &["A=@anthropic", "G=@github"]),
        &|n| match n {
            "A" => Some("sk-ant-oat01-token".into()),
            "G" => Some("ghs_x".into()),
            _ => None,
        },
    )
    .expect("secrets");
    let (h, _, _) = rewrite(
        &s,
        "api.anthropic.com",
        443,
        &head("POST /v1/messages HTTP/1.1\nHost: api.anthropic.com\nx-api-key: whatever\n"),
    )
    .expect("anthropic");
    assert_eq!(
        h.values("authorization").next(),
        Some("Bearer sk-ant-oat01-token")
    );
    assert_eq!(h.values("x-api-key").count(), 0);
    let (h, _, _) = rewrite(
        &s,
        "api.github.com",
        443,
        &head("GET /user HTTP/1.1\nHost: api.github.com\n"),
    )
    .expect("github");
    let sent = h.values("authorization").next().expect("auth");
    assert_eq!(
        base64_decode(sent.strip_prefix("Basic ").expect("basic")).expect("b64"),
        b"x-access-token:ghs_x"
    );
}

#[test]
fn a_cmd_source_is_fetched_again_when_it_expires() {
    let dir = std::env::temp_dir().join(format!("airlock-secret-cmd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let counter = dir.join("n");
    let cmd = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; \
         printf '{{\"value\": \"tok-%s\", \"expires_in\": 1}}' $n",
        c = counter.display()
    );
    let c = source::Cached::new(config::Source::Cmd(cmd), &env).expect("first");
    assert_eq!(c.get().expect("get").0.expose(), "tok-1");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (v, fresh) = c.get().expect("again");
    assert_eq!((v.expose(), fresh), ("tok-2", true));
    assert_eq!(c.seen().len(), 2);
    for (cmd, want) in [
        ("exit 3", "exited with"),
        ("printf 'a\\nb\\nc'", "control character"),
        ("echo '{\"value\": 1}'", "no string \"value\""),
        ("echo airlock-ph-00", "placeholder"),
    ] {
        let e = source::Cached::new(config::Source::Cmd(cmd.into()), &env).expect_err(cmd);
        assert!(e.contains(want), "{cmd}: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_placeholder_is_found_wherever_it_is() {
    let s = secrets(&[]);
    let gh = ph(&s, "GH");
    let data = format!("POST / HTTP/1.1\r\n\r\nbody airlock-ph-nothing {gh} end");
    assert_eq!(
        s.placeholder_in(data.as_bytes())
            .map(|e| e.spec.name.as_str()),
        Some("GH")
    );
    assert!(s.placeholder_in(b"airlock-ph-").is_none());
    assert!(s
        .placeholder_in(gh.to_ascii_uppercase().as_bytes())
        .is_none());
}

/// The whole interception in process: a TLS server for `localhost`
/// signed by a test CA (it answers each request with the headers it got:
/// a reflecting server), the door with GH bound to localhost, and the
/// agent's side played over a socket pair with a TLS client that trusts
/// only the sandbox's CA.
mod relay {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};

    use airlock_protocol::egress::{Kind, Reply, Request, Status};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

    use super::*;
    use crate::audit::log::{Memory, TEST_LIMITS};
    use crate::egress::{policy, Door, Settings};

    /// The `Content-Length` of a head (0 without one).
    fn content_length(head: &str) -> usize {
        head.lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or(0)
    }

    struct Bed {
        door: Arc<Door>,
        memory: Memory,
        port: u16,
        seen: Arc<Mutex<Vec<String>>>,
        secrets: Arc<Secrets>,
        _dir: std::path::PathBuf,
    }

    fn server(seen: Arc<Mutex<Vec<String>>>) -> (u16, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("sign");
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("cert"),
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(tcp) = conn else { return };
                let config = Arc::clone(&config);
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || {
                    let tls = rustls::ServerConnection::new(config).expect("conn");
                    let mut s = BufReader::new(rustls::StreamOwned::new(tls, tcp));
                    loop {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            if s.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            head.push_str(&line);
                        }
                        let len = content_length(&head);
                        let mut body = vec![0; len];
                        s.read_exact(&mut body).expect("body");
                        seen.lock().expect("lock").push(head.clone());
                        let answer = format!("you sent:\n{head}");
                        let out = if head.starts_with("GET /chunked") {
                            // Small chunks: the value is cut by the framing.
                            let mut out =
                                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned();
                            for piece in answer.as_bytes().chunks(7) {
                                out.push_str(&format!(
                                    "{:x}\r\n{}\r\n",
                                    piece.len(),
                                    String::from_utf8_lossy(piece)
                                ));
                            }
                            out + "0\r\n\r\n"
                        } else {
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                                answer.len()
                            )
                        };
                        let w = s.get_mut();
                        w.write_all(out.as_bytes()).expect("answer");
                        w.flush().expect("flush");
                    }
                });
            }
        });
        (port, ca.pem())
    }

    fn bed(test: &str) -> Bed {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (port, ca_pem) = server(Arc::clone(&seen));
        let dir = std::env::temp_dir().join(format!("airlock-relay-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, ca_pem).expect("write");
        let flags = config::parse(
            &["GH=env:GH".to_owned(), "API=env:API".to_owned()],
            &[],
            &["GH=localhost".to_owned()],
            Some(&ca_file),
        )
        .expect("flags");
        let secrets = Arc::new(Secrets::new(flags, &env).expect("secrets"));
        let settings = Settings {
            policy: crate::egress::Policy {
                rules: vec![policy::parse_rule(
                    &format!("localhost:{port}"),
                    policy::Action::Allow,
                    "--net-allow",
                )
                .expect("rule")],
                host_ports: Vec::new(),
            },
            secrets: Some(Arc::clone(&secrets)),
            ..Settings::default()
        };
        let (log, memory) = crate::audit::AuditLog::memory(TEST_LIMITS, None);
        Bed {
            door: Arc::new(Door::new(settings, log)),
            memory,
            port,
            seen,
            secrets,
            _dir: dir,
        }
    }

    /// A tunnel to localhost through the door: the agent's end.
    fn tunnel(bed: &Bed) -> UnixStream {
        let (guest, host) = UnixStream::pair().expect("pair");
        let door = Arc::clone(&bed.door);
        std::thread::spawn(move || crate::egress::tunnel::serve(&door, 1, &host));
        let req = Request {
            kind: Kind::Connect,
            name: "localhost".into(),
            port: bed.port,
        };
        (&guest)
            .write_all(&req.encode().expect("encode"))
            .expect("request");
        let reply = Reply::read(&mut &guest)
            .expect("reply")
            .expect("well-formed");
        assert_eq!(reply.status, Status::Ok, "{}", reply.message);
        guest
    }

    fn agent_tls(
        bed: &Bed,
        sni: &str,
        guest: UnixStream,
    ) -> rustls::StreamOwned<rustls::ClientConnection, UnixStream> {
        let mut roots = rustls::RootCertStore::empty();
        let pem = bed.secrets.ca.as_ref().expect("ca").pem().to_owned();
        let der = super::super::http::base64_decode(
            &pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .expect("der");
        roots.add(CertificateDer::from(der)).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from(sni.to_owned()).expect("name"),
        )
        .expect("conn");
        rustls::StreamOwned::new(conn, guest)
    }

    /// Sends `req` and reads one answer (head and Content-Length body).
    fn exchange(s: &mut (impl Read + Write), req: &str) -> String {
        s.write_all(req.as_bytes()).expect("send");
        s.flush().expect("flush");
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).unwrap_or(0) == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let len = content_length(&head);
        let mut body = vec![0; len];
        s.read_exact(&mut body).expect("body");
        format!("{head}{}", String::from_utf8_lossy(&body))
    }

    #[test]
    fn values_reach_the_bound_host_and_never_come_back() {
        let bed = bed("values");
        let gh = ph(&bed.secrets, "GH");
        let api = ph(&bed.secrets, "API");
        let basic = super::super::http::base64_encode(format!("x-access-token:{gh}").as_bytes());
        let real_basic = super::super::http::base64_encode(b"x-access-token:ghp_realvalue123");
        let host = format!("localhost:{}", bed.port);
        let mut tls = agent_tls(&bed, "localhost", tunnel(&bed));
        // Requests on one kept-alive connection, each answer reflecting
        // what the server got.
        let a = exchange(
            &mut tls,
            &format!("GET /a HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {gh}\r\n\r\n"),
        );
        let other_user = super::super::http::base64_encode(format!("someone:{gh}").as_bytes());
        let real_other = super::super::http::base64_encode(b"someone:ghp_realvalue123");
        let o = exchange(
            &mut tls,
            &format!(
                "GET /o HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {other_user}\r\n\r\n"
            ),
        );
        assert!(
            o.starts_with("HTTP/1.1 200") && !o.contains(&real_other),
            "{o}"
        );
        let b = exchange(
            &mut tls,
            &format!(
                "POST /b?t={gh} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Basic {basic}\r\n\
                 Content-Length: 3\r\n\r\nabc"
            ),
        );
        for answer in [&a, &b] {
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(!answer.contains("ghp_realvalue123"), "{answer}");
            assert!(!answer.contains(&real_basic), "{answer}");
            assert!(answer.contains("AIRLOCK-SCRUBBED"), "{answer}");
        }
        // Another secret's placeholder: refused, never sent.
        let c = exchange(
            &mut tls,
            &format!("GET /c HTTP/1.1\r\nHost: {host}\r\nX-Other: {api}\r\n\r\n"),
        );
        assert!(
            c.starts_with("HTTP/1.1 403") && c.contains("secret API"),
            "{c}"
        );
        let seen = bed.seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(
            seen[1].contains(&format!("Authorization: Basic {real_other}")),
            "{seen:?}"
        );
        let seen: Vec<String> = [seen[0].clone(), seen[2].clone()].into();
        assert!(
            seen[0].contains("Authorization: Bearer ghp_realvalue123"),
            "{seen:?}"
        );
        assert!(
            seen[1].contains(&format!("Authorization: Basic {real_basic}")),
            "{seen:?}"
        );
        assert!(
            seen[1].contains(&format!("POST /b?t={gh} ")),
            "the query keeps the placeholder"
        );
        assert!(seen
            .iter()
            .all(|h| !h.contains(&api) && h.contains("Accept-Encoding: identity")));
        let used = bed.memory.fields_of("secret.used");
        assert_eq!(used.len(), 3, "{used:?}");
        assert_eq!(used[0]["name"], "GH");
        assert_eq!(used[0]["host"], "localhost");
        let refused = bed.memory.fields_of("secret.refused");
        assert_eq!(
            refused[0]["reason"], "placeholder_for_other_host",
            "{refused:?}"
        );
        assert_eq!(refused[0]["name"], "API");
        let all = String::from_utf8(bed.memory.bytes()).expect("utf-8");
        assert!(!all.contains("ghp_realvalue123") && !all.contains("api-real-value-9"));
    }

    #[test]
    fn secret_records_stop_at_their_cap_and_are_counted() {
        use std::sync::atomic::Ordering;
        let bed = bed("cap");
        let gh = ph(&bed.secrets, "GH");
        let host = format!("localhost:{}", bed.port);
        bed.door
            .secret_used
            .store(crate::egress::MAX_SECRET_USED_RECORDS - 1, Ordering::SeqCst);
        let mut tls = agent_tls(&bed, "localhost", tunnel(&bed));
        for _ in 0..3 {
            let a = exchange(
                &mut tls,
                &format!("GET / HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {gh}\r\n\r\n"),
            );
            assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        }
        assert_eq!(bed.memory.fields_of("secret.used").len(), 1);
        assert_eq!(
            bed.door.secret_used.load(Ordering::SeqCst),
            crate::egress::MAX_SECRET_USED_RECORDS + 2
        );
        assert_eq!(
            bed.seen.lock().expect("lock").len(),
            3,
            "every request still served"
        );
    }

    #[test]
    fn a_value_cut_by_the_servers_chunks_is_still_masked() {
        let bed = bed("chunked");
        let gh = ph(&bed.secrets, "GH");
        let host = format!("localhost:{}", bed.port);
        let mut tls = agent_tls(&bed, "localhost", tunnel(&bed));
        tls.write_all(
            format!("GET /chunked HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {gh}\r\n\r\n")
                .as_bytes(),
        )
        .expect("send");
        tls.flush().expect("flush");
        // Read up to the last chunk.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"0\r\n\r\n") {
            let n = tls.read(&mut buf).expect("read");
            assert!(n > 0, "{}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        let (_, body) = text.split_once("\r\n\r\n").expect("head");
        // The body as the agent's client reads it: chunks joined.
        let joined =
            String::from_utf8(super::super::answer::dechunk(body.as_bytes())).expect("utf-8");
        assert!(joined.contains("Bearer AIRLOCK-SCRUBBED"), "{joined}");
        assert!(!joined.contains("ghp_real"), "{joined}");
        assert!(bed.seen.lock().expect("lock")[0].contains("Bearer ghp_realvalue123"));
    }

    #[test]
    fn an_agent_that_half_closes_still_gets_its_answer() {
        let bed = bed("half");
        let gh = ph(&bed.secrets, "GH");
        let host = format!("localhost:{}", bed.port);
        let mut tls = agent_tls(&bed, "localhost", tunnel(&bed));
        tls.write_all(
            format!("GET /h HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {gh}\r\n\r\n")
                .as_bytes(),
        )
        .expect("send");
        tls.conn.send_close_notify();
        tls.flush().expect("flush");
        tls.sock
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        tls.sock
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("AIRLOCK-SCRUBBED"),
            "{answer}"
        );
    }

    #[test]
    fn a_request_for_another_host_and_http2_are_refused() {
        let bed = bed("refusals");
        let mut tls = agent_tls(&bed, "localhost", tunnel(&bed));
        let a = exchange(&mut tls, "GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n");
        assert!(
            a.starts_with("HTTP/1.1 403") && a.contains("evil.example"),
            "{a}"
        );
        let mut tls = agent_tls(&bed, "localhost", tunnel(&bed));
        let b = exchange(&mut tls, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert!(b.starts_with("HTTP/1.1 505"), "{b}");
        assert!(bed.seen.lock().expect("lock").is_empty());
        let reasons: Vec<String> = bed
            .memory
            .fields_of("secret.refused")
            .iter()
            .map(|r| r["reason"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(reasons, ["host_mismatch", "http2"]);
    }

    #[test]
    fn a_placeholder_in_clear_text_is_cut_off_before_it_leaves() {
        let bed = bed("clear");
        let gh = ph(&bed.secrets, "GH");
        // A plain TCP listener, allowed but not bound.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let got = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all);
            all
        });
        let mut settings = bed.door.settings.clone();
        settings.policy.rules.push(
            policy::parse_rule(
                &format!("127.0.0.1:{port}"),
                policy::Action::Allow,
                "--net-allow",
            )
            .expect("rule"),
        );
        let (log, memory) = crate::audit::AuditLog::memory(TEST_LIMITS, None);
        let door = Arc::new(Door::new(settings, log));
        let (guest, host) = UnixStream::pair().expect("pair");
        let d = Arc::clone(&door);
        let t = std::thread::spawn(move || crate::egress::tunnel::serve(&d, 1, &host));
        let req = Request {
            kind: Kind::Http,
            name: "127.0.0.1".into(),
            port,
        };
        (&guest)
            .write_all(&req.encode().expect("encode"))
            .expect("request");
        let reply = Reply::read(&mut &guest)
            .expect("reply")
            .expect("well-formed");
        assert_eq!(reply.status, Status::Ok);
        // The placeholder split across two writes.
        let text = format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gh}\r\n\r\n");
        let (first, second) = text.split_at(text.len() - 20);
        (&guest).write_all(first.as_bytes()).expect("write");
        std::thread::sleep(std::time::Duration::from_millis(20));
        (&guest).write_all(second.as_bytes()).expect("write");
        let mut answer = String::new();
        let _ = (&guest).read_to_string(&mut answer);
        t.join().expect("tunnel");
        assert!(
            answer.starts_with("HTTP/1.1 403") && answer.contains("secret GH"),
            "{answer}"
        );
        let sent = got.join().expect("server");
        assert!(
            !String::from_utf8_lossy(&sent).contains(&gh[..20]),
            "{}",
            String::from_utf8_lossy(&sent)
        );
        let refused = memory.fields_of("secret.refused");
        assert_eq!(
            refused[0]["reason"], "placeholder_in_clear_text",
            "{refused:?}"
        );
        assert_eq!(refused[0]["host"], "127.0.0.1");
    }
}

#[test]
fn bundles_of_processes_that_are_gone_are_reaped() {
    let base = std::env::temp_dir().join(format!("airlock-reap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let gone = base.join("airlock-ca-999999999-abc");
    let alive = base.join(format!("airlock-ca-{}-abc", std::process::id()));
    let other = base.join("not-airlock-999999999");
    for d in [&gone, &alive, &other] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    super::reap_stale(&base);
    assert!(!gone.exists() && alive.exists() && other.exists());
    let _ = std::fs::remove_dir_all(&base);
}
