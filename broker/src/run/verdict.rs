//! What an ended run amounts to, for the user and the audit log.

use std::path::Path;
use std::time::Duration;

use airlock_protocol::ExitStatus;
use serde_json::{json, Value};

use crate::engine::{self, ProcessExit, Vm};
use crate::exit::Exit;
use crate::session::{Outcome, Stage, Violation};

use super::*;

/// The `vm.exit` record: how the VM process ended, who stopped it and why.
pub(crate) fn vm_exit_fields(end: Option<&End>, exit: Option<&ProcessExit>) -> Value {
    let (by, why) = match end {
        Some(End::Session {
            outcome,
            vm: Some(_),
        }) => (
            "itself",
            match outcome {
                Outcome::Exited(_) | Outcome::OutOfMemory(_) | Outcome::SpawnFailed { .. } => {
                    "the guest powered off after the command ended".to_owned()
                }
                _ => "it stopped during the control session".to_owned(),
            },
        ),
        Some(End::StoppedBeforeConnect(_)) => {
            ("itself", "it stopped before the guest connected".to_owned())
        }
        Some(End::SessionLost(_)) => (
            "itself",
            "it stopped and the control session did not finish".to_owned(),
        ),
        Some(End::Session { outcome, vm: None }) => (
            "airlock",
            match outcome {
                Outcome::Exited(_) | Outcome::OutOfMemory(_) | Outcome::SpawnFailed { .. } => {
                    "the guest did not power off after the command ended".to_owned()
                }
                Outcome::Broken(_) => "the guest broke the protocol".to_owned(),
                Outcome::OutputClosed(_) => "our output was closed".to_owned(),
                Outcome::OutputLimit(_) => "the output limit was reached".to_owned(),
            },
        ),
        Some(End::BootTimeout(limit)) => (
            "airlock",
            format!(
                "the guest did not connect within the boot deadline ({} s)",
                limit.as_secs()
            ),
        ),
        Some(End::TimedOut { .. }) => ("airlock", "--timeout passed".to_owned()),
        Some(End::Interrupted(signal)) => ("airlock", format!("airlock got signal {signal}")),
        Some(End::AuditFailed(_)) => ("airlock", "the audit log could not be written".to_owned()),
        None => ("airlock", "airlock lost track of the VM".to_owned()),
    };
    json!({
        "status": exit.map(ToString::to_string),
        "stopped_by": by,
        "why": why,
    })
}

/// The command's status as the guest reported it, if it did.
pub(crate) fn command_status(end: &End) -> Option<ExitStatus> {
    match end {
        End::Session {
            outcome: Outcome::Exited(status) | Outcome::OutOfMemory(status),
            ..
        }
        | End::Session {
            outcome:
                Outcome::SpawnFailed {
                    status: Some(status),
                    ..
                },
            ..
        } => Some(*status),
        _ => None,
    }
}

/// How the run ended, as `run.end` says it. Pure.
pub fn how(end: &End) -> &'static str {
    match end {
        End::Session { outcome, vm } => match outcome {
            Outcome::Exited(ExitStatus::Exited(_)) => "exited",
            Outcome::Exited(ExitStatus::Signaled(_)) => "signaled",
            Outcome::SpawnFailed { .. } => "spawn_failed",
            Outcome::OutputClosed(_) => "interrupted",
            Outcome::OutputLimit(_) => "output_limit",
            Outcome::OutOfMemory(_) => "out_of_memory",
            Outcome::Broken(Violation::Closed {
                stage: Stage::BeforeHello,
            }) if vm.is_some() => "boot_failure",
            Outcome::Broken(_) => "protocol_error",
        },
        End::StoppedBeforeConnect(_) | End::BootTimeout(_) => "boot_failure",
        End::TimedOut { .. } => "timeout",
        End::Interrupted(_) => "interrupted",
        End::SessionLost(_) => "protocol_error",
        End::AuditFailed(_) => "audit_failure",
    }
}

/// What a run amounts to: the exit code, the line to print (after
/// `airlock: `), and whether the console and engine logs help explain it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub exit: Exit,
    pub message: Option<String>,
    pub diagnostics: bool,
}

pub(crate) fn command_exit(status: ExitStatus) -> Exit {
    // exit_code() is 0..=255 or 129..=192 (128 + signal 1..=64).
    u8::try_from(status.exit_code()).map_or(Exit::ProtocolError, Exit::Command)
}

/// Judges how the run ended. Pure.
pub fn judge(end: &End, timeout: Duration) -> Verdict {
    let verdict = |exit, message: String, diagnostics| Verdict {
        exit,
        message: Some(message),
        diagnostics,
    };
    match end {
        End::Session { outcome, vm } => match (outcome, vm) {
            (Outcome::Exited(status), Some(exit)) if exit.success() => Verdict {
                exit: command_exit(*status),
                message: None,
                diagnostics: false,
            },
            (Outcome::Exited(status), Some(exit)) => verdict(
                command_exit(*status),
                format!("warning: the VM process ended with {exit} after the command ended"),
                true,
            ),
            (Outcome::Exited(status), None) => verdict(
                command_exit(*status),
                format!(
                    "warning: the guest did not power off within {} s after the command ended; \
                     the VM was stopped",
                    POWER_OFF_GRACE.as_secs()
                ),
                false,
            ),
            (Outcome::SpawnFailed { message, status }, _) => verdict(
                // The init's shell-style code (127 not found, 126 not
                // executable) when it sent one, else 127.
                status
                    .filter(|s| s.exit_code() != 0)
                    .map_or(Exit::SpawnFailed, command_exit),
                format!("error: the command could not be started in the sandbox: {message}"),
                false,
            ),
            (Outcome::OutputClosed(e), _) => verdict(
                Exit::Interrupted(libc::SIGPIPE),
                format!("our output was closed ({e}); the sandbox was stopped"),
                false,
            ),
            (Outcome::OutOfMemory(status), _) => verdict(
                Exit::OutOfMemory,
                format!(
                    "error: the sandbox ran out of memory: the command was killed ({}) after \
                     the guest kernel killed processes for memory (raise --mem)",
                    match status {
                        ExitStatus::Signaled(sig) => format!("signal {sig}"),
                        ExitStatus::Exited(code) => format!("exit {code}"),
                    }
                ),
                false,
            ),
            (Outcome::OutputLimit(limit), _) => verdict(
                Exit::OutputLimit,
                format!(
                    "error: the command's output reached --max-output-bytes ({limit} bytes); \
                     the sandbox was stopped"
                ),
                false,
            ),
            (
                Outcome::Broken(Violation::Closed {
                    stage: Stage::BeforeHello,
                }),
                Some(exit),
            ) => verdict(
                Exit::SandboxFailed,
                format!(
                    "error: the sandbox failed: the VM process ended with {exit} \
                     before the guest's Hello"
                ),
                true,
            ),
            (Outcome::Broken(violation), vm) => {
                let mut line = format!("guest protocol error: {}", crate::text::report(violation));
                if let Some(exit) = vm {
                    line.push_str(&format!(" (the VM process ended with {exit})"));
                }
                verdict(Exit::ProtocolError, line, vm.is_some())
            }
        },
        End::StoppedBeforeConnect(exit) => verdict(
            Exit::SandboxFailed,
            format!(
                "error: the sandbox failed: the VM process ended with {exit} \
                 before the guest connected"
            ),
            true,
        ),
        End::BootTimeout(limit) => verdict(
            Exit::SandboxFailed,
            format!(
                "error: the sandbox failed: the guest did not connect within {} s \
                 (the boot deadline); the VM was stopped",
                limit.as_secs()
            ),
            true,
        ),
        End::TimedOut { booted } => verdict(
            Exit::Timeout,
            format!(
                "error: the sandbox ran longer than --timeout {} s and was stopped{}",
                timeout.as_secs(),
                if *booted {
                    ""
                } else {
                    " (the guest had not connected yet)"
                }
            ),
            // A guest that never connected: the console may say why.
            !booted,
        ),
        End::Interrupted(signal) => {
            let name = match *signal {
                libc::SIGINT => "SIGINT",
                libc::SIGTERM => "SIGTERM",
                libc::SIGHUP => "SIGHUP",
                _ => "a signal",
            };
            verdict(
                Exit::Interrupted(*signal),
                format!("interrupted by {name}; the sandbox was stopped"),
                false,
            )
        }
        End::SessionLost(exit) => verdict(
            Exit::ProtocolError,
            format!(
                "guest protocol error: the VM process ended with {exit} and the control \
                 session did not finish"
            ),
            true,
        ),
        End::AuditFailed(why) => verdict(
            Exit::SandboxFailed,
            format!("error: the audit log could not be written ({why}); the sandbox was stopped"),
            false,
        ),
    }
}

/// The lines that explain a failed run: whether the guest kernel panicked,
/// the end of the console, the end of each engine log that has anything.
pub(crate) fn diagnostics(console: &Path, vm: &Vm) -> Vec<String> {
    let mut lines = Vec::new();
    // The whole tail window, to find a panic message among the trace lines.
    let window = engine::tail_lines(console, usize::MAX);
    if window.iter().any(|l| l.contains(PANIC_MARKER)) {
        lines.push("the guest kernel panicked".into());
    }
    let skip = window.len().saturating_sub(engine::TAIL_LINES);
    lines.push(engine::describe_tail(&window[skip..], "the console"));
    for (name, log) in vm.logs() {
        let tail = engine::tail_lines(log, engine::TAIL_LINES);
        if !tail.is_empty() {
            lines.push(engine::describe_tail(&tail, &format!("the {name} log")));
        }
    }
    lines
}
