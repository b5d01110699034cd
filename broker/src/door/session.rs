//! The control conversation, host side (PROTOCOL.md, "Control conversation").
//!
//! ```text
//! guest Hello ─▶ host Hello (or Error{VersionMismatch} and close)
//!             ◀─ RunSpec
//! Stdout/Stderr chunks ─▶ forwarded to our stdout/stderr as they arrive
//! AuditEvents ─▶ written to the audit log (within its caps)
//! Exit ─▶ then nothing but the end of the connection
//! ```
//!
//! [`serve`] runs it over any blocking reader and writer, so the state
//! machine is tested over in-memory streams. Everything the guest sends is
//! hostile: frames are read with the protocol crate's bounds (one frame, at
//! most 1 MiB, is all we ever hold), anything out of order ends the
//! conversation as a [`Violation`], and output beyond `max_output_bytes` is
//! counted and dropped, never buffered.
//!
//! The audit log gets what the session sees: the guest's `Hello`, its
//! `AuditEvent`s (guest claims, capped by the log), the exit status and a
//! spawn failure (guest claims), the first output cut (a policy denial) and
//! any protocol error, at the moment it happens.

use std::io::{self, Read, Write};

use airlock_protocol::{
    capability, encode, read_frame, EncodeError, ErrorCode, ExitStatus, FrameError, Message,
    RunSpec, PROTOCOL_VERSION,
};

use crate::audit::records::{CommandExit, OutputLimit, ProtocolError, SessionHello, SpawnFailed};
use crate::audit::{AuditLog, Durability};

/// What the run supervisor hears while the conversation goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The guest said a Hello we speak: the sandbox has booted.
    Handshaken,
    /// The run spec (and what follows it) is sent: from now on the host
    /// writes only stdin frames, if the spec asked for stdin.
    SpecSent,
    /// The command ended; the guest will now power off.
    Exited(ExitStatus),
}

/// How the conversation ended.
#[derive(Debug)]
pub enum Outcome {
    /// The command ran and ended with this status, and the guest said
    /// nothing after it.
    Exited(ExitStatus),
    /// The guest could not start the command: its `Error{SpawnFailed}`
    /// message (made safe for a terminal), and the `Exit` that followed it,
    /// if one did (the init reports 127 or 126, as a shell would).
    SpawnFailed {
        message: String,
        status: Option<ExitStatus>,
    },
    /// The guest broke the protocol.
    Broken(Violation),
    /// Writing the command's output to our stdout or stderr failed (the
    /// reader went away).
    OutputClosed(io::Error),
    /// The command's output reached `--max-output-bytes`: what fitted was
    /// forwarded, and the session stops there (the run is stopped).
    OutputLimit(u64),
    /// The command was killed (SIGKILL, or 137 through its container) and
    /// the guest reported that the kernel killed processes for memory while
    /// it ran: the sandbox ran out of memory. A guest claim, which only
    /// changes how the end is reported.
    OutOfMemory(ExitStatus),
}

/// The guest's audit event saying the kernel killed processes for memory.
pub const OOM_EVENT: &str = "memory.oom";

/// Whether `status` is what a memory kill looks like: SIGKILL, or 137 from
/// a container engine that reports its command's SIGKILL as 128 + 9.
fn killed(status: ExitStatus) -> bool {
    matches!(status, ExitStatus::Signaled(9) | ExitStatus::Exited(137))
}

/// Where in the conversation something happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    BeforeHello,
    Running,
    AfterExit,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::BeforeHello => "at the handshake",
            Stage::Running => "while the command ran",
            Stage::AfterExit => "after the command's exit status",
        })
    }
}

/// How the guest broke the protocol. Shown as `airlock: guest protocol error: …`.
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    #[error("unreadable frame {stage}")]
    Frame {
        stage: Stage,
        #[source]
        source: FrameError,
    },
    #[error("unexpected {kind} message {stage}")]
    Unexpected { kind: &'static str, stage: Stage },
    #[error("the connection closed {stage}")]
    Closed { stage: Stage },
    #[error("the guest speaks protocol version {0}; this host speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("the guest reported {code:?}: {message}")]
    GuestError {
        code: ErrorCode,
        /// Made safe for a terminal.
        message: String,
    },
    #[error("cannot send the {what} message")]
    Send {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The command's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Forwards output chunks to two writers, within a byte budget shared by
/// both streams. Each chunk is written and flushed at once.
#[derive(Debug)]
pub struct Output<O, E> {
    out: O,
    err: E,
    limit: u64,
    /// Bytes written so far (stdout + stderr).
    pub forwarded: u64,
    /// Bytes dropped because of the limit.
    pub discarded: u64,
}

impl<O: Write, E: Write> Output<O, E> {
    pub fn new(out: O, err: E, limit: u64) -> Self {
        Output {
            out,
            err,
            limit,
            forwarded: 0,
            discarded: 0,
        }
    }

    /// Writes what fits of `data` to `stream`; says once, on the error
    /// stream, when the limit is first reached.
    pub fn chunk(&mut self, stream: Stream, data: &[u8]) -> io::Result<()> {
        let room = self.limit.saturating_sub(self.forwarded);
        let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let (keep, drop) = data.split_at(take);
        if !keep.is_empty() {
            let w: &mut dyn Write = match stream {
                Stream::Stdout => &mut self.out,
                Stream::Stderr => &mut self.err,
            };
            w.write_all(keep)?;
            w.flush()?;
            self.forwarded += u64::try_from(keep.len()).unwrap_or(u64::MAX);
        }
        if !drop.is_empty() {
            if self.discarded == 0 {
                // Our own line: start it on a fresh line of the terminal.
                writeln!(
                    self.err,
                    "\nairlock: the command's output reached --max-output-bytes ({} bytes); \
                     the sandbox is stopped",
                    self.limit
                )?;
                self.err.flush()?;
            }
            self.discarded += u64::try_from(drop.len()).unwrap_or(u64::MAX);
        }
        Ok(())
    }
}

/// The RunSpec, encoded before any VM starts: whatever the encoder refuses
/// (too many arguments, too long, …) is the user's input error.
/// Also says which file streams the host serves (capabilities `workspace`
/// and `results` in its `Hello`; the RunSpec's bytes do not change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedSpec {
    frame: Vec<u8>,
    /// The host serves a workspace on `FILES_IN_PORT`.
    pub workspace: bool,
    /// The host takes results on `FILES_OUT_PORT`.
    pub results: bool,
    /// The `Collect` frame sent after the RunSpec, for `--collect`.
    collect: Option<Vec<u8>>,
    /// A live sandbox: the guest serves execs while the command runs.
    pub execs: bool,
    /// The `RunAs` frame sent after the RunSpec (and Collect), for `-u` or
    /// an image's `User`.
    run_as: Option<Vec<u8>>,
    /// The `Mounts` frame sent after the RunAs, for `--mount`/`-v`.
    mounts: Option<Vec<u8>>,
    /// The command reads stdin: the host sends `Stdin` frames and a
    /// `StdinEnd` after the spec.
    pub stdin: bool,
}

impl EncodedSpec {
    pub fn new(spec: RunSpec) -> Result<EncodedSpec, EncodeError> {
        let stdin = spec.stdin;
        encode(&Message::RunSpec(spec)).map(|frame| EncodedSpec {
            stdin,
            frame,
            workspace: false,
            results: false,
            collect: None,
            execs: false,
            run_as: None,
            mounts: None,
        })
    }

    /// Asks the guest to mount these live shares (none: no `Mounts`).
    pub fn set_mounts(
        &mut self,
        mounts: Vec<airlock_protocol::MountEntry>,
    ) -> Result<(), EncodeError> {
        self.mounts = if mounts.is_empty() {
            None
        } else {
            Some(encode(&Message::Mounts { mounts })?)
        };
        Ok(())
    }

    /// Asks for the container to run as `user` (none: its default).
    pub fn set_run_as(&mut self, user: Option<&str>) -> Result<(), EncodeError> {
        self.run_as = user
            .map(|user| {
                encode(&Message::RunAs {
                    user: user.to_owned(),
                })
            })
            .transpose()?;
        Ok(())
    }

    /// Asks for the results named by `patterns` (none: `/workspace/out`).
    pub fn set_collect(&mut self, patterns: &[String]) -> Result<(), EncodeError> {
        self.collect = if patterns.is_empty() {
            None
        } else {
            Some(encode(&Message::Collect {
                patterns: patterns.to_vec(),
            })?)
        };
        Ok(())
    }

    /// The capabilities of the host's `Hello`, given the guest's.
    fn host_capabilities(&self, guest: &[String]) -> Vec<String> {
        let mut caps = vec![capability::AUDIT.to_owned()];
        if (self.workspace || self.results) && guest.iter().any(|c| c == capability::FILES) {
            caps.push(capability::FILES.to_owned());
            if self.workspace {
                caps.push(capability::WORKSPACE.to_owned());
            }
            if self.results {
                caps.push(capability::RESULTS.to_owned());
                if self.collect.is_some() && guest.iter().any(|c| c == capability::COLLECT) {
                    caps.push(capability::COLLECT.to_owned());
                }
            }
        }
        // The model port is always served (a run without --model-upstream
        // answers every call with an API-shaped 403).
        if guest.iter().any(|c| c == capability::MODEL) {
            caps.push(capability::MODEL.to_owned());
        }
        if self.execs && guest.iter().any(|c| c == capability::EXEC) {
            caps.push(capability::EXEC.to_owned());
        }
        if self.run_as.is_some() && guest.iter().any(|c| c == capability::RUN_AS) {
            caps.push(capability::RUN_AS.to_owned());
        }
        if self.mounts.is_some() && guest.iter().any(|c| c == capability::MOUNTS) {
            caps.push(capability::MOUNTS.to_owned());
        }
        // The egress port is always served too (default deny: a run
        // without --net-allow answers every tunnel with a 403 that says
        // which flag would open it).
        if guest.iter().any(|c| c == capability::EGRESS) {
            caps.push(capability::EGRESS.to_owned());
        }
        caps
    }
}

/// Runs the conversation: reads frames from `reader`, answers on `writer`,
/// forwards output to `output`, tells `progress` what happened so far,
/// records what the guest says and does in `audit`, and returns at the end
/// of the connection or at the first violation. Never panics on input.
pub fn serve<R: Read, W: Write, O: Write, E: Write>(
    reader: R,
    writer: W,
    spec: &EncodedSpec,
    output: &mut Output<O, E>,
    progress: &mut dyn FnMut(Progress),
    audit: &AuditLog,
) -> Outcome {
    let outcome = converse(reader, writer, spec, output, progress, audit);
    audit.set_output(output.forwarded, output.discarded);
    if let Outcome::Broken(violation) = &outcome {
        audit.record(
            &ProtocolError {
                reason: crate::text::report(violation),
            },
            Durability::Synced,
        );
    }
    outcome
}

fn converse<R: Read, W: Write, O: Write, E: Write>(
    mut reader: R,
    mut writer: W,
    spec: &EncodedSpec,
    output: &mut Output<O, E>,
    progress: &mut dyn FnMut(Progress),
    audit: &AuditLog,
) -> Outcome {
    // Handshake.
    let (version, guest_caps) = match read_frame(&mut reader) {
        Ok(Message::Hello {
            version,
            capabilities,
        }) => {
            audit.record(
                &SessionHello {
                    version,
                    capabilities: &capabilities,
                },
                Durability::Buffered,
            );
            (version, capabilities)
        }
        Ok(msg) => return unexpected_or_error(msg, Stage::BeforeHello),
        Err(e) => return read_failed(e, Stage::BeforeHello),
    };
    if version != PROTOCOL_VERSION {
        let refusal = Message::Error {
            code: ErrorCode::VersionMismatch,
            message: format!("this host speaks protocol version {PROTOCOL_VERSION}"),
        };
        // Best effort: the guest is told, and the connection closes anyway.
        if let Ok(frame) = encode(&refusal) {
            let _ = writer.write_all(&frame).and_then(|()| writer.flush());
        }
        return Outcome::Broken(Violation::Version(version));
    }
    progress(Progress::Handshaken);
    let capabilities = spec.host_capabilities(&guest_caps);
    if (spec.workspace || spec.results) && !capabilities.iter().any(|c| c == capability::FILES) {
        eprintln!(
            "airlock: warning: the guest does not speak file streams: no workspace goes in \
             and no results come out"
        );
    }
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        capabilities: capabilities.clone(),
    };
    if let Err(source) = send(&mut writer, &hello) {
        return Outcome::Broken(Violation::Send {
            what: "Hello",
            source,
        });
    }
    if let Err(source) = writer.write_all(&spec.frame).and_then(|()| writer.flush()) {
        return Outcome::Broken(Violation::Send {
            what: "RunSpec",
            source,
        });
    }
    if let Some(collect) = &spec.collect {
        if capabilities.iter().any(|c| c == capability::COLLECT) {
            if let Err(source) = writer.write_all(collect).and_then(|()| writer.flush()) {
                return Outcome::Broken(Violation::Send {
                    what: "Collect",
                    source,
                });
            }
        } else {
            eprintln!(
                "airlock: warning: the guest does not understand --collect: it sends                  /workspace/out instead"
            );
        }
    }

    if let Some(run_as) = &spec.run_as {
        if capabilities.iter().any(|c| c == capability::RUN_AS) {
            if let Err(source) = writer.write_all(run_as).and_then(|()| writer.flush()) {
                return Outcome::Broken(Violation::Send {
                    what: "RunAs",
                    source,
                });
            }
        } else {
            eprintln!(
                "airlock: warning: the guest cannot set the container's user (an older init): \
                 the command runs as the container's root"
            );
        }
    }

    if let Some(mounts) = &spec.mounts {
        // Without its mounts the agent would write where nobody reads:
        // a guest that cannot mount them does not run.
        let sent = if capabilities.iter().any(|c| c == capability::MOUNTS) {
            writer.write_all(mounts).and_then(|()| writer.flush())
        } else {
            Err(io::Error::other(
                "the guest cannot mount live shares (an older init): not running without them",
            ))
        };
        if let Err(source) = sent {
            return Outcome::Broken(Violation::Send {
                what: "Mounts",
                source,
            });
        }
    }

    progress(Progress::SpecSent);

    // The command runs.
    let mut oom = false;
    let status = loop {
        let (stream, data) = match read_frame(&mut reader) {
            Ok(Message::Stdout(data)) => (Stream::Stdout, data),
            Ok(Message::Stderr(data)) => (Stream::Stderr, data),
            Ok(Message::AuditEvent { kind, fields }) => {
                oom |= kind == OOM_EVENT;
                audit.guest_event(&kind, fields);
                continue;
            }
            Ok(Message::Exit(status)) => break status,
            Ok(Message::Error {
                code: ErrorCode::SpawnFailed,
                message,
            }) => return spawn_failed(&mut reader, &message, progress, audit),
            Ok(msg) => return unexpected_or_error(msg, Stage::Running),
            Err(e) => return read_failed(e, Stage::Running),
        };
        let cut_before = output.discarded > 0;
        if let Err(e) = output.chunk(stream, &data) {
            return Outcome::OutputClosed(e);
        }
        if !cut_before && output.discarded > 0 {
            audit.record(
                &OutputLimit {
                    limit_bytes: output.limit,
                    stream: match stream {
                        Stream::Stdout => "stdout",
                        Stream::Stderr => "stderr",
                    },
                },
                Durability::Synced,
            );
            return Outcome::OutputLimit(output.limit);
        }
    };
    audit.claim(&CommandExit(status.into()), Durability::Buffered);
    progress(Progress::Exited(status));
    let ended = if oom && killed(status) {
        Outcome::OutOfMemory(status)
    } else {
        Outcome::Exited(status)
    };
    after_exit(&mut reader).map_or(ended, Outcome::Broken)
}

/// After `Exit` the guest only powers off: anything more is a violation.
fn after_exit<R: Read>(reader: &mut R) -> Option<Violation> {
    match read_frame(reader) {
        Ok(msg) => Some(Violation::Unexpected {
            kind: msg.kind(),
            stage: Stage::AfterExit,
        }),
        // The end of the stream, or a failing one (the VM went away): done.
        Err(FrameError::Closed | FrameError::Io(_)) => None,
        Err(source) => Some(Violation::Frame {
            stage: Stage::AfterExit,
            source,
        }),
    }
}

/// The command could not start; an `Exit` may follow (and nothing else).
fn spawn_failed<R: Read>(
    reader: &mut R,
    message: &str,
    progress: &mut dyn FnMut(Progress),
    audit: &AuditLog,
) -> Outcome {
    audit.claim(&SpawnFailed { message }, Durability::Buffered);
    let message = crate::text::sanitize(message.as_bytes());
    let status = match read_frame(&mut *reader) {
        Ok(Message::Exit(status)) => status,
        Ok(msg) => return unexpected_or_error(msg, Stage::Running),
        Err(FrameError::Closed | FrameError::Io(_)) => {
            return Outcome::SpawnFailed {
                message,
                status: None,
            }
        }
        Err(e) => return read_failed(e, Stage::Running),
    };
    audit.claim(&CommandExit(status.into()), Durability::Buffered);
    progress(Progress::Exited(status));
    match after_exit(reader) {
        Some(violation) => Outcome::Broken(violation),
        None => Outcome::SpawnFailed {
            message,
            status: Some(status),
        },
    }
}

fn send<W: Write>(writer: &mut W, msg: &Message) -> io::Result<()> {
    let frame = encode(msg).map_err(io::Error::other)?;
    writer.write_all(&frame)?;
    writer.flush()
}

/// A guest `Error` ends the conversation with what it says; any other
/// message out of turn is a violation.
fn unexpected_or_error(msg: Message, stage: Stage) -> Outcome {
    match msg {
        Message::Error { code, message } => Outcome::Broken(Violation::GuestError {
            code,
            message: crate::text::sanitize(message.as_bytes()),
        }),
        msg => Outcome::Broken(Violation::Unexpected {
            kind: msg.kind(),
            stage,
        }),
    }
}

fn read_failed(error: FrameError, stage: Stage) -> Outcome {
    Outcome::Broken(match error {
        FrameError::Closed => Violation::Closed { stage },
        source => Violation::Frame { stage, source },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::log::{Memory, TEST_LIMITS};
    use crate::audit::record::{Record, Source};
    use airlock_protocol::{decode_body, limits::MAX_FRAME_BODY, write_frame};
    use serde_json::json;
    use std::io::Cursor;
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn spec() -> EncodedSpec {
        EncodedSpec::new(RunSpec {
            argv: vec!["sh".into(), "-c".into(), "true".into()],
            env: vec![("K".into(), "V".into())],
            cwd: "/".into(),
            timeout_ms: None,
            max_output_bytes: 1 << 30,
            stdin: false,
        })
        .expect("encodes")
    }

    fn frames(msgs: &[Message]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for m in msgs {
            write_frame(&mut bytes, m).expect("encode");
        }
        bytes
    }

    fn hello(version: u32) -> Message {
        Message::Hello {
            version,
            capabilities: vec!["x".into()],
        }
    }

    /// What a scripted run produced.
    #[derive(Debug)]
    struct Scripted {
        outcome: Outcome,
        sent: Vec<Message>,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        progress: Vec<Progress>,
        discarded: u64,
        audit: Vec<Record>,
    }

    fn records(memory: &Memory) -> Vec<Record> {
        memory
            .bytes()
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("record"))
            .collect()
    }

    /// Runs `serve` over in-memory streams: the guest "sends" `input`.
    fn script(input: Vec<u8>, limit: u64) -> Scripted {
        script_with(input, limit, TEST_LIMITS)
    }

    fn script_with(input: Vec<u8>, limit: u64, caps: crate::audit::Limits) -> Scripted {
        let mut sent_bytes = Vec::new();
        let mut output = Output::new(Vec::new(), Vec::new(), limit);
        let mut progress = Vec::new();
        let (audit, memory) = AuditLog::memory(caps, None);
        let outcome = serve(
            Cursor::new(input),
            &mut sent_bytes,
            &spec(),
            &mut output,
            &mut |p| progress.push(p),
            &audit,
        );
        let mut sent = Vec::new();
        let mut r = sent_bytes.as_slice();
        while let Ok(m) = read_frame(&mut r) {
            sent.push(m);
        }
        Scripted {
            outcome,
            sent,
            stdout: output.out,
            stderr: output.err,
            progress,
            discarded: output.discarded,
            audit: records(&memory),
        }
    }

    #[test]
    fn a_whole_conversation() {
        let r = script(
            frames(&[
                hello(1),
                Message::Stdout(b"out\n".to_vec()),
                Message::Stderr(b"err\n".to_vec()),
                Message::Stdout(vec![0, 0xff]),
                Message::Exit(ExitStatus::Exited(7)),
            ]),
            1 << 30,
        );
        assert!(
            matches!(r.outcome, Outcome::Exited(ExitStatus::Exited(7))),
            "{r:?}"
        );
        assert_eq!(r.stdout, b"out\n\x00\xff");
        assert_eq!(r.stderr, b"err\n");
        assert_eq!(
            r.progress,
            [
                Progress::Handshaken,
                Progress::SpecSent,
                Progress::Exited(ExitStatus::Exited(7))
            ]
        );
        assert_eq!(r.sent.len(), 2);
        assert_eq!(
            r.sent[0],
            Message::Hello {
                version: 1,
                capabilities: vec!["audit".into()]
            }
        );
        let Message::RunSpec(spec) = &r.sent[1] else {
            panic!("{:?}", r.sent)
        };
        assert_eq!(spec.argv, ["sh", "-c", "true"]);
        assert_eq!(spec.env, [("K".to_string(), "V".to_string())]);
        assert!(!spec.stdin);
    }

    #[test]
    fn signal_exit() {
        let r = script(
            frames(&[hello(1), Message::Exit(ExitStatus::Signaled(9))]),
            10,
        );
        let Outcome::Exited(status) = r.outcome else {
            panic!("{r:?}")
        };
        assert_eq!(status.exit_code(), 137);
    }

    #[test]
    fn version_mismatch_is_refused_and_closed() {
        let r = script(
            frames(&[hello(2), Message::Exit(ExitStatus::Exited(0))]),
            10,
        );
        assert!(
            matches!(r.outcome, Outcome::Broken(Violation::Version(2))),
            "{r:?}"
        );
        assert!(matches!(
            r.sent.as_slice(),
            [Message::Error {
                code: ErrorCode::VersionMismatch,
                ..
            }]
        ));
        assert!(r.progress.is_empty());
    }

    #[test]
    fn garbage_is_a_bad_frame() {
        let r = script(b"GET / HTTP/1.1\r\n\r\n".to_vec(), 10);
        let Outcome::Broken(v @ Violation::Frame { .. }) = r.outcome else {
            panic!("{r:?}")
        };
        assert_eq!(v.to_string(), "unreadable frame at the handshake");
        assert_eq!(
            crate::text::report(&v),
            "unreadable frame at the handshake: bad frame: \
             frame body length 542393671 outside 1..=1048576"
        );
        assert!(r.sent.is_empty());
    }

    #[test]
    fn oversize_frame_is_refused_before_reading_it() {
        let mut input = frames(&[hello(1)]);
        let len = u32::try_from(MAX_FRAME_BODY + 1).expect("fits");
        input.extend(len.to_le_bytes());
        let r = script(input, 10);
        assert!(
            matches!(
                r.outcome,
                Outcome::Broken(Violation::Frame {
                    stage: Stage::Running,
                    source: FrameError::Decode(_)
                })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn unexpected_messages() {
        for (msgs, kind, stage) in [
            (vec![Message::StdinEnd], "StdinEnd", Stage::BeforeHello),
            (
                vec![Message::Stdout(b"early".to_vec())],
                "Stdout",
                Stage::BeforeHello,
            ),
            (vec![hello(1), hello(1)], "Hello", Stage::Running),
            (
                vec![hello(1), Message::RunSpec(rs())],
                "RunSpec",
                Stage::Running,
            ),
            (
                vec![hello(1), Message::Stdin(b"x".to_vec())],
                "Stdin",
                Stage::Running,
            ),
            (
                vec![
                    hello(1),
                    Message::Exit(ExitStatus::Exited(0)),
                    Message::Stdout(b"late".to_vec()),
                ],
                "Stdout",
                Stage::AfterExit,
            ),
            (
                vec![
                    hello(1),
                    Message::Exit(ExitStatus::Exited(0)),
                    Message::Exit(ExitStatus::Exited(1)),
                ],
                "Exit",
                Stage::AfterExit,
            ),
        ] {
            let r = script(frames(&msgs), 100);
            match &r.outcome {
                Outcome::Broken(Violation::Unexpected { kind: k, stage: s }) => {
                    assert_eq!((*k, *s), (kind, stage), "{msgs:?}")
                }
                other => panic!("{msgs:?}: {other:?}"),
            }
        }
    }

    fn rs() -> RunSpec {
        RunSpec {
            argv: vec!["x".into()],
            env: vec![],
            cwd: "/".into(),
            timeout_ms: None,
            max_output_bytes: 0,
            stdin: false,
        }
    }

    #[test]
    fn eof_before_exit() {
        let r = script(
            frames(&[hello(1), Message::Stdout(b"partial".to_vec())]),
            100,
        );
        assert!(
            matches!(
                r.outcome,
                Outcome::Broken(Violation::Closed {
                    stage: Stage::Running
                })
            ),
            "{r:?}"
        );
        assert_eq!(r.stdout, b"partial");
        assert_eq!(r.progress, [Progress::Handshaken, Progress::SpecSent]);

        let r = script(Vec::new(), 100);
        assert!(matches!(
            r.outcome,
            Outcome::Broken(Violation::Closed {
                stage: Stage::BeforeHello
            })
        ));

        // Cut inside a frame.
        let mut input = frames(&[hello(1), Message::Stdout(b"abcdef".to_vec())]);
        input.truncate(input.len() - 2);
        let r = script(input, 100);
        assert!(matches!(
            r.outcome,
            Outcome::Broken(Violation::Frame {
                stage: Stage::Running,
                source: FrameError::Io(_)
            })
        ));
    }

    #[test]
    fn garbage_after_exit_is_a_violation() {
        let mut input = frames(&[hello(1), Message::Exit(ExitStatus::Exited(0))]);
        input.extend([0, 0, 0, 0]);
        let r = script(input, 100);
        assert!(matches!(
            r.outcome,
            Outcome::Broken(Violation::Frame {
                stage: Stage::AfterExit,
                ..
            })
        ));
        // The exit status was seen before the violation.
        assert_eq!(r.progress.len(), 3);
    }

    #[test]
    fn guest_errors() {
        let r = script(
            frames(&[
                hello(1),
                Message::Error {
                    code: ErrorCode::SpawnFailed,
                    message: "nope: not found\x1b[2J".into(),
                },
            ]),
            100,
        );
        let Outcome::SpawnFailed {
            message,
            status: None,
        } = r.outcome
        else {
            panic!("{r:?}")
        };
        assert_eq!(message, "nope: not found\\u{1b}[2J");

        // As the init does it: the error, then the shell-style exit status.
        let r = script(
            frames(&[
                hello(1),
                Message::Error {
                    code: ErrorCode::SpawnFailed,
                    message: "permission denied".into(),
                },
                Message::Exit(ExitStatus::Exited(126)),
            ]),
            100,
        );
        assert!(
            matches!(
                r.outcome,
                Outcome::SpawnFailed {
                    status: Some(ExitStatus::Exited(126)),
                    ..
                }
            ),
            "{r:?}"
        );
        // Anything but an Exit after it is a violation.
        let r = script(
            frames(&[
                hello(1),
                Message::Error {
                    code: ErrorCode::SpawnFailed,
                    message: "x".into(),
                },
                Message::Stdout(b"y".to_vec()),
            ]),
            100,
        );
        assert!(matches!(
            r.outcome,
            Outcome::Broken(Violation::Unexpected { kind: "Stdout", .. })
        ));
        // An error before the handshake is not a spawn failure.
        let r = script(
            frames(&[Message::Error {
                code: ErrorCode::SpawnFailed,
                message: "x".into(),
            }]),
            100,
        );
        assert!(matches!(
            r.outcome,
            Outcome::Broken(Violation::GuestError { .. })
        ));

        let r = script(
            frames(&[
                hello(1),
                Message::Error {
                    code: ErrorCode::Internal,
                    message: "oops".into(),
                },
            ]),
            100,
        );
        let Outcome::Broken(v @ Violation::GuestError { .. }) = r.outcome else {
            panic!("{r:?}")
        };
        assert_eq!(v.to_string(), "the guest reported Internal: oops");
    }

    #[test]
    fn a_kill_after_the_guest_saw_the_oom_killer_is_out_of_memory() {
        let oom = event(OOM_EVENT, &[("oom_kills", "1")]);
        for (msgs, want_oom) in [
            (
                vec![oom.clone(), Message::Exit(ExitStatus::Exited(137))],
                true,
            ),
            (
                vec![oom.clone(), Message::Exit(ExitStatus::Signaled(9))],
                true,
            ),
            (vec![oom, Message::Exit(ExitStatus::Exited(1))], false),
            (vec![Message::Exit(ExitStatus::Exited(137))], false),
        ] {
            let mut all = vec![hello(1)];
            all.extend(msgs);
            let r = script(frames(&all), 100);
            assert_eq!(
                matches!(r.outcome, Outcome::OutOfMemory(_)),
                want_oom,
                "{r:?}"
            );
        }
    }

    #[test]
    fn output_beyond_the_limit_ends_the_session_once_what_fits_is_out() {
        let r = script(
            frames(&[
                hello(1),
                Message::Stdout(b"12345".to_vec()),
                Message::Stderr(b"67890".to_vec()),
                Message::Stdout(b"abc".to_vec()),
                Message::Exit(ExitStatus::Exited(0)),
            ]),
            7,
        );
        assert!(matches!(r.outcome, Outcome::OutputLimit(7)), "{r:?}");
        assert_eq!(r.stdout, b"12345", "nothing is read after the limit");
        let stderr = String::from_utf8(r.stderr).expect("utf8");
        assert!(
            stderr.starts_with(
                "67\nairlock: the command's output reached --max-output-bytes (7 bytes)"
            ),
            "{stderr}"
        );
        assert_eq!(stderr.matches("airlock:").count(), 1, "{stderr}");
        assert_eq!(r.discarded, 3);
    }

    /// A writer that is closed, like a pipe whose reader exited.
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn closed_stdout_ends_the_session() {
        let input = frames(&[
            hello(1),
            Message::Stdout(b"x".to_vec()),
            Message::Exit(ExitStatus::Exited(0)),
        ]);
        let mut output = Output::new(Closed, Vec::new(), 100);
        let (audit, _) = AuditLog::memory(TEST_LIMITS, None);
        let outcome = serve(
            Cursor::new(input),
            Vec::new(),
            &spec(),
            &mut output,
            &mut |_| {},
            &audit,
        );
        assert!(matches!(outcome, Outcome::OutputClosed(_)), "{outcome:?}");
    }

    /// Over a real socket pair, with the guest side in a thread that reads
    /// what the host sends (as the real init does) and streams a lot.
    #[test]
    fn over_a_socket_pair() {
        let (host, guest) = UnixStream::pair().expect("pair");
        let chunk = vec![0x5a; 32 * 1024];
        let chunks = 100;
        let guest_side = {
            let chunk = chunk.clone();
            thread::spawn(move || {
                let mut g = &guest;
                write_frame(g, &hello(1)).expect("hello");
                let got = vec![
                    read_frame(&mut g).expect("host hello"),
                    read_frame(&mut g).expect("run spec"),
                ];
                for _ in 0..chunks {
                    write_frame(g, &Message::Stdout(chunk.clone())).expect("chunk");
                }
                write_frame(g, &Message::Exit(ExitStatus::Exited(3))).expect("exit");
                drop(guest);
                got
            })
        };
        let mut output = Output::new(Vec::new(), Vec::new(), u64::MAX);
        let (audit, _) = AuditLog::memory(TEST_LIMITS, None);
        let outcome = serve(&host, &host, &spec(), &mut output, &mut |_| {}, &audit);
        assert!(
            matches!(outcome, Outcome::Exited(ExitStatus::Exited(3))),
            "{outcome:?}"
        );
        assert_eq!(output.out.len(), chunk.len() * chunks);
        let got = guest_side.join().expect("guest thread");
        assert!(matches!(got[0], Message::Hello { version: 1, .. }));
        assert!(matches!(got[1], Message::RunSpec(_)));
    }

    #[test]
    fn the_model_capability_for_a_guest_that_serves_the_endpoint() {
        let spec = spec();
        assert_eq!(
            spec.host_capabilities(&["audit".to_owned(), "model".to_owned()]),
            ["audit", "model"]
        );
        assert_eq!(spec.host_capabilities(&["audit".to_owned()]), ["audit"]);
    }

    #[test]
    fn file_capabilities_only_for_a_guest_that_speaks_files() {
        let mut spec = spec();
        let files = vec!["files".to_owned()];
        assert_eq!(spec.host_capabilities(&files), ["audit"]);
        spec.workspace = true;
        assert_eq!(
            spec.host_capabilities(&files),
            ["audit", "files", "workspace"]
        );
        spec.results = true;
        assert_eq!(
            spec.host_capabilities(&files),
            ["audit", "files", "workspace", "results"]
        );
        assert_eq!(spec.host_capabilities(&["audit".to_owned()]), ["audit"]);
        spec.workspace = false;
        assert_eq!(
            spec.host_capabilities(&files),
            ["audit", "files", "results"]
        );
    }

    #[test]
    fn an_oversized_spec_is_refused_up_front() {
        let big = "x".repeat(airlock_protocol::limits::MAX_STRING);
        let err = EncodedSpec::new(RunSpec {
            argv: vec![big; 9],
            ..rs()
        });
        assert!(matches!(err, Err(EncodeError::TooLarge(_))));
        // And a good one is exactly one decodable frame.
        let spec = spec();
        assert!(matches!(
            decode_body(&spec.frame[4..]),
            Ok(Message::RunSpec(_))
        ));
    }

    fn kinds(r: &Scripted) -> Vec<(&str, Source)> {
        r.audit
            .iter()
            .map(|rec| (rec.kind.as_str(), rec.source))
            .collect()
    }

    fn event(kind: &str, fields: &[(&str, &str)]) -> Message {
        Message::AuditEvent {
            kind: kind.into(),
            fields: fields
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn the_session_is_audited() {
        let r = script(
            frames(&[
                hello(1),
                event("process.start", &[("pid", "5"), ("argv", "sh -c ls")]),
                Message::Stdout(b"0123456789".to_vec()),
                event("exec", &[("pid", "6"), ("argv", "ls")]),
                Message::Exit(ExitStatus::Exited(3)),
            ]),
            100,
        );
        assert!(matches!(r.outcome, Outcome::Exited(_)), "{r:?}");
        assert_eq!(
            kinds(&r),
            [
                ("session.hello", Source::Host),
                ("process.start", Source::Guest),
                ("exec", Source::Guest),
                ("command.exit", Source::Guest),
            ]
        );
        assert_eq!(r.audit[0].fields["capabilities"], json!(["x"]));
        assert_eq!(r.audit[1].fields["argv"], "sh -c ls");
        assert_eq!(r.audit[3].fields["exited"], 3);
        // Over the limit: recorded, and the session ends there.
        let r = script(
            frames(&[
                hello(1),
                Message::Stdout(b"0123456789".to_vec()),
                Message::Exit(ExitStatus::Exited(3)),
            ]),
            4,
        );
        assert!(matches!(r.outcome, Outcome::OutputLimit(4)), "{r:?}");
        assert_eq!(
            kinds(&r),
            [
                ("session.hello", Source::Host),
                ("policy.output_limit", Source::Host),
            ]
        );
        assert_eq!(r.audit[1].fields["limit_bytes"], 4);
    }

    #[test]
    fn protocol_errors_and_spawn_failures_are_audited() {
        let r = script(b"GET / HTTP/1.1\r\n\r\n".to_vec(), 10);
        assert_eq!(kinds(&r), [("protocol.error", Source::Host)]);
        let reason = r.audit[0].fields["reason"].as_str().expect("reason");
        assert!(
            reason.starts_with("unreadable frame at the handshake"),
            "{reason}"
        );

        let r = script(
            frames(&[
                hello(1),
                Message::Error {
                    code: ErrorCode::SpawnFailed,
                    message: "not found".into(),
                },
                Message::Exit(ExitStatus::Exited(127)),
            ]),
            10,
        );
        assert_eq!(
            kinds(&r),
            [
                ("session.hello", Source::Host),
                ("command.spawn_failed", Source::Guest),
                ("command.exit", Source::Guest),
            ]
        );
        // An AuditEvent after Exit is a protocol error like any message.
        let r = script(
            frames(&[
                hello(1),
                Message::Exit(ExitStatus::Exited(0)),
                event("exec", &[]),
            ]),
            10,
        );
        assert!(matches!(
            r.outcome,
            Outcome::Broken(Violation::Unexpected {
                kind: "AuditEvent",
                stage: Stage::AfterExit
            })
        ));
        assert_eq!(r.audit.last().expect("record").kind, "protocol.error");
        // And before the handshake.
        let r = script(frames(&[event("exec", &[])]), 10);
        assert!(matches!(
            r.outcome,
            Outcome::Broken(Violation::Unexpected {
                kind: "AuditEvent",
                stage: Stage::BeforeHello
            })
        ));
    }

    #[test]
    fn a_flood_of_audit_events_is_capped() {
        let mut msgs = vec![hello(1)];
        for i in 0..5000 {
            msgs.push(event("exec", &[("pid", &i.to_string())]));
        }
        msgs.push(Message::Exit(ExitStatus::Exited(0)));
        let caps = crate::audit::Limits {
            max_guest_records: 50,
            max_guest_bytes: 1 << 20,
        };
        let r = script_with(frames(&msgs), 10, caps);
        assert!(matches!(r.outcome, Outcome::Exited(_)), "{r:?}");
        let guest_events = r.audit.iter().filter(|rec| rec.kind == "exec").count();
        assert_eq!(guest_events, 50);
        // The exit status is not an AuditEvent: still recorded.
        assert_eq!(r.audit.last().expect("record").kind, "command.exit");
    }
}
