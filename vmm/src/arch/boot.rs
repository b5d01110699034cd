//! Loading the guest: the `vmlinux` ELF (PVH entry), the initrd, the command
//! line and the PVH `start_info` with its memory map.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, Cmdline, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_END, HIMEM_START, MPTABLE_ADDR, PVH_INFO_ADDR,
    PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR, VIRTIO_MMIO_SIZE,
};
use crate::memory::{low_ram_end, GuestMemoryMmap};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const MEMMAP_TYPE_RAM: u32 = 1;
const MEMMAP_TYPE_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 0x1000;

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The path given.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not an ELF `vmlinux` we can load.
    #[error("{path} is not a loadable x86-64 ELF vmlinux ({reason}); pass the uncompressed vmlinux, not a bzImage")]
    NotElf {
        /// The path given.
        path: String,
        /// The loader's complaint.
        reason: String,
    },
    /// The kernel has no PVH entry note.
    #[error("{0} has no PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvh(String),
    /// The initrd could not be read.
    #[error("cannot read initrd {path}")]
    Initrd {
        /// The path given.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd of {size} bytes does not fit in guest memory above the kernel; give the VM more memory (--mem)")]
    InitrdTooBig {
        /// Size of the initrd.
        size: u64,
    },
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures to guest memory failed.
    #[error("failed to write boot structures to guest memory: {0}")]
    Boot(String),
}

/// Where the loaded kernel ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The PVH entry point (32-bit protected mode).
    pub entry: GuestAddress,
    /// First byte past the kernel image.
    pub end: u64,
}

/// Loads the ELF kernel at `path` where its program headers say.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, Error> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| Error::OpenKernel {
        path: shown.clone(),
        source,
    })?;
    let result =
        loader::Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            Error::NotElf {
                path: shown.clone(),
                reason: e.to_string(),
            }
        })?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
            entry,
            // linux-loader reports the end as an absolute guest address.
            end: result.kernel_end,
        }),
        _ => Err(Error::NoPvh(shown)),
    }
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible
/// in low RAM, and above the kernel.
pub fn initrd_addr(low_ram_end: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let addr = low_ram_end.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// Loads the initrd at `path` at the top of low RAM; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), Error> {
    let err = |source| Error::Initrd {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(err)?;
    file.rewind().map_err(err)?;
    let addr =
        initrd_addr(low_ram_end(mem), kernel.end, size).ok_or(Error::InitrdTooBig { size })?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooBig { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| Error::Boot(format!("initrd: {e}")))?;
    Ok((addr, size))
}

/// The base command line: serial console, reboot through the i8042 (the
/// only way a guest without ACPI can stop), panic straight to reboot, and a
/// quiet boot (every console byte is a VM exit). Only parameters the kernel
/// knows: unknown ones would be handed to init as arguments or environment.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// Builds the full command line: [`BASE_CMDLINE`], one
/// `virtio_mmio.device=` per `(base, irq)` in `devices`, then `extra`.
pub fn build_cmdline(devices: &[(u64, u32)], extra: &str) -> Result<Cmdline, Error> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(BASE_CMDLINE)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    for (base, irq) in devices {
        cmdline
            .add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(*base), *irq, None)
            .map_err(|e| Error::Cmdline(e.to_string()))?;
    }
    let extra = extra.trim();
    if !extra.is_empty() {
        cmdline
            .insert_str(extra)
            .map_err(|e| Error::Cmdline(e.to_string()))?;
    }
    Ok(cmdline)
}

/// The PVH memory map for `mem`: low RAM up to the MP table, the MP table
/// reserved, then every region from 1 MiB up.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr: u64, size: u64, type_| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let mut map = vec![
        entry(0, MPTABLE_ADDR, MEMMAP_TYPE_RAM),
        entry(MPTABLE_ADDR, EBDA_END - MPTABLE_ADDR, MEMMAP_TYPE_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(entry(start, end - start, MEMMAP_TYPE_RAM));
        }
    }
    map
}

/// Writes the command line, the PVH `start_info`, the module list (the
/// initrd, if any) and the memory map.
pub fn write_pvh_boot_info(
    mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
    initrd: Option<(u64, u64)>,
) -> Result<(), Error> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    let map = memory_map(mem);
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(map.len()).unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(PVH_INFO_ADDR));
    if let Some((paddr, size)) = initrd {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_ADDR;
        params = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(PVH_INFO_ADDR));
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    params.set_sections(&map, GuestAddress(PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| Error::Boot(e.to_string()))
}

/// Reads the NUL-terminated command line back from guest memory (tests and
/// diagnostics).
pub fn read_cmdline(mem: &GuestMemoryMmap) -> Option<String> {
    let mut buf = vec![0u8; CMDLINE_MAX_SIZE];
    mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR)).ok()?;
    let end = buf.iter().position(|b| *b == 0)?;
    String::from_utf8(buf[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_starts_with_the_base_and_appends_extras() {
        let c = build_cmdline(&[], "  airlock.debug=1 ").expect("cmdline");
        let s = c.as_cstring().expect("cstr").into_string().expect("utf8");
        assert!(s.starts_with("console=ttyS0 reboot=k panic=-1 quiet"));
        assert!(s.ends_with(" airlock.debug=1"));
        assert_eq!(
            build_cmdline(&[], "")
                .expect("c")
                .as_cstring()
                .expect("s")
                .to_str()
                .ok(),
            Some(BASE_CMDLINE)
        );
    }

    #[test]
    fn virtio_devices_are_announced_for_the_kernel() {
        let c = build_cmdline(&[(0xd000_1000, 5)], "x=1").expect("cmdline");
        let s = c.as_cstring().expect("cstr").into_string().expect("utf8");
        assert!(s.contains(" virtio_mmio.device=4K@0xd0001000:5"), "{s}");
        assert!(s.ends_with(" x=1"), "extras come last: {s}");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(build_cmdline(&[], &long), Err(Error::Cmdline(_))));
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_above_the_kernel() {
        assert_eq!(
            initrd_addr(0x1000_0000, 0x200_0000, 0x1800),
            Some(0x0fff_e000)
        );
        assert_eq!(initrd_addr(0x1000_0000, 0x0fff_f000, 0x1800), None);
        assert_eq!(initrd_addr(0x1000, 0, 0x2000), None);
    }

    /// Plays the kernel's part: reads start_info, the module list and the
    /// memory map back as Linux's `xen_prepare_pvh`/`pvh_start_xen` do.
    #[test]
    fn guest_reads_start_info_modules_and_memory_map() {
        let mem = crate::memory::create(64 << 20).expect("mem");
        let c = build_cmdline(&[], "init=/init").expect("cmdline");
        write_pvh_boot_info(&mem, &c, Some((0x300_0000, 0x1234))).expect("write");
        let si: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).expect("si");
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.version, 1);
        assert_eq!(si.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).expect("mod");
        assert_eq!((m.paddr, m.size), (0x300_0000, 0x1234));
        assert_eq!(
            read_cmdline(&mem).as_deref(),
            Some(c.as_cstring().expect("c").to_str().expect("s"))
        );
        let mut ram = 0;
        for i in 0..u64::from(si.memmap_entries) {
            let e: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(si.memmap_paddr + i * 24))
                .expect("entry");
            if e.type_ == MEMMAP_TYPE_RAM {
                ram += e.size;
            } else {
                assert_eq!((e.addr, e.type_), (MPTABLE_ADDR, MEMMAP_TYPE_RESERVED));
            }
        }
        // All RAM except the MP table page and the legacy hole below 1 MiB.
        assert_eq!(ram, (64 << 20) - (HIMEM_START - MPTABLE_ADDR));
    }

    #[test]
    fn no_initrd_means_no_modules() {
        let mem = crate::memory::create(16 << 20).expect("mem");
        write_pvh_boot_info(&mem, &build_cmdline(&[], "").expect("c"), None).expect("write");
        let si: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_ADDR)).expect("si");
        assert_eq!(si.nr_modules, 0);
    }

    #[test]
    fn non_elf_kernel_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("airlock-vmm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("not-a-kernel");
        std::fs::write(&p, b"MZ this is a bzImage or whatever").expect("write");
        let mem = crate::memory::create(16 << 20).expect("mem");
        let err = load_kernel(&mem, &p).expect_err("must fail");
        assert!(matches!(err, Error::NotElf { .. }), "{err}");
        let err = load_kernel(&mem, &dir.join("missing")).expect_err("must fail");
        assert!(matches!(err, Error::OpenKernel { .. }));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
