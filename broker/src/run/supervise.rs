//! The supervisor's loop: the control session in its thread, the VM, the
//! deadlines, the signals and the audit log, until the run is over
//! ([`End`]).

use std::io::{self, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use crate::audit::AuditLog;
use crate::door::ports::Accepted;
use crate::door::session::{self, EncodedSpec, Outcome, Output, Progress};
use crate::engine::{ProcessExit, Vm};

use super::*;

/// When the guest said Hello and when the command's exit status came.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    pub hello: Option<Instant>,
    pub exited: Option<Instant>,
}

/// What the other threads tell the supervisor.
#[derive(Debug)]
pub(crate) enum Event {
    Accepted(Accepted),
    Progress(Progress),
    Ended(Outcome),
}

/// When the run must have booted and finished, and the patience of each
/// later step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// The guest's Hello must come before this.
    pub boot: Instant,
    pub boot_limit: Duration,
    /// `--timeout`.
    pub timeout: Instant,
    /// [`POWER_OFF_GRACE`].
    pub power_off_grace: Duration,
    /// [`DRAIN`].
    pub drain: Duration,
    /// [`SESSION_END`].
    pub session_end: Duration,
    /// After `--timeout`, how long a guest that already sent its exit
    /// status may still take to power off ([`RESULTS_GRACE`]; `None`: the
    /// whole grace, as when the VMM dumps guest memory first).
    pub past_timeout: Option<Duration>,
}

impl Deadlines {
    /// Boot deadline: `min(timeout, BOOT_DEADLINE)` after `start`.
    pub fn from_start(start: Instant, timeout: Duration) -> Deadlines {
        let boot_limit = timeout.min(BOOT_DEADLINE);
        Deadlines {
            boot: start + boot_limit,
            boot_limit,
            timeout: start + timeout,
            power_off_grace: POWER_OFF_GRACE,
            drain: DRAIN,
            session_end: SESSION_END,
            past_timeout: Some(RESULTS_GRACE),
        }
    }

    /// When a guest whose command ended at `exited_at` must be off: the
    /// power-off grace, but never more than [`Deadlines::past_timeout`]
    /// beyond `--timeout`, which thus bounds airlock's own exit.
    pub fn power_off_by(&self, exited_at: Instant) -> Instant {
        let end = exited_at + self.power_off_grace;
        match self.past_timeout {
            Some(past) => end.min(self.timeout.max(exited_at) + past),
            None => end,
        }
    }
}

/// Where a session writes the command's stdout and stderr.
pub(crate) type Writers = fn() -> (Box<dyn Write>, Box<dyn Write>);

/// Our own stdout and stderr (each chunk is flushed at once by [`Output`]).
pub(crate) fn terminal() -> (Box<dyn Write>, Box<dyn Write>) {
    (Box::new(io::stdout()), Box::new(io::stderr()))
}

/// What a session thread needs.
#[derive(Debug)]
pub(crate) struct SessionParams {
    pub(crate) spec: EncodedSpec,
    pub(crate) max_output_bytes: u64,
    pub(crate) events: Sender<Event>,
    pub(crate) writers: Writers,
    pub(crate) audit: AuditLog,
}

/// The running session: a handle on its stream, to shut it down.
#[derive(Debug)]
pub(crate) struct SessionThread {
    pub(crate) stream: UnixStream,
}

/// `run -i`: forwards our stdin to the command as `Stdin` frames, then
/// `StdinEnd`, from a thread of its own (the session thread only reads
/// from here on). It stops at our end of file, or when the conversation
/// is shut down (the command exited; the guest went away).
pub(crate) fn pump_stdin(stream: &UnixStream) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let spawned = thread::Builder::new().name("stdin".into()).spawn(move || {
        use std::io::Read as _;
        let mut input = io::stdin().lock();
        let mut buf = vec![0u8; airlock_protocol::limits::MAX_CHUNK];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // An unreadable stdin ends as an empty rest.
                Err(_) => break,
            };
            if airlock_protocol::write_frame(
                &mut out,
                &airlock_protocol::Message::Stdin(buf[..n].to_vec()),
            )
            .is_err()
            {
                return;
            }
        }
        let _ = airlock_protocol::write_frame(&mut out, &airlock_protocol::Message::StdinEnd);
    });
    if spawned.is_err() {
        eprintln!("airlock: warning: cannot start the stdin thread: the command's stdin is empty");
    }
}

impl SessionThread {
    /// Serves `stream` in a new thread, which reports to the supervisor.
    pub(crate) fn start(stream: UnixStream, params: &SessionParams) -> io::Result<SessionThread> {
        let handle = stream.try_clone()?;
        let spec = params.spec.clone();
        let limit = params.max_output_bytes;
        let events = params.events.clone();
        let writers = params.writers;
        let audit = params.audit.clone();
        // Detached: it ends when its stream is shut down (or at exit, if
        // stuck writing to a stdout nobody reads).
        thread::Builder::new()
            .name("control-session".into())
            .spawn(move || {
                let (out, err) = writers();
                let mut output = Output::new(out, err, limit);
                let progress_events = events.clone();
                let stdin = spec.stdin;
                let outcome = session::serve(
                    BufReader::with_capacity(128 * 1024, &stream),
                    &stream,
                    &spec,
                    &mut output,
                    &mut |p| {
                        if p == Progress::SpecSent && stdin {
                            pump_stdin(&stream);
                        }
                        let _ = progress_events.send(Event::Progress(p));
                    },
                    &audit,
                );
                let _ = events.send(Event::Ended(outcome));
            })?;
        Ok(SessionThread { stream: handle })
    }

    /// Half-closes the conversation: the guest reads end-of-file.
    pub(crate) fn close_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Ends the conversation: the session's reads see end-of-file (after
    /// whatever is already buffered) and its writes fail.
    pub(crate) fn shut_down(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// How the supervision ended.
#[derive(Debug)]
pub enum End {
    /// The control conversation ended with `outcome`. `vm` is how the VM
    /// process ended, if it stopped by itself (`None`: we stopped it).
    Session {
        outcome: Outcome,
        vm: Option<ProcessExit>,
    },
    /// The VM process ended before any control connection.
    StoppedBeforeConnect(ProcessExit),
    /// No Hello within the boot deadline; the VM was stopped.
    BootTimeout(Duration),
    /// `--timeout` passed; the VM was stopped. `booted`: the guest had
    /// said Hello.
    TimedOut { booted: bool },
    /// A signal came; the VM was stopped.
    Interrupted(i32),
    /// The VM process ended during the session, and the session thread did
    /// not finish (it is stuck).
    SessionLost(ProcessExit),
    /// The audit log could not be written (why); the VM was stopped.
    AuditFailed(String),
}

/// Supervises a running VM until the run is over (see [`End`]). On return
/// the VM may still be running: the caller kills it.
pub(crate) fn supervise(
    vm: &mut Vm,
    events: &Receiver<Event>,
    params: &SessionParams,
    deadlines: Deadlines,
    stop: &StopSignal,
    timings: &mut Timings,
) -> io::Result<End> {
    let audit = &params.audit;
    let mut session: Option<SessionThread> = None;
    let mut handshaken = false;
    // When the command's exit status arrived.
    let mut exited_at: Option<Instant> = None;
    // How the conversation ended, once it has.
    let mut outcome: Option<Outcome> = None;
    // How and when the VM process ended by itself.
    let mut vm_stopped: Option<(ProcessExit, Instant)> = None;
    // When the conversation broke, if it did.
    let mut broken_at: Option<Instant> = None;
    loop {
        match events.recv_timeout(POLL) {
            // The port server has audited each of these.
            Ok(Event::Accepted(Accepted::Stream(stream))) => {
                session = Some(SessionThread::start(stream, params)?);
            }
            Ok(Event::Accepted(Accepted::Refused(n))) => eprintln!(
                "airlock: guest protocol error: refused connection {n} to the control port \
                 (one control session per run)"
            ),
            Ok(Event::Accepted(Accepted::Capped(max))) => eprintln!(
                "airlock: guest protocol error: {max} connections to the control port; \
                 no longer accepting any"
            ),
            Ok(Event::Accepted(Accepted::Failed(e))) => {
                eprintln!("airlock: warning: the control port stopped accepting: {e}")
            }
            Ok(Event::Progress(Progress::SpecSent)) => {}
            Ok(Event::Progress(Progress::Handshaken)) => {
                handshaken = true;
                timings.hello = Some(Instant::now());
            }
            Ok(Event::Progress(Progress::Exited(_))) => {
                let now = Instant::now();
                exited_at = Some(now);
                timings.exited = Some(now);
                // Tell the guest we have its exit status: it waits for this
                // end-of-file before powering off, so nothing it sent is
                // lost in a VM reset. We keep reading: anything after Exit
                // is still a violation.
                if let Some(session) = &session {
                    session.close_write();
                }
            }
            Ok(Event::Ended(ended)) => outcome = Some(ended),
            Err(RecvTimeoutError::Timeout) => {}
            // We hold a sender ourselves (`params.events`): cannot happen.
            Err(RecvTimeoutError::Disconnected) => {
                return Err(io::Error::other("the supervisor's channel closed"))
            }
        }
        let now = Instant::now();

        if let Some(signal) = stop.received() {
            vm.kill()?;
            end_session(session.as_ref(), events, deadlines.session_end);
            return Ok(End::Interrupted(signal));
        }
        // A run that can no longer be audited does not go on.
        if let Some(why) = audit.failure() {
            vm.kill()?;
            end_session(session.as_ref(), events, deadlines.session_end);
            return Ok(End::AuditFailed(why));
        }
        if vm_stopped.is_none() {
            vm_stopped = vm.try_wait()?.map(|exit| (exit, now));
        }

        // The conversation is over.
        if let Some(ended) = outcome.take() {
            let command_done = matches!(ended, Outcome::Exited(_) | Outcome::OutOfMemory(_));
            let grace_left = exited_at.is_some_and(|at| now < deadlines.power_off_by(at));
            // A connection that broke may be the VM process dying (a VMM
            // crash, its seccomp filter): give it a moment to end by itself,
            // so that the report says how it ended and shows its log.
            let broken = matches!(ended, Outcome::Broken(_));
            let broke_at = *broken_at.get_or_insert(now);
            let dying = broken && now < broke_at + deadlines.drain;
            if vm_stopped.is_none() && ((command_done && grace_left) || dying) {
                // Let the guest power off (or the VM process end) by itself.
                outcome = Some(ended);
            } else {
                return Ok(End::Session {
                    outcome: ended,
                    vm: vm_stopped.map(|(exit, _)| exit),
                });
            }
        }

        // The VM stopped while the conversation goes on (or never began).
        if let Some((exit, at)) = vm_stopped {
            let Some(session) = &session else {
                return Ok(End::StoppedBeforeConnect(exit));
            };
            // After the exit status nothing more is expected; before it, let
            // the session read what the engine still had in flight.
            if exited_at.is_some() || now >= at + deadlines.drain {
                // The helpers go (their sockets close), then the stream.
                vm.kill()?;
                session.shut_down();
                return Ok(match wait_outcome(events, deadlines.session_end) {
                    Some(outcome) => End::Session {
                        outcome,
                        vm: Some(exit),
                    },
                    None => End::SessionLost(exit),
                });
            }
            continue;
        }

        // The command ended but the guest does not power off.
        if exited_at.is_some_and(|at| now >= deadlines.power_off_by(at)) {
            vm.kill()?;
            if let Some(session) = &session {
                session.shut_down();
            }
            if let Some(outcome) = outcome
                .take()
                .or_else(|| wait_outcome(events, deadlines.session_end))
            {
                return Ok(End::Session { outcome, vm: None });
            }
            // The status did arrive, but the session thread is stuck.
            return Ok(End::TimedOut { booted: true });
        }

        // Deadlines count only while the command has not ended.
        if exited_at.is_none() && now >= deadlines.timeout {
            vm.kill()?;
            end_session(session.as_ref(), events, deadlines.session_end);
            return Ok(End::TimedOut { booted: handshaken });
        }
        if !handshaken && now >= deadlines.boot {
            vm.kill()?;
            end_session(session.as_ref(), events, deadlines.session_end);
            return Ok(End::BootTimeout(deadlines.boot_limit));
        }
    }
}

/// Shuts the session down and gives it a moment to finish writing.
pub(crate) fn end_session(
    session: Option<&SessionThread>,
    events: &Receiver<Event>,
    limit: Duration,
) {
    if let Some(session) = session {
        session.shut_down();
        let _ = wait_outcome(events, limit);
    }
}

/// Waits up to `limit` for the session's outcome, dropping other events.
pub(crate) fn wait_outcome(events: &Receiver<Event>, limit: Duration) -> Option<Outcome> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(Event::Ended(outcome)) => return Some(outcome),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}
