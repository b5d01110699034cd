//! A live sandbox's lifecycle as a library: the handle ([`Sandbox`]) that
//! the lifecycle commands drive, and that a containerd shim can drive one
//! to one:
//!
//! | shim task API | here |
//! |---|---|
//! | `Create`, `Start` (the task) | [`Sandbox::create`]: boots, starts the agent container, returns once it is ready |
//! | `Exec`, `Start` (the exec), `Wait` (the exec) | [`Sandbox::exec`]: runs one command in the agent container, streams it, returns its status |
//! | `Kill` | [`Sandbox::stop`]: SIGTERM to the container's processes, SIGKILL after the grace, then the VM stops |
//! | `Wait` (the task) | [`Sandbox::wait`] |
//! | `State` | [`Sandbox::state`], [`Sandbox::describe`] |
//! | `Delete` | [`Sandbox::remove`] |
//!
//! A sandbox is its directory ([`Dir`]) and the supervisor that holds its
//! lock; everything here goes through the supervisor's control socket
//! ([`super::server`]), so any number of CLI processes may drive one
//! sandbox at once.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use airlock_protocol::limits::MAX_CHUNK;
use airlock_protocol::{read_frame, write_frame, ErrorCode, ExitStatus, Message};
use serde_json::{json, Value};

use super::{private_dir, root, valid_name, write_json, Dir};

/// How long [`Sandbox::create`] waits for the supervisor's control socket.
const SOCKET_PATIENCE: Duration = Duration::from_secs(120);
/// How long it then waits for the sandbox to be ready (the agent container
/// started: minutes under emulation).
const READY_PATIENCE: Duration = Duration::from_secs(600);

/// Why a lifecycle step could not be done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input, or a sandbox in the wrong state: nothing was changed.
    #[error("{0}")]
    Usage(String),
    /// The step was tried and failed.
    #[error("{0}")]
    Failed(String),
    /// The sandbox did not start; what its supervisor logged (`log`) and
    /// its audit log are kept for the user, the rest is gone.
    #[error("{how}")]
    NotStarted {
        how: NotStarted,
        log: Vec<u8>,
        audit_log: Option<String>,
    },
}

/// How a sandbox failed to start.
#[derive(Debug, thiserror::Error)]
pub enum NotStarted {
    /// The supervisor ended before its control socket was up (its own
    /// lines, in its log, say why; exit 2 is bad input).
    #[error("its supervisor exited ({0})")]
    Exited(std::process::ExitStatus),
    /// No control socket in time.
    #[error("no control socket within {0} s")]
    NoSocket(u64),
    /// It came up but did not become ready.
    #[error("it did not become ready: {0}")]
    NotReady(String),
}

/// What a sandbox is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A supervisor holds its lock (its pid, 0 if unreadable).
    Running(i32),
    /// Its supervisor ended and wrote how.
    Stopped,
    /// Its supervisor is gone without a word (killed, or the host went
    /// down): `rm` cleans it.
    Dead,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Running(_) => "running",
            State::Stopped => "stopped",
            State::Dead => "dead",
        }
    }
}

/// One command to run in a sandbox's agent container.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Absolute.
    pub cwd: String,
    /// `USER[:GROUP]`, else the container's own user.
    pub user: Option<String>,
}

/// How an exec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecEnd {
    /// The command's status, as the guest reported it; `spawn_failed`:
    /// the guest said it could not start it.
    Exited {
        status: ExitStatus,
        spawn_failed: bool,
    },
    /// Our stdout was closed: the exec's connection closed, so the guest
    /// kills the command.
    OutputClosed,
}

/// Refuses a name that is not `[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}`, shown
/// escaped.
pub fn check_name(name: &str) -> Result<(), Error> {
    if valid_name(name) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "'{}' is not a sandbox name ([a-zA-Z0-9][a-zA-Z0-9_.-]{{0,62}})",
        crate::text::sanitize(name.as_bytes())
    )))
}

/// Why [`Sandbox::start`] stopped.
enum Start {
    Not(NotStarted),
    Error(Error),
}

/// A handle on one sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    dir: Dir,
}

impl Sandbox {
    /// The sandbox whose directory is `dir` (a pool's member).
    pub(crate) fn at(dir: Dir) -> Sandbox {
        Sandbox { dir }
    }

    /// The sandbox named `name`, which must exist.
    pub fn open(name: &str) -> Result<Sandbox, Error> {
        check_name(name)?;
        let dir = Dir::of(name);
        if !dir.exists() {
            return Err(Error::Usage(format!(
                "no sandbox named {name} (see `airlock ls --all`)"
            )));
        }
        Ok(Sandbox { dir })
    }

    /// Every sandbox of this user, by name.
    pub fn list() -> Vec<Sandbox> {
        let mut dirs: Vec<Dir> = fs::read_dir(root())
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| valid_name(n))
                    .map(|n| Dir::of(&n))
                    .filter(Dir::exists)
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort_by(|a, b| a.name.cmp(&b.name));
        dirs.into_iter().map(|dir| Sandbox { dir }).collect()
    }

    /// Creates the sandbox `name` with `config` (written to its
    /// `config.json`) and starts `supervisor` for it (detached in its own
    /// session, its output to the sandbox's log; it must take the lock and
    /// serve the control socket). Returns once the sandbox is ready; on
    /// any failure nothing is left but the audit log.
    pub fn create(name: &str, config: &Value, supervisor: Command) -> Result<Sandbox, Error> {
        check_name(name)?;
        let base = root();
        private_dir(&base)
            .map_err(|e| Error::Failed(format!("cannot make {}: {e}", base.display())))?;
        Sandbox::create_at(Dir::of(name), config, supervisor)
    }

    /// [`Sandbox::create`] in `dir`, whose parent exists and is private
    /// (a warm pool's members live in their pool's directory).
    pub fn create_at(dir: Dir, config: &Value, supervisor: Command) -> Result<Sandbox, Error> {
        let name = dir.name.as_str();
        match fs::DirBuilder::new().mode(0o700).create(&dir.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let state = if dir.supervisor().is_some() {
                    "running"
                } else {
                    "stopped: `airlock rm` it first"
                };
                return Err(Error::Usage(format!(
                    "a sandbox named {name} already exists ({state})"
                )));
            }
            Err(e) => {
                return Err(Error::Failed(format!(
                    "cannot make {}: {e}",
                    dir.path.display()
                )))
            }
        }
        let sandbox = Sandbox { dir };
        match sandbox.start(config, supervisor) {
            Ok(()) => Ok(sandbox),
            Err(how) => {
                let log = fs::read(sandbox.dir.log()).unwrap_or_default();
                let audit_log = sandbox.audit_log();
                // Nothing is left but the audit log: the name is free again.
                if sandbox.dir.supervisor().is_none() {
                    let _ = fs::remove_dir_all(&sandbox.dir.path);
                }
                Err(match how {
                    Start::Not(how) => Error::NotStarted {
                        how,
                        log,
                        audit_log,
                    },
                    Start::Error(e) => e,
                })
            }
        }
    }

    fn start(&self, config: &Value, mut supervisor: Command) -> Result<(), Start> {
        let dir = &self.dir;
        write_json(&dir.config(), config).map_err(|e| {
            Start::Error(Error::Failed(format!(
                "cannot write {}: {e}",
                dir.config().display()
            )))
        })?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.log())
            .map_err(|e| {
                Start::Error(Error::Failed(format!(
                    "cannot open {}: {e}",
                    dir.log().display()
                )))
            })?;
        supervisor
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_or_else(|_| Stdio::null(), Stdio::from))
            .stderr(Stdio::from(log));
        super::detach(&mut supervisor);
        let mut child = supervisor.spawn().map_err(|e| {
            Start::Error(Error::Failed(format!("cannot start the supervisor: {e}")))
        })?;
        self.wait_socket(&mut child).map_err(Start::Not)?;
        let why = match self.ask(&json!({"op": "ready"}), READY_PATIENCE) {
            Ok(answer) if answer["ok"] == true => return Ok(()),
            Ok(answer) => answer["error"]
                .as_str()
                .unwrap_or("no reason given")
                .to_owned(),
            Err(e) => format!("no answer: {e}"),
        };
        let _ = self.stop(Duration::ZERO);
        let _ = child.wait();
        Err(Start::Not(NotStarted::NotReady(why)))
    }

    /// Waits for the supervisor's control socket (or its early end).
    fn wait_socket(&self, child: &mut Child) -> Result<(), NotStarted> {
        let deadline = Instant::now() + SOCKET_PATIENCE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(NotStarted::Exited(status));
            }
            if UnixStream::connect(self.dir.ctl()).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(NotStarted::NoSocket(SOCKET_PATIENCE.as_secs()));
            }
            // Two cheap system calls a try: a woken sandbox's supervisor is
            // listening within milliseconds on hardware, and a coarser step
            // would be most of its wait.
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn name(&self) -> &str {
        &self.dir.name
    }

    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// The sandbox's `config.json`.
    pub fn config(&self) -> Value {
        Dir::read_json(&self.dir.config()).unwrap_or_default()
    }

    /// The audit log's path, once the supervisor has made it.
    pub fn audit_log(&self) -> Option<String> {
        fs::read_to_string(self.dir.path.join("audit.path"))
            .ok()
            .map(|p| p.trim().to_owned())
    }

    pub fn state(&self) -> State {
        match (self.dir.supervisor(), self.dir.state().exists()) {
            (Some(pid), _) => State::Running(pid),
            (None, true) => State::Stopped,
            (None, false) => State::Dead,
        }
    }

    /// The sandbox as `ls` shows it: name, state, labels, created,
    /// engine, and the supervisor's pid while it runs.
    pub fn describe(&self) -> Value {
        let config = self.config();
        let state = self.state();
        let mut v = json!({
            "name": self.dir.name,
            "state": state.name(),
            "labels": config["labels"],
            "created_unix": config["created_unix"],
            "engine": config["engine"],
        });
        if let State::Running(pid) = state {
            v["supervisor_pid"] = json!(pid);
        }
        v
    }

    /// Everything `inspect` shows: [`Sandbox::describe`], the config, the
    /// paths, how it ended, and the supervisor's live status.
    pub fn inspect(&self) -> Value {
        let mut v = self.describe();
        v["config"] = self.config();
        v["directory"] = json!(self.dir.path);
        v["console_log"] = json!(self.dir.console());
        v["supervisor_log"] = json!(self.dir.log());
        if let Some(path) = self.audit_log() {
            v["audit_log"] = json!(path);
        }
        if let Some(end) = Dir::read_json(&self.dir.state()) {
            v["ended"] = end;
        }
        if matches!(self.state(), State::Running(_)) {
            if let Ok(status) = self.ask(&json!({"op": "status"}), Duration::from_secs(5)) {
                v["status"] = status;
            }
        }
        v
    }

    /// A request to the supervisor, and its one-line JSON answer.
    pub(crate) fn ask(&self, request: &Value, patience: Duration) -> io::Result<Value> {
        let mut stream = UnixStream::connect(self.dir.ctl())?;
        stream.set_read_timeout(Some(patience))?;
        stream.write_all(format!("{request}\n").as_bytes())?;
        let mut line = Vec::new();
        BufReader::new((&stream).take(super::server::MAX_REQUEST)).read_until(b'\n', &mut line)?;
        serde_json::from_slice(&line).map_err(io::Error::other)
    }

    /// Runs `spec` in the agent container: its stdout and stderr go to
    /// `out` and `err` as they come, `stdin` (if any) is forwarded to its
    /// end of file. Several execs may run at once.
    pub fn exec(
        &self,
        spec: &ExecSpec,
        stdin: Option<Box<dyn Read + Send>>,
        out: &mut dyn Write,
        err: &mut dyn Write,
        on_error: &mut dyn FnMut(&str),
    ) -> Result<ExecEnd, Error> {
        let name = &self.dir.name;
        if self.dir.supervisor().is_none() {
            return Err(Error::Usage(format!("the sandbox {name} is not running")));
        }
        let env: Vec<Value> = spec.env.iter().map(|(n, v)| json!([n, v])).collect();
        let request = json!({
            "op": "exec",
            "argv": spec.argv,
            "env": env,
            "cwd": spec.cwd,
            "stdin": stdin.is_some(),
            "user": spec.user,
        });
        let no_answer =
            |e: io::Error| Error::Failed(format!("the sandbox {name} does not answer: {e}"));
        let mut stream = UnixStream::connect(self.dir.ctl()).map_err(no_answer)?;
        stream
            .write_all(format!("{request}\n").as_bytes())
            .map_err(no_answer)?;
        if let Some(mut input) = stdin {
            let mut to = stream
                .try_clone()
                .map_err(|_| Error::Failed("cannot forward stdin".into()))?;
            thread::spawn(move || {
                let mut buf = vec![0u8; MAX_CHUNK];
                loop {
                    match input.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = write_frame(&mut to, &Message::StdinEnd);
                            return;
                        }
                        Ok(n) => {
                            if write_frame(&mut to, &Message::Stdin(buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
        let mut spawn_failed = false;
        loop {
            match read_frame(&mut stream) {
                Ok(Message::Stdout(data)) => {
                    if out.write_all(&data).and_then(|()| out.flush()).is_err() {
                        return Ok(ExecEnd::OutputClosed);
                    }
                }
                Ok(Message::Stderr(data)) => {
                    let _ = err.write_all(&data);
                }
                Ok(Message::Error { code, message }) => {
                    on_error(&message);
                    if code == ErrorCode::SpawnFailed {
                        spawn_failed = true;
                    }
                }
                Ok(Message::Exit(status)) => {
                    return Ok(ExecEnd::Exited {
                        status,
                        spawn_failed,
                    })
                }
                Ok(other) => {
                    return Err(Error::Failed(format!(
                        "unexpected {} from the supervisor",
                        other.kind()
                    )))
                }
                Err(e) => {
                    return Err(Error::Failed(format!(
                        "the exec in {name} ended without an exit status ({e})"
                    )))
                }
            }
        }
    }

    /// Waits until the supervisor has gone (its lock is free), at most
    /// `limit`; whether it has.
    pub fn wait(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.dir.supervisor().is_some() {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// Asks the supervisor to stop the sandbox (SIGTERM to the container's
    /// processes, SIGKILL after `grace`, then the VM) and waits for it to
    /// be gone; SIGKILL to the supervisor, whose VM dies with it, if it
    /// takes too long. Whether it is gone.
    pub fn stop(&self, grace: Duration) -> bool {
        let asked = self.ask(
            &json!({"op": "stop", "grace_secs": grace.as_secs()}),
            Duration::from_secs(5),
        );
        let patience = grace + Duration::from_secs(30);
        if asked.is_ok() && self.wait(patience) {
            return true;
        }
        if let Some(pid) = self.dir.supervisor().filter(|p| *p > 0) {
            // SAFETY: kill(2) with a pid read from the lock its holder
            // wrote; the lock is still held, so that process still lives.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.wait(Duration::from_secs(10))
    }

    /// [`Sandbox::stop`] for a warm pool's member, only while no `create`
    /// has taken it (the supervisor decides, so a member is either taken
    /// or stopped, never both). Whether it is gone.
    pub fn stop_if_pooled(&self, grace: Duration) -> bool {
        let asked = self.ask(
            &json!({"op": "stop", "grace_secs": grace.as_secs(), "if_pooled": true}),
            Duration::from_secs(5),
        );
        if !asked.is_ok_and(|a| a["ok"] == true) {
            return false;
        }
        if self.wait(grace + Duration::from_secs(30)) {
            return true;
        }
        if let Some(pid) = self.dir.supervisor().filter(|p| *p > 0) {
            // SAFETY: as in `stop`: the lock's holder, still alive.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.wait(Duration::from_secs(10))
    }

    /// Removes the sandbox: a running one only with `force` (then stopped
    /// at once). Nothing of it is left but its audit log.
    pub fn remove(self, force: bool) -> Result<(), Error> {
        let name = &self.dir.name;
        if self.dir.supervisor().is_some() {
            if !force {
                return Err(Error::Usage(format!(
                    "the sandbox {name} is running: `airlock stop {name}` first, or `airlock rm -f {name}`"
                )));
            }
            if !self.stop(Duration::ZERO) {
                return Err(Error::Failed(format!("the sandbox {name} did not stop")));
            }
        }
        fs::remove_dir_all(&self.dir.path)
            .map_err(|e| Error::Failed(format!("cannot remove {}: {e}", self.dir.path.display())))
    }
}
