//! The control session with the host (PROTOCOL.md): connect to
//! [`HOST_CID`]:[`CONTROL_PORT`], exchange `Hello`s, receive the `RunSpec`,
//! run it ([`exec`]) while streaming its output, and send its `Exit`.
//!
//! The session is written over any [`Stream`] so that tests can drive it
//! with a Unix socket pair; in the guest it is a [`VsockStream`].
//!
//! Two threads once the command runs: this one pumps the command's output
//! to the host; a `host-reader` thread reads the host's frames, feeds
//! `Stdin` to the command and ends its stdin on `StdinEnd`. Anything else
//! the host sends, a bad frame, or the host going away is a protocol
//! violation: the reader reports it (through a channel plus a wake-up
//! socket the pump polls), the command's process group is killed and the
//! session fails, after which the init powers off.
//!
//! Before the command starts, the init opens every other connection the run
//! needs: the workspace stream (port 1025) and the results connection (port
//! 1026), which it holds until the command has ended. The host takes one
//! connection on each of these ports and on the control port, so all of them
//! are the init's and any later one (the command's, if it is root in the VM)
//! is refused ([`Placement`]: outside a container the command runs as an
//! unprivileged user that cannot open vsock at all).
//!
//! When the host's `Hello` lists the `audit` capability, the session also
//! sends `AuditEvent`s ([`procevents`]): `process.start` once the command
//! runs, every exec in the VM while it runs (the process events socket is
//! polled with the command's pipes), and `process.exit` before `Exit`.
//!
//! Every wait has a way out: connecting gives up after
//! [`CONNECT_PATIENCE`] (or [`CONNECT_PATIENCE_SLOW`] while connects time
//! out), the handshake after [`HANDSHAKE_TIMEOUT`], the
//! command after its spec's timeout, and its stragglers after
//! [`exec::DRAIN_GRACE`]. Writes to the host block only under its own
//! back-pressure; the host owns the VM's lifetime and ends it if it stops
//! reading.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::ChildStdin;
use std::sync::mpsc::{self, Sender, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use airlock_protocol::limits::MAX_ERROR_MESSAGE;
use airlock_protocol::{
    capability, read_frame, write_frame, ErrorCode, ExitStatus, FrameError, Message,
    CONNECT_FAILED, CONTROL_PORT, FILES_IN_PORT, FILES_OUT_PORT, HOST_CID, PROTOCOL_VERSION,
};

use crate::console;
use crate::exec::{self, ChildWait, Event};
use crate::procevents;
use crate::vsock::VsockStream;

/// How long to keep trying to reach the host while it answers (the vsock
/// device may come up after the init starts; a refusal means nobody
/// listens, as when the VMM runs without a broker).
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(2);
/// How long to keep trying while connects time out: the host is there but
/// slow (several sandboxes booting at once under emulation took a single
/// connect past the vsock's own 2 s timeout). The host's boot deadline
/// bounds the run anyway.
pub const CONNECT_PATIENCE_SLOW: Duration = Duration::from_secs(30);
/// Pause between two connection attempts.
const CONNECT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait for each of the host's `Hello` and `RunSpec`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A blocking byte stream to the host that can be split in two and given a
/// read timeout: the vsock connection, or a Unix socket in tests.
pub trait Stream: Read + Write + Send + Sized + 'static {
    /// A second handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// Bounds each blocking read; `None` blocks for ever.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Stream for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        VsockStream::try_clone(self)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        VsockStream::set_read_timeout(self, timeout)
    }
}

/// The control session failed; the init powers off after it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{CONNECT_FAILED} (vsock cid {HOST_CID} port {CONTROL_PORT})")]
    Connect(#[source] io::Error),
    #[error("failed to set up the control connection")]
    Setup(#[source] io::Error),
    #[error("failed to send {0} to the host")]
    Send(&'static str, #[source] FrameError),
    #[error("failed to receive {0} from the host")]
    Receive(&'static str, #[source] FrameError),
    #[error("the host closed the control connection")]
    Closed,
    #[error("the host speaks protocol version {0}, this init speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("the host sent {got} where {expected} was expected")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("the host reported an error ({code:?}): {message}")]
    Host { code: ErrorCode, message: String },
    #[error(transparent)]
    Exec(#[from] exec::Error),
}

impl Error {
    /// The code to tell the host before giving up, when there is one.
    pub(crate) fn reply_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Version(_) => Some(ErrorCode::VersionMismatch),
            Self::Unexpected { .. } => Some(ErrorCode::UnexpectedMessage),
            Self::Receive(_, FrameError::Decode(_)) => Some(ErrorCode::MalformedFrame),
            Self::Setup(_) | Self::Exec(_) => Some(ErrorCode::Internal),
            Self::Connect(_)
            | Self::Send(..)
            | Self::Receive(..)
            | Self::Closed
            | Self::Host { .. } => None,
        }
    }
}

/// Connects to the host and runs the session; returns the command's status
/// once its `Exit` was sent.
/// With `container`, the command runs in a podman container
/// ([`crate::image::containerize`]).
pub fn run(
    waiter: &mut impl ChildWait,
    placement: Placement,
    prepared: Option<crate::prepared::Prepared>,
) -> Result<ExitStatus, Error> {
    let stream = connect()?;
    console::debug("connected to the host");
    serve_in(stream, waiter, placement, prepared)
}

/// Where and as whom the command runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placement {
    /// In a podman container of this mode (as the container's root).
    pub container: Option<crate::image::Mode>,
    /// The host's model request body limit (`airlock.model_max_body`),
    /// for the in-guest endpoint; `None`: [`crate::model::MAX_BODY`].
    pub model_max_body: Option<u64>,
    /// The `--host-port` forwards the agent reaches on loopback
    /// (`airlock.host_ports`).
    pub host_ports: crate::egress::HostPorts,
    /// Directly in the VM as the unprivileged agent user
    /// ([`crate::privilege`]); else as root. Not with a container.
    pub agent: bool,
}

/// Whether a failed connect is worth another try: the device or the host's
/// listener may not be up yet.
fn retryable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::ECONNRESET
                | libc::ECONNREFUSED
                | libc::ENODEV
                | libc::ETIMEDOUT
                | libc::EINTR
                | libc::ENETUNREACH
                | libc::EHOSTUNREACH
        )
    )
}

fn connect() -> Result<VsockStream, Error> {
    let start = Instant::now();
    loop {
        match VsockStream::connect(HOST_CID, CONTROL_PORT) {
            Ok(stream) => return Ok(stream),
            Err(err)
                if retryable(&err) && {
                    let patience = if err.raw_os_error() == Some(libc::ETIMEDOUT) {
                        CONNECT_PATIENCE_SLOW
                    } else {
                        CONNECT_PATIENCE
                    };
                    start.elapsed() + CONNECT_BACKOFF < patience
                } =>
            {
                console::debug(&format!("connect: {err}; retrying"));
                thread::sleep(CONNECT_BACKOFF);
            }
            Err(err) => return Err(Error::Connect(err)),
        }
    }
}

/// Runs the control conversation over `stream` (see the module docs). On a
/// protocol error it tells the host why (best effort) before returning it.
#[cfg(test)]
pub fn serve<S: Stream>(stream: S, waiter: &mut impl ChildWait) -> Result<ExitStatus, Error> {
    serve_in(stream, waiter, Placement::default(), None)
}

/// The control conversation, the command placed as `placement` says (in
/// the container started before the snapshot, `prepared`, when the run's
/// spec would make that very container).
pub fn serve_in<S: Stream>(
    mut stream: S,
    waiter: &mut impl ChildWait,
    placement: Placement,
    prepared: Option<crate::prepared::Prepared>,
) -> Result<ExitStatus, Error> {
    let result = converse(&mut stream, waiter, placement, prepared);
    if let Err(err) = &result {
        if let Some(code) = err.reply_code() {
            let message = bounded(console::chain(err));
            let _ = write_frame(&mut stream, &Message::Error { code, message });
        }
    }
    result
}

fn converse<S: Stream>(
    stream: &mut S,
    waiter: &mut impl ChildWait,
    placement: Placement,
    prepared: Option<crate::prepared::Prepared>,
) -> Result<ExitStatus, Error> {
    let container = placement.container;
    // Dropped on an early return: the container is removed then too.
    let mut prepared = Prepared(prepared.filter(|_| container.is_some()));
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(Error::Setup)?;
    send(
        stream,
        &Message::Hello {
            version: PROTOCOL_VERSION,
            capabilities: vec![
                capability::AUDIT.into(),
                capability::FILES.into(),
                capability::COLLECT.into(),
                capability::MODEL.into(),
                capability::EXEC.into(),
                capability::RUN_AS.into(),
                capability::MOUNTS.into(),
                capability::EGRESS.into(),
            ],
        },
    )?;
    let host_caps = match receive(stream, "Hello")? {
        Message::Hello {
            version,
            capabilities,
        } if version == PROTOCOL_VERSION => capabilities,
        Message::Hello { version, .. } => return Err(Error::Version(version)),
        other => return Err(unexpected(other, "Hello")),
    };
    let has = |cap: &str| host_caps.iter().any(|c| c == cap);
    let audit = has(capability::AUDIT);
    let files = has(capability::FILES);
    let workspace = files && has(capability::WORKSPACE);
    let results = files && has(capability::RESULTS);
    let model = has(capability::MODEL);
    let egress = has(capability::EGRESS);
    let execs = has(capability::EXEC);
    let mut spec = match receive(stream, "RunSpec")? {
        Message::RunSpec(spec) => spec,
        other => return Err(unexpected(other, "RunSpec")),
    };
    // Results by pattern instead of /workspace/out, when the host says a
    // Collect follows.
    let collect = if results && has(capability::COLLECT) {
        match receive(stream, "Collect")? {
            Message::Collect { patterns } => Some(patterns),
            other => return Err(unexpected(other, "Collect")),
        }
    } else {
        None
    };
    // The container's user, when the host says a RunAs follows.
    let run_as = if has(capability::RUN_AS) {
        match receive(stream, "RunAs")? {
            Message::RunAs { user } => Some(user),
            other => return Err(unexpected(other, "RunAs")),
        }
    } else {
        None
    };
    // The live mounts, when the host says a Mounts follows.
    let mounts = if has(capability::MOUNTS) {
        match receive(stream, "Mounts")? {
            Message::Mounts { mounts } => mounts,
            other => return Err(unexpected(other, "Mounts")),
        }
    } else {
        Vec::new()
    };
    // Every connection the run needs is opened before the command starts
    // (the control connection is the first): the host takes one connection
    // on each of these ports and refuses later ones, so none can be the
    // command's.
    let mut results_stream = None;
    if workspace || results || placement.agent {
        match prepare_files(workspace, results, placement.agent) {
            Ok(opened) => results_stream = opened,
            Err((what, err)) => {
                let status = ExitStatus::Exited(126);
                send(
                    stream,
                    &Message::Error {
                        code: ErrorCode::SpawnFailed,
                        message: bounded(format!("{what}: {}", console::chain(&err))),
                    },
                )?;
                send(stream, &Message::Exit(status))?;
                await_host_close(stream);
                return Ok(status);
            }
        }
    }
    if !mounts.is_empty() {
        let mounted = if container.is_some() {
            crate::share::mount_all(&mounts)
        } else {
            Err("live mounts need the agent's container".to_owned())
        };
        if let Err(why) = mounted {
            let status = ExitStatus::Exited(126);
            finish_results(results_stream, collect.as_deref());
            send(
                stream,
                &Message::Error {
                    code: ErrorCode::SpawnFailed,
                    message: bounded(why),
                },
            )?;
            send(stream, &Message::Exit(status))?;
            await_host_close(stream);
            return Ok(status);
        }
    }
    if placement.agent && !spec.env.iter().any(|(name, _)| name == "HOME") {
        spec.env
            .push(("HOME".into(), crate::privilege::AGENT_HOME.into()));
    }
    // The model endpoint, before the command: its variables go into the
    // command's environment, its network namespace to the container. The
    // requests it refuses itself are audit claims, sent by the pump below
    // when the endpoint wakes it through `wake`.
    let (wake, notify) = UnixStream::pair().map_err(Error::Setup)?;
    let mut network = None;
    let mut model_reports = None;
    // The agent's loopback services: the model endpoint and the egress
    // proxy, in one namespace (the container's, or the VM's).
    let mut ports = Vec::new();
    if model {
        ports.push(crate::model::PORT);
    }
    if egress {
        ports.extend([crate::egress::PROXY_PORT, crate::egress::SOCKS_PORT]);
        ports.extend_from_slice(placement.host_ports.as_slice());
    }
    let listeners = if ports.is_empty() {
        Vec::new()
    } else {
        match crate::model::listen_ports(container.is_some(), &ports, prepared.0.is_some()) {
            Ok((listeners, ns)) => {
                network = ns;
                listeners
            }
            Err(err) => {
                console::warn(&format!("loopback services: {}", console::chain(&err)));
                Vec::new()
            }
        }
    };
    // What the loopback services refuse themselves, reported as audit
    // claims by the pump below (woken through `wake`).
    let reporter = if audit && !listeners.is_empty() {
        let (reporter, reports) =
            crate::model::Reporter::new(notify.try_clone().map_err(Error::Setup)?);
        model_reports = Some(reports);
        Some(reporter)
    } else {
        None
    };
    let mut egress_listeners = Vec::new();
    for (port, listener) in listeners {
        let listener = match listener {
            Ok(l) => l,
            Err(err) => {
                console::warn(&format!("cannot listen on 127.0.0.1:{port}: {err}"));
                continue;
            }
        };
        if port == crate::model::PORT && model {
            match crate::model::start(listener, reporter.clone(), placement.model_max_body) {
                Ok(()) => {
                    let extra = crate::model::agent_env(&spec.env);
                    spec.env.extend(extra);
                }
                Err(err) => console::warn(&format!("model endpoint: {}", console::chain(&err))),
            }
        } else {
            let service = match port {
                crate::egress::PROXY_PORT => crate::egress::Service::Http,
                crate::egress::SOCKS_PORT => crate::egress::Service::Socks,
                p => crate::egress::Service::Forward(p),
            };
            egress_listeners.push((service, listener));
        }
    }
    if !egress_listeners.is_empty() {
        let proxy = egress_listeners
            .iter()
            .any(|(s, _)| matches!(s, crate::egress::Service::Http));
        match crate::egress::start(egress_listeners, reporter) {
            Ok(()) if proxy => {
                let extra = crate::egress::agent_env(&spec.env);
                spec.env.extend(extra);
            }
            Ok(()) => {}
            Err(err) => console::warn(&format!("egress proxy: {err}")),
        }
    }
    // With the container started before the snapshot: its `podman run`
    // and argv; the run's environment, which that container lacks, goes to
    // every exec instead.
    let mut adopted = None;
    let mut sandbox_env = Vec::new();
    let spec = match container {
        Some(mode) => {
            let image = if mode.archive {
                match crate::image::load_archive() {
                    Ok(image) => {
                        console::debug(&format!("loaded image {image}"));
                        Some(image)
                    }
                    Err(err) => {
                        let status = ExitStatus::Exited(125);
                        finish_results(results_stream, collect.as_deref());
                        send(
                            stream,
                            &Message::Error {
                                code: ErrorCode::SpawnFailed,
                                message: bounded(format!("image archive: {err}")),
                            },
                        )?;
                        send(stream, &Message::Exit(status))?;
                        await_host_close(stream);
                        return Ok(status);
                    }
                }
            } else {
                None
            };
            let premounted = prepared
                .0
                .as_ref()
                .and_then(|p| p.rootfs().map(str::to_owned));
            let rootfs = if premounted.is_some() {
                premounted
            } else if mode.image_disk && !mode.archive {
                match crate::image::mount_image_disk() {
                    Ok(dir) => Some(dir),
                    Err(err) => {
                        let status = ExitStatus::Exited(125);
                        finish_results(results_stream, collect.as_deref());
                        send(
                            stream,
                            &Message::Error {
                                code: ErrorCode::SpawnFailed,
                                message: bounded(format!("image disk: {err}")),
                            },
                        )?;
                        send(stream, &Message::Exit(status))?;
                        await_host_close(stream);
                        return Ok(status);
                    }
                }
            } else {
                None
            };
            let setup = crate::image::Container {
                memory_mib: crate::image::mem_total_kib().and_then(crate::image::agent_memory_mib),
                nested: mode.nested,
                image,
                rootfs,
                user: run_as.clone(),
                network,
                mounts: mounts.clone(),
            };
            if let Some(p) = prepared.0.take() {
                let would_be = crate::image::containerize(
                    airlock_protocol::RunSpec {
                        env: Vec::new(),
                        ..spec.clone()
                    },
                    &setup,
                );
                match p.adopt(&would_be.argv) {
                    Ok((running, argv)) => {
                        console::debug("the agent's container was started before the snapshot");
                        adopted = Some((running, argv));
                    }
                    Err(why) => console::debug(&format!(
                        "the container started before the snapshot is removed: {why}"
                    )),
                }
            }
            if adopted.is_some() {
                sandbox_env.clone_from(&spec.env);
            }
            let mut made = crate::image::containerize(spec, &setup);
            if let Some((_, argv)) = &adopted {
                made.argv.clone_from(argv);
            }
            made
        }
        None => spec,
    };
    stream.set_read_timeout(None).map_err(Error::Setup)?;
    if console::debug_enabled() {
        console::debug(&format!("running {:?} in {}", spec.argv, spec.cwd));
    }

    // Subscribed before the command starts, so that its own exec is seen.
    let procs = if audit {
        match procevents::Socket::open() {
            Ok(socket) => Some(socket),
            Err(err) => {
                console::warn(&format!("process events unavailable: {err}"));
                let reason = Message::AuditEvent {
                    kind: "audit.unavailable".into(),
                    fields: vec![("reason".into(), bounded_value(err.to_string()))],
                };
                send(stream, &reason)?;
                None
            }
        }
    } else {
        None
    };
    let mut recorder = procevents::Recorder::new();

    // A live sandbox: the host's execs, from before the command starts (so
    // that the host may connect as soon as the command runs) to its end.
    let exec_listener = if execs {
        match crate::vsock::VsockListener::bind(airlock_protocol::EXEC_PORT) {
            Ok(listener) => Some(listener),
            Err(err) => {
                console::warn(&format!("cannot serve execs: {err}"));
                None
            }
        }
    } else {
        None
    };
    let exec_env = if container.is_none() {
        spec.env.clone()
    } else if adopted.is_some() {
        sandbox_env
    } else {
        Vec::new()
    };
    let mut oom_watch = OomWatch::start();
    let agent = placement.agent.then(crate::privilege::Agent::new);
    let prepared_start = adopted.is_some();
    let spawned = match adopted {
        Some((running, _)) => Ok(running),
        None => exec::spawn(&spec, agent.as_ref()),
    };
    let mut running = match spawned {
        Ok(running) => running,
        Err(err) => {
            let status = ExitStatus::Exited(err.exit_code());
            finish_results(results_stream, collect.as_deref());
            send(
                stream,
                &Message::Error {
                    code: ErrorCode::SpawnFailed,
                    message: bounded(err.to_string()),
                },
            )?;
            send(stream, &Message::Exit(status))?;
            await_host_close(stream);
            return Ok(status);
        }
    };

    let pid = running.pid();
    console::debug(&format!("started pid {pid}"));
    let exec_server = match exec_listener {
        Some(listener) => {
            let setup = crate::execd::Setup {
                container: container.is_some(),
                agent: placement.agent,
                env: exec_env,
                // execd::start shares its stop flag here.
                ended: Default::default(),
            };
            match crate::execd::start(listener, setup) {
                Ok(server) => Some(server),
                Err(err) => {
                    console::warn(&format!("cannot serve execs: {err}"));
                    None
                }
            }
        }
        None => None,
    };
    if audit {
        if prepared_start {
            send(
                stream,
                &Message::AuditEvent {
                    kind: PREPARED_EVENT.into(),
                    fields: vec![("pid".into(), pid.to_string())],
                },
            )?;
        }
        send(
            stream,
            &procevents::process_start(pid, &spec.argv, &spec.cwd),
        )?;
    }
    // From here on an early return drops `running`, which kills the
    // command's process group.
    let (events, violations) = mpsc::channel();
    let reader = stream.try_clone().map_err(Error::Setup)?;
    let stdin = running.take_stdin();
    let expect_stdin = spec.stdin;
    thread::Builder::new()
        .name("host-reader".into())
        .spawn(move || read_host(reader, expect_stdin, stdin, &events, notify))
        .map_err(Error::Setup)?;

    let timeout = spec.timeout_ms.map(Duration::from_millis);
    let extra = procs.as_ref().map(procevents::Socket::as_fd);
    let ended = running.pump(waiter, timeout, wake.as_fd(), extra, |event| match event {
        Event::Stdout(data) => send(stream, &Message::Stdout(data.to_vec())),
        Event::Stderr(data) => send(stream, &Message::Stderr(data.to_vec())),
        Event::Extra => match &procs {
            Some(socket) => recorder.drain(socket, |m| send(stream, &m)),
            None => Ok(()),
        },
        Event::Host => {
            let mut buf = [0u8; 16];
            let _ = (&wake).read(&mut buf);
            if let Some(reports) = &model_reports {
                while let Ok(report) = reports.try_recv() {
                    send(stream, &report)?;
                }
            }
            match violations.try_recv() {
                Ok(err) => Err(err),
                Err(TryRecvError::Empty) => Ok(()),
                Err(TryRecvError::Disconnected) => Err(Error::Closed),
            }
        }
    })?;
    if ended.timed_out {
        console::debug("the command timed out and was killed");
    }
    // The execs still running end with it (or soon after): let them hand
    // the host their exit status before this one's Exit ends the VM.
    if let Some(server) = &exec_server {
        let left = server.finish(crate::execd::FINISH_PATIENCE);
        if left > 0 {
            console::warn(&format!(
                "{left} exec(s) still running as the sandbox ends; they are cut"
            ));
        }
    }
    if audit {
        // What the kernel queued before the command's end (its own exit
        // event included) goes out before its exit status.
        if let Some(socket) = &procs {
            recorder.drain(socket, |m| send(stream, &m))?;
        }
        recorder.flush(|m| send(stream, &m))?;
        let kills = oom_watch.as_mut().map_or(0, OomWatch::kills);
        if kills > 0 {
            // The kernel (or the container's memory cgroup) killed
            // processes for memory while the command ran.
            send(
                stream,
                &Message::AuditEvent {
                    kind: "memory.oom".into(),
                    fields: vec![("oom_kills".into(), kills.to_string())],
                },
            )?;
        }
        if let Some(reports) = &model_reports {
            while let Ok(report) = reports.try_recv() {
                send(stream, &report)?;
            }
        }
        send(
            stream,
            &procevents::process_exit(pid, ended.status, ended.timed_out),
        )?;
    }
    // Before Exit: the host reads the results while the VM still runs, and
    // closes the connection once it has them all.
    finish_results(results_stream, collect.as_deref());
    send(stream, &Message::Exit(ended.status))?;
    // The host half-closes once it has read Exit (the reader thread then
    // reports the end of the stream). Powering off before that could lose
    // the frame in flight; a host that never answers costs EXIT_ACK_PATIENCE.
    match violations.recv_timeout(EXIT_ACK_PATIENCE) {
        Ok(Error::Closed) => console::debug("the host has the exit status"),
        Ok(other) => console::debug(&format!("after Exit: {}", console::chain(&other))),
        Err(_) => console::debug("the host did not acknowledge the exit status"),
    }
    Ok(ended.status)
}

/// The audit event that says the command is the agent's container started
/// before the snapshot (`pid`: its `podman run`), adopted after the wake:
/// the engine's own process events of its start came before the wake and
/// are not in the log.
pub const PREPARED_EVENT: &str = "container.prepared";

/// The container started before the snapshot until it is adopted; removed
/// if dropped before.
struct Prepared(Option<crate::prepared::Prepared>);

impl Drop for Prepared {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.dispose();
        }
    }
}

/// Before the command: `/workspace` (the agent's, when `agent`), the
/// workspace from [`FILES_IN_PORT`] when `workspace`, and when `results`
/// `/workspace/out` and the connection to [`FILES_OUT_PORT`] the results
/// go back on (returned). For the agent also its `HOME`. On failure, what
/// failed and why.
fn prepare_files(
    workspace: bool,
    results: bool,
    agent: bool,
) -> Result<Option<VsockStream>, (&'static str, crate::files::Error)> {
    use crate::files::{self, Error as FilesError};
    use crate::privilege;
    // In image mode /workspace is a tmpfs already; in initramfs mode a
    // directory of the root.
    let root = std::path::Path::new(files::WORKSPACE);
    let at = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |e| FilesError::Io(path, e)
    };
    if agent {
        privilege::agent_dir(root, 0o755).map_err(|e| ("workspace", at(root)(e)))?;
        let home = std::path::Path::new(privilege::AGENT_HOME);
        privilege::agent_dir(home, 0o700).map_err(|e| ("home", at(home)(e)))?;
    }
    if workspace {
        let n =
            files::receive_workspace(root, FILES_IN_PORT, agent).map_err(|e| ("workspace", e))?;
        console::debug(&format!("workspace: {n} entries"));
    }
    if !results {
        return Ok(None);
    }
    // The command writes its results there.
    let out = root.join(files::OUT_DIR);
    let made = if agent {
        privilege::agent_dir(&out, 0o755)
    } else {
        std::fs::create_dir_all(&out)
    };
    made.map_err(|e| ("workspace", at(&out)(e)))?;
    let stream = files::connect_results(FILES_OUT_PORT).map_err(|e| ("results", e))?;
    console::debug("results connection open");
    Ok(Some(stream))
}

/// Sends the results over the connection opened before the command, if
/// there is one (see [`crate::files::send_results`]).
fn finish_results(stream: Option<VsockStream>, collect: Option<&[String]>) {
    let Some(stream) = stream else { return };
    let root = std::path::Path::new(crate::files::WORKSPACE);
    match crate::files::send_results(stream, root, collect) {
        Ok(true) => console::debug("results sent"),
        Ok(false) => console::debug("no /workspace/out: no results"),
        Err(err) => console::warn(&format!("results: {}", console::chain(&err))),
    }
}

/// Watches the kernel log for OOM kills from now on. The guest kernel has
/// no VM event counters (`/proc/vmstat` has no `oom_kill`), so the init
/// reads the kernel's own "Out of memory: Killed process" and "Memory
/// cgroup out of memory: Killed process" records from `/dev/kmsg`.
struct OomWatch {
    kmsg: std::fs::File,
}

impl OomWatch {
    /// Opens `/dev/kmsg` positioned after the records logged so far.
    fn start() -> Option<OomWatch> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let mut kmsg = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/kmsg")
            .ok()?;
        kmsg.seek(SeekFrom::End(0)).ok()?;
        Some(OomWatch { kmsg })
    }

    /// The OOM kills logged since [`OomWatch::start`] or the last call.
    fn kills(&mut self) -> u64 {
        let mut kills = 0;
        // One record per read; at most this many are looked at.
        let mut buf = [0u8; 8192];
        for _ in 0..100_000 {
            match self.kmsg.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => kills += u64::from(is_oom_kill(&buf[..n])),
                // EPIPE: older records were overwritten; go on reading.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        kills
    }
}

/// Whether a `/dev/kmsg` record is the kernel killing a process for memory.
fn is_oom_kill(record: &[u8]) -> bool {
    let text = String::from_utf8_lossy(record);
    let message = text.split_once(';').map_or(&*text, |(_, m)| m);
    message.contains("out of memory: Killed process")
        || message.contains("Out of memory: Killed process")
}

/// Waits (bounded) for the host's end-of-file after `Exit`, when no reader
/// thread runs.
pub(crate) fn await_host_close<S: Stream>(stream: &mut S) {
    let _ = stream.set_read_timeout(Some(EXIT_ACK_PATIENCE));
    match read_frame(&mut *stream) {
        Err(FrameError::Closed) => console::debug("the host has the exit status"),
        Ok(msg) => console::debug(&format!("after Exit the host sent {}", msg.kind())),
        Err(err) => console::debug(&format!("after Exit: {err}")),
    }
}

/// How long the init waits, after `Exit`, for the host to close its side.
pub const EXIT_ACK_PATIENCE: Duration = Duration::from_secs(10);

/// The `host-reader` thread: forwards `Stdin` to the command until
/// `StdinEnd`, and reports the first frame that breaks the conversation
/// (anything else, a bad frame, the host closing), then ends.
pub(crate) fn read_host<R: Read>(
    mut reader: R,
    expect_stdin: bool,
    mut stdin: Option<ChildStdin>,
    events: &Sender<Error>,
    mut notify: UnixStream,
) {
    let mut stdin_open = expect_stdin;
    let violation = loop {
        match read_frame(&mut reader) {
            Ok(Message::Stdin(data)) if stdin_open => {
                // The command may close its stdin early (EPIPE): drop the
                // rest of the input, as a pipe in a shell would.
                if let Some(pipe) = stdin.as_mut() {
                    if pipe.write_all(&data).is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(Message::StdinEnd) if stdin_open => {
                stdin_open = false;
                stdin = None;
            }
            Ok(other) => {
                let expected = if stdin_open {
                    "Stdin or StdinEnd"
                } else {
                    "no message"
                };
                break unexpected(other, expected);
            }
            Err(FrameError::Closed) => break Error::Closed,
            Err(err) => break Error::Receive("a message", err),
        }
    };
    // The session may be over already; then nobody listens, which is fine.
    let _ = events.send(violation);
    let _ = notify.write_all(&[1]);
}

pub(crate) fn send<S: Write>(stream: &mut S, msg: &Message) -> Result<(), Error> {
    write_frame(stream, msg).map_err(|err| Error::Send(msg.kind(), err))
}

pub(crate) fn receive<S: Read>(stream: &mut S, what: &'static str) -> Result<Message, Error> {
    match read_frame(stream) {
        Ok(msg) => Ok(msg),
        Err(FrameError::Closed) => Err(Error::Closed),
        Err(err) => Err(Error::Receive(what, err)),
    }
}

/// The error for a message the conversation does not allow here; an
/// `Error` from the host is reported as such.
pub(crate) fn unexpected(msg: Message, expected: &'static str) -> Error {
    match msg {
        Message::Error { code, message } => Error::Host { code, message },
        other => Error::Unexpected {
            got: other.kind(),
            expected,
        },
    }
}

/// `value` cut to what an `AuditEvent` value may carry, on a character
/// boundary.
fn bounded_value(mut value: String) -> String {
    let max = airlock_protocol::limits::MAX_AUDIT_VALUE;
    if value.len() > max {
        let mut end = max;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

/// `message` cut to what an `Error` frame may carry, on a character
/// boundary.
pub(crate) fn bounded(mut message: String) -> String {
    if message.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

#[cfg(test)]
impl Stream for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::WaitPid;
    use airlock_protocol::RunSpec;
    use std::net::Shutdown;

    fn spec(argv: &[&str]) -> RunSpec {
        RunSpec {
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            env: vec![],
            cwd: "/".into(),
            timeout_ms: None,
            max_output_bytes: 1 << 20,
            stdin: false,
        }
    }

    fn hello(version: u32) -> Message {
        Message::Hello {
            version,
            capabilities: vec![],
        }
    }

    /// What the fake host saw.
    #[derive(Debug, Default)]
    struct Seen {
        /// Every frame after the guest's Hello.
        frames: Vec<Message>,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
    }

    impl Seen {
        fn last(&self) -> Option<&Message> {
            self.frames.last()
        }
    }

    /// Runs a session against a fake host that checks the guest's Hello,
    /// answers with `reply`, then (unless `None`) sends the spec, runs
    /// `script` and reads frames until `Exit`, an `Error` that ends the
    /// conversation, or the end of the stream.
    fn session(
        reply: Message,
        spec: Option<RunSpec>,
        script: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> (Result<ExitStatus, Error>, Seen) {
        let (guest, mut host) = UnixStream::pair().expect("socketpair");
        let fake_host = thread::spawn(move || {
            let mut seen = Seen::default();
            assert_eq!(
                read_frame(&mut host).expect("guest hello"),
                Message::Hello {
                    version: 1,
                    capabilities: vec![
                        "audit".into(),
                        "files".into(),
                        "collect".into(),
                        "model".into(),
                        "exec".into(),
                        "run-as".into(),
                        "mounts".into(),
                        "egress".into()
                    ]
                }
            );
            write_frame(&mut host, &reply).expect("send hello");
            if let Some(spec) = spec {
                write_frame(&mut host, &Message::RunSpec(spec)).expect("send spec");
            }
            script(&mut host);
            while let Ok(msg) = read_frame(&mut host) {
                match &msg {
                    Message::Stdout(d) => seen.stdout.extend_from_slice(d),
                    Message::Stderr(d) => seen.stderr.extend_from_slice(d),
                    _ => {}
                }
                let done = match &msg {
                    Message::Exit(_) => true,
                    Message::Error { code, .. } => *code != ErrorCode::SpawnFailed,
                    _ => false,
                };
                seen.frames.push(msg);
                if done {
                    break;
                }
            }
            seen
        });
        let result = serve(guest, &mut WaitPid);
        let seen = fake_host.join().expect("fake host");
        (result, seen)
    }

    fn no_script(_: &mut UnixStream) {}

    /// The init powers off only once the host has its exit status: after
    /// `Exit` it waits for the host's end-of-file.
    #[test]
    fn after_exit_the_session_waits_for_the_host_to_close() {
        let (guest, mut host) = UnixStream::pair().expect("socketpair");
        let fake_host = thread::spawn(move || {
            read_frame(&mut host).expect("guest hello");
            write_frame(&mut host, &hello(1)).expect("hello");
            write_frame(&mut host, &Message::RunSpec(spec(&["true"]))).expect("spec");
            while !matches!(read_frame(&mut host), Ok(Message::Exit(_)) | Err(_)) {}
            thread::sleep(Duration::from_millis(300));
            let closed_at = Instant::now();
            host.shutdown(std::net::Shutdown::Write)
                .expect("half-close");
            // Keep reading, as the broker does, until the guest goes away.
            while read_frame(&mut host).is_ok() {}
            closed_at
        });
        let result = serve(guest, &mut WaitPid);
        let returned_at = Instant::now();
        let closed_at = fake_host.join().expect("fake host");
        assert_eq!(result.expect("session"), ExitStatus::Exited(0));
        assert!(
            returned_at >= closed_at,
            "the session ended before the host closed"
        );
    }

    #[test]
    fn runs_a_command_and_streams_its_output_and_status() {
        let (result, seen) = session(
            hello(1),
            Some(spec(&["sh", "-c", "echo a; echo b >&2; exit 3"])),
            no_script,
        );
        assert_eq!(result.expect("session"), ExitStatus::Exited(3));
        assert_eq!(seen.stdout, b"a\n");
        assert_eq!(seen.stderr, b"b\n");
        assert_eq!(seen.last(), Some(&Message::Exit(ExitStatus::Exited(3))));
        assert!(seen.frames.iter().all(|m| matches!(
            m,
            Message::Stdout(_) | Message::Stderr(_) | Message::Exit(_)
        )));
    }

    #[test]
    fn with_the_audit_capability_the_command_is_audited() {
        let audit_hello = Message::Hello {
            version: 1,
            capabilities: vec!["audit".into()],
        };
        let (result, seen) = session(
            audit_hello,
            Some(spec(&["sh", "-c", "echo a; exit 3"])),
            no_script,
        );
        assert_eq!(result.expect("session"), ExitStatus::Exited(3));
        assert_eq!(seen.stdout, b"a\n");
        let events: Vec<(&str, &Vec<(String, String)>)> = seen
            .frames
            .iter()
            .filter_map(|m| match m {
                Message::AuditEvent { kind, fields } => Some((kind.as_str(), fields)),
                _ => None,
            })
            .collect();
        let field = |fields: &Vec<(String, String)>, name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let start = events
            .iter()
            .find(|(k, _)| *k == "process.start")
            .expect("process.start");
        assert_eq!(
            field(start.1, "argv").as_deref(),
            Some("sh -c 'echo a; exit 3'")
        );
        let pid = field(start.1, "pid").expect("pid");
        // Just before Exit: the command's end.
        let n = seen.frames.len();
        let Message::AuditEvent { kind, fields } = &seen.frames[n - 2] else {
            panic!("{:?}", seen.frames[n - 2])
        };
        assert_eq!(kind, "process.exit");
        assert_eq!(field(fields, "code").as_deref(), Some("3"));
        assert_eq!(field(fields, "pid"), Some(pid.clone()));
        // Where process events can be had, the command's own exec is there
        // (this test runs a real process on the host's kernel).
        if !events.iter().any(|(k, _)| *k == "audit.unavailable") {
            assert!(
                events
                    .iter()
                    .any(|(k, f)| *k == "exec" && field(f, "pid") == Some(pid.clone())),
                "{events:?}"
            );
        }
        // Without the capability, nothing of it.
        let (_, seen) = session(hello(1), Some(spec(&["true"])), no_script);
        assert!(!seen
            .frames
            .iter()
            .any(|m| matches!(m, Message::AuditEvent { .. })));
    }

    #[test]
    fn a_spawn_failure_is_an_error_then_a_shell_exit_code() {
        let (result, seen) = session(hello(1), Some(spec(&["/nonexistent/prog"])), no_script);
        assert_eq!(result.expect("session"), ExitStatus::Exited(127));
        assert_eq!(
            seen.frames,
            vec![
                Message::Error {
                    code: ErrorCode::SpawnFailed,
                    message: "cannot run /nonexistent/prog: No such file or directory".into()
                },
                Message::Exit(ExitStatus::Exited(127)),
            ]
        );

        let (result, seen) = session(hello(1), Some(spec(&["/etc/passwd"])), no_script);
        assert_eq!(result.expect("session"), ExitStatus::Exited(126));
        assert_eq!(seen.last(), Some(&Message::Exit(ExitStatus::Exited(126))));
    }

    #[test]
    fn stdin_is_forwarded_and_ended() {
        let mut s = spec(&["cat"]);
        s.stdin = true;
        let (result, seen) = session(hello(1), Some(s), |host| {
            for msg in [
                Message::Stdin(b"hello ".to_vec()),
                Message::Stdin(b"world".to_vec()),
                Message::StdinEnd,
            ] {
                write_frame(&mut *host, &msg).expect("send stdin");
            }
        });
        assert_eq!(result.expect("session"), ExitStatus::Exited(0));
        assert_eq!(seen.stdout, b"hello world");
    }

    #[test]
    fn without_stdin_the_command_reads_dev_null() {
        let (result, seen) = session(hello(1), Some(spec(&["cat"])), no_script);
        assert_eq!(result.expect("session"), ExitStatus::Exited(0));
        assert!(seen.stdout.is_empty());
    }

    #[test]
    fn a_timeout_kills_the_command() {
        let mut s = spec(&["sleep", "30"]);
        s.timeout_ms = Some(200);
        let started = Instant::now();
        let (result, seen) = session(hello(1), Some(s), no_script);
        assert_eq!(result.expect("session"), ExitStatus::Signaled(9));
        assert_eq!(seen.last(), Some(&Message::Exit(ExitStatus::Signaled(9))));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn another_version_is_refused() {
        let (result, seen) = session(hello(2), None, no_script);
        assert!(matches!(result, Err(Error::Version(2))), "{result:?}");
        assert!(matches!(
            seen.last(),
            Some(Message::Error {
                code: ErrorCode::VersionMismatch,
                ..
            })
        ));
    }

    #[test]
    fn a_host_error_instead_of_hello_ends_the_session() {
        let refusal = Message::Error {
            code: ErrorCode::VersionMismatch,
            message: "no".into(),
        };
        let (result, seen) = session(refusal, None, no_script);
        assert!(matches!(result, Err(Error::Host { .. })), "{result:?}");
        assert!(seen.frames.is_empty());
    }

    /// Starts `echo $$; exec sleep 30`, waits for the pid line, lets
    /// `violate` break the conversation, and returns the session's result,
    /// the command's pid and the next frame the host got.
    fn violation(
        violate: fn(&mut UnixStream),
    ) -> (
        Result<ExitStatus, Error>,
        libc::pid_t,
        Result<Message, FrameError>,
    ) {
        let (guest, mut host) = UnixStream::pair().expect("socketpair");
        let fake_host = thread::spawn(move || {
            read_frame(&mut host).expect("hello");
            write_frame(&mut host, &hello(1)).expect("hello");
            let s = spec(&["sh", "-c", "echo $$; exec sleep 30"]);
            write_frame(&mut host, &Message::RunSpec(s)).expect("spec");
            let Ok(Message::Stdout(line)) = read_frame(&mut host) else {
                panic!("no pid line");
            };
            violate(&mut host);
            (pid_of(&line), read_frame(&mut host))
        });
        let result = serve(guest, &mut WaitPid);
        let (pid, reply) = fake_host.join().expect("fake host");
        (result, pid, reply)
    }

    fn pid_of(line: &[u8]) -> libc::pid_t {
        std::str::from_utf8(line)
            .expect("utf-8")
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Reaps `pid` and checks SIGKILL ended it.
    fn assert_killed(pid: libc::pid_t) {
        let mut status = 0;
        // SAFETY: `status` is a live, writable c_int.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        assert_eq!(exec::exit_status(status), Some(ExitStatus::Signaled(9)));
    }

    #[test]
    fn an_unexpected_message_kills_the_command() {
        let (result, pid, reply) = violation(|host| {
            write_frame(host, &Message::Stdout(b"x".to_vec())).expect("send");
        });
        assert!(
            matches!(
                result,
                Err(Error::Unexpected {
                    got: "Stdout",
                    expected: "no message"
                })
            ),
            "{result:?}"
        );
        assert_eq!(
            reply.expect("an error frame"),
            Message::Error {
                code: ErrorCode::UnexpectedMessage,
                message: "the host sent Stdout where no message was expected".into()
            }
        );
        assert_killed(pid);
    }

    #[test]
    fn a_malformed_frame_kills_the_command() {
        let (result, pid, reply) = violation(|host| {
            // A header announcing 4 GiB, then a byte.
            host.write_all(&[0xff, 0xff, 0xff, 0xff, 1]).expect("send");
        });
        assert!(
            matches!(result, Err(Error::Receive(_, FrameError::Decode(_)))),
            "{result:?}"
        );
        assert!(
            matches!(
                reply,
                Ok(Message::Error {
                    code: ErrorCode::MalformedFrame,
                    ..
                })
            ),
            "{reply:?}"
        );
        assert_killed(pid);
    }

    #[test]
    fn a_host_error_kills_the_command() {
        let (result, pid, reply) = violation(|host| {
            let msg = Message::Error {
                code: ErrorCode::Internal,
                message: "broker failed".into(),
            };
            write_frame(host, &msg).expect("send");
        });
        assert!(
            matches!(&result, Err(Error::Host { code: ErrorCode::Internal, message }) if message == "broker failed"),
            "{result:?}"
        );
        // No answer to an error: the guest just closes.
        assert!(matches!(reply, Err(FrameError::Closed)), "{reply:?}");
        assert_killed(pid);
    }

    #[test]
    fn the_host_going_away_kills_the_command() {
        let (result, pid, _) = violation(|host| {
            host.shutdown(Shutdown::Both).expect("shutdown");
        });
        assert!(matches!(result, Err(Error::Closed)), "{result:?}");
        assert_killed(pid);
    }

    #[test]
    fn error_messages_are_bounded_on_a_char_boundary() {
        assert_eq!(bounded("short".into()), "short");
        let long = "é".repeat(MAX_ERROR_MESSAGE); // 2 bytes each
        let cut = bounded(long);
        assert!(cut.len() <= MAX_ERROR_MESSAGE);
        assert_eq!(cut.len(), MAX_ERROR_MESSAGE);
        let odd = format!("x{}", "é".repeat(MAX_ERROR_MESSAGE));
        let cut = bounded(odd);
        assert_eq!(cut.len(), MAX_ERROR_MESSAGE - 1);
        assert!(cut.is_char_boundary(cut.len()));
    }

    #[test]
    fn oom_kill_records_are_recognised() {
        assert!(is_oom_kill(
            b"3,512,9000,-;Out of memory: Killed process 77 (python3) total-vm:1kB\n"
        ));
        assert!(is_oom_kill(
            b"3,513,9001,-;Memory cgroup out of memory: Killed process 78 (python3)\n"
        ));
        assert!(!is_oom_kill(
            b"6,514,9002,-;python3 invoked oom-killer: gfp_mask=0x0\n"
        ));
        assert!(!is_oom_kill(b"6,515,9003,-;Killed process 1 (init)\n"));
    }

    #[test]
    fn late_devices_are_retried_other_errors_are_not() {
        for errno in [libc::ECONNRESET, libc::ENODEV, libc::ETIMEDOUT] {
            assert!(retryable(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::EAFNOSUPPORT, libc::EACCES, libc::EINVAL] {
            assert!(!retryable(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
    }
}
