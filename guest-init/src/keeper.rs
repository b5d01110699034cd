//! The keeper: the init's own binary, bind-mounted read-only into a live
//! sandbox's agent container at [`PATH`], so that what the host runs there
//! to keep, probe and stop the container needs nothing from the image (a
//! distroless image has no `sleep`, `true` or `sh`).
//!
//! - `keeper pause`: waits for SIGTERM, SIGINT or SIGHUP, then exits 0 (the
//!   container's command while the sandbox lives; catatonit is its PID 1).
//! - `keeper probe`: exits 0 once a `keeper pause` runs in the container's
//!   PID namespace, 1 before (the host's readiness probe: a sandbox is
//!   ready when its container has been started and holds its command).
//! - `keeper kill TERM|KILL`: `kill(-1, SIG)`: every process of the
//!   container's PID namespace the caller may signal (the stop).
//! - `keeper exec CMD ARG...`: becomes CMD (found in `PATH`); exits 127 if
//!   there is no such command and 126 if it cannot run, as a shell does
//!   (an exec's `crun exec` runs through it: crun itself exits 255).
//!
//! It holds nothing secret (the init's code is public) and gives the agent
//! no power it lacks: it can already wait and signal its own processes.

use std::process::ExitCode;

/// Where the keeper is in the agent's container.
pub const PATH: &str = "/run/airlock/keeper";

/// If this process was started as the keeper, runs it and returns its
/// exit code; `None` for the init.
pub fn dispatch() -> Option<ExitCode> {
    let mut args = std::env::args_os();
    if args.next().as_deref() != Some(std::ffi::OsStr::new(PATH)) {
        return None;
    }
    let mode = args.next();
    let rest: Vec<std::ffi::OsString> = args.collect();
    let word = |w: &std::ffi::OsString| w.to_str().map(str::to_owned);
    Some(
        match (mode.as_ref().and_then(word).as_deref(), rest.as_slice()) {
            (Some("pause"), []) => pause(),
            (Some("probe"), []) => probe(std::path::Path::new("/proc")),
            (Some("kill"), [sig]) => match word(sig).as_deref() {
                Some("TERM") => kill_all(libc::SIGTERM),
                Some("KILL") => kill_all(libc::SIGKILL),
                _ => usage(),
            },
            (Some("exec"), [program, args @ ..]) => exec(program, args),
            _ => usage(),
        },
    )
}

/// Becomes `program` (looked up in `PATH` as a shell does); if it cannot,
/// says why and exits as a shell would: 127 not found, 126 otherwise.
fn exec(program: &std::ffi::OsStr, args: &[std::ffi::OsString]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(program).args(args).exec();
    let shown = program.to_string_lossy();
    if err.kind() == std::io::ErrorKind::NotFound {
        eprintln!("airlock: {shown}: command not found");
        ExitCode::from(127)
    } else {
        eprintln!("airlock: {shown}: cannot run: {err}");
        ExitCode::from(126)
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: {PATH} pause | probe | kill TERM|KILL | exec CMD [ARG...]");
    ExitCode::from(2)
}

/// Blocks the ending signals and waits for one of them.
fn pause() -> ExitCode {
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use;
    // sigprocmask and sigwait only read it and write `sig`, both ours.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        while libc::sigwait(&set, &mut sig) != 0 {}
    }
    ExitCode::SUCCESS
}

/// How many of `/proc`'s entries the probe looks at: a container that is
/// being started has a handful of processes.
const PROBE_MAX_ENTRIES: usize = 4096;

/// The readiness probe: whether a `keeper pause` runs in the container.
fn probe(proc: &std::path::Path) -> ExitCode {
    match keeper_runs(proc) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("airlock: the container's keeper is not running yet");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("airlock: {}: {e}", proc.display());
            ExitCode::FAILURE
        }
    }
}

/// Whether a `keeper pause` runs among the processes `proc` shows (the
/// container's own PID namespace): catatonit, the container's PID 1,
/// starts it as its child a moment after `crun start`.
pub(crate) fn keeper_runs(proc: &std::path::Path) -> std::io::Result<bool> {
    use std::io::Read;
    let want = format!("{PATH}\0pause\0");
    Ok(std::fs::read_dir(proc)?
        .take(PROBE_MAX_ENTRIES)
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .any(|e| {
            let mut cmdline = Vec::new();
            std::fs::File::open(e.path().join("cmdline"))
                .and_then(|f| f.take(want.len() as u64 + 1).read_to_end(&mut cmdline))
                .is_ok()
                && cmdline == want.as_bytes()
        }))
}

fn kill_all(sig: i32) -> ExitCode {
    // SAFETY: kill(2) with pid -1: every process we may signal but
    // ourselves and the namespace's init; no memory is involved.
    let rc = unsafe { libc::kill(-1, sig) };
    if rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe answers yes only once the keeper's `pause` runs: not for
    /// a container whose only process is its PID 1, not for another command
    /// of the keeper, not for a name that is not a process.
    #[test]
    fn the_probe_waits_for_the_keepers_pause() {
        let proc =
            std::env::temp_dir().join(format!("airlock-keeper-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&proc);
        let process = |name: &str, cmdline: &str| {
            std::fs::create_dir_all(proc.join(name)).expect("test");
            std::fs::write(proc.join(name).join("cmdline"), cmdline).expect("test");
        };
        process("1", "/run/podman-init\0--\0/run/airlock/keeper\0pause\0");
        process("self", "/run/airlock/keeper\0pause\0");
        process("7", "/run/airlock/keeper\0pause\0x\0");
        process("8", "/run/airlock/keeper\0probe\0");
        assert!(!keeper_runs(&proc).expect("test"));
        process("2", "/run/airlock/keeper\0pause\0");
        assert!(keeper_runs(&proc).expect("test"));
        let _ = std::fs::remove_dir_all(&proc);
        assert!(keeper_runs(&proc).is_err());
    }
}
