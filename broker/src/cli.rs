//! The command line: what the user can type, and the exit codes it promises.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::EngineChoice;

/// Exit codes of `airlock`. They are part of the CLI contract and listed in
/// every command's `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command did what was asked.
    Success,
    /// `doctor`: no engine can run a sandbox on this host.
    HostUnfit,
    /// Bad usage or input (clap's own usage errors use it too); nothing was started.
    Usage,
    /// The sandbox failed: the VM did not boot, crashed or stopped without
    /// the init reporting ready.
    SandboxFailed,
    /// The sandbox ran past `--timeout` and was stopped.
    Timeout,
    /// A signal asked us to stop; the sandbox was stopped. Holds the signal number.
    Interrupted(i32),
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::HostUnfit => 1,
            Exit::Usage => 2,
            Exit::SandboxFailed => 120,
            Exit::Timeout => 124,
            // The shell convention, 128 + signal number: 130 for SIGINT, 143 for SIGTERM.
            Exit::Interrupted(signal) => u8::try_from(128 + signal.clamp(1, 127)).unwrap_or(130),
        }
    }
}

const RUN_EXIT_CODES: &str = "\
Exit codes:
  0    the sandbox booted, its init reported ready, and the VM stopped cleanly
  2    bad usage or input (missing or non-ELF kernel, missing initrd, out-of-range
       value, requested engine unusable here); no VM was started
  120  the sandbox failed: the VM did not boot, crashed, or stopped before its
       init reported ready (the last console lines are shown)
  124  timeout: the sandbox ran longer than --timeout and was stopped
  130  interrupted by Ctrl-C (SIGINT; 143 for SIGTERM, 129 for SIGHUP); the
       sandbox was stopped

Environment:
  AIRLOCK_HOME     directory holding build/ (default: found next to the airlock binary)
  AIRLOCK_KERNEL   kernel to boot when --kernel is not given
  AIRLOCK_INITRD   initrd to boot when --initrd is not given
  AIRLOCK_VMM      airlock-vmm binary, when none sits next to the airlock binary";

const DOCTOR_EXIT_CODES: &str = "\
Exit codes:
  0    at least one engine can run a sandbox on this host
  1    no engine can run a sandbox here (each FAIL line says how to fix it)
  2    bad usage";

const TOP_EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    doctor: no engine can run a sandbox on this host
  2    bad usage or input; nothing was started
  120  the sandbox failed (the VM did not boot or crashed)
  124  timeout
  130  interrupted (SIGINT; 143 for SIGTERM, 129 for SIGHUP)

Run `airlock doctor` to check what this host can run.";

/// Run untrusted agents and commands inside disposable KVM microVMs.
#[derive(Debug, Parser)]
#[command(name = "airlock", version, after_help = TOP_EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a sandbox, print its console lines as they arrive, and stop it.
    ///
    /// The console of the guest (booted with `quiet`, so essentially the
    /// lines of airlock-init) is printed on stdout; airlock's own messages
    /// and those of the VM process go to stderr.
    #[command(after_help = RUN_EXIT_CODES)]
    Run(RunArgs),
    /// Check whether this host can run sandboxes, and say how to fix what is missing.
    #[command(after_help = DOCTOR_EXIT_CODES)]
    Doctor(DoctorArgs),
}

/// Where the guest kernel and initrd come from.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct ImageArgs {
    /// Guest kernel: an uncompressed x86-64 ELF vmlinux with a PVH entry
    /// [default: $AIRLOCK_KERNEL, else build/vmlinux under the Airlock home]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Guest initrd (cpio archive holding airlock-init)
    /// [default: $AIRLOCK_INITRD, else build/initramfs.cpio under the Airlock home]
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Which engine boots the VM
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,
    #[command(flatten)]
    pub image: ImageArgs,
    /// Guest memory in MiB (64 to 65536)
    #[arg(long, value_name = "MiB", default_value_t = 256)]
    pub mem: u32,
    /// Number of vCPUs (1 to 16)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
    /// Stop the sandbox and exit with 124 if it runs longer than this (at least 1)
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
    /// Write the guest console to this file and keep it (default: a private
    /// temporary file, removed at the end)
    #[arg(long, value_name = "PATH", conflicts_with = "keep_console")]
    pub console_log: Option<PathBuf>,
    /// Keep the temporary console log and print where it is
    #[arg(long)]
    pub keep_console: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub image: ImageArgs,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let cli = Cli::try_parse_from(["airlock", "run"]).expect("parses");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.engine, EngineChoice::Auto);
        assert_eq!(args.mem, 256);
        assert_eq!(args.cpus, 1);
        assert_eq!(args.timeout, 300);
        assert!(args.console_log.is_none());
        assert!(!args.keep_console);
    }

    #[test]
    fn console_log_conflicts_with_keep_console() {
        let err = Cli::try_parse_from(["airlock", "run", "--console-log", "x", "--keep-console"])
            .expect_err("conflict");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Exit::Success.code(), 0);
        assert_eq!(Exit::Usage.code(), 2);
        assert_eq!(Exit::SandboxFailed.code(), 120);
        assert_eq!(Exit::Timeout.code(), 124);
        assert_eq!(Exit::Interrupted(libc::SIGINT).code(), 130);
        assert_eq!(Exit::Interrupted(libc::SIGTERM).code(), 143);
    }
}
