//! The audit log: a tamper-evident record of everything that crosses the
//! airlock, one append-only JSON Lines file per run.
//!
//! # Format
//!
//! Each line is one record ([`record::Record`]):
//!
//! ```text
//! {"seq":N,"ts":"2025-06-01T12:34:56.123456Z","kind":"…","source":"host"|"guest","fields":{…},"prev":"<sha256 hex>"}
//! ```
//!
//! - `seq` counts from 0 with no gap; `ts` is RFC 3339 UTC (microseconds).
//! - `source`: `host` = observed by the broker; `guest` = claimed by the
//!   guest and not verified (a compromised guest can claim anything).
//! - `prev` = sha256 of the previous record's canonical bytes, i.e. its
//!   line exactly as written without the newline (64 zeros for the first).
//!
//! The first record is `run.start`, then come the run's records, then
//! `run.end`, then `run.seal`, whose every byte is fixed by what precedes
//! it (its `sha256` is the hash of `run.end`, its `ts` the `run.end`'s),
//! signed with Ed25519 when the run had `--audit-key` ([`keys`]). A run
//! that was killed leaves a log that stops after its last complete record.
//!
//! # Record kinds
//!
//! From the broker (`host`):
//!
//! | kind | when | fields |
//! |---|---|---|
//! | `run.start` | before the VM starts | `airlock_version`, `protocol_version`, `run_id`, `kernel`/`initrd`/`init` {`path`, `sha256`, `bytes`}, `policy` {`engine`, `engine_requested`, `timeout_s`, `boot_deadline_s`, `max_output_bytes`, `mem_mib`, `cpus`, `network`, `audit_max_guest_records`, `audit_max_guest_bytes`}, `spec` {`argv`, `env` (names and values, as given with `--env`), `env_note`, `cwd`, `stdin`}, `audit` {`public_key`}, `host` {`pid`, `uid`} |
//! | `vm.start` | the engine's processes started | `engine`, `processes` [{`name`, `pid`}] |
//! | `control.accepted` | the guest's connection to a port that serves one (control 1024, workspace 1025, results 1026) | `port` |
//! | `control.refused` | a further connection to such a port, closed at once | `port`, `count` |
//! | `control.capped` | a port took its most connections (64 for those, 10 000 for the model port 1027) and was closed | `port`, `max` |
//! | `control.failed` | a port's listener failed, or a connection could not be served | `port`, `error` |
//! | `files.done` | the workspace or the results stream ended | `direction` (`in`/`out`), its counts or `error` |
//! | `session.hello` | the guest's `Hello` | `version`, `capabilities` |
//! | `policy.output_limit` | output first cut at `--max-output-bytes` | `limit_bytes`, `stream` |
//! | `protocol.error` | the guest broke the protocol | `reason` |
//! | `audit.overflow` | guest records were dropped at the caps (once, at the end) | `dropped_records`, `dropped_bytes`, `written_records`, `written_bytes`, `max_guest_records`, `max_guest_bytes` |
//! | `vm.exit` | the VM is gone (on tcg, a guest that never reached the host is booted once more: `vm.exit`, its `why` ending "airlock boots it again", then `vm.start` again) | `status`, `stopped_by` (`itself`/`airlock`), `why` |
//! | `run.end` | last but the seal | `how` (`exited`, `signaled`, `spawn_failed`, `timeout`, `boot_failure`, `protocol_error`, `interrupted`, `audit_failure`, `error`), `exit_code` (airlock's), `command_status`, `message`, `durations_ms` {`total`, `boot`, `command`}, `output`, `guest_records` |
//! | `run.seal` | the end | `sha256`, and if signed `alg`, `public_key`, `signature` |
//! | `model.call` | a model call forwarded upstream (see `crate::model`) | `call`, `api`, `method`, `target`, `model`, `status`, `input_tokens`, `output_tokens` (from the response's usage, streaming included), `latency_ms`, `upstream_head_ms`, `first_chunk_ms`, `request_bytes`, `request_sha256`, `forwarded_sha256`, `max_tokens_capped`, `reserved`, `charged`, `scrubbed`, `response_bytes`, `response_sha256`, `complete`, `error`, `dropped_headers`, `guest_credentials_dropped` |
//! | `model.denied` | a model call refused (the agent got an API-shaped error) | `api`, `method`, `target`, `model`, `reason`, `status`, `message`, `request_bytes`, `dropped_headers`, `guest_credentials_dropped` |
//! | `model.protocol_error` | a model connection broke the protocol (closed unanswered) | `port`, `reason` |
//! | `model.summary` | at the end of every run | `calls`, `denied`, `protocol_errors`, `unrecorded`, `requests_admitted`, `input_tokens`, `output_tokens`, `unfinished_at_end` |
//! | `file.in` | a workspace file sent to the guest | `path`, `size`, `sha256` |
//! | `file.out` | a result file from the guest | `path`, and `size`, `sha256`, `accepted: true`, or `accepted: false` and `reason` |
//!
//! From the guest (`guest`): `command.exit` and `command.spawn_failed` (the
//! `Exit` and `Error{SpawnFailed}` messages, as the broker read them), and
//! the init's `AuditEvent`s, whose fields are all strings (PROTOCOL.md):
//! `process.start` (`pid`, `argv`, `cwd`), `process.exit` (`pid`, `code` or
//! `signal`, `timed_out`), `exec` (`pid`, `tid`, `argv` or
//! `argv_unavailable`, `comm`: every exec in the VM, from the kernel's
//! process events connector, rate-limited in the guest), `exit` (`pid`,
//! `code` or `signal`, for processes whose exec was recorded),
//! `exec.dropped` (`dropped`, `dropped_total`, `kernel_overruns`: events the
//! guest could not report), `audit.unavailable` (`reason`) and
//! `container.prepared` (`pid`: the command is the agent's container that
//! the snapshot held started, adopted after the wake; the engine's own
//! `exec` events of its start came before the wake; docs/SNAPSHOTS.md). The guest's records are capped per run
//! (`--audit-max-guest-events`, `--audit-max-guest-bytes`); beyond the caps
//! they are counted, not written.

pub mod digest;
pub mod keys;
pub mod log;
pub mod record;
pub mod records;
pub mod show;
pub mod time;
pub mod verify;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub use log::{AuditLog, Durability, Limits};

/// The record kinds the broker writes.
pub mod kind {
    pub const RUN_START: &str = "run.start";
    pub const RUN_END: &str = "run.end";
    pub const RUN_SEAL: &str = "run.seal";
    pub const VM_START: &str = "vm.start";
    pub const VM_EXIT: &str = "vm.exit";
    pub const CONTROL_ACCEPTED: &str = "control.accepted";
    pub const CONTROL_REFUSED: &str = "control.refused";
    pub const CONTROL_CAPPED: &str = "control.capped";
    pub const CONTROL_FAILED: &str = "control.failed";
    pub const SESSION_HELLO: &str = "session.hello";
    pub const POLICY_OUTPUT_LIMIT: &str = "policy.output_limit";
    pub const PROTOCOL_ERROR: &str = "protocol.error";
    pub const AUDIT_OVERFLOW: &str = "audit.overflow";
    /// A workspace file sent to the guest (`path`, `size`, `sha256`).
    pub const FILE_IN: &str = "file.in";
    /// A result file from the guest: `path`, and `size` + `sha256` and
    /// `accepted: true`, or `accepted: false` and `reason`.
    pub const FILE_OUT: &str = "file.out";
    /// A workspace or results stream as a whole (counts, or its error).
    pub const FILES_DONE: &str = "files.done";
    /// Guest claims read off the protocol.
    pub const COMMAND_EXIT: &str = "command.exit";
    pub const COMMAND_SPAWN_FAILED: &str = "command.spawn_failed";
    /// A live sandbox's exec began: `id`, `argv`, `env_names`, `cwd`,
    /// `stdin`, `user`.
    pub const SANDBOX_EXEC: &str = "sandbox.exec";
    /// An exec ended, as the host saw it: `id`, `duration_ms`,
    /// `stdout_bytes`, `stderr_bytes`, and `error` if it broke off.
    pub const SANDBOX_EXEC_END: &str = "sandbox.exec_end";
    /// The exit status the guest reported for an exec (a guest claim):
    /// `id`, `status`.
    pub const SANDBOX_EXEC_EXIT: &str = "sandbox.exec_exit";
    /// The sandbox took its first exec: `boot_ms`.
    pub const SANDBOX_READY: &str = "sandbox.ready";
    /// A `create` took the sandbox from its warm pool: `name`, `pool`,
    /// `member` (its name in the pool), `waited_ms`.
    pub const SANDBOX_ADOPT: &str = "sandbox.adopt";
    /// A stop began: `why` (`stop`, `idle`, `lifetime`), `grace_secs`.
    pub const SANDBOX_STOP: &str = "sandbox.stop";
    /// A live mount's connection was refused or ended badly: `index` (if
    /// known), `why`.
    pub const MOUNT_REFUSED: &str = "mount.refused";
    /// A live mount's connection ended: `index`, `target`, `bytes_read`,
    /// `bytes_written`, `created`, `removed`, `refused`, `undecodable`,
    /// `end`.
    pub const MOUNT_DONE: &str = "mount.done";
    /// The share server could not start or stopped early: `error`.
    pub const MOUNT_FAILED: &str = "mount.failed";
    /// An egress tunnel connected: `id`, `kind`, `name`, `port`,
    /// `address`, `rule`, `connect_ms`.
    pub const NET_CONNECT: &str = "net.connect";
    /// An egress tunnel ended: `id`, `name`, `port`, `address`,
    /// `bytes_up` (guest to destination), `bytes_down`, `duration_ms`,
    /// `end`.
    pub const NET_CLOSE: &str = "net.close";
    /// An egress tunnel refused: `kind`, `name`, `port`, `reason`
    /// (`policy`, `no_such_host`, `refused`, `unreachable`, `limit`,
    /// `bad_request`), `rule`, `message`.
    pub const NET_DENIED: &str = "net.denied";
    /// At the end: `tunnels`, `denied`, `denied_unrecorded`, `bytes_up`,
    /// `bytes_down`, `unfinished_at_end`.
    pub const NET_SUMMARY: &str = "net.summary";
    /// A secret put into a request to a bound host: `name`, `host`,
    /// `port`, `header` (where), `request_sha256` (of the request line as
    /// the agent sent it); never the value.
    pub const SECRET_USED: &str = "secret.used";
    /// A request or connection refused by the secrets' rules: `name` (the
    /// secret, when one was involved), `host`, `port`, `reason`
    /// (`placeholder_for_other_host`, `placeholder_in_clear_text`,
    /// `host_mismatch`, `sni_mismatch`, `upstream_tls`, `http2`, `unreadable_answer`,
    /// `secret_unavailable`, `bad_request`, `head_too_large`), `message`.
    pub const SECRET_REFUSED: &str = "secret.refused";
}

/// The default of `--audit-max-guest-events`.
pub const DEFAULT_MAX_GUEST_RECORDS: u64 = 10_000;
/// The default of `--audit-max-guest-bytes`: 16 MiB.
pub const DEFAULT_MAX_GUEST_BYTES: u64 = 16 << 20;
/// Largest log `verify` and `show` read.
const MAX_LOG_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the audit log {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the audit log {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the audit log could not be written: {0}")]
    Write(String),
    #[error("cannot encode an audit record: {0}")]
    Encode(String),
    #[error(
        "no state directory for the audit log: set XDG_STATE_HOME or HOME, or pass --audit FILE"
    )]
    NoStateDir,
    #[error(transparent)]
    Key(#[from] keys::Error),
    #[error(
        "the audit log {} was replaced or removed during the run: the file there is not the \
         log airlock wrote, which is kept at {}", path.display(), kept.display()
    )]
    Replaced { path: PathBuf, kept: PathBuf },
    #[error(
        "the audit log {} was replaced or removed during the run, and the log airlock wrote \
         could not be kept beside it", path.display()
    )]
    Lost {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A fresh run id: 16 hex digits from the kernel's random source (the
/// process id and clock if that fails).
pub fn new_run_id() -> String {
    let mut bytes = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        let now = time::micros(std::time::SystemTime::now());
        let mixed = u64::from(std::process::id()).rotate_left(32) ^ now.unsigned_abs();
        bytes = mixed.to_le_bytes();
    }
    record::hex(&bytes)
}

pub fn read_log(path: &Path) -> Result<Vec<u8>, Error> {
    let read_error = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .map_err(read_error)?
        .take(MAX_LOG_BYTES)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    Ok(bytes)
}
