//! The virtio-vsock device, emulated in userspace: three queues (RX, TX,
//! event), the guest CID in config space, and the hybrid-vsock backend
//! ([`muxer`]) that maps guest streams onto Unix sockets.
//!
//! Queue work runs on the event-loop thread: the device is an event-manager
//! subscriber woken by the queues' ioeventfds and by its host sockets.

pub mod connection;
pub mod muxer;
pub mod packet;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use self::muxer::{Interest, Muxer};
use self::packet::RxBuffer;
use super::{ActivateError, IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemoryMmap;

/// virtio device id of vsock.
pub const DEVICE_ID: u32 = 19;
/// Queue size for each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// The vsock device and its backend.
#[derive(Debug)]
pub struct Vsock {
    cid: u64,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLine>,
    queue_evts: Vec<EventFd>,
    queues: Option<Vec<Queue>>,
    muxer: Muxer,
    /// What epoll currently watches for each host fd, and the identity of
    /// the socket it was registered for (fd numbers get reused).
    registered: HashMap<RawFd, (u64, EventSet)>,
    /// The guest gave us no RX buffers last time we had something to send.
    rx_starved: bool,
    /// Malformed TX chains seen (the guest is buggy or hostile).
    pub malformed: u64,
    /// The guest has put a packet on the TX queue.
    pub guest_spoke: bool,
}

impl Vsock {
    /// A device for guest `cid` whose host side lives at `uds` (and
    /// `<uds>_<port>`); `queue_evts` are the queues' ioeventfds.
    pub fn new(
        cid: u64,
        uds: PathBuf,
        mem: GuestMemoryMmap,
        irq: Arc<IrqLine>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, muxer::Error> {
        Ok(Self {
            cid,
            mem,
            irq,
            queue_evts,
            queues: None,
            muxer: Muxer::new(cid, uds)?,
            registered: HashMap::new(),
            rx_starved: false,
            malformed: 0,
            guest_spoke: false,
        })
    }

    /// Packets the backend refused (resets sent for them).
    pub fn refused(&self) -> u64 {
        self.muxer.refused
    }

    fn process_tx(&mut self) {
        let Some(queues) = self.queues.as_mut() else {
            return;
        };
        let Some(q) = queues.get_mut(TX) else { return };
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            crate::timings::first(crate::timings::First::VsockTx);
            self.guest_spoke = true;
            match packet::read_tx(&self.mem, chain) {
                Ok((h, data)) => self.muxer.on_guest_packet(&h, &data),
                Err(_) => self.malformed += 1,
            }
            // The head index comes from the ring and was bounds-checked by
            // virtio-queue when the chain was popped.
            if q.add_used(&self.mem, head, 0).is_err() {
                self.malformed += 1;
            }
            used = true;
        }
        if used && q.needs_notification(&self.mem).unwrap_or(true) {
            self.irq.signal_used();
        }
    }

    fn process_rx(&mut self) {
        let Some(queues) = self.queues.as_mut() else {
            return;
        };
        let Some(q) = queues.get_mut(RX) else { return };
        let mut used = false;
        loop {
            let Some(chain) = q.pop_descriptor_chain(&self.mem) else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let written = match RxBuffer::new(&self.mem, chain) {
                Ok(buf) => match self.muxer.next_rx(buf.capacity()) {
                    Some((h, data)) => {
                        crate::timings::first(crate::timings::First::VsockRx);
                        buf.write(h, &data).unwrap_or(0)
                    }
                    None => {
                        // Nothing to send: hand the buffer back, unused.
                        q.set_next_avail(q.next_avail().wrapping_sub(1));
                        break;
                    }
                },
                Err(_) => {
                    self.malformed += 1;
                    0
                }
            };
            if q.add_used(&self.mem, head, written).is_err() {
                self.malformed += 1;
            }
            used = true;
        }
        if used && q.needs_notification(&self.mem).unwrap_or(true) {
            self.irq.signal_used();
        }
    }

    /// Brings epoll in line with what the backend wants watched.
    fn sync_interests(&mut self, ops: &mut EventOps) {
        let wanted: HashMap<RawFd, (u64, EventSet)> = self
            .muxer
            .interests(!self.rx_starved)
            .into_iter()
            .filter_map(|(fd, id, Interest { read, write })| {
                let mut set = EventSet::empty();
                if read {
                    set |= EventSet::IN;
                }
                if write {
                    set |= EventSet::OUT;
                }
                (!set.is_empty()).then_some((fd, (id, set)))
            })
            .collect();
        let stale: Vec<RawFd> = self
            .registered
            .iter()
            .filter(|(fd, (id, _))| wanted.get(fd).is_none_or(|(want_id, _)| want_id != id))
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            // A closed socket is already gone from epoll; ignore that error.
            let _ = ops.remove(Events::empty_raw(fd));
            self.registered.remove(&fd);
        }
        for (fd, (id, set)) in wanted {
            let result = match self.registered.get(&fd) {
                Some((_, old)) if *old == set => continue,
                Some(_) => ops.modify(Events::new_raw(fd, set)),
                None => ops.add(Events::new_raw(fd, set)),
            };
            if result.is_ok() {
                self.registered.insert(fd, (id, set));
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.cid.to_le_bytes();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = cfg.get(start.saturating_add(i)).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, _acked: u64, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError(format!(
                "vsock needs 3 queues, got {}",
                queues.len()
            )));
        }
        self.queues = Some(queues);
        self.rx_starved = false;
        // Notifications may have come before activation.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.queues = None;
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.queues
            .as_ref()
            .map(|qs| qs.iter().map(Queue::state).collect())
            .unwrap_or_default()
    }

    fn busy(&self) -> Option<String> {
        self.muxer.busy()
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let queue = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd);
        match queue {
            Some(i) => {
                let _ = self.queue_evts[i].read();
                match i {
                    RX => self.rx_starved = false,
                    TX => self.process_tx(),
                    EVT => {}
                    _ => {}
                }
            }
            None if self.muxer.is_listener(fd) => self.muxer.accept(),
            None if self.muxer.is_connecting(fd) => self.muxer.on_connect_line(fd),
            None => {
                if events.event_set().contains(EventSet::OUT) {
                    self.muxer.on_host_writable(fd);
                }
            }
        }
        self.process_rx();
        self.sync_interests(ops);
        // Only now, with epoll no longer watching them, may the sockets of
        // finished connections close (their numbers get reused).
        self.muxer.close_retired();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                eprintln!("airlock-vmm: error: cannot watch a vsock queue: {e:?}");
            }
        }
        self.sync_interests(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::packet::{Header, OP_REQUEST, OP_RESPONSE, OP_RW, TYPE_STREAM};
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const F_WRITE: u16 = 2;

    fn request(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 4321,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    /// Plays the guest driver: queues in guest memory, a TX request, RX
    /// buffers; then checks what the device put in the used rings and what
    /// arrived on the host socket.
    #[test]
    fn guest_connect_and_send_through_the_queues() {
        let dir = std::env::temp_dir().join(format!("airlock-vsockdev-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let host = UnixListener::bind(dir.join("v.sock_1024")).expect("bind");
        let mem = crate::memory::create(16 << 20).expect("mem");
        let rxm = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let txm = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let evm = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let queues = vec![
            rxm.create_queue::<Queue>().expect("rx"),
            txm.create_queue::<Queue>().expect("tx"),
            evm.create_queue::<Queue>().expect("ev"),
        ];
        let irq_evt = EventFd::new(EFD_NONBLOCK).expect("evt");
        let irq = Arc::new(IrqLine::new(irq_evt.try_clone().expect("clone")));
        let evts = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("evt"))
            .collect();
        let mut dev =
            Vsock::new(3, dir.join("v.sock"), mem.clone(), irq.clone(), evts).expect("dev");
        assert_eq!(dev.device_type(), DEVICE_ID);
        let mut cid = [0u8; 8];
        dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 3);
        dev.activate(VIRTIO_F_VERSION_1, queues).expect("activate");

        // Two RX buffers, then a REQUEST on TX.
        rxm.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x10_0000, 4096, F_WRITE, 0)),
                RawDescriptor::from(Descriptor::new(0x11_0000, 4096, F_WRITE, 0)),
            ],
            0,
        )
        .expect("rx bufs");
        mem.write_slice(&request(OP_REQUEST, 0).to_bytes(), GuestAddress(0x20_0000))
            .expect("w");
        txm.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(0x20_0000, 44, 0, 0))],
            0,
        )
        .expect("tx");
        dev.process_tx();
        dev.process_rx();
        assert_eq!(txm.used().idx().load(), 1, "TX buffer returned");
        assert_eq!(rxm.used().idx().load(), 1, "one RX packet: the response");
        let mut raw = [0u8; 44];
        mem.read_slice(&mut raw, GuestAddress(0x10_0000))
            .expect("r");
        let resp = Header::from_bytes(&raw);
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
            (OP_RESPONSE, 1024, 4321, 3)
        );
        assert_eq!(irq.status() & 1, 1, "guest interrupted");
        assert_eq!(
            irq_evt.read().expect("irq"),
            2,
            "one interrupt per queue that was used"
        );

        // Data: header and payload in separate descriptors.
        mem.write_slice(&request(OP_RW, 6).to_bytes(), GuestAddress(0x21_0000))
            .expect("w");
        mem.write_slice(b"hello\n", GuestAddress(0x22_0000))
            .expect("w");
        txm.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x21_0000, 44, 1, 2)),
                RawDescriptor::from(Descriptor::new(0x22_0000, 6, 0, 0)),
            ],
            1,
        )
        .expect("tx");
        dev.process_tx();
        let (mut s, _) = host.accept().expect("accept");
        let mut got = [0u8; 6];
        s.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello\n");

        // The host answers; it arrives in the second RX buffer.
        s.write_all(b"ok").expect("write");
        dev.process_rx();
        assert_eq!(rxm.used().idx().load(), 2);
        mem.read_slice(&mut raw, GuestAddress(0x11_0000))
            .expect("r");
        let h = Header::from_bytes(&raw);
        assert_eq!((h.op, h.len), (OP_RW, 2));
        let mut body = [0u8; 2];
        mem.read_slice(&mut body, GuestAddress(0x11_0000 + 44))
            .expect("r");
        assert_eq!(&body, b"ok");

        // A garbage chain (shorter than a header) is counted, not fatal.
        txm.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(0x23_0000, 10, 0, 0))],
            3,
        )
        .expect("tx");
        dev.process_tx();
        assert_eq!(dev.malformed, 1);
        assert_eq!(txm.used().idx().load(), 3, "bad buffers are still returned");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod event_loop_tests {
    //! The device under the real event loop: host data must wake it.
    use super::packet::{
        Header, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND,
        TYPE_STREAM,
    };
    use super::*;
    use event_manager::{EventManager, SubscriberOps};
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use std::sync::Mutex;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const F_WRITE: u16 = 2;
    const RX_BUF: u64 = 0x10_0000;
    const TX_BUF: u64 = 0x40_0000;
    const RX_LEN: u32 = 4096;

    /// The guest side: the three queues in guest memory, the queue kicks,
    /// and the RX packets read back from the used ring.
    struct Guest<'a> {
        mem: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        kicks: Vec<EventFd>,
        rx_added: u16,
        rx_seen: u16,
        tx_added: u16,
    }

    impl Guest<'_> {
        fn add_rx_buffers(&mut self, n: u16) {
            let descs: Vec<RawDescriptor> = (0..n)
                .map(|i| {
                    let addr = RX_BUF + u64::from(self.rx_added + i) * u64::from(RX_LEN);
                    RawDescriptor::from(Descriptor::new(addr, RX_LEN, F_WRITE, 0))
                })
                .collect();
            self.rx
                .add_desc_chains(&descs, self.rx_added)
                .expect("rx buffers");
            self.rx_added += n;
            self.kicks[RX].write(1).expect("kick rx");
        }

        fn send(&mut self, h: &Header, data: &[u8]) {
            let at = TX_BUF + u64::from(self.tx_added) * 0x1000;
            let mut h = *h;
            h.len = u32::try_from(data.len()).expect("len");
            self.mem
                .write_slice(&h.to_bytes(), GuestAddress(at))
                .expect("w");
            self.mem
                .write_slice(data, GuestAddress(at + 44))
                .expect("w");
            let len = 44 + h.len;
            self.tx
                .add_desc_chains(
                    &[RawDescriptor::from(Descriptor::new(at, len, 0, 0))],
                    self.tx_added,
                )
                .expect("tx");
            self.tx_added += 1;
            self.kicks[TX].write(1).expect("kick tx");
        }

        /// Packets the device has put in the RX used ring since last time.
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = Vec::new();
            while self.rx_seen < self.rx.used().idx().load() {
                let addr = RX_BUF + u64::from(self.rx_seen) * u64::from(RX_LEN);
                let mut raw = [0u8; 44];
                self.mem
                    .read_slice(&mut raw, GuestAddress(addr))
                    .expect("r");
                let h = Header::from_bytes(&raw);
                let mut data = vec![0u8; usize::try_from(h.len).expect("len")];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + 44))
                    .expect("r");
                out.push((h, data));
                self.rx_seen += 1;
            }
            out
        }
    }

    fn from_guest(op: u16, guest_port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: guest_port,
            dst_port: 1027,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    type Manager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    /// Runs the event loop until the guest has received `want` more
    /// packets or two seconds passed (a stall).
    fn pump(em: &mut Manager, guest: &mut Guest, want: usize) -> Vec<(Header, Vec<u8>)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut got = Vec::new();
        while got.len() < want && std::time::Instant::now() < deadline {
            em.run_with_timeout(50).expect("event loop");
            got.extend(guest.received());
        }
        got
    }

    /// Short-lived guest connections one after another (the model port's
    /// pattern: one connection per HTTP request). A closed connection's
    /// socket number is reused by the next one, and the next one's host
    /// data must still wake the event loop while the guest sits idle.
    #[test]
    fn host_data_wakes_the_device_for_every_connection_in_turn() {
        let dir = std::env::temp_dir().join(format!("airlock-vsockloop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let host = UnixListener::bind(dir.join("v.sock_1027")).expect("bind");
        let mem = crate::memory::create(16 << 20).expect("mem");
        let rx = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
        let tx = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), QUEUE_SIZE);
        let ev = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), QUEUE_SIZE);
        let queues = vec![
            rx.create_queue::<Queue>().expect("rx"),
            tx.create_queue::<Queue>().expect("tx"),
            ev.create_queue::<Queue>().expect("ev"),
        ];
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("evt"))
            .collect();
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        let evts = kicks
            .iter()
            .map(|e| e.try_clone().expect("clone"))
            .collect();
        let mut dev = Vsock::new(3, dir.join("v.sock"), mem.clone(), irq, evts).expect("dev");
        dev.activate(VIRTIO_F_VERSION_1, queues).expect("activate");
        let dev = Arc::new(Mutex::new(dev));
        let mut em: Manager = EventManager::new().expect("event manager");
        em.add_subscriber(dev.clone());
        let mut guest = Guest {
            mem: &mem,
            rx,
            tx,
            kicks,
            rx_added: 0,
            rx_seen: 0,
            tx_added: 0,
        };

        for (round, guest_port) in (5000..5006).enumerate() {
            guest.add_rx_buffers(8);
            guest.send(&from_guest(OP_REQUEST, guest_port), &[]);
            let got = pump(&mut em, &mut guest, 1);
            assert_eq!(got.len(), 1, "round {round}: a response to the request");
            assert_eq!(got[0].0.op, OP_RESPONSE, "round {round}");
            let (mut s, _) = host.accept().expect("accept");

            // The guest is idle now: only the host's answer can wake the VMM.
            let answer = format!("answer {round}");
            s.write_all(answer.as_bytes()).expect("write");
            let host_closes_first = round % 2 == 0;
            if host_closes_first {
                drop(s);
                let got = pump(&mut em, &mut guest, 2);
                let ops: Vec<u16> = got.iter().map(|(h, _)| h.op).collect();
                assert_eq!(
                    ops,
                    [OP_RW, OP_SHUTDOWN],
                    "round {round}: the answer, then the host's close"
                );
                assert_eq!(got[0].1, answer.as_bytes(), "round {round}");
                assert_eq!(got[1].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
            } else {
                let got = pump(&mut em, &mut guest, 1);
                assert_eq!(got.len(), 1, "round {round}: the answer");
                assert_eq!((got[0].0.op, &got[0].1[..]), (OP_RW, answer.as_bytes()));
            }

            // The guest closes its side: the device forgets the stream, even
            // while the host still holds its end open.
            let mut shut = from_guest(OP_SHUTDOWN, guest_port);
            shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
            guest.send(&shut, &[]);
            let got = pump(&mut em, &mut guest, 1);
            assert_eq!(
                got.first().map(|(h, _)| h.op),
                Some(OP_RST),
                "round {round}"
            );
            assert_eq!(dev.lock().expect("dev").muxer.connections(), 0);
        }
        assert_eq!(dev.lock().expect("dev").muxer.connections(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
