//! The keeper: the init's own binary, bind-mounted read-only into a live
//! sandbox's agent container at [`PATH`], so that what the host runs there
//! to keep, probe and stop the container needs nothing from the image (a
//! distroless image has no `sleep`, `true` or `sh`).
//!
//! - `keeper pause`: waits for SIGTERM, SIGINT or SIGHUP, then exits 0 (the
//!   container's command while the sandbox lives; catatonit is its PID 1).
//! - `keeper probe`: exits 0 (the host's readiness probe).
//! - `keeper kill TERM|KILL`: `kill(-1, SIG)`: every process of the
//!   container's PID namespace the caller may signal (the stop).
//!
//! It holds nothing secret (the init's code is public) and gives the agent
//! no power it lacks: it can already wait and signal its own processes.

use std::process::ExitCode;

/// Where the keeper is in the agent's container.
pub const PATH: &str = "/run/airlock/keeper";

/// If this process was started as the keeper, runs it and returns its
/// exit code; `None` for the init.
pub fn dispatch() -> Option<ExitCode> {
    let mut args = std::env::args();
    if args.next().as_deref() != Some(PATH) {
        return None;
    }
    let mode = args.next();
    let rest: Vec<String> = args.collect();
    Some(match (mode.as_deref(), rest.as_slice()) {
        (Some("pause"), []) => pause(),
        (Some("probe"), []) => ExitCode::SUCCESS,
        (Some("kill"), [sig]) => match sig.as_str() {
            "TERM" => kill_all(libc::SIGTERM),
            "KILL" => kill_all(libc::SIGKILL),
            _ => usage(),
        },
        _ => usage(),
    })
}

fn usage() -> ExitCode {
    eprintln!("usage: {PATH} pause | probe | kill TERM|KILL");
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
