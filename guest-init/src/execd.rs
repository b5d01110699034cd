//! A live sandbox's execs (PROTOCOL.md, "Exec conversation"): while the
//! command runs, and only when the host's `Hello` listed `exec`, the init
//! accepts the host's connections to [`EXEC_PORT`] and runs one more
//! command for each, in the agent's container or, without a container, as
//! the command's user; at most [`MAX_EXECS`] at once.
//!
//! In the container, an exec as the container's own user is a `crun exec`
//! with the container's process (user, capabilities, rlimits, no-new-privs,
//! environment) taken from the runtime's own copy of its config and only
//! the command, its environment and its directory replaced: what `podman
//! exec` does, without podman's start-up (about 1 s of guest CPU under
//! emulation against 0.35 s). One that comes while the command is still
//! making the container (the host's readiness probe of a new sandbox)
//! waits for the container to be started first ([`CONTAINER_PATIENCE`]).
//! The host's stop (the keeper's `kill`, asked as user `0`) is a `crun
//! exec` too, of the container's process with `CAP_KILL` added
//! ([`Who::Stopper`]). An exec as another user (`-u`), or one whose
//! container is not there once the command has ended or that wait is over,
//! goes through `podman exec`, which resolves user names in the container's
//! own root. Once the command has ended, the init takes no more execs and
//! waits a little for those running to report ([`Server::finish`]).
//!
//! Only the host may connect: a connection from any other CID is closed at
//! once (the agent cannot make a vsock socket anyway: its seccomp filter
//! refuses `AF_VSOCK`). Each conversation is the control conversation's
//! command part: `Hello`s, the host's `RunSpec`, output and `Exit`, stdin
//! with `RunSpec.stdin`. The guest's process events and audit claims keep
//! going on the control connection, which sees every exec in the VM.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use airlock_protocol::{
    capability, ErrorCode, ExitStatus, Message, RunSpec, HOST_CID, MAX_EXECS, PROTOCOL_VERSION,
};

use crate::console;
use crate::exec::{self, Event};
use crate::reaper::Waiter;
use crate::rpc::{self, Error};
use crate::vsock::{VsockListener, VsockStream};

/// The name of the agent's container, for `podman exec`.
pub const CONTAINER_NAME: &str = "airlock-agent";
/// Where podman writes the agent container's id (in the VM's root, which
/// the container does not see).
pub const CID_FILE: &str = "/run/airlock-agent.cid";
/// The OCI runtime podman runs the container with, and its state root.
const CRUN: &str = "/usr/bin/crun";
const CRUN_ROOT: &str = "/run/crun";
/// The runtime's config of the container is read up to this size.
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Numbers the process files of execs.
static EXEC_SERIAL: AtomicU64 = AtomicU64::new(0);
/// How often the accept loop looks at its stop flag.
const ACCEPT_TICK: Duration = Duration::from_millis(200);

/// Where an exec runs.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// In the agent's container (`podman exec`), as its root.
    pub container: bool,
    /// Without a container: as the unprivileged agent user, else root.
    pub agent: bool,
    /// Added to each exec's environment unless it sets them itself:
    /// without a container (the model endpoint's variables, `HOME`), and
    /// in the container started before the snapshot, made without the
    /// run's environment ([`crate::prepared`]); a container made for the
    /// run already has them.
    pub env: Vec<(String, String)>,
    /// Set once the sandbox's command (the `podman run` that makes the
    /// container) has ended: then nobody waits for the container any more
    /// (see [`CONTAINER_PATIENCE`]). [`start`] shares the server's stop flag.
    pub ended: Arc<AtomicBool>,
}

/// The accept loop's thread; stops accepting when dropped.
#[derive(Debug)]
pub struct Server {
    stop: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
}

/// How long the init waits, once the sandbox's command has ended, for the
/// execs still running to end and hand their exit status to the host
/// ([`Server::finish`]). Their processes end with the container (its PID
/// namespace goes when its PID 1 does) or with the stop's signals; without
/// this wait the VM could power off between an exec's end and its `Exit`,
/// and the host's exec (a `docker run`'s main process stopped by `docker
/// stop`) ended with no exit status.
pub const FINISH_PATIENCE: Duration = Duration::from_secs(5);

impl Server {
    /// Stops accepting execs and waits up to `patience` for those running
    /// to end (their `Exit` sent and the host's close seen, or its wait
    /// over); returns how many had not.
    pub fn finish(&self, patience: Duration) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + patience;
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        self.active.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts serving exec connections on `listener`.
pub fn start(listener: VsockListener, mut setup: Setup) -> std::io::Result<Server> {
    let stop = Arc::new(AtomicBool::new(false));
    setup.ended = Arc::clone(&stop);
    let active = Arc::new(AtomicUsize::new(0));
    let (flag, count) = (Arc::clone(&stop), Arc::clone(&active));
    thread::Builder::new()
        .name("execd".into())
        .spawn(move || accept_loop(&listener, &setup, &flag, &count))?;
    Ok(Server { stop, active })
}

fn accept_loop(
    listener: &VsockListener,
    setup: &Setup,
    stop: &AtomicBool,
    active: &Arc<AtomicUsize>,
) {
    while !stop.load(Ordering::SeqCst) {
        let (stream, cid) = match listener.accept_timeout(ACCEPT_TICK) {
            Ok(Some(accepted)) => accepted,
            Ok(None) => continue,
            Err(err) => {
                console::warn(&format!("exec port: {err}"));
                thread::sleep(ACCEPT_TICK);
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            // The command ended while this one waited: the sandbox is going.
            break;
        }
        if cid != HOST_CID {
            console::warn(&format!("exec port: refused a connection from cid {cid}"));
            continue;
        }
        if active.load(Ordering::SeqCst) >= MAX_EXECS {
            console::warn("exec port: too many execs at once; refused one");
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let count = Arc::clone(active);
        let setup = setup.clone();
        let spawned = thread::Builder::new().name("exec".into()).spawn(move || {
            if let Err(err) = serve(stream, &setup) {
                console::debug(&format!("exec: {}", console::chain(&err)));
            }
            count.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(err) = spawned {
            console::warn(&format!("exec: cannot start a thread: {err}"));
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A file removed when dropped (an exec's process file).
#[derive(Debug, Default)]
pub struct Scratch(Option<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// The command an exec runs, with the sandbox's environment (`setup.env`)
/// added: in the container through `crun exec` (as the container's user)
/// or `podman exec` (as another), else the spec itself; and the process
/// file to remove once it has ended.
pub fn placed(spec: RunSpec, setup: &Setup, user: Option<&str>) -> (RunSpec, Scratch) {
    let mut env = spec.env;
    for (name, value) in &setup.env {
        if !env.iter().any(|(n, _)| n == name) {
            env.push((name.clone(), value.clone()));
        }
    }
    let spec = RunSpec { env, ..spec };
    if !setup.container {
        return (spec, Scratch::default());
    }
    let who = match user {
        None => Some(Who::ContainersUser),
        Some(user) if is_stop(&spec, user) => Some(Who::Stopper),
        Some(_) => None,
    };
    if let Some(who) = who {
        match crun_exec_once_there(
            &spec,
            Paths {
                cid_file: Path::new(CID_FILE),
                crun_root: Path::new(CRUN_ROOT),
                dir: Path::new("/run"),
            },
            who,
            &setup.ended,
            CONTAINER_PATIENCE,
        ) {
            Ok((argv, file)) => {
                return (
                    RunSpec {
                        argv,
                        env: Vec::new(),
                        cwd: "/".into(),
                        ..spec
                    },
                    Scratch(Some(file)),
                )
            }
            Err(why) => console::debug(&format!("exec through podman: {why}")),
        }
    }
    (podman_exec(spec, user), Scratch::default())
}

/// Whom a `crun exec` runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// The container's own process: its user, capabilities and the rest.
    ContainersUser,
    /// The host's stop: the container's own process (its user, groups and
    /// capabilities) with `CAP_KILL` added, so that its `kill(-1, SIG)`
    /// reaches the processes of every user there and it gains nothing
    /// else. It reaches the keeper as the agent's own execs do (an image
    /// may have a root directory only its user can enter: root without
    /// `CAP_DAC_OVERRIDE` could not). `podman exec --user 0` gave it root
    /// with podman's whole default set, after podman's start-up (about
    /// 0.7 s of a stop under emulation, before the signal left).
    Stopper,
}

/// Whether an exec is the host's stop: the keeper's `kill SIG`, asked as
/// user `0`. (`airlock exec -u 0 NAME -- /run/airlock/keeper kill TERM` is
/// that same stop and runs the same way: with fewer capabilities than
/// another `-u 0` exec gets.)
fn is_stop(spec: &RunSpec, user: &str) -> bool {
    match spec.argv.as_slice() {
        [keeper, kill, _] => user == "0" && keeper == crate::keeper::PATH && kill == "kill",
        _ => false,
    }
}

/// How long an exec as the container's user waits for the agent's
/// container to be there and started (its id, the runtime's state, no
/// `exec.fifo` left) while the
/// command that makes it still runs. The host's readiness probe of a new
/// sandbox arrives while `podman run` is still making the container; sent
/// on to `podman exec` it could only fail the same way, after a start that
/// costs about 1 s of guest CPU under emulation, taken from the `podman run`
/// beside it, and a probe every 250 ms kept several of them running. Past
/// this, or once the command has ended, the exec goes to `podman exec` as
/// before (which says what is wrong).
const CONTAINER_PATIENCE: Duration = Duration::from_secs(30);
/// How often the wait above looks (a few file reads).
const CONTAINER_POLL: Duration = Duration::from_millis(20);

/// Where [`crun_exec`] finds the container and writes the process file.
#[derive(Debug, Clone, Copy)]
struct Paths<'a> {
    cid_file: &'a Path,
    crun_root: &'a Path,
    dir: &'a Path,
}

/// Why [`crun_exec`] could not make its argv.
#[derive(Debug)]
enum NoCrunExec {
    /// The container is not there (yet): no id, or no runtime state.
    NotThere(String),
    /// It is, but its state cannot be used.
    Unusable(String),
}

impl std::fmt::Display for NoCrunExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotThere(why) | Self::Unusable(why) => f.write_str(why),
        }
    }
}

/// [`crun_exec`], waiting up to `patience` for the container to be there
/// unless `ended` is (or becomes) set.
fn crun_exec_once_there(
    spec: &RunSpec,
    paths: Paths<'_>,
    who: Who,
    ended: &AtomicBool,
    patience: Duration,
) -> Result<(Vec<String>, PathBuf), NoCrunExec> {
    let deadline = Instant::now() + patience;
    loop {
        match crun_exec(spec, paths, who) {
            Err(NoCrunExec::NotThere(_))
                if !ended.load(Ordering::SeqCst) && Instant::now() < deadline =>
            {
                thread::sleep(CONTAINER_POLL);
            }
            other => return other,
        }
    }
}

/// The container's process from the runtime's config, with `spec`'s
/// command, environment (over the container's) and directory (and, for
/// [`Who::Stopper`], its user and capabilities), written to a new file
/// under `dir`; the `crun exec` argv that runs it.
fn crun_exec(
    spec: &RunSpec,
    paths: Paths<'_>,
    who: Who,
) -> Result<(Vec<String>, PathBuf), NoCrunExec> {
    let Paths {
        cid_file,
        crun_root,
        dir,
    } = paths;
    let not_there = |path: &Path, e: std::io::Error| {
        let why = format!("{}: {e}", path.display());
        if e.kind() == std::io::ErrorKind::NotFound {
            NoCrunExec::NotThere(why)
        } else {
            NoCrunExec::Unusable(why)
        }
    };
    let cid = fs::read_to_string(cid_file).map_err(|e| not_there(cid_file, e))?;
    let cid = cid.trim();
    if cid.len() != 64 || !cid.bytes().all(|b| b.is_ascii_hexdigit()) {
        // podman writes the id once the container is created: empty (or
        // partly written) until then.
        return Err(NoCrunExec::NotThere("no container id yet".into()));
    }
    let state = crun_root.join(cid);
    // crun makes `exec.fifo` before the container's process and writes
    // `status` after it; `crun start` removes the fifo. Until then the
    // container is created but not started: its PID 1 is crun's own stub
    // and the command (catatonit, the keeper) is not there, and an exec
    // would join a container that is not yet what the agent sees.
    let status = state.join("status");
    fs::symlink_metadata(&status).map_err(|e| not_there(&status, e))?;
    let fifo = state.join("exec.fifo");
    match fs::symlink_metadata(&fifo) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(NoCrunExec::Unusable(format!("{}: {e}", fifo.display()))),
        Ok(_) => {
            return Err(NoCrunExec::NotThere(
                "the container is created, not started yet".into(),
            ))
        }
    }
    let config = state.join("config.json");
    let mut text = String::new();
    fs::File::open(&config)
        .map_err(|e| not_there(&config, e))?
        .take(MAX_CONFIG_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| NoCrunExec::Unusable(format!("{}: {e}", config.display())))?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        let why = format!("{}: {e}", config.display());
        // Cut short: the runtime is still writing it.
        if e.is_eof() {
            NoCrunExec::NotThere(why)
        } else {
            NoCrunExec::Unusable(why)
        }
    })?;
    let Some(serde_json::Value::Object(mut process)) = config.get("process").cloned() else {
        return Err(NoCrunExec::Unusable(
            "the container's config has no process".into(),
        ));
    };
    let mut env: Vec<String> = process
        .get("env")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for (name, value) in &spec.env {
        let prefix = format!("{name}=");
        env.retain(|e| !e.starts_with(&prefix));
        env.push(format!("{name}={value}"));
    }
    // Through the keeper, for a shell's exit codes when CMD cannot run.
    let mut args = vec![crate::keeper::PATH.to_owned(), "exec".to_owned()];
    args.extend(spec.argv.iter().cloned());
    process.insert("args".into(), serde_json::json!(args));
    process.insert("env".into(), serde_json::json!(env));
    process.insert("cwd".into(), serde_json::json!(spec.cwd));
    process.insert("terminal".into(), serde_json::json!(false));
    process.remove("consoleSize");
    if who == Who::Stopper {
        with_cap_kill(&mut process);
    }
    let body = serde_json::to_vec(&serde_json::Value::Object(process))
        .map_err(|e| NoCrunExec::Unusable(format!("process: {e}")))?;
    let file = dir.join(format!(
        "airlock-exec-{}.json",
        EXEC_SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut f| f.write_all(&body))
        .map_err(|e| NoCrunExec::Unusable(format!("{}: {e}", file.display())))?;
    // The id is the first operand; crun parses no options after it.
    let argv = [CRUN, "exec", "--process", &file.display().to_string(), cid]
        .map(str::to_owned)
        .to_vec();
    Ok((argv, file))
}

/// Adds `CAP_KILL` to every capability set of a container's `process`
/// (the ambient and inheritable ones too: a process that is not root
/// keeps capabilities across `execve` only as ambient ones), making the sets
/// that are missing.
fn with_cap_kill(process: &mut serde_json::Map<String, serde_json::Value>) {
    let caps = process
        .entry("capabilities")
        .or_insert_with(|| serde_json::json!({}));
    if !caps.is_object() {
        *caps = serde_json::json!({});
    }
    let Some(caps) = caps.as_object_mut() else {
        return;
    };
    for set in [
        "bounding",
        "effective",
        "permitted",
        "inheritable",
        "ambient",
    ] {
        let list = caps.entry(set).or_insert_with(|| serde_json::json!([]));
        if !list.is_array() {
            *list = serde_json::json!([]);
        }
        if let Some(list) = list.as_array_mut() {
            if !list.iter().any(|c| c == "CAP_KILL") {
                list.push(serde_json::json!("CAP_KILL"));
            }
        }
    }
}

/// `podman exec` of `spec` in the agent's container, as `user` if given.
fn podman_exec(spec: RunSpec, user: Option<&str>) -> RunSpec {
    let mut argv: Vec<String> = vec![crate::image::PODMAN.into(), "exec".into()];
    if spec.stdin {
        argv.push("-i".into());
    }
    if let Some(user) = user {
        // Checked by the protocol: a name or uid[:gid], never an option.
        argv.push("--user".into());
        argv.push(user.to_owned());
    }
    for (name, value) in &spec.env {
        argv.push("--env".into());
        argv.push(format!("{name}={value}"));
    }
    argv.push("-w".into());
    argv.push(spec.cwd.clone());
    // The container is the first operand; podman parses no options after
    // it, so the command follows verbatim.
    argv.push(CONTAINER_NAME.into());
    argv.extend(spec.argv);
    RunSpec {
        argv,
        env: Vec::new(),
        cwd: "/".into(),
        ..spec
    }
}

fn serve(stream: VsockStream, setup: &Setup) -> Result<(), Error> {
    serve_with(stream, setup, &mut Waiter)
}

/// One exec conversation over `stream`, its command waited for by `waiter`.
fn serve_with<S: rpc::Stream>(
    mut stream: S,
    setup: &Setup,
    waiter: &mut impl crate::exec::ChildWait,
) -> Result<(), Error> {
    let result = converse(&mut stream, setup, waiter);
    if let Err(err) = &result {
        if let Some(code) = err.reply_code() {
            let message = rpc::bounded(console::chain(err));
            let _ = airlock_protocol::write_frame(&mut stream, &Message::Error { code, message });
        }
    }
    result
}

fn converse<S: rpc::Stream>(
    stream: &mut S,
    setup: &Setup,
    waiter: &mut impl crate::exec::ChildWait,
) -> Result<(), Error> {
    stream
        .set_read_timeout(Some(rpc::HANDSHAKE_TIMEOUT))
        .map_err(Error::Setup)?;
    rpc::send(
        stream,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            capabilities: vec![capability::USER.into()],
        },
    )?;
    let host_caps = match rpc::receive(stream, "Hello")? {
        Message::Hello {
            version,
            capabilities,
        } if version == PROTOCOL_VERSION => capabilities,
        Message::Hello { version, .. } => return Err(Error::Version(version)),
        other => return Err(rpc::unexpected(other, "Hello")),
    };
    let spec = match rpc::receive(stream, "RunSpec")? {
        Message::RunSpec(spec) => spec,
        other => return Err(rpc::unexpected(other, "RunSpec")),
    };
    let user = if host_caps.iter().any(|c| c == capability::USER) {
        match rpc::receive(stream, "ExecUser")? {
            Message::ExecUser { user } => Some(user),
            other => return Err(rpc::unexpected(other, "ExecUser")),
        }
    } else {
        None
    };
    if user.is_some() && !setup.container {
        rpc::send(
            stream,
            &Message::Error {
                code: ErrorCode::SpawnFailed,
                message: "exec --user needs the agent's container (this sandbox has none)".into(),
            },
        )?;
        rpc::send(stream, &Message::Exit(ExitStatus::Exited(125)))?;
        rpc::await_host_close(stream);
        return Ok(());
    }
    let (spec, _process_file) = placed(spec, setup, user.as_deref());
    stream.set_read_timeout(None).map_err(Error::Setup)?;
    let agent = (!setup.container && setup.agent).then(crate::privilege::Agent::new);
    let mut running = match exec::spawn(&spec, agent.as_ref()) {
        Ok(running) => running,
        Err(err) => {
            rpc::send(
                stream,
                &Message::Error {
                    code: ErrorCode::SpawnFailed,
                    message: rpc::bounded(err.to_string()),
                },
            )?;
            rpc::send(stream, &Message::Exit(ExitStatus::Exited(err.exit_code())))?;
            rpc::await_host_close(stream);
            return Ok(());
        }
    };
    // What the exec leaves running in the background is the sandbox's.
    running.spare_group();
    let (events, violations) = mpsc::channel();
    let (wake, notify) = std::os::unix::net::UnixStream::pair().map_err(Error::Setup)?;
    let reader = stream.try_clone().map_err(Error::Setup)?;
    let stdin = running.take_stdin();
    let expect_stdin = spec.stdin;
    thread::Builder::new()
        .name("exec-reader".into())
        .spawn(move || rpc::read_host(reader, expect_stdin, stdin, &events, notify))
        .map_err(Error::Setup)?;
    let timeout = spec.timeout_ms.map(Duration::from_millis);
    let ended = running.pump(
        waiter,
        timeout,
        std::os::fd::AsFd::as_fd(&wake),
        None,
        |event| match event {
            Event::Stdout(data) => rpc::send(stream, &Message::Stdout(data.to_vec())),
            Event::Stderr(data) => rpc::send(stream, &Message::Stderr(data.to_vec())),
            Event::Extra => Ok(()),
            Event::Host => {
                let mut buf = [0u8; 16];
                let _ = std::io::Read::read(&mut &wake, &mut buf);
                match violations.try_recv() {
                    Ok(err) => Err(err),
                    Err(mpsc::TryRecvError::Empty) => Ok(()),
                    Err(mpsc::TryRecvError::Disconnected) => Err(Error::Closed),
                }
            }
        },
    )?;
    rpc::send(stream, &Message::Exit(ended.status))?;
    let _ = violations.recv_timeout(rpc::EXIT_ACK_PATIENCE);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_protocol::{read_frame, write_frame, FrameError};
    use std::os::unix::net::UnixStream;

    /// Plays the host: Hello, `spec`, then `stdin` and its end; returns what
    /// the guest sent after its Hello.
    fn exec_as_host(spec: RunSpec, stdin: &[u8]) -> Vec<Message> {
        exec_as_host_as(spec, stdin, None)
    }

    /// [`exec_as_host`], asking for `user` (`ExecUser`) when given.
    fn exec_as_host_as(spec: RunSpec, stdin: &[u8], user: Option<&str>) -> Vec<Message> {
        let (guest, mut host) = UnixStream::pair().expect("socketpair");
        let setup = Setup::default();
        let guest_side =
            thread::spawn(move || serve_with(guest, &setup, &mut crate::exec::WaitPid));
        let hello = read_frame(&mut host).expect("guest hello");
        assert!(
            matches!(hello, Message::Hello { version: 1, .. }),
            "{hello:?}"
        );
        let with_stdin = spec.stdin;
        write_frame(
            &mut host,
            &Message::Hello {
                version: 1,
                capabilities: user.map(|_| vec!["user".to_owned()]).unwrap_or_default(),
            },
        )
        .expect("hello");
        write_frame(&mut host, &Message::RunSpec(spec)).expect("spec");
        if let Some(user) = user {
            write_frame(
                &mut host,
                &Message::ExecUser {
                    user: user.to_owned(),
                },
            )
            .expect("user");
        }
        if with_stdin {
            write_frame(&mut host, &Message::Stdin(stdin.to_vec())).expect("stdin");
            write_frame(&mut host, &Message::StdinEnd).expect("end");
        }
        let mut seen = Vec::new();
        loop {
            match read_frame(&mut host) {
                Ok(msg) => {
                    let exit = matches!(msg, Message::Exit(_));
                    seen.push(msg);
                    if exit {
                        break;
                    }
                }
                Err(FrameError::Closed) => break,
                Err(err) => panic!("{err}"),
            }
        }
        host.shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        guest_side.join().expect("join").expect("served");
        seen
    }

    #[test]
    fn an_exec_streams_output_takes_stdin_and_ends_with_its_status() {
        let mut s = spec(&["/bin/sh", "-c", "cat; echo oops >&2; exit 3"], true);
        s.cwd = "/".into();
        let seen = exec_as_host(s, b"hello exec");
        let out: Vec<u8> = seen
            .iter()
            .filter_map(|m| match m {
                Message::Stdout(d) => Some(d.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(out, b"hello exec");
        assert!(
            seen.contains(&Message::Stderr(b"oops\n".to_vec())),
            "{seen:?}"
        );
        assert_eq!(seen.last(), Some(&Message::Exit(ExitStatus::Exited(3))));
    }

    #[test]
    fn what_an_exec_leaves_in_the_background_keeps_running() {
        let mut s = spec(&["/bin/sh", "-c", "sleep 30 & echo $!"], false);
        s.cwd = "/".into();
        // The sleep holds the exec's stdout open: the exec still ends.
        let seen = exec_as_host(s, b"");
        assert_eq!(seen.last(), Some(&Message::Exit(ExitStatus::Exited(0))));
        let out: Vec<u8> = seen
            .iter()
            .filter_map(|m| match m {
                Message::Stdout(d) => Some(d.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        let pid: libc::pid_t = String::from_utf8_lossy(&out).trim().parse().expect("pid");
        // SAFETY: kill(2) with signal 0 only checks that the pid exists.
        let exists = unsafe { libc::kill(pid, 0) };
        assert_eq!(exists, 0, "the background sleep was killed");
        // SAFETY: kill(2) of the sleep this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }

    #[test]
    fn a_user_without_a_container_is_refused() {
        let mut s = spec(&["/bin/true"], false);
        s.cwd = "/".into();
        let seen = exec_as_host_as(s, b"", Some("1000"));
        assert!(
            matches!(seen.first(), Some(Message::Error { code: ErrorCode::SpawnFailed, message }) if message.contains("container")),
            "{seen:?}"
        );
        assert_eq!(seen.last(), Some(&Message::Exit(ExitStatus::Exited(125))));
    }

    #[test]
    fn a_missing_program_is_a_spawn_error_then_127() {
        let mut s = spec(&["/nonexistent/prog"], false);
        s.cwd = "/".into();
        let seen = exec_as_host(s, b"");
        assert!(
            matches!(
                seen.first(),
                Some(Message::Error {
                    code: ErrorCode::SpawnFailed,
                    ..
                })
            ),
            "{seen:?}"
        );
        assert_eq!(seen.last(), Some(&Message::Exit(ExitStatus::Exited(127))));
    }

    fn spec(argv: &[&str], stdin: bool) -> RunSpec {
        RunSpec {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            env: vec![("A".into(), "1".into())],
            cwd: "/workspace".into(),
            timeout_ms: None,
            max_output_bytes: 1 << 20,
            stdin,
        }
    }

    #[test]
    fn in_the_container_it_is_a_podman_exec_whose_command_follows_verbatim() {
        let setup = Setup {
            container: true,
            ..Setup::default()
        };
        let (s, file) = placed(spec(&["--rm", "-it", "x"], true), &setup, Some("1000:1000"));
        assert!(file.0.is_none());
        assert_eq!(
            s.argv,
            [
                "/usr/bin/podman",
                "exec",
                "-i",
                "--user",
                "1000:1000",
                "--env",
                "A=1",
                "-w",
                "/workspace",
                CONTAINER_NAME,
                "--rm",
                "-it",
                "x"
            ]
        );
        assert!(s.env.is_empty());
        assert_eq!(s.cwd, "/");
        assert!(s.stdin);
    }

    /// Once the command has ended, the init waits for the execs still
    /// running (their exit status to the host), but not past its patience,
    /// and takes no more.
    #[test]
    fn finishing_waits_for_the_running_execs_within_its_patience() {
        let server = Server {
            stop: Arc::new(AtomicBool::new(false)),
            active: Arc::new(AtomicUsize::new(2)),
        };
        let active = Arc::clone(&server.active);
        let ending = thread::spawn(move || {
            for _ in 0..2 {
                thread::sleep(Duration::from_millis(100));
                active.fetch_sub(1, Ordering::SeqCst);
            }
        });
        let began = Instant::now();
        assert_eq!(server.finish(Duration::from_secs(20)), 0);
        assert!(began.elapsed() >= Duration::from_millis(200));
        assert!(server.stop.load(Ordering::SeqCst), "no more execs taken");
        ending.join().expect("test");

        // One that does not end: cut after the patience.
        server.active.store(1, Ordering::SeqCst);
        let began = Instant::now();
        assert_eq!(server.finish(Duration::from_millis(300)), 1);
        let took = began.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5));
    }

    #[test]
    fn cap_kill_is_added_to_each_set_once() {
        let mut process = serde_json::json!({
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL"],
                "effective": ["CAP_CHOWN"],
                "ambient": "garbage"
            }
        })
        .as_object()
        .cloned()
        .expect("test");
        with_cap_kill(&mut process);
        assert_eq!(
            process["capabilities"],
            serde_json::json!({
                "bounding": ["CAP_CHOWN", "CAP_KILL"],
                "effective": ["CAP_CHOWN", "CAP_KILL"],
                "ambient": ["CAP_KILL"],
                "permitted": ["CAP_KILL"],
                "inheritable": ["CAP_KILL"]
            })
        );
        let mut bare = serde_json::Map::new();
        with_cap_kill(&mut bare);
        assert_eq!(
            bare["capabilities"]["ambient"],
            serde_json::json!(["CAP_KILL"])
        );
    }

    /// Only the keeper's `kill`, asked as `0`, is the stop; anything else as
    /// another user goes to `podman exec`.
    #[test]
    fn only_the_keepers_kill_as_root_is_the_stop() {
        let kill = |sig: &str| spec(&[crate::keeper::PATH, "kill", sig], false);
        assert!(is_stop(&kill("TERM"), "0"));
        assert!(is_stop(&kill("KILL"), "0"));
        assert!(!is_stop(&kill("TERM"), "0:0"));
        assert!(!is_stop(&kill("TERM"), "root"));
        assert!(!is_stop(&kill("TERM"), "1000"));
        assert!(!is_stop(&spec(&[crate::keeper::PATH, "probe"], false), "0"));
        assert!(!is_stop(&spec(&["kill", "-TERM", "-1"], false), "0"));
        assert!(!is_stop(
            &spec(&[crate::keeper::PATH, "kill", "TERM", "x"], false),
            "0"
        ));
        assert!(!is_stop(
            &spec(&["/tmp/keeper", "kill", "TERM"], false),
            "0"
        ));
    }

    #[test]
    fn in_a_container_started_before_the_snapshot_the_sandbox_env_is_added_unless_set() {
        // The container was made without the run's environment: each exec
        // gets it, under its own.
        let setup = Setup {
            container: true,
            env: vec![("A".into(), "sandbox".into()), ("B".into(), "2".into())],
            ..Setup::default()
        };
        let (s, _) = placed(spec(&["env"], false), &setup, Some("1000"));
        let envs: Vec<&String> = s
            .argv
            .windows(2)
            .filter(|w| w[0] == "--env")
            .map(|w| &w[1])
            .collect();
        assert_eq!(envs, ["A=1", "B=2"], "{:?}", s.argv);
    }

    #[test]
    fn without_a_container_the_sandbox_env_is_added_unless_set() {
        let setup = Setup {
            container: false,
            agent: true,
            env: vec![("A".into(), "sandbox".into()), ("B".into(), "2".into())],
            ..Setup::default()
        };
        let (s, file) = placed(spec(&["true"], false), &setup, None);
        assert!(file.0.is_none());
        assert_eq!(s.argv, ["true"]);
        assert_eq!(
            s.env,
            [("A".to_owned(), "1".to_owned()), ("B".into(), "2".into())]
        );
        assert_eq!(s.cwd, "/workspace");
    }

    #[test]
    fn as_the_containers_user_it_is_a_crun_exec_of_the_containers_process() {
        let dir = std::env::temp_dir().join(format!("airlock-crun-exec-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let cid = "ab".repeat(32);
        fs::create_dir_all(dir.join("crun").join(&cid)).expect("test");
        fs::write(dir.join("cid"), format!("{cid}\n")).expect("test");
        fs::write(dir.join("crun").join(&cid).join("status"), "{}").expect("test");
        fs::write(
            dir.join("crun").join(&cid).join("config.json"),
            serde_json::json!({
                "process": {
                    "user": {"uid": 1000, "gid": 0, "additionalGids": [0]},
                    "args": ["/run/podman-init", "--", "sleep"],
                    "env": ["PATH=/bin", "A=container", "HOME=/app"],
                    "cwd": "/app",
                    "terminal": true,
                    "consoleSize": {"height": 1, "width": 1},
                    "capabilities": {"bounding": ["CAP_KILL"]},
                    "noNewPrivileges": true,
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 8, "soft": 8}]
                },
                "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}
            })
            .to_string(),
        )
        .expect("test");
        let (cid_file, crun_root) = (dir.join("cid"), dir.join("crun"));
        let paths = Paths {
            cid_file: &cid_file,
            crun_root: &crun_root,
            dir: &dir,
        };
        let (argv, file) =
            crun_exec(&spec(&["sh", "-c", "x"], false), paths, Who::ContainersUser).expect("test");
        assert_eq!(
            argv,
            [CRUN, "exec", "--process", &file.display().to_string(), &cid]
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&file).expect("test").permissions().mode() & 0o777,
            0o600
        );
        let p: serde_json::Value =
            serde_json::from_slice(&fs::read(&file).expect("test")).expect("test");
        // The command, its env over the container's, its directory...
        assert_eq!(
            p["args"],
            serde_json::json!([crate::keeper::PATH, "exec", "sh", "-c", "x"])
        );
        assert_eq!(
            p["env"],
            serde_json::json!(["PATH=/bin", "HOME=/app", "A=1"])
        );
        assert_eq!(p["cwd"], "/workspace");
        assert_eq!(p["terminal"], false);
        assert!(p.get("consoleSize").is_none());
        // ... and everything else the container's own.
        assert_eq!(p["user"]["uid"], 1000);
        assert_eq!(
            p["capabilities"]["bounding"],
            serde_json::json!(["CAP_KILL"])
        );
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["rlimits"][0]["hard"], 8);

        // The host's stop: the container's process with CAP_KILL added to
        // every set (once), nothing else changed.
        let stop = spec(&[crate::keeper::PATH, "kill", "TERM"], false);
        let (_, file) = crun_exec(&stop, paths, Who::Stopper).expect("test");
        let p: serde_json::Value =
            serde_json::from_slice(&fs::read(&file).expect("test")).expect("test");
        assert_eq!(
            p["user"],
            serde_json::json!({"uid": 1000, "gid": 0, "additionalGids": [0]})
        );
        assert_eq!(
            p["capabilities"],
            serde_json::json!({
                "bounding": ["CAP_KILL"],
                "effective": ["CAP_KILL"],
                "permitted": ["CAP_KILL"],
                "inheritable": ["CAP_KILL"],
                "ambient": ["CAP_KILL"]
            })
        );
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["rlimits"][0]["hard"], 8);
        assert_eq!(
            p["args"],
            serde_json::json!([
                crate::keeper::PATH,
                "exec",
                crate::keeper::PATH,
                "kill",
                "TERM"
            ])
        );

        // No id yet (or not an id): not this way.
        fs::write(dir.join("cid"), "../../etc").expect("test");
        assert!(crun_exec(&spec(&["true"], false), paths, Who::ContainersUser).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    /// An exec that comes while `podman run` is still making the container
    /// (the host's readiness probe) waits for it rather than going to a
    /// `podman exec` that could only fail; it does not wait once the command
    /// has ended, nor past its patience, nor for a container whose state it
    /// cannot use.
    #[test]
    fn an_exec_waits_for_the_container_while_the_command_runs() {
        let dir = std::env::temp_dir().join(format!("airlock-crun-wait-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("test");
        let cid = "cd".repeat(32);
        let (cid_file, crun_root) = (dir.join("cid"), dir.join("crun"));
        let paths = Paths {
            cid_file: &cid_file,
            crun_root: &crun_root,
            dir: &dir,
        };
        let probe = spec(&["/run/airlock/keeper", "probe"], false);
        let running = AtomicBool::new(false);

        // Made while the exec waits: podman writes the id (empty first),
        // then the runtime its fifo, config and status (created), and the
        // start removes the fifo.
        let state = crun_root.join(&cid);
        let maker = {
            let (dir, cid, state) = (dir.clone(), cid.clone(), state.clone());
            thread::spawn(move || {
                let step = || thread::sleep(Duration::from_millis(100));
                step();
                fs::write(dir.join("cid"), "").expect("test");
                step();
                fs::write(dir.join("cid"), format!("{cid}\n")).expect("test");
                fs::create_dir_all(&state).expect("test");
                fs::write(state.join("exec.fifo"), "").expect("test");
                step();
                fs::write(
                    state.join("config.json"),
                    r#"{"process": {"args": ["sleep"], "env": [], "cwd": "/"}}"#,
                )
                .expect("test");
                step();
                fs::write(state.join("status"), "{}").expect("test");
                step();
                fs::remove_file(state.join("exec.fifo")).expect("test");
            })
        };
        let start = Instant::now();
        let (argv, _file) = crun_exec_once_there(
            &probe,
            paths,
            Who::ContainersUser,
            &running,
            Duration::from_secs(20),
        )
        .expect("the exec waited for the container");
        assert!(
            start.elapsed() >= Duration::from_millis(450),
            "{:?}",
            start.elapsed()
        );
        assert!(
            !state.join("exec.fifo").exists(),
            "the exec waited for the container's start"
        );
        assert_eq!(argv[..2], [CRUN, "exec"]);
        assert_eq!(argv.last(), Some(&cid));
        maker.join().expect("test");

        // Not there, and the command has ended: no wait.
        fs::remove_file(&cid_file).expect("test");
        let ended = AtomicBool::new(true);
        let start = Instant::now();
        assert!(matches!(
            crun_exec_once_there(
                &probe,
                paths,
                Who::ContainersUser,
                &ended,
                Duration::from_secs(20)
            ),
            Err(NoCrunExec::NotThere(_))
        ));
        assert!(start.elapsed() < Duration::from_secs(5));

        // Not there while the command runs: waits its patience, no longer.
        let start = Instant::now();
        assert!(matches!(
            crun_exec_once_there(
                &probe,
                paths,
                Who::ContainersUser,
                &running,
                Duration::from_millis(300)
            ),
            Err(NoCrunExec::NotThere(_))
        ));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(10),
            "{waited:?}"
        );

        // There but unusable: at once, on to podman.
        fs::write(&cid_file, &cid).expect("test");
        fs::write(crun_root.join(&cid).join("config.json"), r#"{"linux": {}}"#).expect("test");
        let start = Instant::now();
        assert!(matches!(
            crun_exec_once_there(
                &probe,
                paths,
                Who::ContainersUser,
                &running,
                Duration::from_secs(20)
            ),
            Err(NoCrunExec::Unusable(_))
        ));
        assert!(start.elapsed() < Duration::from_secs(5));
        let _ = fs::remove_dir_all(&dir);
    }
}
