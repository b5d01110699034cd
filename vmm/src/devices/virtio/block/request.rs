//! One virtio-blk request: parsed from a descriptor chain, checked against
//! the disk, executed, and its status written back.
//!
//! A request chain is a 16-byte header (type, reserved, sector) in readable
//! buffers, then the data (readable for writes, writable for reads), then a
//! one-byte status in the last writable buffer. Everything is checked before
//! the disk is touched: the data length is a whole number of sectors within
//! [`MAX_REQUEST_BYTES`], and the range lies inside the disk.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;

use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::memory::GuestMemoryMmap;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Most data bytes in one request; the guest learns it from `size_max` x
/// `seg_max` and larger requests are refused.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// The serial number returned for GET_ID (at most 20 bytes).
pub const DISK_ID: &[u8] = b"airlock-disk";

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPP: u8 = 2;
const HEADER_LEN: usize = 16;
const ID_LEN: usize = 20;

/// Why a request failed (reported to the guest as a status byte).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The chain cannot hold a header and a status byte.
    #[error("malformed request chain")]
    Malformed,
    /// Not a whole number of sectors, or too large.
    #[error("bad data length {0}")]
    Length(usize),
    /// The range runs past the end of the disk.
    #[error("sectors {sector}+{count} run past the disk's {capacity}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Sectors.
        count: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// An unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The host file failed.
    #[error("disk I/O failed: {0}")]
    Io(String),
}

impl Error {
    fn status(&self) -> u8 {
        match self {
            Error::Unsupported(_) | Error::ReadOnly => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// The disk a device serves.
#[derive(Debug)]
pub struct Disk {
    /// The backing file.
    pub file: File,
    /// Size in sectors.
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

impl Disk {
    fn check_range(&self, sector: u64, len: usize) -> Result<u64, Error> {
        let len64 = u64::try_from(len).map_err(|_| Error::Length(len))?;
        if len > MAX_REQUEST_BYTES || len64 % SECTOR_SIZE != 0 {
            return Err(Error::Length(len));
        }
        let count = len64 / SECTOR_SIZE;
        match sector.checked_add(count) {
            Some(end) if end <= self.capacity => {
                sector.checked_mul(SECTOR_SIZE).ok_or(Error::Length(len))
            }
            _ => Err(Error::OutOfRange {
                sector,
                count,
                capacity: self.capacity,
            }),
        }
    }
}

/// Executes the request in `chain` against `disk`; returns the bytes written
/// into guest buffers (for the used ring) and the error, if the request
/// failed (the guest already got its status byte).
pub fn execute<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    disk: &mut Disk,
) -> (u32, Option<Error>)
where
    M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
{
    let (Ok(mut reader), Ok(mut writer)) =
        (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
    else {
        return (0, Some(Error::Malformed));
    };
    let mut header = [0u8; HEADER_LEN];
    if writer.available_bytes() < 1 || reader.read_exact(&mut header).is_err() {
        return (0, Some(Error::Malformed));
    }
    // The last writable byte is the status; everything before it is data.
    let Ok(mut status) = writer.split_at(writer.available_bytes() - 1) else {
        return (0, Some(Error::Malformed));
    };
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let result = match kind {
        T_IN => read(disk, sector, &mut writer),
        T_OUT => write(disk, sector, &mut reader),
        T_FLUSH => disk.file.sync_data().map_err(|e| Error::Io(e.to_string())),
        T_GET_ID => {
            let mut id = [0u8; ID_LEN];
            id[..DISK_ID.len()].copy_from_slice(DISK_ID);
            let n = writer.available_bytes().min(ID_LEN);
            writer
                .write_all(&id[..n])
                .map_err(|e| Error::Io(e.to_string()))
        }
        other => Err(Error::Unsupported(other)),
    };
    let code = result.as_ref().map_or_else(Error::status, |()| STATUS_OK);
    if status.write_all(&[code]).is_err() {
        return (0, Some(Error::Malformed));
    }
    let used = writer.bytes_written() + 1;
    (u32::try_from(used).unwrap_or(u32::MAX), result.err())
}

fn read(disk: &mut Disk, sector: u64, writer: &mut Writer<'_>) -> Result<(), Error> {
    let len = writer.available_bytes();
    let offset = disk.check_range(sector, len)?;
    let mut buf = vec![0u8; len];
    disk.file
        .read_exact_at(&mut buf, offset)
        .map_err(|e| Error::Io(e.to_string()))?;
    writer.write_all(&buf).map_err(|e| Error::Io(e.to_string()))
}

fn write(disk: &mut Disk, sector: u64, reader: &mut Reader<'_>) -> Result<(), Error> {
    if disk.read_only {
        return Err(Error::ReadOnly);
    }
    let len = reader.available_bytes();
    let offset = disk.check_range(sector, len)?;
    let mut buf = vec![0u8; len];
    reader
        .read_exact(&mut buf)
        .map_err(|e| Error::Io(e.to_string()))?;
    disk.file
        .write_all_at(&buf, offset)
        .map_err(|e| Error::Io(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn disk(read_only: bool) -> (Disk, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "airlock-blk-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let content: Vec<u8> = (0..8u8).flat_map(|s| [s; 512]).collect();
        std::fs::write(&path, &content).expect("disk");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        (
            Disk {
                file,
                capacity: 8,
                read_only,
            },
            path,
        )
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::SeqCst)
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(0x10_0000)).expect("hdr");
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(0x30_0000)).expect("status")
    }

    /// Plays the guest: header, one data buffer of `len` bytes (`flags`),
    /// status byte.
    fn request(
        mem: &GuestMemoryMmap,
        kind: u32,
        sector: u64,
        len: u32,
        data_flags: u16,
        d: &mut Disk,
    ) -> (u32, Option<Error>) {
        header(mem, kind, sector);
        mem.write_obj(0xffu8, GuestAddress(0x30_0000)).expect("w");
        let q = MockSplitQueue::new(mem, 16);
        let chain = q
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(0x10_0000, 16, F_NEXT, 1)),
                RawDescriptor::from(Descriptor::new(0x20_0000, len, data_flags | F_NEXT, 2)),
                RawDescriptor::from(Descriptor::new(0x30_0000, 1, F_WRITE, 0)),
            ])
            .expect("chain");
        execute(mem, chain, d)
    }

    #[test]
    fn reads_and_writes_land_at_the_right_sectors() {
        let mem = crate::memory::create(16 << 20).expect("mem");
        let (mut d, path) = disk(false);
        let (used, err) = request(&mem, T_IN, 3, 1024, F_WRITE, &mut d);
        assert_eq!((used, err, status(&mem)), (1025, None, STATUS_OK));
        let mut buf = [0u8; 1024];
        mem.read_slice(&mut buf, GuestAddress(0x20_0000))
            .expect("r");
        assert!(buf[..512].iter().all(|b| *b == 3) && buf[512..].iter().all(|b| *b == 4));
        mem.write_slice(&[0xaa; 512], GuestAddress(0x20_0000))
            .expect("w");
        let (_, err) = request(&mem, T_OUT, 7, 512, 0, &mut d);
        assert_eq!((err, status(&mem)), (None, STATUS_OK));
        let on_disk = std::fs::read(&path).expect("read");
        assert!(on_disk[7 * 512..].iter().all(|b| *b == 0xaa));
        let (_, err) = request(&mem, T_FLUSH, 0, 0, 0, &mut d);
        assert_eq!((err, status(&mem)), (None, STATUS_OK));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn hostile_requests_get_an_error_status_and_never_touch_the_disk() {
        let mem = crate::memory::create(16 << 20).expect("mem");
        let (mut d, path) = disk(false);
        let before = std::fs::read(&path).expect("read");
        // Past the end, and a sector number that overflows.
        let (_, err) = request(&mem, T_OUT, 8, 512, 0, &mut d);
        assert!(matches!(err, Some(Error::OutOfRange { .. })));
        assert_eq!(status(&mem), STATUS_IOERR);
        let (_, err) = request(&mem, T_IN, u64::MAX, 512, F_WRITE, &mut d);
        assert!(matches!(err, Some(Error::OutOfRange { .. })));
        // Not whole sectors; larger than the limit.
        let (_, err) = request(&mem, T_OUT, 0, 100, 0, &mut d);
        assert_eq!(err, Some(Error::Length(100)));
        let big = u32::try_from(MAX_REQUEST_BYTES).expect("fits") + 512;
        let (_, err) = request(&mem, T_IN, 0, big, F_WRITE, &mut d);
        assert_eq!(err, Some(Error::Length(big as usize)));
        // Unknown type.
        let (_, err) = request(&mem, 99, 0, 512, 0, &mut d);
        assert_eq!(
            (err, status(&mem)),
            (Some(Error::Unsupported(99)), STATUS_UNSUPP)
        );
        assert_eq!(std::fs::read(&path).expect("read"), before);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn read_only_disks_refuse_writes() {
        let mem = crate::memory::create(16 << 20).expect("mem");
        let (mut d, path) = disk(true);
        let (_, err) = request(&mem, T_OUT, 0, 512, 0, &mut d);
        assert_eq!((err, status(&mem)), (Some(Error::ReadOnly), STATUS_UNSUPP));
        let (_, err) = request(&mem, T_IN, 0, 512, F_WRITE, &mut d);
        assert_eq!(err, None, "reads still work");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn get_id_and_chains_without_status_space() {
        let mem = crate::memory::create(16 << 20).expect("mem");
        let (mut d, path) = disk(true);
        let (used, err) = request(&mem, T_GET_ID, 0, 20, F_WRITE, &mut d);
        assert_eq!((used, err), (21, None));
        let mut id = [0u8; 12];
        mem.read_slice(&mut id, GuestAddress(0x20_0000)).expect("r");
        assert_eq!(&id, DISK_ID);
        // Header only: nowhere to put a status.
        let q = MockSplitQueue::new(&mem, 16);
        let chain = q
            .build_desc_chain(&[RawDescriptor::from(Descriptor::new(0x10_0000, 16, 0, 0))])
            .expect("chain");
        assert_eq!(execute(&mem, chain, &mut d), (0, Some(Error::Malformed)));
        let _ = std::fs::remove_file(path);
    }
}
