//! vCPUs: configured from the boot state, each run on its own named thread
//! (`vcpu0`, `vcpu1`, …) until the guest stops or the VMM tells it to.
//!
//! A vCPU thread reports how it ended with one message on a channel and a
//! write to the VMM's exit `EventFd`; the VMM stops the others with a
//! message on their own channel plus a kick signal that makes `KVM_RUN`
//! return `EINTR`.

use std::fmt;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;

use kvm_bindings::{
    kvm_sregs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{cpuid, regs, walk};
use crate::devices::bus::Bus;
use crate::memory::GuestMemoryMmap;

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

/// A configured vCPU, ready to run on its thread.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap,
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
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::Create(id, e))?;
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(cfg("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::normalize(cpuid.as_mut_slice(), id, count);
        fd.set_cpuid2(&cpuid).map_err(cfg("KVM_SET_CPUID2"))?;
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
        Ok(Self {
            id,
            fd,
            pio,
            mmio,
            mem,
        })
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

    fn run_until_stop(&mut self, requests: &Receiver<Request>) -> Stop {
        loop {
            match requests.try_recv() {
                Ok(Request::Stop) | Err(TryRecvError::Disconnected) => return Stop::Requested,
                Err(TryRecvError::Empty) => {}
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Stop::Failed(format!("KVM_RUN failed on vCPU {}: {e}", self.id)),
            };
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
