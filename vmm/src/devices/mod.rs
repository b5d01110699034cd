//! Emulated devices and the buses the vCPUs dispatch port and MMIO accesses on.
//!
//! Every device runs its register logic on the vCPU thread that trapped the
//! access; devices that need the event loop (the i8042's reset line) signal it
//! through an `EventFd`.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt or event line backed by an `EventFd` (registered with KVM as
/// an irqfd, or watched by the event loop).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
