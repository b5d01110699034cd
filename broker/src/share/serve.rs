//! One mount connection served: FUSE requests in, replies out, over a
//! byte stream (the guest's vsock connection, handed over by the broker).
//!
//! FUSE messages carry their length (`fuse_in_header.len`, the first
//! `u32`), so the stream has no framing of ours; a length outside
//! [`MIN_FUSE_REQUEST`] ..= [`MAX_FUSE_MESSAGE`] ends the connection.
//! `fuse-backend-rs` writes each reply with one `write(2)` to a file
//! descriptor and does not retry a short write, so it writes to a
//! `memfd` that we rewind for every request; the reply is then read back
//! and written whole to the stream. Requests that have no reply (FORGET,
//! BATCH_FORGET, INTERRUPT) write nothing and send nothing. A few workers
//! answer at once ([`WORKERS`]), each with its own reply buffer; the reader
//! queues at most [`QUEUED`] requests ahead of them.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use airlock_protocol::limits::{MAX_FUSE_MESSAGE, MIN_FUSE_REQUEST};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};

use super::fs::Share;

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The guest closed it (the VM stopped or unmounted).
    Closed,
    /// A request whose length is out of bounds: the connection is closed.
    BadLength(u32),
    /// Reading or writing the stream failed.
    Io(String),
}

/// A reusable reply buffer: a memfd the library writes replies to.
pub struct ReplyFile {
    file: File,
    scratch: Vec<u8>,
    out: Vec<u8>,
}

impl ReplyFile {
    pub fn new() -> io::Result<ReplyFile> {
        // SAFETY: a NUL-terminated name and valid flags; the result is
        // checked before use and owned by the File.
        let fd = unsafe { libc::memfd_create(c"airlock-fuse-reply".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(ReplyFile {
            file,
            scratch: vec![0; MAX_FUSE_MESSAGE],
            out: Vec::with_capacity(MAX_FUSE_MESSAGE),
        })
    }
}

/// Requests one connection serves at once. FUSE replies carry the
/// request's `unique`, so they may come back in any order and several
/// workers are correct (the unit tests and the fuzz target run two). No
/// gain was measured on this 2-core host under TCG, where every host
/// thread competes with the emulated vCPU (`git status` on 10,000 files:
/// 8.9–14.3 s with one worker, 12.4–15.7 s with four), so one serves
/// until hardware KVM says otherwise.
pub const WORKERS: usize = 1;
/// Requests read but not yet taken by a worker, at most: with the workers'
/// own, the memory one connection holds is bounded (each request and each
/// reply buffer at most [`MAX_FUSE_MESSAGE`]).
const QUEUED: usize = 4;

/// Serves requests from `reader` until it ends or misbehaves, on
/// `workers` threads (at least one), each reply written whole to `writer`.
/// Requests the library cannot decode (the guest kernel never sends one; a
/// hostile guest can) get no reply and are counted in `undecodable`.
pub fn serve(
    reader: &mut impl Read,
    writer: &mut (impl Write + Send),
    server: &Server<Arc<Share>>,
    workers: usize,
    undecodable: &AtomicU64,
) -> End {
    let (queue, requests) = mpsc::sync_channel::<Vec<u8>>(QUEUED);
    let requests = Mutex::new(requests);
    let writer = Mutex::new(writer);
    let broken = AtomicBool::new(false);
    let broken_why = Mutex::new(None::<String>);
    let end = std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            scope.spawn(|| {
                let mut reply = match ReplyFile::new() {
                    Ok(r) => r,
                    Err(e) => {
                        broken.store(true, Ordering::Relaxed);
                        if let Ok(mut why) = broken_why.lock() {
                            why.get_or_insert(format!("reply buffer: {e}"));
                        }
                        return;
                    }
                };
                loop {
                    let next = match requests.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(mut request) = next else { return };
                    match answer(server, &mut request, &mut reply) {
                        Ok(Some(bytes)) => {
                            let sent = match writer.lock() {
                                Ok(mut w) => w.write_all(bytes).and_then(|()| w.flush()),
                                Err(_) => return,
                            };
                            if let Err(e) = sent {
                                broken.store(true, Ordering::Relaxed);
                                if let Ok(mut why) = broken_why.lock() {
                                    why.get_or_insert(e.to_string());
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(_) => {
                            undecodable.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        let end = loop {
            if broken.load(Ordering::Relaxed) {
                break End::Io(String::new());
            }
            let mut buf = Vec::new();
            match read_request(reader, &mut buf) {
                Ok(Some(())) => {
                    if queue.send(buf).is_err() {
                        break End::Io(String::new());
                    }
                }
                Ok(None) => break End::Closed,
                Err(Bad::Length(n)) => break End::BadLength(n),
                Err(Bad::Io(e)) => break End::Io(e.to_string()),
            }
        };
        // The workers answer what was read, then stop.
        drop(queue);
        end
    });
    match end {
        End::Io(e) if e.is_empty() => End::Io(
            broken_why
                .into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| "the reply stream broke".into()),
        ),
        other => other,
    }
}

enum Bad {
    Length(u32),
    Io(io::Error),
}

/// Reads one request into `buf` (sized to it); `None` at a clean end of
/// stream.
fn read_request(stream: &mut impl Read, buf: &mut Vec<u8>) -> Result<Option<()>, Bad> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Bad::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Bad::Io(e)),
        }
    }
    let len = u32::from_le_bytes(head);
    let n = len as usize;
    if !(MIN_FUSE_REQUEST..=MAX_FUSE_MESSAGE).contains(&n) {
        return Err(Bad::Length(len));
    }
    buf.resize(n, 0);
    buf[..4].copy_from_slice(&head);
    stream.read_exact(&mut buf[4..]).map_err(Bad::Io)?;
    Ok(Some(()))
}

/// Has the library answer one request; the reply's bytes, if it has one.
fn answer<'r>(
    server: &Server<Arc<Share>>,
    request: &mut [u8],
    reply: &'r mut ReplyFile,
) -> io::Result<Option<&'r [u8]>> {
    reply.file.set_len(0)?;
    let fd = reply.file.as_raw_fd();
    // SAFETY: lseek on our own memfd.
    if unsafe { libc::lseek(fd, 0, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let reader = Reader::<()>::from_fuse_buffer(FuseBuf::new(request))
        .map_err(|e| io::Error::other(e.to_string()))?;
    let writer = FuseDevWriter::<()>::new(fd, &mut reply.scratch)
        .map_err(|e| io::Error::other(e.to_string()))?;
    server
        .handle_message(reader, writer.into(), None, None)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let len = reply.file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let len = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_FUSE_MESSAGE)
        .ok_or_else(|| io::Error::other("reply too large"))?;
    reply.out.resize(len, 0);
    reply.file.read_exact_at(&mut reply.out, 0)?;
    Ok(Some(&reply.out))
}
