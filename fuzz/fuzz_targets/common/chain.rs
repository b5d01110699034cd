//! A guest-written split virtqueue from fuzz bytes: a raw descriptor table
//! (addresses, lengths, flags and `next` indices as the guest chose them,
//! loops and dangling links included), an available ring naming a head,
//! and guest memory contents. Shared by the device targets.

use airlock_vmm::memory::{self, GuestMemoryMmap};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

/// Guest RAM: 1 MiB. Descriptor addresses reach up to 2 MiB, so about half
/// of them point outside it.
pub const MEM: usize = 1 << 20;
/// Queue size.
pub const QSIZE: u16 = 16;
/// Where the fuzz bytes for guest memory go (after the rings).
pub const DATA: u64 = 0x1000;

/// Takes `n` bytes off the front of `data` (fewer if it is shorter).
pub fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, rest) = data.split_at(n);
    *data = rest;
    head
}

/// Guest memory with the queue's rings at 0, a descriptor table from the
/// first `16 * QSIZE` input bytes and the rest of `data` at [`DATA`].
/// Returns the memory and the queue, with `heads` on the available ring.
pub fn guest(data: &[u8], heads: &[u16]) -> Option<(GuestMemoryMmap, Queue)> {
    let mem = memory::create(MEM as u64).ok()?;
    let mut rest = data;
    let (queue, table) = {
        let q = MockSplitQueue::new(&mem, QSIZE);
        let queue: Queue = q.create_queue().ok()?;
        (queue, q.desc_table_addr())
    };
    let raw = take(&mut rest, 16 * usize::from(QSIZE));
    for (i, d) in raw.chunks(16).enumerate() {
        let mut desc = [0u8; 16];
        desc[..d.len()].copy_from_slice(d);
        // addr: keep it within 2 MiB so some land in RAM.
        let addr = u64::from_le_bytes(desc[..8].try_into().ok()?) & 0x1f_ffff;
        desc[..8].copy_from_slice(&addr.to_le_bytes());
        mem.write_slice(&desc, table.unchecked_add(16 * i as u64))
            .ok()?;
    }
    let avail = GuestAddress(queue.avail_ring());
    for (i, head) in heads.iter().enumerate() {
        mem.write_obj(head % QSIZE, avail.unchecked_add(4 + 2 * i as u64))
            .ok()?;
    }
    mem.write_obj(heads.len() as u16, avail.unchecked_add(2))
        .ok()?;
    let room = MEM - DATA as usize;
    mem.write_slice(&rest[..rest.len().min(room)], GuestAddress(DATA))
        .ok()?;
    Some((mem, queue))
}

/// Pops the next available chain.
pub fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>> {
    queue.iter(mem).ok()?.next()
}
