//! Guest memory: the RAM regions around the MMIO gap, mapped in this process
//! and registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest's memory, anonymous private mappings of this process.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mappings could not be created.
    #[error("failed to map {0} MiB of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("failed to register guest memory with KVM")]
    Register(#[source] kvm_ioctls::Error),
    /// A region had no host address (cannot happen for anonymous mappings).
    #[error("guest memory region has no host mapping")]
    NoHostAddress,
}

/// The RAM ranges `(start, size)` for `mem_bytes` of guest memory: everything
/// below the MMIO gap first, the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if mem_bytes > low {
        ranges.push((GuestAddress(MMIO_GAP_END), mem_bytes - low));
    }
    ranges
}

/// Maps `mem_bytes` of guest RAM.
pub fn create(mem_bytes: u64) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_bytes)
        .into_iter()
        // The CLI bounds guest memory far below usize::MAX on a 64-bit host.
        .map(|(a, s)| (a, usize::try_from(s).unwrap_or(usize::MAX)))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Map(mem_bytes >> 20, e))
}

/// Registers every region of `mem` with the VM, slot by slot.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| Error::NoHostAddress)?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: `host..host+len` is a live mapping owned by `mem`'s region;
        // the caller keeps `mem` alive for as long as the VM (the `Vm` struct
        // holds both and drops the VM fd first), so KVM never sees a dangling
        // range.
        unsafe { vm.set_user_memory_region(desc) }.map_err(Error::Register)?;
    }
    Ok(())
}

/// Last RAM address + 1 below the MMIO gap.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

/// Writes the guest's RAM, region by region in guest-physical order (the
/// MMIO gap left out), to `out`; returns the bytes written. For
/// `--dump-memory`, after the guest has stopped.
pub fn dump<W: std::io::Write>(mem: &GuestMemoryMmap, out: &mut W) -> std::io::Result<u64> {
    use vm_memory::Bytes;
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for region in mem.iter() {
        let mut offset = 0u64;
        while offset < region.len() {
            let n = (region.len() - offset).min(CHUNK);
            let chunk = buf
                .get_mut(..usize::try_from(n).unwrap_or(0))
                .unwrap_or_default();
            mem.read_slice(chunk, GuestAddress(region.start_addr().0 + offset))
                .map_err(std::io::Error::other)?;
            out.write_all(chunk)?;
            offset += n;
            written += n;
        }
    }
    out.flush()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_writes_the_whole_ram_in_order() {
        use vm_memory::Bytes;
        let mem = create(64 << 20).expect("map");
        mem.write_slice(b"marker", GuestAddress(0x12_3456))
            .expect("write");
        let mut out = Vec::new();
        assert_eq!(dump(&mem, &mut out).expect("dump"), 64 << 20);
        assert_eq!(out.len(), 64 << 20);
        assert_eq!(&out[0x12_3456..0x12_3456 + 6], b"marker");
    }

    #[test]
    fn small_guest_is_one_low_region() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn low_ram_end_stops_below_the_gap() {
        let mem = create(64 << 20).expect("map");
        assert_eq!(low_ram_end(&mem), 64 << 20);
    }
}
