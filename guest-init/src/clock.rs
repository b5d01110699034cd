//! The guest's wall clock. The VM boots with no trustworthy real-time clock
//! (no RTC driver; on the tcg engine it reads 1970), so the host passes its
//! own time on the kernel command line (`airlock.epoch=SECS`) and the init
//! sets the clock from it, forward only: a clock already past that time
//! (kvm-clock) is left alone.

use std::io;

/// Sets `CLOCK_REALTIME` to `epoch` seconds if it reads earlier than that.
/// Returns whether it was set.
pub fn set_if_behind(epoch: i64) -> io::Result<bool> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if now.tv_sec >= epoch {
        return Ok(false);
    }
    let to = libc::timespec {
        tv_sec: epoch,
        tv_nsec: 0,
    };
    // SAFETY: `to` is a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &to) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_already_ahead_is_left_alone() {
        // Any test machine's clock is past 2001; setting it would need
        // CAP_SYS_TIME and must not happen.
        assert!(!set_if_behind(1_000_000_000).expect("read the clock"));
    }
}
