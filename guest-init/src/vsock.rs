//! A connected `AF_VSOCK` stream socket: the init's only way to the host.
//!
//! `std` has no vsock type, so this is a small wrapper over `libc`: create,
//! connect, a read timeout, and `Read`/`Write` on the descriptor. Every
//! `write` is capped at [`MAX_WRITE`] bytes because vhost-device-vsock 0.3.0
//! (the TCG engine's backend) stalls a connection for good on a guest write
//! of 64 KiB (docs/FACTS.md); `write_all` simply loops over the pieces.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Most bytes handed to the kernel in one `write` on a vsock stream.
pub const MAX_WRITE: usize = 32 * 1024;

/// A connected vsock stream.
#[derive(Debug)]
pub struct VsockStream {
    /// The socket. `File` is only the owner of the descriptor and the
    /// provider of `read(2)`/`write(2)`, which work on any stream socket.
    file: File,
}

impl VsockStream {
    /// Connects a new blocking, close-on-exec stream socket to `cid:port`.
    pub fn connect(cid: u32, port: u32) -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor socket(2) just returned to this
        // thread; nothing else owns it, so `OwnedFd` may close it once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let family = libc::sa_family_t::try_from(libc::AF_VSOCK)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let addr = libc::sockaddr_vm {
            svm_family: family,
            svm_reserved1: 0,
            svm_port: port,
            svm_cid: cid,
            svm_zero: [0; 4],
        };
        let len = libc::socklen_t::try_from(mem::size_of::<libc::sockaddr_vm>())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `addr` is a fully initialised sockaddr_vm that lives across
        // the call and `len` is exactly its size, so the kernel reads only
        // inside it; connect(2) keeps no pointer after returning.
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
        Ok(Self {
            file: File::from(fd),
        })
    }

    /// A second handle on the same connection (close-on-exec).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
        })
    }

    /// Tells the peer no more bytes come (`shutdown(SHUT_WR)`).
    pub fn shutdown_write(&self) -> io::Result<()> {
        // SAFETY: shutdown(2) on our own socket.
        if unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_WR) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes reads fail with `WouldBlock` after `timeout` without data
    /// (`SO_RCVTIMEO`); `None` blocks for ever.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
            Some(t) => {
                // A zero timeval means "block for ever": round up.
                let t = t.max(Duration::from_micros(1));
                libc::timeval {
                    tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
                    tv_usec: libc::suseconds_t::from(t.subsec_micros()),
                }
            }
        };
        let len = libc::socklen_t::try_from(mem::size_of::<libc::timeval>())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `tv` is an initialised timeval living across the call and
        // `len` is its size; setsockopt(2) only reads it during the call.
        let rc = unsafe {
            libc::setsockopt(
                self.file.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast::<libc::c_void>(),
                len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(MAX_WRITE);
        self.file.write(buf.get(..n).unwrap_or(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening vsock stream socket (the exec port, [`airlock_protocol::EXEC_PORT`]).
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Binds a close-on-exec listening socket to `port` on this VM's CID.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked below.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor socket(2) just returned to this
        // thread; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let family = libc::sa_family_t::try_from(libc::AF_VSOCK)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let addr = libc::sockaddr_vm {
            svm_family: family,
            svm_reserved1: 0,
            svm_port: port,
            svm_cid: libc::VMADDR_CID_ANY,
            svm_zero: [0; 4],
        };
        let len = libc::socklen_t::try_from(mem::size_of::<libc::sockaddr_vm>())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `addr` is a fully initialised sockaddr_vm living across the
        // call and `len` is its size; bind(2) keeps no pointer.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) on our own descriptor takes no pointers.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Waits at most `timeout` for a connection: `Ok(None)` if none came.
    /// A connection comes with its peer's CID.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<(VsockStream, u32)>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid, writable pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(err)
            };
        }
        if rc == 0 {
            return Ok(None);
        }
        // SAFETY: all-zero is a valid sockaddr_vm (plain integers).
        let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
        let mut len = libc::socklen_t::try_from(mem::size_of::<libc::sockaddr_vm>())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `addr` and `len` are live and writable, `len` holds the
        // size of `addr`, so the kernel writes only inside it.
        let raw = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                (&raw mut addr).cast::<libc::sockaddr>(),
                &raw mut len,
                libc::SOCK_CLOEXEC,
            )
        };
        if raw < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR | libc::ECONNABORTED) => Ok(None),
                _ => Err(err),
            };
        }
        // SAFETY: accept4 just returned this descriptor to us alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Some((
            VsockStream {
                file: File::from(fd),
            },
            addr.svm_cid,
        )))
    }
}
