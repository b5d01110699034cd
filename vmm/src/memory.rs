//! Guest memory: the RAM regions around the MMIO gap, mapped in this process
//! and registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::{FromRangesError, GuestRegionMmap, MmapRegion, MmapRegionError};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// The guest's memory, anonymous private mappings of this process.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mappings could not be created.
    #[error("failed to map {0} MiB of guest memory")]
    Map(u64, #[source] FromRangesError),
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
    let map = |e: FromRangesError| Error::Map(mem_bytes >> 20, e);
    let mut regions = Vec::new();
    for (start, size) in ram_ranges(mem_bytes) {
        // The CLI bounds guest memory far below usize::MAX on a 64-bit host.
        let size = usize::try_from(size).map_err(|_| map(FromRangesError::InvalidGuestRegion))?;
        let region = GuestRegionMmap::new(map_ram(size).map_err(|e| map(e.into()))?, start)
            .ok_or_else(|| map(FromRangesError::InvalidGuestRegion))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map(e.into()))
}

/// 2 MiB: a huge page, and KVM's large mapping on x86-64.
const HUGE_PAGE: usize = 2 << 20;
/// How often [`map_ram`] tries to have its mapping land in a prepared hole.
const PLACEMENT_TRIES: usize = 4;

/// One region of guest RAM, anonymous and private, marked for huge pages,
/// and where it can at a 2 MiB-aligned host address. Guest RAM regions start
/// at 2 MiB-aligned guest addresses, and KVM maps a guest range with a 2 MiB
/// entry only where the host address has the same alignment (and the host
/// backs it with a huge page); QEMU aligns its RAM for the same reason.
/// Kernels from 6.7 place a mapping whose size is a multiple of 2 MiB that
/// way by themselves; older ones (Debian 12's 6.1) and other sizes (`--mem
/// 255`) do not. The mapping is always vm-memory's own (unmapped when the
/// memory is dropped): to steer where vm-memory's `mmap` lands, an
/// [`AlignedHole`] is prepared first. If the mapping lands elsewhere all the
/// same (the kernel found a higher gap it fits in, or another thread mapped
/// into the hole), it is kept until the end, filling that gap, and the next
/// try prepares another hole; the last try keeps what it gets, aligned or
/// not (then KVM uses 4 KiB entries, as before).
fn map_ram(size: usize) -> Result<MmapRegion, MmapRegionError> {
    let mut misplaced = Vec::new();
    let region = loop {
        let hole = AlignedHole::prepare(size);
        let region = MmapRegion::new(size)?;
        let prepared = hole.is_some();
        drop(hole);
        let aligned = region.as_ptr() as usize % HUGE_PAGE == 0;
        if !prepared || aligned || misplaced.len() + 1 >= PLACEMENT_TRIES {
            break region;
        }
        misplaced.push(region);
    };
    // Unmapped here (vm-memory's own mappings, never touched).
    drop(misplaced);
    advise_huge_pages(region.as_ptr(), size);
    Ok(region)
}

/// A hole in this process's address space that the next anonymous `mmap` of
/// `size` bytes fills at a 2 MiB-aligned address: a `PROT_NONE` reservation
/// of `size` + 2 MiB is made, and all of it is given back but its top, from
/// the aligned address + `size` up (the guard). The kernel places a mapping
/// at the top of the highest free gap it fits in, so the next one lands
/// right below the guard, at the aligned address. Dropping it unmaps the
/// guard. `None` where there is nothing to prepare (a size below 2 MiB) or
/// the reservation failed.
struct AlignedHole {
    guard: usize,
    guard_len: usize,
}

impl AlignedHole {
    fn prepare(size: usize) -> Option<Self> {
        if size < HUGE_PAGE {
            return None;
        }
        let total = size.checked_add(HUGE_PAGE)?;
        let flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE;
        // SAFETY: a fresh inaccessible anonymous mapping at an address of the
        // kernel's choosing; nothing refers to it yet.
        let base =
            unsafe { libc::mmap(std::ptr::null_mut(), total, libc::PROT_NONE, flags, -1, 0) };
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = base as usize;
        // Below base + HUGE_PAGE, so the guard is at least one page long.
        let aligned = base.next_multiple_of(HUGE_PAGE);
        let guard = aligned + size;
        let guard_len = base + total - guard;
        // SAFETY: `base..guard` lies inside the reservation just made, which
        // nothing else uses; giving it back leaves only the guard.
        unsafe { libc::munmap(base as *mut libc::c_void, guard - base) };
        Some(Self { guard, guard_len })
    }
}

impl Drop for AlignedHole {
    fn drop(&mut self) {
        // SAFETY: the guard is the rest of our own reservation, which nothing
        // else maps or refers to.
        unsafe { libc::munmap(self.guard as *mut libc::c_void, self.guard_len) };
    }
}

/// Asks the host kernel to back the guest RAM mapping at `host..host+len`
/// with transparent huge pages where it can (`MADV_HUGEPAGE`, as QEMU and
/// Cloud Hypervisor do): KVM then maps the guest with 2 MiB second-level
/// entries, so the guest's first touches of its RAM take far fewer exits and
/// the TLB holds more of it. On a host whose THP setting is `always` this
/// changes nothing; with `madvise` (Ubuntu's default, and this machine's) it
/// is what turns them on; with `never`, or a kernel without THP, the call
/// fails and is ignored (4 KiB pages, as before). The cost: host memory is
/// taken 2 MiB at a time as the guest touches it, still never beyond the
/// guest's RAM size.
fn advise_huge_pages(host: *mut u8, len: usize) {
    // SAFETY: the caller's own live anonymous mapping; MADV_HUGEPAGE changes
    // only how the kernel backs it, never its contents, and a failure leaves
    // the mapping as it was.
    let _ = unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
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

    /// Every RAM region starts at a 2 MiB-aligned host address, whether the
    /// kernel placed it so or the prepared hole did (a size not a multiple
    /// of 2 MiB; any size before 6.7), all of it is usable, and it is
    /// vm-memory's own mapping, unmapped when the memory is dropped (many
    /// guests mapped one after another in one process, as the fuzz targets
    /// do, must not grow it).
    #[test]
    fn guest_ram_is_2mib_aligned_and_owned_whatever_its_size() {
        use vm_memory::Bytes;
        for mib in [64u64, 255, 3, 1] {
            let bytes = mib << 20;
            let mem = create(bytes).expect("map");
            for region in mem.iter() {
                let host = region
                    .get_host_address(MemoryRegionAddress(0))
                    .expect("host") as usize;
                if region.len() >= HUGE_PAGE as u64 {
                    assert_eq!(host % HUGE_PAGE, 0, "{mib} MiB guest: region at {host:#x}");
                }
                assert!(
                    region.owned(),
                    "{mib} MiB guest: not vm-memory's own mapping"
                );
            }
            let last = GuestAddress(bytes - 6);
            mem.write_slice(b"edge!!", last)
                .expect("write the last bytes");
            let mut back = [0u8; 6];
            mem.read_slice(&mut back, last).expect("read them back");
            assert_eq!(&back, b"edge!!");
            mem.write_slice(b"x", GuestAddress(0))
                .expect("write the first byte");
        }
        // Mapping and dropping guest RAM many times leaves no mapping behind:
        // neither the RAM nor a hole's guard. (In this test rather than a
        // test of its own: a thread mapping in a loop beside the checks above
        // could take their holes.)
        fn mapped_bytes() -> usize {
            std::fs::read_to_string("/proc/self/maps")
                .expect("maps")
                .lines()
                .filter_map(|l| l.split_once(' ').map(|(r, _)| r.to_owned()))
                .filter_map(|r| {
                    let (a, b) = r.split_once('-')?;
                    Some(usize::from_str_radix(b, 16).ok()? - usize::from_str_radix(a, 16).ok()?)
                })
                .sum()
        }
        let before = mapped_bytes();
        for _ in 0..2048 {
            drop(create(255 << 20).expect("map"));
        }
        // Leaked guests would be 510 GiB, leaked guards (up to 2 MiB each,
        // ~1 MiB on average) ~2 GiB; other tests map and unmap their own
        // guests meanwhile (well under 1 GiB).
        let after = mapped_bytes();
        assert!(
            after < before + (1 << 30),
            "mapped {} MiB more after 2048 guests of 255 MiB",
            (after.saturating_sub(before)) >> 20
        );
    }

    /// Guest RAM is marked for transparent huge pages (the kernel's `hg`
    /// flag on the mapping), so KVM can map it with 2 MiB entries, whatever
    /// its size; only where the host kernel has THP at all.
    #[test]
    fn guest_ram_asks_for_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            eprintln!("skipped: this kernel has no transparent huge pages");
            return;
        }
        // 64 MiB: 2 MiB-aligned by the kernel (from 6.7); 255 MiB: by the
        // prepared hole.
        for mib in [64u64, 255] {
            let mem = create(mib << 20).expect("map");
            let host = mem
                .iter()
                .next()
                .expect("one region")
                .get_host_address(MemoryRegionAddress(0))
                .expect("host address") as usize;
            let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
            let mut in_ours = false;
            let mut flags = None;
            for line in smaps.lines() {
                // A mapping's first line: "start-end perms ...". Another test's
                // guest RAM right next to ours merges with it into one mapping,
                // so look for the one that contains ours.
                if let Some((range, _)) = line.split_once(' ') {
                    if let Some((start, end)) = range.split_once('-') {
                        if let (Ok(start), Ok(end)) = (
                            usize::from_str_radix(start, 16),
                            usize::from_str_radix(end, 16),
                        ) {
                            in_ours = start <= host && host < end;
                            continue;
                        }
                    }
                }
                if in_ours {
                    if let Some(f) = line.strip_prefix("VmFlags:") {
                        flags = Some(f.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
                    }
                }
            }
            let flags = flags.expect("guest RAM's mapping in /proc/self/smaps");
            assert!(
                flags.iter().any(|f| f == "hg"),
                "{mib} MiB guest: no MADV_HUGEPAGE on its RAM: {flags:?}"
            );
        }
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
