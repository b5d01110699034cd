//! The host end of the control port: a listener on
//! `<vsock_uds>_<CONTROL_PORT>` (where a guest connection to that port
//! arrives, whatever the engine), served by one thread. The first connection
//! is the control session; every later one is accepted only to be closed at
//! once (the guest gets one control session per boot), and after
//! [`MAX_CONNECTIONS`] the thread stops accepting altogether, so a guest
//! that floods the port costs us a bounded amount of work.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Most connections accepted on the control port in one run (the session
/// included); later ones are not even accepted.
pub const MAX_CONNECTIONS: u32 = 64;
/// How often the accept thread looks for a connection or a stop request.
const POLL: Duration = Duration::from_millis(10);

/// What the accept thread reports.
#[derive(Debug)]
pub enum Accepted {
    /// The first connection: the control session (a blocking stream).
    Session(UnixStream),
    /// A later connection, closed at once; the number of such so far.
    Refused(u32),
    /// [`MAX_CONNECTIONS`] reached: the listener is closed.
    Capped,
    /// `accept` failed for good; the listener is closed.
    Failed(io::Error),
}

/// The accept thread. Dropping it stops the thread and closes the listener.
#[derive(Debug)]
pub struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Serves `listener` from a new thread, reporting to `report`.
    pub fn start(
        listener: UnixListener,
        report: impl FnMut(Accepted) + Send + 'static,
    ) -> io::Result<Acceptor> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new()
            .name("control-accept".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || accept_loop(listener, &stop, report)
            })?;
        Ok(Acceptor {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // The loop checks the flag every POLL; a panic there is not ours to handle.
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: UnixListener, stop: &AtomicBool, mut report: impl FnMut(Accepted)) {
    let mut accepted = 0u32;
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                accepted += 1;
                if accepted == 1 {
                    match stream.set_nonblocking(false) {
                        Ok(()) => report(Accepted::Session(stream)),
                        Err(e) => {
                            report(Accepted::Failed(e));
                            return;
                        }
                    }
                } else {
                    drop(stream);
                    report(Accepted::Refused(accepted - 1));
                }
                if accepted >= MAX_CONNECTIONS {
                    // Closed before it is reported: whoever hears of the
                    // cap finds the socket refusing connections.
                    drop(listener);
                    report(Accepted::Capped);
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                report(Accepted::Failed(e));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::TestDir;
    use std::io::Read;
    use std::sync::mpsc;
    use std::time::Instant;

    #[test]
    fn first_connection_is_the_session_the_rest_are_refused_then_capped() {
        let dir = TestDir::new("accept");
        let path = dir.path().join("vsock_1024");
        let listener = UnixListener::bind(&path).expect("bind");
        let (tx, rx) = mpsc::channel();
        let acceptor = Acceptor::start(listener, move |a| {
            let _ = tx.send(a);
        })
        .expect("start");
        let recv = || rx.recv_timeout(Duration::from_secs(10)).expect("event");

        let _session_peer = UnixStream::connect(&path).expect("connect");
        let Accepted::Session(session) = recv() else {
            panic!("not a session")
        };
        // Handed over in blocking mode, whatever the listener's mode.
        // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
        let flags =
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&session), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);

        let mut buf = [0u8; 1];
        let mut peers = Vec::new();
        for n in 1..MAX_CONNECTIONS {
            let mut peer = UnixStream::connect(&path).expect("connect");
            let Accepted::Refused(count) = recv() else {
                panic!("not refused")
            };
            assert_eq!(count, n);
            // Closed by the host: the peer reads end-of-file.
            assert_eq!(peer.read(&mut buf).expect("read"), 0);
            peers.push(peer);
        }
        assert!(matches!(recv(), Accepted::Capped));
        // The listener is gone: no more connections.
        let start = Instant::now();
        assert!(UnixStream::connect(&path).is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(acceptor);
    }

    #[test]
    fn dropping_the_acceptor_stops_it() {
        let dir = TestDir::new("accept-stop");
        let path = dir.path().join("vsock_1024");
        let listener = UnixListener::bind(&path).expect("bind");
        let acceptor = Acceptor::start(listener, |_| {}).expect("start");
        let start = Instant::now();
        drop(acceptor);
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(UnixStream::connect(&path).is_err());
    }
}
