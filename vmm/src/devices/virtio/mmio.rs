//! The virtio-mmio transport, version 2 (virtio 1.x spec, section 4.2.2).
//!
//! Every register write from the guest is validated here: queue sizes are
//! checked against the maximum, addresses against guest memory (when the
//! driver sets DRIVER_OK), features against what we offered.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemoryMmap;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4149_524c; // "AIRL"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Queue notifications land here (normally swallowed by KVM's ioeventfd).
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_AVAIL_LOW: u64 = 0x090;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x094;
const REG_QUEUE_USED_LOW: u64 = 0x0a0;
const REG_QUEUE_USED_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_NEEDS_RESET: u32 = 64;
const STATUS_FAILED: u32 = 128;

/// One device behind the MMIO register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLine>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

impl MmioTransport {
    /// A transport for `device`; `queue_evts[i]` is signalled on a notify of
    /// queue `i` (the same eventfds are registered as ioeventfds).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        irq: Arc<IrqLine>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let sizes: Vec<u16> = device
            .lock()
            .map(|d| d.queue_max_sizes().to_vec())
            .unwrap_or_default();
        let queues = sizes.iter().filter_map(|s| Queue::new(*s).ok()).collect();
        Self {
            device,
            mem,
            irq,
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
        }
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        // Queues cannot change once the device runs.
        if self.activated {
            return None;
        }
        self.queues.get_mut(sel)
    }

    fn with_device<T>(&self, f: impl FnOnce(&mut dyn VirtioDevice) -> T) -> Option<T> {
        self.device.lock().ok().map(|mut d| f(&mut *d))
    }

    fn reset(&mut self) {
        if self.activated {
            self.with_device(|d| d.reset());
        }
        let sizes: Vec<u16> = self.queues.iter().map(QueueT::max_size).collect();
        self.queues = sizes.iter().filter_map(|s| Queue::new(*s).ok()).collect();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.activated = false;
        self.irq.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.with_device(|d| d.features()).unwrap_or(0);
            let ok = self.acked_features & !offered == 0
                && self.acked_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // Leaving FEATURES_OK clear tells the driver we refuse.
                value &= !STATUS_FEATURES_OK;
            }
        }
        if value & STATUS_DRIVER_OK != 0 && !self.activated {
            if value & STATUS_FEATURES_OK == 0 || value & STATUS_FAILED != 0 {
                self.status = value | STATUS_NEEDS_RESET;
                return;
            }
            let valid = self
                .queues
                .iter()
                .all(|q| q.ready() && q.is_valid(&self.mem));
            let features = self.acked_features;
            // The device gets its own copies; ours keep answering register
            // reads (and are frozen from now on).
            let queues = self
                .queues
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>()
                .unwrap_or_default();
            let result = valid
                .then(|| self.with_device(|d| d.activate(features, queues)))
                .flatten();
            match result {
                Some(Ok(())) => self.activated = true,
                _ => {
                    self.status = value | STATUS_NEEDS_RESET;
                    return;
                }
            }
        }
        self.status = value;
    }
}

impl MmioTransport {
    /// The transport's registers and queues, and its device's, for a
    /// snapshot; refused while the device is busy.
    pub fn state(&self) -> Result<crate::snapshot::TransportState, String> {
        let (device_type, device_queues, busy) = self
            .with_device(|d| (d.device_type(), d.queue_states(), d.busy()))
            .ok_or("a device's lock is poisoned")?;
        if let Some(why) = busy {
            return Err(why);
        }
        Ok(crate::snapshot::TransportState {
            device_type,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            activated: self.activated,
            irq_status: self.irq.status(),
            queues: self.queues.iter().map(Queue::state).collect(),
            device_queues: if self.activated {
                device_queues
            } else {
                Vec::new()
            },
        })
    }

    /// Puts back a snapshot's transport state; an activated device is
    /// activated again with its queues as they were, and every queue's
    /// eventfd is signalled once so the device looks at its rings (a
    /// notification may have been pending when the snapshot was taken).
    pub fn restore(&mut self, state: &crate::snapshot::TransportState) -> Result<(), String> {
        let device_type = self.with_device(|d| d.device_type()).unwrap_or(0);
        if device_type != state.device_type {
            return Err(format!(
                "device {} in the snapshot where this VM has device {device_type}",
                state.device_type
            ));
        }
        if state.queues.len() != self.queues.len() {
            return Err("a device's queue count differs".into());
        }
        let to_queues = |states: &[virtio_queue::QueueState]| {
            states
                .iter()
                .map(|q| Queue::try_from(*q))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("a queue does not restore: {e}"))
        };
        self.queues = to_queues(&state.queues)?;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.activated = false;
        if state.activated {
            if !self.queues.iter().all(|q| q.is_valid(&self.mem)) {
                return Err("a queue lies outside guest memory".into());
            }
            let queues = to_queues(&state.device_queues)?;
            let features = state.acked_features;
            self.with_device(|d| d.activate(features, queues))
                .ok_or("a device's lock is poisoned")?
                .map_err(|e| e.to_string())?;
            self.activated = true;
            for evt in &self.queue_evts {
                let _ = evt.write(1);
            }
        }
        self.irq.set_status(state.irq_status);
        self.irq.resignal();
        Ok(())
    }
}

fn read_u32(data: &mut [u8], value: u32) {
    if let Ok(bytes) = <&mut [u8; 4]>::try_from(data) {
        *bytes = value.to_le_bytes();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            data.fill(0);
            self.with_device(|d| d.read_config(offset - REG_CONFIG, data));
            return;
        }
        if data.len() != 4 {
            data.fill(0xff);
            return;
        }
        let value = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.with_device(|d| d.device_type()).unwrap_or(0),
            REG_VENDOR_ID => VENDOR,
            REG_DEVICE_FEATURES => {
                let f = self.with_device(|d| d.features()).unwrap_or(0);
                match self.device_features_sel {
                    0 => u32::try_from(f & 0xffff_ffff).unwrap_or(0),
                    1 => u32::try_from(f >> 32).unwrap_or(0),
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => usize::try_from(self.queue_sel)
                .ok()
                .and_then(|i| self.queues.get(i))
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => usize::try_from(self.queue_sel)
                .ok()
                .and_then(|i| self.queues.get(i))
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.irq.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => 0,
        };
        read_u32(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        // Before DRIVER_OK the driver configures; after it, only notify,
        // interrupt ack and status (reset) make sense.
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => match self
                .driver_features_sel
            {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let (Some(q), Ok(size)) = (self.queue(), u16::try_from(v)) {
                    // Rejected sizes (zero, too big, not a power of two)
                    // leave the queue invalid, so DRIVER_OK fails cleanly.
                    q.set_size(size);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_DESC_LOW => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_AVAIL_LOW => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_AVAIL_HIGH => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_USED_LOW => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_USED_HIGH => self
                .queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v))),
            REG_QUEUE_NOTIFY => {
                // Only reached if the ioeventfd did not catch the write.
                if let Some(evt) = usize::try_from(v).ok().and_then(|i| self.queue_evts.get(i)) {
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.irq.ack(v),
            REG_STATUS => self.set_status(v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Default)]
    struct Fake {
        activated: Option<(u64, usize)>,
        resets: usize,
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            19
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xee) + 1);
        }
        fn activate(&mut self, f: u64, q: Vec<Queue>) -> Result<(), super::super::ActivateError> {
            self.activated = Some((f, q.len()));
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            Vec::new()
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Fake>>, EventFd) {
        let mem = crate::memory::create(16 << 20).expect("mem");
        let fake = Arc::new(Mutex::new(Fake::default()));
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).expect("evt")));
        let evt = EventFd::new(EFD_NONBLOCK).expect("evt");
        let t = MmioTransport::new(
            fake.clone(),
            mem,
            irq,
            vec![evt.try_clone().expect("c"), evt.try_clone().expect("c")],
        );
        (t, fake, evt)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Plays the Linux virtio_mmio driver's probe and setup sequence.
    fn drive_to_ok(t: &mut MmioTransport, features_hi: u32) -> u32 {
        w(t, REG_STATUS, 1);
        w(t, REG_STATUS, 3);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, features_hi);
        w(t, REG_DRIVER_FEATURES_SEL, 0);
        w(t, REG_DRIVER_FEATURES, 0);
        w(t, REG_STATUS, 3 | STATUS_FEATURES_OK);
        for (i, base) in [(0u32, 0x1_0000u32), (1, 0x2_0000)] {
            w(t, REG_QUEUE_SEL, i);
            assert_eq!(r(t, REG_QUEUE_NUM_MAX), 16);
            w(t, REG_QUEUE_NUM, 16);
            w(t, REG_QUEUE_DESC_LOW, base);
            w(t, REG_QUEUE_AVAIL_LOW, base + 0x1000);
            w(t, REG_QUEUE_USED_LOW, base + 0x2000);
            w(t, REG_QUEUE_READY, 1);
        }
        w(t, REG_STATUS, 3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        r(t, REG_STATUS)
    }

    #[test]
    fn identifies_as_a_modern_virtio_device() {
        let (mut t, _, _) = setup();
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 19);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        let mut cfg = [0u8; 2];
        t.read(REG_CONFIG + 3, &mut cfg);
        assert_eq!(cfg, [4, 4]);
    }

    #[test]
    fn driver_setup_activates_the_device_once() {
        let (mut t, fake, _) = setup();
        let status = drive_to_ok(&mut t, 1);
        assert_eq!(status & STATUS_NEEDS_RESET, 0);
        assert_eq!(
            fake.lock().expect("l").activated,
            Some((VIRTIO_F_VERSION_1, 2))
        );
        // Queue registers are frozen once running.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 2);
        assert_eq!(t.queues[0].size(), 16);
        w(&mut t, REG_STATUS, 0);
        assert_eq!(fake.lock().expect("l").resets, 1);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn unoffered_or_legacy_features_are_refused() {
        let (mut t, fake, _) = setup();
        // Without VERSION_1 (a legacy driver) FEATURES_OK does not stick.
        let status = drive_to_ok(&mut t, 0);
        assert_ne!(status & STATUS_NEEDS_RESET, 0);
        assert!(fake.lock().expect("l").activated.is_none());
        w(&mut t, REG_STATUS, 0);
        let status = drive_to_ok(&mut t, 1 | 2);
        assert_ne!(status & STATUS_NEEDS_RESET, 0, "bit 33 was not offered");
    }

    #[test]
    fn bad_queue_setup_fails_activation_instead_of_crashing() {
        let (mut t, fake, _) = setup();
        w(&mut t, REG_STATUS, 3);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_STATUS, 3 | STATUS_FEATURES_OK);
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_NUM, 3); // not a power of two
        w(&mut t, REG_QUEUE_DESC_LOW, 0xffff_f000); // outside guest memory
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_QUEUE_SEL, 99); // no such queue: ignored
        w(&mut t, REG_QUEUE_READY, 1);
        w(
            &mut t,
            REG_STATUS,
            3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(fake.lock().expect("l").activated.is_none());
    }

    #[test]
    fn notify_fallback_signals_the_queue_and_irq_ack_clears() {
        let (mut t, _, evt) = setup();
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(evt.read().expect("notified"), 1);
        w(&mut t, REG_QUEUE_NOTIFY, 7); // no such queue
        assert!(evt.read().is_err());
        t.irq.signal_used();
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 1);
        w(&mut t, REG_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
    }
}
