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
//! BATCH_FORGET, INTERRUPT) write nothing and send nothing.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

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

/// Serves requests from `stream` until it closes or misbehaves. Requests
/// the library cannot decode are counted in `undecodable` (the guest
/// kernel never sends one; a hostile guest can) and get no reply.
pub fn serve(
    stream: &mut (impl Read + Write),
    server: &Server<Arc<Share>>,
    reply: &mut ReplyFile,
    undecodable: &mut u64,
) -> End {
    let mut buf = vec![0u8; MAX_FUSE_MESSAGE];
    loop {
        match read_request(stream, &mut buf) {
            Ok(Some(len)) => match answer(server, &mut buf[..len], reply) {
                Ok(Some(bytes)) => {
                    if let Err(e) = stream.write_all(bytes) {
                        return End::Io(e.to_string());
                    }
                }
                Ok(None) => {}
                Err(_) => *undecodable += 1,
            },
            Ok(None) => return End::Closed,
            Err(Bad::Length(n)) => return End::BadLength(n),
            Err(Bad::Io(e)) => return End::Io(e.to_string()),
        }
    }
}

enum Bad {
    Length(u32),
    Io(io::Error),
}

/// Reads one request into `buf`; `None` at a clean end of stream.
fn read_request(stream: &mut impl Read, buf: &mut [u8]) -> Result<Option<usize>, Bad> {
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut buf[got..4]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Bad::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Bad::Io(e)),
        }
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let n = len as usize;
    if !(MIN_FUSE_REQUEST..=MAX_FUSE_MESSAGE).contains(&n) {
        return Err(Bad::Length(len));
    }
    stream.read_exact(&mut buf[4..n]).map_err(Bad::Io)?;
    Ok(Some(n))
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
