//! The loopback TCP server: one accepting thread, a thread per
//! connection, bounded in number and in time.

use std::io::{self, Read};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::console;

use super::*;

/// Serves `listener` on a thread of its own, for ever (the VM's end stops
/// it), reporting its own answers to `reporter` if any.
/// `max_body` is the host's request body limit (at most [`MAX_BODY`];
/// `None`: [`MAX_BODY`]).
pub fn spawn_server<R: Relay>(
    listener: TcpListener,
    relay: R,
    reporter: Option<Reporter>,
    max_body: Option<u64>,
) -> Result<(), Error> {
    let limits = Limits {
        body: max_body.map_or(MAX_BODY, |b| b.clamp(1, MAX_BODY)),
        ..Limits::DEFAULT
    };
    spawn_server_with(listener, relay, limits, reporter)
}

/// The server's limits that tests make smaller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most connections at once.
    pub(crate) connections: usize,
    /// Longest time to read one request.
    pub(crate) request_deadline: Duration,
    /// Largest request body.
    pub(crate) body: u64,
}

impl Limits {
    pub(crate) const DEFAULT: Self = Self {
        connections: MAX_CONNECTIONS,
        request_deadline: REQUEST_DEADLINE,
        body: MAX_BODY,
    };
}

pub(crate) fn spawn_server_with<R: Relay>(
    listener: TcpListener,
    relay: R,
    limits: Limits,
    reporter: Option<Reporter>,
) -> Result<(), Error> {
    let relay = Arc::new(relay);
    thread::Builder::new()
        .name("model-accept".into())
        .spawn(move || accept_loop(&listener, &relay, limits, reporter.as_ref()))
        .map_err(Error::Thread)?;
    Ok(())
}

/// Decrements the live-connection count when a connection thread ends.
pub(crate) struct Slot(pub(crate) Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) fn accept_loop<R: Relay>(
    listener: &TcpListener,
    relay: &Arc<R>,
    limits: Limits,
    reporter: Option<&Reporter>,
) {
    let max = limits.connections;
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(err) => {
                // EMFILE and the like: wait for connections to end.
                console::debug(&format!("model endpoint: accept: {err}"));
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if live.fetch_add(1, Ordering::SeqCst) >= max {
            live.fetch_sub(1, Ordering::SeqCst);
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            let refusal = Refusal::new(
                429,
                "rate_limit_error",
                format!("the sandbox's model endpoint serves at most {max} requests at once"),
            )
            .retryable();
            let _ = write_refusal(&mut conn, &refusal);
            let _ = conn.shutdown(Shutdown::Write);
            if let Some(reporter) = reporter {
                reporter.refused(None, refusal.status, &refusal.message);
            }
            continue;
        }
        let slot = Slot(Arc::clone(&live));
        let relay = Arc::clone(relay);
        let reporter = reporter.cloned();
        let spawned = thread::Builder::new()
            .name("model-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(conn, &*relay, limits, reporter.as_ref());
            });
        if let Err(err) = spawned {
            // The closure (and so the slot and the connection) was dropped.
            console::warn(&format!("model endpoint: cannot start a thread: {err}"));
        }
    }
}

pub(crate) fn serve_connection<R: Relay>(
    conn: TcpStream,
    relay: &R,
    limits: Limits,
    reporter: Option<&Reporter>,
) {
    if conn.set_write_timeout(Some(CLIENT_TIMEOUT)).is_err() {
        return;
    }
    let reader = Deadlined {
        conn: &conn,
        deadline: Instant::now() + limits.request_deadline,
    };
    let done = handle(reader, &conn, relay, limits.body);
    console::debug(&format!("model endpoint: {done}"));
    if let (Some(reporter), Done::Refused(request, status, reason)) = (reporter, &done) {
        reporter.refused(request.as_deref(), *status, reason);
    }
    // Lingering close: the answer is out; read what the agent still sends
    // (bounded in bytes and time) until it closes, so that closing does not
    // reset the connection under an answer still in flight.
    let _ = conn.shutdown(Shutdown::Write);
    let mut drain = Deadlined {
        conn: &conn,
        deadline: Instant::now() + LINGER,
    };
    let _ = io::copy(&mut (&mut drain).take(LINGER_BYTES), &mut io::sink());
}

/// Reads from the agent's connection until a deadline, each read also
/// bounded by [`CLIENT_TIMEOUT`]: a client that trickles bytes cannot hold
/// a connection slot for longer than the deadline.
pub(crate) struct Deadlined<'a> {
    pub(crate) conn: &'a TcpStream,
    pub(crate) deadline: Instant,
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.conn.set_read_timeout(Some(left.min(CLIENT_TIMEOUT)))?;
        let mut conn = self.conn;
        conn.read(buf)
    }
}
