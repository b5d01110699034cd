//! `airlock-hostile`: a guest program that attacks the host's side of the
//! vsock, for the hostile-guest end-to-end test. It is only ever run inside a
//! sandbox (the test initramfs carries it as `/bin/airlock-hostile`), as the
//! user's command, next to the init's real control session. It models a
//! compromised VM, so it runs as root there (`airlock run --vm-root`): the
//! unprivileged command user cannot open `AF_VSOCK` at all.
//!
//! In order, each on fresh `AF_VSOCK` connections to the host (CID 2):
//!
//! 1. `garbage`: random-looking bytes on the control port;
//! 2. `huge-header`: a frame header announcing 4 GiB, then some body;
//! 3. `unknown-tag`: a valid `Hello`, then a frame with an unknown tag;
//! 4. `flood`: for ~3 s, as many connections to the control port and as many
//!    bytes as it can (each write at most 32 KiB, the vsock backend's limit);
//!    every connection starts a frame announcing the largest allowed body;
//! 5. `unserved`: connections to ports nobody serves.
//!
//! `airlock-hostile results` instead attacks the results port (1026, served
//! when the run has `--out`). First it writes its real result,
//! `/workspace/out/real.txt` ("real result"), which the init sends at the
//! end on the results connection it opened before the command; then, on a
//! connection of its own (which the host refuses: the init's came first),
//! a valid file `good.txt`,
//! then `../../etc/passwd`, `/etc/passwd`, `out-link/x` (the test makes
//! `out-link` a symlink in `--out`), `huge` claiming 10 GB, `over` (2000
//! bytes, over the test's `--max-out-bytes 1000`), `badsum` (wrong sha256)
//! and `keep.txt` cut short (100 bytes claimed, 10 sent), then `FilesDone`.
//! It prints `hostile: results sent` on stdout.
//!
//! One line per step goes to stderr (what was sent, what came back). Then it
//! prints `hostile: done` on stdout and exits 0; whatever the host does
//! (answer, close, refuse), the program itself never hangs: every socket has
//! send and receive timeouts and the flood is non-blocking. It exits 1 only
//! if it cannot make a vsock socket at all (then it attacked nothing).

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use airlock_protocol::limits::MAX_FRAME_BODY;
use airlock_protocol::{
    encode, FileEntry, FileKind, Message, CONTROL_PORT, FILES_OUT_PORT, HOST_CID, PROTOCOL_VERSION,
};
use sha2::{Digest, Sha256};

/// Most bytes per `write` (vhost-device-vsock 0.3.0 stalls on 64 KiB).
const MAX_WRITE: usize = 32 * 1024;
/// How long the flood lasts.
const FLOOD_FOR: Duration = Duration::from_secs(3);
/// Most connections the flood keeps open at once.
const FLOOD_MAX_CONNECTIONS: usize = 512;
/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (level `AF_VSOCK`, a `struct timeval`
/// on 64-bit; `linux/vm_sockets.h`), which the libc crate does not define.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;
/// How long a connect may wait for the host's answer.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Send and receive timeout of the probe connections.
const IO_TIMEOUT: Duration = Duration::from_millis(500);
/// Most bytes of an answer read back from a probe.
const MAX_ANSWER: usize = 64 * 1024;
/// Ports no Airlock host serves.
const UNSERVED_PORTS: [u32; 5] = [1, 1023, 1025, 4000, 0x7fff_ffff];

/// A connected vsock stream socket.
struct Vsock {
    /// Owner of the socket; `read`/`write` work on any stream socket.
    file: File,
}

impl Vsock {
    /// A new, unconnected vsock stream socket (for the up-front check).
    fn socket() -> io::Result<OwnedFd> {
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by socket(2) and nothing else owns
        // it, so `OwnedFd` may close it once.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// Connects to the host on `port`.
    fn connect(port: u32) -> io::Result<Self> {
        let fd = Self::socket()?;
        // Fail fast where the host never answers (unserved ports, a host
        // that stopped accepting); the kernel's default is 2 s.
        set_timeval(
            &fd,
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            CONNECT_TIMEOUT,
        )?;
        let family = libc::sa_family_t::try_from(libc::AF_VSOCK)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let addr = libc::sockaddr_vm {
            svm_family: family,
            svm_reserved1: 0,
            svm_port: port,
            svm_cid: HOST_CID,
            svm_zero: [0; 4],
        };
        let len = socklen_of::<libc::sockaddr_vm>()?;
        // SAFETY: `addr` is an initialised sockaddr_vm living across the
        // call and `len` is its size, so the kernel reads only inside it.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        set_timeval(&fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, IO_TIMEOUT)?;
        set_timeval(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, IO_TIMEOUT)?;
        Ok(Self {
            file: File::from(fd),
        })
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl(2) F_GETFL/F_SETFL on a descriptor this struct owns;
        // no pointers are involved.
        let rc = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
            }
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes `data` in pieces of at most [`MAX_WRITE`]; returns how much
    /// went out before an error or a timeout.
    fn send(&mut self, data: &[u8]) -> (usize, Option<io::Error>) {
        let mut sent = 0;
        for piece in data.chunks(MAX_WRITE) {
            if let Err(err) = self.file.write_all(piece) {
                return (sent, Some(err));
            }
            sent += piece.len();
        }
        (sent, None)
    }

    /// Reads what the host answers until it closes, goes quiet for
    /// [`IO_TIMEOUT`], or [`MAX_ANSWER`] bytes came.
    fn answer(&mut self) -> (usize, &'static str) {
        let mut buf = [0u8; 4096];
        let mut got = 0;
        while got < MAX_ANSWER {
            match self.file.read(&mut buf) {
                Ok(0) => return (got, "closed"),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (got, "quiet"),
                Err(_) => return (got, "reset"),
            }
        }
        (got, "still talking")
    }
}

/// Sets a socket option that takes a `struct timeval`.
fn set_timeval(
    fd: &OwnedFd,
    level: libc::c_int,
    option: libc::c_int,
    t: Duration,
) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(t.subsec_micros()),
    };
    let len = socklen_of::<libc::timeval>()?;
    // SAFETY: `tv` is an initialised timeval living across the call and
    // `len` is its size; setsockopt(2) only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            option,
            (&raw const tv).cast::<libc::c_void>(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn socklen_of<T>() -> io::Result<libc::socklen_t> {
    libc::socklen_t::try_from(mem::size_of::<T>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn report(line: &str) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "hostile: {line}");
}

/// Connects to the control port, sends `data`, reads the answer, reports.
fn probe(name: &str, data: &[u8]) {
    match Vsock::connect(CONTROL_PORT) {
        Err(err) => report(&format!("{name}: connect failed: {err}")),
        Ok(mut sock) => {
            let (sent, err) = sock.send(data);
            let (got, how) = sock.answer();
            let err = err.map_or_else(String::new, |e| format!(" (send stopped: {e})"));
            report(&format!(
                "{name}: sent {sent} of {} bytes{err}; host answered {got} bytes, then {how}",
                data.len()
            ));
        }
    }
}

/// Deterministic bytes that are not a frame (xorshift).
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn huge_header() -> Vec<u8> {
    let mut data = u32::MAX.to_le_bytes().to_vec();
    data.push(3); // Stdout's tag
    data.extend(garbage(MAX_WRITE));
    data
}

fn unknown_tag() -> Vec<u8> {
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        capabilities: vec![],
    };
    let mut data = encode(&hello).unwrap_or_default();
    data.extend([1, 0, 0, 0, 0xee]);
    data
}

/// Many connections, many bytes, for [`FLOOD_FOR`].
fn flood() {
    // Each connection opens a frame announcing the largest allowed body
    // (the host must read it all before it can judge it), then fills it.
    let mut opening = u32::try_from(MAX_FRAME_BODY)
        .unwrap_or(u32::MAX)
        .to_le_bytes()
        .to_vec();
    opening.push(3);
    let fill = vec![b'A'; MAX_WRITE];

    let until = Instant::now() + FLOOD_FOR;
    let mut conns: Vec<Vsock> = Vec::new();
    let (mut opened, mut refused, mut closed, mut bytes) = (0usize, 0usize, 0usize, 0u64);
    let mut last_connect_error = None;
    let mut connecting = true;
    while Instant::now() < until {
        if connecting && conns.len() < FLOOD_MAX_CONNECTIONS {
            match Vsock::connect(CONTROL_PORT) {
                Ok(mut sock) => {
                    opened += 1;
                    let (sent, err) = sock.send(&opening);
                    bytes += u64::try_from(sent).unwrap_or(0);
                    if err.is_none() && sock.set_nonblocking().is_ok() {
                        conns.push(sock);
                    } else {
                        closed += 1;
                    }
                }
                Err(err) => {
                    refused += 1;
                    // Out of descriptors or memory: stop opening, keep writing.
                    if matches!(
                        err.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
                    ) {
                        connecting = false;
                    }
                    last_connect_error = Some(err);
                }
            }
        }
        let mut progress = false;
        conns.retain_mut(|sock| match sock.file.write(&fill) {
            Ok(n) => {
                bytes += u64::try_from(n).unwrap_or(0);
                progress = true;
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                true
            }
            Err(_) => {
                closed += 1;
                false
            }
        });
        if !progress && !connecting {
            thread::sleep(Duration::from_millis(10));
        }
    }
    let still_open = conns.len();
    drop(conns);
    let last = last_connect_error.map_or_else(String::new, |e| format!(" (last refusal: {e})"));
    report(&format!(
        "flood: {opened} connections opened, {refused} refused{last}, {closed} closed by the host, \
         {still_open} still open at the end; {bytes} bytes sent"
    ));
}

fn unserved() {
    for port in UNSERVED_PORTS {
        match Vsock::connect(port) {
            Err(err) => report(&format!("unserved port {port}: refused: {err}")),
            Ok(mut sock) => {
                let (sent, _) = sock.send(b"hello?\n");
                let (got, how) = sock.answer();
                report(&format!(
                    "unserved port {port}: CONNECTED; sent {sent} bytes, host answered {got} bytes, then {how}"
                ));
            }
        }
    }
}

/// The frames of one file: entry, data in one chunk, end (with `sha256`,
/// or the real digest).
fn file_frames(path: &str, size: u64, data: &[u8], sha256: Option<[u8; 32]>) -> Vec<Message> {
    let mut msgs = vec![Message::FileEntry(FileEntry {
        path: path.into(),
        kind: FileKind::File,
        mode: 0o644,
        mtime: 1_600_000_000,
        size,
    })];
    if !data.is_empty() {
        msgs.push(Message::FileData(data.to_vec()));
    }
    let sha256 = sha256.unwrap_or_else(|| Sha256::digest(data).into());
    msgs.push(Message::FileEnd { sha256 });
    msgs
}

/// The result `airlock-hostile results` leaves for the init to send.
const REAL_RESULT: (&str, &[u8]) = ("/workspace/out/real.txt", b"real result\n");

/// `airlock-hostile results`: see the module docs.
fn results() -> ExitCode {
    if let Err(err) = std::fs::write(REAL_RESULT.0, REAL_RESULT.1) {
        report(&format!("results: cannot write {}: {err}", REAL_RESULT.0));
        return ExitCode::from(1);
    }
    let mut msgs = Vec::new();
    msgs.extend(file_frames("good.txt", 5, b"good\n", None));
    msgs.extend(file_frames("../../etc/passwd", 5, b"root\n", None));
    msgs.extend(file_frames("/etc/passwd", 5, b"root\n", None));
    msgs.extend(file_frames("out-link/x", 7, b"escape\n", None));
    msgs.extend(file_frames("huge", 10_000_000_000, b"", Some([0; 32])));
    msgs.extend(file_frames("over", 2000, &[b'o'; 2000], None));
    msgs.extend(file_frames("badsum", 4, b"data", Some([7; 32])));
    msgs.extend(file_frames("keep.txt", 100, &[b'p'; 10], Some([0; 32])));
    msgs.push(Message::FilesDone { count: 8, bytes: 0 });
    let mut bytes = Vec::new();
    for msg in &msgs {
        match encode(msg) {
            Ok(frame) => bytes.extend(frame),
            Err(err) => {
                report(&format!("results: cannot encode {}: {err}", msg.kind()));
                return ExitCode::from(1);
            }
        }
    }
    match Vsock::connect(FILES_OUT_PORT) {
        Err(err) => {
            report(&format!("results: connect failed: {err}"));
            return ExitCode::from(1);
        }
        Ok(mut sock) => {
            let (sent, err) = sock.send(&bytes);
            // The host closes once it has read FilesDone.
            let mut how = "quiet";
            for _ in 0..20 {
                let (_, h) = sock.answer();
                how = h;
                if h != "quiet" {
                    break;
                }
            }
            let err = err.map_or_else(String::new, |e| format!(" (send stopped: {e})"));
            report(&format!(
                "results: sent {sent} of {} bytes{err}; then the host {how}",
                bytes.len()
            ));
        }
    }
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "hostile: results sent");
    let _ = out.flush();
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    if let Err(err) = Vsock::socket() {
        report(&format!("error: cannot create a vsock socket: {err}"));
        return ExitCode::from(1);
    }
    if std::env::args().nth(1).as_deref() == Some("results") {
        return results();
    }
    probe("garbage", &garbage(4096));
    probe("huge-header", &huge_header());
    probe("unknown-tag", &unknown_tag());
    flood();
    unserved();
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "hostile: done");
    let _ = out.flush();
    ExitCode::SUCCESS
}
