//! One vsock stream connection between a guest port and a host Unix socket:
//! the state machine and credit-based flow control.
//!
//! Credit, in both directions (virtio spec 5.10.6.3): each side tells the
//! other its receive buffer size (`buf_alloc`) and how many bytes it has
//! consumed (`fwd_cnt`); a sender may have at most `buf_alloc - (sent -
//! fwd_cnt)` bytes in flight. We enforce ours on the guest (a guest that
//! overruns it is reset) and honour the guest's.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::packet::MAX_PKT_DATA;

/// Our receive buffer per connection: the most guest bytes we hold for a
/// slow host reader. Bounds the VMM's memory per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about freed buffer space once this much was forwarded
/// since the last update.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent to the guest, waiting for RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// The guest broke the stream protocol on this connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// More data than our advertised buffer allows.
    #[error(
        "guest overran its credit ({held} bytes buffered + {incoming} incoming > {BUF_ALLOC})"
    )]
    CreditOverrun {
        /// Bytes already buffered.
        held: usize,
        /// Bytes in the packet.
        incoming: usize,
    },
    /// Data after the guest said it would send no more.
    #[error("guest sent data after shutting down its send side")]
    DataAfterShutdown,
}

/// What reading the host side gave.
#[derive(Debug, PartialEq, Eq)]
pub enum HostRead {
    /// Bytes for the guest.
    Data(Vec<u8>),
    /// Nothing now.
    WouldBlock,
    /// The host closed its side (or it failed).
    Eof,
}

/// A connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// The host-side port (the hybrid socket's number, or one we allocated).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Lifecycle state.
    pub state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Guest bytes written to the host stream.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest bytes the host stream has not taken yet (at most `BUF_ALLOC`).
    pending: Vec<u8>,
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    host_eof: bool,
    host_write_shut: bool,
}

impl Connection {
    /// A connection over `stream`, which the caller has made non-blocking
    /// (the event loop must never wait on a host socket).
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: State) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            pending: Vec::new(),
            peer_shut_send: false,
            peer_shut_rcv: false,
            host_eof: false,
            host_write_shut: false,
        }
    }

    /// The host stream (for epoll and the CONNECT handshake).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives the host stream back (to be closed once the event loop has
    /// stopped watching it).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Records the guest's credit from any packet header it sent.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Our `fwd_cnt`, for the headers we send.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }

    /// Notes that a header carrying our current `fwd_cnt` went to the guest.
    pub fn credit_sent(&mut self) {
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Whether the guest should hear about freed space now.
    pub fn wants_credit_update(&self) -> bool {
        // The guest's idea of our free space lags ours by at most the
        // threshold, so it always sees at least 3/4 of the buffer free once
        // the host has drained it: it never stalls on stale credit.
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Data from the guest: write what the host takes now, keep the rest.
    pub fn on_guest_data(&mut self, data: &[u8]) -> Result<(), Violation> {
        if self.peer_shut_send {
            return Err(Violation::DataAfterShutdown);
        }
        if self.pending.len() + data.len() > BUF_ALLOC as usize {
            return Err(Violation::CreditOverrun {
                held: self.pending.len(),
                incoming: data.len(),
            });
        }
        if self.host_eof && self.host_write_shut {
            // The host is gone; the bytes are dropped, but credit must move.
            self.fwd_cnt = self
                .fwd_cnt
                .wrapping_add(u32::try_from(data.len()).unwrap_or(0));
            return Ok(());
        }
        self.pending.extend_from_slice(data);
        self.flush();
        Ok(())
    }

    /// Writes buffered guest bytes to the host; on a broken host stream the
    /// bytes are counted as consumed (the guest learns via SHUTDOWN).
    pub fn flush(&mut self) {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(u32::try_from(n).unwrap_or(0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    let n = self.pending.len();
                    self.pending.clear();
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(u32::try_from(n).unwrap_or(0));
                    self.host_eof = true;
                }
            }
        }
        if self.pending.is_empty() && self.peer_shut_send && !self.host_write_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
    }

    /// Whether guest bytes wait for the host to read.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The guest's SHUTDOWN flags.
    pub fn on_guest_shutdown(&mut self, send: bool, rcv: bool) {
        self.peer_shut_send |= send;
        self.peer_shut_rcv |= rcv;
        self.flush();
    }

    /// Whether we should read the host side for the guest.
    pub fn wants_host_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.peer_shut_rcv
            && self.peer_credit() > 0
    }

    /// Reads up to `max` bytes (and the guest's credit) from the host.
    pub fn read_host(&mut self, max: usize) -> HostRead {
        let n = max
            .min(MAX_PKT_DATA)
            .min(usize::try_from(self.peer_credit()).unwrap_or(0));
        if n == 0 {
            return HostRead::WouldBlock;
        }
        let mut buf = vec![0u8; n];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.host_eof = true;
                    return HostRead::Eof;
                }
                Ok(got) => {
                    buf.truncate(got);
                    self.tx_cnt = self.tx_cnt.wrapping_add(u32::try_from(got).unwrap_or(0));
                    return HostRead::Data(buf);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HostRead::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.host_eof = true;
                    return HostRead::Eof;
                }
            }
        }
    }

    /// Whether both directions are finished and nothing is left to deliver:
    /// the connection can be reset and forgotten.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty() && self.peer_shut_send && (self.peer_shut_rcv || self.host_eof)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("non-blocking");
        (Connection::new(a, 1024, 5000, State::Established), b)
    }

    #[test]
    fn guest_data_reaches_the_host_and_frees_credit() {
        let (mut c, mut host) = pair();
        c.on_guest_data(b"hello").expect("data");
        let mut buf = [0u8; 5];
        host.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"hello");
        assert_eq!(c.fwd_cnt(), 5);
        assert!(!c.wants_credit_update(), "5 bytes are not worth a packet");
        let chunk = vec![0u8; 16 * 1024];
        let mut sink = vec![0u8; chunk.len()];
        for _ in 0..4 {
            c.on_guest_data(&chunk).expect("data");
            host.read_exact(&mut sink).expect("read");
        }
        assert!(c.wants_credit_update(), "64 KiB forwarded: tell the guest");
        c.credit_sent();
        assert!(!c.wants_credit_update());
    }

    #[test]
    fn slow_host_is_buffered_up_to_buf_alloc_then_the_guest_is_refused() {
        let (mut c, _host) = pair();
        // Nobody reads: the socket buffer fills, the rest is pending.
        let chunk = vec![7u8; MAX_PKT_DATA];
        let mut sent = 0usize;
        let err = loop {
            match c.on_guest_data(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) => break e,
            }
            assert!(sent < 64 << 20, "never refused");
        };
        assert!(matches!(err, Violation::CreditOverrun { .. }), "{err}");
        assert!(c.pending.len() <= BUF_ALLOC as usize);
    }

    #[test]
    fn host_reads_respect_the_guests_credit() {
        let (mut c, mut host) = pair();
        host.write_all(&[1u8; 1000]).expect("write");
        assert_eq!(c.read_host(4096), HostRead::WouldBlock, "no credit yet");
        c.update_peer_credit(100, 0);
        assert_eq!(c.read_host(4096), HostRead::Data(vec![1u8; 100]));
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.wants_host_read());
        c.update_peer_credit(100, 100);
        assert_eq!(c.read_host(40), HostRead::Data(vec![1u8; 40]));
    }

    #[test]
    fn host_close_is_eof_and_shutdown_completes_the_connection() {
        let (mut c, host) = pair();
        c.update_peer_credit(4096, 0);
        drop(host);
        assert_eq!(c.read_host(100), HostRead::Eof);
        assert!(!c.is_done());
        c.on_guest_shutdown(true, false);
        assert!(c.is_done());
    }

    #[test]
    fn data_after_guest_shutdown_is_a_violation_and_write_side_closes_after_flush() {
        let (mut c, mut host) = pair();
        c.on_guest_data(b"last words").expect("data");
        c.on_guest_shutdown(true, false);
        assert_eq!(c.on_guest_data(b"more"), Err(Violation::DataAfterShutdown));
        let mut got = Vec::new();
        host.read_to_end(&mut got)
            .expect("host sees EOF after the data");
        assert_eq!(got, b"last words");
    }
}
