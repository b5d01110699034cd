//! The hybrid-vsock backend (the Firecracker design): guest streams map onto
//! Unix domain sockets.
//!
//! - Guest connects to host port P: we connect to `<uds>_P`; nobody listening
//!   means the guest gets a reset.
//! - A host process connects to `<uds>` and writes `CONNECT <port>\n`: we
//!   open a stream to guest port `<port>`; once the guest accepts, the host
//!   reads `OK <local port>\n` and the socket carries the stream.
//!
//! Everything from the guest is checked here: addresses, types, operations,
//! credit. A bad packet resets that connection; it never stops the VMM.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::connection::{Connection, HostRead, State, BUF_ALLOC};
use super::packet::{
    Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Most simultaneous connections per VM (guest- and host-initiated).
pub const MAX_CONNECTIONS: usize = 64;
/// Most host clients waiting to send their `CONNECT` line.
const MAX_PENDING_CONNECTS: usize = 16;
/// Longest acceptable `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Most control packets (responses, resets, credit updates) queued for the
/// guest; beyond this a flooding guest's requests are dropped.
const MAX_CONTROL_QUEUE: usize = 1024;
/// First port we hand out for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

type Key = (u32, u32); // (local port, peer port)

/// Errors setting up the backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The `<uds>` path is taken.
    #[error("vsock socket {0} already exists (another VM using it, or a stale file: remove it)")]
    Exists(PathBuf),
    /// Binding the listener failed.
    #[error("cannot listen on vsock socket {0}")]
    Bind(PathBuf, #[source] io::Error),
}

/// What the event loop should watch for one fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
}

/// The backend state of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    conns: HashMap<Key, Connection>,
    /// Host clients that have not finished their `CONNECT` line, with the
    /// id they were given.
    connecting: HashMap<RawFd, (UnixStream, Vec<u8>, u64)>,
    /// Identity of each socket we hand to epoll (fd numbers get reused).
    ids: HashMap<RawFd, u64>,
    next_id: u64,
    control: VecDeque<Header>,
    next_local_port: u32,
    /// Sockets of forgotten connections and handshakes, kept open until the
    /// event loop has stopped watching them: closing a watched fd first
    /// would leave the loop's registration behind under a number the next
    /// socket reuses, and that socket would never be watched.
    retired: Vec<UnixStream>,
    /// Round-robin start for fairness between connections.
    rx_turn: usize,
    /// Packets refused since start (for the exit report).
    pub refused: u64,
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// Connects to a Unix socket without blocking (a full backlog is a refusal,
/// not a stall of the event loop).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own; OwnedFd closes it on every path.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = u32::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(0);
    // SAFETY: `addr` is a valid, initialised sockaddr_un and `len` its size.
    let rc = unsafe { libc::connect(owned.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

impl Muxer {
    /// Why a snapshot cannot be taken now: a connection open or being
    /// opened, or control packets not yet given to the guest.
    pub fn busy(&self) -> Option<String> {
        if !self.conns.is_empty() || !self.connecting.is_empty() {
            return Some(format!(
                "vsock has {} connection(s) open",
                self.conns.len() + self.connecting.len()
            ));
        }
        if !self.control.is_empty() {
            return Some("vsock has packets for the guest pending".into());
        }
        None
    }

    /// Listens on `uds` for host-initiated connections.
    pub fn new(guest_cid: u64, uds: PathBuf) -> Result<Self, Error> {
        if uds.exists() {
            return Err(Error::Exists(uds));
        }
        let listener = UnixListener::bind(&uds).map_err(|e| Error::Bind(uds.clone(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Bind(uds.clone(), e))?;
        Ok(Self {
            guest_cid,
            uds,
            listener,
            conns: HashMap::new(),
            connecting: HashMap::new(),
            ids: HashMap::new(),
            next_id: 1,
            control: VecDeque::new(),
            retired: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rx_turn: 0,
            refused: 0,
        })
    }

    /// Number of live connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn header(&self, local: u32, peer: u32, op: u16, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local,
            dst_port: peer,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn queue_control(&mut self, h: Header) {
        if self.control.len() < MAX_CONTROL_QUEUE {
            self.control.push_back(h);
        } else {
            self.refused += 1;
        }
    }

    fn reset(&mut self, local: u32, peer: u32) {
        self.refused += 1;
        let h = self.header(local, peer, OP_RST, 0);
        self.queue_control(h);
    }

    /// Handles one packet the guest sent on the TX queue.
    pub fn on_guest_packet(&mut self, h: &Header, data: &[u8]) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            // Spoofed source, another destination or a datagram: not for us.
            if h.op != OP_RST {
                self.reset(h.dst_port, h.src_port);
            }
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == OP_REQUEST {
            self.on_request(h);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.reset(key.0, key.1);
            }
            return;
        };
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        match h.op {
            OP_RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                let line = format!("OK {}\n", conn.local_port);
                // A fresh socket takes a few bytes; a client that went away
                // shows up as EOF on the next read.
                let _ = conn.stream().write_all(line.as_bytes());
            }
            OP_RW if conn.state == State::Established => {
                if conn.on_guest_data(data).is_err() {
                    self.forget(key);
                    self.reset(key.0, key.1);
                    return;
                }
            }
            OP_SHUTDOWN => {
                conn.on_guest_shutdown(h.flags & SHUTDOWN_SEND != 0, h.flags & SHUTDOWN_RCV != 0);
            }
            OP_RST => {
                self.forget(key);
                return;
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                let (local, peer, fwd) = (conn.local_port, conn.peer_port, conn.fwd_cnt());
                conn.credit_sent();
                let h = self.header(local, peer, OP_CREDIT_UPDATE, fwd);
                self.queue_control(h);
            }
            _ => {
                self.forget(key);
                self.reset(key.0, key.1);
                return;
            }
        }
        self.finish_if_done(key);
    }

    fn on_request(&mut self, h: &Header) {
        let key = (h.dst_port, h.src_port);
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.reset(key.0, key.1);
            return;
        }
        let path = PathBuf::from(format!("{}_{}", self.uds.display(), h.dst_port));
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let mut conn = Connection::new(stream, h.dst_port, h.src_port, State::Established);
                conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
                self.track(&conn);
                self.conns.insert(key, conn);
                let resp = self.header(key.0, key.1, OP_RESPONSE, 0);
                self.queue_control(resp);
            }
            Err(_) => self.reset(key.0, key.1),
        }
    }

    fn finish_if_done(&mut self, key: Key) {
        if self.conns.get(&key).is_some_and(Connection::is_done) {
            self.forget(key);
            let h = self.header(key.0, key.1, OP_RST, 0);
            self.queue_control(h);
        }
    }

    /// Drops a connection; its socket is retired, not closed yet.
    fn forget(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            self.retire(conn.into_stream());
        }
    }

    fn retire(&mut self, stream: UnixStream) {
        self.ids.remove(&stream.as_raw_fd());
        self.retired.push(stream);
    }

    /// Closes the sockets of forgotten connections. Call only after the
    /// event loop has been brought in line with [`Muxer::interests`], which
    /// no longer lists them.
    pub fn close_retired(&mut self) {
        self.retired.clear();
    }

    /// The next packet for the guest, with at most `capacity` payload bytes:
    /// control packets first, then host data round-robin over connections.
    pub fn next_rx(&mut self, capacity: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        let mut keys: Vec<Key> = self.conns.keys().copied().collect();
        keys.sort_unstable();
        if keys.is_empty() {
            return None;
        }
        let start = self.rx_turn % keys.len();
        keys.rotate_left(start);
        for key in keys {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if conn.wants_host_read() {
                match conn.read_host(capacity) {
                    HostRead::Data(data) => {
                        let fwd = conn.fwd_cnt();
                        conn.credit_sent();
                        self.rx_turn = self.rx_turn.wrapping_add(1);
                        return Some((self.header(key.0, key.1, OP_RW, fwd), data));
                    }
                    HostRead::WouldBlock => {}
                    HostRead::Eof => {
                        let fwd = conn.fwd_cnt();
                        let mut h = self.header(key.0, key.1, OP_SHUTDOWN, fwd);
                        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                        self.finish_if_done(key);
                        return Some((h, Vec::new()));
                    }
                }
            }
            if conn.wants_credit_update() {
                let fwd = conn.fwd_cnt();
                conn.credit_sent();
                self.rx_turn = self.rx_turn.wrapping_add(1);
                return Some((self.header(key.0, key.1, OP_CREDIT_UPDATE, fwd), Vec::new()));
            }
        }
        None
    }

    /// A host fd became writable: flush what the guest sent.
    pub fn on_host_writable(&mut self, fd: RawFd) {
        if let Some(key) = self.key_of(fd) {
            if let Some(c) = self.conns.get_mut(&key) {
                c.flush();
            }
            self.finish_if_done(key);
        }
    }

    fn key_of(&self, fd: RawFd) -> Option<Key> {
        self.conns
            .iter()
            .find(|(_, c)| c.stream().as_raw_fd() == fd)
            .map(|(k, _)| *k)
    }

    /// The listener is readable: take new host clients.
    pub fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            if self.connecting.len() >= MAX_PENDING_CONNECTS
                || stream.set_nonblocking(true).is_err()
            {
                continue; // dropped: the client sees EOF
            }
            let id = self.fresh_id();
            self.connecting
                .insert(stream.as_raw_fd(), (stream, Vec::new(), id));
        }
    }

    /// A host client in the `CONNECT` handshake sent bytes.
    pub fn on_connect_line(&mut self, fd: RawFd) {
        let Some((stream, line, _)) = self.connecting.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte: whatever follows the newline belongs to the stream.
        loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if line.len() < MAX_CONNECT_LINE => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    if let Some((stream, _, _)) = self.connecting.remove(&fd) {
                        self.retire(stream);
                    }
                    return;
                }
            }
        }
        let Some((stream, line, _)) = self.connecting.remove(&fd) else {
            return;
        };
        let port = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(peer) = port.filter(|_| self.conns.len() < MAX_CONNECTIONS) else {
            // A bad line or too many connections: the client sees EOF.
            self.retire(stream);
            return;
        };
        let local = self.alloc_local_port(peer);
        // `accept` made the stream non-blocking.
        let conn = Connection::new(stream, local, peer, State::Connecting);
        self.track(&conn);
        self.conns.insert((local, peer), conn);
        let req = self.header(local, peer, OP_REQUEST, 0);
        self.queue_control(req);
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn track(&mut self, conn: &Connection) {
        let id = self.fresh_id();
        self.ids.insert(conn.stream().as_raw_fd(), id);
    }

    fn alloc_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer)) {
                return port;
            }
        }
    }

    /// Whether anything is waiting to go to the guest without a host read.
    pub fn has_control(&self) -> bool {
        !self.control.is_empty()
    }

    /// Every fd the event loop should watch, the identity of the socket
    /// behind it, and for what. Host reads are only wanted while the guest
    /// has credit and `rx_ready` (RX buffers).
    pub fn interests(&self, rx_ready: bool) -> Vec<(RawFd, u64, Interest)> {
        let mut v = vec![(
            self.listener.as_raw_fd(),
            0,
            Interest {
                read: true,
                write: false,
            },
        )];
        v.extend(self.connecting.iter().map(|(fd, (_, _, id))| {
            (
                *fd,
                *id,
                Interest {
                    read: true,
                    write: false,
                },
            )
        }));
        v.extend(self.conns.values().map(|c| {
            let fd = c.stream().as_raw_fd();
            let read = rx_ready && (c.wants_host_read() || c.state == State::Connecting);
            let id = self.ids.get(&fd).copied().unwrap_or(0);
            (
                fd,
                id,
                Interest {
                    read,
                    write: c.has_pending(),
                },
            )
        }));
        v
    }

    /// Whether `fd` is the listener.
    pub fn is_listener(&self, fd: RawFd) -> bool {
        fd == self.listener.as_raw_fd()
    }

    /// Whether `fd` is a host client still in the `CONNECT` handshake.
    pub fn is_connecting(&self, fd: RawFd) -> bool {
        self.connecting.contains_key(&fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("airlock-mux-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn guest(op: u16, guest_port: u32, host_port: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn guest_connects_to_a_listening_host_port_and_data_flows_both_ways() {
        let d = dir("flow");
        let mut m = Muxer::new(GUEST, d.join("vm.vsock")).expect("mux");
        let host = UnixListener::bind(d.join("vm.vsock_1024")).expect("bind");
        m.on_guest_packet(&guest(OP_REQUEST, 5000, 1024), &[]);
        let (resp, _) = m.next_rx(4096).expect("response");
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
            (OP_RESPONSE, 1024, 5000, GUEST)
        );
        let (mut server, _) = host.accept().expect("accept");
        let mut rw = guest(OP_RW, 5000, 1024);
        rw.len = 5;
        m.on_guest_packet(&rw, b"ping\n");
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ping\n");
        server.write_all(b"pong").expect("write");
        let (h, data) = m.next_rx(4096).expect("data");
        assert_eq!(
            (h.op, h.len, h.fwd_cnt),
            (OP_RW, 0, 5),
            "len is set when written to the ring"
        );
        assert_eq!(data, b"pong");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn nobody_listening_is_a_reset_and_spoofed_packets_are_refused() {
        let d = dir("rst");
        let mut m = Muxer::new(GUEST, d.join("vm.vsock")).expect("mux");
        m.on_guest_packet(&guest(OP_REQUEST, 5000, 9999), &[]);
        assert_eq!(m.next_rx(4096).expect("rst").0.op, OP_RST);
        let mut spoof = guest(OP_REQUEST, 5000, 1024);
        spoof.src_cid = 7;
        m.on_guest_packet(&spoof, &[]);
        assert_eq!(m.next_rx(4096).expect("rst").0.op, OP_RST);
        let mut dgram = guest(OP_REQUEST, 5000, 1024);
        dgram.type_ = 2;
        m.on_guest_packet(&dgram, &[]);
        assert_eq!(m.next_rx(4096).expect("rst").0.op, OP_RST);
        // Data for a connection that does not exist.
        m.on_guest_packet(&guest(OP_RW, 1, 2), b"x");
        assert_eq!(m.next_rx(4096).expect("rst").0.op, OP_RST);
        assert_eq!(m.connections(), 0);
        assert_eq!(m.refused, 4);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn connections_are_capped_per_vm() {
        let d = dir("cap");
        let mut m = Muxer::new(GUEST, d.join("vm.vsock")).expect("mux");
        let _host = UnixListener::bind(d.join("vm.vsock_1024")).expect("bind");
        for port in 0..(u32::try_from(MAX_CONNECTIONS).expect("small") + 10) {
            m.on_guest_packet(&guest(OP_REQUEST, 10_000 + port, 1024), &[]);
        }
        assert_eq!(m.connections(), MAX_CONNECTIONS);
        let mut resets = 0;
        while let Some((h, _)) = m.next_rx(4096) {
            resets += usize::from(h.op == OP_RST);
        }
        assert_eq!(resets, 10);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn host_initiated_connect_line_gets_ok_after_the_guest_accepts() {
        let d = dir("connect");
        let mut m = Muxer::new(GUEST, d.join("vm.vsock")).expect("mux");
        let mut client = UnixStream::connect(d.join("vm.vsock")).expect("connect");
        client.write_all(b"CONNECT 52\n").expect("write");
        m.accept();
        let fd = m.connecting.keys().copied().next().expect("pending");
        m.on_connect_line(fd);
        let (req, _) = m.next_rx(4096).expect("request");
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));
        let mut resp = guest(OP_RESPONSE, 52, req.src_port);
        resp.buf_alloc = 4096;
        m.on_guest_packet(&resp, &[]);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).expect("ok line");
        assert_eq!(
            std::str::from_utf8(&line).expect("utf8"),
            format!("OK {}\n", req.src_port)
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn guest_full_shutdown_flushes_then_resets() {
        let d = dir("shutdown");
        let mut m = Muxer::new(GUEST, d.join("vm.vsock")).expect("mux");
        let host = UnixListener::bind(d.join("vm.vsock_1024")).expect("bind");
        m.on_guest_packet(&guest(OP_REQUEST, 5000, 1024), &[]);
        let _ = m.next_rx(4096);
        let (mut server, _) = host.accept().expect("accept");
        let mut rw = guest(OP_RW, 5000, 1024);
        rw.len = 3;
        m.on_guest_packet(&rw, b"bye");
        let mut sd = guest(OP_SHUTDOWN, 5000, 1024);
        sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        m.on_guest_packet(&sd, &[]);
        assert_eq!(m.connections(), 0);
        let mut got = Vec::new();
        server.read_to_end(&mut got).expect("eof");
        assert_eq!(got, b"bye");
        let mut ops = Vec::new();
        while let Some((h, _)) = m.next_rx(4096) {
            ops.push(h.op);
        }
        assert_eq!(ops.last(), Some(&OP_RST));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn the_uds_path_must_be_free_and_is_removed_on_drop() {
        let d = dir("path");
        let p = d.join("vm.vsock");
        let m = Muxer::new(GUEST, p.clone()).expect("mux");
        assert!(matches!(
            Muxer::new(GUEST, p.clone()),
            Err(Error::Exists(_))
        ));
        drop(m);
        assert!(!p.exists());
        let _ = std::fs::remove_dir_all(d);
    }
}
