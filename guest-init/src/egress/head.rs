//! The proxy's request head: read within bounds ([`read_head`]) and
//! parsed ([`parse_head`]) into where it goes and what is sent on
//! ([`origin_head`]). Pure: no sockets of its own, no crate-internal
//! dependencies, so that the fuzz target `proxy_request` compiles this
//! file as it is.

use std::io::{self, Read};
use std::time::Instant;

use airlock_protocol::egress::check_name;

/// Largest HTTP request head.
pub const MAX_HEAD: usize = 16 * 1024;

/// Headers that belong to one hop (RFC 9110 7.6.1) and the proxy's own.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// Most header lines in a head.
const MAX_HEADERS: usize = 100;

/// Where a proxy request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `CONNECT host:port`.
    Connect { host: String, port: u16 },
    /// `METHOD http://host[:port]/path`: `path` in origin form.
    Http {
        host: String,
        port: u16,
        path: String,
    },
}

/// A parsed proxy request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHead {
    pub method: String,
    pub target: Target,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
    /// The end-to-end headers, in order (hop-by-hop ones dropped).
    pub headers: Vec<(String, String)>,
}

/// A refusal: status and a plain-text reason.
pub type Refused = (u16, String);

fn bad(why: impl Into<String>) -> Refused {
    (400, format!("airlock proxy: {}", why.into()))
}

/// Splits `host:port` (`[v6]:port`; `default` when no port), checking the
/// name as the egress door will.
pub fn split_authority(auth: &str, default: Option<u16>) -> Result<(String, u16), Refused> {
    let (host, port) = if let Some(rest) = auth.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 host needs its ]"))?;
        (h, after.strip_prefix(':'))
    } else {
        match auth.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (auth, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(format!("bad port in {auth:?}")))?,
        None => default.ok_or_else(|| bad(format!("CONNECT needs host:port, not {auth:?}")))?,
    };
    check_name(host).map_err(|_| bad(format!("bad host name {host:?}")))?;
    Ok((host.to_owned(), port))
}

/// Parses a request head (without its final empty line).
pub fn parse_head(head: &[u8]) -> Result<ProxyHead, Refused> {
    let text = std::str::from_utf8(head).map_err(|_| bad("the request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("a request line is METHOD TARGET HTTP/1.1"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-') {
        return Err(bad("bad method"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err((505, "airlock proxy: HTTP/1.0 and HTTP/1.1 only".into()));
    }
    let target = if method == "CONNECT" {
        let (host, port) = split_authority(target, None)?;
        Target::Connect { host, port }
    } else if let Some(rest) = target.strip_prefix("http://") {
        let (auth, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if auth.contains('@') {
            return Err(bad("user information in the URL is not passed on"));
        }
        let (host, port) = split_authority(auth, Some(80))?;
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad("bad path"));
        }
        Target::Http { host, port, path }
    } else if target.starts_with("https://") {
        return Err(bad(
            "an https:// URL goes through CONNECT (set HTTPS_PROXY, not a plain request)",
        ));
    } else {
        return Err(bad(
            "this is the sandbox's egress proxy: send CONNECT host:port or an absolute http:// URL",
        ));
    };
    let mut headers = Vec::new();
    let mut connection_named: Vec<String> = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if headers.len() >= MAX_HEADERS {
            return Err((431, "airlock proxy: too many header lines".into()));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| bad("a header line is NAME: VALUE"))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(bad("bad header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b == 0 || b == b'\r' || b == b'\n') {
            return Err(bad("bad header value"));
        }
        let lower = name.to_ascii_lowercase();
        if lower == "connection" {
            connection_named.extend(value.split(',').map(|v| v.trim().to_ascii_lowercase()));
        }
        headers.push((name.to_owned(), value.to_owned()));
    }
    headers.retain(|(n, _)| {
        let l = n.to_ascii_lowercase();
        // Every Proxy-* header was meant for this proxy (credentials
        // included): none goes on.
        !HOP_BY_HOP.contains(&l.as_str())
            && !l.starts_with("proxy-")
            && !connection_named.contains(&l)
    });
    Ok(ProxyHead {
        method: method.to_owned(),
        target,
        version: version.to_owned(),
        headers,
    })
}

/// The head sent on for a plain HTTP request: origin form, the end-to-end
/// headers, a `Host` if the client sent none, `Connection: close`.
pub fn origin_head(head: &ProxyHead) -> Vec<u8> {
    let Target::Http { host, port, path } = &head.target else {
        return Vec::new();
    };
    let mut out = format!("{} {path} {}\r\n", head.method, head.version);
    if !head
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("host"))
    {
        let h = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        if *port == 80 {
            out.push_str(&format!("Host: {h}\r\n"));
        } else {
            out.push_str(&format!("Host: {h}:{port}\r\n"));
        }
    }
    for (n, v) in &head.headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// Reads a request head from `conn`: the head (without its empty line)
/// and the bytes after it. `Err` carries the refusal to answer with. The
/// caller bounds each read in time (a reader that fails with `TimedOut`
/// or `WouldBlock` at `deadline`); `deadline` is checked between reads.
pub fn read_head(conn: &mut impl Read, deadline: Instant) -> Result<(Vec<u8>, Vec<u8>), Refused> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let rest = buf[end + 4..].to_vec();
            buf.truncate(end);
            return Ok((buf, rest));
        }
        if buf.len() >= MAX_HEAD {
            return Err((
                431,
                format!("airlock proxy: the request head is longer than {MAX_HEAD} bytes"),
            ));
        }
        if Instant::now() >= deadline {
            return Err((408, "airlock proxy: the request head took too long".into()));
        }
        let want = chunk.len().min(MAX_HEAD + 4 - buf.len());
        match conn.read(&mut chunk[..want]) {
            Ok(0) => return Err((400, "airlock proxy: the client closed mid-head".into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err((408, "airlock proxy: the request head took too long".into()));
            }
            Err(e) => return Err((400, format!("airlock proxy: {e}"))),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
