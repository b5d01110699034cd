//! The VMM's seccomp lists (module [`crate::seccomp`] says why each call is
//! there), as rules for rust-vmm's `seccompiler`.
//!
//! This file is also compiled into `vmm/build.rs`, which turns the lists
//! into BPF programs at build time (as Firecracker does with its filters):
//! a VMM then installs a ready program instead of compiling one at each
//! start, where in the test bed's L1 the compiler's code alone took ~5-9 ms
//! of a wake. So it uses nothing of the crate but itself: `seccompiler`,
//! `libc` and `kvm-bindings` (for ioctl sizes).

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// A list: system call number to the rules that allow it (none: always).
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;
type Result<T> = std::result::Result<T, BackendError>;

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
pub const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
/// `KVM_GET_SREGS` (the failure report's page-table walk).
pub const KVM_GET_SREGS: u64 = ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());

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
pub const SNAPSHOT_VM_IOCTLS: [u64; 3] = [
    iowr(0x62, std::mem::size_of::<kvm_bindings::kvm_irqchip>()), // KVM_GET_IRQCHIP
    ior(0x7c, std::mem::size_of::<kvm_bindings::kvm_clock_data>()), // KVM_GET_CLOCK
    ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_pit_state2>()), // KVM_GET_PIT2
];
/// ... and of each vCPU (its own thread).
pub const SNAPSHOT_VCPU_IOCTLS: [u64; 8] = [
    iowr(0x88, std::mem::size_of::<kvm_bindings::kvm_msrs>()), // KVM_GET_MSRS
    ior(0x8e, std::mem::size_of::<kvm_bindings::kvm_lapic_state>()), // KVM_GET_LAPIC
    ior(0x98, std::mem::size_of::<kvm_bindings::kvm_mp_state>()), // KVM_GET_MP_STATE
    ior(0x9f, std::mem::size_of::<kvm_bindings::kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
    ior(0xa1, std::mem::size_of::<kvm_bindings::kvm_debugregs>()), // KVM_GET_DEBUGREGS
    ior(0xa4, std::mem::size_of::<kvm_bindings::kvm_xsave>()), // KVM_GET_XSAVE
    ior(0xa6, std::mem::size_of::<kvm_bindings::kvm_xcrs>()),  // KVM_GET_XCRS
    io(0xa3),                                                  // KVM_GET_TSC_KHZ
];

/// A VMM list compiled: a call outside it traps (`SIGSYS`, which kills the
/// process: module [`crate::seccomp`]).
pub fn compile(rules: Rules) -> Result<BpfProgram> {
    SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()
}

/// The lists of a VM that writes a snapshot (`--snapshot-to`): the same,
/// plus the KVM ioctls that read the VM's and the vCPUs' state, and seeking
/// and sizing the (already open) snapshot files on the VMM thread.
pub fn snapshot_rules(kick: i32) -> Result<(Rules, Rules)> {
    let mut vmm = vmm_rules(kick)?;
    let mut vm_ioctls = vec![libc::FIONBIO];
    vm_ioctls.extend(SNAPSHOT_VM_IOCTLS);
    vmm.insert(libc::SYS_ioctl, ioctls(&vm_ioctls)?);
    vmm.insert(libc::SYS_lseek, Vec::new());
    vmm.insert(libc::SYS_ftruncate, Vec::new());
    let mut vcpu = vcpu_rules()?;
    let mut vcpu_ioctls = vec![KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS];
    vcpu_ioctls.extend(SNAPSHOT_VCPU_IOCTLS);
    vcpu.insert(libc::SYS_ioctl, ioctls(&vcpu_ioctls)?);
    Ok((vmm, vcpu))
}

/// `arg == value` on the low 32 bits (ioctl numbers, domains, signals).
pub fn eq(arg: u8, value: impl TryInto<u64>) -> Result<SeccompCondition> {
    let value = value
        .try_into()
        .map_err(|_| BackendError::InvalidArgumentNumber)?;
    eq64(arg, value)
}

fn eq64(arg: u8, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// `arg & mask == 0`.
fn clear(arg: u8, mask: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )
}

/// One rule per alternative; each alternative's conditions must all hold.
pub fn any_of(alternatives: Vec<Vec<SeccompCondition>>) -> Result<Vec<SeccompRule>> {
    alternatives.into_iter().map(SeccompRule::new).collect()
}

fn ioctls(requests: &[u64]) -> Result<Vec<SeccompRule>> {
    any_of(
        requests
            .iter()
            .map(|&r| eq(1, r).map(|c| vec![c]))
            .collect::<Result<_>>()?,
    )
}

/// No executable memory: the VMM maps no code after it starts.
fn no_exec(prot_arg: u8) -> Result<Vec<SeccompRule>> {
    any_of(vec![vec![clear(
        prot_arg,
        libc::PROT_EXEC.unsigned_abs().into(),
    )?]])
}

/// What every thread needs to allocate, synchronise and end.
fn common(rules: &mut Rules) -> Result<()> {
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

/// The VMM thread's list; `kick` is the signal that kicks vCPU threads
/// out of `KVM_RUN` (`crate::vcpu::kick_signal`).
pub fn vmm_rules(kick: i32) -> Result<Rules> {
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
            .collect::<Result<_>>()?,
        )?,
    );
    // Kicking vCPU threads out of KVM_RUN, with the kick signal only.
    rules.insert(libc::SYS_tgkill, any_of(vec![vec![eq(2, kick)?]])?);
    Ok(rules)
}

/// Each vCPU thread's list.
pub fn vcpu_rules() -> Result<Rules> {
    let mut rules = Rules::new();
    common(&mut rules)?;
    // Running the guest, and the registers for a failure report.
    rules.insert(
        libc::SYS_ioctl,
        ioctls(&[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS])?,
    );
    Ok(rules)
}
