//! `airlock-vmm`: Airlock's virtual machine monitor, on rust-vmm crates.
//!
//! It boots the sandbox kernel (an uncompressed `vmlinux` with a PVH entry)
//! with KVM and moves bytes for the guest; it holds no secrets, opens no
//! network and does not speak Airlock's RPC.
//!
//! # Setup order
//!
//! [`vmm::Vmm::new`] turns a [`config::VmConfig`] into live objects, always in
//! this order:
//!
//! 1. **KVM**: open `/dev/kvm`, check the API version and capabilities,
//!    create the VM, its TSS, the in-kernel irqchip and PIT.
//! 2. **Memory**: map RAM around the MMIO gap ([`arch::layout`]) and register
//!    it with KVM ([`memory`]).
//! 3. **Guest image**: load the ELF kernel, the initrd at the top of low RAM,
//!    the command line, PVH `start_info` with the memory map
//!    ([`arch::boot`]), the MP table ([`arch::mptable`]) and the GDT.
//! 4. **Devices**: serial at 0x3f8 on an irqfd, the i8042 (reset), the
//!    boot-timer page ([`devices`]).
//! 5. **vCPUs**: CPUID, MSRs, FPU, LAPIC, and the PVH entry registers on
//!    the boot CPU ([`vcpu`]).
//!
//! 6. **Jail** (the `airlock-vmm` binary, unless `--no-jail`): with everything
//!    open, the process locks itself in ([`jail`]; its namespaces were made
//!    first thing in `main`).
//!
//! [`vmm::Vmm::run`] then starts one named thread per vCPU and runs the event
//! loop on the calling thread until the guest resets, powers off or fails;
//! [`vmm::Vmm::run_hardened`] also installs each thread's [`seccomp`] filter
//! before it runs guest-driven code.

pub mod arch;
pub mod config;
pub mod devices;
pub mod jail;
pub mod memory;
pub mod seccomp;
mod seccomp_rules;
pub mod snapshot;
pub mod timings;
pub mod tiny_guest;
pub mod vcpu;
pub mod vmm;
pub mod working_set;
