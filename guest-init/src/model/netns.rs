//! Where the endpoint listens: a fresh network namespace holding only
//! `lo` (for the agent's container), or the VM's own.

use std::ffi::CString;
use std::fs;
use std::io::{self};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::Path;
use std::thread;

use super::*;

pub(crate) fn loopback() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT)
}

/// Listens on 127.0.0.1:[`PORT`] in the VM's own network namespace (lo is
/// brought up first: the initramfs mode does not otherwise).
pub fn listen_here() -> Result<TcpListener, Error> {
    crate::image::loopback_up().map_err(Error::Loopback)?;
    TcpListener::bind(loopback()).map_err(Error::Listen)
}

/// Listens on 127.0.0.1:[`PORT`] in a new network namespace with only `lo`,
/// pinned at [`NETNS_PATH`] for the container engine to join.
pub fn listen_in_new_netns() -> Result<TcpListener, Error> {
    // A helper thread: unshare(CLONE_NEWNET) moves only the calling thread,
    // and the init's other threads (and podman, which it forks) must stay in
    // the VM's namespace. The thread ends once the listener exists; the
    // namespace lives on through the bind mount and the socket.
    thread::Builder::new()
        .name("model-netns".into())
        .spawn(|| -> Result<TcpListener, Error> {
            // SAFETY: unshare(2) takes no pointers; it affects this thread only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(Error::Unshare(io::Error::last_os_error()));
            }
            crate::image::loopback_up().map_err(Error::Loopback)?;
            pin_netns(Path::new(NETNS_PATH)).map_err(Error::Pin)?;
            TcpListener::bind(loopback()).map_err(Error::Listen)
        })
        .map_err(Error::Thread)?
        .join()
        .unwrap_or_else(|_| Err(Error::Thread(io::Error::other("the thread panicked"))))
}

/// Bind-mounts the calling thread's network namespace onto `target`.
pub(crate) fn pin_netns(target: &Path) -> io::Result<()> {
    if let Some(dir) = target.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::File::create(target)?;
    let source = c"/proc/thread-self/ns/net";
    let target = CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call;
    // the file system type and data may be null for a bind mount.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
