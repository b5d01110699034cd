//! Live mounts: each share the host lists in `Mounts` becomes a FUSE mount
//! at `/run/airlock/mounts/N` (the guest kernel's own FUSE client, no
//! libfuse), whose requests and replies are pumped over one vsock
//! connection to the host's [`MOUNTS_PORT`]. The agent's container then
//! bind-mounts it at its target ([`crate::image::containerize`]).
//!
//! The pumps: one thread reads `/dev/fuse` (one `read` is exactly one
//! request) and writes it to the host; one reads the host's replies (split
//! on `fuse_out_header.len`, bounded) and writes each with one `write` to
//! `/dev/fuse`. The host is trusted here as it is for everything else, but
//! its lengths are bounded all the same: a bad one ends the mount.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use airlock_protocol::limits::{MAX_FUSE_MESSAGE, MIN_FUSE_REPLY};
use airlock_protocol::{MountEntry, HOST_CID, MOUNTS_PORT, MOUNT_HELLO};

use crate::console;
use crate::vsock::VsockStream;

/// Where mount `N` is mounted in the VM.
pub const MOUNTS_DIR: &str = "/run/airlock/mounts";

/// The VM path the container's mount `i` comes from.
pub fn source(i: usize, entry: &MountEntry) -> String {
    match &entry.file {
        Some(name) => format!("{MOUNTS_DIR}/{i}/{name}"),
        None => format!("{MOUNTS_DIR}/{i}"),
    }
}

/// Mounts every share and starts its pumps; the first failure names the
/// mount.
pub fn mount_all(entries: &[MountEntry]) -> Result<(), String> {
    for (i, entry) in entries.iter().enumerate() {
        mount_one(i, entry).map_err(|e| format!("mount {} ({}): {e}", i, entry.target))?;
    }
    Ok(())
}

fn mount_one(i: usize, entry: &MountEntry) -> io::Result<()> {
    let dir = format!("{MOUNTS_DIR}/{i}");
    std::fs::create_dir_all(&dir)?;
    let fuse = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let options = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,max_read={}",
        fuse.as_raw_fd(),
        1 << 20
    );
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if entry.readonly {
        flags |= libc::MS_RDONLY;
    }
    let (src, target, fstype) = (
        CString::new("airlock").map_err(io::Error::other)?,
        CString::new(dir.clone()).map_err(io::Error::other)?,
        CString::new("fuse").map_err(io::Error::other)?,
    );
    let data = CString::new(options).map_err(io::Error::other)?;
    // The connection first: the kernel sends FUSE_INIT as soon as the
    // mount exists, and the pumps carry it.
    let mut stream = VsockStream::connect(HOST_CID, MOUNTS_PORT)?;
    let mut hello = MOUNT_HELLO.to_vec();
    hello.extend_from_slice(&u32::try_from(i).map_err(io::Error::other)?.to_le_bytes());
    stream.write_all(&hello)?;
    // SAFETY: every pointer is a live NUL-terminated string.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let fuse_in = fuse.try_clone()?;
    let stream_in = stream.try_clone()?;
    std::thread::Builder::new()
        .name(format!("mount-{i}-req"))
        .spawn(move || requests(fuse_in, stream_in, i))?;
    std::thread::Builder::new()
        .name(format!("mount-{i}-rep"))
        .spawn(move || replies(stream, fuse, i))?;
    Ok(())
}

/// Guest kernel → host.
fn requests(mut fuse: File, mut host: VsockStream, i: usize) {
    let mut buf = vec![0u8; MAX_FUSE_MESSAGE];
    loop {
        match fuse.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = host.write_all(&buf[..n]) {
                    console::warn(&format!("mount {i}: to the host: {e}"));
                    break;
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ENOENT | libc::EAGAIN) => {}
                // Unmounted.
                Some(libc::ENODEV) => break,
                _ => {
                    console::warn(&format!("mount {i}: /dev/fuse: {e}"));
                    break;
                }
            },
        }
    }
    let _ = host.shutdown_write();
}

/// Host → guest kernel.
fn replies(mut host: VsockStream, mut fuse: File, i: usize) {
    let mut buf = vec![0u8; MAX_FUSE_MESSAGE];
    loop {
        if let Err(e) = host.read_exact(&mut buf[..MIN_FUSE_REPLY]) {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                console::warn(&format!("mount {i}: from the host: {e}"));
            }
            return;
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if !(MIN_FUSE_REPLY..=MAX_FUSE_MESSAGE).contains(&len) {
            console::warn(&format!(
                "mount {i}: reply length {len} out of bounds: mount ended"
            ));
            return;
        }
        if let Err(e) = host.read_exact(&mut buf[MIN_FUSE_REPLY..len]) {
            console::warn(&format!("mount {i}: from the host: {e}"));
            return;
        }
        match fuse.write(&buf[..len]) {
            Ok(_) => {}
            // The request was interrupted meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                console::warn(&format!("mount {i}: /dev/fuse write: {e}"));
                if e.raw_os_error() == Some(libc::ENODEV) {
                    return;
                }
            }
        }
    }
}
