//! The tcg engine's guest console, capped. QEMU would write the serial
//! console to a file without bound, so a guest printing forever could fill
//! the host's disk; instead QEMU writes to a FIFO (`-chardev pipe`) and a
//! thread here copies at most [`CONSOLE_CAP`] bytes of it to the console
//! log, then reads and drops the rest, as airlock-vmm does with its own
//! serial device. The guest never blocks on a full pipe.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Most console bytes kept per run (the same cap as airlock-vmm's).
pub const CONSOLE_CAP: u64 = 16 << 20;
/// How often the pump looks at its stop flag while the pipe is quiet.
const POLL_MS: libc::c_int = 50;

/// Copies a FIFO to a file, capped, on its own thread until finished.
#[derive(Debug)]
pub struct ConsolePump {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Creates the FIFO `path` (mode 0600).
pub fn mkfifo(path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl ConsolePump {
    /// Opens `fifo` (read-write, so that it never reads end-of-file before
    /// QEMU opens it, and never blocks) and `log` (created or truncated),
    /// and starts copying.
    pub fn start(fifo: &Path, log: &Path, cap: u64) -> io::Result<ConsolePump> {
        let pipe = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(fifo)?;
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(log)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let log = log.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || pump(pipe, out, cap, &flag, &log))?;
        Ok(ConsolePump {
            stop,
            thread: Some(thread),
        })
    }

    /// Copies what is still in the pipe, then stops.
    pub fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ConsolePump {
    fn drop(&mut self) {
        self.finish();
    }
}

fn pump(mut pipe: File, mut out: File, cap: u64, stop: &AtomicBool, log: &Path) {
    let mut kept = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut said = false;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let mut fds = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, which outlives the call.
        let ready = unsafe { libc::poll(&mut fds, 1, if stopping { 0 } else { POLL_MS }) };
        if ready <= 0 {
            if stopping {
                return;
            }
            continue;
        }
        // Drain what is there.
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let room = usize::try_from(cap.saturating_sub(kept)).unwrap_or(usize::MAX);
                    let take = n.min(room);
                    if take > 0 && out.write_all(&buf[..take]).is_ok() {
                        kept += take as u64;
                    }
                    if take < n && !said {
                        said = true;
                        let _ = writeln!(
                            out,
                            "\n[airlock: console cut at {cap} bytes; the rest is dropped]"
                        );
                        eprintln!(
                            "airlock: warning: the guest console passed {cap} bytes; the rest \
                             is dropped ({})",
                            log.display()
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_is_copied_up_to_the_cap_and_the_rest_dropped() {
        let dir = crate::paths::TestDir::new("console-pump");
        let fifo = dir.path().join("console.out");
        let log = dir.path().join("console.log");
        mkfifo(&fifo).expect("mkfifo");
        let mut pump = ConsolePump::start(&fifo, &log, 1000).expect("start");
        let mut writer = OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open the fifo");
        for _ in 0..50 {
            writer.write_all(&[b'x'; 100]).expect("write");
        }
        // More than a pipe buffer: the pump keeps reading, the writer never
        // blocks for good.
        writer.write_all(&vec![b'y'; 256 * 1024]).expect("write");
        drop(writer);
        std::thread::sleep(std::time::Duration::from_millis(200));
        pump.finish();
        let text = std::fs::read_to_string(&log).expect("read");
        assert!(text.starts_with(&"x".repeat(1000)), "{}", text.len());
        assert!(!text.contains("yy"));
        assert!(text.contains("console cut at 1000 bytes"));
        assert!(text.len() < 1100, "{}", text.len());
    }
}
