//! Per-thread seccomp filters (built with rust-vmm's `seccompiler`).
//!
//! Each thread installs its own filter once its setup is done and before it
//! touches guest-controlled data: a vCPU thread first thing in its thread
//! function, the VMM (event-loop) thread once every vCPU thread exists. A
//! system call outside the list is never executed and kills the whole
//! process by `SIGSYS`: a half-dead VMM is worse than a dead one, and the
//! broker then reports the run as failed.
//!
//! The kill goes through `SECCOMP_RET_TRAP` rather than
//! `SECCOMP_RET_KILL_PROCESS` so that the process can say why first: the
//! trap's handler ([`install_sigsys_handler`]) writes which system call it
//! was to stderr, then makes another forbidden call while `SIGSYS` is
//! blocked in the handler, and the kernel then kills the process with
//! `SIGSYS` as the default action (see `force_sig_seccomp`). Code that took
//! over the VMM cannot undo that: `rt_sigaction` is not allowed (a new
//! handler cannot be installed), and blocking `SIGSYS` makes the kernel kill
//! at once. With `KILL_PROCESS` the message could only come from outside,
//! after the sockets had already closed.
//!
//! The lists were taken from `strace -f` of full runs in the test bed
//! (initramfs and image boot, vsock control session, workspace in and
//! results out, 50 MB of output) plus the error paths read from the code.
//! Everything done during setup (opening files, KVM_CREATE_*, binding the
//! vsock socket, spawning threads) is not in them.
//!
//! The lists live in [`crate::seccomp_rules`], which `vmm/build.rs` also
//! compiles to BPF at build time: [`Filters::new`] and
//! [`Filters::for_snapshot`] hand out those programs (a test checks they
//! are what the lists compile to now) unless this process's kick signal is
//! not the one they were built for, and then compile the lists.

use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::seccomp_rules::{self as rules, any_of, eq, snapshot_rules, vcpu_rules, vmm_rules};
pub use crate::seccomp_rules::{KVM_GET_REGS, KVM_GET_SREGS, KVM_PRE_FAULT_MEMORY, KVM_RUN};

/// The programs `vmm/build.rs` compiled from [`crate::seccomp_rules`].
mod prebuilt {
    include!(concat!(env!("OUT_DIR"), "/seccomp_prebuilt.rs"));
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rule or the filter is malformed (a bug in this module).
    #[error("failed to build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// The filter could not be compiled to BPF.
    #[error("failed to compile the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    /// `seccomp(2)` refused the filter.
    #[error("failed to install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// The compiled filters, one per kind of thread.
#[derive(Debug, Clone)]
pub struct Filters {
    /// For the VMM thread (event loop, devices, vsock muxer).
    pub vmm: BpfProgram,
    /// For each vCPU thread.
    pub vcpu: BpfProgram,
}

impl Filters {
    /// Both filters (default action: trap, which kills the process; see
    /// the module docs): the build's programs, or compiled now.
    pub fn new() -> Result<Self, Error> {
        match Self::built(prebuilt::VMM, prebuilt::VCPU) {
            Some(filters) => Ok(filters),
            None => Self::compiled(),
        }
    }

    /// Both filters, compiled now from the lists.
    pub fn compiled() -> Result<Self, Error> {
        let kick = crate::vcpu::kick_signal();
        Ok(Self {
            vmm: compile(vmm_rules(kick).map_err(Error::Build)?)?,
            vcpu: compile(vcpu_rules().map_err(Error::Build)?)?,
        })
    }

    /// The filters of a VM that writes a snapshot when its guest reaches
    /// the snapshot point (`--snapshot-to`): the same lists, plus the KVM
    /// ioctls that read the VM's and the vCPUs' state, and seeking and
    /// sizing the (already open) snapshot files on the VMM thread.
    pub fn for_snapshot() -> Result<Self, Error> {
        match Self::built(prebuilt::SNAPSHOT_VMM, prebuilt::SNAPSHOT_VCPU) {
            Some(filters) => Ok(filters),
            None => Self::compiled_for_snapshot(),
        }
    }

    /// [`Filters::for_snapshot`], compiled now from the lists.
    pub fn compiled_for_snapshot() -> Result<Self, Error> {
        let (vmm, vcpu) = snapshot_rules(crate::vcpu::kick_signal()).map_err(Error::Build)?;
        Ok(Self {
            vmm: compile(vmm)?,
            vcpu: compile(vcpu)?,
        })
    }

    /// The build's programs, if they were built for this process's kick
    /// signal (the one signal the VMM thread may send its vCPU threads).
    fn built(vmm: &[(u16, u8, u8, u32)], vcpu: &[(u16, u8, u8, u32)]) -> Option<Self> {
        if crate::vcpu::kick_signal() != prebuilt::KICK_SIGNAL {
            return None;
        }
        let program = |p: &[(u16, u8, u8, u32)]| -> BpfProgram {
            p.iter()
                .map(|&(code, jt, jf, k)| sock_filter { code, jt, jf, k })
                .collect()
        };
        Some(Self {
            vmm: program(vmm),
            vcpu: program(vcpu),
        })
    }
}

/// How many system calls each list allows: (VMM thread, vCPU thread).
pub fn list_sizes() -> Result<(usize, usize), Error> {
    let vmm = vmm_rules(crate::vcpu::kick_signal()).map_err(Error::Build)?;
    Ok((vmm.len(), vcpu_rules().map_err(Error::Build)?.len()))
}

/// Installs `filter` on the calling thread (and sets `PR_SET_NO_NEW_PRIVS`,
/// which seccomp requires of an unprivileged caller).
pub fn apply(filter: &BpfProgram) -> Result<(), Error> {
    seccompiler::apply_filter(filter).map_err(Error::Install)
}

/// Installs the process-wide `SIGSYS` handler that reports a refused
/// system call and then has the kernel kill the process (module docs).
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: sigaction with a zeroed struct whose handler is a valid
    // extern "C" function taking the SA_SIGINFO arguments.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The report, then death. Only async-signal-safe calls: write(2) of a
/// stack buffer, then a forbidden system call.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // For SIGSYS the kernel fills `_sigsys { void *_call_addr; int _syscall;
    // unsigned _arch; }` at the union's start, 16 bytes in on x86_64.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t; offset 24 is the
        // `_syscall` field of its SIGSYS layout, inside the struct.
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(24).cast::<i32>()) }
    };
    let mut buf = [0u8; 192];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < buf.len() {
                buf[len] = b;
                len += 1;
            }
        }
    };
    put(b"airlock-vmm: error: seccomp: a VMM thread made system call ");
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    if nr < 0 {
        put(b"-");
    }
    put(&digits[i..]);
    put(b", which its filter does not allow: killed by SIGSYS\n");
    // SAFETY: write(2) of an initialised stack buffer to stderr, then a
    // system call neither filter allows: with SIGSYS blocked in this
    // handler, the kernel kills the process.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::SYS_getppid);
        // Not reached with a filter installed.
        libc::_exit(128 + libc::SIGSYS);
    }
}

fn compile(rules: rules::Rules) -> Result<BpfProgram, Error> {
    rules::compile(rules).map_err(Error::Compile)
}

/// The filter of the broker's share server (live mounts), installed once
/// it is jailed and before it reads a guest request; its connection
/// threads inherit it. Unlike the VMM's, a call outside the list fails
/// with `EPERM` rather than killing the process: every mount of the
/// sandbox lives in that process, and a refused call must cost the guest
/// one request, not all its mounts. No `execve`, no sockets but the ones
/// it was given, no mounts, no namespaces, no `ptrace`.
pub fn share_server() -> Result<BpfProgram, Error> {
    let allowed: &[i64] = &[
        // Files under the shares (the passthrough file system).
        libc::SYS_openat,
        libc::SYS_close,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fstatfs,
        libc::SYS_getdents64,
        libc::SYS_readlinkat,
        libc::SYS_mkdirat,
        libc::SYS_mknodat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_linkat,
        libc::SYS_symlinkat,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchownat,
        libc::SYS_utimensat,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fcntl,
        libc::SYS_dup,
        libc::SYS_umask,
        // The reply buffer of each connection.
        libc::SYS_memfd_create,
        // Acting as the share's owner, and CAP_FSETID around writes.
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_capget,
        libc::SYS_capset,
        // The channel to the broker and the guest connections it hands over.
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_setsockopt,
        libc::SYS_shutdown,
        // Threads (one per connection) and memory.
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_futex,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    let mut rules = rules::Rules::new();
    for &nr in allowed {
        rules.insert(nr, Vec::new());
    }
    // prctl: the capability checks the file system makes (PR_CAPBSET_READ)
    // and thread names; nothing that changes the process's privileges.
    rules.insert(
        libc::SYS_prctl,
        any_of(vec![
            vec![eq(0, libc::PR_CAPBSET_READ).map_err(Error::Build)?],
            vec![eq(0, libc::PR_SET_NAME).map_err(Error::Build)?],
            vec![eq(0, libc::PR_GET_NAME).map_err(Error::Build)?],
        ])
        .map_err(Error::Build)?,
    );
    let errno = u32::try_from(libc::EPERM).unwrap_or(1);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(errno),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(Error::Build)?;
    filter.try_into().map_err(Error::Compile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_PRE_FAULT_MEMORY, 0xc040_aed5);
    }

    #[test]
    fn snapshot_ioctl_numbers_match_the_kernel_headers() {
        // From <linux/kvm.h> on x86_64.
        use crate::seccomp_rules::{SNAPSHOT_VCPU_IOCTLS, SNAPSHOT_VM_IOCTLS};
        assert_eq!(SNAPSHOT_VM_IOCTLS, [0xc208_ae62, 0x8030_ae7c, 0x8070_ae9f]);
        assert_eq!(
            SNAPSHOT_VCPU_IOCTLS,
            [
                0xc008_ae88,
                0x8400_ae8e,
                0x8004_ae98,
                0x8040_ae9f,
                0x8080_aea1,
                0x9000_aea4,
                0x8188_aea6,
                0xaea3
            ]
        );
        Filters::for_snapshot().expect("snapshot filters");
    }

    #[test]
    fn the_build_s_programs_are_what_the_lists_compile_to_now() {
        assert_eq!(prebuilt::KICK_SIGNAL, crate::vcpu::kick_signal());
        let (built, now) = (
            Filters::new().expect("built"),
            Filters::compiled().expect("now"),
        );
        assert_eq!((built.vmm, built.vcpu), (now.vmm, now.vcpu));
        let built = Filters::for_snapshot().expect("built");
        let now = Filters::compiled_for_snapshot().expect("now");
        assert_eq!((built.vmm, built.vcpu), (now.vmm, now.vcpu));
        // And they are not the same program twice.
        assert_ne!(
            Filters::new().expect("a").vmm,
            Filters::new().expect("b").vcpu
        );
        assert_ne!(prebuilt::VMM, prebuilt::SNAPSHOT_VMM);
    }

    #[test]
    fn both_filters_compile_and_are_small() {
        let f = Filters::new().expect("filters");
        assert!(!f.vmm.is_empty() && !f.vcpu.is_empty());
        let (vmm, vcpu) = list_sizes().expect("sizes");
        // A change to either list is a decision: update the count here.
        assert_eq!((vmm, vcpu), (38, 19));
    }

    /// Runs `body` in a forked child with `filter` installed; returns how
    /// the child ended (`Ok(code)` or `Err(signal)`).
    fn in_child(filter: &BpfProgram, body: fn() -> i32) -> Result<i32, i32> {
        // SAFETY: the child only installs the prebuilt filter, makes raw
        // system calls and _exits; it touches no lock another thread of the
        // test harness could hold.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = if apply(filter).is_ok() { body() } else { 99 };
            // SAFETY: ends the forked child without running Rust's exit path.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above; status is a valid out pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        if libc::WIFSIGNALED(status) {
            Err(libc::WTERMSIG(status))
        } else {
            Ok(libc::WEXITSTATUS(status))
        }
    }

    #[test]
    fn the_vmm_filter_allows_unix_sockets_and_kills_on_inet() {
        let f = Filters::new().expect("filters");
        let unix = || {
            // SAFETY: plain socket(2) and close(2) on the returned fd.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            // SAFETY: closes the fd just opened.
            i32::from(fd < 0 || unsafe { libc::close(fd) } != 0)
        };
        assert_eq!(in_child(&f.vmm, unix), Ok(0));
        // SAFETY: plain socket(2); the filter kills the child before it returns.
        let inet = || unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert_eq!(in_child(&f.vmm, inet), Err(libc::SIGSYS));
    }

    #[test]
    fn the_trap_handler_still_ends_the_process_by_sigsys() {
        let f = Filters::new().expect("filters");
        // Inherited by the forked child (and harmless in the test process,
        // which has no filter).
        install_sigsys_handler().expect("handler");
        // SAFETY: plain socket(2); the filter traps it, the handler reports
        // and the second trap kills.
        let inet = || unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert_eq!(in_child(&f.vmm, inet), Err(libc::SIGSYS));
    }

    #[test]
    fn the_vcpu_filter_allows_kvm_run_only_among_ioctls() {
        let f = Filters::new().expect("filters");
        // KVM_RUN on a bad fd passes the filter and fails with EBADF.
        let run = || {
            // SAFETY: an ioctl on an fd that is not open fails with EBADF.
            let rc = unsafe { libc::ioctl(-1, KVM_RUN as libc::c_ulong, 0) };
            i32::from(rc != -1)
        };
        assert_eq!(in_child(&f.vcpu, run), Ok(0));
        // SAFETY: as above; the filter kills the child first.
        let other = || unsafe { libc::ioctl(-1, libc::FIONBIO as libc::c_ulong, 0) };
        assert_eq!(in_child(&f.vcpu, other), Err(libc::SIGSYS));
        // SAFETY: getpid(2) has no arguments; the vCPU filter does not allow it.
        let getpid = || unsafe { libc::getpid() };
        assert_eq!(in_child(&f.vcpu, getpid), Err(libc::SIGSYS));
    }
}
