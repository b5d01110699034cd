//! The VM's configuration: plain data from the CLI, validated before any
//! KVM object exists.

use std::path::PathBuf;

use crate::arch::layout::MMIO_GAP_START;
use crate::arch::mptable::MAX_CPUS;

/// Least guest memory: the kernel image alone is ~20 MiB and needs room to
/// unpack the initramfs and run init.
pub const MIN_MEM_MIB: u32 = 64;
/// Most guest memory.
pub const MAX_MEM_MIB: u32 = 64 * 1024;

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Console {
    /// This process's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Nowhere.
    Discard,
}

/// The vsock device: the guest's CID and the hybrid-vsock socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more; 0-2 are reserved).
    pub cid: u32,
    /// Host side: `<uds>` for host-initiated connections, `<uds>_<port>`
    /// for guest-initiated ones.
    pub uds: PathBuf,
}

/// A disk image the guest sees as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Refuse guest writes (and open the file read-only).
    pub read_only: bool,
}

/// Most disks a VM may have (each takes a virtio-mmio slot and an IRQ).
pub const MAX_DISKS: usize = 8;

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Uncompressed ELF kernel with a PVH entry.
    pub kernel: PathBuf,
    /// Initramfs (newc cpio), optional.
    pub initrd: Option<PathBuf>,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Appended to the VMM's own command line.
    pub extra_cmdline: String,
    /// The serial console's destination.
    pub console: Console,
    /// A vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Disks, in the order the guest sees them (`/dev/vda`, `/dev/vdb`, ...).
    pub disks: Vec<DiskConfig>,
}

/// A configuration the VMM refuses before touching KVM.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Too little or too much memory.
    #[error("guest memory of {0} MiB is out of range: use --mem between {MIN_MEM_MIB} and {MAX_MEM_MIB}")]
    Memory(u32),
    /// Zero or too many vCPUs.
    #[error("{0} vCPUs is out of range: use --cpus between 1 and {MAX_CPUS}")]
    Cpus(u8),
    /// The kernel file is missing.
    #[error(
        "kernel not found at {0}: build it with scripts/build-kernel.sh or pass --kernel PATH"
    )]
    KernelMissing(PathBuf),
    /// The kernel file is not an ELF64 image.
    #[error(
        "{0} is not an ELF64 vmlinux: pass the uncompressed kernel (build/vmlinux), not a bzImage"
    )]
    KernelNotElf(PathBuf),
    /// A reserved or out-of-range vsock CID.
    #[error("vsock CID {0} is reserved: use --vsock-cid 3 or more")]
    VsockCid(u32),
    /// The vsock socket's directory does not exist.
    #[error("the directory for vsock socket {0} does not exist")]
    VsockDir(PathBuf),
    /// A disk image is missing.
    #[error("disk image not found at {0}")]
    DiskMissing(PathBuf),
    /// Too many disks.
    #[error("{0} disks given; at most {MAX_DISKS}")]
    TooManyDisks(usize),
    /// The initrd file is missing.
    #[error(
        "initrd not found at {0}: build it with scripts/build-initramfs.sh or pass --initrd PATH"
    )]
    InitrdMissing(PathBuf),
}

impl VmConfig {
    /// Checks what can be checked without KVM.
    pub fn validate(&self) -> Result<(), Error> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(Error::Memory(self.mem_mib));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(Error::Cpus(self.cpus));
        }
        if !self.kernel.is_file() {
            return Err(Error::KernelMissing(self.kernel.clone()));
        }
        if !is_elf64(&self.kernel) {
            return Err(Error::KernelNotElf(self.kernel.clone()));
        }
        if let Some(vsock) = &self.vsock {
            if vsock.cid < 3 || vsock.cid == u32::MAX {
                return Err(Error::VsockCid(vsock.cid));
            }
            let dir = vsock.uds.parent().filter(|d| !d.as_os_str().is_empty());
            if !dir.is_none_or(std::path::Path::is_dir) {
                return Err(Error::VsockDir(vsock.uds.clone()));
            }
        }
        if self.disks.len() > MAX_DISKS {
            return Err(Error::TooManyDisks(self.disks.len()));
        }
        if let Some(d) = self.disks.iter().find(|d| !d.path.is_file()) {
            return Err(Error::DiskMissing(d.path.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(Error::InitrdMissing(initrd.clone()));
            }
        }
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        u64::from(self.mem_mib) << 20
    }
}

/// Whether `path` starts with the ELF magic and the 64-bit class byte.
fn is_elf64(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 5];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head == *b"\x7fELF\x02")
}

const _: () = assert!(
    (MAX_MEM_MIB as u64) << 20 > MMIO_GAP_START,
    "large guests use RAM above 4 GiB"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            // The test binary itself is an ELF64 file.
            kernel: std::env::current_exe().expect("exe"),
            initrd: None,
            mem_mib: 256,
            cpus: 1,
            extra_cmdline: String::new(),
            console: Console::Discard,
            vsock: None,
            disks: Vec::new(),
        }
    }

    #[test]
    fn sane_config_passes() {
        assert_eq!(cfg().validate(), Ok(()));
        assert_eq!(cfg().mem_bytes(), 256 << 20);
    }

    #[test]
    fn bad_values_are_named() {
        let c = VmConfig {
            mem_mib: 16,
            ..cfg()
        };
        assert_eq!(c.validate(), Err(Error::Memory(16)));
        let c = VmConfig { cpus: 0, ..cfg() };
        assert_eq!(c.validate(), Err(Error::Cpus(0)));
        let c = VmConfig {
            cpus: MAX_CPUS + 1,
            ..cfg()
        };
        assert_eq!(c.validate(), Err(Error::Cpus(MAX_CPUS + 1)));
        let c = VmConfig {
            kernel: "/nonexistent/vmlinux".into(),
            ..cfg()
        };
        assert!(matches!(c.validate(), Err(Error::KernelMissing(_))));
        let c = VmConfig {
            initrd: Some("/nonexistent.cpio".into()),
            ..cfg()
        };
        let e = c.validate().expect_err("missing initrd");
        assert!(e.to_string().contains("scripts/build-initramfs.sh"));
    }
}
