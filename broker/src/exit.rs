//! The exit codes of `airlock`: what each outcome means to a script.

/// Exit codes of `airlock`. They are part of the CLI contract and listed in
/// every command's `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command did what was asked.
    Success,
    /// `run`: the command in the sandbox ran and ended with this code
    /// (128 + N if a signal N killed it).
    Command(u8),
    /// `doctor`: no engine can run a sandbox on this host.
    HostUnfit,
    /// `audit verify`: the log is not intact.
    NotIntact,
    /// Bad usage or input (clap's own usage errors use it too); nothing was started.
    Usage,
    /// The sandbox failed: the VM could not start, stopped or crashed before
    /// the guest connected, or did not connect within the boot deadline.
    SandboxFailed,
    /// The guest broke the protocol (malformed or unexpected message, or the
    /// VM stopped before the command's exit status arrived).
    ProtocolError,
    /// The sandbox ran past `--timeout` and was stopped.
    Timeout,
    /// The command's output reached `--max-output-bytes`; the sandbox was
    /// stopped.
    OutputLimit,
    /// The command was killed after the guest ran out of memory.
    OutOfMemory,
    /// The guest could not start the command (not found, not executable).
    SpawnFailed,
    /// A signal asked us to stop, or our output was closed (SIGPIPE); the
    /// sandbox was stopped. Holds the signal number.
    Interrupted(i32),
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Command(code) => code,
            Exit::HostUnfit | Exit::NotIntact => 1,
            Exit::Usage => 2,
            Exit::SandboxFailed => 120,
            Exit::ProtocolError => 121,
            Exit::Timeout => 124,
            Exit::OutputLimit => 125,
            Exit::OutOfMemory => 123,
            Exit::SpawnFailed => 127,
            // The shell convention, 128 + signal number: 130 for SIGINT, 143 for SIGTERM.
            Exit::Interrupted(signal) => u8::try_from(128 + signal.clamp(1, 127)).unwrap_or(130),
        }
    }
}
