//! The records the broker writes about a run, as types: each struct is one
//! record kind ([`HostRecord::KIND`]) and its fields are exactly the
//! struct's, so that what a record holds is read here, in one place, and
//! checked by the compiler rather than spelled out in `json!` literals
//! where it is written. Written with [`super::AuditLog::record`].
//!
//! Guest claims and guest events are not here: they carry what the guest
//! said, recorded as received ([`super::AuditLog::guest_claim`]).

use serde::Serialize;
use serde_json::Value;

use super::kind;

/// A record kind the broker writes about what it saw or did.
pub trait HostRecord: Serialize {
    /// The record's `kind`.
    const KIND: &'static str;
}

// ---- The run ([`crate::run`]) ----

/// `run.start`: what will boot (with hashes), the policy in force and the
/// run spec; written before the VM starts.
#[derive(Debug, Serialize)]
pub struct RunStart {
    pub airlock_version: &'static str,
    pub protocol_version: u32,
    pub run_id: String,
    pub kernel: Hashed,
    /// Initramfs mode: the initrd booted.
    pub initrd: Option<Hashed>,
    /// Image mode: the root image booted.
    pub root_image: Option<Hashed>,
    pub init: Init,
    pub policy: Policy,
    pub spec: Spec,
    pub audit: AuditKey,
    pub host: Host,
    /// `--image`: the container's image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_image: Option<ContainerImage>,
}

impl HostRecord for RunStart {
    const KIND: &'static str = kind::RUN_START;
}

/// A file as booted: where it was and its hash.
#[derive(Debug, Serialize)]
pub struct Hashed {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// The guest's init: hashed when it could be found in the initrd; else a
/// note says what covers it.
#[derive(Debug, Serialize)]
pub struct Init {
    pub path: Option<String>,
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

/// The policy a run is held to.
#[derive(Debug, Serialize)]
pub struct Policy {
    pub engine: &'static str,
    pub engine_requested: &'static str,
    pub engine_reason: String,
    pub timeout_s: u64,
    pub boot_deadline_s: u64,
    pub max_output_bytes: u64,
    pub mem_mib: u32,
    pub cpus: u8,
    /// Always `none`: the guest has no network device.
    pub network: &'static str,
    pub extra_cmdline: Vec<String>,
    pub boot_cmdline: Vec<String>,
    pub container: bool,
    pub nested_containers: bool,
    pub command_user: String,
    pub collect: Vec<String>,
    pub audit_max_guest_records: u64,
    pub audit_max_guest_bytes: u64,
    /// The model proxy's settings, without keys ([`crate::model::Settings::fields`]).
    pub model: Value,
    /// The live mounts (`--mount`, `-v`), in the order the guest numbers
    /// them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountRecord>,
    /// The secrets (`--secret`, `--secret-bind`): names, sources, bindings,
    /// the sandbox CA's fingerprint; never a value ([`crate::secrets::Secrets::fields`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Value>,
    /// The egress door's policy and limits ([`crate::egress::Settings::fields`]).
    pub egress: Value,
}

/// One live mount as `run.start` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MountRecord {
    pub source: String,
    pub target: String,
    /// `ro` or `rw`.
    pub mode: &'static str,
    /// `dir` or `file`.
    pub kind: &'static str,
    /// Who files made through it belong to on the host.
    pub uid: u32,
    pub gid: u32,
    /// What the guest may add through it (`--mount-max-write`,
    /// `--mount-max-files`).
    pub max_write_bytes: u64,
    pub max_files: u64,
}

/// `mount.refused`: a mount connection the share server would not serve,
/// or a share ended by a request out of bounds.
#[derive(Debug, Serialize)]
pub struct MountRefused {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub why: String,
}

impl HostRecord for MountRefused {
    const KIND: &'static str = kind::MOUNT_REFUSED;
}

/// `mount.done`: what one live mount did, when its connection ended.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq, Eq)]
pub struct MountDone {
    pub index: u32,
    pub target: String,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub created: u64,
    pub removed: u64,
    /// Requests refused by the share's rules (names, deny list,
    /// read-only, bounds).
    pub refused: u64,
    /// Requests the server could not decode (a hostile guest kernel).
    pub undecodable: u64,
    /// `closed`, or why the connection was ended.
    pub end: String,
}

impl HostRecord for MountDone {
    const KIND: &'static str = kind::MOUNT_DONE;
}

/// `mount.failed`: the share server failed or stopped early.
#[derive(Debug, Serialize)]
pub struct MountFailed {
    pub error: String,
}

impl HostRecord for MountFailed {
    const KIND: &'static str = kind::MOUNT_FAILED;
}

/// `net.connect`: an egress tunnel connected.
#[derive(Debug, Serialize)]
pub struct NetConnect {
    pub id: u64,
    pub kind: &'static str,
    pub name: String,
    pub port: u16,
    pub address: String,
    pub rule: String,
    pub connect_ms: u64,
}

impl HostRecord for NetConnect {
    const KIND: &'static str = kind::NET_CONNECT;
}

/// `net.close`: an egress tunnel ended.
#[derive(Debug, Serialize)]
pub struct NetClose {
    pub id: u64,
    pub name: String,
    pub port: u16,
    pub address: String,
    /// Guest to destination.
    pub bytes_up: u64,
    /// Destination to guest.
    pub bytes_down: u64,
    pub duration_ms: u64,
    /// `closed`, `idle_timeout`, `byte_limit`, `sandbox_end`, or the error.
    pub end: String,
}

impl HostRecord for NetClose {
    const KIND: &'static str = kind::NET_CLOSE;
}

/// `net.denied`: an egress tunnel refused.
#[derive(Debug, Serialize)]
pub struct NetDenied {
    pub kind: Option<&'static str>,
    pub name: Option<String>,
    pub port: Option<u16>,
    /// `policy`, `no_such_host`, `refused`, `unreachable`, `limit`,
    /// `bad_request`.
    pub reason: &'static str,
    /// The deny rule, the allow rule a special address was refused under,
    /// or `default`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub message: String,
}

impl HostRecord for NetDenied {
    const KIND: &'static str = kind::NET_DENIED;
}

/// `secret.used`: a secret's value put into a request to a bound host.
#[derive(Debug, Serialize)]
pub struct SecretUsed {
    pub name: String,
    pub host: String,
    pub port: u16,
    /// The headers (or `(request line)`) it went into.
    pub header: String,
    /// SHA-256 of the request line as the agent sent it.
    pub request_sha256: String,
}

impl HostRecord for SecretUsed {
    const KIND: &'static str = kind::SECRET_USED;
}

/// `secret.refused`: a request or connection refused by the secrets' rules.
#[derive(Debug, Serialize)]
pub struct SecretRefused {
    pub name: Option<String>,
    pub host: String,
    pub port: u16,
    pub reason: &'static str,
    pub message: String,
}

impl HostRecord for SecretRefused {
    const KIND: &'static str = kind::SECRET_REFUSED;
}

/// `net.summary`: the egress door at the end of the run.
#[derive(Debug, Serialize)]
pub struct NetSummary {
    pub tunnels: u64,
    pub denied: u64,
    /// Denials past the record cap, counted only.
    pub denied_unrecorded: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub unfinished_at_end: usize,
    /// With secrets: values put into requests, and refusals, with those
    /// past the record cap counted only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SecretCounts>,
}

/// `net.summary`'s `secrets`.
#[derive(Debug, Serialize)]
pub struct SecretCounts {
    pub used: u64,
    pub used_unrecorded: u64,
    pub refused: u64,
    pub refused_unrecorded: u64,
}

impl HostRecord for NetSummary {
    const KIND: &'static str = kind::NET_SUMMARY;
}

/// The run spec as sent.
#[derive(Debug, Serialize)]
pub struct Spec {
    pub argv: Vec<String>,
    /// The `--env` names and values as given.
    pub env: serde_json::Map<String, Value>,
    pub env_note: &'static str,
    pub cwd: String,
    pub stdin: bool,
    pub timeout_ms: Option<u64>,
}

/// The key the log's seal is signed with, if any.
#[derive(Debug, Serialize)]
pub struct AuditKey {
    pub public_key: Option<String>,
}

/// The host process that ran airlock.
#[derive(Debug, Serialize)]
pub struct Host {
    pub pid: u32,
    pub uid: Option<u32>,
}

/// The container's image.
#[derive(Debug, Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum ContainerImage {
    /// `--image FILE`: an archive the guest loads.
    File {
        path: String,
        format: &'static str,
        sha256: String,
        bytes: u64,
    },
    /// `--image NAME`: an image of the store, booted from its disk.
    Store {
        reference: String,
        digest: String,
        names: Vec<String>,
        disk: Hashed,
        /// Where the command, environment, directory and user came from.
        config_applied: Option<Value>,
    },
}

/// `vm.start`: the engine and its processes.
#[derive(Debug, Serialize)]
pub struct VmStart<'a> {
    pub engine: &'a str,
    pub processes: Vec<VmProcess>,
    /// Woken from a snapshot of the cache (kvm): its key, the SHA-256 of
    /// its state file, and whether this run made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<crate::engine::snapshot::Used>,
}

/// One process of the engine.
#[derive(Debug, Serialize)]
pub struct VmProcess {
    pub name: String,
    pub pid: u32,
}

impl HostRecord for VmStart<'_> {
    const KIND: &'static str = kind::VM_START;
}

/// `vm.exit`: how the VM process ended, who stopped it and why.
#[derive(Debug, Serialize)]
pub struct VmExit {
    /// The engine process's exit status, as the host saw it (`None`: it
    /// could not be reaped).
    pub status: Option<String>,
    /// `itself` or `airlock`.
    pub stopped_by: &'static str,
    pub why: String,
}

impl HostRecord for VmExit {
    const KIND: &'static str = kind::VM_EXIT;
}

/// The command's status, as the guest reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    /// `{"exited": code}`.
    Exited(u8),
    /// `{"signal": number}`.
    Signal(u8),
}

impl From<airlock_protocol::ExitStatus> for CommandStatus {
    fn from(status: airlock_protocol::ExitStatus) -> CommandStatus {
        match status {
            airlock_protocol::ExitStatus::Exited(code) => CommandStatus::Exited(code),
            airlock_protocol::ExitStatus::Signaled(signal) => CommandStatus::Signal(signal),
        }
    }
}

/// `run.end`: how the run ended, the exit code airlock gives, the line it
/// printed, and how long each part took.
#[derive(Debug, Serialize)]
pub struct RunEnd {
    /// `exited`, `signaled`, `spawn_failed`, `timeout`, `boot_failure`,
    /// `protocol_error`, `output_limit`, `out_of_memory`, `interrupted`,
    /// `audit_failure`, or `error` (the run could not be carried through).
    pub how: &'static str,
    pub exit_code: u8,
    pub command_status: Option<CommandStatus>,
    pub message: Option<String>,
    pub durations_ms: Durations,
}

/// A run's durations, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Durations {
    pub total: u64,
    /// From the VM's start to the guest's Hello.
    pub boot: Option<u64>,
    /// From the guest's Hello to the command's exit status.
    pub command: Option<u64>,
}

impl HostRecord for RunEnd {
    const KIND: &'static str = kind::RUN_END;
}

/// `control.accepted`: a guest connection to a port was taken.
#[derive(Debug, Serialize)]
pub struct PortAccepted {
    pub port: u32,
}

impl HostRecord for PortAccepted {
    const KIND: &'static str = kind::CONTROL_ACCEPTED;
}

/// `control.refused`: a guest connection to a port that takes only one
/// was closed unread; `count` such so far on that port.
#[derive(Debug, Serialize)]
pub struct PortRefused {
    pub port: u32,
    pub count: u32,
}

impl HostRecord for PortRefused {
    const KIND: &'static str = kind::CONTROL_REFUSED;
}

/// `control.capped`: a port took `max` connections and was closed.
#[derive(Debug, Serialize)]
pub struct PortCapped {
    pub port: u32,
    pub max: u64,
}

impl HostRecord for PortCapped {
    const KIND: &'static str = kind::CONTROL_CAPPED;
}

/// `control.failed`: a port stopped accepting, or a connection could not
/// be served.
#[derive(Debug, Serialize)]
pub struct PortFailed {
    pub port: u32,
    pub error: String,
}

impl HostRecord for PortFailed {
    const KIND: &'static str = kind::CONTROL_FAILED;
}

/// `files.done`: a workspace or results stream as a whole.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum FilesDone {
    /// The workspace, sent.
    In {
        direction: Direction,
        entries: u64,
        bytes: u64,
        denied: u64,
        symlinks: u64,
        skipped: u64,
    },
    /// The results, received.
    Out {
        direction: Direction,
        accepted: u64,
        refused: u64,
        bytes: u64,
        unrecorded: Unrecorded,
        dir_mtimes_not_restored: u64,
    },
    /// The stream ended in an error; `abandoned` for results whose
    /// deadline passed.
    Failed {
        direction: Direction,
        error: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        abandoned: Option<bool>,
    },
}

impl HostRecord for FilesDone {
    const KIND: &'static str = kind::FILES_DONE;
}

/// Which way a files stream went.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

/// Result files past the audit caps: counted and hashed, not listed.
#[derive(Debug, Serialize)]
pub struct Unrecorded {
    pub accepted: u64,
    pub refused: u64,
    pub records_sha256: Option<String>,
}

/// A claim the guest made that the broker read off the protocol (source
/// `guest`: recorded as received, not verified).
pub trait GuestClaim: Serialize {
    /// The record's `kind`.
    const KIND: &'static str;
}

// ---- The control session ([`crate::door::session`]) ----

/// `session.hello`: the guest's `Hello`.
#[derive(Debug, Serialize)]
pub struct SessionHello<'a> {
    pub version: u32,
    pub capabilities: &'a [String],
}

impl HostRecord for SessionHello<'_> {
    const KIND: &'static str = kind::SESSION_HELLO;
}

/// `policy.output_limit`: the command's output was first cut at
/// `--max-output-bytes`, on `stream` (`stdout` or `stderr`).
#[derive(Debug, Serialize)]
pub struct OutputLimit {
    pub limit_bytes: u64,
    pub stream: &'static str,
}

impl HostRecord for OutputLimit {
    const KIND: &'static str = kind::POLICY_OUTPUT_LIMIT;
}

/// `protocol.error`: the guest broke the control protocol.
#[derive(Debug, Serialize)]
pub struct ProtocolError {
    pub reason: String,
}

impl HostRecord for ProtocolError {
    const KIND: &'static str = kind::PROTOCOL_ERROR;
}

/// `command.exit` (guest claim): the command's exit status.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct CommandExit(pub CommandStatus);

impl GuestClaim for CommandExit {
    const KIND: &'static str = kind::COMMAND_EXIT;
}

/// `command.spawn_failed` (guest claim): why the command could not start.
#[derive(Debug, Serialize)]
pub struct SpawnFailed<'a> {
    pub message: &'a str,
}

impl GuestClaim for SpawnFailed<'_> {
    const KIND: &'static str = kind::COMMAND_SPAWN_FAILED;
}

// ---- Files ([`crate::door::files`]) ----

/// `file.in`: a workspace file sent to the guest.
#[derive(Debug, Serialize)]
pub struct FileIn<'a> {
    pub path: &'a str,
    pub size: u64,
    pub sha256: String,
}

impl HostRecord for FileIn<'_> {
    const KIND: &'static str = kind::FILE_IN;
}

/// `file.out`: a result file from the guest, accepted (with its size and
/// hash) or refused (with why, and what was known of it).
#[derive(Debug, Serialize)]
pub struct FileOut<'a> {
    pub path: &'a str,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

impl HostRecord for FileOut<'_> {
    const KIND: &'static str = kind::FILE_OUT;
}

// ---- A live sandbox ([`crate::sandbox::server`]) ----

/// `sandbox.ready`: the sandbox took its first exec.
#[derive(Debug, Serialize)]
pub struct SandboxReady {
    pub boot_ms: u64,
}

impl HostRecord for SandboxReady {
    const KIND: &'static str = kind::SANDBOX_READY;
}

/// `sandbox.adopt`: a `create` took this sandbox from its warm pool and
/// named it; `waited_ms` is how long it had waited since its boot began.
#[derive(Debug, Serialize)]
pub struct SandboxAdopt<'a> {
    pub name: &'a str,
    pub pool: &'a str,
    pub member: &'a str,
    pub waited_ms: u64,
}

impl HostRecord for SandboxAdopt<'_> {
    const KIND: &'static str = kind::SANDBOX_ADOPT;
}

/// `sandbox.stop`: a stop began (`why`: `stop`, `idle`, `lifetime`).
#[derive(Debug, Serialize)]
pub struct SandboxStop<'a> {
    pub why: &'a str,
    pub grace_secs: u64,
}

impl HostRecord for SandboxStop<'_> {
    const KIND: &'static str = kind::SANDBOX_STOP;
}

/// `sandbox.exec`: an exec began. The environment's names only: its
/// values are the user's and may be anything.
#[derive(Debug, Serialize)]
pub struct Exec<'a> {
    pub id: u64,
    pub argv: &'a [String],
    pub env_names: Vec<&'a str>,
    pub cwd: &'a str,
    pub stdin: bool,
    pub user: Option<&'a str>,
}

impl HostRecord for Exec<'_> {
    const KIND: &'static str = kind::SANDBOX_EXEC;
}

/// `sandbox.exec_exit` (guest claim): the exit status the guest reported
/// for exec `id`.
#[derive(Debug, Serialize)]
pub struct ExecExit {
    pub id: u64,
    pub status: CommandStatus,
}

impl GuestClaim for ExecExit {
    const KIND: &'static str = kind::SANDBOX_EXEC_EXIT;
}

/// `sandbox.exec_end`: an exec ended, as the host saw it.
#[derive(Debug, Serialize)]
pub struct ExecEnd {
    pub id: u64,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_bytes: Option<u64>,
    /// Why it broke off, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HostRecord for ExecEnd {
    const KIND: &'static str = kind::SANDBOX_EXEC_END;
}

// ---- The model port ([`crate::model`]) ----

/// `model.call`: a call forwarded upstream (see [`crate::model::kind::CALL`]
/// for each field).
#[derive(Debug, Serialize)]
pub struct ModelCall<'a> {
    pub call: u64,
    pub api: &'static str,
    pub method: &'a str,
    pub target: &'a str,
    pub model: Option<&'a str>,
    pub status: Option<u16>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub latency_ms: u64,
    pub upstream_head_ms: Option<u64>,
    pub first_chunk_ms: Option<u64>,
    pub request_bytes: u64,
    pub request_sha256: &'a str,
    pub forwarded_sha256: Option<String>,
    pub max_tokens_capped: Option<CapRecord>,
    pub reserved: Option<ReservedRecord>,
    pub charged: Charged,
    pub scrubbed: Option<Scrubbed>,
    pub response_bytes: u64,
    pub response_sha256: Option<String>,
    pub complete: bool,
    pub error: Option<String>,
    pub dropped_headers: &'a [String],
    pub guest_credentials_dropped: Vec<&'a str>,
}

impl HostRecord for ModelCall<'_> {
    const KIND: &'static str = crate::model::kind::CALL;
}

/// The output-token cap airlock set on a call.
#[derive(Debug, Serialize)]
pub struct CapRecord {
    pub field: &'static str,
    pub asked: Option<u64>,
    pub sent: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub also: Option<&'static str>,
}

/// What a call held against the token budget while it ran.
#[derive(Debug, Serialize)]
pub struct ReservedRecord {
    pub output: u64,
    pub input_estimate: u64,
    pub n: u64,
}

/// What the run's token count was charged for a call.
#[derive(Debug, Serialize)]
pub struct Charged {
    pub input: u64,
    pub output: u64,
}

/// Keys masked out of an answer.
#[derive(Debug, Serialize)]
pub struct Scrubbed {
    pub headers: usize,
    pub body: usize,
}

/// `model.denied`: a call refused; the agent got an API-shaped error.
#[derive(Debug, Serialize)]
pub struct ModelDenied<'a> {
    pub api: &'static str,
    pub method: &'a str,
    pub target: &'a str,
    pub model: Option<&'a str>,
    pub reason: &'static str,
    pub status: u16,
    pub message: &'a str,
    pub request_bytes: u64,
    pub dropped_headers: &'a [String],
    pub guest_credentials_dropped: Vec<&'a str>,
}

impl HostRecord for ModelDenied<'_> {
    const KIND: &'static str = crate::model::kind::DENIED;
}

/// `model.protocol_error`: a model connection broke the protocol and was
/// closed unanswered.
#[derive(Debug, Serialize)]
pub struct ModelProtocolError {
    pub port: u32,
    pub reason: String,
}

impl HostRecord for ModelProtocolError {
    const KIND: &'static str = crate::model::kind::PROTOCOL_ERROR;
}

/// `model.summary`: the model port's counts at the end of the run.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub calls: u64,
    pub denied: u64,
    pub protocol_errors: u64,
    /// Denials and protocol errors past the records' cap.
    pub unrecorded: u64,
    pub requests_admitted: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Connections still open when the run ended (set then).
    pub unfinished_at_end: Option<usize>,
}

impl HostRecord for ModelSummary {
    const KIND: &'static str = crate::model::kind::SUMMARY;
}

// ---- The log's own ([`super::log`]) ----

/// `audit.overflow`: guest records were dropped at the caps (once, at the
/// end).
#[derive(Debug, Serialize)]
pub struct AuditOverflow {
    pub dropped_records: u64,
    pub dropped_bytes: u64,
    pub written_records: u64,
    pub written_bytes: u64,
    pub max_guest_records: u64,
    pub max_guest_bytes: u64,
}

impl HostRecord for AuditOverflow {
    const KIND: &'static str = kind::AUDIT_OVERFLOW;
}

/// `run.end`'s `guest_records`: the guest's records written and dropped.
#[derive(Debug, Serialize)]
pub struct GuestRecords {
    pub written: u64,
    pub written_bytes: u64,
    pub dropped: u64,
    pub dropped_bytes: u64,
}

/// `run.end`'s `output`: the command's output passed on and cut.
#[derive(Debug, Serialize)]
pub struct OutputCounts {
    pub forwarded_bytes: u64,
    pub discarded_bytes: u64,
}

/// `run.seal`: the hash of `run.end` and, when the run had a key, its
/// Ed25519 signature (every byte fixed by what precedes it).
#[derive(Debug, Serialize)]
pub struct RunSeal {
    pub sha256: String,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub signed: Option<Signature>,
}

/// A seal's signature.
#[derive(Debug, Serialize)]
pub struct Signature {
    pub alg: &'static str,
    pub public_key: String,
    pub signature: String,
}

impl HostRecord for RunSeal {
    const KIND: &'static str = kind::RUN_SEAL;
}

/// Encodes a record's fields. The types here have string keys and no
/// fallible `Serialize`, so this does not fail; if it ever did, the record
/// says so rather than vanishing.
pub fn fields<R: Serialize>(record: &R) -> Value {
    serde_json::to_value(record)
        .unwrap_or_else(|e| serde_json::json!({ "unencodable": e.to_string() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_encode_as_the_log_documents_them() {
        assert_eq!(
            fields(&RunEnd {
                how: "exited",
                exit_code: 7,
                command_status: Some(airlock_protocol::ExitStatus::Exited(7).into()),
                message: None,
                durations_ms: Durations {
                    total: 10,
                    boot: Some(4),
                    command: None,
                },
            }),
            json!({ "how": "exited", "exit_code": 7, "command_status": { "exited": 7 },
                    "message": null,
                    "durations_ms": { "total": 10, "boot": 4, "command": null } })
        );
        assert_eq!(
            serde_json::to_value(CommandStatus::from(airlock_protocol::ExitStatus::Signaled(
                9
            )))
            .expect("encodes"),
            json!({ "signal": 9 })
        );
        assert_eq!(
            fields(&FilesDone::Failed {
                direction: Direction::Out,
                error: "x".into(),
                abandoned: Some(true),
            }),
            json!({ "direction": "out", "error": "x", "abandoned": true })
        );
        assert_eq!(
            fields(&FilesDone::Failed {
                direction: Direction::In,
                error: "x".into(),
                abandoned: None,
            }),
            json!({ "direction": "in", "error": "x" })
        );
        assert_eq!(
            fields(&PortRefused {
                port: 1026,
                count: 2
            }),
            json!({ "port": 1026, "count": 2 })
        );
    }
}
