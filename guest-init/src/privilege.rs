//! Who the command runs as when it runs directly in the VM (initramfs mode,
//! or `airlock run --no-container`): the agent user [`AGENT_UID`], never
//! root, unless the host asked for root (`airlock.vmroot=1`, `airlock run
//! --vm-root`).
//!
//! The agent user has no supplementary groups and no capability (effective,
//! permitted, inheritable, ambient and bounding sets all empty), runs with
//! `PR_SET_NO_NEW_PRIVS` (no setuid binary gives anything back) and under a
//! seccomp filter ([`filter`]) that refuses `socket(AF_VSOCK, …)` with
//! `EPERM`: only the init speaks to the host. The init itself is not
//! dumpable ([`make_undumpable`]), so nothing of another uid can `ptrace`
//! it or take its descriptors with `pidfd_getfd`.
//!
//! The drop happens in the forked child before exec ([`Agent::enter`]), with
//! raw system calls only: no allocation, no lock, nothing but
//! async-signal-safe work. The filter is built before the fork.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

use libc::{c_int, c_long, c_uint, sock_filter};

/// The agent's uid and gid (the first regular user of a Debian system).
pub const AGENT_UID: u32 = 1000;
/// The agent's gid.
pub const AGENT_GID: u32 = 1000;
/// The agent's `HOME` unless the spec sets one: on the VM's `/tmp` tmpfs,
/// made by the init before the command starts, owned by the agent.
pub const AGENT_HOME: &str = "/tmp/home";

/// `AUDIT_ARCH_X86_64` (`linux/audit.h`): the only ABI the filter lets
/// through; any other is refused whole.
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// System call numbers with this bit set are the x32 ABI's.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// `AF_VSOCK`.
const AF_VSOCK: u32 = 40;
/// x86_64 `socket(2)`.
const SYS_SOCKET: u32 = 41;
/// x86_64 `io_uring_setup(2)`: io_uring can open sockets without the
/// `socket` system call (the guest kernel has no io_uring; refused anyway).
const SYS_IO_URING_SETUP: u32 = 425;
/// Offsets in `struct seccomp_data`: `nr`, `arch`, the low half of
/// `args[0]` (little-endian; the kernel takes `socket`'s domain as an
/// `int`, so only the low 32 bits decide).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARG0_LOW: u32 = 16;

// Classic BPF opcodes (`linux/filter.h`): BPF_LD|BPF_W|BPF_ABS, and so on.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// `linux/capability.h` `_LINUX_CAPABILITY_VERSION_3`.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The agent's seccomp filter: everything is allowed except
/// `socket(AF_VSOCK, …)`, `io_uring_setup`, x32 system calls and any ABI
/// other than x86_64, which fail with `EPERM`.
pub fn filter() -> Vec<sock_filter> {
    let deny = SECCOMP_RET_ERRNO | u32::try_from(libc::EPERM).unwrap_or(1);
    vec![
        /* 0 */ stmt(BPF_LD_W_ABS, DATA_ARCH),
        /* 1 */ jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 0, 7), // else deny
        /* 2 */ stmt(BPF_LD_W_ABS, DATA_NR),
        /* 3 */ jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 5, 0), // x32: deny
        /* 4 */ jump(BPF_JMP_JEQ_K, SYS_IO_URING_SETUP, 4, 0), // deny
        /* 5 */ jump(BPF_JMP_JEQ_K, SYS_SOCKET, 0, 2), // else allow
        /* 6 */ stmt(BPF_LD_W_ABS, DATA_ARG0_LOW),
        /* 7 */ jump(BPF_JMP_JEQ_K, AF_VSOCK, 1, 0), // vsock: deny
        /* 8 */ stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
        /* 9 */ stmt(BPF_RET_K, deny),
    ]
}

/// What the child needs to become the agent user, prepared before the fork.
#[derive(Debug, Clone)]
pub struct Agent {
    filter: Vec<sock_filter>,
}

impl Default for Agent {
    fn default() -> Self {
        Self::new()
    }
}

impl Agent {
    pub fn new() -> Self {
        Self { filter: filter() }
    }

    /// In the forked child, before exec: drops every capability from the
    /// ambient and bounding sets, takes the agent's gid (no supplementary
    /// groups) and uid (which empties the permitted and effective sets),
    /// empties the inheritable set, sets `PR_SET_NO_NEW_PRIVS` and installs
    /// the filter. Async-signal-safe: raw system calls on memory prepared
    /// before the fork.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: (every call below) prctl, setgroups, setresgid, setresuid,
        // capset and seccomp are plain system calls; the only pointers
        // passed are to the live locals `header`/`data` and to `self.filter`
        // through `prog`, all of which outlive the calls, which only read
        // them (the kernel copies the filter).
        unsafe {
            check(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ))?;
            // Up to the kernel's last capability (EINVAL past it).
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    let err = io::Error::last_os_error();
                    if err.raw_os_error() == Some(libc::EINVAL) {
                        break;
                    }
                    return Err(err);
                }
            }
            check_long(libc::syscall(
                libc::SYS_setgroups,
                0 as c_long,
                std::ptr::null::<libc::gid_t>(),
            ))?;
            check_long(libc::syscall(
                libc::SYS_setresgid,
                AGENT_GID,
                AGENT_GID,
                AGENT_GID,
            ))?;
            check_long(libc::syscall(
                libc::SYS_setresuid,
                AGENT_UID,
                AGENT_UID,
                AGENT_UID,
            ))?;
            // struct __user_cap_header_struct, then two (version 3)
            // __user_cap_data_struct {effective, permitted, inheritable}.
            let header: [u32; 2] = [CAPABILITY_VERSION_3, 0];
            let data: [u32; 6] = [0; 6];
            check_long(libc::syscall(
                libc::SYS_capset,
                header.as_ptr(),
                data.as_ptr(),
            ))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            let prog = libc::sock_fprog {
                len: u16::try_from(self.filter.len()).unwrap_or(0),
                filter: self.filter.as_ptr().cast_mut(),
            };
            check_long(libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0 as c_uint,
                &prog as *const libc::sock_fprog,
            ))?;
        }
        Ok(())
    }
}

fn check(rc: c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_long(rc: c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Turns on the kernel's link protections (`fs.protected_hardlinks`,
/// `fs.protected_symlinks`): the agent user cannot hard-link a file it does
/// not own, e.g. a root-only one, into what the init sends as results.
/// Best effort: a failure is a warning on the console.
pub fn protect_links() {
    for knob in ["protected_hardlinks", "protected_symlinks"] {
        let path = format!("/proc/sys/fs/{knob}");
        if let Err(err) = std::fs::write(&path, b"1") {
            crate::console::warn(&format!("cannot set {path}: {err}"));
        }
    }
}

/// Makes the calling process (PID 1) not dumpable: only a process with
/// `CAP_SYS_PTRACE` may then `ptrace` it, read its memory or take its
/// descriptors (`pidfd_getfd`), and its `/proc` entries belong to root.
pub fn make_undumpable() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE) takes no pointers.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })
}

/// Gives `path` (not following a symlink) to the agent user.
pub fn chown_to_agent(path: &Path) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(AGENT_UID), Some(AGENT_GID))
}

/// Gives the open file or directory `fd` to the agent user.
pub fn fchown_to_agent(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fchown(2) takes no pointers; `fd` is open for the call.
    check(unsafe { libc::fchown(fd.as_raw_fd(), AGENT_UID, AGENT_GID) })
}

/// Makes `path` a directory owned by the agent with `mode` (creating it, or
/// taking over one that is there; a symlink there is an error).
pub fn agent_dir(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if !std::fs::symlink_metadata(path)?.is_dir() {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
        }
        Err(e) => return Err(e),
    }
    chown_to_agent(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// The filter, run by the kernel's own BPF checker: loading it in a
    /// child as root, then what the child may still do.
    #[test]
    fn the_agent_has_no_privilege_and_no_vsock() {
        // SAFETY: getuid(2) takes no pointers.
        if unsafe { libc::getuid() } != 0 {
            eprintln!("not root: the drop cannot be tried here");
            return;
        }
        let agent = Agent::new();
        let mut command = Command::new("sh");
        command.args(["-c", "id -u; id -g; id -G; grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)|^NoNewPrivs|^Seccomp:' /proc/self/status"]);
        // SAFETY: the closure runs in the forked child and makes only
        // system calls on memory prepared before the fork (the filter, the
        // locals); errors are built from errno without allocating.
        unsafe {
            command.pre_exec(move || {
                agent.enter()?;
                let vsock = libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0);
                if vsock >= 0 {
                    return Err(io::Error::from_raw_os_error(libc::EEXIST));
                }
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EPERM) {
                    return Err(err);
                }
                // The high half of the domain does not hide AF_VSOCK.
                let wide = libc::syscall(libc::SYS_socket, (1_i64 << 32) | 40, 1, 0);
                if wide >= 0 {
                    return Err(io::Error::from_raw_os_error(libc::EEXIST));
                }
                let unix = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if unix < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(unix);
                Ok(())
            });
        }
        let out = command.output().expect("spawn as the agent");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("1000"));
        assert_eq!(lines.next(), Some("1000"));
        assert_eq!(lines.next(), Some("1000"), "no supplementary group");
        for line in lines {
            let (name, value) = line.split_once(':').expect("a status line");
            let value = value.trim();
            match name {
                "NoNewPrivs" => assert_eq!(value, "1"),
                "Seccomp" => assert_eq!(value, "2"),
                _ => assert_eq!(value, "0000000000000000", "{name}"),
            }
        }
    }
}
