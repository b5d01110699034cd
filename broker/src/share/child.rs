//! The share server process (`airlock share-server`, started by the
//! broker, never by hand): one per sandbox with live mounts.
//!
//! Before it serves anything it jails itself:
//! 1. its own mount namespace (as a non-root user, inside its own user
//!    namespace that maps only that user), every mount private;
//! 2. a fresh tmpfs root holding `/N` for mount `N`: the source directory
//!    bind-mounted there (a single file: bind-mounted onto `/N/NAME`),
//!    read-only shares remounted read-only, the tmpfs itself read-only;
//! 3. that root entered (`pivot_root` with the old root detached, or where
//!    the root is an initramfs, moved over it and `chroot`: the VMM's own
//!    `jail::enter_root`): no other host path exists for the process any
//!    more (the passthrough library's
//!    `/proc/self/fd` directory is opened before, and kept as a descriptor;
//!    `/proc` itself is not mounted);
//! 4. as root, every capability dropped but those file serving needs
//!    (`DAC_OVERRIDE`, `DAC_READ_SEARCH`, `FOWNER`, `FSETID`, `SETUID`,
//!    `SETGID`: no `SYS_ADMIN`, so no mount or namespace change), and
//!    `no_new_privs`;
//! 5. `RLIMIT_NOFILE` raised to what its bounds need;
//! 6. a seccomp filter (`airlock_vmm::seccomp::share_server`): file
//!    serving, its channel, threads and memory; anything else (`execve`,
//!    new sockets, mounts, namespaces, `ptrace`) fails with `EPERM`.
//!
//! Then it reports `{"ready":true}` on the channel (fd 3) and takes guest
//! connections from it, one thread each; each starts with
//! [`MOUNT_HELLO`] and the mount's index. A mount is served by its first
//! connection only. Its events go back as JSON (`refused`, `done`). When
//! the broker closes the channel, it waits for its connections to end
//! (the VM is gone by then) and exits.

use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock_protocol::MOUNT_HELLO;
use airlock_vmm::jail;
use fuse_backend_rs::api::server::Server;
use serde::{Deserialize, Serialize};

use super::fs::{Share, MAX_HANDLES, MAX_INODES};
use super::serve::{self, End};
use super::sock;
use super::MountSpec;
use crate::audit::records::MountDone;
use crate::text::report;

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
    pub mounts: Vec<MountSpec>,
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
    jail::mount(src, target, fstype, flags, None).map_err(|e| format!("{what}: {}", report(&e)))
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
        // A read-only share is bound without the mounts below its source:
        // a read-only remount covers only the mount it is applied to, so a
        // mount nested in the source would stay writable in the jail.
        let recursive = if share.readonly { 0 } else { libc::MS_REC };
        mount(
            Some(&share.source),
            &point,
            None,
            libc::MS_BIND | recursive,
            &what,
        )?;
        if share.readonly {
            let kept = jail::statvfs_flags(&point).map_err(|e| report(&e))?;
            let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | kept;
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
        let limits = super::fs::Limits {
            max_write_bytes: share.max_write_bytes,
            max_created: share.max_files,
        };
        let s = Share::new(&format!("/{i}"), share.readonly, deny, (ouid, ogid), limits)
            .map_err(|e| format!("share {i}: {e}"))?;
        shares.push(Arc::new(s));
    }
    // The new root, read-only, and nothing else.
    jail::enter_root(root).map_err(|e| report(&e))?;
    raise_nofile(config.mounts.len() as u64);
    if uid == 0 {
        jail::keep_only_capabilities(&KEEP).map_err(|e| report(&e))?;
    }
    // SAFETY: prctl with constant arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc, "no_new_privs")?;
    let filter = airlock_vmm::seccomp::share_server().map_err(|e| report(&e))?;
    airlock_vmm::seccomp::apply(&filter).map_err(|e| report(&e))?;
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
    let undecodable = AtomicU64::new(0);
    let end = match stream.try_clone() {
        Ok(mut reader) => serve::serve(
            &mut reader,
            &mut stream,
            &server,
            serve::WORKERS,
            &undecodable,
        ),
        Err(e) => End::Io(format!("stream: {e}")),
    };
    let undecodable = undecodable.into_inner();
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
