//! The in-guest end of the egress door: the agent's only way out, and
//! only under the host's policy.
//!
//! The guest has no network device. When the host's `Hello` lists
//! `egress`, the init listens in the agent's loopback-only namespace (the
//! one the model endpoint lives in) on:
//! - [`PROXY_PORT`] (3128): an HTTP proxy ([`http`]): `CONNECT` for TLS and
//!   any TCP (WebSocket upgrades ride inside it), absolute-form `http://`
//!   requests for plain HTTP (sent on in origin form, one per tunnel);
//! - [`SOCKS_PORT`] (1080): SOCKS5 `CONNECT`, no authentication
//!   ([`socks`]);
//! - each `--host-port` PORT (`airlock.host_ports=` on the kernel command
//!   line): a plain forward to the host's forward of that port
//!   (`host.docker.internal:PORT` resolves to 127.0.0.1 in the container).
//!
//! Each tunnel is one vsock connection to the host's
//! [`airlock_protocol::EGRESS_PORT`]: the destination *by name* (the guest
//! never resolves), the host's verdict, then raw bytes ([`tunnel`]). The
//! host decides, connects, audits and bounds bytes and idle time; here the
//! listeners bound what a client can hold: at most [`MAX_CLIENTS`] at once
//! (then `503` or SOCKS failure), a request head of at most [`head::MAX_HEAD`]
//! bytes (`431`) read within [`HEAD_DEADLINE`] (`408`: slowloris), a
//! SOCKS greeting within the same deadline. The agent finds the proxy
//! through [`agent_env`].

pub mod head;
pub mod http;
pub mod socks;
#[cfg(test)]
mod tests;
pub mod tunnel;

use std::io::{self, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::console;
use crate::model::Reporter;

/// The HTTP proxy's port on 127.0.0.1.
pub const PROXY_PORT: u16 = 3128;
/// The SOCKS5 listener's port on 127.0.0.1.
pub const SOCKS_PORT: u16 = 1080;
/// Most clients served at once, over all listeners.
pub const MAX_CLIENTS: usize = 64;
/// Time a client has to send its whole request head or SOCKS handshake.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(30);
/// Time the host has to answer a tunnel request (it connects first; its
/// own connect timeout is shorter).
pub const HOST_TIMEOUT: Duration = Duration::from_secs(120);
/// Most `--host-port` forwards.
pub const MAX_HOST_PORTS: usize = 32;

/// The `--host-port` ports, as the kernel command line lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostPorts {
    ports: [u16; MAX_HOST_PORTS],
    len: usize,
}

impl HostPorts {
    /// Parses `P1,P2,...` (bad entries, 0, duplicates, the guest's own
    /// ports and those past [`MAX_HOST_PORTS`] are skipped).
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for p in text.split(',') {
            let Ok(p) = p.trim().parse::<u16>() else {
                continue;
            };
            if p == 0
                || [PROXY_PORT, SOCKS_PORT, crate::model::PORT].contains(&p)
                || out.as_slice().contains(&p)
                || out.len == MAX_HOST_PORTS
            {
                continue;
            }
            out.ports[out.len] = p;
            out.len += 1;
        }
        out
    }

    pub fn as_slice(&self) -> &[u16] {
        &self.ports[..self.len]
    }
}

/// The variables that point the agent at the proxy, minus those the run's
/// own environment sets in either case (the user's choice wins: curl and
/// Python read `https_proxy` before `HTTPS_PROXY`, so a default left in
/// the other case would shadow the user's).
pub fn agent_env(spec_env: &[(String, String)]) -> Vec<(String, String)> {
    // ALL_PROXY names the HTTP proxy too, not the SOCKS listener: httpx
    // (the Anthropic and OpenAI Python SDKs) refuses to start on a
    // socks5h:// ALL_PROXY without the optional socksio package (found by
    // tests/sdk.rs). SOCKS clients are pointed at :1080 explicitly.
    let http = format!("http://127.0.0.1:{PROXY_PORT}");
    let no_proxy = "localhost,127.0.0.1".to_owned();
    [
        ("HTTP_PROXY", http.clone()),
        ("HTTPS_PROXY", http.clone()),
        ("http_proxy", http.clone()),
        ("https_proxy", http.clone()),
        ("ALL_PROXY", http.clone()),
        ("all_proxy", http),
        ("NO_PROXY", no_proxy.clone()),
        ("no_proxy", no_proxy),
    ]
    .into_iter()
    .filter(|(name, _)| !spec_env.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)))
    .map(|(name, value)| (name.to_owned(), value))
    .collect()
}

/// What a listener does with each client.
#[derive(Debug, Clone, Copy)]
pub enum Service {
    Http,
    Socks,
    /// A `--host-port` forward of this port.
    Forward(u16),
}

impl Service {
    /// The service's name in audit claims.
    pub fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Socks => "socks",
            Self::Forward(_) => "forward",
        }
    }
}

/// Serves `listeners` (each on a thread of its own, for ever: the VM's end
/// stops them), at most [`MAX_CLIENTS`] clients at once over all.
/// What the guest refuses itself (never reaching the host) is reported to
/// `reporter` as `egress.refused` audit claims: `service`, `status` (the
/// HTTP status, or the SOCKS reply code), `reason`.
pub fn start(listeners: Vec<(Service, TcpListener)>, reporter: Option<Reporter>) -> io::Result<()> {
    let live = Arc::new(AtomicUsize::new(0));
    for (service, listener) in listeners {
        let live = Arc::clone(&live);
        let reporter = reporter.clone();
        thread::Builder::new()
            .name("egress-accept".into())
            .spawn(move || accept_loop(&listener, service, &live, reporter.as_ref()))?;
    }
    Ok(())
}

/// Reports a refusal of the guest's own (see [`start`]).
pub fn refused(reporter: Option<&Reporter>, service: &str, status: u16, reason: &str) {
    console::debug(&format!("egress {service}: {status} {reason}"));
    if let Some(r) = reporter {
        r.report(
            "egress.refused",
            vec![
                ("service".into(), service.into()),
                ("status".into(), status.to_string()),
                ("reason".into(), crate::model::audit_value(reason)),
            ],
        );
    }
}

fn accept_loop(
    listener: &TcpListener,
    service: Service,
    live: &Arc<AtomicUsize>,
    reporter: Option<&Reporter>,
) {
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(err) => {
                console::debug(&format!("egress: accept: {err}"));
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if live.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            live.fetch_sub(1, Ordering::SeqCst);
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let reason = format!(
                "airlock: the sandbox's proxy serves at most {MAX_CLIENTS} clients at once"
            );
            if let Service::Http = service {
                let _ = http::write_error(&mut conn, 503, &reason);
            } else if let Service::Socks = service {
                // Whatever the greeting: no acceptable method.
                let _ = conn.write_all(&[5, 0xff]);
            }
            refused(reporter, service.name(), 503, &reason);
            let _ = conn.shutdown(Shutdown::Both);
            continue;
        }
        let slot = crate::model::Slot(Arc::clone(live));
        let reporter = reporter.cloned();
        let spawned = thread::Builder::new()
            .name("egress-client".into())
            .spawn(move || {
                let _slot = slot;
                serve(conn, service, reporter.as_ref());
            });
        if let Err(err) = spawned {
            console::warn(&format!("egress: cannot start a thread: {err}"));
        }
    }
}

fn serve(conn: TcpStream, service: Service, reporter: Option<&Reporter>) {
    let _ = conn.set_nodelay(true);
    match service {
        Service::Http => http::serve(conn, reporter),
        Service::Socks => socks::serve(conn, reporter),
        Service::Forward(port) => {
            let req = airlock_protocol::egress::Request {
                kind: airlock_protocol::egress::Kind::Forward,
                name: "host.airlock.internal".into(),
                port,
            };
            match tunnel::open(&req) {
                Ok(Ok(host)) => tunnel::splice(&conn, &host, &[]),
                Ok(Err(reply)) => console::debug(&format!(
                    "egress: forward of port {port} refused: {}",
                    reply.message
                )),
                Err(err) => console::debug(&format!("egress: forward of port {port}: {err}")),
            }
        }
    }
}
