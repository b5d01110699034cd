//! Reaping children, and what a child's end means to the user.
//!
//! As PID 1 the init inherits every orphan, so it must collect them all with
//! `waitpid(-1, WNOHANG)` or they stay zombies. [`Reaper`] does that each
//! time `SIGCHLD` arrives: the signal handler only writes a byte to a socket
//! (the self-pipe trick), which the command's streaming loop polls, so no
//! real work runs in signal context.

use std::io::{self, Read};
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsFd, BorrowedFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};

use libc::{c_int, pid_t};

use crate::console;
use crate::exec::ChildWait;

/// A reaping or signal-setup step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to wait for children")]
    Wait(#[source] io::Error),
    #[error("failed to set up the SIGCHLD handler")]
    Sigchld(#[source] io::Error),
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

/// What one `waitpid(-1, WNOHANG)` found.
enum Waited {
    /// This child ended with this raw status and is gone now.
    Reaped(pid_t, c_int),
    /// Children are left, none has ended.
    Running,
    /// No child is left at all.
    NoChildren,
}

fn wait_any() -> io::Result<Waited> {
    loop {
        let mut status: c_int = 0;
        // SAFETY: `status` is a live, writable c_int for the whole call;
        // waitpid writes nothing else.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            return Ok(Waited::Reaped(pid, status));
        }
        if pid == 0 {
            return Ok(Waited::Running);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ECHILD) => return Ok(Waited::NoChildren),
            Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

fn log_reaped(pid: pid_t, status: c_int) {
    if console::debug_enabled() {
        let code = exit_code(status).map_or_else(|| format!("raw {status:#x}"), |c| c.to_string());
        console::debug(&format!("reaped pid {pid}: status {code}"));
    }
}

/// Reaps every child that has already ended, without blocking. Returns
/// `true` when no child is left at all.
pub fn reap_exited() -> Result<bool, Error> {
    loop {
        match wait_any().map_err(Error::Wait)? {
            Waited::Reaped(pid, status) => log_reaped(pid, status),
            Waited::Running => return Ok(false),
            Waited::NoChildren => return Ok(true),
        }
    }
}

/// Write end of the SIGCHLD self-pipe, for the handler; -1 until
/// [`Reaper::install`]. Never closed once set, so the handler can never
/// write to a descriptor that was closed and reused.
static SIGCHLD_WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigchld(_signal: c_int) {
    let fd = SIGCHLD_WAKE_FD.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    let byte = 1u8;
    // SAFETY: only async-signal-safe work: `__errno_location` gives this
    // thread's errno slot, valid while the thread lives, which is saved and
    // restored so the interrupted code sees its own errno; write(2) reads
    // the one live byte `byte` and goes to the non-blocking socket that is
    // never closed. A full socket (EAGAIN) is fine: one pending byte is
    // enough to wake the poller.
    unsafe {
        let errno = libc::__errno_location();
        let saved = *errno;
        libc::write(fd, (&raw const byte).cast::<libc::c_void>(), 1);
        *errno = saved;
    }
}

/// The init's reaper: collects every child on `SIGCHLD` and keeps the
/// status of the one the streaming loop asks about.
#[derive(Debug)]
pub struct Reaper {
    /// Read end of the SIGCHLD self-pipe.
    wake: UnixStream,
}

impl Reaper {
    /// Installs the `SIGCHLD` handler. Call once, before any child is
    /// started; the handler stays for the life of the init.
    pub fn install() -> Result<Self, Error> {
        let (wake, notify) = UnixStream::pair().map_err(Error::Sigchld)?;
        wake.set_nonblocking(true).map_err(Error::Sigchld)?;
        notify.set_nonblocking(true).map_err(Error::Sigchld)?;
        // Leaked on purpose: see SIGCHLD_WAKE_FD.
        SIGCHLD_WAKE_FD.store(notify.into_raw_fd(), Ordering::SeqCst);

        let mut mask = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the whole sigset_t it is given,
        // and `mask` is a live, writable one.
        if unsafe { libc::sigemptyset(mask.as_mut_ptr()) } != 0 {
            return Err(Error::Sigchld(io::Error::last_os_error()));
        }
        // SAFETY: all-zero is a valid `sigaction` (plain integers, a
        // sigset_t and an optional function pointer); every field that
        // matters is set below.
        let mut action: libc::sigaction = unsafe { mem::zeroed() };
        action.sa_sigaction = on_sigchld as extern "C" fn(c_int) as libc::sighandler_t;
        // SAFETY: sigemptyset above initialised `mask`.
        action.sa_mask = unsafe { mask.assume_init() };
        // Restart interrupted system calls in the other threads; no
        // SIGCHLD for stopped or continued children.
        action.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
        // SAFETY: `action` is initialised and lives across the call; the
        // handler is an `extern "C" fn(c_int)` that does only
        // async-signal-safe work; the old action is not asked for (null).
        let rc = unsafe { libc::sigaction(libc::SIGCHLD, &action, ptr::null_mut()) };
        if rc != 0 {
            return Err(Error::Sigchld(io::Error::last_os_error()));
        }
        Ok(Self { wake })
    }
}

impl ChildWait for Reaper {
    fn try_wait(&mut self, pid: pid_t) -> io::Result<Option<c_int>> {
        take_status(pid)
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.wake.as_fd())
    }

    fn clear_wake(&mut self) {
        let mut buf = [0u8; 64];
        // Non-blocking: stops at WouldBlock (empty) or on any error.
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Most exit statuses kept for children nobody has asked about yet
/// (orphans the init inherited, mostly); beyond, the oldest go. A status
/// someone waits for is taken within a poll interval of its reaping.
const MAX_KEPT: usize = 4096;

/// Reaped and not yet asked for: (pid, raw status), oldest first. Several
/// commands run at once in a live sandbox (the command and its execs, each
/// in its own thread); whoever reaps keeps the others' statuses here.
static KEPT: std::sync::Mutex<std::collections::VecDeque<(pid_t, c_int)>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

/// Takes `pid`'s status if it has ended: from [`KEPT`], or by reaping
/// (keeping every other child's status). An error if it can never be
/// reported (no child left and none kept).
fn take_status(pid: pid_t) -> io::Result<Option<c_int>> {
    let mut kept = KEPT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(i) = kept.iter().position(|(p, _)| *p == pid) {
        return Ok(kept.remove(i).map(|(_, s)| s));
    }
    let mut found = None;
    loop {
        match wait_any()? {
            Waited::Reaped(p, status) => {
                log_reaped(p, status);
                if p == pid {
                    found = Some(status);
                } else {
                    kept.push_back((p, status));
                    if kept.len() > MAX_KEPT {
                        kept.pop_front();
                    }
                }
            }
            Waited::Running => return Ok(found),
            // Our child was already reaped by someone else: it can never
            // be reported, so say so instead of waiting for ever.
            Waited::NoChildren if found.is_none() => {
                return Err(io::Error::from_raw_os_error(libc::ECHILD))
            }
            Waited::NoChildren => return Ok(found),
        }
    }
}

/// An exec's waiter in a live sandbox: asks every few milliseconds (the
/// `SIGCHLD` wake-ups go to the command's [`Reaper`]).
#[derive(Debug, Default)]
pub struct Waiter;

impl ChildWait for Waiter {
    fn try_wait(&mut self, pid: pid_t) -> io::Result<Option<c_int>> {
        take_status(pid)
    }

    fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn clear_wake(&mut self) {}
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
