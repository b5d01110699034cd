//! The egress door: the host end of [`airlock_protocol::EGRESS_PORT`]
//! (1030; PROTOCOL.md "Egress").
//!
//! The guest has no network device. The in-guest proxy (HTTP on
//! 127.0.0.1:3128, SOCKS5 on :1080, and the `--host-port` forwards) opens
//! one vsock connection per tunnel and names where it is to go; here the
//! [`policy`] decides (default deny, deny wins, names resolved by the
//! broker and every address checked, special addresses only when named),
//! the broker connects to the addresses it checked and splices bytes both
//! ways ([`tunnel`]) until either side closes, the tunnel idles past
//! `--net-idle-timeout`, or the sandbox's `--net-max-bytes` are spent.
//!
//! Bounds: at most `--net-max-tunnels` tunnels at once (the next waits in
//! the socket's backlog, the guest proxy bounds its own clients too), at
//! most [`MAX_CONNECTIONS`] per boot (then the port closes:
//! `control.capped`), a request must arrive within [`REQUEST_TIMEOUT`].
//! Audit: `net.connect`, `net.close`, `net.denied` (the first
//! [`MAX_DENIED_RECORDS`]; the rest counted in `net.summary`).

pub mod policy;
#[cfg(test)]
mod tests;
pub mod tunnel;

use std::collections::HashSet;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::audit::records::{NetDenied, NetSummary};
use crate::audit::{AuditLog, Durability};
use crate::door::ports::{Live, Port};

pub use policy::Policy;

/// The guest's own loopback ports (model endpoint, HTTP proxy, SOCKS5):
/// not forwardable.
pub const GUEST_PORTS: [u16; 3] = [8088, 3128, 1080];
/// Most egress connections accepted in one boot.
pub const MAX_CONNECTIONS: u64 = 100_000;
/// Most `net.denied` records in one run; later denials are counted.
pub const MAX_DENIED_RECORDS: u64 = 1_000;
/// Most `secret.used` records in one run (one per request that carried a
/// value); later ones are counted in `net.summary`.
pub const MAX_SECRET_USED_RECORDS: u64 = 10_000;
/// Most `secret.refused` records in one run; later ones are counted.
pub const MAX_SECRET_REFUSED_RECORDS: u64 = 1_000;
/// How long the guest has to send a tunnel's request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `--net-max-tunnels`.
pub const DEFAULT_MAX_TUNNELS: usize = 64;
/// Default of `--net-max-bytes`: 8 GiB both ways together.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 30;
/// Default of `--net-connect-timeout`, in seconds.
pub const DEFAULT_CONNECT_TIMEOUT_S: u64 = 10;
/// Default of `--net-idle-timeout`, in seconds.
pub const DEFAULT_IDLE_TIMEOUT_S: u64 = 300;
/// At the end, how long tunnels still open get to finish.
const FINISH: Duration = Duration::from_millis(500);
/// Most distinct denials told on stderr.
const MAX_TOLD: usize = 20;

/// The egress settings of a sandbox (`--net-*`, `--host-port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub policy: Policy,
    pub max_tunnels: usize,
    pub max_bytes: u64,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// `--secret*`: values injected for bound hosts (TLS terminated for
    /// them), placeholders watched for everywhere else.
    pub secrets: Option<Arc<crate::secrets::Secrets>>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            max_tunnels: DEFAULT_MAX_TUNNELS,
            max_bytes: DEFAULT_MAX_BYTES,
            connect_timeout: Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_S),
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_S),
            secrets: None,
        }
    }
}

impl Settings {
    /// The settings as `run.start` records them.
    pub fn fields(&self) -> Value {
        let rules: Vec<Value> = self
            .policy
            .rules
            .iter()
            .map(|r| {
                json!({
                    "action": match r.action {
                        policy::Action::Allow => "allow",
                        policy::Action::Deny => "deny",
                    },
                    "rule": r.text,
                    "source": r.source,
                })
            })
            .collect();
        let forwards: Vec<Value> = self
            .policy
            .host_ports
            .iter()
            .map(|(g, h)| json!({"port": g, "host_port": h}))
            .collect();
        json!({
            "default": "deny",
            "rules": rules,
            "host_ports": forwards,
            "max_tunnels": self.max_tunnels,
            "max_bytes": self.max_bytes,
            "connect_timeout_s": self.connect_timeout.as_secs(),
            "idle_timeout_s": self.idle_timeout.as_secs(),
        })
    }

    /// The guest's boot word listing the forwarded ports, if any.
    pub fn cmdline_word(&self) -> Option<String> {
        if self.policy.host_ports.is_empty() {
            return None;
        }
        let ports: Vec<String> = self
            .policy
            .host_ports
            .iter()
            .map(|(g, _)| g.to_string())
            .collect();
        Some(format!("airlock.host_ports={}", ports.join(",")))
    }
}

/// What the door shares between its tunnels.
#[derive(Debug)]
pub(crate) struct Door {
    pub(crate) settings: Settings,
    pub(crate) audit: AuditLog,
    /// Bytes both ways, all tunnels (against `max_bytes`).
    pub(crate) bytes: AtomicU64,
    pub(crate) bytes_up: AtomicU64,
    pub(crate) bytes_down: AtomicU64,
    pub(crate) tunnels: AtomicU64,
    pub(crate) denied: AtomicU64,
    /// `secret.used` and `secret.refused` so far (recorded up to their caps).
    pub(crate) secret_used: AtomicU64,
    pub(crate) secret_refused: AtomicU64,
    told: Mutex<HashSet<String>>,
}

/// A refusal, as the guest hears it and the audit log records it.
pub(crate) struct Denial {
    pub(crate) kind: Option<&'static str>,
    pub(crate) name: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) reason: &'static str,
    pub(crate) rule: Option<String>,
    pub(crate) message: String,
}

impl Door {
    pub(crate) fn new(settings: Settings, audit: AuditLog) -> Self {
        Self {
            settings,
            audit,
            bytes: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            tunnels: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            secret_used: AtomicU64::new(0),
            secret_refused: AtomicU64::new(0),
            told: Mutex::new(HashSet::new()),
        }
    }

    /// Records a denial (the first [`MAX_DENIED_RECORDS`]) and tells the
    /// first of each destination on stderr.
    pub(crate) fn denied(&self, d: Denial) {
        let n = self.denied.fetch_add(1, Ordering::SeqCst);
        if d.reason == "policy" {
            let key = format!("{:?}:{:?}", d.name, d.port);
            let mut told = self.told.lock().unwrap_or_else(PoisonError::into_inner);
            if told.len() < MAX_TOLD && told.insert(key) {
                eprintln!("{}", d.message);
            }
        }
        if n < MAX_DENIED_RECORDS {
            self.audit.record(
                &NetDenied {
                    kind: d.kind,
                    name: d.name,
                    port: d.port,
                    reason: d.reason,
                    rule: d.rule,
                    message: d.message,
                },
                Durability::Synced,
            );
        }
    }
}

/// The egress port of a run, apart from its listener. Dropping it, after
/// the port server, ends the tunnels still open and writes `net.summary`.
#[derive(Debug)]
pub struct EgressPort {
    live: Arc<Live>,
    door: Arc<Door>,
}

/// The egress port for the port server (`<vsock_uds>_1030`) and the
/// [`EgressPort`] that ends it.
pub fn port(settings: &Settings, listener: UnixListener, audit: &AuditLog) -> (Port, EgressPort) {
    let door = Arc::new(Door::new(settings.clone(), audit.clone()));
    let (port, live) = Port::each_on_thread(
        airlock_protocol::EGRESS_PORT,
        listener,
        MAX_CONNECTIONS,
        settings.max_tunnels,
        "egress",
        {
            let door = Arc::clone(&door);
            move |id, stream: &UnixStream| tunnel::serve(&door, id, stream)
        },
    );
    (port, EgressPort { live, door })
}

impl Drop for EgressPort {
    fn drop(&mut self) {
        // The VM is gone: the tunnels end as their guest side closes.
        self.live.wait(Instant::now() + FINISH);
        let unfinished = self.live.shut_down();
        // Give the shut-down tunnels a moment to write their net.close.
        self.live.wait(Instant::now() + FINISH);
        let denied = self.door.denied.load(Ordering::SeqCst);
        self.door.audit.record(
            &NetSummary {
                tunnels: self.door.tunnels.load(Ordering::SeqCst),
                denied,
                denied_unrecorded: denied.saturating_sub(MAX_DENIED_RECORDS),
                bytes_up: self.door.bytes_up.load(Ordering::SeqCst),
                bytes_down: self.door.bytes_down.load(Ordering::SeqCst),
                unfinished_at_end: unfinished,
                secrets: self.door.settings.secrets.as_ref().map(|_| {
                    let used = self.door.secret_used.load(Ordering::SeqCst);
                    let refused = self.door.secret_refused.load(Ordering::SeqCst);
                    crate::audit::records::SecretCounts {
                        used,
                        used_unrecorded: used.saturating_sub(MAX_SECRET_USED_RECORDS),
                        refused,
                        refused_unrecorded: refused.saturating_sub(MAX_SECRET_REFUSED_RECORDS),
                    }
                }),
            },
            Durability::Synced,
        );
    }
}
