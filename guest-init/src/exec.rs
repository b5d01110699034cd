//! Running the command of a run spec: spawning it in a session of its own
//! with exactly the spec's environment, then pumping its stdout and stderr
//! out as they are produced until it has ended.
//!
//! Nothing here speaks the protocol's framing: [`Running::pump`] hands each
//! chunk of output, and each wake-up from the host side, to a callback
//! (`rpc` turns them into frames). How the command's end is learnt is
//! abstracted by [`ChildWait`]: as PID 1 it is the SIGCHLD-driven reaper,
//! which reaps every orphan too; in tests a `waitpid` on the child alone.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::ptr;
use std::time::{Duration, Instant};

use airlock_protocol::limits::{FRAME_HEADER_LEN, MAX_CHUNK, MIN_CHUNK};
use airlock_protocol::{ExitStatus, RunSpec};
use libc::{c_int, pid_t};

use crate::privilege::Agent;
use crate::vsock;

/// `PATH` for the command unless the spec sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `HOME` for the command unless the spec sets one.
pub const DEFAULT_HOME: &str = "/root";

/// Bytes a `Stdout`/`Stderr` frame adds to its data: length prefix, tag and
/// the data's own `u32` length.
const STDIO_FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + 1 + 4;

/// Most bytes read from a pipe at once: a frame carrying this much data is
/// exactly [`vsock::MAX_WRITE`] bytes, so it leaves in one vsock write.
pub const READ_CHUNK: usize = vsock::MAX_WRITE - STDIO_FRAME_OVERHEAD;

const _: () = assert!(READ_CHUNK >= MIN_CHUNK && READ_CHUNK <= MAX_CHUNK);

/// How long output may still arrive after the command itself has ended
/// (from background processes that hold its pipes open). Then its process
/// group is killed and only what is already buffered is sent.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Most reads per pipe when taking what is buffered after [`DRAIN_GRACE`]
/// (a pipe holds at most 1 MiB; a writer outside the group could go on).
const DRAIN_READS: usize = 64;

/// How often to ask a [`ChildWait`] that has no wake descriptor.
const POLL_TICK: Duration = Duration::from_millis(10);

/// How the streaming loop learns that its command has ended.
pub trait ChildWait {
    /// Reaps without blocking. `Some(raw wait status)` once `pid` has
    /// ended (reported once); an error if it can never be reported.
    fn try_wait(&mut self, pid: pid_t) -> io::Result<Option<c_int>>;

    /// A descriptor that turns readable when a child may have ended, or
    /// `None` to be asked every few milliseconds instead.
    fn wake_fd(&self) -> Option<BorrowedFd<'_>>;

    /// Empties the wake descriptor after it turned readable.
    fn clear_wake(&mut self);
}

/// Streaming the command's output failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to wait for the command's output")]
    Poll(#[source] io::Error),
    #[error("failed to read the command's {0}")]
    Read(&'static str, #[source] io::Error),
    #[error("failed to wait for the command")]
    Wait(#[source] io::Error),
    #[error("the command ended with a raw wait status {0:#x} that is not an end")]
    Status(c_int),
}

/// The command could not be started. The message is what the user sees
/// (sent to the host in an `Error` frame), so it carries the reason itself.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot run the command: argv is empty")]
    NoProgram,
    #[error("cannot change directory to {cwd}: {}", describe(.err))]
    Cwd { cwd: String, err: io::Error },
    #[error("cannot run {program}: {}", describe(.err))]
    Exec { program: String, err: io::Error },
}

impl SpawnError {
    /// The exit code a shell would give: 127 when the program does not
    /// exist, 126 when it cannot be run.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoProgram => 127,
            Self::Exec { err, .. } if err.raw_os_error() == Some(libc::ENOENT) => 127,
            Self::Exec { .. } | Self::Cwd { .. } => 126,
        }
    }
}

/// An I/O error without the " (os error N)" that `std` appends, e.g.
/// "No such file or directory".
fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text.get(..i).unwrap_or(&text).to_owned(),
        _ => text,
    }
}

/// The command's environment: the spec's pairs in order (a name given twice
/// keeps its last value), plus [`DEFAULT_PATH`] and [`DEFAULT_HOME`] where
/// the spec sets no `PATH` or `HOME`. Nothing else: no `TERM` unless given.
pub fn build_env(spec_env: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(spec_env.len() + 2);
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(spec_env.len());
    for (name, value) in spec_env {
        match index.get(name.as_str()) {
            Some(&i) => {
                if let Some(slot) = env.get_mut(i) {
                    slot.1.clone_from(value);
                }
            }
            None => {
                index.insert(name, env.len());
                env.push((name.clone(), value.clone()));
            }
        }
    }
    for (name, value) in [("PATH", DEFAULT_PATH), ("HOME", DEFAULT_HOME)] {
        if !index.contains_key(name) {
            env.push((name.to_owned(), value.to_owned()));
        }
    }
    env
}

/// How a raw wait status reads on the wire; `None` if it is not an end.
pub fn exit_status(raw: c_int) -> Option<ExitStatus> {
    if libc::WIFEXITED(raw) {
        u8::try_from(libc::WEXITSTATUS(raw))
            .ok()
            .map(ExitStatus::Exited)
    } else if libc::WIFSIGNALED(raw) {
        u8::try_from(libc::WTERMSIG(raw))
            .ok()
            .map(ExitStatus::Signaled)
    } else {
        None
    }
}

/// Starts `spec.argv` in `spec.cwd` with [`build_env`], in a new session
/// (its own process group), stdin `/dev/null` unless `spec.stdin`, stdout
/// and stderr on their own pipes, default signal dispositions and an empty
/// signal mask. With `agent`, as the unprivileged agent user
/// ([`Agent::enter`]) rather than as the init's root.
pub fn spawn(spec: &RunSpec, agent: Option<&Agent>) -> Result<Running, SpawnError> {
    let (program, args) = spec.argv.split_first().ok_or(SpawnError::NoProgram)?;
    // Checked here because a failed chdir in the child would come back as
    // the same errno as a missing program.
    match fs::metadata(&spec.cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(SpawnError::Cwd {
                cwd: spec.cwd.clone(),
                err: io::Error::from_raw_os_error(libc::ENOTDIR),
            })
        }
        Err(err) => {
            return Err(SpawnError::Cwd {
                cwd: spec.cwd.clone(),
                err,
            })
        }
    }
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(build_env(&spec.env))
        .current_dir(&spec.cwd)
        .stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: `reset_child` runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: it calls setsid, sigemptyset,
    // sigprocmask and signal, takes no lock, allocates nothing and touches
    // no state shared with the parent.
    unsafe { command.pre_exec(reset_child) };
    if let Some(agent) = agent {
        let agent = agent.clone();
        // SAFETY: runs in the forked child after `reset_child`: `enter`
        // makes raw system calls only, on the filter built before the fork
        // (moved into the closure) and on locals; it allocates nothing.
        unsafe { command.pre_exec(move || agent.enter()) };
    }
    let mut child = command.spawn().map_err(|err| SpawnError::Exec {
        program: program.clone(),
        err,
    })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        // Cannot happen (both were asked for as pipes); never leave the
        // child running unobserved.
        let _ = child.kill();
        return Err(SpawnError::Exec {
            program: program.clone(),
            err: io::Error::other("no pipes"),
        });
    };
    let pid = pid_t::try_from(child.id()).unwrap_or(pid_t::MAX);
    Ok(Running {
        pid,
        stdin: child.stdin.take(),
        stdout: Some(stdout),
        stderr: Some(stderr),
        armed: true,
        spare_group: false,
    })
}

/// The child's half of the spawn: a session and process group of its own
/// (so the whole tree can be killed at once and it has no controlling
/// terminal), no blocked signals, SIGPIPE back to its default (the Rust
/// runtime ignores it, and an ignored disposition survives exec).
fn reset_child() -> io::Result<()> {
    // SAFETY: setsid(2) takes no pointers; a fresh child is never a group
    // leader, so it succeeds.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut empty = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the whole live sigset_t it is given;
    // sigprocmask then only reads that initialised set (old set not asked
    // for). Both are async-signal-safe.
    let rc = unsafe {
        libc::sigemptyset(empty.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, empty.as_ptr(), ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: installs the default disposition, no handler; async-signal-safe.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`Running::pump`] hands its callback.
#[derive(Debug)]
pub enum Event<'a> {
    /// A chunk of stdout, 1 ..= [`READ_CHUNK`] bytes.
    Stdout(&'a [u8]),
    /// A chunk of stderr, 1 ..= [`READ_CHUNK`] bytes.
    Stderr(&'a [u8]),
    /// The host descriptor turned readable; an `Err` from the callback
    /// stops the command.
    Host,
    /// The extra descriptor given to [`Running::pump`] turned readable.
    Extra,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Its status, for the `Exit` frame.
    pub status: ExitStatus,
    /// Whether it was killed because the spec's timeout passed.
    pub timed_out: bool,
}

/// A started command. Dropping it before [`Running::pump`] has returned
/// `Ok` kills its whole process group.
#[derive(Debug)]
pub struct Running {
    pid: pid_t,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    /// Kill the process group on drop.
    armed: bool,
    /// Once the command has ended by itself, leave what it started in its
    /// group running (an exec in a live sandbox: its background processes
    /// belong to the sandbox, not to the exec); see [`Running::spare_group`].
    spare_group: bool,
}

impl Running {
    /// The command's pid (also its process group and session id).
    pub fn pid(&self) -> pid_t {
        self.pid
    }

    /// The write end of the command's stdin, if the spec asked for one.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// After the command ends by itself, stop reading its pipes
    /// [`DRAIN_GRACE`] later without killing its process group (a timeout,
    /// an error or a drop still kills it).
    pub fn spare_group(&mut self) {
        self.spare_group = true;
    }

    /// Sends SIGKILL to the command's process group.
    pub fn kill_group(&self) {
        // SAFETY: kill(2) takes no pointers. A negative pid names the
        // process group the child created with setsid, so only the command
        // and what it started in that group are hit (never the init, which
        // is in another group).
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
    }

    /// Streams the command's output through `on` until both pipes have
    /// ended and `waiter` has reported the command's own end, and returns
    /// that end. Kills the process group when `timeout` passes, and when
    /// the pipes stay open [`DRAIN_GRACE`] after the command ended. `host`
    /// is polled too: when it turns readable `on(Event::Host)` runs; and so
    /// is `extra` (the process events socket), if given: when it turns
    /// readable `on(Event::Extra)` runs, which must read it (poll is
    /// level-triggered). An `Err` from `on` stops the command and is
    /// returned.
    pub fn pump<E: From<Error>>(
        mut self,
        waiter: &mut impl ChildWait,
        timeout: Option<Duration>,
        host: BorrowedFd<'_>,
        extra: Option<BorrowedFd<'_>>,
        mut on: impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<Ended, E> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut timed_out = false;
        let mut ended: Option<(c_int, Instant)> = None;
        let mut buf = vec![0u8; READ_CHUNK];
        // Ask the waiter only when it may have news, not on every chunk.
        let mut check_child = true;
        let raw = loop {
            let now = Instant::now();
            if ended.is_none() && (check_child || waiter.wake_fd().is_none()) {
                check_child = false;
                if let Some(raw) = waiter.try_wait(self.pid).map_err(Error::Wait)? {
                    ended = Some((raw, now + DRAIN_GRACE));
                }
            }
            if let Some((raw, drain_until)) = ended {
                if self.stdout.is_none() && self.stderr.is_none() {
                    break raw;
                }
                if now >= drain_until {
                    if !self.spare_group {
                        self.kill_group();
                    }
                    self.drain_buffered(&mut buf, &mut on)?;
                    break raw;
                }
            }
            if !timed_out && deadline.is_some_and(|d| now >= d) {
                self.kill_group();
                timed_out = true;
            }

            let tick = (ended.is_none() && waiter.wake_fd().is_none()).then(|| now + POLL_TICK);
            let wake_times = [
                deadline.filter(|_| !timed_out),
                ended.map(|(_, drain_until)| drain_until),
                tick,
            ];
            let timeout_ms = poll_timeout(now, wake_times.into_iter().flatten());

            let mut fds = Vec::with_capacity(5);
            let out_at = self.stdout.as_ref().map(|p| push(&mut fds, p.as_fd()));
            let err_at = self.stderr.as_ref().map(|p| push(&mut fds, p.as_fd()));
            let host_at = push(&mut fds, host);
            let child_at = waiter.wake_fd().map(|fd| push(&mut fds, fd));
            let extra_at = extra.map(|fd| push(&mut fds, fd));
            poll(&mut fds, timeout_ms).map_err(Error::Poll)?;

            if out_at.is_some_and(|i| ready(&fds, i)) {
                if let Some(chunk) = read_chunk(&mut self.stdout, &mut buf, "stdout")? {
                    on(Event::Stdout(chunk))?;
                }
            }
            if err_at.is_some_and(|i| ready(&fds, i)) {
                if let Some(chunk) = read_chunk(&mut self.stderr, &mut buf, "stderr")? {
                    on(Event::Stderr(chunk))?;
                }
            }
            if ready(&fds, host_at) {
                on(Event::Host)?;
            }
            if child_at.is_some_and(|i| ready(&fds, i)) {
                waiter.clear_wake();
                check_child = true;
            }
            if extra_at.is_some_and(|i| ready(&fds, i)) {
                on(Event::Extra)?;
            }
        };
        let status = exit_status(raw).ok_or(Error::Status(raw))?;
        self.armed = false;
        Ok(Ended { status, timed_out })
    }

    /// Sends what the pipes hold right now, without waiting for more.
    fn drain_buffered<E: From<Error>>(
        &mut self,
        buf: &mut [u8],
        on: &mut impl FnMut(Event<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        for _ in 0..DRAIN_READS {
            if !self.stdout.as_ref().is_some_and(readable_now) {
                break;
            }
            match read_chunk(&mut self.stdout, buf, "stdout")? {
                Some(chunk) => on(Event::Stdout(chunk))?,
                None => break,
            }
        }
        for _ in 0..DRAIN_READS {
            if !self.stderr.as_ref().is_some_and(readable_now) {
                break;
            }
            match read_chunk(&mut self.stderr, buf, "stderr")? {
                Some(chunk) => on(Event::Stderr(chunk))?,
                None => break,
            }
        }
        self.stdout = None;
        self.stderr = None;
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.armed {
            self.kill_group();
        }
    }
}

/// One read from a pipe that poll reported ready. `Some(data)` for data;
/// `None` at end of file (the pipe is then closed and set to `None`) or
/// when there was nothing after all.
fn read_chunk<'b, P: Read>(
    pipe: &mut Option<P>,
    buf: &'b mut [u8],
    name: &'static str,
) -> Result<Option<&'b [u8]>, Error> {
    let Some(p) = pipe.as_mut() else {
        return Ok(None);
    };
    match p.read(buf) {
        Ok(0) => {
            *pipe = None;
            Ok(None)
        }
        Ok(n) => Ok(buf.get(..n)),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::Read(name, e)),
    }
}

fn push(fds: &mut Vec<libc::pollfd>, fd: BorrowedFd<'_>) -> usize {
    fds.push(libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    fds.len() - 1
}

/// Whether entry `i` can be read without blocking (data, end of file or an
/// error that the read will report).
fn ready(fds: &[libc::pollfd], i: usize) -> bool {
    fds.get(i)
        .is_some_and(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
}

fn readable_now(fd: &impl AsFd) -> bool {
    let mut fds = [libc::pollfd {
        fd: fd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    poll(&mut fds, 0).is_ok() && ready(&fds, 0)
}

/// poll(2) over `fds`; an interrupted poll counts as a wake-up with nothing
/// ready.
fn poll(fds: &mut [libc::pollfd], timeout_ms: c_int) -> io::Result<()> {
    let n = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `fds` is a live, writable slice of exactly `n` pollfd entries;
    // the kernel writes only their `revents` during the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            for p in fds.iter_mut() {
                p.revents = 0;
            }
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// poll(2)'s timeout to wake at the earliest of `wake_at`: milliseconds
/// rounded up, -1 (for ever) if there is none.
fn poll_timeout(now: Instant, wake_at: impl Iterator<Item = Instant>) -> c_int {
    match wake_at.min() {
        None => -1,
        Some(at) => {
            let left = at.saturating_duration_since(now);
            let ms = left.as_micros().div_ceil(1000);
            c_int::try_from(ms).unwrap_or(c_int::MAX)
        }
    }
}

/// A [`ChildWait`] for tests: `waitpid` on the one child, so the test
/// harness's other children are never reaped from under it.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct WaitPid;

#[cfg(test)]
impl ChildWait for WaitPid {
    fn try_wait(&mut self, pid: pid_t) -> io::Result<Option<c_int>> {
        let mut status: c_int = 0;
        // SAFETY: `status` is a live, writable c_int for the whole call.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        match rc {
            0 => Ok(None),
            r if r == pid => Ok(Some(status)),
            _ => Err(io::Error::last_os_error()),
        }
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn clear_wake(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use airlock_protocol::{encode, Message};
    use std::os::unix::net::UnixStream;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

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

    #[test]
    fn env_gets_default_path_and_home_only() {
        assert_eq!(
            build_env(&[]),
            pairs(&[("PATH", DEFAULT_PATH), ("HOME", DEFAULT_HOME)])
        );
        assert_eq!(
            build_env(&pairs(&[("FOO", "bar"), ("TERM", "xterm")])),
            pairs(&[
                ("FOO", "bar"),
                ("TERM", "xterm"),
                ("PATH", DEFAULT_PATH),
                ("HOME", DEFAULT_HOME)
            ])
        );
    }

    #[test]
    fn env_from_the_spec_wins_and_last_duplicate_wins() {
        assert_eq!(
            build_env(&pairs(&[
                ("HOME", "/home/a"),
                ("A", "1"),
                ("PATH", "/x"),
                ("A", "2")
            ])),
            pairs(&[("HOME", "/home/a"), ("A", "2"), ("PATH", "/x")])
        );
    }

    #[test]
    fn wait_statuses_map_to_exit_frames() {
        assert_eq!(exit_status(0), Some(ExitStatus::Exited(0)));
        assert_eq!(exit_status(3 << 8), Some(ExitStatus::Exited(3)));
        assert_eq!(exit_status(255 << 8), Some(ExitStatus::Exited(255)));
        assert_eq!(exit_status(libc::SIGKILL), Some(ExitStatus::Signaled(9)));
        assert_eq!(
            exit_status(libc::SIGSEGV | 0x80),
            Some(ExitStatus::Signaled(11))
        );
        assert_eq!(exit_status((libc::SIGSTOP << 8) | 0x7f), None);
        assert_eq!(exit_status(0xffff), None);
    }

    #[test]
    fn a_full_chunk_fits_one_vsock_write() {
        let frame = encode(&Message::Stdout(vec![0; READ_CHUNK])).expect("encodes");
        assert_eq!(frame.len(), vsock::MAX_WRITE);
        let frame = encode(&Message::Stderr(vec![0; READ_CHUNK])).expect("encodes");
        assert_eq!(frame.len(), vsock::MAX_WRITE);
    }

    #[test]
    fn spawn_errors_read_like_a_shell() {
        let e = spawn(&spec(&["/nonexistent/prog"]), None).expect_err("no such program");
        assert_eq!(
            e.to_string(),
            "cannot run /nonexistent/prog: No such file or directory"
        );
        assert_eq!(e.exit_code(), 127);

        let e = spawn(&spec(&["no-such-program-airlock"]), None).expect_err("not on PATH");
        assert_eq!(e.exit_code(), 127);

        // Exists, not executable (no x bit: EACCES even for root).
        let e = spawn(&spec(&["/etc/passwd"]), None).expect_err("not executable");
        assert_eq!(e.to_string(), "cannot run /etc/passwd: Permission denied");
        assert_eq!(e.exit_code(), 126);

        let mut s = spec(&["true"]);
        s.cwd = "/nonexistent-dir".into();
        let e = spawn(&s, None).expect_err("no such cwd");
        assert_eq!(
            e.to_string(),
            "cannot change directory to /nonexistent-dir: No such file or directory"
        );
        assert_eq!(e.exit_code(), 126);

        s.cwd = "/etc/passwd".into();
        let e = spawn(&s, None).expect_err("cwd is a file");
        assert_eq!(
            e.to_string(),
            "cannot change directory to /etc/passwd: Not a directory"
        );
    }

    #[test]
    fn describe_drops_the_os_error_number() {
        assert_eq!(
            describe(&io::Error::from_raw_os_error(libc::EACCES)),
            "Permission denied"
        );
        assert_eq!(describe(&io::Error::other("plain")), "plain");
    }

    #[test]
    fn poll_timeout_rounds_up_and_picks_the_earliest() {
        let now = Instant::now();
        assert_eq!(poll_timeout(now, std::iter::empty()), -1);
        let at = [
            now + Duration::from_millis(50),
            now + Duration::from_micros(1500),
        ];
        assert_eq!(poll_timeout(now, at.into_iter()), 2);
        assert_eq!(
            poll_timeout(now + Duration::from_secs(1), at.into_iter()),
            0
        );
    }

    /// Runs `spec` to its end; returns (stdout, stderr, ended, largest chunk).
    fn run(spec: &RunSpec, timeout: Option<Duration>) -> (Vec<u8>, Vec<u8>, Ended, usize) {
        let (host, _keep) = UnixStream::pair().expect("socketpair");
        let running = spawn(spec, None).expect("spawns");
        let (mut out, mut err, mut largest) = (Vec::new(), Vec::new(), 0);
        let ended = running
            .pump::<Error>(&mut WaitPid, timeout, host.as_fd(), None, |event| {
                match event {
                    Event::Stdout(d) => {
                        largest = largest.max(d.len());
                        out.extend_from_slice(d);
                    }
                    Event::Stderr(d) => {
                        largest = largest.max(d.len());
                        err.extend_from_slice(d);
                    }
                    Event::Host | Event::Extra => panic!("the host side stayed silent"),
                }
                Ok(())
            })
            .expect("pumps");
        (out, err, ended, largest)
    }

    #[test]
    fn streams_both_pipes_and_the_status() {
        let (out, err, ended, _) = run(&spec(&["sh", "-c", "echo a; echo b >&2; exit 3"]), None);
        assert_eq!(out, b"a\n");
        assert_eq!(err, b"b\n");
        assert_eq!(
            ended,
            Ended {
                status: ExitStatus::Exited(3),
                timed_out: false
            }
        );
    }

    #[test]
    fn environment_cwd_and_signals_in_the_child() {
        let mut s = spec(&[
            "sh",
            "-c",
            "echo \"$PATH|$HOME|${TERM-unset}|$FOO|$(pwd)\"; \
             grep -E '^(SigBlk|SigIgn)' /proc/self/status; \
             read -r pid comm state ppid pgrp sid rest < /proc/$$/stat; \
             [ \"$pid\" = \"$pgrp\" ] && [ \"$pid\" = \"$sid\" ] && echo own-session",
        ]);
        s.env = pairs(&[("FOO", "bar")]);
        s.cwd = "/tmp".into();
        let (out, _, ended, _) = run(&s, None);
        let out = String::from_utf8(out).expect("utf-8");
        assert_eq!(ended.status, ExitStatus::Exited(0));
        let mut lines = out.lines();
        assert_eq!(
            lines.next(),
            Some(format!("{DEFAULT_PATH}|/root|unset|bar|/tmp").as_str())
        );
        // Nothing blocked; no standard signal ignored (SIGPIPE is back to
        // its default). Real-time signals 32 and 33 belong to the C library.
        let mask = |line: Option<&str>, name: &str| {
            let hex = line
                .and_then(|l| l.strip_prefix(name))
                .expect("a signal mask line");
            u64::from_str_radix(hex.trim(), 16).expect("hex")
        };
        assert_eq!(mask(lines.next(), "SigBlk:"), 0);
        assert_eq!(mask(lines.next(), "SigIgn:") & 0x7fff_ffff, 0);
        assert_eq!(lines.next(), Some("own-session"));
    }

    #[test]
    fn large_output_comes_in_bounded_chunks() {
        let (out, err, ended, largest) =
            run(&spec(&["sh", "-c", "head -c 300000 /dev/zero"]), None);
        assert_eq!(out.len(), 300_000);
        assert!(err.is_empty());
        assert!(largest <= READ_CHUNK, "{largest}");
        assert_eq!(ended.status, ExitStatus::Exited(0));
    }

    #[test]
    fn timeout_kills_the_group_and_reports_the_signal() {
        let started = Instant::now();
        let (_, _, ended, _) = run(
            &spec(&["sh", "-c", "sleep 30 & sleep 30; echo never"]),
            Some(Duration::from_millis(200)),
        );
        assert_eq!(
            ended,
            Ended {
                status: ExitStatus::Signaled(9),
                timed_out: true
            }
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn background_holders_of_the_pipes_do_not_hold_the_end() {
        let started = Instant::now();
        let (out, _, ended, _) = run(&spec(&["sh", "-c", "sleep 30 & echo started"]), None);
        assert_eq!(out, b"started\n");
        assert_eq!(ended.status, ExitStatus::Exited(0));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn dropping_a_running_command_kills_its_group() {
        let running = spawn(&spec(&["sleep", "30"]), None).expect("spawns");
        let pid = running.pid();
        drop(running);
        let mut status = 0;
        // SAFETY: `status` is a live, writable c_int.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        assert_eq!(exit_status(status), Some(ExitStatus::Signaled(9)));
    }
}
