//! The jail: what a guest that took over this process would find.
//!
//! Two steps, both while the process is single-threaded:
//!
//! 1. [`enter_namespaces`], first thing in `main`: new mount, PID, network,
//!    IPC and UTS namespaces (and a user namespace when not started by root,
//!    mapping the invoking user to itself), then a fork: the child is PID 1
//!    of the new PID namespace and builds and runs the VM; the parent only
//!    waits for it and exits the same way (re-raising the signal that killed
//!    it, after saying so on stderr).
//! 2. [`Jail::lock_down`], once every file the VM needs is open (kernel and
//!    initrd loaded, disks, console, `/dev/kvm` and the vsock listener open):
//!    the root becomes an empty read-only tmpfs that holds only the vsock
//!    socket directory (bind-mounted read-only at its own path, so
//!    `<uds>_PORT` connects work), rlimits bound memory and files,
//!    `PR_SET_NO_NEW_PRIVS`, every capability is dropped (the bounding set
//!    too) and, when started by root, the process becomes an unprivileged
//!    uid/gid.
//!
//! No `RLIMIT_NPROC`: it counts every process of the uid, so VMMs running
//! at once as the same jail uid would share it, and KVM's own worker (a
//! task it creates for the VM at the first `KVM_RUN`) counts against it: a
//! limit of 0 made `KVM_RUN` fail with `EAGAIN` for ever. New tasks are
//! refused by the seccomp filters instead (neither allows `clone`, `fork`
//! or `execve`).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The uid and gid a VMM started by root runs as (`nobody`), unless told
/// otherwise. The broker gives this group access to a run's sockets.
pub const DEFAULT_ID: u32 = 65534;
/// Most file descriptors: KVM and vCPU fds, eventfds, disks and at most 64
/// vsock connections (plus pending ones) fit well below.
const MAX_FILES: u64 = 512;
/// Makes `new_root` (a mount point) this process's root and the old root
/// unreachable: `pivot_root` with the old root detached, or, where the
/// root is the initramfs (which cannot be pivoted away, as in the test
/// bed's L1), the new root moved over it and `chroot`, as `switch_root`
/// does (without `CAP_SYS_CHROOT` and with no directory open from outside,
/// that chroot cannot be left). The new root is then remounted read-only,
/// `nosuid`, `nodev`, `noexec`. Also used by the broker's share server.
pub fn enter_root(new_root: &Path) -> Result<(), Error> {
    let root = cstr(new_root)?;
    // SAFETY: chdir to a NUL-terminated path.
    check(unsafe { libc::chdir(root.as_ptr()) }, "enter the new root")?;
    let dot = c".";
    // pivot_root(".", "."): the old root ends up on top of the new one and
    // is detached right after (see pivot_root(2)).
    // SAFETY: raw pivot_root with two NUL-terminated paths.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if rc == 0 {
        // SAFETY: umount2 with a NUL-terminated path.
        let rc = unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) };
        check(rc, "detach the old root")?;
    } else if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        mount(Some(new_root), Path::new("/"), None, libc::MS_MOVE, None)?;
        // SAFETY: chroot to a NUL-terminated path.
        check(unsafe { libc::chroot(dot.as_ptr()) }, "chroot")?;
    } else {
        return Err(last("pivot_root"));
    }
    // SAFETY: chdir to a NUL-terminated path.
    check(unsafe { libc::chdir(c"/".as_ptr()) }, "enter the new root")?;
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
        None,
    )
}

/// Keeps only the capabilities numbered in `keep`: every other one leaves
/// the bounding set, the ambient set is cleared, and the effective and
/// permitted sets become exactly `keep` (inheritable empty). Also used by
/// the broker's share server.
pub fn keep_only_capabilities(keep: &[u32]) -> Result<(), Error> {
    let (ambient, clear_all) = (libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL);
    // SAFETY: prctl(PR_CAP_AMBIENT) only changes this process's ambient set.
    let rc = unsafe { libc::prctl(ambient, clear_all, 0, 0, 0) };
    check(rc, "clear the ambient capabilities")?;
    for cap in 0..64u32 {
        if keep.contains(&cap) {
            continue;
        }
        // SAFETY: prctl(PR_CAPBSET_DROP) on a capability number; EINVAL past the last one.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(last("drop the capability bounding set"));
        }
    }
    set_capabilities(
        keep.iter()
            .filter(|&&c| c < 32)
            .fold(0, |m, c| m | (1 << c)),
    )
}

/// Sets the effective and permitted capability sets to `mask` (the first
/// 32 capabilities; the rest and the inheritable set empty).
fn set_capabilities(mask: u32) -> Result<(), Error> {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    data[0].effective = mask;
    data[0].permitted = mask;
    // SAFETY: capset with a version-3 header and the two data words it reads.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check_long(rc, "set the capability sets")
}

/// Address space beyond guest RAM: the binary, heap, device buffers.
const AS_BASE: u64 = 512 << 20;
/// Address space per thread: its stack and the malloc arena glibc reserves
/// for it (64 MiB).
const AS_PER_THREAD: u64 = 80 << 20;

/// Errors setting up the jail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("jail: cannot {0}")]
    Sys(&'static str, #[source] io::Error),
    /// A path-related step failed.
    #[error("jail: cannot {what} {path}")]
    Path {
        /// The step.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn last(what: &'static str) -> Error {
    Error::Sys(what, io::Error::last_os_error())
}

fn check(rc: libc::c_int, what: &'static str) -> Result<(), Error> {
    if rc < 0 {
        Err(last(what))
    } else {
        Ok(())
    }
}

fn check_long(rc: libc::c_long, what: &'static str) -> Result<(), Error> {
    if rc < 0 {
        Err(last(what))
    } else {
        Ok(())
    }
}

fn cstr(path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Path {
        what: "use",
        path: path.to_path_buf(),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

/// Inside the new namespaces, before the lock-down.
#[derive(Debug)]
pub struct Jail {
    /// The uid/gid to become (the current ones inside a user namespace).
    uid: u32,
    gid: u32,
    /// Whether we are in our own user namespace (started unprivileged).
    user_ns: bool,
    /// `/proc/self/status` and `/proc/self/net/dev`, opened before the
    /// root goes away, for [`Jail::report`].
    report_files: Option<(File, File)>,
    /// Hangs up when the parent dies.
    parent_alive: OwnedFd,
}

/// Step 1: new namespaces and a fork. Returns in the child only; the parent
/// waits for the child and exits like it. `jail_id` is the uid and gid to
/// become if started by root; `report` keeps what [`Jail::report`] reads.
pub fn enter_namespaces(jail_id: u32, report: bool) -> Result<Jail, Error> {
    // SAFETY: geteuid/getegid have no preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let user_ns = euid != 0;
    if !user_ns && jail_id == 0 {
        return Err(Error::Sys(
            "run as root inside the jail (--jail-uid 0); use --no-jail to debug",
            io::ErrorKind::InvalidInput.into(),
        ));
    }
    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    if user_ns {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: unshare(2) changes only this (single-threaded) process's namespaces.
    check(unsafe { libc::unshare(flags) }, "create namespaces")?;
    if user_ns {
        // Map the invoking user (and group) to itself: we stay who we were.
        write_file("/proc/self/setgroups", "deny")?;
        write_file("/proc/self/uid_map", &format!("{euid} {euid} 1\n"))?;
        write_file("/proc/self/gid_map", &format!("{egid} {egid} 1\n"))?;
    }
    // The parent holds the write end until it dies: the child sees the
    // read end hang up (getppid() says nothing across the PID namespace).
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    check(rc, "create the parent pipe")?;
    // SAFETY: pipe2 just returned these two fds, owned by nothing else.
    let (parent_alive, parent_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: called while single-threaded (first thing in main), so the
    // child is a complete copy with no lock held by a vanished thread.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last("fork into the new PID namespace"));
    }
    if pid > 0 {
        drop(parent_alive);
        wait_and_mirror(pid, parent_end);
    }
    drop(parent_end);
    // The child: die with the parent (which the broker kills).
    die_with_parent(&parent_alive)?;
    let report_files = if report {
        let open = |p: &str| {
            File::open(p).map_err(|source| Error::Path {
                what: "open",
                path: p.into(),
                source,
            })
        };
        Some((open("/proc/self/status")?, open("/proc/self/net/dev")?))
    } else {
        None
    };
    let (uid, gid) = if user_ns {
        (euid, egid)
    } else {
        (jail_id, jail_id)
    };
    Ok(Jail {
        uid,
        gid,
        user_ns,
        report_files,
        parent_alive,
    })
}

/// Arms `PR_SET_PDEATHSIG` (again: a change of credentials disarms it), then
/// makes sure the parent did not die before that.
fn die_with_parent(parent_alive: &OwnedFd) -> Result<(), Error> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    check(rc, "set the parent-death signal")?;
    let mut pfd = libc::pollfd {
        fd: parent_alive.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, no wait.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    check(rc, "check the parent")?;
    if pfd.revents != 0 {
        return Err(Error::Sys(
            "outlive the parent",
            io::ErrorKind::BrokenPipe.into(),
        ));
    }
    Ok(())
}

fn write_file(path: &str, content: &str) -> Result<(), Error> {
    std::fs::write(path, content).map_err(|source| Error::Path {
        what: "write",
        path: path.into(),
        source,
    })
}

/// The parent's whole life after the fork: wait for the child, then exit
/// with its code or die of its signal.
fn wait_and_mirror(child: libc::pid_t, _alive: OwnedFd) -> ! {
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; status is a valid out pointer.
        let rc = unsafe { libc::waitpid(child, &mut status, 0) };
        if rc == child {
            break;
        }
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            eprintln!(
                "airlock-vmm: error: lost the jailed VMM process: {}",
                io::Error::last_os_error()
            );
            // SAFETY: _exit(2) ends the process; nothing needs flushing.
            unsafe { libc::_exit(1) };
        }
    }
    if libc::WIFEXITED(status) {
        // SAFETY: as above.
        unsafe { libc::_exit(libc::WEXITSTATUS(status)) };
    }
    let signal = libc::WTERMSIG(status);
    if signal == libc::SIGSYS {
        eprintln!(
            "airlock-vmm: error: the VMM was killed by SIGSYS: one of its threads made a \
             system call its seccomp filter does not allow (a bug, or a guest attacking the VMM)"
        );
    } else {
        eprintln!("airlock-vmm: error: the VMM was killed by signal {signal}");
    }
    // Die the same way, without a core file.
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a valid struct; signal/raise on our own process.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
        libc::_exit(128 + signal)
    }
}

/// The rlimit on address space for a VM of `mem_bytes` and `cpus` vCPUs.
pub fn address_space_limit(mem_bytes: u64, cpus: u8) -> u64 {
    mem_bytes
        .saturating_add(AS_BASE)
        .saturating_add(AS_PER_THREAD.saturating_mul(u64::from(cpus) + 1))
}

impl Jail {
    /// Step 2: empty root with only `socket_dir` (if any), rlimits, no new
    /// privileges, no capabilities, the unprivileged ids.
    pub fn lock_down(
        &self,
        socket_dir: Option<&Path>,
        mem_bytes: u64,
        cpus: u8,
    ) -> Result<(), Error> {
        self.pivot_to_empty_root(socket_dir)?;
        set_rlimit(libc::RLIMIT_NOFILE, MAX_FILES, "limit open files")?;
        set_rlimit(
            libc::RLIMIT_AS,
            address_space_limit(mem_bytes, cpus),
            "limit the address space",
        )?;
        set_rlimit(libc::RLIMIT_CORE, 0, "disable core files")?;
        set_rlimit(libc::RLIMIT_MEMLOCK, 0, "limit locked memory")?;
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) only sets a flag on this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        check(rc, "set no_new_privs")?;
        drop_capabilities(self.uid, self.gid, self.user_ns)?;
        die_with_parent(&self.parent_alive)
    }

    fn pivot_to_empty_root(&self, socket_dir: Option<&Path>) -> Result<(), Error> {
        let socket_dir = socket_dir
            .map(|d| {
                d.canonicalize().map_err(|source| Error::Path {
                    what: "resolve the socket directory",
                    path: d.to_path_buf(),
                    source,
                })
            })
            .transpose()?;
        // Nothing we mount propagates back to the host.
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            None,
        )?;
        // The socket directory, kept reachable while /tmp is covered below.
        let dir_fd = match &socket_dir {
            Some(d) => Some(File::open(d).map_err(|source| Error::Path {
                what: "open",
                path: d.clone(),
                source,
            })?),
            None => None,
        };
        // The new root: a small tmpfs over /tmp (which exists everywhere).
        let new_root = Path::new("/tmp");
        mount(
            Some(Path::new("tmpfs")),
            new_root,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("size=64k,nr_inodes=64,mode=0755"),
        )?;
        if let (Some(dir), Some(fd)) = (&socket_dir, &dir_fd) {
            let relative = dir.strip_prefix("/").unwrap_or(dir);
            let target = new_root.join(relative);
            std::fs::create_dir_all(&target).map_err(|source| Error::Path {
                what: "create",
                path: target.clone(),
                source,
            })?;
            let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            mount(Some(&source), &target, None, libc::MS_BIND, None)?;
            // Read-only: connecting needs no write to the directory. Keep the
            // flags the host's mount has (a user namespace may not clear them).
            let locked = statvfs_flags(&target)?;
            mount(
                None,
                &target,
                None,
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC
                    | locked,
                None,
            )?;
        }
        drop(dir_fd);
        enter_root(new_root)
    }

    /// For tests (`--test-report-jail`): prints, from inside the jail, the
    /// uid and gid, the capability sets, the network interfaces and whether a
    /// host file can be opened, as `jail-report: KEY VALUE` lines on stderr.
    pub fn report(&self) {
        // SAFETY: the id getters have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        eprintln!("jail-report: uid {uid} gid {gid}");
        if let Some((status, netdev)) = &self.report_files {
            for line in reread(status).lines() {
                if line.starts_with("Cap")
                    || line.starts_with("NoNewPrivs")
                    || line.starts_with("Seccomp")
                {
                    eprintln!("jail-report: {}", line.replace(":\t", " "));
                }
            }
            // /proc/net/dev: two header lines, then one line per interface.
            let ifaces: Vec<String> = reread(netdev)
                .lines()
                .skip(2)
                .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
                .collect();
            eprintln!("jail-report: interfaces [{}]", ifaces.join(","));
            for name in &ifaces {
                let state = if interface_is_up(name) { "up" } else { "down" };
                eprintln!("jail-report: interface {name} {state}");
            }
        }
        for path in ["/etc/passwd", "/dev/kvm", "/proc/self/status"] {
            match File::open(path) {
                Ok(_) => eprintln!("jail-report: open {path} ok"),
                Err(e) => eprintln!(
                    "jail-report: open {path} failed errno {}",
                    e.raw_os_error().unwrap_or(0)
                ),
            }
        }
    }
}

/// Whether interface `name` is up (`SIOCGIFFLAGS` on a Unix socket: no
/// other family is needed to ask).
fn interface_is_up(name: &str) -> bool {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: socket returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = libc::c_char::from_ne_bytes([s]);
    }
    // SAFETY: SIOCGIFFLAGS reads the name and fills the flags of `req`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    rc == 0 && i32::from(unsafe { req.ifr_ifru.ifru_flags }) & libc::IFF_UP != 0
}

fn reread(mut file: &File) -> String {
    let mut text = String::new();
    if file.rewind().is_ok() {
        let _ = file.read_to_string(&mut text);
    }
    text
}

/// mount(2) with paths; an error names the target.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Error> {
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // across the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc < 0 {
        return Err(Error::Path {
            what: "mount on",
            path: target.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The mount flags of the file system holding `path` that a bind remount
/// must keep (`MS_NOSUID`, `MS_NODEV`, `MS_NOEXEC`, `MS_RDONLY`, atime).
pub fn statvfs_flags(path: &Path) -> Result<libc::c_ulong, Error> {
    let c = cstr(path)?;
    // SAFETY: statvfs fills the zeroed struct for a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    check(rc, "stat a mount")?;
    let pairs = [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(pairs
        .iter()
        .filter(|(st_flag, _)| st.f_flag & st_flag != 0)
        .fold(0, |acc, (_, ms)| acc | ms))
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    limit: u64,
    what: &'static str,
) -> Result<(), Error> {
    let lim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit with a valid struct.
    check(unsafe { libc::setrlimit(resource, &lim) }, what)
}

/// Drops the bounding set, becomes `uid`/`gid` (no supplementary groups)
/// and clears every capability set.
fn drop_capabilities(uid: u32, gid: u32, user_ns: bool) -> Result<(), Error> {
    let (ambient, clear_all) = (libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL);
    // SAFETY: prctl(PR_CAP_AMBIENT) only changes this process's ambient set.
    let rc = unsafe { libc::prctl(ambient, clear_all, 0, 0, 0) };
    check(rc, "clear the ambient capabilities")?;
    for cap in 0..64 {
        // SAFETY: prctl(PR_CAPBSET_DROP) on a capability number; EINVAL past the last one.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(last("drop the capability bounding set"));
        }
    }
    if !user_ns {
        // SAFETY: setgroups with an empty list; setresgid/setresuid with plain ids.
        unsafe {
            check(
                libc::setgroups(0, std::ptr::null()),
                "drop supplementary groups",
            )?;
            check(libc::setresgid(gid, gid, gid), "set the jail gid")?;
            check(libc::setresuid(uid, uid, uid), "set the jail uid")?;
        }
    }
    // Effective, permitted and inheritable sets to zero (setresuid already
    // cleared them when leaving root; in a user namespace it is needed).
    set_capabilities(0)?;
    // Make sure nothing brings root back.
    // SAFETY: setuid(2) with a plain id; it must fail now.
    if !user_ns && unsafe { libc::setuid(0) } == 0 {
        return Err(Error::Sys(
            "drop root for good",
            io::ErrorKind::PermissionDenied.into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_space_grows_with_ram_and_threads() {
        let one = address_space_limit(256 << 20, 1);
        assert_eq!(one, (256 << 20) + AS_BASE + 2 * AS_PER_THREAD);
        assert!(address_space_limit(1 << 30, 1) > one);
        assert!(address_space_limit(256 << 20, 4) > one);
        assert_eq!(address_space_limit(u64::MAX, 16), u64::MAX);
    }
}
