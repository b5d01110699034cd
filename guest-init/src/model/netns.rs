//! Where the endpoint listens: a fresh network namespace holding only
//! `lo` (for the agent's container), or the VM's own.

use std::ffi::CString;
use std::fs;
use std::io::{self};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::Path;
use std::thread;

use super::*;

/// A listener per port, each on 127.0.0.1, or why it could not listen.
pub type Listeners = Vec<(u16, io::Result<TcpListener>)>;

fn bind_all(ports: &[u16]) -> Listeners {
    ports
        .iter()
        .map(|&p| {
            (
                p,
                TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p)),
            )
        })
        .collect()
}

/// Listens on 127.0.0.1 at each of `ports` for the agent's loopback
/// services (the model endpoint, the egress proxy): in a new network
/// namespace with only `lo`, pinned at [`NETNS_PATH`] for the container
/// engine to join (returned as podman's `--network ns:PATH`), or with
/// `container` false in the VM's own (lo brought up first: the initramfs
/// mode does not otherwise). With `made`, the namespace already pinned
/// there by [`make_netns`] (before the snapshot, for the agent container
/// started then) is the one listened in.
pub fn listen_ports(
    container: bool,
    ports: &[u16],
    made: bool,
) -> Result<(Listeners, Option<String>), Error> {
    if !container {
        crate::image::loopback_up().map_err(Error::Loopback)?;
        return Ok((bind_all(ports), None));
    }
    let ports = ports.to_vec();
    // A helper thread: unshare(CLONE_NEWNET) and setns(2) move only the
    // calling thread, and the init's other threads (and podman, which it
    // forks) must stay in the VM's namespace. The thread ends once the
    // listeners exist; the namespace lives on through the bind mount and
    // the sockets.
    let listeners = on_helper_thread(move || {
        if made {
            enter_netns(Path::new(NETNS_PATH)).map_err(Error::Unshare)?;
        } else {
            new_netns()?;
        }
        Ok(bind_all(&ports))
    })?;
    Ok((listeners, Some(netns_option())))
}

/// podman's `--network` for the namespace pinned at [`NETNS_PATH`].
fn netns_option() -> String {
    format!("ns:{NETNS_PATH}")
}

/// Runs `work` on a thread of its own and waits for it (see
/// [`listen_ports`] on why namespace changes need one).
fn on_helper_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    thread::Builder::new()
        .name("services-netns".into())
        .spawn(work)
        .map_err(Error::Thread)?
        .join()
        .unwrap_or_else(|_| Err(Error::Thread(io::Error::other("the thread panicked"))))
}

/// Makes the agent's namespace (only `lo`, up) and pins it at
/// [`NETNS_PATH`], listening nowhere yet; returns podman's `--network`
/// for it. [`listen_ports`] with `made` listens in it later.
pub fn make_netns() -> Result<String, Error> {
    on_helper_thread(new_netns)?;
    Ok(netns_option())
}

/// Moves the calling thread into a new network namespace, brings up its
/// `lo` and pins it at [`NETNS_PATH`].
fn new_netns() -> Result<(), Error> {
    // SAFETY: unshare(2) takes no pointers; it affects this thread only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(Error::Unshare(io::Error::last_os_error()));
    }
    crate::image::loopback_up().map_err(Error::Loopback)?;
    pin_netns(Path::new(NETNS_PATH)).map_err(Error::Pin)
}

/// Moves the calling thread into the network namespace pinned at `path`.
fn enter_netns(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let ns = fs::File::open(path)?;
    // SAFETY: setns(2) takes a descriptor that `ns` keeps open across the
    // call; it affects this thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
