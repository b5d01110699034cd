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

use std::collections::BTreeMap;

use kvm_bindings::{kvm_regs, kvm_sregs};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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

// The KVM ioctls the running VM uses, as the kernel's _IO/_IOR macros encode
// them (kvm-ioctls does not export its numbers).
const KVMIO: u64 = 0xAE;
const IOC_READ: u64 = 2;
const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    // A struct size always fits the 14-bit size field (checked by the test).
    (IOC_READ << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
/// `KVM_RUN`.
pub const KVM_RUN: u64 = io(0x80);
/// `KVM_GET_REGS` (the failure report's RIP).
pub const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_regs>());
/// `KVM_GET_SREGS` (the failure report's page-table walk).
pub const KVM_GET_SREGS: u64 = ior(0x83, std::mem::size_of::<kvm_sregs>());

const IOC_READ_WRITE: u64 = 3;
const fn iowr(nr: u64, size: usize) -> u64 {
    (IOC_READ_WRITE << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
/// `KVM_PRE_FAULT_MEMORY` (Linux 6.10; kvm-ioctls has no wrapper): used
/// while a restore is set up, before any filter is installed, so in no list.
pub const KVM_PRE_FAULT_MEMORY: u64 = iowr(
    0xd5,
    std::mem::size_of::<kvm_bindings::kvm_pre_fault_memory>(),
);
/// What a snapshot reads of the VM (the VMM thread) ...
const SNAPSHOT_VM_IOCTLS: [u64; 3] = [
    iowr(0x62, std::mem::size_of::<kvm_bindings::kvm_irqchip>()), // KVM_GET_IRQCHIP
    ior(0x7c, std::mem::size_of::<kvm_bindings::kvm_clock_data>()), // KVM_GET_CLOCK
    ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_pit_state2>()), // KVM_GET_PIT2
];
/// ... and of each vCPU (its own thread).
const SNAPSHOT_VCPU_IOCTLS: [u64; 8] = [
    iowr(0x88, std::mem::size_of::<kvm_bindings::kvm_msrs>()), // KVM_GET_MSRS
    ior(0x8e, std::mem::size_of::<kvm_bindings::kvm_lapic_state>()), // KVM_GET_LAPIC
    ior(0x98, std::mem::size_of::<kvm_bindings::kvm_mp_state>()), // KVM_GET_MP_STATE
    ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
    ior(0xa1, std::mem::size_of::<kvm_bindings::kvm_debugregs>()), // KVM_GET_DEBUGREGS
    ior(0xa4, std::mem::size_of::<kvm_bindings::kvm_xsave>()), // KVM_GET_XSAVE
    ior(0xa6, std::mem::size_of::<kvm_bindings::kvm_xcrs>()),  // KVM_GET_XCRS
    io(0xa3),                                                  // KVM_GET_TSC_KHZ
];

/// The compiled filters, one per kind of thread.
#[derive(Debug, Clone)]
pub struct Filters {
    /// For the VMM thread (event loop, devices, vsock muxer).
    pub vmm: BpfProgram,
    /// For each vCPU thread.
    pub vcpu: BpfProgram,
}

impl Filters {
    /// Compiles both filters (default action: trap, which kills the
    /// process; see the module docs).
    pub fn new() -> Result<Self, Error> {
        Ok(Self {
            vmm: compile(vmm_rules()?)?,
            vcpu: compile(vcpu_rules()?)?,
        })
    }

    /// The filters of a VM that writes a snapshot when its guest reaches
    /// the snapshot point (`--snapshot-to`): the same lists, plus the KVM
    /// ioctls that read the VM's and the vCPUs' state, and seeking and
    /// sizing the (already open) snapshot files on the VMM thread.
    pub fn for_snapshot() -> Result<Self, Error> {
        let mut vmm = vmm_rules()?;
        let mut vm_ioctls = vec![libc::FIONBIO];
        vm_ioctls.extend(SNAPSHOT_VM_IOCTLS);
        vmm.insert(libc::SYS_ioctl, ioctls(&vm_ioctls)?);
        vmm.insert(libc::SYS_lseek, Vec::new());
        vmm.insert(libc::SYS_ftruncate, Vec::new());
        let mut vcpu = vcpu_rules()?;
        let mut vcpu_ioctls = vec![KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS];
        vcpu_ioctls.extend(SNAPSHOT_VCPU_IOCTLS);
        vcpu.insert(libc::SYS_ioctl, ioctls(&vcpu_ioctls)?);
        Ok(Self {
            vmm: compile(vmm)?,
            vcpu: compile(vcpu)?,
        })
    }
}

/// How many system calls each list allows: (VMM thread, vCPU thread).
pub fn list_sizes() -> Result<(usize, usize), Error> {
    Ok((vmm_rules()?.len(), vcpu_rules()?.len()))
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

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn compile(rules: Rules) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(Error::Build)?;
    filter.try_into().map_err(Error::Compile)
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
    let mut rules = Rules::new();
    for &nr in allowed {
        rules.insert(nr, Vec::new());
    }
    // prctl: the capability checks the file system makes (PR_CAPBSET_READ)
    // and thread names; nothing that changes the process's privileges.
    rules.insert(
        libc::SYS_prctl,
        any_of(vec![
            vec![eq(0, libc::PR_CAPBSET_READ)?],
            vec![eq(0, libc::PR_SET_NAME)?],
            vec![eq(0, libc::PR_GET_NAME)?],
        ])?,
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

/// `arg == value` on the low 32 bits (ioctl numbers, domains, signals).
fn eq(arg: u8, value: impl TryInto<u64>) -> Result<SeccompCondition, Error> {
    let value = value
        .try_into()
        .map_err(|_| Error::Build(seccompiler::BackendError::InvalidArgumentNumber))?;
    eq64(arg, value)
}

fn eq64(arg: u8, value: u64) -> Result<SeccompCondition, Error> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(Error::Build)
}

/// `arg & mask == 0`.
fn clear(arg: u8, mask: u64) -> Result<SeccompCondition, Error> {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )
    .map_err(Error::Build)
}

/// One rule per alternative; each alternative's conditions must all hold.
fn any_of(alternatives: Vec<Vec<SeccompCondition>>) -> Result<Vec<SeccompRule>, Error> {
    alternatives
        .into_iter()
        .map(|c| SeccompRule::new(c).map_err(Error::Build))
        .collect()
}

fn ioctls(requests: &[u64]) -> Result<Vec<SeccompRule>, Error> {
    any_of(
        requests
            .iter()
            .map(|&r| eq(1, r).map(|c| vec![c]))
            .collect::<Result<_, _>>()?,
    )
}

/// No executable memory: the VMM maps no code after it starts.
fn no_exec(prot_arg: u8) -> Result<Vec<SeccompRule>, Error> {
    any_of(vec![vec![clear(
        prot_arg,
        libc::PROT_EXEC.unsigned_abs().into(),
    )?]])
}

/// What every thread needs to allocate, synchronise and end.
fn common(rules: &mut Rules) -> Result<(), Error> {
    let always: &[i64] = &[
        libc::SYS_read,           // eventfds, sockets (VMM) and eventfd drains (vCPU)
        libc::SYS_write,          // eventfds (irqs, exit), console, stderr, sockets
        libc::SYS_close,          // dropped connections, a vCPU's fds at thread end
        libc::SYS_futex,          // Mutex, channels, thread join
        libc::SYS_brk,            // malloc
        libc::SYS_munmap,         // free of large blocks, thread stacks
        libc::SYS_mremap,         // realloc of large buffers
        libc::SYS_madvise,        // malloc trimming, glibc frees a finished thread's stack
        libc::SYS_sched_yield,    // std's channel backoff
        libc::SYS_clock_gettime,  // Instant::now when the vDSO cannot read the clock
        libc::SYS_rt_sigprocmask, // thread exit and std's signal masking
        libc::SYS_rt_sigreturn,   // return from the vCPU kick handler
        libc::SYS_sigaltstack,    // std removes a thread's alternate signal stack at its end
        libc::SYS_getrandom,      // HashMap keys of a thread's first map
        libc::SYS_exit,           // a thread ends
        libc::SYS_exit_group,     // the process ends
    ];
    for &nr in always {
        rules.insert(nr, Vec::new());
    }
    rules.insert(libc::SYS_mmap, no_exec(2)?); // malloc arenas and large blocks
    rules.insert(libc::SYS_mprotect, no_exec(2)?); // malloc grows a thread arena
    Ok(())
}

fn vmm_rules() -> Result<Rules, Error> {
    let mut rules = Rules::new();
    common(&mut rules)?;
    let always: &[i64] = &[
        libc::SYS_epoll_create1,   // the event manager is built on this thread
        libc::SYS_epoll_ctl,       // (un)watching eventfds and connections
        libc::SYS_epoll_wait,      // the event loop
        libc::SYS_epoll_pwait,     // the same, as some libcs implement it
        libc::SYS_pread64,         // virtio-blk reads
        libc::SYS_pwrite64,        // virtio-blk writes (rw disks)
        libc::SYS_fdatasync,       // virtio-blk flush
        libc::SYS_connect,         // guest-initiated vsock connection to <uds>_PORT
        libc::SYS_accept4,         // host-initiated vsock connection on <uds>
        libc::SYS_recvfrom,        // vsock socket reads
        libc::SYS_sendto,          // vsock socket writes
        libc::SYS_shutdown,        // half-closing a vsock connection
        libc::SYS_getsockopt,      // SO_ERROR of a non-blocking connect
        libc::SYS_getpid,          // pthread_kill's tgkill needs the tgid
        libc::SYS_clock_nanosleep, // stop_vcpus waits between kicks
        libc::SYS_unlink,          // the muxer removes its socket at the end
    ];
    for &nr in always {
        rules.insert(nr, Vec::new());
    }
    // Only Unix sockets (vsock connections); no other family.
    rules.insert(libc::SYS_socket, any_of(vec![vec![eq(0, libc::AF_UNIX)?]])?);
    // set_nonblocking on sockets.
    rules.insert(libc::SYS_ioctl, ioctls(&[libc::FIONBIO])?);
    // fcntl: EventFd::try_clone in the event loop; std and the event manager
    // query and set fd flags.
    rules.insert(
        libc::SYS_fcntl,
        any_of(
            [
                libc::F_DUPFD_CLOEXEC,
                libc::F_GETFD,
                libc::F_SETFD,
                libc::F_GETFL,
                libc::F_SETFL,
            ]
            .iter()
            .map(|&op| eq(1, op).map(|c| vec![c]))
            .collect::<Result<_, _>>()?,
        )?,
    );
    // Kicking vCPU threads out of KVM_RUN, with the kick signal only.
    rules.insert(
        libc::SYS_tgkill,
        any_of(vec![vec![eq(2, crate::vcpu::kick_signal())?]])?,
    );
    Ok(rules)
}

fn vcpu_rules() -> Result<Rules, Error> {
    let mut rules = Rules::new();
    common(&mut rules)?;
    // Running the guest, and the registers for a failure report.
    rules.insert(
        libc::SYS_ioctl,
        ioctls(&[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS])?,
    );
    Ok(rules)
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
