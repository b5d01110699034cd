//! The way out: stop every process, sync, reboot.
//!
//! The guest has no ACPI, so it cannot power off; it resets (`reboot=k`
//! through the i8042) and the VMM, or QEMU with `-no-reboot`, treats the
//! reset as the end of the run.

use std::io;
use std::thread;
use std::time::{Duration, Instant};

use libc::c_int;

use crate::{console, reaper};

/// How long processes get to exit after SIGTERM.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for SIGKILLed processes to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(1);
/// How often to look for exited children while waiting.
const POLL: Duration = Duration::from_millis(10);

/// Stops every process, syncs the filesystems and resets the VM. Never
/// returns.
pub fn power_off() -> ! {
    console::info("powering off");
    signal_all(libc::SIGTERM);
    if !wait_for_children(TERM_GRACE) {
        signal_all(libc::SIGKILL);
        wait_for_children(KILL_GRACE);
    }
    sync();
    // SAFETY: reboot(2) takes no pointers. As PID 1 (root, CAP_SYS_BOOT) it
    // resets the machine and does not return; the filesystems were synced
    // just above, and nothing else runs any more.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    let err = io::Error::last_os_error();
    console::error(&format!("failed to reboot: {err}"));
    // Last resort: PID 1 exiting panics the kernel, which with `panic=-1`
    // resets the VM too. Staying alive would leave a VM that never ends.
    #[allow(clippy::exit)]
    std::process::exit(1)
}

/// Writes every filesystem's dirty data out.
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Sends `signal` to every process but PID 1 (`kill(-1)`).
fn signal_all(signal: c_int) {
    // SAFETY: kill(2) takes no pointers; pid -1 as PID 1 reaches every
    // process except the init itself.
    let rc = unsafe { libc::kill(-1, signal) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        // ESRCH: there was no process to signal.
        if err.raw_os_error() != Some(libc::ESRCH) {
            console::warn(&format!("failed to send signal {signal} to all: {err}"));
        }
    }
}

/// Reaps children until none is left or `grace` has passed. Returns `true`
/// when none is left.
fn wait_for_children(grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        match reaper::reap_exited() {
            Ok(true) => return true,
            Ok(false) => {}
            Err(err) => {
                console::warn(&console::chain(&err));
                return false;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}
