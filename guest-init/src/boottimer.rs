//! The boot-timer mark: one byte written to a known MMIO page through
//! `/dev/mem` (as Firecracker's boot timer) tells the VMM "init reached".
//!
//! Engines without the device ignore the write (under QEMU it lands on
//! unassigned MMIO), so a failure here is never fatal.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::ptr;

use airlock_protocol::machine::{
    BOOT_TIMER_ADDR, BOOT_TIMER_MAGIC, SNAPSHOT_MAGIC, SNAPSHOT_OFFSET,
};

/// Length of the mapping: one x86-64 page.
const PAGE_SIZE: usize = 4096;

/// The mark could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("boot timer: failed to open /dev/mem")]
    Open(#[source] io::Error),
    #[error("boot timer: failed to map {BOOT_TIMER_ADDR:#x}")]
    Map(#[source] io::Error),
}

/// Writes [`BOOT_TIMER_MAGIC`] to the first byte of the page at
/// [`BOOT_TIMER_ADDR`].
pub fn mark() -> Result<(), Error> {
    write_byte(0, BOOT_TIMER_MAGIC)?;
    crate::console::debug("boot timer: marked");
    Ok(())
}

/// Writes the snapshot mark: under a VMM asked for a snapshot, the guest
/// stops inside this write, and a guest woken from that snapshot returns
/// from it.
pub fn snapshot_mark() -> Result<(), Error> {
    write_byte(
        usize::try_from(SNAPSHOT_OFFSET).unwrap_or(0),
        SNAPSHOT_MAGIC,
    )
}

/// Writes `value` at `offset` in the boot-timer page.
fn write_byte(at: usize, value: u8) -> Result<(), Error> {
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_SYNC)
        .open("/dev/mem")
        .map_err(Error::Open)?;
    let offset = libc::off_t::try_from(BOOT_TIMER_ADDR)
        .map_err(|_| Error::Map(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: a new shared mapping chosen by the kernel (null hint), so it
    // cannot overlap memory Rust owns; `mem` is open read-write for the
    // whole call and the result is checked before use.
    let page = unsafe {
        libc::mmap(
            ptr::null_mut(),
            PAGE_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            offset,
        )
    };
    if page == libc::MAP_FAILED {
        return Err(Error::Map(io::Error::last_os_error()));
    }
    // SAFETY: `page` is the start of the live, writable PAGE_SIZE mapping
    // made above and still mapped; the offset is clamped inside it. Volatile because it
    // is device memory: the store itself is the signal and must happen.
    unsafe { ptr::write_volatile(page.cast::<u8>().add(at.min(PAGE_SIZE - 1)), value) };
    // SAFETY: unmaps exactly the mapping made above; no pointer into it is
    // used afterwards. A failure would only leak one page of address space.
    unsafe { libc::munmap(page, PAGE_SIZE) };
    Ok(())
}
