//! A woken guest's working set: the guest pages it touches between the
//! wake and its first vsock packet (its wake request, when it is ready).
//!
//! A restore maps the snapshot's memory file copy-on-write and the guest
//! faults each page in at its first touch: an exit to KVM, a page-cache
//! lookup, and for a page it writes a copy (a read-mapped page then faults
//! a second time). A woken guest touches ~170 pages before it is ready, and
//! in the nested test bed each such fault is a trip through emulated L1.
//! So, as REAP does for Firecracker, the broker wakes each new snapshot once
//! to *record* that set (`airlock-vmm --record-working-set FILE`): the VMM
//! runs the guest to its first vsock packet, stops it, and reads from
//! `/proc/self/pagemap` which guest pages its own mapping now holds, and
//! which of them are its private copies (written) rather than the file's
//! (read). While it records, the kernel's fault-around is off for the
//! guest's memory ([`fault_around_off`]), so that a read fault maps its own
//! page and not the neighbours the page cache holds. Every later restore
//! maps exactly those ahead of the guest
//! ([`crate::vmm`]): the written ones copied (`MADV_POPULATE_WRITE`), then
//! all into KVM's page tables (`KVM_PRE_FAULT_MEMORY`). The pages only read
//! stay the file's, shared by every sibling.
//!
//! The file (`working-set` beside the snapshot's `state` and `memory`):
//! `AIRLWSET`, format version (u32), page count (u32), the snapshot's memory
//! tag (32 bytes: a working set of another snapshot is not used), the pages
//! (u64 each: the guest-physical address, bit 0 set for a written page), then
//! a SHA-256 of all before it. It is read at each restore, so it is bounded
//! ([`MAX_PAGES`]) and every page is checked to lie in the guest's RAM;
//! one that does not, or any other fault in the file, means the restore
//! prefaults nothing and says why (the guest faults its pages in on demand,
//! as without a working set).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;

/// The working set's file name in a snapshot's directory.
pub const FILE: &str = "working-set";
const MAGIC: &[u8; 8] = b"AIRLWSET";
const VERSION: u32 = 1;
/// Most pages a working set holds (1 GiB of 4 KiB pages; its file 2 MiB):
/// a recording with more keeps the first this many.
pub const MAX_PAGES: usize = 1 << 18;
const PAGE: u64 = 4096;
const HEADER: usize = 8 + 4 + 4 + 32;
/// `/proc/self/pagemap`: an entry per page of the VMM's address space.
const PRESENT: u64 = 1 << 63;
/// The page is file-backed (or shared anonymous): for a `MAP_PRIVATE` file
/// mapping, the file's page, not a private copy.
const FILE_PAGE: u64 = 1 << 61;
/// Pagemap entries read at once.
const CHUNK: usize = 1 << 14;

/// One page of a working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Page {
    /// Its guest-physical address (page-aligned).
    pub gpa: u64,
    /// The guest wrote it (the VMM's mapping holds a private copy).
    pub written: bool,
}

/// A run of pages to map ahead: `len` bytes from `gpa`, all written or all
/// only read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub gpa: u64,
    pub len: u64,
    pub written: bool,
}

/// The guest pages `mem`'s mapping holds now, read from `pagemap` (this
/// process's `/proc/self/pagemap`), in guest-physical order, at most
/// [`MAX_PAGES`].
pub fn record(pagemap: &File, mem: &GuestMemoryMmap) -> io::Result<Vec<Page>> {
    let mut pages = Vec::new();
    let mut buf = vec![0u8; CHUNK * 8];
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| io::ErrorKind::InvalidInput)? as u64;
        let count = region.len() / PAGE;
        let mut done = 0u64;
        while done < count && pages.len() < MAX_PAGES {
            let n = (count - done).min(CHUNK as u64);
            let bytes = usize::try_from(n * 8).map_err(|_| io::ErrorKind::InvalidInput)?;
            let at = (host / PAGE + done) * 8;
            pagemap.read_exact_at(&mut buf[..bytes], at)?;
            for (i, entry) in buf[..bytes].chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes(entry.try_into().unwrap_or_default());
                if entry & PRESENT != 0 && pages.len() < MAX_PAGES {
                    pages.push(Page {
                        gpa: region.start_addr().0 + (done + i as u64) * PAGE,
                        written: entry & FILE_PAGE == 0,
                    });
                }
            }
            done += n;
        }
    }
    Ok(pages)
}

/// `userfaultfd` ioctls and flags (linux/userfaultfd.h; not in the libc
/// crate): `_IOWR(0xAA, nr, size)`.
const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// Write-protect registration of any memory (Linux 6.7); without it only
/// anonymous memory and shmem (a tmpfs file) can be registered.
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// Keeps the kernel's fault-around off for guest memory while it lives: a
/// `userfaultfd` (user-mode faults only: no privilege needed) with guest
/// memory registered for write protection. No page is ever protected, so no
/// fault is ever reported to it and there is nothing to handle; but a
/// mapping registered so is faulted one page at a time (the kernel's
/// `uffd_disable_fault_around`). Unlike dropping the page cache, this holds
/// whatever the cache holds: on tmpfs, whose pages cannot be dropped, and
/// while siblings map the same file.
#[derive(Debug)]
pub struct FaultAroundOff(#[allow(dead_code)] std::os::fd::OwnedFd);

/// Turns fault-around off for `mem`'s regions ([`FaultAroundOff`]), or says
/// why it cannot (a kernel without `userfaultfd`, or too old to register
/// this kind of memory for write protection).
pub fn fault_around_off(mem: &GuestMemoryMmap) -> io::Result<FaultAroundOff> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let open = |features: u64| -> io::Result<OwnedFd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
        // SAFETY: a system call that takes only flags and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::c_int::try_from(fd).map_err(|_| io::ErrorKind::InvalidData)?;
        // SAFETY: the kernel just returned this descriptor to us alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly this struct.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    };
    // The API handshake is once per descriptor: an older kernel refuses the
    // feature, and a new descriptor asks for none.
    let fd = open(UFFD_FEATURE_WP_ASYNC).or_else(|_| open(0))?;
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut register = UffdioRegister {
            start: host as u64,
            len: region.len(),
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly this struct; it
        // marks our own mapping and changes no content.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut register) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(FaultAroundOff(fd))
}

/// Drops `file`'s clean pages from the page cache (those mapped elsewhere
/// stay): a recording's read faults then map only the pages they read,
/// not the neighbours the kernel's fault-around would map from the cache.
pub fn drop_cache(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: advice on a file descriptor we own; no memory is involved.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Advises `mem`'s regions random access: a read fault then reads only its
/// page (no readahead into the page cache for fault-around to map).
pub fn advise_random(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        if let Ok(host) = mem.get_host_address(region.start_addr()) {
            if let Ok(len) = usize::try_from(region.len()) {
                // SAFETY: advice on a mapping of ours; it changes no content.
                unsafe { libc::madvise(host.cast(), len, libc::MADV_RANDOM) };
            }
        }
    }
}

/// The file's bytes for `pages` of the snapshot whose memory tag is `tag`.
pub fn encode(tag: &[u8; 32], pages: &[Page]) -> Vec<u8> {
    let pages = &pages[..pages.len().min(MAX_PAGES)];
    let mut out = Vec::with_capacity(HEADER + pages.len() * 8 + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&u32::try_from(pages.len()).unwrap_or(0).to_le_bytes());
    out.extend_from_slice(tag);
    for p in pages {
        out.extend_from_slice(&(p.gpa | u64::from(p.written)).to_le_bytes());
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

/// Reads a working set from `file` for the snapshot with memory tag `tag`
/// and guest RAM `ram` (guest-physical `(start, length)` ranges): its pages
/// as ranges to map, or why it cannot be used.
pub fn load(file: &mut File, tag: &[u8; 32], ram: &[(u64, u64)]) -> Result<Vec<Range>, String> {
    let most = (HEADER + MAX_PAGES * 8 + 32) as u64;
    let mut bytes = Vec::new();
    file.take(most + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    decode(&bytes, tag, ram)
}

/// [`load`] of bytes already read.
pub fn decode(bytes: &[u8], tag: &[u8; 32], ram: &[(u64, u64)]) -> Result<Vec<Range>, String> {
    if bytes.len() < HEADER + 32 || &bytes[..8] != MAGIC {
        return Err("not a working-set file".into());
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    if word(8) != VERSION {
        return Err(format!("format {} (this VMM reads {VERSION})", word(8)));
    }
    let count = usize::try_from(word(12)).unwrap_or(usize::MAX);
    if count > MAX_PAGES || bytes.len() != HEADER + count * 8 + 32 {
        return Err("its length does not match its page count".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        return Err("its checksum does not match (damaged)".into());
    }
    if &bytes[16..48] != tag {
        return Err("it was recorded for another snapshot".into());
    }
    let mut ranges: Vec<Range> = Vec::new();
    // The last page's address and the RAM range it lies in.
    let mut last: Option<(u64, usize)> = None;
    for entry in body[HEADER..].chunks_exact(8) {
        let entry = u64::from_le_bytes(entry.try_into().unwrap_or_default());
        let (gpa, written) = (entry & !(PAGE - 1), entry & 1 == 1);
        if entry & (PAGE - 2) != 0 {
            return Err(format!("page {entry:#x} is malformed"));
        }
        if last.is_some_and(|(l, _)| gpa <= l) {
            return Err("its pages are not in ascending order".into());
        }
        let Some(slot) = ram.iter().position(|&(s, l)| gpa >= s && gpa - s < l) else {
            return Err(format!("page {gpa:#x} is outside the guest's memory"));
        };
        match ranges.last_mut() {
            // Contiguous, of the same kind, and in the same RAM range (a
            // range must not span the MMIO gap).
            Some(r)
                if r.written == written
                    && r.gpa + r.len == gpa
                    && last.is_some_and(|(_, s)| s == slot) =>
            {
                r.len += PAGE;
            }
            _ => ranges.push(Range {
                gpa,
                len: PAGE,
                written,
            }),
        }
        last = Some((gpa, slot));
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const RAM: [(u64, u64); 2] = [(0, 16 * PAGE), (0x1_0000_0000, 4 * PAGE)];

    fn page(gpa: u64, written: bool) -> Page {
        Page { gpa, written }
    }

    #[test]
    fn a_working_set_round_trips_as_ranges_of_one_kind_within_ram() {
        let tag = [7u8; 32];
        let pages = [
            page(0, false),
            page(PAGE, false),
            page(2 * PAGE, true),
            page(3 * PAGE, true),
            page(5 * PAGE, true),
            page(15 * PAGE, false),
            // Contiguous in address with the one before only across the
            // gap's other side: a range of its own.
            page(0x1_0000_0000, false),
            page(0x1_0000_0000 + PAGE, false),
        ];
        let bytes = encode(&tag, &pages);
        assert_eq!(bytes.len(), HEADER + pages.len() * 8 + 32);
        let ranges = decode(&bytes, &tag, &RAM).expect("decodes");
        let r = |gpa, pages, written| Range {
            gpa,
            len: pages * PAGE,
            written,
        };
        assert_eq!(
            ranges,
            [
                r(0, 2, false),
                r(2 * PAGE, 2, true),
                r(5 * PAGE, 1, true),
                r(15 * PAGE, 1, false),
                r(0x1_0000_0000, 2, false),
            ]
        );
    }

    #[test]
    fn a_damaged_foreign_or_out_of_bounds_working_set_is_not_used() {
        let tag = [7u8; 32];
        let good = encode(&tag, &[page(0, false), page(PAGE, true)]);
        let why = |bytes: &[u8], tag: &[u8; 32]| decode(bytes, tag, &RAM).expect_err("refused");
        assert!(why(&good, &[8; 32]).contains("another snapshot"));
        let mut flipped = good.clone();
        flipped[HEADER] ^= 0x10;
        assert!(why(&flipped, &tag).contains("checksum"));
        assert!(why(&good[..good.len() - 1], &tag).contains("length"));
        assert!(why(
            b"AIRLMEMT and more bytes than a header holds, a lot more",
            &tag
        )
        .contains("not a working-set"));
        // Well formed and checksummed, but not what the VMM wrote: each is
        // refused at its page.
        assert!(why(&encode(&tag, &[page(16 * PAGE, false)]), &tag).contains("outside"));
        assert!(why(&encode(&tag, &[page(0x2_0000_0000, true)]), &tag).contains("outside"));
        assert!(
            why(&encode(&tag, &[page(PAGE, false), page(0, false)]), &tag).contains("ascending")
        );
        assert!(
            why(&encode(&tag, &[page(PAGE, false), page(PAGE, true)]), &tag).contains("ascending")
        );
        assert!(why(&encode(&tag, &[page(PAGE | 0x10, false)]), &tag).contains("malformed"));
        let mut version = good.clone();
        version[8] = 9;
        assert!(why(&version, &tag).contains("format 9"));
        let mut count = encode(&tag, &[]);
        count[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(why(&count, &tag).contains("length"));
        assert_eq!(decode(&encode(&tag, &[]), &tag, &RAM), Ok(Vec::new()));
    }

    /// The recording reads this process's own page tables: a page of the
    /// guest's memory read through a `MAP_PRIVATE` file mapping is the
    /// file's, one written is a private copy, one untouched is absent.
    /// `file`'s 8 pages as guest memory, mapped as a restore maps the
    /// snapshot's (`MAP_PRIVATE`: copy-on-write).
    fn map_private(file: File) -> GuestMemoryMmap {
        use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
        use vm_memory::FileOffset;
        let region = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            8 * 4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .expect("map");
        let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("region");
        GuestMemoryMmap::from_regions(vec![region]).expect("memory")
    }

    /// What both recording tests touch: a read of page 2 (the file's bytes
    /// are 1) and a write into page 5.
    fn read_2_write_5(mem: &GuestMemoryMmap) {
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(2 * PAGE))
            .expect("read");
        assert_eq!(byte, [1]);
        mem.write_slice(&[9], GuestAddress(5 * PAGE + 7))
            .expect("write");
    }

    /// An 8-page shmem (tmpfs) file.
    fn shmem_file() -> File {
        use std::os::fd::{FromRawFd, OwnedFd};
        // SAFETY: a system call that takes a name and flags and returns a new fd.
        let fd = unsafe { libc::memfd_create(c"airlock-wset".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: the kernel just returned this descriptor to us alone.
        File::from(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The pages a read of page 2 and a write into page 5 leave mapped of
    /// `file` (8 pages, all of them in the page cache once filled), mapped
    /// as a restore maps the snapshot's memory, with fault-around `off` or
    /// not.
    fn recorded_of(file: File, off: bool) -> Vec<Page> {
        file.write_all_at(&vec![1u8; 8 * 4096], 0).expect("fill");
        let mem = map_private(file);
        let guard = off.then(|| fault_around_off(&mem).expect("fault-around off"));
        read_2_write_5(&mem);
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(5 * PAGE + 7))
            .expect("read back");
        assert_eq!(byte, [9]);
        let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
        let pages = record(&pagemap, &mem).expect("record");
        drop(guard);
        pages
    }

    /// A read fault maps the neighbours the page cache holds too: on tmpfs
    /// (the test bed keeps its cache there) they cannot be dropped, and on
    /// any file system not while a sibling maps them. With fault-around off
    /// the recording holds exactly what was read and written, and the
    /// guest's memory reads and writes as before.
    #[test]
    fn with_fault_around_off_a_recording_is_exact_whatever_the_cache_holds() {
        let dir = std::env::temp_dir().join(format!("airlock-wset-cached-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let disk = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join("memory"))
                .expect("file")
        };
        let files: [(&str, &dyn Fn() -> File); 2] = [("tmpfs", &shmem_file), ("disk", &disk)];
        for (what, file) in files {
            let around = recorded_of(file(), false);
            assert!(
                around.len() > 2,
                "{what}: fault-around maps the cached neighbours of a read page: {around:?}"
            );
            assert_eq!(
                recorded_of(file(), true),
                [page(2 * PAGE, false), page(5 * PAGE, true)],
                "{what}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_recording_sees_which_pages_were_read_and_which_written() {
        let dir = std::env::temp_dir().join(format!("airlock-wset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("memory");
        std::fs::write(&path, vec![1u8; 8 * 4096]).expect("file");
        let file = File::open(&path).expect("open");
        file.sync_all().expect("sync");
        drop_cache(&file);
        let mem = map_private(file);
        advise_random(&mem);
        read_2_write_5(&mem);
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(6 * PAGE))
            .expect("read");
        let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
        let pages = record(&pagemap, &mem).expect("record");
        assert_eq!(
            pages,
            [
                page(2 * PAGE, false),
                page(5 * PAGE, true),
                page(6 * PAGE, false)
            ]
        );
        let ram = [(0, 8 * PAGE)];
        let ranges = decode(&encode(&[1; 32], &pages), &[1; 32], &ram).expect("decodes");
        assert_eq!(ranges.len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
