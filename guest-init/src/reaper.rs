//! Reaping children, and what a child's end means to the user.
//!
//! As PID 1 the init inherits every orphan, so it must collect them all with
//! `waitpid(-1, WNOHANG)` or they stay zombies.

use std::io;

use libc::c_int;

use crate::console;

/// `waitpid` failed for a reason other than "no children".
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to wait for children")]
    Wait(#[source] io::Error),
}

/// The exit code a user sees for a raw wait status, as a shell reports it:
/// exit code `c` → `c`; killed by signal `n` → `128 + n`. `None` for a
/// status that is not an end (stopped, continued).
pub fn exit_code(status: c_int) -> Option<i32> {
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

/// Reaps every child that has already ended, without blocking. Returns
/// `true` when no child is left at all.
pub fn reap_exited() -> Result<bool, Error> {
    loop {
        let mut status: c_int = 0;
        // SAFETY: `status` is a live, writable c_int for the whole call;
        // waitpid writes nothing else.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            if console::debug_enabled() {
                let code =
                    exit_code(status).map_or_else(|| format!("raw {status:#x}"), |c| c.to_string());
                console::debug(&format!("reaped pid {pid}: status {code}"));
            }
            continue;
        }
        if pid == 0 {
            return Ok(false);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ECHILD) => return Ok(true),
            Some(libc::EINTR) => continue,
            _ => return Err(Error::Wait(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    /// The raw wait status of `sh -c script`, from a real child.
    fn raw_status_of(script: &str) -> c_int {
        let status = Command::new("/bin/sh")
            .args(["-c", script])
            .status()
            .expect("spawn /bin/sh");
        status.into_raw()
    }

    #[test]
    fn exit_codes_pass_through() {
        assert_eq!(exit_code(0), Some(0));
        assert_eq!(exit_code(3 << 8), Some(3));
        assert_eq!(exit_code(255 << 8), Some(255));
    }

    #[test]
    fn signals_map_to_128_plus_n() {
        assert_eq!(exit_code(libc::SIGKILL), Some(137));
        assert_eq!(exit_code(libc::SIGTERM), Some(143));
        // With the core-dump flag.
        assert_eq!(exit_code(libc::SIGSEGV | 0x80), Some(139));
    }

    #[test]
    fn stopped_and_continued_are_not_ends() {
        assert_eq!(exit_code((libc::SIGSTOP << 8) | 0x7f), None);
        assert_eq!(exit_code(0xffff), None);
    }

    #[test]
    fn real_children() {
        assert_eq!(exit_code(raw_status_of("exit 0")), Some(0));
        assert_eq!(exit_code(raw_status_of("exit 42")), Some(42));
        assert_eq!(exit_code(raw_status_of("kill -KILL $$")), Some(137));
        assert_eq!(exit_code(raw_status_of("kill -TERM $$")), Some(143));
    }
}
