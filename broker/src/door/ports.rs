//! The port server: every vsock port the guest connects to (control 1024,
//! workspace 1025, results 1026, model 1027) is a Unix socket
//! `<vsock_uds>_<port>` that one thread serves, whatever the engine. It
//! applies each port's admission rule, writes the same audit records for
//! every port (`control.accepted`, `control.refused`, `control.capped`,
//! `control.failed`, each with its `port`), and hands each admitted
//! connection to its port's handler, which must return quickly (it hands
//! the stream to a thread of its own).
//!
//! Admission ([`Admit`]): a port that serves **one** connection per boot
//! (control, workspace, results) takes the first and closes every later one
//! unread; a port that serves **each** connection (model) takes them while
//! its handler has room (the rest wait in the socket's backlog, so a flood
//! costs the host nothing). Either way, after its cap of connections the
//! port is closed: a guest that floods a port costs a bounded amount of
//! work. Dropping the [`PortServer`] stops it, closes every listener and
//! drops the handlers (a handler that holds a thread joins it then).

use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::audit::records::{PortAccepted, PortCapped, PortFailed, PortRefused};
use crate::audit::{AuditLog, Durability};

/// Most connections a port that serves one takes in one run (that one
/// included); after them the port is closed.
pub const MAX_CONNECTIONS: u64 = 64;
/// How long the server waits for a connection before it looks at its stop
/// flag and at the ports that had no room, in milliseconds.
const POLL_MS: libc::c_int = 10;

/// How a port admits connections.
pub enum Admit {
    /// The first connection only; later ones are closed unread
    /// (`control.refused`), and after [`MAX_CONNECTIONS`] the port is
    /// closed (`control.capped`).
    One,
    /// Every connection while `room()` says the handler has room for one
    /// more (otherwise it waits in the backlog), at most `max` in all
    /// (then `control.capped`). Each is handed over as it comes, and not
    /// recorded as `control.accepted`: the handler records what each
    /// connection does (`model.call`, `model.denied`).
    Each {
        max: u64,
        room: Box<dyn Fn() -> bool + Send>,
    },
}

/// What a port's handler hears.
#[derive(Debug)]
pub enum Accepted {
    /// An admitted connection (a blocking stream).
    Stream(UnixStream),
    /// A later connection to a port that serves one, closed at once; the
    /// number of such so far.
    Refused(u32),
    /// The port's cap was reached: its listener is closed.
    Capped(u64),
    /// `accept` failed for good; the listener is closed.
    Failed(io::Error),
}

/// One port: its number, its listener, its rule and its handler.
pub struct Port {
    pub number: u32,
    pub listener: UnixListener,
    pub admit: Admit,
    pub handler: Box<dyn FnMut(Accepted) + Send>,
}

impl Port {
    /// A port that serves one connection per boot.
    pub fn one(
        number: u32,
        listener: UnixListener,
        handler: impl FnMut(Accepted) + Send + 'static,
    ) -> Port {
        Port {
            number,
            listener,
            admit: Admit::One,
            handler: Box::new(handler),
        }
    }
}

impl Port {
    /// A port that serves each connection on a thread of its own (named
    /// `name-N`) with `serve`, at most `concurrent` at once (the rest wait
    /// in the backlog), at most `max` in all; the stream is shut down when
    /// `serve` returns. The [`Live`] holds the connections in progress.
    pub fn each_on_thread(
        number: u32,
        listener: UnixListener,
        max: u64,
        concurrent: usize,
        name: &'static str,
        serve: impl Fn(u64, &UnixStream) + Send + Sync + 'static,
    ) -> (Port, Arc<Live>) {
        let live = Arc::new(Live::default());
        let serve = Arc::new(serve);
        let room = {
            let live = Arc::clone(&live);
            move || live.lock().len() < concurrent
        };
        let mut accepted = 0u64;
        let handler = {
            let live = Arc::clone(&live);
            move |event: Accepted| {
                let Accepted::Stream(stream) = event else {
                    return;
                };
                accepted += 1;
                let id = accepted;
                match stream.try_clone() {
                    Ok(handle) => live.lock().push((id, handle)),
                    Err(_) => return,
                }
                let spawned = thread::Builder::new().name(format!("{name}-{id}")).spawn({
                    let (serve, live) = (Arc::clone(&serve), Arc::clone(&live));
                    move || {
                        serve(id, &stream);
                        let _ = stream.shutdown(Shutdown::Both);
                        live.remove(id);
                    }
                });
                if spawned.is_err() {
                    live.remove(id);
                }
            }
        };
        let port = Port {
            number,
            listener,
            admit: Admit::Each {
                max,
                room: Box::new(room),
            },
            handler: Box::new(handler),
        };
        (port, live)
    }
}

/// The connections in progress on a port served by
/// [`Port::each_on_thread`], to wait for and to shut down.
#[derive(Debug, Default)]
pub struct Live {
    streams: Mutex<Vec<(u64, UnixStream)>>,
    changed: Condvar,
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, Vec<(u64, UnixStream)>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|(i, _)| *i != id);
        self.changed.notify_all();
    }

    /// Waits until no connection is in progress or `deadline` passes;
    /// returns how many are still in progress.
    pub fn wait(&self, deadline: Instant) -> usize {
        let mut live = self.lock();
        while !live.is_empty() && Instant::now() < deadline {
            live = self
                .changed
                .wait_timeout(live, Duration::from_millis(20))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        live.len()
    }

    /// Shuts down every connection in progress; returns how many.
    pub fn shut_down(&self) -> usize {
        let live = self.lock();
        for (_, stream) in live.iter() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        live.len()
    }
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("number", &self.number)
            .finish()
    }
}

/// The thread that serves the ports. Dropping it stops the thread, closes
/// every listener and drops the handlers.
#[derive(Debug)]
pub struct PortServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PortServer {
    /// Serves `ports` from a new thread, recording in `audit`.
    pub fn start(ports: Vec<Port>, audit: &AuditLog) -> io::Result<PortServer> {
        for port in &ports {
            port.listener.set_nonblocking(true)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::Builder::new().name("ports".into()).spawn({
            let (stop, audit) = (Arc::clone(&stop), audit.clone());
            move || serve(ports, &stop, &audit)
        })?;
        Ok(PortServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for PortServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // The loop looks at the flag every POLL_MS; a panic there is
            // not ours to handle.
            let _ = thread.join();
        }
    }
}

/// A port being served, and what it has taken so far. Its listener is
/// closed (`None`) before a cap or a failure is reported: whoever hears of
/// it finds the socket refusing connections. Its handler lives until the
/// server stops.
struct Served {
    number: u32,
    listener: Option<UnixListener>,
    admit: Admit,
    handler: Box<dyn FnMut(Accepted) + Send>,
    accepted: u64,
}

fn serve(ports: Vec<Port>, stop: &AtomicBool, audit: &AuditLog) {
    let mut open: Vec<Served> = ports
        .into_iter()
        .map(|port| Served {
            number: port.number,
            listener: Some(port.listener),
            admit: port.admit,
            handler: port.handler,
            accepted: 0,
        })
        .collect();
    while !stop.load(Ordering::SeqCst) {
        // The ports with room to take a connection.
        let ready: Vec<(usize, libc::c_int)> = (0..open.len())
            .filter(|&i| match &open[i].admit {
                Admit::One => true,
                Admit::Each { room, .. } => room(),
            })
            .filter_map(|i| Some((i, open[i].listener.as_ref()?.as_raw_fd())))
            .collect();
        let mut fds: Vec<libc::pollfd> = ready
            .iter()
            .map(|&(_, fd)| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
        // SAFETY: `fds` is a valid array of `nfds` pollfd structs that
        // lives across the call; the descriptors belong to listeners we own.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), nfds, POLL_MS) };
        if n <= 0 {
            // Nothing came (or EINTR): look at the flag and the rooms again.
            continue;
        }
        for (slot, &(i, _)) in ready.iter().enumerate() {
            if fds[slot].revents != 0 {
                take(&mut open[i], audit);
            }
        }
        // A closed port's handler stays until the server stops: dropping
        // it may wait for its stream (a file port's thread), which must
        // not hold up the other ports.
    }
}

/// Takes one connection on `served` if there is one, and closes the port
/// when it reaches its cap or its listener fails.
fn take(served: &mut Served, audit: &AuditLog) {
    let number = served.number;
    let Some(listener) = &served.listener else {
        return;
    };
    let stream = match listener.accept() {
        Ok((stream, _)) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock
                    | io::ErrorKind::Interrupted
                    | io::ErrorKind::ConnectionAborted
            ) =>
        {
            return
        }
        Err(e) => return fail(served, e, audit),
    };
    served.accepted += 1;
    let (admitted, cap) = match &served.admit {
        Admit::One => (served.accepted == 1, MAX_CONNECTIONS),
        Admit::Each { max, .. } => (true, *max),
    };
    if admitted {
        // Handed over blocking, whatever the listener's mode.
        if let Err(e) = stream.set_nonblocking(false) {
            return fail(served, e, audit);
        }
        if matches!(served.admit, Admit::One) {
            audit.record(&PortAccepted { port: number }, Durability::Synced);
        }
        (served.handler)(Accepted::Stream(stream));
    } else {
        drop(stream);
        let count = u32::try_from(served.accepted - 1).unwrap_or(u32::MAX);
        audit.record(
            &PortRefused {
                port: number,
                count,
            },
            Durability::Synced,
        );
        (served.handler)(Accepted::Refused(count));
    }
    if served.accepted >= cap {
        served.listener = None;
        audit.record(
            &PortCapped {
                port: number,
                max: cap,
            },
            Durability::Synced,
        );
        (served.handler)(Accepted::Capped(cap));
    }
}

/// The port's listener failed: closed, recorded, and told.
fn fail(served: &mut Served, e: io::Error, audit: &AuditLog) {
    served.listener = None;
    audit.record(
        &PortFailed {
            port: served.number,
            error: e.to_string(),
        },
        Durability::Synced,
    );
    (served.handler)(Accepted::Failed(e));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::log::TEST_LIMITS;
    use crate::paths::TestDir;
    use std::io::Read;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn kinds(bytes: &[u8], kind: &str) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(bytes)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["kind"] == kind)
            .map(|r| r["fields"].clone())
            .collect()
    }

    #[test]
    fn a_port_that_serves_one_refuses_the_rest_then_closes() {
        let dir = TestDir::new("ports-one");
        let path = dir.path().join("vsock_1024");
        let (log, mem) = AuditLog::memory(TEST_LIMITS, None);
        let (tx, rx) = mpsc::channel();
        let port = Port::one(1024, UnixListener::bind(&path).expect("bind"), move |a| {
            let _ = tx.send(a);
        });
        let server = PortServer::start(vec![port], &log).expect("start");
        let recv = || rx.recv_timeout(Duration::from_secs(10)).expect("event");

        let _session_peer = UnixStream::connect(&path).expect("connect");
        let Accepted::Stream(session) = recv() else {
            panic!("not a stream")
        };
        // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
        let flags = unsafe { libc::fcntl(session.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "handed over blocking");

        let mut buf = [0u8; 1];
        let mut peers = Vec::new();
        for n in 1..MAX_CONNECTIONS {
            let mut peer = UnixStream::connect(&path).expect("connect");
            let Accepted::Refused(count) = recv() else {
                panic!("not refused")
            };
            assert_eq!(u64::from(count), n);
            // Closed by the host: the peer reads end-of-file.
            assert_eq!(peer.read(&mut buf).expect("read"), 0);
            peers.push(peer);
        }
        assert!(matches!(recv(), Accepted::Capped(MAX_CONNECTIONS)));
        // The listener is gone: no more connections.
        let start = Instant::now();
        assert!(UnixStream::connect(&path).is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(server);
        let bytes = mem.bytes();
        assert_eq!(
            kinds(&bytes, "control.accepted"),
            vec![serde_json::json!({ "port": 1024 })]
        );
        let refused = kinds(&bytes, "control.refused");
        assert_eq!(refused.len(), 63);
        assert_eq!(
            refused[62],
            serde_json::json!({ "port": 1024, "count": 63 })
        );
        assert_eq!(
            kinds(&bytes, "control.capped"),
            vec![serde_json::json!({ "port": 1024, "max": 64 })]
        );
    }

    /// A port that serves each connection takes them only while its handler
    /// has room: the rest wait, unrefused, and are taken when room comes.
    #[test]
    fn a_port_that_serves_each_waits_for_room_then_caps() {
        let dir = TestDir::new("ports-each");
        let path = dir.path().join("vsock_1027");
        let (log, mem) = AuditLog::memory(TEST_LIMITS, None);
        let room = Arc::new(AtomicUsize::new(1));
        let (tx, rx) = mpsc::channel();
        let port = Port {
            number: 1027,
            listener: UnixListener::bind(&path).expect("bind"),
            admit: Admit::Each {
                max: 3,
                room: Box::new({
                    let room = Arc::clone(&room);
                    move || room.load(Ordering::SeqCst) > 0
                }),
            },
            handler: Box::new({
                let room = Arc::clone(&room);
                move |a| {
                    if matches!(a, Accepted::Stream(_)) {
                        room.fetch_sub(1, Ordering::SeqCst);
                    }
                    let _ = tx.send(a);
                }
            }),
        };
        let server = PortServer::start(vec![port], &log).expect("start");
        let _a = UnixStream::connect(&path).expect("a");
        let _b = UnixStream::connect(&path).expect("b");
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Accepted::Stream(_))
        ));
        // No room: the second waits.
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        room.store(5, Ordering::SeqCst);
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Accepted::Stream(_))
        ));
        let _c = UnixStream::connect(&path).expect("c");
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Accepted::Stream(_))
        ));
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Accepted::Capped(3))
        ));
        assert!(UnixStream::connect(&path).is_err());
        drop(server);
        let bytes = mem.bytes();
        assert!(kinds(&bytes, "control.accepted").is_empty());
        assert_eq!(
            kinds(&bytes, "control.capped"),
            vec![serde_json::json!({ "port": 1027, "max": 3 })]
        );
    }

    #[test]
    fn several_ports_are_served_by_the_one_thread_and_dropping_stops_it() {
        let dir = TestDir::new("ports-many");
        let (log, _mem) = AuditLog::memory(TEST_LIMITS, None);
        let (tx, rx) = mpsc::channel();
        let ports: Vec<Port> = [1024u32, 1025, 1026]
            .into_iter()
            .map(|n| {
                let tx = tx.clone();
                let path = dir.path().join(format!("vsock_{n}"));
                Port::one(n, UnixListener::bind(path).expect("bind"), move |a| {
                    if let Accepted::Stream(_) = a {
                        let _ = tx.send(n);
                    }
                })
            })
            .collect();
        let server = PortServer::start(ports, &log).expect("start");
        let mut peers = Vec::new();
        for n in [1026u32, 1024, 1025] {
            peers.push(UnixStream::connect(dir.path().join(format!("vsock_{n}"))).expect("c"));
            assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(n));
        }
        let start = Instant::now();
        drop(server);
        assert!(start.elapsed() < Duration::from_secs(2));
        for n in [1024u32, 1025, 1026] {
            assert!(UnixStream::connect(dir.path().join(format!("vsock_{n}"))).is_err());
        }
    }
}
