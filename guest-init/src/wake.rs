//! The snapshot point, and waking from it (`airlock.snapshot=1`).
//!
//! The init writes the boot timer's snapshot mark once it is ready and
//! before it has talked to the host. A VMM asked for a snapshot stops the
//! guest inside that write and saves it; every sandbox woken from the
//! snapshot returns from the write with the same memory: the same clock
//! (stopped at the snapshot), the same random pool, the same everything.
//! So the first thing a woken init does is ask the host who it is now
//! ([`airlock_protocol::WAKE_PORT`], one [`Wake`]) and make itself that:
//!
//! - **the clock**: set to the host's time (the kernel's monotonic clock
//!   just goes on from the snapshot; the wall clock jumps to now);
//! - **randomness**: the host's 32 fresh bytes are added to the kernel's
//!   pool, credited (`RNDADDENTROPY`), and the kernel's CRNG is reseeded at
//!   once (`RNDRESEEDCRNG`), so `/dev/urandom`, `getrandom` and everything
//!   seeded from them after this point differ between siblings;
//! - **identity**: the sandbox id is written to `/run/airlock/sandbox-id`.
//!
//! What the init derived before the snapshot point and keeps: nothing
//! secret. It reads no key and opens no connection before the mark; the
//! hash-map seeds of its own standard library (not a secret, only
//! collision resistance) are what siblings share of it. The processes it
//! starts before the mark are the container engine's own: the warm-up
//! container (gone before the mark), or for a live sandbox the agent's
//! container, started with the keeper's `pause` and nothing of a run
//! ([`crate::prepared`] says what siblings share of it). The agent, every
//! exec and every connection to the host come after the wake.

use std::fs;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use airlock_protocol::wake::{Wake, SIZE};
use airlock_protocol::WAKE_PORT;

use crate::vsock::VsockStream;

/// The host's CID.
const HOST_CID: u32 = 2;
/// How long the host has to be there and answer.
const PATIENCE: Duration = Duration::from_secs(30);
/// `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Why the wake failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mark(#[from] crate::boottimer::Error),
    #[error("wake: cannot reach the host: {0}")]
    Connect(#[source] io::Error),
    #[error("wake: no answer from the host: {0}")]
    Read(#[source] io::Error),
    #[error("wake: the host's answer is not a wake message")]
    Malformed,
    #[error("wake: cannot set the clock: {0}")]
    Clock(#[source] io::Error),
    #[error("wake: cannot reseed the random pool: {0}")]
    Random(#[source] io::Error),
}

/// Stops at the snapshot point, then (woken, or on a VMM that took no
/// snapshot) takes the host's wake message and applies it.
pub fn snapshot_point() -> Result<(), Error> {
    crate::boottimer::snapshot_mark()?;
    let wake = receive()?;
    apply(&wake)?;
    crate::console::debug("woken: clock set, random pool reseeded");
    Ok(())
}

fn receive() -> Result<Wake, Error> {
    let start = Instant::now();
    let mut stream = loop {
        match VsockStream::connect(HOST_CID, WAKE_PORT) {
            Ok(stream) => break stream,
            Err(e) if start.elapsed() < PATIENCE => {
                crate::console::debug(&format!("wake: connect: {e}; retrying"));
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::Connect(e)),
        }
    };
    stream
        .set_read_timeout(Some(PATIENCE))
        .map_err(Error::Read)?;
    let mut bytes = [0u8; SIZE];
    stream.read_exact(&mut bytes).map_err(Error::Read)?;
    Wake::decode(&bytes).ok_or(Error::Malformed)
}

fn apply(wake: &Wake) -> Result<(), Error> {
    let now = libc::timespec {
        tv_sec: libc::time_t::try_from(wake.unix_secs).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(i32::try_from(wake.nanos).unwrap_or(0)),
    };
    // SAFETY: `now` is a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) } != 0 {
        return Err(Error::Clock(io::Error::last_os_error()));
    }
    reseed(&wake.entropy).map_err(Error::Random)?;
    let id: String = wake.sandbox_id.iter().map(|b| format!("{b:02x}")).collect();
    let _ = fs::create_dir_all("/run/airlock");
    if let Err(e) = fs::write("/run/airlock/sandbox-id", format!("{id}\n")) {
        crate::console::debug(&format!("wake: cannot write the sandbox id: {e}"));
    }
    Ok(())
}

/// `struct rand_pool_info` with a 32-byte buffer.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; 32],
}

fn reseed(entropy: &[u8; 32]) -> io::Result<()> {
    let urandom = fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    let info = PoolInfo {
        entropy_count: 256,
        buf_size: 32,
        buf: *entropy,
    };
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes
    // follow its header; `info` is that, alive across the call.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, &info) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
