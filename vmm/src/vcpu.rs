//! vCPUs: configured from the boot state, each run on its own named thread
//! (`vcpu0`, `vcpu1`, …) until the guest stops or the VMM tells it to.
//!
//! A vCPU thread reports how it ended with one message on a channel and a
//! write to the VMM's exit `EventFd`; the VMM stops the others with a
//! message on their own channel plus a kick signal that makes `KVM_RUN`
//! return `EINTR`.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;

use kvm_bindings::{
    kvm_msr_entry, kvm_sregs, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{cpuid, regs, walk};
use crate::devices::bus::Bus;
use crate::memory::GuestMemoryMmap;
use crate::snapshot::{self, VcpuState};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `KVM_CREATE_VCPU` failed.
    #[error("failed to create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// A configuration ioctl failed.
    #[error("failed to set up vCPU {id}: {what}")]
    Configure {
        /// The vCPU.
        id: u8,
        /// Which step.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The boot register state could not be built.
    #[error("failed to build vCPU boot state")]
    Regs(#[source] regs::Error),
}

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The guest reset the machine (i8042 or a KVM reset event): a clean end.
    Reset,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`): the machine resets; a clean end.
    TripleFault,
    /// The guest asked to power off (`KVM_SYSTEM_EVENT_SHUTDOWN`).
    PowerOff,
    /// The VMM asked this vCPU to stop.
    Requested,
    /// The guest reached the snapshot point: the VMM writes the snapshot
    /// and stops the VM.
    Snapshot,
    /// The woken guest sent its first vsock packet: the VMM records its
    /// working set and stops the VM (`--record-working-set`).
    WorkingSet,
    /// KVM could not run the guest any further.
    Failed(String),
}

impl Stop {
    /// Whether this is how a guest ends a run normally.
    pub fn is_clean(&self) -> bool {
        !matches!(self, Stop::Failed(_))
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Reset => f.write_str("guest reset the machine"),
            Stop::TripleFault => f.write_str("guest reset the machine (triple fault)"),
            Stop::PowerOff => f.write_str("guest powered off"),
            Stop::Requested => f.write_str("stopped by the VMM"),
            Stop::Snapshot => f.write_str("stopped at the snapshot point"),
            Stop::WorkingSet => f.write_str("stopped at the guest's first vsock packet"),
            Stop::Failed(why) => f.write_str(why),
        }
    }
}

/// A message from the VMM thread to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Leave `KVM_RUN` and end the thread.
    Stop,
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler: its only job is to interrupt `KVM_RUN`.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// What a vCPU needs to take part in a snapshot: the flag that says
/// "pause now" (set by the boot timer's snapshot mark) and where its state
/// goes.
#[derive(Debug, Clone)]
pub struct SnapshotHook {
    pub flag: Arc<AtomicBool>,
    pub states: Sender<(u8, Result<VcpuState, String>)>,
}

/// A configured vCPU, ready to run on its thread.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap,
    /// The MSRs KVM saves and restores (`KVM_GET_MSR_INDEX_LIST`).
    msr_list: Vec<u32>,
    /// The CPUID entries set, as bytes (a snapshot's identity).
    cpuid_bytes: Vec<u8>,
    snapshot: Option<SnapshotHook>,
}

impl fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

impl Vcpu {
    /// Creates vCPU `id` of `count` and sets CPUID, MSRs, FPU and LAPIC; the
    /// boot processor (id 0) also gets the PVH entry registers. The others
    /// wait in wait-for-SIPI until the guest kernel starts them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        id: u8,
        count: u8,
        entry: u64,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, Error> {
        let cfg = |what| move |source| Error::Configure { id, what, source };
        let vcpu = Self::create(kvm, vm, id, count, pio, mmio, mem)?;
        let fd = &vcpu.fd;
        let msrs = regs::boot_msrs().map_err(Error::Regs)?;
        fd.set_msrs(&msrs).map_err(cfg("KVM_SET_MSRS"))?;
        fd.set_fpu(&regs::fpu()).map_err(cfg("KVM_SET_FPU"))?;
        let lapic = fd.get_lapic().map_err(cfg("KVM_GET_LAPIC"))?;
        fd.set_lapic(&regs::lapic_lints(lapic))
            .map_err(cfg("KVM_SET_LAPIC"))?;
        if id == 0 {
            let sregs = fd.get_sregs().map_err(cfg("KVM_GET_SREGS"))?;
            fd.set_sregs(&regs::pvh_sregs(sregs))
                .map_err(cfg("KVM_SET_SREGS"))?;
            fd.set_regs(&regs::pvh_regs(entry))
                .map_err(cfg("KVM_SET_REGS"))?;
        }
        Ok(vcpu)
    }

    /// Creates vCPU `id` of `count` with its CPUID set and nothing else:
    /// a restore sets the rest from a snapshot ([`Vcpu::restore_state`]).
    pub fn create(
        kvm: &Kvm,
        vm: &VmFd,
        id: u8,
        count: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, Error> {
        let cfg = |what| move |source| Error::Configure { id, what, source };
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::Create(id, e))?;
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(cfg("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        cpuid::normalize(cpuid.as_mut_slice(), id, count, tsc_deadline);
        fd.set_cpuid2(&cpuid).map_err(cfg("KVM_SET_CPUID2"))?;
        let cpuid_bytes = cpuid
            .as_slice()
            .iter()
            .flat_map(|e| zerocopy::IntoBytes::as_bytes(e).to_vec())
            .collect();
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(cfg("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        Ok(Self {
            id,
            fd,
            pio,
            mmio,
            mem,
            msr_list,
            cpuid_bytes,
            snapshot: None,
        })
    }

    /// Maps `[gpa, gpa + len)` into KVM's nested page tables now, as a
    /// guest read would (`KVM_PRE_FAULT_MEMORY`: copy-on-write is not
    /// broken, the memory file's pages stay shared), so the guest does not
    /// exit to fault each of them in. Fails with `EOPNOTSUPP`/`ENOTTY`
    /// where KVM cannot (older kernels, shadow paging).
    pub fn pre_fault(&self, gpa: u64, len: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut range = kvm_bindings::kvm_pre_fault_memory {
            gpa,
            size: len,
            ..Default::default()
        };
        // Each call maps at least one page or fails; a bound on the calls
        // keeps a misbehaving kernel from looping us forever.
        let mut calls = len / 4096 + 16;
        while range.size > 0 && calls > 0 {
            calls -= 1;
            // SAFETY: the ioctl reads and writes exactly one
            // kvm_pre_fault_memory, which lives for the call.
            let r = unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    crate::seccomp::KVM_PRE_FAULT_MEMORY as _,
                    &raw mut range,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EAGAIN) {
                    continue;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// The CPUID entries this vCPU was given, as bytes.
    pub fn cpuid_bytes(&self) -> &[u8] {
        &self.cpuid_bytes
    }

    /// Takes part in snapshots through `hook`.
    pub fn set_snapshot_hook(&mut self, hook: SnapshotHook) {
        self.snapshot = Some(hook);
    }

    /// Saves this vCPU's state. Called on its own thread out of `KVM_RUN`:
    /// first a `KVM_RUN` with `immediate_exit` set completes what the last
    /// exit left pending (an MMIO or port access), so the state is between
    /// two instructions.
    pub fn save_state(&mut self) -> Result<VcpuState, snapshot::Error> {
        self.fd.set_kvm_immediate_exit(1);
        let completed = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(snapshot::Error::Kvm("complete the last exit", e)),
            Ok(()) => {}
        }
        let kvm = |what| move |e| snapshot::Error::Kvm(what, e);
        let mp_state = self.fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = self.fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
        let debugregs = self.fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = self.fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let msrs = self.read_msrs()?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        let tsc_khz = self.fd.get_tsc_khz().unwrap_or(0);
        Ok(VcpuState {
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            mp_state,
            events,
            msrs,
            tsc_khz,
        })
    }

    /// Every MSR of the index list that KVM can read (some on the list
    /// are not readable on every CPU: those are left out).
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, snapshot::Error> {
        let mut wanted: Vec<u32> = self.msr_list.clone();
        let mut out = Vec::with_capacity(wanted.len());
        while !wanted.is_empty() {
            let entries: Vec<kvm_msr_entry> = wanted
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|_| snapshot::Error::NotQuiescent("too many MSRs".into()))?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| snapshot::Error::Kvm("KVM_GET_MSRS", e))?;
            out.extend_from_slice(msrs.as_slice().get(..read).unwrap_or_default());
            // KVM stops at the first MSR it cannot read: skip it.
            wanted.drain(..(read + 1).min(wanted.len()));
        }
        Ok(out)
    }

    /// Sets this vCPU's state from a snapshot, in the order KVM needs
    /// (the TSC before the TSC deadline, the LAPIC before the MSRs,
    /// events last).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), snapshot::Error> {
        let kvm = |what| move |e| snapshot::Error::Kvm(what, e);
        if state.tsc_khz != 0 && self.fd.get_tsc_khz().is_ok_and(|k| k != state.tsc_khz) {
            // Best effort: a host that cannot scale keeps its own rate.
            let _ = self.fd.set_tsc_khz(state.tsc_khz);
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        self.fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: the buffer is a whole kvm_xsave read back from a
        // snapshot made by this VMM build on a CPU with the same CPUID
        // (checked before), so its size matches what KVM expects.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        self.fd.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(kvm("KVM_SET_LAPIC"))?;
        let mut entries = state.msrs.clone();
        // The TSC first, the deadline (relative to it) last.
        entries.sort_by_key(|m| match m.index {
            MSR_IA32_TSC => 0,
            MSR_IA32_TSC_DEADLINE => 2,
            _ => 1,
        });
        let mut left: &[kvm_msr_entry] = &entries;
        while !left.is_empty() {
            let msrs = Msrs::from_entries(left)
                .map_err(|_| snapshot::Error::Corrupt("too many MSRs".into()))?;
            let set = self.fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if set < left.len() {
                if let Some(m) = left.get(set) {
                    eprintln!(
                        "airlock-vmm: restore: vCPU {}: MSR {:#x} not restored (KVM refused it)",
                        self.id, m.index
                    );
                }
            }
            left = left.get(set + 1..).unwrap_or_default();
        }
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// The vCPU's file descriptor (for reading its KVM statistics).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// This vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Runs the guest until it stops or `requests` says stop; reports the
    /// outcome on `exits` and wakes the VMM through `exit_evt`.
    pub fn run(
        mut self,
        requests: &Receiver<Request>,
        exits: &Sender<(u8, Stop)>,
        exit_evt: &EventFd,
    ) {
        let stop = self.run_until_stop(requests);
        // The VMM may already be gone if another vCPU ended the run; nothing
        // is waiting for this message then.
        let _ = exits.send((self.id, stop));
        let _ = exit_evt.write(1);
    }

    /// Whether a snapshot was asked for: then the state is saved and sent,
    /// and the thread ends (the VMM exits once the snapshot is written).
    fn snapshot_now(&mut self) -> bool {
        let Some(hook) = self.snapshot.clone() else {
            return false;
        };
        if !hook.flag.load(Ordering::SeqCst) {
            return false;
        }
        let state = self.save_state().map_err(|e| e.to_string());
        let _ = hook.states.send((self.id, state));
        true
    }

    fn run_until_stop(&mut self, requests: &Receiver<Request>) -> Stop {
        loop {
            match requests.try_recv() {
                Ok(Request::Stop) | Err(TryRecvError::Disconnected) => return Stop::Requested,
                Err(TryRecvError::Empty) => {}
            }
            if self.snapshot_now() {
                return Stop::Requested;
            }
            crate::timings::first(crate::timings::First::Run);
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Stop::Failed(format!("KVM_RUN failed on vCPU {}: {e}", self.id)),
            };
            crate::timings::exit(
                matches!(exit, VcpuExit::IoOut(..) | VcpuExit::IoIn(..)),
                matches!(exit, VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)),
            );
            match exit {
                VcpuExit::IoOut(port, data) => {
                    self.pio.write(u64::from(port), data);
                }
                VcpuExit::IoIn(port, data) => {
                    self.pio.read(u64::from(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    self.mmio.read(addr, data);
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.mmio.write(addr, data);
                }
                VcpuExit::Shutdown => return Stop::TripleFault,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_RESET => return Stop::Reset,
                    KVM_SYSTEM_EVENT_SHUTDOWN => return Stop::PowerOff,
                    KVM_SYSTEM_EVENT_CRASH => {
                        return self.failure("guest crashed (KVM_SYSTEM_EVENT_CRASH)")
                    }
                    other => return self.failure(&format!("unknown system event {other}")),
                },
                VcpuExit::Intr => {}
                VcpuExit::InternalError => {
                    // SAFETY: KVM filled the `internal` member of the run
                    // union for this exit reason, and nothing runs the vCPU
                    // while we read it.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    return self.failure(&format!("KVM internal error (suberror {suberror})"));
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return self.failure(&format!(
                        "VM entry failed (hardware reason {reason:#x} on host CPU {cpu})"
                    ))
                }
                other => {
                    let what = format!("unexpected VM exit {other:?}");
                    return self.failure(&what);
                }
            }
        }
    }

    /// A failure with the vCPU's RIP and the bytes of the instruction there.
    fn failure(&self, what: &str) -> Stop {
        Stop::Failed(format!("vCPU {}: {what}; {}", self.id, self.where_now()))
    }

    fn where_now(&self) -> String {
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return "registers unavailable".into();
        };
        describe_rip(&self.mem, r.rip, &s)
    }
}

/// "RIP 0x…, code: 0f 0b …" for a vCPU with registers `rip`/`sregs`.
pub fn describe_rip(mem: &GuestMemoryMmap, rip: u64, sregs: &kvm_sregs) -> String {
    let paging = walk::Paging {
        cr0: sregs.cr0,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
    };
    let linear = sregs.cs.base.wrapping_add(rip);
    let code = walk::read_code::<16>(mem, paging, linear);
    let bytes = if code.is_empty() {
        "unreadable".to_string()
    } else {
        code.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!("RIP {rip:#x} (CS base {:#x}), code: {bytes}", sregs.cs.base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn rip_report_shows_the_instruction_bytes() {
        let mem = crate::memory::create(1 << 20).expect("mem");
        mem.write_slice(&[0xf4, 0x0f, 0x0b], GuestAddress(0x1000))
            .expect("w");
        let s = describe_rip(&mem, 0x1000, &kvm_sregs::default());
        assert!(s.starts_with("RIP 0x1000"), "{s}");
        assert!(s.contains("code: f4 0f 0b 00"), "{s}");
        let s = describe_rip(&mem, 0xffff_ffff_0000, &kvm_sregs::default());
        assert!(s.ends_with("code: unreadable"), "{s}");
    }

    #[test]
    fn only_failures_are_unclean() {
        assert!(
            Stop::Reset.is_clean() && Stop::TripleFault.is_clean() && Stop::PowerOff.is_clean()
        );
        assert!(!Stop::Failed("x".into()).is_clean());
    }
}
