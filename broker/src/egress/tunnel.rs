//! One egress connection: the guest's request, the policy's verdict, the
//! connect, the reply, then the bytes both ways (one thread, `poll`),
//! bounded by the idle timeout and the sandbox's byte budget.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use airlock_protocol::egress::{Reply, Request, Status};

use super::policy::Decision;
use super::{Denial, Door, REQUEST_TIMEOUT};
use crate::audit::records::{NetClose, NetConnect};
use crate::audit::Durability;

/// Size of the splice buffer.
const BUF: usize = 64 * 1024;
/// With secrets: how long bytes that may begin a placeholder wait for the
/// rest before they go on.
const HOLD_MS: u128 = 100;

fn reply(guest: &UnixStream, status: Status, message: &str) -> io::Result<()> {
    Reply {
        status,
        message: message.to_owned(),
    }
    .write(&mut &*guest)
}

/// Serves one egress connection from the guest, to its end.
pub(crate) fn serve(door: &Door, id: u64, guest: &UnixStream) {
    let _ = guest.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = guest.set_write_timeout(Some(REQUEST_TIMEOUT));
    let req = match Request::read(&mut &*guest) {
        Ok(Ok(req)) => req,
        bad => {
            let message = match bad {
                Ok(Err(e)) => {
                    let message = format!("airlock: a malformed egress request: {e}");
                    let _ = reply(guest, Status::Bad, &message);
                    message
                }
                Err(e) => format!("airlock: the egress request did not arrive whole: {e}"),
                Ok(Ok(_)) => return,
            };
            return door.denied(Denial {
                kind: None,
                name: None,
                port: None,
                reason: "bad_request",
                rule: None,
                message,
            });
        }
    };
    let kind = req.kind.name();
    let deny = |reason, rule, message: String| {
        let status = match reason {
            "policy" => Status::Denied,
            "no_such_host" => Status::NoSuchHost,
            "refused" => Status::Refused,
            "limit" => Status::Limit,
            _ => Status::Unreachable,
        };
        let _ = reply(guest, status, &message);
        door.denied(Denial {
            kind: Some(kind),
            name: Some(req.name.clone()),
            port: Some(req.port),
            reason,
            rule,
            message,
        });
    };
    let max = door.settings.max_bytes;
    if door.bytes.load(Ordering::SeqCst) >= max {
        return deny(
            "limit",
            None,
            format!(
                "airlock: the sandbox has used its network budget ({max} bytes, \
                 --net-max-bytes): no more tunnels"
            ),
        );
    }
    let (addrs, rule) = match door.settings.policy.decide(&req.name, req.port) {
        Decision::Allow { addrs, rule } => (addrs, rule),
        Decision::Deny { rule, message } => return deny("policy", Some(rule), message),
        Decision::NoSuchHost(message) => {
            return deny("no_such_host", None, format!("airlock: {message}"));
        }
    };
    let started = Instant::now();
    let (remote, address) = match connect(&addrs, door.settings.connect_timeout) {
        Ok(x) => x,
        Err(e) => {
            let reason = if e.kind() == io::ErrorKind::ConnectionRefused {
                "refused"
            } else {
                "unreachable"
            };
            return deny(
                reason,
                Some(rule),
                format!(
                    "airlock: cannot connect to {}:{} ({}): {e}",
                    req.name,
                    req.port,
                    addrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    };
    let connect_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if reply(guest, Status::Ok, &address.to_string()).is_err() {
        return;
    }
    door.tunnels.fetch_add(1, Ordering::SeqCst);
    door.audit.record(
        &NetConnect {
            id,
            kind,
            name: req.name.clone(),
            port: req.port,
            address: address.to_string(),
            rule,
            connect_ms,
        },
        Durability::Buffered,
    );
    let (up, down, end) = match door.settings.secrets.as_deref() {
        // A bound host, through CONNECT or SOCKS: TLS is terminated here
        // and the values put in (plain HTTP never carries one).
        Some(s) if s.is_bound(&req.name) && matches!(kind, "connect" | "socks") => {
            crate::secrets::intercept::serve(door, s, guest, &remote, &req.name, req.port)
        }
        _ => splice(door, guest, &remote, (&req.name, req.port)),
    };
    let _ = remote.shutdown(Shutdown::Both);
    door.audit.record(
        &NetClose {
            id,
            name: req.name,
            port: req.port,
            address: address.to_string(),
            bytes_up: up,
            bytes_down: down,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            end,
        },
        Durability::Buffered,
    );
}

/// Connects to the first of `addrs` that answers within `timeout` each.
fn connect(addrs: &[SocketAddr], timeout: Duration) -> io::Result<(TcpStream, SocketAddr)> {
    let mut last = io::Error::from(io::ErrorKind::AddrNotAvailable);
    for addr in addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok((s, *addr));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A placeholder in clear text on its way out: the tunnel is cut before
/// it is sent; the agent gets a `403` if nothing came back yet.
fn refuse_placeholder(
    door: &Door,
    guest: &UnixStream,
    remote: &TcpStream,
    (host, port): (&str, u16),
    e: &crate::secrets::Entry,
    (up, down): (u64, u64),
) -> (u64, u64, String) {
    let _ = remote.shutdown(Shutdown::Both);
    let r = crate::secrets::http::Refusal {
        status: 403,
        reason: "placeholder_in_clear_text",
        secret: Some(e.spec.name.clone()),
        message: format!(
            "airlock: the placeholder of secret {} was on its way to {host}:{port} in clear \
             text (not a --secret-bind host, or not inside TLS): the connection was cut before \
             it was sent",
            e.spec.name
        ),
    };
    crate::secrets::intercept::refused(door, host, port, &r);
    if down == 0 {
        let _ = (&mut &*guest).write_all(&r.response());
    }
    (up, down, "secret_refused: placeholder_in_clear_text".into())
}

/// Copies bytes both ways until both directions are closed, the tunnel
/// idles past the idle timeout, or the byte budget is spent; returns the
/// bytes up (guest to destination), down, and how it ended.
pub(crate) fn splice(
    door: &Door,
    guest: &UnixStream,
    remote: &TcpStream,
    dest: (&str, u16),
) -> (u64, u64, String) {
    let idle = door.settings.idle_timeout;
    let _ = guest.set_read_timeout(None);
    let _ = remote.set_read_timeout(None);
    let _ = guest.set_write_timeout(Some(idle));
    let _ = remote.set_write_timeout(Some(idle));
    let mut buf = vec![0u8; BUF];
    // With secrets: the tail of what went up, so that a placeholder split
    // across reads is still seen.
    let secrets = door.settings.secrets.as_deref();
    let keep = secrets.map_or(0, |s| s.placeholder_len().saturating_sub(1));
    let mut tail: Vec<u8> = Vec::new();
    let mut held: Vec<u8> = Vec::new();
    let mut held_since = Instant::now();
    let (mut up, mut down) = (0u64, 0u64);
    let (mut up_open, mut down_open) = (true, true);
    let mut last = Instant::now();
    while up_open || down_open {
        let left = idle.saturating_sub(last.elapsed());
        if left.is_zero() {
            return (up, down, "idle_timeout".into());
        }
        let mut fds = [
            libc::pollfd {
                fd: if up_open { guest.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if down_open { remote.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let cap = if held.is_empty() { 1000 } else { HOLD_MS };
        let wait = libc::c_int::try_from(left.as_millis().min(cap)).unwrap_or(1000);
        // SAFETY: `fds` is a live array of two initialised pollfd, and its
        // length is passed with it.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return (up, down, format!("error: poll: {e}"));
        }
        if !held.is_empty() && held_since.elapsed().as_millis() >= HOLD_MS {
            // Not a placeholder after all (or one split on purpose, which
            // the next read still catches whole in `tail`).
            if let Err(e) = (&mut &*remote).write_all(&std::mem::take(&mut held)) {
                return (up, down, format!("error: write: {e}"));
            }
        }
        for (i, fd) in fds.iter().enumerate() {
            if fd.fd < 0 || fd.revents == 0 {
                continue;
            }
            let (from, to): (&mut dyn Read, &mut dyn Write) = if i == 0 {
                (&mut &*guest, &mut &*remote)
            } else {
                (&mut &*remote, &mut &*guest)
            };
            let n = match from.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return (up, down, format!("error: read: {e}")),
            };
            if n == 0 {
                // Half-close: pass it on, keep the other way open.
                if i == 0 {
                    up_open = false;
                    if (&mut &*remote)
                        .write_all(&std::mem::take(&mut held))
                        .is_err()
                    {
                        return (up, down, "error: write".into());
                    }
                    let _ = remote.shutdown(Shutdown::Write);
                } else {
                    down_open = false;
                    let _ = guest.shutdown(Shutdown::Write);
                }
                continue;
            }
            let mut send = &buf[..n];
            let mut joined;
            if let (0, Some(s)) = (i, secrets) {
                tail.extend_from_slice(&buf[..n]);
                if let Some(e) = s.placeholder_in(&tail) {
                    return refuse_placeholder(door, guest, remote, dest, e, (up, down));
                }
                let cut = tail.len().saturating_sub(keep);
                tail.drain(..cut);
                // What may be the start of a placeholder waits for the
                // next read (or HOLD).
                joined = std::mem::take(&mut held);
                joined.extend_from_slice(&buf[..n]);
                let at = s.partial_at_end(&joined).unwrap_or(joined.len());
                held = joined.split_off(at);
                held_since = Instant::now();
                send = &joined;
            }
            let n64 = n as u64;
            if door.bytes.fetch_add(n64, Ordering::SeqCst) + n64 > door.settings.max_bytes {
                return (up, down, "byte_limit".into());
            }
            if let Err(e) = to.write_all(send) {
                return (up, down, format!("error: write: {e}"));
            }
            if i == 0 {
                up += n64;
                door.bytes_up.fetch_add(n64, Ordering::SeqCst);
            } else {
                down += n64;
                door.bytes_down.fetch_add(n64, Ordering::SeqCst);
            }
            last = Instant::now();
        }
    }
    (up, down, "closed".into())
}
