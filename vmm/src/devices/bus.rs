//! A bus: address ranges mapped to devices, for port I/O and for MMIO.

use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the device's base address; the
/// data length is what the guest's instruction accessed (1, 2, 4 or 8 bytes,
/// as KVM reports it).
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors inserting devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The new range overlaps a device already on the bus, or is empty.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// Non-overlapping address ranges, each with its device.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<(u64, u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, l, _)| (b, l)))
            .finish()
    }
}

impl Bus {
    /// Puts `device` at `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::Overlap { base, len })?;
        if self.ranges.iter().any(|(b, l, _)| base < b + l && *b < end) {
            return Err(Error::Overlap { base, len });
        }
        self.ranges.push((base, len, device));
        self.ranges.sort_by_key(|(b, _, _)| *b);
        Ok(())
    }

    /// The device covering the whole access `addr..addr+size`, and the offset.
    fn find(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let end = addr.checked_add(size as u64)?;
        self.ranges
            .iter()
            .find(|(b, l, _)| addr >= *b && end <= b + l)
            .map(|(b, _, d)| (d, addr - b))
    }

    /// Dispatches a read; unclaimed addresses read as all ones, like an
    /// empty ISA/PCI bus. Returns whether a device took it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                // A poisoned lock means another vCPU panicked inside a device;
                // the process is already going down (panic = abort).
                if let Ok(mut d) = dev.lock() {
                    d.read(offset, data);
                }
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; unclaimed writes are dropped. Returns whether a
    /// device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                if let Ok(mut d) = dev.lock() {
                    d.write(offset, data);
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_right_device_at_the_right_offset() {
        let mut bus = Bus::default();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, a.clone()).expect("insert");
        assert!(bus.write(0x3fb, &[0x80]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert_eq!(a.lock().expect("lock").0, vec![(3, vec![0x80])]);
    }

    #[test]
    fn unclaimed_reads_are_all_ones_and_straddling_accesses_miss() {
        let mut bus = Bus::default();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Recorder::default())))
            .expect("insert");
        let mut b = [0u8; 2];
        assert!(!bus.read(0x80, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        let mut w = [0u8; 4];
        assert!(!bus.read(0x63, &mut w), "access runs past the device");
        assert!(!bus.write(u64::MAX, &[1, 2]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::default();
        let d = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(0x100, 0x10, d()).expect("insert");
        assert!(bus.insert(0x10f, 1, d()).is_err());
        assert!(bus.insert(0xf8, 0x9, d()).is_err());
        assert!(bus.insert(0x200, 0, d()).is_err());
        assert!(bus.insert(u64::MAX, 2, d()).is_err());
        bus.insert(0x110, 1, d()).expect("adjacent is fine");
    }
}
