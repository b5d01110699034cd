//! The share server process (`airlock share-server`, started by the
//! broker, never by hand): one per sandbox with live mounts.
//!
//! Before it serves anything it jails itself:
//! 1. its own mount namespace (as a non-root user, inside its own user
//!    namespace that maps only that user), every mount private;
//! 2. a fresh tmpfs root holding `/N` for mount `N`: the source directory
//!    bind-mounted there (a single file: bind-mounted onto `/N/NAME`),
//!    read-only shares remounted read-only, the tmpfs itself read-only;
//! 3. `pivot_root` into it and the old root detached: no other host path
//!    exists for the process any more (the passthrough library's
//!    `/proc/self/fd` directory is opened before, and kept as a descriptor;
//!    `/proc` itself is not mounted);
//! 4. as root, every capability dropped but those file serving needs
//!    (`DAC_OVERRIDE`, `DAC_READ_SEARCH`, `FOWNER`, `FSETID`, `SETUID`,
//!    `SETGID`: no `SYS_ADMIN`, so no mount or namespace change), and
//!    `no_new_privs`;
//! 5. `RLIMIT_NOFILE` raised to what its bounds need.
//!
//! Then it reports `{"ready":true}` on the channel (fd 3) and takes guest
//! connections from it, one thread each; each starts with
//! [`MOUNT_HELLO`] and the mount's index. A mount is served by its first
//! connection only. Its events go back as JSON (`refused`, `done`). When
//! the broker closes the channel, it waits for its connections to end
//! (the VM is gone by then) and exits.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_protocol::MOUNT_HELLO;
use fuse_backend_rs::api::server::Server;
use serde::{Deserialize, Serialize};

use super::fs::{Share, MAX_HANDLES, MAX_INODES};
use super::serve::{self, End, ReplyFile};
use super::sock;
use crate::audit::records::MountDone;

/// The channel's descriptor in the server.
pub const CHANNEL_FD: i32 = 3;
/// How long a new connection has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the broker tells the server (JSON on its stdin).
#[derive(Debug, Serialize, Deserialize)]
pub struct ServerConfig {
    /// An empty directory the server mounts its root on.
    pub root: PathBuf,
    /// The deny list's patterns (defaults and `--exclude`).
    pub exclude: Vec<String>,
    pub mounts: Vec<ShareConfig>,
}

/// One share.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShareConfig {
    pub source: PathBuf,
    pub target: String,
    pub readonly: bool,
    pub file: Option<String>,
    pub uid: u32,
    pub gid: u32,
}

/// What the server says.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    Ready,
    Error(String),
    Refused { index: Option<u32>, why: String },
    Done(MountDone),
}

fn say(chan: &OwnedFd, event: &Event) {
    if let Ok(bytes) = serde_json::to_vec(event) {
        if bytes.len() <= sock::MAX_MESSAGE {
            let _ = sock::send(chan, &bytes, None);
        }
    }
}

/// The process's entry point; its exit code.
pub fn main() -> u8 {
    // SAFETY: the broker passes the channel as fd 3; nothing else owns it.
    let chan = unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) };
    let config = match read_config() {
        Ok(c) => c,
        Err(e) => {
            say(&chan, &Event::Error(format!("config: {e}")));
            return 1;
        }
    };
    let shares = match jail_and_open(&config) {
        Ok(s) => s,
        Err(e) => {
            say(&chan, &Event::Error(e));
            return 1;
        }
    };
    say(&chan, &Event::Ready);
    accept_loop(&chan, &config, shares);
    0
}

fn read_config() -> io::Result<ServerConfig> {
    let mut text = Vec::new();
    io::stdin().take(1 << 20).read_to_end(&mut text)?;
    serde_json::from_slice(&text).map_err(io::Error::other)
}

fn cstr(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

fn check(rc: libc::c_int, what: &str) -> Result<(), String> {
    if rc < 0 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    what: &str,
) -> Result<(), String> {
    let src = src
        .map(cstr)
        .transpose()
        .map_err(|e| format!("{what}: {e}"))?;
    let target = cstr(target).map_err(|e| format!("{what}: {e}"))?;
    let fstype = fstype.map(|f| CString::new(f).unwrap_or_default());
    // SAFETY: every pointer is a live NUL-terminated string or null.
    let rc = unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    check(rc, what)
}

/// The flags a read-only remount of the bind at `path` must keep (a user
/// namespace may not clear the locked ones).
fn kept_flags(path: &Path) -> libc::c_ulong {
    let Ok(p) = cstr(path) else { return 0 };
    // SAFETY: `st` is written by statvfs; `p` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(p.as_ptr(), &mut st) } < 0 {
        return 0;
    }
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    flags
}

fn write_file(path: &str, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{path}: {e}"))
}

/// Steps 1–5 of the module doc; the shares, ready to serve.
fn jail_and_open(config: &ServerConfig) -> Result<Vec<Arc<Share>>, String> {
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == 0 {
        // SAFETY: unshare affects only this (single-threaded) process.
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) }, "unshare")?;
    } else {
        check(
            // SAFETY: as above.
            unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) },
            "unshare (user namespace)",
        )?;
        write_file("/proc/self/setgroups", "deny")?;
        write_file("/proc/self/uid_map", &format!("{uid} {uid} 1"))?;
        write_file("/proc/self/gid_map", &format!("{gid} {gid} 1"))?;
    }
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        "make mounts private",
    )?;
    let root = &config.root;
    mount(
        Some(Path::new("airlock-share")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "root tmpfs",
    )?;
    for (i, share) in config.mounts.iter().enumerate() {
        let dir = root.join(i.to_string());
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let point = match &share.file {
            Some(name) => {
                let p = dir.join(name);
                std::fs::File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                p
            }
            None => dir,
        };
        let what = format!("bind {}", share.source.display());
        mount(
            Some(&share.source),
            &point,
            None,
            libc::MS_BIND | libc::MS_REC,
            &what,
        )?;
        if share.readonly {
            let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | kept_flags(&point);
            mount(None, &point, None, flags, &format!("read-only {what}"))?;
        }
    }
    // The passthrough library opens /proc/self/fd here, before /proc is
    // gone; each share's root ("/N") is opened at the guest's FUSE_INIT,
    // inside the new root.
    let exclude = crate::door::files::Deny::exactly(config.exclude.clone());
    let mut shares = Vec::new();
    for (i, share) in config.mounts.iter().enumerate() {
        // The library switches to the owner for each operation unless it
        // is 0 ("stay as you are"): the server's own user needs no switch.
        let (ouid, ogid) = if (share.uid, share.gid) == (uid, gid) {
            (0, 0)
        } else {
            (share.uid, share.gid)
        };
        let deny = exclude.clone();
        let deny: super::fs::Deny = Box::new(move |name| deny.denies(name));
        let s = Share::new(&format!("/{i}"), share.readonly, deny, ouid, ogid)
            .map_err(|e| format!("share {i}: {e}"))?;
        shares.push(Arc::new(s));
    }
    // The new root, read-only, and nothing else.
    let croot = cstr(root).map_err(|e| e.to_string())?;
    // SAFETY: chdir to a NUL-terminated path.
    check(unsafe { libc::chdir(croot.as_ptr()) }, "chdir")?;
    // SAFETY: pivot_root(".", ".") stacks the old root under the new one;
    // it is detached right after.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check(if rc < 0 { -1 } else { 0 }, "pivot_root")?;
    // SAFETY: detaching the old root stacked on ".".
    let rc = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
    check(rc, "detach the old root")?;
    // SAFETY: chdir to "/".
    check(unsafe { libc::chdir(c"/".as_ptr()) }, "chdir /")?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        "read-only root",
    )?;
    raise_nofile(config.mounts.len() as u64);
    if uid == 0 {
        drop_capabilities()?;
    }
    // SAFETY: prctl with constant arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc, "no_new_privs")?;
    Ok(shares)
}

fn raise_nofile(shares: u64) {
    let want = (MAX_INODES + MAX_HANDLES) * shares.max(1) + 256;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is written by getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return;
    }
    let nr_open: u64 = 1 << 20;
    let target = want.min(nr_open);
    let new = libc::rlimit {
        rlim_cur: target.max(lim.rlim_cur),
        rlim_max: target.max(lim.rlim_max),
    };
    // SAFETY: setrlimit with a valid struct; on failure (not root) the
    // soft limit is raised as far as the hard one allows.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } < 0 {
        let soft = libc::rlimit {
            rlim_cur: target.min(lim.rlim_max),
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
    }
}

/// The capabilities the server keeps as root.
const KEEP: [u32; 6] = [
    1, // CAP_DAC_OVERRIDE
    2, // CAP_DAC_READ_SEARCH
    3, // CAP_FOWNER
    4, // CAP_FSETID
    6, // CAP_SETGID
    7, // CAP_SETUID
];

fn drop_capabilities() -> Result<(), String> {
    // The bounding set first (needs CAP_SETPCAP, still held).
    for cap in 0..64u32 {
        if KEEP.contains(&cap) {
            continue;
        }
        // SAFETY: prctl; EINVAL past the kernel's last capability ends it.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } < 0 {
            break;
        }
    }
    let mask: u32 = KEEP.iter().fold(0, |m, c| m | (1 << c));
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [
        Data {
            effective: mask,
            permitted: mask,
            inheritable: 0,
        },
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads the header and two data words we own.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(if rc < 0 { -1 } else { 0 }, "capset")
}

/// Takes connections from the channel until the broker closes it, then
/// waits for them to end.
fn accept_loop(chan: &OwnedFd, config: &ServerConfig, shares: Vec<Arc<Share>>) {
    let chan = Arc::new(chan.try_clone().unwrap_or_else(|_| {
        // SAFETY: fd 3 is ours; a failed dup leaves us the original.
        unsafe { OwnedFd::from_raw_fd(CHANNEL_FD) }
    }));
    let taken = Arc::new(Mutex::new(vec![false; shares.len()]));
    let targets: Arc<Vec<String>> =
        Arc::new(config.mounts.iter().map(|m| m.target.clone()).collect());
    let shares = Arc::new(shares);
    let mut threads = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        let (n, fd) = match sock::recv(chan.as_ref(), &mut buf) {
            Ok(got) => got,
            Err(_) => break,
        };
        if n == 0 {
            break;
        }
        let Some(fd) = fd else { continue };
        let (chan, taken, shares, targets) = (
            Arc::clone(&chan),
            Arc::clone(&taken),
            Arc::clone(&shares),
            Arc::clone(&targets),
        );
        let spawned = std::thread::Builder::new()
            .name("share-conn".into())
            .spawn(move || connection(fd, &chan, &taken, &shares, &targets));
        if let Ok(t) = spawned {
            threads.push(t);
        }
        threads.retain(|t| !t.is_finished());
    }
    for t in threads {
        let _ = t.join();
    }
}

fn connection(
    fd: OwnedFd,
    chan: &OwnedFd,
    taken: &Mutex<Vec<bool>>,
    shares: &[Arc<Share>],
    targets: &[String],
) {
    let mut stream = UnixStream::from(fd);
    let refuse = |index: Option<u32>, why: String| {
        say(chan, &Event::Refused { index, why });
    };
    let _ = stream.set_read_timeout(Some(HELLO_TIMEOUT));
    let mut hello = [0u8; 8];
    if let Err(e) = stream.read_exact(&mut hello) {
        refuse(None, format!("no hello: {e}"));
        return;
    }
    if hello[..4] != MOUNT_HELLO {
        refuse(None, "bad hello".into());
        return;
    }
    let index = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]);
    let Some(share) = shares.get(index as usize) else {
        refuse(Some(index), format!("no mount {index}"));
        return;
    };
    {
        let Ok(mut taken) = taken.lock() else { return };
        if taken[index as usize] {
            refuse(Some(index), "mount already connected".into());
            return;
        }
        taken[index as usize] = true;
    }
    let _ = stream.set_read_timeout(None);
    let server = Server::new(Arc::clone(share));
    let mut undecodable = 0;
    let end = match ReplyFile::new() {
        Ok(mut reply) => serve::serve(&mut stream, &server, &mut reply, &mut undecodable),
        Err(e) => End::Io(format!("reply buffer: {e}")),
    };
    let end = match end {
        End::Closed => "closed".to_owned(),
        End::BadLength(n) => {
            refuse(Some(index), format!("request length {n} out of bounds"));
            format!("request length {n} out of bounds")
        }
        End::Io(e) => e,
    };
    let c = &share.counts;
    say(
        chan,
        &Event::Done(MountDone {
            index,
            target: targets.get(index as usize).cloned().unwrap_or_default(),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            created: c.created.load(Ordering::Relaxed),
            removed: c.removed.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            undecodable,
            end,
        }),
    );
}
