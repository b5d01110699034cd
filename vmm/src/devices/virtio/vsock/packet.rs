//! vsock packets on the virtqueues: the 44-byte header and its payload,
//! gathered from (TX) or scattered into (RX) descriptor chains of any shape.
//!
//! We walk chains with virtio-queue's `Reader`/`Writer` rather than
//! virtio-vsock 0.12's `VsockPacket`, because the latter insists that the
//! payload sits in a single descriptor. Linux guests split large writes over
//! several descriptors, and a device that refuses them stalls the connection
//! for good (docs/FACTS.md: the vhost-device-vsock 0.3.0 defect).

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use virtio_vsock::packet::PKT_HEADER_SIZE;

use crate::memory::GuestMemoryMmap;

/// Most payload bytes we accept in one packet (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); larger claims are refused.
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// Packet type: stream (the only one we support).
pub const TYPE_STREAM: u16 = 1;
/// Operations.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset.
pub const OP_RST: u16 = 3;
/// Shutdown (flags say which direction).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit update.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Credit request.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// Shutdown flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// Errors reading or writing packets in guest buffers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The chain's buffers are not valid guest memory.
    #[error("descriptor chain is invalid: {0}")]
    Chain(String),
    /// The chain is shorter than the header.
    #[error("descriptor chain holds {0} bytes, less than a packet header")]
    ShortHeader(usize),
    /// The header claims more payload than allowed or than the chain holds.
    #[error(
        "packet claims {claimed} payload bytes, chain holds {available} (limit {MAX_PKT_DATA})"
    )]
    BadLength {
        /// The header's `len`.
        claimed: u32,
        /// Bytes in the chain after the header.
        available: usize,
    },
    /// The RX buffer is too small for the header.
    #[error("receive buffer of {0} bytes cannot hold a packet header")]
    SmallRxBuffer(usize),
    /// Copying failed.
    #[error("guest memory access failed")]
    Io(#[source] std::io::Error),
}

/// A vsock packet header (host byte order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

const _: () = assert!(PKT_HEADER_SIZE == 44);

impl Header {
    /// Decodes the little-endian wire header.
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the little-endian wire header.
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Reads one TX packet (header, then `len` payload bytes for `OP_RW`) from
/// a guest chain. The length is checked against the limit and against what
/// the chain really holds before anything is copied.
pub fn read_tx<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
) -> Result<(Header, Vec<u8>), Error>
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let mut reader = Reader::new(mem, chain).map_err(|e| Error::Chain(e.to_string()))?;
    let total = reader.available_bytes();
    let mut raw = [0u8; PKT_HEADER_SIZE];
    if total < PKT_HEADER_SIZE {
        return Err(Error::ShortHeader(total));
    }
    reader.read_exact(&mut raw).map_err(Error::Io)?;
    let header = Header::from_bytes(&raw);
    if header.op != OP_RW {
        return Ok((header, Vec::new()));
    }
    let available = reader.available_bytes();
    let len = usize::try_from(header.len).unwrap_or(usize::MAX);
    if len > MAX_PKT_DATA || len > available {
        return Err(Error::BadLength {
            claimed: header.len,
            available,
        });
    }
    let mut data = vec![0u8; len];
    reader.read_exact(&mut data).map_err(Error::Io)?;
    Ok((header, data))
}

/// An RX chain being filled: how much payload fits, then the write.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl std::fmt::Debug for RxBuffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxBuffer")
            .field("available", &self.writer.available_bytes())
            .finish()
    }
}

impl<'a> RxBuffer<'a> {
    /// Wraps a guest RX chain; it must hold at least a header.
    pub fn new<M>(mem: &'a GuestMemoryMmap, chain: DescriptorChain<M>) -> Result<Self, Error>
    where
        M: std::ops::Deref<Target = GuestMemoryMmap>,
    {
        let writer = Writer::new(mem, chain).map_err(|e| Error::Chain(e.to_string()))?;
        if writer.available_bytes() < PKT_HEADER_SIZE {
            return Err(Error::SmallRxBuffer(writer.available_bytes()));
        }
        Ok(Self { writer })
    }

    /// Payload bytes this buffer can take after the header.
    pub fn capacity(&self) -> usize {
        (self.writer.available_bytes() - PKT_HEADER_SIZE).min(MAX_PKT_DATA)
    }

    /// Writes `header` (its `len` set to the payload's) and `data`; returns
    /// the bytes written, for the used ring.
    pub fn write(mut self, mut header: Header, data: &[u8]) -> Result<u32, Error> {
        let data = &data[..data.len().min(self.capacity())];
        header.len = u32::try_from(data.len()).unwrap_or(0);
        self.writer
            .write_all(&header.to_bytes())
            .map_err(Error::Io)?;
        self.writer.write_all(data).map_err(Error::Io)?;
        Ok(u32::try_from(self.writer.bytes_written()).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        crate::memory::create(16 << 20).expect("mem")
    }

    fn hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_through_wire_bytes() {
        let h = hdr(OP_RW, 99);
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
        assert_eq!(&h.to_bytes()[16..20], &1234u32.to_le_bytes());
    }

    /// The guest's side: a header descriptor and a payload split over three
    /// descriptors, as Linux does for large writes.
    #[test]
    fn tx_payload_spread_over_several_descriptors_is_gathered() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        m.write_slice(&hdr(OP_RW, 3000).to_bytes(), GuestAddress(0x10_0000))
            .expect("w");
        m.write_slice(&payload[..1000], GuestAddress(0x20_0000))
            .expect("w");
        m.write_slice(&payload[1000..1001], GuestAddress(0x30_0000))
            .expect("w");
        m.write_slice(&payload[1001..], GuestAddress(0x40_0000))
            .expect("w");
        let chain = q
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(0x10_0000, 44, 0, 0)),
                RawDescriptor::from(Descriptor::new(0x20_0000, 1000, 0, 0)),
                RawDescriptor::from(Descriptor::new(0x30_0000, 1, 0, 0)),
                RawDescriptor::from(Descriptor::new(0x40_0000, 1999, 0, 0)),
            ])
            .expect("chain");
        let (h, data) = read_tx(&m, chain).expect("packet");
        assert_eq!(h, hdr(OP_RW, 3000));
        assert_eq!(data, payload);
    }

    #[test]
    fn tx_header_split_across_descriptors_is_read() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let h = hdr(OP_REQUEST, 0);
        let b = h.to_bytes();
        m.write_slice(&b[..10], GuestAddress(0x10_0000)).expect("w");
        m.write_slice(&b[10..], GuestAddress(0x20_0000)).expect("w");
        let chain = q
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(0x10_0000, 10, 0, 0)),
                RawDescriptor::from(Descriptor::new(0x20_0000, 34, 0, 0)),
            ])
            .expect("chain");
        assert_eq!(read_tx(&m, chain).expect("packet").0, h);
    }

    #[test]
    fn hostile_tx_lengths_are_refused_before_copying() {
        let m = mem();
        // Claims 1 MiB, chain holds 100 bytes.
        let q = MockSplitQueue::new(&m, 16);
        m.write_slice(&hdr(OP_RW, 1 << 20).to_bytes(), GuestAddress(0x10_0000))
            .expect("w");
        let chain = q
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(0x10_0000, 44, 0, 0)),
                RawDescriptor::from(Descriptor::new(0x20_0000, 100, 0, 0)),
            ])
            .expect("chain");
        assert!(matches!(read_tx(&m, chain), Err(Error::BadLength { .. })));
        // Claims more than the chain holds, within the limit.
        let q = MockSplitQueue::new(&m, 16);
        m.write_slice(&hdr(OP_RW, 200).to_bytes(), GuestAddress(0x10_0000))
            .expect("w");
        let chain = q
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(0x10_0000, 44, 0, 0)),
                RawDescriptor::from(Descriptor::new(0x20_0000, 100, 0, 0)),
            ])
            .expect("chain");
        assert!(matches!(
            read_tx(&m, chain),
            Err(Error::BadLength {
                claimed: 200,
                available: 100
            })
        ));
        // A chain shorter than a header.
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[RawDescriptor::from(Descriptor::new(0x10_0000, 20, 0, 0))])
            .expect("chain");
        assert!(matches!(read_tx(&m, chain), Err(Error::ShortHeader(20))));
        // A buffer outside guest memory.
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[RawDescriptor::from(Descriptor::new(
                0xffff_0000_0000,
                44,
                0,
                0,
            ))])
            .expect("chain");
        assert!(matches!(read_tx(&m, chain), Err(Error::Chain(_))));
    }

    #[test]
    fn rx_packet_is_scattered_and_truncated_to_the_buffer() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        // Linux gives one writable descriptor for header + payload; use two
        // of odd sizes to check the scatter.
        let chain = q
            .build_desc_chain(&[
                RawDescriptor::from(Descriptor::new(0x10_0000, 30, F_WRITE, 0)),
                RawDescriptor::from(Descriptor::new(0x20_0000, 64, F_WRITE, 0)),
            ])
            .expect("chain");
        let rx = RxBuffer::new(&m, chain).expect("rx");
        assert_eq!(rx.capacity(), 30 + 64 - 44);
        let data = vec![0xabu8; 100];
        let used = rx.write(hdr(OP_RW, 0), &data).expect("write");
        assert_eq!(used, 94);
        let mut back = [0u8; 44];
        m.read_slice(&mut back[..30], GuestAddress(0x10_0000))
            .expect("r");
        m.read_slice(&mut back[30..], GuestAddress(0x20_0000))
            .expect("r");
        assert_eq!(Header::from_bytes(&back).len, 50);
        let mut payload = [0u8; 50];
        m.read_slice(&mut payload, GuestAddress(0x20_0000 + 14))
            .expect("r");
        assert!(payload.iter().all(|b| *b == 0xab));
    }

    #[test]
    fn rx_buffer_smaller_than_a_header_is_refused() {
        let m = mem();
        let q = MockSplitQueue::new(&m, 16);
        let chain = q
            .build_desc_chain(&[RawDescriptor::from(Descriptor::new(
                0x10_0000, 40, F_WRITE, 0,
            ))])
            .expect("chain");
        assert!(matches!(
            RxBuffer::new(&m, chain),
            Err(Error::SmallRxBuffer(40))
        ));
    }
}
