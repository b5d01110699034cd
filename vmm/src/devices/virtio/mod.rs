//! virtio devices over the MMIO transport (virtio 1.x, "modern" registers).
//!
//! The transport ([`mmio`]) runs on vCPU threads when the guest touches its
//! registers; a device's queue work runs on the event-loop thread, woken by
//! the queue's ioeventfd, and interrupts the guest through an irqfd.

pub mod block;
pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: every device we offer is a modern device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: the device used buffers.
pub const INT_USED_RING: u32 = 1;

/// A device's interrupt line: the status register the guest reads and the
/// irqfd that raises the interrupt.
#[derive(Debug)]
pub struct IrqLine {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqLine {
    /// A line signalled through `evt` (registered with KVM as an irqfd).
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets the status register (a restored snapshot's).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Raises the interrupt again if the guest has not acknowledged it
    /// (after a restore: the guest may still wait for it).
    pub fn resignal(&self) {
        if self.status() != 0 {
            let _ = self.evt.write(1);
        }
    }

    /// Tells the guest the device used buffers.
    pub fn signal_used(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::SeqCst);
        // A full eventfd counter still has the interrupt pending.
        let _ = self.evt.write(1);
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The guest acknowledged `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// A device activation the device refused.
#[derive(Debug, thiserror::Error)]
#[error("device activation failed: {0}")]
pub struct ActivateError(pub String);

/// What the transport needs from a device.
pub trait VirtioDevice: Send {
    /// The virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; their number is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver finished setup (DRIVER_OK): take the queues and start.
    fn activate(&mut self, acked_features: u64, queues: Vec<Queue>) -> Result<(), ActivateError>;
    /// The driver reset the device: stop and forget all state.
    fn reset(&mut self);
    /// The device's live queues (empty before activation), for a snapshot.
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
    /// Why the device cannot be snapshotted now (open connections,
    /// requests in flight), if it cannot.
    fn busy(&self) -> Option<String> {
        None
    }
}
