//! Putting the kernel's `vmlinux` (ELF64, PVH entry) and the initrd into
//! guest memory.
//!
//! File bytes whose offset in the file and address in the guest agree
//! modulo the page size are not copied: their whole pages are mapped from
//! the file `MAP_PRIVATE` over the guest's RAM. That is copy-on-write: a
//! page the guest writes becomes its own, a page it never writes stays the
//! host's page-cache page, shared by every sandbox booted from the same
//! kernel (its text, its read-only data) and never read or copied at boot.
//! The partial first and last page of each piece, and pieces that do not
//! line up, are copied. The guest sees byte for byte what a copying loader
//! gives it (unit-tested against linux-loader on the real kernel).
//!
//! The kernel file is the host's, not the guest's, but it is parsed as
//! untrusted all the same: every size and offset is bounded and checked
//! against the file and guest RAM before it is used.
//!
//! A mapped file must not be rewritten in place while a VM runs from it
//! (the same holds for a snapshot's memory file): pages the guest has not
//! written would change under it, and a truncated file faults. Airlock's
//! build scripts and caches write new files and rename them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::memory::GuestMemoryMmap;

const PAGE: u64 = 0x1000;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// More program headers than any kernel has (ours has 5).
const MAX_PHDRS: usize = 64;
/// Larger than any kernel's notes (ours: 136 bytes).
const MAX_NOTES: u64 = 64 << 10;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// One `PT_LOAD` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Where its bytes are in the file.
    pub offset: u64,
    /// Where they go in the guest.
    pub paddr: u64,
    /// How many bytes come from the file.
    pub filesz: u64,
    /// Its size in memory (the rest is zero).
    pub memsz: u64,
}

/// What a `vmlinux` says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The PVH entry point (32-bit), if it has one.
    pub pvh_entry: Option<u64>,
    /// Its loadable segments, in file order.
    pub loads: Vec<Load>,
    /// First byte past the highest segment.
    pub end: u64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn read_at(file: &File, len: u64, offset: u64, size: u64) -> Result<Vec<u8>, String> {
    if offset.checked_add(size).is_none_or(|e| e > len) {
        return Err(format!(
            "{size} bytes at offset {offset} lie past its end ({len} bytes)"
        ));
    }
    let mut buf = vec![0u8; usize::try_from(size).map_err(|_| "a size beyond memory")?];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| format!("read at offset {offset}: {e}"))?;
    Ok(buf)
}

/// Reads the ELF header, the program headers and the PVH note of `file`.
/// `min_paddr`: no segment may load below it (the legacy area below 1 MiB
/// holds the VMM's boot structures).
pub fn parse(file: &File, min_paddr: u64) -> Result<Image, String> {
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?
        .len();
    if len < EHDR_SIZE as u64 {
        return Err("too short for an ELF header".into());
    }
    let ehdr = read_at(file, len, 0, EHDR_SIZE as u64)?;
    if &ehdr[..4] != b"\x7fELF" {
        return Err("no ELF magic".into());
    }
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    if u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(format!("machine {} is not x86-64", u16_at(&ehdr, 18)));
    }
    let phoff = u64_at(&ehdr, 32);
    let phentsize = usize::from(u16_at(&ehdr, 54));
    let phnum = usize::from(u16_at(&ehdr, 56));
    if phentsize != PHDR_SIZE {
        return Err(format!("program header size {phentsize}, not {PHDR_SIZE}"));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(format!(
            "{phnum} program headers (1 to {MAX_PHDRS} accepted)"
        ));
    }
    let table = read_at(file, len, phoff, (phnum * PHDR_SIZE) as u64)?;
    let mut image = Image {
        pvh_entry: None,
        loads: Vec::new(),
        end: 0,
    };
    for ph in table.chunks_exact(PHDR_SIZE) {
        let kind = u32_at(ph, 0);
        let offset = u64_at(ph, 8);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        match kind {
            PT_LOAD => {
                if filesz > memsz {
                    return Err(format!(
                        "a segment at {paddr:#x} has more file bytes ({filesz}) than memory ({memsz})"
                    ));
                }
                if offset.checked_add(filesz).is_none_or(|e| e > len) {
                    return Err(format!(
                        "the segment at {paddr:#x} lies past the end of the file"
                    ));
                }
                if paddr < min_paddr {
                    return Err(format!(
                        "a segment loads at {paddr:#x}, below {min_paddr:#x}"
                    ));
                }
                let end = paddr
                    .checked_add(memsz)
                    .ok_or_else(|| format!("the segment at {paddr:#x} wraps around"))?;
                image.end = image.end.max(end);
                image.loads.push(Load {
                    offset,
                    paddr,
                    filesz,
                    memsz,
                });
            }
            PT_NOTE if image.pvh_entry.is_none() => {
                if filesz > MAX_NOTES {
                    return Err(format!("a note segment of {filesz} bytes"));
                }
                let notes = read_at(file, len, offset, filesz)?;
                image.pvh_entry = pvh_entry(&notes);
            }
            _ => {}
        }
    }
    if image.loads.is_empty() {
        return Err("no loadable segment".into());
    }
    Ok(image)
}

/// The `XEN_ELFNOTE_PHYS32_ENTRY` note's address, if `notes` has one.
fn pvh_entry(notes: &[u8]) -> Option<u64> {
    let align = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut at = 0usize;
    while at.checked_add(12)? <= notes.len() {
        let namesz = usize::try_from(u32_at(notes, at)).ok()?;
        let descsz = usize::try_from(u32_at(notes, at + 4)).ok()?;
        let kind = u32_at(notes, at + 8);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(align(namesz)?)?;
        let next = desc_at.checked_add(align(descsz)?)?;
        if desc_at.checked_add(descsz)? > notes.len() {
            return None;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY
            && notes.get(name_at..name_at + namesz) == Some(b"Xen\0".as_slice())
            && descsz >= 4
        {
            return Some(u64::from(u32_at(notes, desc_at)));
        }
        at = next;
    }
    None
}

/// How the bytes got there.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Bytes mapped from the file (whole pages).
    pub mapped: u64,
    /// Bytes copied.
    pub copied: u64,
}

impl std::ops::AddAssign for Placed {
    fn add_assign(&mut self, o: Self) {
        self.mapped += o.mapped;
        self.copied += o.copied;
    }
}

/// Checks that `[addr, addr + len)` lies in one RAM region of `mem`.
pub fn check_in_ram(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), String> {
    let end = addr
        .checked_add(len)
        .ok_or_else(|| format!("{len} bytes at {addr:#x} wrap around"))?;
    let ok = mem.find_region(GuestAddress(addr)).is_some_and(|r| {
        r.start_addr()
            .0
            .checked_add(r.len())
            .is_some_and(|r_end| end <= r_end)
    });
    if ok || len == 0 {
        Ok(())
    } else {
        Err(format!(
            "{addr:#x}..{end:#x} is not inside the guest's RAM (give the VM more memory)"
        ))
    }
}

/// Puts `len` bytes of `file` at `offset` into the guest at `addr`: the
/// whole pages mapped copy-on-write when `offset` and `addr` line up, the
/// rest copied. The range must have passed [`check_in_ram`].
pub fn place(
    mem: &GuestMemoryMmap,
    file: &File,
    offset: u64,
    addr: u64,
    len: u64,
) -> std::io::Result<Placed> {
    let mut placed = Placed::default();
    if len == 0 {
        return Ok(placed);
    }
    let end = addr + len;
    let (map_from, map_to) = if offset % PAGE == addr % PAGE {
        let from = addr.next_multiple_of(PAGE).min(end);
        let to = (end & !(PAGE - 1)).max(from);
        (from, to)
    } else {
        (end, end)
    };
    if map_to > map_from {
        let file_at = offset + (map_from - addr);
        if map_pages(mem, file, file_at, map_from, map_to - map_from) {
            placed.mapped = map_to - map_from;
            placed.copied += copy(mem, file, offset, addr, map_from - addr)?;
            placed.copied += copy(mem, file, file_at + placed.mapped, map_to, end - map_to)?;
            return Ok(placed);
        }
    }
    placed.copied = copy(mem, file, offset, addr, len)?;
    Ok(placed)
}

/// Maps `len` bytes (whole pages) of `file` at `offset` over the guest's
/// RAM at `addr`; false when the kernel refuses (the caller copies).
fn map_pages(mem: &GuestMemoryMmap, file: &File, offset: u64, addr: u64, len: u64) -> bool {
    let Some(region) = mem.find_region(GuestAddress(addr)) else {
        return false;
    };
    let start = region.start_addr().0;
    if addr + len > start + region.len() {
        return false;
    }
    let Ok(host) = region.get_host_address(MemoryRegionAddress(addr - start)) else {
        return false;
    };
    let (Ok(size), Ok(off)) = (usize::try_from(len), libc::off_t::try_from(offset)) else {
        return false;
    };
    // SAFETY: `host..host + size` lies inside this region's own mapping
    // (checked above) and no reference into it is alive: the VM has not
    // run and no device holds guest memory yet. MAP_FIXED replaces those
    // anonymous pages with a private (copy-on-write) view of the file; the
    // region still unmaps its whole range when it is dropped.
    let got = unsafe {
        libc::mmap(
            host.cast(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            off,
        )
    };
    got == host.cast()
}

/// Copies `len` bytes of `file` at `offset` to the guest at `addr`.
fn copy(
    mem: &GuestMemoryMmap,
    file: &File,
    offset: u64,
    addr: u64,
    len: u64,
) -> std::io::Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; usize::try_from(len.min(CHUNK)).unwrap_or(0)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let chunk = &mut buf[..usize::try_from(n).unwrap_or(0)];
        file.read_exact_at(chunk, offset + done)?;
        mem.write_slice(chunk, GuestAddress(addr + done))
            .map_err(std::io::Error::other)?;
        done += n;
    }
    Ok(len)
}

#[cfg(test)]
// Test sizes are small constants: the casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(bytes: &[u8]) -> File {
        let mut f = tempfile();
        f.write_all(bytes).expect("write");
        f
    }

    fn tempfile() -> File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "airlock-elf-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("create");
        let _ = std::fs::remove_file(&path);
        f
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn guest(mem: &GuestMemoryMmap, addr: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        mem.read_slice(&mut v, GuestAddress(addr)).expect("read");
        v
    }

    #[test]
    fn aligned_bytes_are_mapped_and_the_ragged_ends_copied() {
        let data = pattern(5 * PAGE as usize, 7);
        let file = temp(&data);
        let mem = crate::memory::create(16 << 20).expect("mem");
        // Offset 0x234 in the file to 0x10_0234 in the guest: 3 whole pages
        // mapped, 0xdcc bytes before and 0x234 + ... after copied.
        let len = 4 * PAGE - 0x100;
        let p = place(&mem, &file, 0x234, 0x10_0234, len).expect("place");
        assert_eq!(p.mapped, 3 * PAGE);
        assert_eq!(p.copied, len - 3 * PAGE);
        assert_eq!(
            guest(&mem, 0x10_0234, len as usize),
            &data[0x234..0x234 + len as usize]
        );
        // Nothing around it was touched.
        assert!(guest(&mem, 0x10_0000, 0x234).iter().all(|b| *b == 0));
        assert!(guest(&mem, 0x10_0234 + len, 0x100).iter().all(|b| *b == 0));
    }

    #[test]
    fn the_guests_writes_stay_its_own() {
        let data = pattern(4 * PAGE as usize, 3);
        let file = temp(&data);
        let mem = crate::memory::create(16 << 20).expect("mem");
        let p = place(&mem, &file, 0, 0x20_0000, 4 * PAGE).expect("place");
        assert_eq!(p.mapped, 4 * PAGE);
        mem.write_slice(&[0xee; 100], GuestAddress(0x20_1000))
            .expect("write");
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 0).expect("read");
        assert_eq!(back, data, "a guest write must not reach the file");
        assert_eq!(guest(&mem, 0x20_1000, 100), vec![0xee; 100]);
        // Two guests from one file do not see each other's writes.
        let other = crate::memory::create(16 << 20).expect("mem");
        place(&other, &file, 0, 0x20_0000, 4 * PAGE).expect("place");
        assert_eq!(guest(&other, 0x20_1000, 100), &data[0x1000..0x1000 + 100]);
    }

    #[test]
    fn misaligned_bytes_are_copied() {
        let data = pattern(3 * PAGE as usize, 9);
        let file = temp(&data);
        let mem = crate::memory::create(16 << 20).expect("mem");
        let p = place(&mem, &file, 0x10, 0x30_0000, 2 * PAGE).expect("place");
        assert_eq!(
            p,
            Placed {
                mapped: 0,
                copied: 2 * PAGE
            }
        );
        assert_eq!(
            guest(&mem, 0x30_0000, 2 * PAGE as usize),
            &data[0x10..0x10 + 2 * PAGE as usize]
        );
    }

    #[test]
    fn ranges_outside_ram_are_refused() {
        let mem = crate::memory::create(16 << 20).expect("mem");
        assert!(check_in_ram(&mem, 0x100_0000 - 0x1000, 0x1000).is_ok());
        assert!(check_in_ram(&mem, 0x100_0000 - 0x1000, 0x1001).is_err());
        assert!(check_in_ram(&mem, u64::MAX - 1, 4).is_err());
        assert!(check_in_ram(&mem, 0x200_0000, 1).is_err());
    }

    /// A minimal ELF64 with the given program headers `(type, offset,
    /// paddr, filesz, memsz)` and `body` after the headers.
    fn elf(phdrs: &[(u32, u64, u64, u64, u64)], body: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(b"\x7fELF");
        e.extend_from_slice(&[2, 1, 1, 0]);
        e.extend_from_slice(&[0; 8]);
        e.extend_from_slice(&2u16.to_le_bytes());
        e.extend_from_slice(&EM_X86_64.to_le_bytes());
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes());
        e.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
        e.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        e.extend_from_slice(&(phdrs.len() as u16).to_le_bytes());
        e.extend_from_slice(&[0; 6]);
        for (kind, off, paddr, filesz, memsz) in phdrs {
            e.extend_from_slice(&kind.to_le_bytes());
            e.extend_from_slice(&0u32.to_le_bytes());
            for v in [*off, *paddr, *paddr, *filesz, *memsz, 0x1000] {
                e.extend_from_slice(&v.to_le_bytes());
            }
        }
        e.extend_from_slice(body);
        e
    }

    #[test]
    fn headers_that_lie_are_refused() {
        let base = 64 + 56;
        let ok = elf(&[(PT_LOAD, base, 0x10_0000, 16, 32)], &[0x90; 16]);
        let img = parse(&temp(&ok), 0x10_0000).expect("parse");
        assert_eq!(img.end, 0x10_0020);
        assert_eq!(img.pvh_entry, None);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (ok[..40].to_vec(), "too short"),
            (
                elf(&[(PT_LOAD, base, 0x10_0000, 64, 32)], &[0; 64]),
                "more file bytes",
            ),
            (
                elf(&[(PT_LOAD, base, 0x10_0000, 1 << 40, 1 << 40)], &[]),
                "past the end",
            ),
            (
                elf(&[(PT_LOAD, u64::MAX, 0x10_0000, 2, 2)], &[]),
                "past the end",
            ),
            (elf(&[(PT_LOAD, base, 0x1000, 1, 1)], &[0]), "below"),
            (elf(&[(PT_LOAD, base, u64::MAX - 1, 1, 4)], &[0]), "wraps"),
            (
                elf(&[(PT_NOTE, base, 0, 1 << 20, 1 << 20)], &[]),
                "note segment",
            ),
            (elf(&[(PT_NOTE, base, 0, 0, 0)], &[]), "no loadable"),
            (elf(&[], &[]), "0 program headers"),
        ];
        for (bytes, want) in cases {
            let err = parse(&temp(&bytes), 0x10_0000).expect_err(want);
            assert!(err.contains(want), "{want}: {err}");
        }
        let mut bad = ok.clone();
        bad[18] = 40; // EM_ARM
        assert!(parse(&temp(&bad), 0)
            .expect_err("arm")
            .contains("not x86-64"));
    }

    #[test]
    fn notes_are_walked_within_their_bounds() {
        let mut n = Vec::new();
        // Another note first, then the PVH one.
        for (name, kind, desc) in [
            (b"GNU\0".as_slice(), 3u32, vec![1u8, 2, 3, 4, 5]),
            (
                b"Xen\0".as_slice(),
                XEN_ELFNOTE_PHYS32_ENTRY,
                0x0123_4567u32.to_le_bytes().to_vec(),
            ),
        ] {
            n.extend_from_slice(&(name.len() as u32).to_le_bytes());
            n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            n.extend_from_slice(&kind.to_le_bytes());
            n.extend_from_slice(name);
            n.extend_from_slice(&desc);
            while n.len() % 4 != 0 {
                n.push(0);
            }
        }
        assert_eq!(pvh_entry(&n), Some(0x0123_4567));
        // Cut anywhere, it is not found, and nothing panics.
        for cut in 0..n.len() {
            assert_eq!(pvh_entry(&n[..cut]), None, "cut at {cut}");
        }
        // A size that runs past the end.
        let mut huge = n.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&huge), None);
    }
}
