//! The virtio-blk device: one request queue over a host file, read-only or
//! read-write. Requests run synchronously on the event-loop thread, woken by
//! the queue's ioeventfd ([`request`] holds the checks).

pub mod request;

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use self::request::{Disk, MAX_REQUEST_BYTES, SECTOR_SIZE};
use super::{ActivateError, IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemoryMmap;

/// virtio device id of a block device.
pub const DEVICE_ID: u32 = 2;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
/// Largest single segment we advertise.
const SIZE_MAX: u32 = 64 * 1024;

/// A block device.
#[derive(Debug)]
pub struct Block {
    disk: Disk,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLine>,
    queue_evt: EventFd,
    queue: Option<Queue>,
    /// Requests that failed (bad ranges, I/O errors), for the exit report.
    pub failed: u64,
}

impl Block {
    /// Opens `path` as a disk; `read_only` opens it read-only and refuses
    /// guest writes.
    pub fn new(
        path: &Path,
        read_only: bool,
        mem: GuestMemoryMmap,
        irq: Arc<IrqLine>,
        queue_evt: EventFd,
    ) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            disk: Disk {
                file,
                // A trailing partial sector is not addressable.
                capacity: len / SECTOR_SIZE,
                read_only,
            },
            mem,
            irq,
            queue_evt,
            queue: None,
            failed: 0,
        })
    }

    fn process_queue(&mut self) {
        let Some(q) = self.queue.as_mut() else { return };
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let (len, err) = request::execute(&self.mem, chain, &mut self.disk);
            if err.is_some() {
                self.failed += 1;
            }
            if q.add_used(&self.mem, head, len).is_err() {
                self.failed += 1;
            }
            used = true;
        }
        if used && q.needs_notification(&self.mem).unwrap_or(true) {
            self.irq.signal_used();
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.read_only { F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | F_FLUSH | F_SIZE_MAX | F_SEG_MAX | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config { le64 capacity; le32 size_max; le32 seg_max; ... }
        let seg_max = u32::try_from(MAX_REQUEST_BYTES).unwrap_or(0) / SIZE_MAX;
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&self.disk.capacity.to_le_bytes());
        cfg[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        cfg[12..16].copy_from_slice(&seg_max.to_le_bytes());
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(start.saturating_add(i)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, _acked: u64, queues: Vec<Queue>) -> Result<(), ActivateError> {
        let mut queues = queues.into_iter();
        match (queues.next(), queues.next()) {
            (Some(q), None) => {
                self.queue = Some(q);
                let _ = self.queue_evt.read();
                Ok(())
            }
            _ => Err(ActivateError("virtio-blk has exactly one queue".into())),
        }
    }

    fn reset(&mut self) {
        self.queue = None;
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.queue.iter().map(Queue::state).collect()
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_evt.as_raw_fd() {
            let _ = self.queue_evt.read();
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_evt, EventSet::IN)) {
            eprintln!("airlock-vmm: error: cannot watch a disk queue: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn config_and_features_describe_the_disk() {
        let path = std::env::temp_dir().join(format!("airlock-blkdev-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096 + 100]).expect("write");
        let mem = crate::memory::create(1 << 20).expect("mem");
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).expect("e")));
        let evt = EventFd::new(EFD_NONBLOCK).expect("e");
        let dev = Block::new(&path, true, mem, irq, evt).expect("dev");
        assert_eq!(dev.device_type(), DEVICE_ID);
        assert_ne!(dev.features() & F_RO, 0);
        assert_ne!(dev.features() & VIRTIO_F_VERSION_1, 0);
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(
            u64::from_le_bytes(cap),
            8,
            "the partial sector is not exposed"
        );
        let mut seg = [0u8; 4];
        dev.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 16);
        let _ = std::fs::remove_file(path);
    }
}
