//! The supervisor's side of a live sandbox: the control socket
//! (`ctl.sock`) that `airlock exec`, `stop` and `inspect` talk to, and the
//! relay of each exec to the guest's exec port.
//!
//! A request is one JSON line (at most [`MAX_REQUEST`] bytes):
//!
//! - `{"op":"exec","argv":[..],"env":[[name,value],..],"cwd":"/workspace","stdin":bool,"user":"1000"}`
//!   (`user` optional):
//!   then the conversation is protocol frames: the client sends `Stdin` and
//!   `StdinEnd` (with `stdin`), the supervisor relays the guest's `Stdout`,
//!   `Stderr`, `Error` and `Exit`; a failure of its own is an `Error` and
//!   the end of the stream, with no `Exit`.
//! - `{"op":"ready"}`: answers `{"ok":true}` once an exec of `true` in the
//!   sandbox succeeds (the agent's container is up), or `{"ok":false,...}`.
//! - `{"op":"stop","grace_secs":N}`: answers `{"ok":true}`, then stops the
//!   sandbox (SIGTERM to every process of the agent, SIGKILL after N
//!   seconds, then the VM is stopped).
//! - `{"op":"status"}`: `{"ok":true,"execs_running":..,"execs":..,"last_used_unix":..}`.
//! - `{"op":"adopt","name":NAME,"config":{..}}` (a pool's sandbox only,
//!   once, when ready): the sandbox leaves its pool and becomes `NAME`: its
//!   directory moves to the state root under that name (never over an
//!   existing one), `config` (what `airlock create` would have written)
//!   becomes its `config.json`, the idle clock starts, and the audit log
//!   records `sandbox.adopt`.
//!
//! Everything from the guest is read with the protocol's bounds: one
//! frame at a time, at most the frame limit, output counted against
//! `--max-output-bytes` per exec. The client is the user (the socket is in
//! a 0700 directory); it is still bounded.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use airlock_protocol::{
    capability, encode, read_frame, write_frame, ErrorCode, ExitStatus, FrameError, Message,
    RunSpec, EXEC_PORT, PROTOCOL_VERSION,
};
use serde_json::{json, Value};

use super::Dir;
use crate::audit::log::{AuditLog, Durability};
use crate::audit::records::{Exec, ExecEnd, ExecExit, SandboxAdopt, SandboxReady, SandboxStop};

/// Longest request line.
pub const MAX_REQUEST: u64 = 1 << 20;
/// How long the guest has to answer an exec connection's handshake.
const HANDSHAKE: Duration = Duration::from_secs(30);
/// How long `ready` waits for the sandbox to take an exec.
const READY_PATIENCE: Duration = Duration::from_secs(300);
/// The longest a probe or a stop's kill may take in the guest.
const QUIET_PATIENCE: Duration = Duration::from_secs(90);
/// After SIGKILL to the agent, how long before the VM itself is stopped.
const KILL_PATIENCE: Duration = Duration::from_secs(10);

/// What the supervisor of a live sandbox needs beyond a run's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mode {
    pub dir: Dir,
    /// `--idle-timeout`: stop after this long with no exec running.
    pub idle_timeout: Option<Duration>,
    /// The sandbox has an agent container (probe and stop run the keeper
    /// mounted there; without one, the guest image's `true` and `sh`).
    pub container: bool,
    /// The warm pool this sandbox waits in, until a `create` adopts it.
    pub pool: Option<String>,
}

/// The directory of this process's sandbox, as it is now (a pool's
/// sandbox moves when it is adopted).
static CURRENT_DIR: Mutex<Option<Dir>> = Mutex::new(None);

/// Where this supervisor's sandbox lives now, if it serves one.
pub fn current_dir() -> Option<Dir> {
    CURRENT_DIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn set_current_dir(dir: Dir) {
    *CURRENT_DIR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(dir);
}

/// The keeper in the agent's container (guest-init/src/keeper.rs).
const KEEPER_PATH: &str = super::KEEPER[0];

struct Shared {
    container: bool,
    vsock_uds: PathBuf,
    audit: AuditLog,
    max_output: u64,
    started: Instant,
    started_unix: u64,
    running: AtomicUsize,
    execs: AtomicU64,
    last_used: Mutex<(Instant, SystemTime)>,
    ready: AtomicBool,
    stopping: AtomicBool,
    /// The pool it waits in (`None`: an ordinary sandbox).
    pool: Option<String>,
    /// Taken by a `create` (always, outside a pool): the idle clock runs.
    adopted: AtomicBool,
    /// Where an adopted sandbox goes (the state root).
    sandboxes: PathBuf,
}

/// Starts serving `mode.dir`'s control socket (and the idle watchdog).
/// The threads live as long as the supervisor process.
pub fn start(mode: &Mode, vsock_uds: &Path, audit: &AuditLog, max_output: u64) -> io::Result<()> {
    let path = mode.dir.ctl();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    set_current_dir(mode.dir.clone());
    let shared = Arc::new(Shared {
        container: mode.container,
        vsock_uds: vsock_uds.to_path_buf(),
        audit: audit.clone(),
        max_output,
        started: Instant::now(),
        started_unix: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        running: AtomicUsize::new(0),
        execs: AtomicU64::new(0),
        last_used: Mutex::new((Instant::now(), SystemTime::now())),
        ready: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        pool: mode.pool.clone(),
        adopted: AtomicBool::new(mode.pool.is_none()),
        sandboxes: super::root(),
    });
    let accepting = Arc::clone(&shared);
    thread::Builder::new()
        .name("sandbox-ctl".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = Arc::clone(&accepting);
                let _ = thread::Builder::new()
                    .name("sandbox-client".into())
                    .spawn(move || serve_client(stream, &shared));
            }
        })?;
    if let Some(idle) = mode.idle_timeout {
        let watched = Arc::clone(&shared);
        thread::Builder::new()
            .name("sandbox-idle".into())
            .spawn(move || loop {
                thread::sleep(Duration::from_millis(500));
                let last = watched
                    .last_used
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
                // A pool's sandbox waits without an idle clock until adopted.
                if watched.ready.load(Ordering::SeqCst)
                    && watched.adopted.load(Ordering::SeqCst)
                    && watched.running.load(Ordering::SeqCst) == 0
                    && last.elapsed() >= idle
                {
                    stop(&watched, "idle", Duration::from_secs(10));
                    return;
                }
            })?;
    }
    Ok(())
}

fn touch(shared: &Shared) {
    *shared
        .last_used
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = (Instant::now(), SystemTime::now());
}

fn reply(stream: &mut UnixStream, value: &Value) {
    let _ = stream.write_all(format!("{value}\n").as_bytes());
}

fn serve_client(mut stream: UnixStream, shared: &Shared) {
    // Byte by byte: what follows the line (an exec's stdin frames) is not
    // ours to read here.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let read: io::Result<()> = loop {
        match (&stream).read(&mut byte) {
            Ok(0) => break Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) if byte[0] == b'\n' => break Ok(()),
            Ok(_) if line.len() as u64 >= MAX_REQUEST => {
                break Err(io::ErrorKind::InvalidData.into())
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    let request: Value = match read.ok().and_then(|()| serde_json::from_slice(&line).ok()) {
        Some(v) => v,
        None => {
            reply(&mut stream, &json!({"ok": false, "error": "not a request"}));
            return;
        }
    };
    match request["op"].as_str() {
        Some("exec") => exec(stream, &request, shared),
        Some("ready") => {
            let answer = match wait_ready(shared) {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e}),
            };
            reply(&mut stream, &answer);
        }
        Some("stop") => {
            let grace = request["grace_secs"].as_u64().unwrap_or(10).min(3600);
            // The pool's keeper stops only what no `create` has taken; the
            // flag it sets also keeps any `create` from taking it now.
            if request["if_pooled"] == true
                && (shared.pool.is_none() || shared.adopted.swap(true, Ordering::SeqCst))
            {
                reply(
                    &mut stream,
                    &json!({"ok": false, "error": "not a pool's waiting sandbox"}),
                );
                return;
            }
            reply(&mut stream, &json!({"ok": true}));
            drop(stream);
            stop(shared, "stop", Duration::from_secs(grace));
        }
        Some("status") => {
            let last = shared
                .last_used
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .1;
            let unix = last
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            reply(
                &mut stream,
                &json!({
                    "ok": true,
                    "ready": shared.ready.load(Ordering::SeqCst),
                    "stopping": shared.stopping.load(Ordering::SeqCst),
                    "execs_running": shared.running.load(Ordering::SeqCst),
                    "execs": shared.execs.load(Ordering::SeqCst),
                    "last_used_unix": unix,
                    "pool": shared.pool,
                    "adopted": shared.adopted.load(Ordering::SeqCst),
                }),
            );
        }
        Some("adopt") => {
            let answer = match adopt(shared, &request) {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e}),
            };
            reply(&mut stream, &answer);
        }
        _ => reply(&mut stream, &json!({"ok": false, "error": "unknown op"})),
    }
}

/// A `create` takes this pool's sandbox: see the module docs. Only one
/// adoption ever succeeds; a failed one leaves the sandbox in its pool.
fn adopt(shared: &Shared, request: &Value) -> Result<(), String> {
    let Some(pool) = &shared.pool else {
        return Err("this sandbox is not in a pool".into());
    };
    let name = request["name"]
        .as_str()
        .filter(|n| super::valid_name(n))
        .ok_or("adopt needs a valid sandbox name")?;
    let Some(config) = request["config"].as_object() else {
        return Err("adopt needs the sandbox's config".into());
    };
    if !shared.ready.load(Ordering::SeqCst) || shared.stopping.load(Ordering::SeqCst) {
        return Err("this pool's sandbox is not ready".into());
    }
    if shared.adopted.swap(true, Ordering::SeqCst) {
        return Err("this pool's sandbox was already taken".into());
    }
    let from = current_dir().ok_or("the sandbox has no directory")?;
    let to = Dir {
        name: name.to_owned(),
        path: shared.sandboxes.join(name),
    };
    let moved = rename_noreplace(&from.path, &to.path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            format!("a sandbox named {name} already exists")
        } else {
            format!(
                "cannot move {} to {}: {e}",
                from.path.display(),
                to.path.display()
            )
        }
    });
    if let Err(e) = moved {
        shared.adopted.store(false, Ordering::SeqCst);
        return Err(e);
    }
    let mut config = Value::Object(config.clone());
    config["name"] = json!(name);
    config["pool"] = json!({
        "name": pool,
        "booted_unix": shared.started_unix,
        "member": from.name,
    });
    if let Err(e) = super::write_json(&to.config(), &config) {
        // Back into the pool, as it was.
        let _ = rename_noreplace(&to.path, &from.path);
        shared.adopted.store(false, Ordering::SeqCst);
        return Err(format!("cannot write {}: {e}", to.config().display()));
    }
    set_current_dir(to);
    touch(shared);
    shared.audit.record(
        &SandboxAdopt {
            name,
            pool,
            member: &from.name,
            waited_ms: u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        },
        Durability::Synced,
    );
    Ok(())
}

/// rename(2) that never replaces `to` (`RENAME_NOREPLACE`).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens a connection to the guest's exec port through the engine's
/// hybrid-vsock socket and does the handshake.
/// With `user`, the host's `Hello` says an `ExecUser` follows the
/// `RunSpec` (the guest must have listed it).
fn connect_exec(vsock_uds: &Path, user: bool) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(vsock_uds)?;
    stream.set_read_timeout(Some(HANDSHAKE))?;
    stream.write_all(format!("CONNECT {EXEC_PORT}\n").as_bytes())?;
    // "OK <port>\n", byte by byte so nothing of the guest's is read.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 32 {
        if stream.read(&mut byte)? == 0 {
            return Err(io::Error::other("the sandbox does not take execs (yet)"));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::other("the engine refused the exec connection"));
    }
    match read_frame(&mut stream) {
        Ok(Message::Hello {
            version,
            capabilities,
        }) if version == PROTOCOL_VERSION => {
            if user && !capabilities.iter().any(|c| c == capability::USER) {
                return Err(io::Error::other(
                    "this sandbox's guest cannot run an exec as another user",
                ));
            }
        }
        Ok(other) => {
            return Err(io::Error::other(format!(
                "the guest sent {} instead of Hello",
                other.kind()
            )))
        }
        Err(e) => return Err(io::Error::other(format!("the guest's Hello: {e}"))),
    }
    write_frame(
        &mut stream,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            capabilities: if user {
                vec![capability::USER.to_owned()]
            } else {
                Vec::new()
            },
        },
    )
    .map_err(|e| io::Error::other(e.to_string()))?;
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Runs `argv` in the sandbox with no input and its output dropped;
/// its status.
fn run_quiet(shared: &Shared, argv: &[&str], user: Option<&str>) -> io::Result<ExitStatus> {
    let mut guest = connect_exec(&shared.vsock_uds, user.is_some())?;
    let spec = RunSpec {
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
        env: Vec::new(),
        cwd: "/".into(),
        timeout_ms: Some(60_000),
        max_output_bytes: 1 << 20,
        stdin: false,
    };
    write_frame(&mut guest, &Message::RunSpec(spec))
        .map_err(|e| io::Error::other(e.to_string()))?;
    if let Some(user) = user {
        write_frame(&mut guest, &Message::ExecUser { user: user.into() })
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    // A guest that talks on and on does not hold the probe or the stop:
    // the whole exchange has a deadline.
    let deadline = Instant::now() + QUIET_PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let _ = guest.shutdown(Shutdown::Both);
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        guest.set_read_timeout(Some(left))?;
        match read_frame(&mut guest) {
            Ok(Message::Exit(status)) => {
                let _ = guest.shutdown(Shutdown::Write);
                return Ok(status);
            }
            Ok(Message::Stdout(_) | Message::Stderr(_) | Message::Error { .. }) => {}
            Ok(other) => return Err(io::Error::other(format!("unexpected {}", other.kind()))),
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
}

fn wait_ready(shared: &Shared) -> Result<(), String> {
    let deadline = Instant::now() + READY_PATIENCE;
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        if shared.ready.load(Ordering::SeqCst) {
            return Ok(());
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return Err("the sandbox is stopping".into());
        }
        let probe: &[&str] = if shared.container {
            &[KEEPER_PATH, "probe"]
        } else {
            &["true"]
        };
        match run_quiet(shared, probe, None) {
            Ok(ExitStatus::Exited(0)) => {
                if !shared.ready.swap(true, Ordering::SeqCst) {
                    touch(shared);
                    shared.audit.record(
                        &SandboxReady {
                            boot_ms: u64::try_from(shared.started.elapsed().as_millis())
                                .unwrap_or(u64::MAX),
                        },
                        Durability::Synced,
                    );
                }
                return Ok(());
            }
            Ok(status) => last = format!("a probe exited {}", status.exit_code()),
            Err(e) => last = e.to_string(),
        }
        // A probe waits in the guest while the container is being made and
        // started (execd's CONTAINER_PATIENCE); one that failed all the same
        // (the keeper not running yet: `keeper probe`) is tried again soon.
        thread::sleep(Duration::from_millis(100));
    }
    Err(format!("the sandbox did not become ready: {last}"))
}

/// Stops the sandbox: SIGTERM to the agent's processes, SIGKILL after
/// `grace`, and if the VM still runs [`KILL_PATIENCE`] later, SIGTERM to
/// the supervisor itself (which stops the VM and ends the run).
fn stop(shared: &Shared, why: &str, grace: Duration) {
    if shared.stopping.swap(true, Ordering::SeqCst) {
        return;
    }
    shared.audit.record(
        &SandboxStop {
            why,
            grace_secs: grace.as_secs(),
        },
        Durability::Synced,
    );
    // In a container: the keeper, as root there, so that processes of
    // any user are signalled; without one: the sandbox's own user.
    let kill = |sig: &str| {
        if shared.container {
            run_quiet(shared, &[KEEPER_PATH, "kill", sig], Some("0"))
        } else {
            run_quiet(shared, &["/bin/sh", "-c", &format!("kill -{sig} -1")], None)
        }
    };
    let _ = kill("TERM");
    thread::sleep(grace);
    let _ = kill("KILL");
    thread::sleep(KILL_PATIENCE);
    // Still here: the guest does not stop by itself.
    // SAFETY: kill(2) of our own pid with SIGTERM; the run's signal
    // handler turns it into "stop the VM and clean up".
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
}

fn exec(mut client: UnixStream, request: &Value, shared: &Shared) {
    let fail = |client: &mut UnixStream, code: ErrorCode, message: String| {
        let _ = write_frame(client, &Message::Error { code, message });
    };
    if shared.stopping.load(Ordering::SeqCst) {
        fail(
            &mut client,
            ErrorCode::Internal,
            "the sandbox is stopping".into(),
        );
        return;
    }
    let strings = |v: &Value| -> Option<Vec<String>> {
        v.as_array()?
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let argv = strings(&request["argv"]).unwrap_or_default();
    let env: Option<Vec<(String, String)>> = request["env"].as_array().map(|pairs| {
        pairs
            .iter()
            .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())))
            .collect()
    });
    let spec = RunSpec {
        argv,
        env: env.unwrap_or_default(),
        cwd: request["cwd"].as_str().unwrap_or("/workspace").to_owned(),
        timeout_ms: None,
        max_output_bytes: shared.max_output,
        stdin: request["stdin"].as_bool().unwrap_or(false),
    };
    let user = request["user"].as_str().map(str::to_owned);
    let frame = match encode(&Message::RunSpec(spec.clone())).and_then(|mut frame| {
        if let Some(user) = &user {
            frame.extend(encode(&Message::ExecUser { user: user.clone() })?);
        }
        Ok(frame)
    }) {
        Ok(frame) => frame,
        Err(e) => {
            fail(
                &mut client,
                ErrorCode::MalformedFrame,
                format!("bad exec: {e}"),
            );
            return;
        }
    };
    let id = shared.execs.fetch_add(1, Ordering::SeqCst) + 1;
    shared.running.fetch_add(1, Ordering::SeqCst);
    touch(shared);
    let began = Instant::now();
    shared.audit.record(
        &Exec {
            id,
            argv: &spec.argv,
            env_names: spec.env.iter().map(|(n, _)| n.as_str()).collect(),
            cwd: &spec.cwd,
            stdin: spec.stdin,
            user: user.as_deref(),
        },
        Durability::Synced,
    );
    let result = relay(&mut client, &frame, spec.stdin, user.is_some(), shared);
    let mut end = ExecEnd {
        id,
        duration_ms: u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
        stdout_bytes: None,
        stderr_bytes: None,
        error: None,
    };
    match result {
        Ok(r) => {
            end.stdout_bytes = Some(r.stdout_bytes);
            end.stderr_bytes = Some(r.stderr_bytes);
            match r.status {
                Some(status) => shared.audit.claim(
                    &ExecExit {
                        id,
                        status: status.into(),
                    },
                    Durability::Synced,
                ),
                None => end.error = Some(r.error.unwrap_or_default()),
            }
        }
        Err(e) => {
            end.error = Some(e.to_string());
            fail(
                &mut client,
                ErrorCode::Internal,
                format!("exec failed: {e}"),
            );
        }
    }
    shared.audit.record(&end, Durability::Synced);
    shared.running.fetch_sub(1, Ordering::SeqCst);
    touch(shared);
}

#[derive(Debug, Default)]
struct Relayed {
    status: Option<ExitStatus>,
    error: Option<String>,
    stdout_bytes: u64,
    stderr_bytes: u64,
}

fn relay(
    client: &mut UnixStream,
    spec: &[u8],
    stdin: bool,
    user: bool,
    shared: &Shared,
) -> io::Result<Relayed> {
    let mut guest = connect_exec(&shared.vsock_uds, user)?;
    guest.write_all(spec)?;
    // The client's input, to the guest: Stdin frames then StdinEnd.
    if stdin {
        let mut from = client.try_clone()?;
        let mut to = guest.try_clone()?;
        thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || loop {
                match read_frame(&mut from) {
                    Ok(msg @ Message::Stdin(_)) => {
                        if write_frame(&mut to, &msg).is_err() {
                            return;
                        }
                    }
                    Ok(Message::StdinEnd) => {
                        let _ = write_frame(&mut to, &Message::StdinEnd);
                        return;
                    }
                    // The client went away or broke the protocol: the exec
                    // ends.
                    _ => {
                        let _ = to.shutdown(Shutdown::Both);
                        return;
                    }
                }
            })?;
    }
    let mut r = Relayed::default();
    loop {
        let msg = match read_frame(&mut guest) {
            Ok(msg) => msg,
            Err(FrameError::Closed) => {
                r.error = Some("the guest closed the exec before its exit status".into());
                let _ = write_frame(
                    &mut *client,
                    &Message::Error {
                        code: ErrorCode::Internal,
                        message: r.error.clone().unwrap_or_default(),
                    },
                );
                return Ok(r);
            }
            Err(e) => {
                r.error = Some(format!("guest protocol error: {e}"));
                let _ = write_frame(
                    &mut *client,
                    &Message::Error {
                        code: ErrorCode::MalformedFrame,
                        message: r.error.clone().unwrap_or_default(),
                    },
                );
                return Ok(r);
            }
        };
        match &msg {
            Message::Stdout(d) => r.stdout_bytes += d.len() as u64,
            Message::Stderr(d) => r.stderr_bytes += d.len() as u64,
            Message::Error { .. } => {}
            Message::Exit(status) => {
                r.status = Some(*status);
                let _ = guest.shutdown(Shutdown::Write);
                let _ = write_frame(&mut *client, &msg);
                return Ok(r);
            }
            other => {
                r.error = Some(format!("guest protocol error: unexpected {}", other.kind()));
                let _ = write_frame(
                    &mut *client,
                    &Message::Error {
                        code: ErrorCode::UnexpectedMessage,
                        message: r.error.clone().unwrap_or_default(),
                    },
                );
                return Ok(r);
            }
        }
        if r.stdout_bytes + r.stderr_bytes > shared.max_output {
            r.error = Some(format!(
                "the exec's output reached --max-output-bytes ({}); it was stopped",
                shared.max_output
            ));
            let _ = guest.shutdown(Shutdown::Both);
            let _ = write_frame(
                &mut *client,
                &Message::Error {
                    code: ErrorCode::Internal,
                    message: r.error.clone().unwrap_or_default(),
                },
            );
            return Ok(r);
        }
        if write_frame(&mut *client, &msg).is_err() {
            // The client went away: the exec's connection closes, and the
            // guest kills the command.
            r.error = Some("the client went away".into());
            let _ = guest.shutdown(Shutdown::Both);
            return Ok(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::kind;
    use crate::audit::log::TEST_LIMITS;

    /// A fake engine socket playing a guest that runs `script` on the exec
    /// connection (after the `CONNECT` line and `OK`).
    fn fake_guest(
        dir: &Path,
        script: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> (PathBuf, thread::JoinHandle<()>) {
        let uds = dir.join("vsock");
        let listener = UnixListener::bind(&uds).expect("bind");
        let guest = thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).expect("read") == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            assert_eq!(line, format!("CONNECT {EXEC_PORT}").as_bytes());
            s.write_all(b"OK 1073741824\n").expect("ok");
            write_frame(
                &mut s,
                &Message::Hello {
                    version: PROTOCOL_VERSION,
                    capabilities: Vec::new(),
                },
            )
            .expect("hello");
            assert!(matches!(read_frame(&mut s), Ok(Message::Hello { .. })));
            assert!(matches!(read_frame(&mut s), Ok(Message::RunSpec(_))));
            script(&mut s);
        });
        (uds, guest)
    }

    fn shared(uds: PathBuf, max_output: u64) -> (Shared, crate::audit::log::Memory) {
        let (audit, memory) = AuditLog::memory(TEST_LIMITS, None);
        let shared = Shared {
            container: true,
            vsock_uds: uds,
            audit,
            max_output,
            started: Instant::now(),
            running: AtomicUsize::new(0),
            execs: AtomicU64::new(0),
            last_used: Mutex::new((Instant::now(), SystemTime::now())),
            ready: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            pool: None,
            adopted: AtomicBool::new(true),
            started_unix: 0,
            sandboxes: std::env::temp_dir(),
        };
        (shared, memory)
    }

    /// Runs one exec request through [`exec`]; what the client read.
    fn client_sees(shared: &Shared) -> Vec<Message> {
        let (mut client, server) = UnixStream::pair().expect("pair");
        let request = json!({"op": "exec", "argv": ["true"], "env": [["A", "1"]], "cwd": "/", "stdin": false});
        exec(server, &request, shared);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut seen = Vec::new();
        while let Ok(msg) = read_frame(&mut client) {
            seen.push(msg);
        }
        seen
    }

    fn kinds(memory: &crate::audit::log::Memory) -> Vec<Value> {
        String::from_utf8_lossy(&memory.bytes())
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    }

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("airlock-sbx-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn an_exec_is_relayed_and_audited() {
        let dir = tmp("relay");
        let (uds, guest) = fake_guest(&dir, |s| {
            write_frame(&mut *s, &Message::Stdout(b"hi".to_vec())).expect("out");
            write_frame(&mut *s, &Message::Exit(ExitStatus::Exited(3))).expect("exit");
        });
        let (shared, memory) = shared(uds, 1 << 20);
        let seen = client_sees(&shared);
        guest.join().expect("guest");
        assert_eq!(
            seen,
            [
                Message::Stdout(b"hi".to_vec()),
                Message::Exit(ExitStatus::Exited(3))
            ]
        );
        let records = kinds(&memory);
        let kinds: Vec<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                kind::SANDBOX_EXEC,
                kind::SANDBOX_EXEC_EXIT,
                kind::SANDBOX_EXEC_END
            ]
        );
        assert_eq!(records[0]["fields"]["env_names"], json!(["A"]));
        assert_eq!(records[1]["source"], "guest");
        assert_eq!(records[1]["fields"]["status"], json!({"exited": 3}));
        assert_eq!(records[2]["source"], "host");
        assert_eq!(records[2]["fields"]["stdout_bytes"], 2);
        assert_eq!(shared.running.load(Ordering::SeqCst), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_malformed_guest_frame_ends_the_exec_with_an_error() {
        let dir = tmp("malformed");
        let (uds, guest) = fake_guest(&dir, |s| {
            // A frame of length 0 is malformed.
            s.write_all(&[0, 0, 0, 0, 3]).expect("garbage");
        });
        let (shared, memory) = shared(uds, 1 << 20);
        let seen = client_sees(&shared);
        guest.join().expect("guest");
        assert!(
            matches!(
                seen.as_slice(),
                [Message::Error {
                    code: ErrorCode::MalformedFrame,
                    ..
                }]
            ),
            "{seen:?}"
        );
        let records = kinds(&memory);
        let end = records
            .iter()
            .find(|r| r["kind"] == kind::SANDBOX_EXEC_END)
            .expect("end");
        assert!(
            end["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("protocol")),
            "{end}"
        );
        assert!(records.iter().all(|r| r["kind"] != kind::SANDBOX_EXEC_EXIT));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_guest_that_floods_is_cut_at_the_output_limit() {
        let dir = tmp("flood");
        let (uds, guest) = fake_guest(&dir, |s| {
            for _ in 0..100 {
                if write_frame(&mut *s, &Message::Stdout(vec![b'x'; 1000])).is_err() {
                    return;
                }
            }
            let _ = write_frame(&mut *s, &Message::Exit(ExitStatus::Exited(0)));
        });
        let (shared, memory) = shared(uds, 4000);
        let seen = client_sees(&shared);
        guest.join().expect("guest");
        let forwarded: usize = seen
            .iter()
            .map(|m| match m {
                Message::Stdout(d) => d.len(),
                _ => 0,
            })
            .sum();
        assert!(forwarded <= 4000, "{forwarded}");
        assert!(
            matches!(seen.last(), Some(Message::Error { message, .. }) if message.contains("--max-output-bytes")),
            "{seen:?}"
        );
        assert!(!seen.iter().any(|m| matches!(m, Message::Exit(_))));
        let records = kinds(&memory);
        assert!(records.iter().all(|r| r["kind"] != kind::SANDBOX_EXEC_EXIT));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A pool's member in `root/pool/members/m-1`, served by `shared`.
    fn pooled(root: &Path) -> (Shared, crate::audit::log::Memory, Dir) {
        let member = Dir {
            name: "m-1".into(),
            path: root.join("pool/members/m-1"),
        };
        std::fs::create_dir_all(&member.path).expect("member dir");
        std::fs::write(member.config(), "{}").expect("config");
        let (mut shared, memory) = shared(root.join("vsock"), 1 << 20);
        shared.pool = Some("p".into());
        shared.adopted = AtomicBool::new(false);
        shared.sandboxes = root.join("sandboxes");
        std::fs::create_dir_all(&shared.sandboxes).expect("root");
        set_current_dir(member.clone());
        (shared, memory, member)
    }

    #[test]
    fn a_pool_member_is_adopted_once_and_never_over_another_sandbox() {
        let root = tmp("adopt");
        let (shared, memory, member) = pooled(&root);
        let ask = |name: &str| {
            adopt(
                &shared,
                &json!({"op": "adopt", "name": name, "config": {"labels": {"a": "b"}}}),
            )
        };
        // Not ready yet: refused, still in the pool.
        shared.ready.store(false, Ordering::SeqCst);
        assert!(ask("agent").expect_err("not ready").contains("not ready"));
        shared.ready.store(true, Ordering::SeqCst);
        // Bad requests.
        assert!(ask("../x").is_err());
        assert!(adopt(&shared, &json!({"op": "adopt", "name": "agent"})).is_err());
        // An existing sandbox's name: refused, nothing moved.
        std::fs::create_dir_all(shared.sandboxes.join("taken")).expect("taken");
        let e = ask("taken").expect_err("exists");
        assert_eq!(e, "a sandbox named taken already exists");
        assert!(member.config().exists(), "still in the pool");
        // Adopted: moved, config written with the pool recorded, audited.
        ask("agent").expect("adopted");
        assert!(!member.path.exists());
        let moved = shared.sandboxes.join("agent");
        let config: Value =
            serde_json::from_slice(&std::fs::read(moved.join("config.json")).expect("config"))
                .expect("json");
        assert_eq!(config["name"], "agent");
        assert_eq!(config["labels"]["a"], "b");
        assert_eq!(config["pool"]["name"], "p");
        assert_eq!(config["pool"]["member"], "m-1");
        assert_eq!(current_dir().expect("dir").path, moved);
        // Once only; and the keeper can no longer stop it as a pool's.
        assert!(ask("again").expect_err("twice").contains("already taken"));
        let (mut client, server) = UnixStream::pair().expect("pair");
        client
            .write_all(b"{\"op\":\"stop\",\"grace_secs\":0,\"if_pooled\":true}\n")
            .expect("send");
        serve_client(server, &shared);
        let mut answer = String::new();
        client.read_to_string(&mut answer).expect("answer");
        assert!(answer.contains("\"ok\":false"), "{answer}");
        assert!(!shared.stopping.load(Ordering::SeqCst), "not stopped");
        let adopts: Vec<Value> = kinds(&memory)
            .into_iter()
            .filter(|r| r["kind"] == "sandbox.adopt")
            .collect();
        assert_eq!(adopts.len(), 1, "{adopts:?}");
        assert_eq!(adopts[0]["fields"]["name"], "agent");
        assert_eq!(adopts[0]["fields"]["pool"], "p");
    }
}
