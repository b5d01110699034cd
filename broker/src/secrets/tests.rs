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
