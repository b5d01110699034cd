//! The in-guest egress proxy's request head (guest-init/src/egress/head.rs):
//! arbitrary bytes as what an agent sends to 127.0.0.1:3128. Reading must
//! stay within MAX_HEAD and never panic; a head the parser accepts must
//! name a destination the egress door's own check accepts (so the guest
//! never sends the host a name it refuses), and the head sent on for plain
//! HTTP must be one request in origin form: one request line, no CR or LF
//! inside a line, no proxy or hop-by-hop header, `Connection: close` last.

#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;

#[path = "../../guest-init/src/egress/head.rs"]
#[allow(dead_code)]
mod head;

fuzz_target!(|data: &[u8]| {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (h, rest) = match head::read_head(&mut &data[..], deadline) {
        Ok(x) => x,
        Err((status, message)) => {
            assert!((400..600).contains(&status), "{status}");
            assert!(message.starts_with("airlock proxy"), "{message}");
            return;
        }
    };
    assert!(h.len() <= head::MAX_HEAD + 4, "{}", h.len());
    assert!(h.len() + rest.len() + 4 <= data.len());
    let Ok(parsed) = head::parse_head(&h) else {
        return;
    };
    let (host, port) = match &parsed.target {
        head::Target::Connect { host, port } | head::Target::Http { host, port, .. } => {
            (host.clone(), *port)
        }
    };
    assert!(port != 0);
    airlock_protocol::egress::check_name(&host).expect("a name the door takes");
    if let head::Target::Http { path, .. } = &parsed.target {
        assert!(path.starts_with('/'), "{path}");
        let sent = String::from_utf8(head::origin_head(&parsed)).expect("UTF-8");
        let (lines, tail) = sent.split_once("\r\n\r\n").expect("an end");
        assert!(tail.is_empty());
        let mut lines = lines.split("\r\n");
        let first = lines.next().expect("a request line");
        assert_eq!(first.split(' ').count(), 3, "{first}");
        let mut last = "";
        for line in lines {
            assert!(!line.contains('\r') && !line.contains('\n') && !line.contains('\0'));
            let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
            assert!(
                !name.starts_with("proxy-") && name != "keep-alive" && name != "upgrade",
                "{line}"
            );
            last = line;
        }
        assert_eq!(last, "Connection: close");
    }
});
