//! What an ended run amounts to, decided in one place: [`judge`] reads
//! how the supervision ended ([`End`]) once and says everything that
//! follows from it: the exit code, the line for the user, whether the
//! logs help explain it, `run.end`'s `how` and `command_status`, and
//! `vm.exit`'s who and why. Nothing else interprets an [`End`].

use std::path::Path;
use std::time::Duration;

use airlock_protocol::ExitStatus;

use crate::audit::records::{CommandStatus, Durations, RunEnd, VmExit};
use crate::door::session::{Outcome, Stage, Violation};
use crate::engine::{self, ProcessExit, Vm};
use crate::exit::Exit;

use super::*;

/// What a run amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub exit: Exit,
    /// The line to print (after `airlock: `), if any.
    pub message: Option<String>,
    /// Whether the console and engine logs help explain it.
    pub diagnostics: bool,
    /// `run.end`'s `how`.
    pub how: &'static str,
    /// The command's status as the guest reported it, if it did.
    pub command_status: Option<ExitStatus>,
    /// Who stopped the VM: `itself` or `airlock`.
    pub stopped_by: &'static str,
    /// Why, for `vm.exit`.
    pub why: String,
}

impl Verdict {
    /// The `vm.exit` record, with the VM process's `status` as reaped.
    pub fn vm_exit(&self, status: Option<&ProcessExit>) -> VmExit {
        VmExit {
            status: status.map(ToString::to_string),
            stopped_by: self.stopped_by,
            why: self.why.clone(),
        }
    }

    /// The `run.end` record.
    pub fn run_end(&self, durations_ms: Durations) -> RunEnd {
        RunEnd {
            how: self.how,
            exit_code: self.exit.code(),
            command_status: self.command_status.map(CommandStatus::from),
            message: self.message.clone(),
            durations_ms,
        }
    }

    /// A run that an error stopped before it could end otherwise (`how`:
    /// `boot_failure` when the engine could not start, `audit_failure`,
    /// else `error`).
    pub fn of_error(e: &Error) -> Verdict {
        Verdict {
            exit: e.exit(),
            message: Some(crate::text::report(e)),
            diagnostics: false,
            how: match e {
                Error::Spawn(_) => "boot_failure",
                Error::Audit(_) => "audit_failure",
                _ => "error",
            },
            command_status: None,
            stopped_by: "airlock",
            why: "airlock lost track of the VM".to_owned(),
        }
    }
}

fn command_exit(status: ExitStatus) -> Exit {
    // exit_code() is 0..=255 or 129..=192 (128 + signal 1..=64).
    u8::try_from(status.exit_code()).map_or(Exit::ProtocolError, Exit::Command)
}

/// Judges how the run ended. Pure.
pub fn judge(end: &End, timeout: Duration) -> Verdict {
    match end {
        End::Session { outcome, vm } => judge_session(outcome, vm.as_ref()),
        End::StoppedBeforeConnect(exit) => Verdict {
            exit: Exit::SandboxFailed,
            message: Some(format!(
                "error: the sandbox failed: the VM process ended with {exit} \
                 before the guest connected"
            )),
            diagnostics: true,
            how: "boot_failure",
            command_status: None,
            stopped_by: "itself",
            why: "it stopped before the guest connected".to_owned(),
        },
        End::BootTimeout(limit) => Verdict {
            exit: Exit::SandboxFailed,
            message: Some(format!(
                "error: the sandbox failed: the guest did not connect within {} s \
                 (the boot deadline); the VM was stopped",
                limit.as_secs()
            )),
            diagnostics: true,
            how: "boot_failure",
            command_status: None,
            stopped_by: "airlock",
            why: format!(
                "the guest did not connect within the boot deadline ({} s)",
                limit.as_secs()
            ),
        },
        End::TimedOut { booted } => Verdict {
            exit: Exit::Timeout,
            message: Some(format!(
                "error: the sandbox ran longer than --timeout {} s and was stopped{}",
                timeout.as_secs(),
                if *booted {
                    ""
                } else {
                    " (the guest had not connected yet)"
                }
            )),
            // A guest that never connected: the console may say why.
            diagnostics: !booted,
            how: "timeout",
            command_status: None,
            stopped_by: "airlock",
            why: "--timeout passed".to_owned(),
        },
        End::Interrupted(signal) => {
            let name = match *signal {
                libc::SIGINT => "SIGINT",
                libc::SIGTERM => "SIGTERM",
                libc::SIGHUP => "SIGHUP",
                _ => "a signal",
            };
            Verdict {
                exit: Exit::Interrupted(*signal),
                message: Some(format!("interrupted by {name}; the sandbox was stopped")),
                diagnostics: false,
                how: "interrupted",
                command_status: None,
                stopped_by: "airlock",
                why: format!("airlock got signal {signal}"),
            }
        }
        End::SessionLost(exit) => Verdict {
            exit: Exit::ProtocolError,
            message: Some(format!(
                "guest protocol error: the VM process ended with {exit} and the control \
                 session did not finish"
            )),
            diagnostics: true,
            how: "protocol_error",
            command_status: None,
            stopped_by: "itself",
            why: "it stopped and the control session did not finish".to_owned(),
        },
        End::AuditFailed(why) => Verdict {
            exit: Exit::SandboxFailed,
            message: Some(format!(
                "error: the audit log could not be written ({why}); the sandbox was stopped"
            )),
            diagnostics: false,
            how: "audit_failure",
            command_status: None,
            stopped_by: "airlock",
            why: "the audit log could not be written".to_owned(),
        },
    }
}

/// The control conversation ended with `outcome`; `vm` is how the VM
/// process ended if it stopped by itself (`None`: airlock stopped it).
fn judge_session(outcome: &Outcome, vm: Option<&ProcessExit>) -> Verdict {
    // Who stopped the VM, and why, follows from whether the command had
    // ended when it stopped.
    let command_ended = matches!(
        outcome,
        Outcome::Exited(_) | Outcome::OutOfMemory(_) | Outcome::SpawnFailed { .. }
    );
    let (stopped_by, why) = match vm {
        Some(_) if command_ended => ("itself", "the guest powered off after the command ended"),
        Some(_) => ("itself", "it stopped during the control session"),
        None if command_ended => (
            "airlock",
            "the guest did not power off after the command ended",
        ),
        None => (
            "airlock",
            match outcome {
                Outcome::OutputClosed(_) => "our output was closed",
                Outcome::OutputLimit(_) => "the output limit was reached",
                _ => "the guest broke the protocol",
            },
        ),
    };
    let mut verdict = Verdict {
        exit: Exit::ProtocolError,
        message: None,
        diagnostics: false,
        how: "protocol_error",
        command_status: None,
        stopped_by,
        why: why.to_owned(),
    };
    match outcome {
        Outcome::Exited(status) => {
            verdict.exit = command_exit(*status);
            verdict.command_status = Some(*status);
            verdict.how = match status {
                ExitStatus::Exited(_) => "exited",
                ExitStatus::Signaled(_) => "signaled",
            };
            match vm {
                Some(exit) if exit.success() => {}
                Some(exit) => {
                    verdict.message = Some(format!(
                        "warning: the VM process ended with {exit} after the command ended"
                    ));
                    verdict.diagnostics = true;
                }
                None => {
                    verdict.message = Some(format!(
                        "warning: the guest did not power off within {} s after the command \
                         ended; the VM was stopped",
                        POWER_OFF_GRACE.as_secs()
                    ));
                }
            }
        }
        Outcome::SpawnFailed { message, status } => {
            // The init's shell-style code (127 not found, 126 not
            // executable) when it sent one, else 127.
            verdict.exit = status
                .filter(|s| s.exit_code() != 0)
                .map_or(Exit::SpawnFailed, command_exit);
            verdict.command_status = *status;
            verdict.how = "spawn_failed";
            verdict.message = Some(format!(
                "error: the command could not be started in the sandbox: {message}"
            ));
        }
        Outcome::OutputClosed(e) => {
            verdict.exit = Exit::Interrupted(libc::SIGPIPE);
            verdict.how = "interrupted";
            verdict.message = Some(format!(
                "our output was closed ({e}); the sandbox was stopped"
            ));
        }
        Outcome::OutOfMemory(status) => {
            verdict.exit = Exit::OutOfMemory;
            verdict.command_status = Some(*status);
            verdict.how = "out_of_memory";
            verdict.message = Some(format!(
                "error: the sandbox ran out of memory: the command was killed ({}) after \
                 the guest kernel killed processes for memory (raise --mem)",
                match status {
                    ExitStatus::Signaled(sig) => format!("signal {sig}"),
                    ExitStatus::Exited(code) => format!("exit {code}"),
                }
            ));
        }
        Outcome::OutputLimit(limit) => {
            verdict.exit = Exit::OutputLimit;
            verdict.how = "output_limit";
            verdict.message = Some(format!(
                "error: the command's output reached --max-output-bytes ({limit} bytes); \
                 the sandbox was stopped"
            ));
        }
        Outcome::Broken(Violation::Closed {
            stage: Stage::BeforeHello,
        }) if vm.is_some() => {
            verdict.exit = Exit::SandboxFailed;
            verdict.how = "boot_failure";
            verdict.diagnostics = true;
            verdict.message = Some(format!(
                "error: the sandbox failed: the VM process ended with {} before the \
                 guest's Hello",
                vm.map(ToString::to_string).unwrap_or_default()
            ));
        }
        Outcome::Broken(violation) => {
            let mut line = format!("guest protocol error: {}", crate::text::report(violation));
            if let Some(exit) = vm {
                line.push_str(&format!(" (the VM process ended with {exit})"));
            }
            verdict.message = Some(line);
            verdict.diagnostics = vm.is_some();
        }
    }
    verdict
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
