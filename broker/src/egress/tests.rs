use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use airlock_protocol::egress::{Kind, Reply, Request, Status};

use super::policy::{self, Action, Decision, Policy};
use super::*;
use crate::audit::log::{Memory, TEST_LIMITS};

fn rules(allow: &[&str], deny: &[&str]) -> Policy {
    let mut p = Policy::default();
    for a in allow {
        p.rules
            .push(policy::parse_rule(a, Action::Allow, "--net-allow").expect("rule"));
    }
    for d in deny {
        p.rules
            .push(policy::parse_rule(d, Action::Deny, "--net-deny").expect("rule"));
    }
    p
}

/// A resolver that answers from a table (no DNS in tests).
fn table(
    entries: &'static [(&'static str, &'static str)],
) -> impl Fn(&str, u16) -> io::Result<Vec<SocketAddr>> {
    move |name, port| {
        let found: Vec<SocketAddr> = entries
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, a)| SocketAddr::new(a.parse::<IpAddr>().expect("ip"), port))
            .collect();
        if found.is_empty() {
            Err(io::Error::new(io::ErrorKind::NotFound, "no such name"))
        } else {
            Ok(found)
        }
    }
}

fn allowed(d: &Decision) -> Vec<String> {
    match d {
        Decision::Allow { addrs, .. } => addrs.iter().map(ToString::to_string).collect(),
        other => panic!("not allowed: {other:?}"),
    }
}

fn denied(d: &Decision) -> &str {
    match d {
        Decision::Deny { message, .. } => message,
        other => panic!("not denied: {other:?}"),
    }
}

const DNS: &[(&str, &str)] = &[
    ("example.com", "93.184.216.34"),
    ("api.example.com", "93.184.216.35"),
    ("rebind.example.com", "127.0.0.1"),
    ("meta.example.com", "169.254.169.254"),
    ("mixed.example.com", "10.1.2.3"),
    ("mixed.example.com", "93.184.216.36"),
    ("v6.example.com", "::1"),
    ("mapped.example.com", "::ffff:127.0.0.1"),
];

#[test]
fn rules_parse_and_bad_ones_are_refused_with_the_flag() {
    let ok = [
        ("example.com", policy::Ports::Web),
        ("Example.COM.:8080", policy::Ports::One(8080)),
        ("*.example.com:*", policy::Ports::Any),
        ("*", policy::Ports::Web),
        ("10.0.0.0/8:22", policy::Ports::One(22)),
        ("127.0.0.1:3000", policy::Ports::One(3000)),
        ("[::1]:443", policy::Ports::One(443)),
        ("fd00::/8", policy::Ports::Web),
    ];
    for (text, ports) in ok {
        let r = policy::parse_rule(text, Action::Allow, "--net-allow").expect(text);
        assert_eq!(r.ports, ports, "{text}");
    }
    assert_eq!(
        policy::parse_rule("Example.COM.", Action::Allow, "--net-allow")
            .expect("rule")
            .host,
        policy::Host::Name("example.com".into())
    );
    for bad in [
        "",
        "a b",
        "exa$mple.com",
        "x:0",
        "x:70000",
        "10.0.0.0/33",
        "[::1",
        "[::1]x",
        "*.",
        "a..b",
        "http://x",
    ] {
        let e = policy::parse_rule(bad, Action::Deny, "--net-deny").expect_err(bad);
        assert!(e.starts_with("--net-deny"), "{e}");
    }
    let file = "# comment\nallow example.com\n\ndeny *.evil.com:*  # trailing\n";
    let rules = policy::parse_policy_file(file, "p.txt").expect("file");
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[1].source, "p.txt:4");
    assert_eq!(rules[1].action, Action::Deny);
    let e = policy::parse_policy_file("permit x\n", "p.txt").expect_err("verb");
    assert!(e.contains("p.txt:1"), "{e}");
    assert_eq!(policy::parse_host_port("10255"), Ok((10255, 10255)));
    assert_eq!(policy::parse_host_port("8080:3000"), Ok((8080, 3000)));
    assert!(policy::parse_host_port("0").is_err());
    assert!(policy::parse_host_port("x:1").is_err());
}

#[test]
fn default_deny_and_deny_wins_with_messages_that_name_the_flag() {
    let none = Policy::default();
    let msg = denied(&none.decide_with("example.com", 443, table(DNS))).to_owned();
    assert!(msg.contains("denied by default"), "{msg}");
    assert!(msg.contains("--net-allow example.com:443"), "{msg}");

    let p = rules(&["*.example.com", "example.com"], &["api.example.com"]);
    assert_eq!(
        allowed(&p.decide_with("example.com", 443, table(DNS))),
        ["93.184.216.34:443"]
    );
    let msg = denied(&p.decide_with("api.example.com", 443, table(DNS))).to_owned();
    assert!(msg.contains("--net-deny api.example.com"), "{msg}");
    // No port: 80 and 443 only.
    denied(&p.decide_with("example.com", 22, table(DNS)));
    // *.domain is below the domain only.
    let below = rules(&["*.example.com"], &[]);
    denied(&below.decide_with("example.com", 443, table(DNS)));
    denied(&below.decide_with("notexample.com", 443, table(DNS)));
    // A deny rule naming an address applies after resolution.
    let p = rules(&["*"], &["93.184.216.0/24:*"]);
    let msg = denied(&p.decide_with("example.com", 443, table(DNS))).to_owned();
    assert!(msg.contains("resolves to 93.184.216.34"), "{msg}");
    // A name that does not resolve.
    let p = rules(&["*"], &[]);
    assert!(matches!(
        p.decide_with("nowhere.example", 443, table(DNS)),
        Decision::NoSuchHost(_)
    ));
}

#[test]
fn a_wildcard_never_opens_loopback_private_or_metadata_addresses() {
    let p = rules(&["*:*", "*.example.com:*", "0.0.0.0/0:*"], &[]);
    for (name, why) in [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "metadata"),
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "CGNAT"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fd00::1", "unique-local"),
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::7f00:1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("rebind.example.com", "loopback"),
        ("meta.example.com", "metadata"),
        ("v6.example.com", "loopback"),
        ("mapped.example.com", "loopback"),
    ] {
        let msg = denied(&p.decide_with(name, 80, table(DNS))).to_owned();
        assert!(msg.contains(why), "{name}: {msg}");
        assert!(msg.contains("--net-allow"), "{name}: {msg}");
    }
    // Of a name with public and private addresses, only the public one.
    assert_eq!(
        allowed(&p.decide_with("mixed.example.com", 80, table(DNS))),
        ["93.184.216.36:80"]
    );
    // Named explicitly: an IP, a CIDR, or the exact host.
    let p = rules(&["127.0.0.1:8080", "169.254.169.254", "10.0.0.0/8:*"], &[]);
    assert_eq!(
        allowed(&p.decide_with("127.0.0.1", 8080, table(DNS))),
        ["127.0.0.1:8080"]
    );
    denied(&p.decide_with("127.0.0.1", 8081, table(DNS)));
    allowed(&p.decide_with("169.254.169.254", 80, table(DNS)));
    allowed(&p.decide_with("10.9.9.9", 5432, table(DNS)));
    let p = rules(&["rebind.example.com:*"], &[]);
    allowed(&p.decide_with("rebind.example.com", 80, table(DNS)));
    // But a wildcard name rule plus a resolution into loopback: refused.
    let p = rules(&["*.example.com:*"], &[]);
    denied(&p.decide_with("rebind.example.com", 80, table(DNS)));
}

#[test]
fn host_names_reach_only_the_forwarded_ports() {
    let mut p = rules(&["*:*"], &[]);
    p.host_ports = vec![(10255, 10255), (8080, 3000)];
    assert_eq!(
        allowed(&p.decide_with("host.docker.internal", 10255, table(DNS))),
        ["127.0.0.1:10255"]
    );
    assert_eq!(
        allowed(&p.decide_with("HOST.AIRLOCK.INTERNAL", 8080, table(DNS))),
        ["127.0.0.1:3000"]
    );
    let msg = denied(&p.decide_with("host.docker.internal", 22, table(DNS))).to_owned();
    assert!(msg.contains("--host-port 22"), "{msg}");
    // A deny rule still wins.
    let mut p = rules(&[], &["host.docker.internal:*"]);
    p.host_ports = vec![(10255, 10255)];
    denied(&p.decide_with("host.docker.internal", 10255, table(DNS)));
}

// ---- The door, played from the guest's side ----

fn door(settings: Settings) -> (Arc<Door>, Memory) {
    let (log, memory) = crate::audit::AuditLog::memory(TEST_LIMITS, None);
    (Arc::new(Door::new(settings, log)), memory)
}

/// Opens a tunnel through `door`: the guest end, and the server thread.
fn open(door: &Arc<Door>, req: &[u8]) -> (UnixStream, std::thread::JoinHandle<()>) {
    let (guest, host) = UnixStream::pair().expect("pair");
    let d = Arc::clone(door);
    let t = std::thread::spawn(move || tunnel::serve(&d, 1, &host));
    (&guest).write_all(req).expect("request");
    (guest, t)
}

fn request(name: &str, port: u16) -> Vec<u8> {
    Request {
        kind: Kind::Connect,
        name: name.into(),
        port,
    }
    .encode()
    .expect("encode")
}

#[test]
fn a_tunnel_carries_bytes_both_ways_and_is_audited() {
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = server.local_addr().expect("addr").port();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = server.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        s.write_all(&got).expect("echo");
        s.write_all(b"!").expect("bang");
    });
    let settings = Settings {
        policy: rules(&[&format!("127.0.0.1:{port}")], &[]),
        ..Settings::default()
    };
    let (door, memory) = door(settings);
    let (mut guest, t) = open(&door, &request("127.0.0.1", port));
    let reply = Reply::read(&mut guest).expect("io").expect("reply");
    assert_eq!(reply.status, Status::Ok, "{}", reply.message);
    guest.write_all(b"hello").expect("write");
    guest
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut back = Vec::new();
    guest.read_to_end(&mut back).expect("read");
    assert_eq!(back, b"hello!");
    t.join().expect("tunnel");
    echo.join().expect("echo");
    let close = memory.fields_of("net.close");
    assert_eq!(close.len(), 1, "{close:?}");
    assert_eq!(close[0]["bytes_up"], 5);
    assert_eq!(close[0]["bytes_down"], 6);
    assert_eq!(close[0]["end"], "closed");
    let connect = memory.fields_of("net.connect");
    assert_eq!(connect[0]["address"], format!("127.0.0.1:{port}"));
    assert_eq!(connect[0]["rule"], format!("--net-allow 127.0.0.1:{port}"));
}

#[test]
fn refusals_are_answered_and_audited() {
    // A port nobody listens on (bound, then closed).
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let settings = Settings {
        policy: rules(&[&format!("127.0.0.1:{closed}")], &[]),
        ..Settings::default()
    };
    let (door, memory) = door(settings);
    for (req, status, reason) in [
        (request("example.com", 443), Status::Denied, "policy"),
        (request("127.0.0.1", 1), Status::Denied, "policy"),
        (request("127.0.0.1", closed), Status::Refused, "refused"),
        (b"xxxxxxxxxxxxxxxx".to_vec(), Status::Bad, "bad_request"),
    ] {
        let (mut guest, t) = open(&door, &req);
        let reply = Reply::read(&mut guest).expect("io").expect("reply");
        assert_eq!(reply.status, status, "{}", reply.message);
        t.join().expect("tunnel");
        let last = memory.fields_of("net.denied").pop().expect("denied");
        assert_eq!(last["reason"], reason, "{last}");
    }
    // A request that never comes whole: dropped (after REQUEST_TIMEOUT in
    // production; here the guest closes).
    let (guest, t) = open(&door, b"aegr\x01");
    drop(guest);
    t.join().expect("tunnel");
    assert_eq!(memory.fields_of("net.denied").len(), 5);
}

#[test]
fn idle_tunnels_are_closed_and_the_byte_budget_holds() {
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = server.local_addr().expect("addr").port();
    let sink = std::thread::spawn(move || {
        let mut held = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = server.accept().expect("accept");
            let _ = s.write_all(&[7u8; 1000]);
            held.push(s);
        }
        std::thread::sleep(Duration::from_secs(3));
    });
    let settings = Settings {
        policy: rules(&[&format!("127.0.0.1:{port}")], &[]),
        idle_timeout: Duration::from_millis(300),
        max_bytes: 1500,
        ..Settings::default()
    };
    let (door, memory) = door(settings);
    // The first tunnel: 1000 bytes down, then idle: closed.
    let (mut guest, t) = open(&door, &request("127.0.0.1", port));
    assert_eq!(
        Reply::read(&mut guest).expect("io").expect("reply").status,
        Status::Ok
    );
    let mut got = Vec::new();
    guest.read_to_end(&mut got).expect("read");
    assert_eq!(got.len(), 1000);
    t.join().expect("tunnel");
    // The second: 1000 more would pass the budget of 1500: cut.
    let (mut guest, t) = open(&door, &request("127.0.0.1", port));
    assert_eq!(
        Reply::read(&mut guest).expect("io").expect("reply").status,
        Status::Ok
    );
    let mut got = Vec::new();
    let _ = guest.read_to_end(&mut got);
    assert!(got.is_empty(), "{}", got.len());
    t.join().expect("tunnel");
    // And no third: the budget is spent.
    let (mut guest, t) = open(&door, &request("127.0.0.1", port));
    let reply = Reply::read(&mut guest).expect("io").expect("reply");
    assert_eq!(reply.status, Status::Limit);
    assert!(
        reply.message.contains("--net-max-bytes"),
        "{}",
        reply.message
    );
    t.join().expect("tunnel");
    let ends: Vec<_> = memory
        .fields_of("net.close")
        .iter()
        .map(|r| r["end"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(ends, ["idle_timeout", "byte_limit"]);
    sink.join().expect("sink");
}
