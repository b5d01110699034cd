//! A tunnel to a bound host, intercepted: the broker is the TLS server
//! the agent talks to (a certificate for the host the agent asked for,
//! from the sandbox's CA) and the TLS client of the real server (verified
//! against Mozilla's roots and `--secret-ca`), and in between it reads
//! each HTTP/1.1 request ([`super::http::Requests`]), puts the value in
//! ([`rewrite`]) and masks the value in the answer. One thread, `poll`,
//! non-blocking sockets; bounded buffers (a side that is slow to take
//! stops the other being read), the tunnel's idle timeout and the
//! sandbox's byte budget as in a plain tunnel.
//!
//! What is checked: the SNI the agent sends must be the host it asked the
//! proxy for (else the handshake is refused); each request's `Host` must
//! name that host; a placeholder of a secret not bound to this host, in a
//! header or the request line, refuses the request; HTTP/2 is not offered
//! (ALPN `http/1.1`), and its preface is refused.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};

use super::answer::{Answers, Unreadable};
use super::config::{Bind, Format};
use super::http::{base64_decode, base64_encode, Head, Refusal, Requests};
use super::Secrets;
use crate::audit::records::{SecretRefused, SecretUsed};
use crate::audit::Durability;
use crate::egress::Door;

/// Longest request head once the values are in.
const MAX_REWRITTEN_HEAD: usize = 128 * 1024;
/// How long each TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most plaintext waiting for one side before the other is not read.
const PENDING: usize = 256 * 1024;
/// Bytes that may begin a value are held back at most this long when the
/// server sends nothing more.
const HOLD: Duration = Duration::from_millis(100);

/// A secret put into a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    pub secret: String,
    pub header: String,
}

/// `text` with each placeholder replaced: a secret bound to this host
/// (`bound`) by its value, another one refused.
fn substitute(
    secrets: &Secrets,
    bound: &[&Bind],
    text: &str,
    header: &str,
    used: &mut Vec<Used>,
    refreshed: &mut bool,
) -> Result<String, Refusal> {
    let mut out = text.to_owned();
    for e in &secrets.entries {
        if !out.contains(&e.placeholder) {
            continue;
        }
        if !bound.iter().any(|b| b.secret == e.spec.name) {
            return Err(refusal_for(e, "placeholder_for_other_host"));
        }
        let (value, fresh) = e.value.get().map_err(|why| unavailable(e, &why))?;
        *refreshed |= fresh;
        too_large(out.matches(&e.placeholder).count(), value.expose().len())?;
        out = out.replace(&e.placeholder, value.expose());
        used.push(Used {
            secret: e.spec.name.clone(),
            header: header.to_owned(),
        });
    }
    Ok(out)
}

/// Refuses before `count` copies of a value of `len` bytes are made that
/// could not fit in a head.
fn too_large(count: usize, len: usize) -> Result<(), Refusal> {
    if count.saturating_mul(len) > MAX_REWRITTEN_HEAD {
        return Err(Refusal::new(
            431,
            "head_too_large",
            format!("airlock: the request head would be over {MAX_REWRITTEN_HEAD} bytes with the values in"),
        ));
    }
    Ok(())
}

fn refusal_for(e: &super::Entry, reason: &'static str) -> Refusal {
    Refusal {
        status: 403,
        reason,
        secret: Some(e.spec.name.clone()),
        message: format!(
            "airlock: the placeholder of secret {} may only be sent to the hosts it is bound \
             to (--secret-bind {}=HOST): refused",
            e.spec.name, e.spec.name
        ),
    }
}

fn unavailable(e: &super::Entry, why: &str) -> Refusal {
    Refusal {
        status: 502,
        reason: "secret_unavailable",
        secret: Some(e.spec.name.clone()),
        // The cause stays on the host: a command line may hold a token.
        message: {
            eprintln!("airlock: secret {}: {why}", e.spec.name);
            format!(
                "airlock: secret {} could not be fetched on the host (airlock's stderr says why)",
                e.spec.name
            )
        },
    }
}

/// The host part of a `Host` header (without a port; IPv6 without
/// brackets), and its port.
fn host_of(value: &str) -> (String, Option<&str>) {
    if let Some(rest) = value.strip_prefix('[') {
        if let Some((h, after)) = rest.split_once(']') {
            return (h.to_ascii_lowercase(), after.strip_prefix(':'));
        }
    }
    match value.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_ascii_lowercase(), Some(p)),
        _ => (value.to_ascii_lowercase(), None),
    }
}

/// Whether a header (lower case) is one that carries credentials: only
/// those get a value put in for a placeholder.
pub fn carries_credentials(name: &str) -> bool {
    [
        "auth",
        "token",
        "key",
        "secret",
        "cookie",
        "session",
        "password",
        "credential",
        "signature",
    ]
    .iter()
    .any(|w| name.contains(w))
}

/// A set header's value.
fn formatted(format: &Format, value: &str) -> String {
    match format {
        Format::Raw | Format::Anthropic => value.to_owned(),
        Format::Bearer => format!("Bearer {value}"),
        Format::Token => format!("token {value}"),
        Format::Basic(user) => format!(
            "Basic {}",
            base64_encode(format!("{user}:{value}").as_bytes())
        ),
    }
}

/// One request head to `host:port`, with the secrets put in: the head to
/// send, what was used, and whether a value was fetched anew.
pub fn rewrite(
    secrets: &Secrets,
    host: &str,
    port: u16,
    head: &Head,
) -> Result<(Head, Vec<Used>, bool), Refusal> {
    let bound: Vec<&Bind> = secrets.binds_for(host).collect();
    let mut used = Vec::new();
    let mut refreshed = false;
    // The request must be for the host the tunnel goes to.
    let hosts: Vec<&str> = head.values("host").collect();
    let (h, p) = match hosts.as_slice() {
        [one] => host_of(one),
        _ => (String::new(), None),
    };
    let port_text = port.to_string();
    if h.trim_end_matches('.') != host.to_ascii_lowercase().trim_end_matches('.')
        || p.is_some_and(|p| p != port_text)
    {
        let mut asked = hosts.join(", ");
        if asked.len() > 200 {
            asked = format!("{}...", asked.chars().take(200).collect::<String>());
        }
        return Err(Refusal::new(
            403,
            "host_mismatch",
            format!(
                "airlock: this connection goes to {host}:{port}; a request for Host {asked:?} is \
                 refused on it"
            ),
        ));
    }
    // Origin-form only: an absolute-form target names its own authority,
    // which a server may route by instead of Host.
    if head.method.eq_ignore_ascii_case("CONNECT")
        || !(head.target.starts_with('/') || (head.target == "*" && head.method == "OPTIONS"))
    {
        return Err(Refusal::new(
            400,
            "bad_request",
            "airlock: only origin-form requests (GET /path) are passed to a host of --secret-bind",
        ));
    }
    let mut out = head.clone();
    // The request line: a bound secret's placeholder is replaced when the
    // binding says `url`; another's is refused.
    for e in &secrets.entries {
        if !out.target.contains(&e.placeholder) {
            continue;
        }
        match bound.iter().find(|b| b.secret == e.spec.name) {
            None => return Err(refusal_for(e, "placeholder_for_other_host")),
            Some(b) if b.url => {
                let (value, fresh) = e.value.get().map_err(|why| unavailable(e, &why))?;
                refreshed |= fresh;
                too_large(
                    out.target.matches(&e.placeholder).count(),
                    value.expose().len(),
                )?;
                out.target = out.target.replace(&e.placeholder, value.expose());
                used.push(Used {
                    secret: e.spec.name.clone(),
                    header: "(request line)".into(),
                });
            }
            Some(_) => {}
        }
    }
    let mut headers = Vec::with_capacity(out.headers.len() + 2);
    for (name, value) in &out.headers {
        let lower = name.to_ascii_lowercase();
        if secrets.placeholder_in(name.as_bytes()).is_some() {
            return Err(Refusal::new(
                400,
                "bad_request",
                "airlock: a placeholder in a header name",
            ));
        }
        if lower == "proxy-authorization" || lower == "accept-encoding" {
            // Not for the server; and answers must come uncompressed so
            // that the values can be masked in them.
            continue;
        }
        let basic = (lower == "authorization")
            .then(|| {
                value
                    .get(..6)
                    .filter(|s| s.eq_ignore_ascii_case("basic "))
                    .map(|_| value[6..].trim())
            })
            .flatten();
        if !carries_credentials(&lower) {
            // A bound secret's placeholder stays a placeholder here (a
            // header the server may store or show); another's is refused.
            if let Some(e) = secrets.placeholder_in(value.as_bytes()) {
                if !bound.iter().any(|b| b.secret == e.spec.name) {
                    return Err(refusal_for(e, "placeholder_for_other_host"));
                }
            }
            headers.push((name.clone(), value.clone()));
            continue;
        }
        let new = match basic.and_then(base64_decode) {
            Some(decoded) => {
                let text = String::from_utf8_lossy(&decoded).into_owned();
                let replaced =
                    substitute(secrets, &bound, &text, &lower, &mut used, &mut refreshed)?;
                if replaced == text {
                    value.clone()
                } else {
                    format!("Basic {}", base64_encode(replaced.as_bytes()))
                }
            }
            None => substitute(secrets, &bound, value, &lower, &mut used, &mut refreshed)?,
        };
        headers.push((name.clone(), new));
    }
    // The headers the bindings set, replacing the client's.
    for b in &bound {
        let Some((header, format)) = &b.header else {
            continue;
        };
        let Some(e) = secrets.entry(&b.secret) else {
            continue;
        };
        let (value, fresh) = e.value.get().map_err(|why| unavailable(e, &why))?;
        refreshed |= fresh;
        let (name, text) = match format {
            Format::Anthropic if value.expose().starts_with("sk-ant-oat") => (
                "authorization".to_owned(),
                format!("Bearer {}", value.expose()),
            ),
            Format::Anthropic => ("x-api-key".to_owned(), value.expose().to_owned()),
            f => (header.clone(), formatted(f, value.expose())),
        };
        if matches!(format, Format::Anthropic) {
            headers.retain(|(n, _)| {
                !n.eq_ignore_ascii_case("x-api-key") && !n.eq_ignore_ascii_case("authorization")
            });
        } else {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        }
        used.retain(|u| !(u.secret == e.spec.name && u.header == name));
        headers.push((name.clone(), text));
        used.push(Used {
            secret: e.spec.name.clone(),
            header: name,
        });
    }
    headers.push(("Accept-Encoding".into(), "identity".into()));
    out.headers = headers;
    let size: usize = out.target.len()
        + out
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>();
    if size > MAX_REWRITTEN_HEAD {
        return Err(Refusal::new(
            431,
            "head_too_large",
            format!("airlock: the request head would be over {MAX_REWRITTEN_HEAD} bytes with the values in"),
        ));
    }
    Ok((out, used, refreshed))
}

/// Records a refusal (the first [`crate::egress::MAX_SECRET_REFUSED_RECORDS`];
/// the rest are counted).
pub(crate) fn refused(door: &Door, host: &str, port: u16, r: &Refusal) {
    if door.secret_refused.fetch_add(1, Ordering::SeqCst)
        >= crate::egress::MAX_SECRET_REFUSED_RECORDS
    {
        return;
    }
    door.audit.record(
        &SecretRefused {
            name: r.secret.clone(),
            host: host.to_owned(),
            port,
            reason: r.reason,
            message: r.message.clone(),
        },
        Durability::Synced,
    );
}

/// Whether the first bytes the agent sends are a TLS handshake: waits for
/// either side to speak (a server that speaks first is not TLS).
fn agent_starts_tls(guest: &UnixStream, remote: &TcpStream, idle: Duration) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: guest.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: remote.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let wait = libc::c_int::try_from(idle.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is a live array of two initialised pollfd, and its
    // length is passed with it.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
    if rc <= 0 || fds[1].revents != 0 || fds[0].revents & libc::POLLIN == 0 {
        return false;
    }
    let mut first = [0u8; 1];
    // SAFETY: `first` is a live one-byte buffer; MSG_PEEK leaves the byte
    // in the socket.
    let n = unsafe {
        libc::recv(
            guest.as_raw_fd(),
            first.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK,
        )
    };
    n == 1 && first[0] == 0x16
}

/// Serves a tunnel to a bound host; returns the plaintext bytes up and
/// down and how it ended (for `net.close`).
pub(crate) fn serve(
    door: &Door,
    secrets: &Secrets,
    guest: &UnixStream,
    remote: &TcpStream,
    host: &str,
    port: u16,
) -> (u64, u64, String) {
    if !agent_starts_tls(guest, remote, door.settings.idle_timeout) {
        // Not TLS (or silence): a plain tunnel, still watched for
        // placeholders.
        return crate::egress::tunnel::splice(door, guest, remote, (host, port));
    }
    let Some(ca) = &secrets.ca else {
        return crate::egress::tunnel::splice(door, guest, remote, (host, port));
    };
    let config = match ca.server_config(host) {
        Ok(c) => c,
        Err(e) => return (0, 0, format!("error: {e}")),
    };
    let mut g = match rustls::ServerConnection::new(config) {
        Ok(c) => c,
        Err(e) => return (0, 0, format!("error: TLS: {e}")),
    };
    let _ = guest.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = guest.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut gs = guest;
    while g.is_handshaking() {
        if let Err(e) = g.complete_io(&mut gs) {
            return (0, 0, format!("tls_error: agent side: {e}"));
        }
    }
    if let Some(sni) = g.server_name() {
        if !sni
            .trim_end_matches('.')
            .eq_ignore_ascii_case(host.trim_end_matches('.'))
        {
            let r = Refusal::new(
                403,
                "sni_mismatch",
                format!(
                    "airlock: the TLS handshake named {sni:?} on a connection to {host}: refused"
                ),
            );
            refused(door, host, port, &r);
            g.send_close_notify();
            let _ = g.complete_io(&mut gs);
            return (0, 0, "secret_refused: sni_mismatch".into());
        }
    }
    // Onward: the real server, verified.
    let name = match ServerName::try_from(host.to_owned()) {
        Ok(n) => n,
        Err(e) => return (0, 0, format!("error: {host}: {e}")),
    };
    let mut r = match rustls::ClientConnection::new(std::sync::Arc::clone(&secrets.client), name) {
        Ok(c) => c,
        Err(e) => return (0, 0, format!("error: TLS: {e}")),
    };
    let _ = remote.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = remote.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut rs = remote;
    while r.is_handshaking() {
        if let Err(e) = r.complete_io(&mut rs) {
            let refusal = Refusal::new(
                502,
                "upstream_tls",
                format!(
                    "airlock: the TLS handshake with {host}:{port} failed, so no secret was \
                     sent: {e} (a private CA? --secret-ca FILE)"
                ),
            );
            refused(door, host, port, &refusal);
            let _ = g.writer().write_all(&refusal.response());
            g.send_close_notify();
            let _ = g.complete_io(&mut gs);
            return (0, 0, format!("upstream_tls: {e}"));
        }
    }
    relay(door, secrets, g, guest, r, remote, host, port)
}

/// Writes what `conn` has for its socket; `false` on a broken socket.
fn flush(conn: &mut rustls::Connection, mut sock: &mut dyn Write) -> bool {
    while conn.wants_write() {
        match conn.write_tls(&mut sock) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

/// Reads what the socket has into `conn`; `Ok(false)` at its end.
fn fill(conn: &mut rustls::Connection, sock: &mut dyn Read) -> Result<bool, String> {
    match conn.read_tls(sock) {
        Ok(0) => Ok(false),
        Ok(_) => {
            conn.process_new_packets()
                .map_err(|e| format!("tls_error: {e}"))?;
            Ok(true)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(true)
        }
        Err(e) => Err(format!("error: read: {e}")),
    }
}

/// The plaintext `conn` has, appended to `out` (at most `room`);
/// `Ok(false)` once the peer closed.
fn drain(conn: &mut rustls::Connection, out: &mut Vec<u8>, room: usize) -> Result<bool, String> {
    let mut buf = [0u8; 16 * 1024];
    let mut got = 0;
    while got < room {
        match conn.reader().read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(format!("error: {e}")),
        }
    }
    Ok(true)
}

#[allow(clippy::too_many_arguments, clippy::too_many_lines)]
fn relay(
    door: &Door,
    secrets: &Secrets,
    g: rustls::ServerConnection,
    guest: &UnixStream,
    r: rustls::ClientConnection,
    remote: &TcpStream,
    host: &str,
    port: u16,
) -> (u64, u64, String) {
    let idle = door.settings.idle_timeout;
    let _ = guest.set_nonblocking(true);
    let _ = remote.set_nonblocking(true);
    let mut g = rustls::Connection::from(g);
    let mut r = rustls::Connection::from(r);
    let mut requests = Requests::default();
    let mut answers = Answers::new(secrets.scrubber());
    let (mut up, mut down) = (0u64, 0u64);
    let (mut to_remote, mut to_guest) = (Vec::new(), Vec::new());
    // Plaintext still coming from each side; their sockets still open.
    let (mut guest_open, mut remote_open) = (true, true);
    let (mut guest_eof, mut remote_eof) = (false, false);
    let (mut told_guest, mut told_remote) = (false, false);
    let mut remote_writable = true;
    let mut refusal: Option<Refusal> = None;
    let mut last = Instant::now();
    let mut last_down = Instant::now();
    let mut plain = Vec::new();
    let end = loop {
        let mut progress = false;
        // The agent's requests, rewritten.
        if refusal.is_none() && guest_open && to_remote.len() < PENDING {
            plain.clear();
            match drain(&mut g, &mut plain, PENDING - to_remote.len()) {
                Ok(open) => guest_open = open,
                Err(e) => break e,
            }
            if !plain.is_empty() {
                progress = true;
                let n = plain.len() as u64;
                if door.bytes.fetch_add(n, Ordering::SeqCst) + n > door.settings.max_bytes {
                    break "byte_limit".into();
                }
                up += n;
                door.bytes_up.fetch_add(n, Ordering::SeqCst);
                let mut refreshed = false;
                let fed = requests.feed(&plain, &mut to_remote, &mut |asked: &Head| {
                    let (head, used, fresh) = rewrite(secrets, host, port, asked)?;
                    refreshed |= fresh;
                    // The digest is of the request as asked: never of a value.
                    record_used(door, host, port, asked, &used);
                    answers.request(&head.method);
                    Ok(head.to_bytes())
                });
                if refreshed {
                    // A new value: mask it in the answers from now on.
                    answers.rescrub(secrets.scrubber());
                }
                if let Err(refused_now) = fed {
                    refused(door, host, port, &refused_now);
                    // What the server was sent before stays; nothing more.
                    answers.finish(&mut to_guest);
                    to_guest.extend_from_slice(&refused_now.response());
                    refusal = Some(refused_now);
                    remote_open = false;
                }
            }
        }
        // The server's answers, masked.
        if refusal.is_none() && remote_open && to_guest.len() < PENDING {
            plain.clear();
            match drain(&mut r, &mut plain, PENDING - to_guest.len()) {
                Ok(open) => remote_open = open,
                Err(e) => break e,
            }
            if !plain.is_empty() {
                progress = true;
                last_down = Instant::now();
                let n = plain.len() as u64;
                if door.bytes.fetch_add(n, Ordering::SeqCst) + n > door.settings.max_bytes {
                    break "byte_limit".into();
                }
                down += n;
                door.bytes_down.fetch_add(n, Ordering::SeqCst);
                if let Err(Unreadable(why)) = answers.feed(&plain, &mut to_guest) {
                    // Nothing more of the server's goes to the agent.
                    let refused_now = Refusal::new(
                        502,
                        "unreadable_answer",
                        format!(
                            "airlock: the answer of {host} cannot be checked for secrets: {why}"
                        ),
                    );
                    refused(door, host, port, &refused_now);
                    to_guest.extend_from_slice(&refused_now.response());
                    refusal = Some(refused_now);
                    remote_open = false;
                    continue;
                }
            }
            if !remote_open {
                answers.finish(&mut to_guest);
            } else if answers.holding() && last_down.elapsed() >= HOLD && plain.is_empty() {
                // The server paused inside what may begin a value.
                answers.pause(&mut to_guest);
            }
        }
        // Plaintext into the connections.
        if !to_remote.is_empty() && refusal.is_none() {
            match r.writer().write(&to_remote) {
                Ok(n) if n > 0 => {
                    to_remote.drain(..n);
                    progress = true;
                }
                Ok(_) => {}
                Err(e) => break format!("error: {e}"),
            }
        }
        if !to_guest.is_empty() {
            match g.writer().write(&to_guest) {
                Ok(n) if n > 0 => {
                    to_guest.drain(..n);
                    progress = true;
                }
                Ok(_) => {}
                Err(e) => break format!("error: {e}"),
            }
        }
        // The ends: the agent done: the server is told; the server done
        // (or a refusal): the agent is told once it has everything.
        if !guest_open && to_remote.is_empty() && refusal.is_none() && !told_remote {
            r.send_close_notify();
            told_remote = true;
        }
        if (!remote_open || refusal.is_some()) && to_guest.is_empty() && !answers.holding() {
            if !told_guest {
                g.send_close_notify();
                told_guest = true;
            }
            if !g.wants_write() || guest_eof {
                break match &refusal {
                    Some(r) => format!("secret_refused: {}", r.reason),
                    None => "closed".into(),
                };
            }
        }
        // Writes go on after a side's read end closed (a half-close): only
        // a failed write ends them.
        if !flush(&mut g, &mut &*guest) {
            break "error: write to the agent".into();
        }
        if remote_writable && refusal.is_none() && !flush(&mut r, &mut &*remote) {
            // The server stopped reading: what it already said still goes
            // to the agent.
            remote_writable = false;
            to_remote.clear();
        }
        if told_remote && !r.wants_write() {
            let _ = remote.shutdown(std::net::Shutdown::Write);
        }
        if progress {
            last = Instant::now();
            continue;
        }
        let left = idle.saturating_sub(last.elapsed());
        if left.is_zero() {
            break "idle_timeout".into();
        }
        let guest_events = poll_events(&g, !guest_eof && to_remote.len() < PENDING, true);
        let remote_events = if refusal.is_none() {
            poll_events(&r, !remote_eof && to_guest.len() < PENDING, remote_writable)
        } else {
            0
        };
        if guest_events == 0 && remote_events == 0 && guest_eof && (remote_eof || refusal.is_some())
        {
            break "closed".into();
        }
        // A descriptor with nothing wanted is left out (its hang-up would
        // wake the loop for nothing).
        let mut fds = [
            libc::pollfd {
                fd: if guest_events == 0 {
                    -1
                } else {
                    guest.as_raw_fd()
                },
                events: guest_events,
                revents: 0,
            },
            libc::pollfd {
                fd: if remote_events == 0 {
                    -1
                } else {
                    remote.as_raw_fd()
                },
                events: remote_events,
                revents: 0,
            },
        ];
        let cap = if answers.holding() {
            HOLD
        } else {
            Duration::from_secs(1)
        };
        let wait = libc::c_int::try_from(left.min(cap).as_millis()).unwrap_or(1000);
        // SAFETY: `fds` is a live array of two initialised pollfd, and its
        // length is passed with it.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break format!("error: poll: {e}");
        }
        let readable = |fd: &libc::pollfd| {
            fd.fd >= 0
                && fd.events & libc::POLLIN != 0
                && fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
        };
        if readable(&fds[0]) {
            match fill(&mut g, &mut &*guest) {
                Ok(true) => last = Instant::now(),
                Ok(false) => guest_eof = true,
                Err(e) => break e,
            }
        } else if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 && guest_eof {
            // The agent is gone both ways.
            break "closed".into();
        }
        if readable(&fds[1]) {
            match fill(&mut r, &mut &*remote) {
                Ok(true) => last = Instant::now(),
                Ok(false) => remote_eof = true,
                Err(e) => break e,
            }
        } else if fds[1].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            remote_writable = false;
            to_remote.clear();
        }
    };
    let _ = remote.shutdown(std::net::Shutdown::Both);
    (up, down, end)
}

/// One `secret.used` per secret put into a request (the first
/// [`crate::egress::MAX_SECRET_USED_RECORDS`] in a run; the rest counted).
fn record_used(door: &Door, host: &str, port: u16, head: &Head, used: &[Used]) {
    let digest = crate::audit::record::hex(&Sha256::digest(
        format!("{} {}", head.method, head.target).as_bytes(),
    ));
    let mut names: Vec<&str> = used.iter().map(|u| u.secret.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        if door.secret_used.fetch_add(1, Ordering::SeqCst) >= crate::egress::MAX_SECRET_USED_RECORDS
        {
            continue;
        }
        let headers: Vec<&str> = used
            .iter()
            .filter(|u| u.secret == name)
            .map(|u| u.header.as_str())
            .collect();
        door.audit.record(
            &SecretUsed {
                name: name.to_owned(),
                host: host.to_owned(),
                port,
                header: headers.join(","),
                request_sha256: digest.clone(),
            },
            Durability::Buffered,
        );
    }
}

fn poll_events(conn: &rustls::Connection, read: bool, write: bool) -> libc::c_short {
    let mut ev = 0;
    if read && conn.wants_read() {
        ev |= libc::POLLIN;
    }
    if write && conn.wants_write() {
        ev |= libc::POLLOUT;
    }
    ev
}
