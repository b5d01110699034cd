//! Snapshots of a ready guest, and what it takes to wake one.
//!
//! A snapshot is two files in a directory:
//!
//! - `memory`: the guest's RAM, region by region in guest-physical order
//!   (as `--dump-memory`), pages that are all zero left as holes, then one
//!   trailer page: `AIRLMEMT` and the snapshot's 32-byte random tag. A
//!   restored VM maps the RAM part `MAP_PRIVATE`: copy-on-write, so every
//!   VM woken from one snapshot shares the pages none of them wrote.
//! - `state`: `AIRLSNAP`, the format version (u32 LE), the payload's
//!   length (u64 LE), the payload, and the payload's SHA-256. The payload
//!   ([`Snapshot::encode`]) is, in order: what the snapshot is of
//!   ([`Identity`]: the VMM build, the kernel, the CPUID the vCPUs had,
//!   memory, vCPUs, disks, vsock), the VM's state (PIT, KVM clock, both
//!   PICs and the IOAPIC), each vCPU's (registers, special registers,
//!   XSAVE, XCRs, debug registers, LAPIC, MP state, events, MSRs, TSC
//!   frequency), each device's (serial port, boot timer, every
//!   virtio-mmio transport with its queues and its device's queues), and
//!   the RAM's size and the memory file's tag.
//!
//! Loading checks everything it can before any of it is used: the
//! checksum, every length against its bound, the format version, then the
//! identity against the VMM that loads it ([`Identity::check`]): another
//! VMM build, kernel, CPU feature set or machine shape is refused with a
//! message naming what differs. The memory file must be the one written
//! with this state: its size and its trailer's tag (random, made for each
//! snapshot) are checked, which catches a truncated, replaced or zeroed
//! file at the cost of one read, whatever the guest's size. Its pages
//! themselves are not checksummed: reading them would cost what a restore
//! saves (format 2 hashed every 256th page, ~20 ms of a 200 ms restore in
//! the test bed, and still missed a flipped byte elsewhere).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use sha2::{Digest, Sha256};
use virtio_queue::QueueState;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::memory::GuestMemoryMmap;

/// The state file's first bytes.
pub const MAGIC: &[u8; 8] = b"AIRLSNAP";
/// This VMM's snapshot format.
pub const FORMAT: u32 = 3;
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Largest state payload (a few KiB per vCPU in practice).
const MAX_PAYLOAD: u64 = 8 << 20;
/// Most MSRs one vCPU may carry.
const MAX_MSRS: u32 = 4096;
/// Most devices, and queues per device.
const MAX_DEVICES: u32 = 64;
const MAX_QUEUES: u32 = 16;
/// Longest recorded command line.
const MAX_CMDLINE: u32 = 4096;
const PAGE: u64 = 4096;
/// The memory file's trailer page starts with this, then the tag.
const TRAILER_MAGIC: &[u8; 8] = b"AIRLMEMT";

/// A fresh random tag for a snapshot's memory file (`getrandom`: call it
/// before the seccomp filters, which do not allow it).
pub fn new_memory_tag() -> io::Result<[u8; 32]> {
    let mut tag = [0u8; 32];
    let mut filled = 0;
    while filled < tag.len() {
        let rest = &mut tag[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // which is valid and exclusively borrowed for the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(tag)
}

/// Why a snapshot could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file.
    #[error("snapshot: cannot {0}")]
    Io(&'static str, #[source] io::Error),
    /// The files are damaged (checksum, lengths, format).
    #[error("snapshot is damaged: {0}")]
    Corrupt(String),
    /// The snapshot is of another VMM, kernel, CPU or machine shape.
    #[error("snapshot does not match this VM: {0}")]
    Mismatch(String),
    /// A KVM call failed while saving or restoring.
    #[error("snapshot: failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The guest was not in a state a snapshot can be taken in.
    #[error("snapshot: the guest is not ready for a snapshot: {0}")]
    NotQuiescent(String),
}

impl Error {
    /// Whether restoring failed because of the snapshot (damaged or made
    /// for something else): the caller boots cold instead.
    pub fn is_unusable_snapshot(&self) -> bool {
        matches!(self, Error::Corrupt(_) | Error::Mismatch(_))
    }
}

/// What a snapshot is of; a restore must match all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The identity of the VMM executable that made it ([`elf_identity`]).
    pub vmm: [u8; 32],
    /// The kernel: its ELF build id, else a digest of its size and ends.
    pub kernel: [u8; 32],
    /// SHA-256 of every vCPU's CPUID entries as set.
    pub cpuid: [u8; 32],
    pub mem_bytes: u64,
    pub cpus: u8,
    /// Each disk: read-only, size in bytes.
    pub disks: Vec<(bool, u64)>,
    /// The vsock device's guest CID, if it has one.
    pub vsock_cid: Option<u64>,
    /// The kernel command line the guest booted with (for the record).
    pub cmdline: String,
}

impl Identity {
    /// Refuses a snapshot made for something other than `here`, naming
    /// the first difference.
    pub fn check(&self, here: &Identity) -> Result<(), Error> {
        let differs = |what: &str| Err(Error::Mismatch(what.to_owned()));
        if self.vmm != here.vmm {
            return differs("it was made by another airlock-vmm build");
        }
        if self.kernel != here.kernel {
            return differs("it was made with another kernel");
        }
        if self.cpuid != here.cpuid {
            return differs("it was made on a CPU with other features (CPUID)");
        }
        if self.mem_bytes != here.mem_bytes {
            return Err(Error::Mismatch(format!(
                "it has {} MiB of memory, this VM {} MiB",
                self.mem_bytes >> 20,
                here.mem_bytes >> 20
            )));
        }
        if self.cpus != here.cpus {
            return Err(Error::Mismatch(format!(
                "it has {} vCPUs, this VM {}",
                self.cpus, here.cpus
            )));
        }
        if self.disks != here.disks {
            return differs("its disks (number, sizes or modes) differ from this VM's");
        }
        if self.vsock_cid != here.vsock_cid {
            return differs("its vsock device differs from this VM's");
        }
        Ok(())
    }
}

/// The VM-wide in-kernel state.
#[derive(Debug, Clone, Default)]
pub struct VmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: [kvm_irqchip; 3],
}

/// One vCPU's state.
#[derive(Default)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<kvm_msr_entry>,
    /// 0 when KVM could not say.
    pub tsc_khz: u32,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The serial port's registers (vm-superio's `SerialState`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SerialRegs {
    /// DLL, DLH, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    pub in_buffer: Vec<u8>,
}

/// A virtio-mmio transport, with its device's queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub activated: bool,
    pub irq_status: u32,
    /// The transport's own (frozen at activation) copies.
    pub queues: Vec<QueueState>,
    /// The device's live queues (empty unless activated).
    pub device_queues: Vec<QueueState>,
}

/// Every device's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStates {
    pub serial: SerialRegs,
    pub boot_timer_reached: bool,
    /// In slot order: disks, then vsock.
    pub transports: Vec<TransportState>,
}

/// A whole snapshot's state (the memory is in its own file).
#[derive(Debug)]
pub struct Snapshot {
    pub identity: Identity,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
    /// The RAM's size in the memory file (its trailer page follows) and
    /// the trailer's tag.
    pub memory_size: u64,
    pub memory_tag: [u8; 32],
}

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn bool(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len());
        self.0.extend_from_slice(b);
    }
    fn pod<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }
    fn queue(&mut self, q: &QueueState) {
        self.u16(q.max_size);
        self.u16(q.next_avail);
        self.u16(q.next_used);
        self.bool(q.event_idx_enabled);
        self.u16(q.size);
        self.bool(q.ready);
        self.u64(q.desc_table);
        self.u64(q.avail_ring);
        self.u64(q.used_ring);
    }
}

struct Dec<'a>(&'a [u8]);

fn corrupt(what: &str) -> Error {
    Error::Corrupt(what.to_owned())
}

impl Dec<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Error> {
        if self.0.len() < n {
            return Err(corrupt("the state ends early"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }
    fn bool(&mut self) -> Result<bool, Error> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(corrupt("a flag is neither 0 nor 1")),
        }
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A count, at most `max`.
    fn count(&mut self, max: u32, what: &str) -> Result<usize, Error> {
        let n = self.u32()?;
        if n > max {
            return Err(Error::Corrupt(format!("{n} {what} (at most {max})")));
        }
        usize::try_from(n).map_err(|_| corrupt(what))
    }
    fn bytes(&mut self, max: u32, what: &str) -> Result<Vec<u8>, Error> {
        let n = self.count(max, what)?;
        Ok(self.take(n)?.to_vec())
    }
    fn pod<T: FromBytes>(&mut self) -> Result<T, Error> {
        let n = self.u32()?;
        let want = std::mem::size_of::<T>();
        if usize::try_from(n).ok() != Some(want) {
            return Err(Error::Corrupt(format!(
                "a {}-byte structure where {want} bytes belong (another kernel ABI?)",
                n
            )));
        }
        T::read_from_bytes(self.take(want)?).map_err(|_| corrupt("a structure does not decode"))
    }
    fn queue(&mut self) -> Result<QueueState, Error> {
        Ok(QueueState {
            max_size: self.u16()?,
            next_avail: self.u16()?,
            next_used: self.u16()?,
            event_idx_enabled: self.bool()?,
            size: self.u16()?,
            ready: self.bool()?,
            desc_table: self.u64()?,
            avail_ring: self.u64()?,
            used_ring: self.u64()?,
        })
    }
}

impl Snapshot {
    /// The payload (module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(64 << 10));
        let id = &self.identity;
        e.0.extend_from_slice(&id.vmm);
        e.0.extend_from_slice(&id.kernel);
        e.0.extend_from_slice(&id.cpuid);
        e.u64(id.mem_bytes);
        e.u8(id.cpus);
        e.len(id.disks.len());
        for (ro, size) in &id.disks {
            e.bool(*ro);
            e.u64(*size);
        }
        e.bool(id.vsock_cid.is_some());
        e.u64(id.vsock_cid.unwrap_or(0));
        e.bytes(id.cmdline.as_bytes());
        e.pod(&self.vm.pit);
        e.pod(&self.vm.clock);
        for chip in &self.vm.irqchips {
            e.pod(chip);
        }
        e.len(self.vcpus.len());
        for v in &self.vcpus {
            e.pod(&v.regs);
            e.pod(&v.sregs);
            e.pod(&v.xsave);
            e.pod(&v.xcrs);
            e.pod(&v.debugregs);
            e.pod(&v.lapic);
            e.pod(&v.mp_state);
            e.pod(&v.events);
            e.len(v.msrs.len());
            for m in &v.msrs {
                e.u32(m.index);
                e.u64(m.data);
            }
            e.u32(v.tsc_khz);
        }
        let d = &self.devices;
        e.0.extend_from_slice(&d.serial.regs);
        e.bytes(&d.serial.in_buffer);
        e.bool(d.boot_timer_reached);
        e.len(d.transports.len());
        for t in &d.transports {
            e.u32(t.device_type);
            e.u32(t.device_features_sel);
            e.u32(t.driver_features_sel);
            e.u64(t.acked_features);
            e.u32(t.queue_sel);
            e.u32(t.status);
            e.bool(t.activated);
            e.u32(t.irq_status);
            for queues in [&t.queues, &t.device_queues] {
                e.len(queues.len());
                for q in queues {
                    e.queue(q);
                }
            }
        }
        e.u64(self.memory_size);
        e.0.extend_from_slice(&self.memory_tag);
        e.0
    }

    /// Reads a payload back, every length bounded.
    pub fn decode(payload: &[u8]) -> Result<Snapshot, Error> {
        let mut d = Dec(payload);
        let vmm = d.array()?;
        let kernel = d.array()?;
        let cpuid = d.array()?;
        let mem_bytes = d.u64()?;
        let cpus = d.u8()?;
        let n = d.count(MAX_DEVICES, "disks")?;
        let mut disks = Vec::with_capacity(n);
        for _ in 0..n {
            disks.push((d.bool()?, d.u64()?));
        }
        let has_vsock = d.bool()?;
        let cid = d.u64()?;
        let cmdline = String::from_utf8(d.bytes(MAX_CMDLINE, "command line bytes")?)
            .map_err(|_| corrupt("the command line is not UTF-8"))?;
        let identity = Identity {
            vmm,
            kernel,
            cpuid,
            mem_bytes,
            cpus,
            disks,
            vsock_cid: has_vsock.then_some(cid),
            cmdline,
        };
        let vm = VmState {
            pit: d.pod()?,
            clock: d.pod()?,
            irqchips: [d.pod()?, d.pod()?, d.pod()?],
        };
        let n = d.count(u32::from(crate::arch::mptable::MAX_CPUS), "vCPUs")?;
        if n != usize::from(cpus) {
            return Err(corrupt("the vCPU count disagrees with the identity"));
        }
        let mut vcpus = Vec::with_capacity(n);
        for _ in 0..n {
            let mut v = VcpuState {
                regs: d.pod()?,
                sregs: d.pod()?,
                xsave: d.pod()?,
                xcrs: d.pod()?,
                debugregs: d.pod()?,
                lapic: d.pod()?,
                mp_state: d.pod()?,
                events: d.pod()?,
                ..VcpuState::default()
            };
            let m = d.count(MAX_MSRS, "MSRs")?;
            for _ in 0..m {
                v.msrs.push(kvm_msr_entry {
                    index: d.u32()?,
                    data: d.u64()?,
                    ..Default::default()
                });
            }
            v.tsc_khz = d.u32()?;
            vcpus.push(v);
        }
        let serial = SerialRegs {
            regs: d.array()?,
            in_buffer: d.bytes(1 << 16, "serial input bytes")?,
        };
        let boot_timer_reached = d.bool()?;
        let n = d.count(MAX_DEVICES, "devices")?;
        let mut transports = Vec::with_capacity(n);
        for _ in 0..n {
            let mut t = TransportState {
                device_type: d.u32()?,
                device_features_sel: d.u32()?,
                driver_features_sel: d.u32()?,
                acked_features: d.u64()?,
                queue_sel: d.u32()?,
                status: d.u32()?,
                activated: d.bool()?,
                irq_status: d.u32()?,
                ..TransportState::default()
            };
            for which in 0..2 {
                let q = d.count(MAX_QUEUES, "queues")?;
                for _ in 0..q {
                    let state = d.queue()?;
                    if which == 0 {
                        t.queues.push(state);
                    } else {
                        t.device_queues.push(state);
                    }
                }
            }
            transports.push(t);
        }
        let memory_size = d.u64()?;
        let memory_tag = d.array()?;
        if !d.0.is_empty() {
            return Err(corrupt("bytes after the end of the state"));
        }
        Ok(Snapshot {
            identity,
            vm,
            vcpus,
            devices: DeviceStates {
                serial,
                boot_timer_reached,
                transports,
            },
            memory_size,
            memory_tag,
        })
    }

    /// Writes the state file (module docs) to `out`.
    pub fn write_state(&self, out: &mut impl Write) -> Result<(), Error> {
        let payload = self.encode();
        let mut file = Vec::with_capacity(payload.len() + 52);
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&FORMAT.to_le_bytes());
        file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file.extend_from_slice(&payload);
        file.extend_from_slice(&Sha256::digest(&payload));
        out.write_all(&file)
            .and_then(|()| out.flush())
            .map_err(|e| Error::Io("write the state file", e))
    }

    /// Reads and checks a state file (checksum, format, bounds).
    pub fn read_state(input: &mut impl Read) -> Result<Snapshot, Error> {
        let mut head = [0u8; 20];
        input
            .read_exact(&mut head)
            .map_err(|_| corrupt("the state file is too short"))?;
        if &head[..8] != MAGIC {
            return Err(corrupt("the state file is not an airlock-vmm snapshot"));
        }
        let format = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if format != FORMAT {
            return Err(Error::Mismatch(format!(
                "its format is {format}, this VMM reads {FORMAT}"
            )));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[12..20]);
        let len = u64::from_le_bytes(len);
        if len > MAX_PAYLOAD {
            return Err(Error::Corrupt(format!(
                "a {len}-byte state (at most {MAX_PAYLOAD})"
            )));
        }
        let mut rest = Vec::new();
        input
            .take(len + 33)
            .read_to_end(&mut rest)
            .map_err(|e| Error::Io("read the state file", e))?;
        let len = usize::try_from(len).map_err(|_| corrupt("length"))?;
        if rest.len() != len + 32 {
            return Err(corrupt("the state file's length disagrees with its header"));
        }
        let (payload, sum) = rest.split_at(len);
        if Sha256::digest(payload).as_slice() != sum {
            return Err(corrupt("the state file's checksum does not match"));
        }
        Snapshot::decode(payload)
    }
}

/// Writes the guest's RAM to `out` in guest-physical order, all-zero pages
/// as holes, then the trailer page with `tag`; returns the RAM's size.
pub fn write_memory(mem: &GuestMemoryMmap, out: &mut File, tag: &[u8; 32]) -> Result<u64, Error> {
    let io = |e| Error::Io("write the memory file", e);
    let mut page = vec![0u8; usize::try_from(PAGE).unwrap_or(4096)];
    let mut offset = 0u64;
    let mut pending: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut pending_at = 0u64;
    for region in mem.iter() {
        let mut at = 0u64;
        while at < region.len() {
            mem.read_slice(&mut page, GuestAddress(region.start_addr().0 + at))
                .map_err(|e| Error::Io("read guest memory", io::Error::other(e)))?;
            if page.iter().all(|b| *b == 0) {
                if !pending.is_empty() {
                    out.seek(SeekFrom::Start(pending_at)).map_err(io)?;
                    out.write_all(&pending).map_err(io)?;
                    pending.clear();
                }
                pending_at = offset + PAGE;
            } else {
                if pending.is_empty() {
                    pending_at = offset;
                }
                pending.extend_from_slice(&page);
                if pending.len() >= 1 << 20 {
                    out.seek(SeekFrom::Start(pending_at)).map_err(io)?;
                    out.write_all(&pending).map_err(io)?;
                    pending.clear();
                    pending_at = offset + PAGE;
                }
            }
            at += PAGE;
            offset += PAGE;
        }
    }
    if !pending.is_empty() {
        out.seek(SeekFrom::Start(pending_at)).map_err(io)?;
        out.write_all(&pending).map_err(io)?;
    }
    let mut trailer = vec![0u8; usize::try_from(PAGE).unwrap_or(4096)];
    trailer[..8].copy_from_slice(TRAILER_MAGIC);
    trailer[8..40].copy_from_slice(tag);
    out.seek(SeekFrom::Start(offset)).map_err(io)?;
    out.write_all(&trailer).map_err(io)?;
    out.set_len(offset + PAGE).map_err(io)?;
    out.sync_data().map_err(io)?;
    Ok(offset)
}

/// At most this many data ranges of a memory file are prefaulted; a file
/// more fragmented than that is prefaulted up to there (the rest faults in
/// on demand, as without prefaulting).
const MAX_DATA_RANGES: usize = 16_384;

/// The memory file's data (what [`write_memory`] did not leave as holes) as
/// guest-physical `(address, length)` ranges, in order: the pages a woken
/// guest may read back. Found with `SEEK_DATA`/`SEEK_HOLE`; a file system
/// without them reports the whole file as data.
pub fn data_ranges(file: &File, mem_bytes: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let size = file.metadata().map_or(0, |m| m.len()).min(mem_bytes);
    let seek = |at: u64, whence| -> Option<u64> {
        let at = libc::off_t::try_from(at).ok()?;
        // SAFETY: lseek on a file descriptor we own; it only moves the
        // file's offset (the memory file is not read through it).
        let r = unsafe { libc::lseek(fd, at, whence) };
        u64::try_from(r).ok()
    };
    let mut in_file = Vec::new();
    let mut at = 0u64;
    while at < size && in_file.len() < MAX_DATA_RANGES {
        let Some(start) = seek(at, libc::SEEK_DATA) else {
            break;
        };
        let end = seek(start, libc::SEEK_HOLE).unwrap_or(size).min(size);
        if start >= end {
            break;
        }
        in_file.push((start, end - start));
        at = end;
    }
    file_to_guest(&in_file, &crate::memory::ram_ranges(mem_bytes))
}

/// Maps ranges of the memory file (RAM in guest-physical order, the
/// regions back to back) to guest-physical ranges.
fn file_to_guest(in_file: &[(u64, u64)], ram: &[(GuestAddress, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(start, len) in in_file {
        let end = start.saturating_add(len);
        let mut base = 0u64;
        for &(gpa, region_len) in ram {
            let (lo, hi) = (start.max(base), end.min(base + region_len));
            if lo < hi {
                out.push((gpa.0 + (lo - base), hi - lo));
            }
            base += region_len;
        }
    }
    out
}

/// Maps the memory file's RAM part `MAP_PRIVATE` at the guest's RAM ranges
/// for `mem_bytes`, after checking its size and its trailer's tag.
pub fn map_memory(file: File, snapshot: &Snapshot) -> Result<GuestMemoryMmap, Error> {
    use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
    use vm_memory::FileOffset;
    let size = file
        .metadata()
        .map_err(|e| Error::Io("read the memory file", e))?
        .len();
    let expected = snapshot.memory_size.saturating_add(PAGE);
    if size != expected || snapshot.memory_size != snapshot.identity.mem_bytes {
        return Err(Error::Corrupt(format!(
            "the memory file has {size} bytes, the state says {expected}"
        )));
    }
    let mut trailer = [0u8; 40];
    {
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut trailer, snapshot.memory_size)
            .map_err(|e| Error::Io("read the memory file", e))?;
    }
    if &trailer[..8] != TRAILER_MAGIC || trailer[8..] != snapshot.memory_tag {
        return Err(corrupt(
            "the memory file is not the one written with this state (its tag differs)",
        ));
    }
    let file = std::sync::Arc::new(file);
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in crate::memory::ram_ranges(snapshot.identity.mem_bytes) {
        let size = usize::try_from(len).map_err(|_| corrupt("region size"))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::from_arc(file.clone(), offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Io("map the memory file", io::Error::other(e)))?;
        let region = GuestRegionMmap::new(mapping, start)
            .ok_or_else(|| corrupt("a memory region does not fit"))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| Error::Io("map the memory file", io::Error::other(e)))
}

/// An executable's identity (the kernel's, the VMM's own): its ELF
/// `NT_GNU_BUILD_ID` note (hashed with its size), else a digest of its size
/// and its first and last MiB. Cheap: a restore must not read either whole.
pub fn elf_identity(path: &Path) -> Result<[u8; 32], Error> {
    use std::os::unix::fs::FileExt;
    let io = |e| Error::Io("read the kernel or the VMM executable", e);
    let f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let mut h = Sha256::new();
    h.update(size.to_le_bytes());
    if let Some(id) = build_id(&f) {
        h.update(b"build-id");
        h.update(&id);
        return Ok(h.finalize().into());
    }
    let chunk = size.min(1 << 20);
    let mut buf = vec![0u8; usize::try_from(chunk).unwrap_or(0)];
    f.read_exact_at(&mut buf, 0).map_err(io)?;
    h.update(&buf);
    f.read_exact_at(&mut buf, size - chunk).map_err(io)?;
    h.update(&buf);
    Ok(h.finalize().into())
}

/// The GNU build id in an ELF64 file's `PT_NOTE` segments, if any.
fn build_id(f: &File) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut eh = [0u8; 64];
    f.read_exact_at(&mut eh, 0).ok()?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |b: &[u8], o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |b: &[u8], o: usize| Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let phoff = u64_at(&eh, 32)?;
    let phentsize = u64::from(u16_at(&eh, 54)?);
    let phnum = u16_at(&eh, 56)?.min(64);
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        f.read_exact_at(&mut ph, phoff + i * phentsize).ok()?;
        if u32_at(&ph, 0)? != 4 {
            continue; // not PT_NOTE
        }
        let (off, len) = (u64_at(&ph, 8)?, u64_at(&ph, 32)?.min(1 << 16));
        let mut notes = vec![0u8; usize::try_from(len).ok()?];
        f.read_exact_at(&mut notes, off).ok()?;
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let namesz = usize::try_from(u32_at(&notes, at)?).ok()?;
            let descsz = usize::try_from(u32_at(&notes, at + 4)?).ok()?;
            let kind = u32_at(&notes, at + 8)?;
            let name_at = at + 12;
            let desc_at = name_at + namesz.div_ceil(4) * 4;
            let next = desc_at + descsz.div_ceil(4) * 4;
            if kind == 3 && notes.get(name_at..name_at + namesz)? == b"GNU\0" {
                return notes.get(desc_at..desc_at + descsz).map(<[u8]>::to_vec);
            }
            at = next;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut vcpu = VcpuState::default();
        vcpu.regs.rip = 0xffff_ffff_8100_0000;
        vcpu.regs.rax = 42;
        vcpu.msrs = vec![
            kvm_msr_entry {
                index: 0x10,
                data: 123_456,
                ..Default::default()
            },
            kvm_msr_entry {
                index: 0x6e0,
                data: 7,
                ..Default::default()
            },
        ];
        vcpu.tsc_khz = 2_400_000;
        let mut vm = VmState::default();
        vm.clock.clock = 99;
        vm.irqchips[2].chip_id = 2;
        let q = QueueState {
            max_size: 256,
            next_avail: 3,
            next_used: 2,
            event_idx_enabled: true,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        Snapshot {
            identity: Identity {
                vmm: [1; 32],
                kernel: [2; 32],
                cpuid: [3; 32],
                mem_bytes: 256 << 20,
                cpus: 1,
                disks: vec![(true, 1 << 30)],
                vsock_cid: Some(3),
                cmdline: "console=ttyS0 airlock.snapshot=1".into(),
            },
            vm,
            vcpus: vec![vcpu],
            devices: DeviceStates {
                serial: SerialRegs {
                    regs: [1, 2, 3, 4, 5, 6, 7, 8, 9],
                    in_buffer: vec![b'x'],
                },
                boot_timer_reached: true,
                transports: vec![TransportState {
                    device_type: 19,
                    acked_features: 1 << 32,
                    status: 15,
                    activated: true,
                    irq_status: 1,
                    queues: vec![q; 3],
                    device_queues: vec![q; 3],
                    ..TransportState::default()
                }],
            },
            memory_size: 256 << 20,
            memory_tag: [4; 32],
        }
    }

    #[test]
    fn a_state_file_reads_back_as_written() {
        let snap = sample();
        let mut file = Vec::new();
        snap.write_state(&mut file).expect("write");
        let back = Snapshot::read_state(&mut file.as_slice()).expect("read");
        assert_eq!(back.identity, snap.identity);
        assert_eq!(back.vcpus[0].regs.rip, snap.vcpus[0].regs.rip);
        assert_eq!(back.vcpus[0].regs.rax, 42);
        assert_eq!(back.vcpus[0].msrs.len(), 2);
        assert_eq!(back.vcpus[0].msrs[1].index, 0x6e0);
        assert_eq!(back.vcpus[0].tsc_khz, 2_400_000);
        assert_eq!(back.vm.clock.clock, 99);
        assert_eq!(back.vm.irqchips[2].chip_id, 2);
        assert_eq!(back.devices, snap.devices);
        assert_eq!(back.memory_tag, [4; 32]);
        assert_eq!(back.encode(), snap.encode());
    }

    #[test]
    fn a_damaged_state_file_is_refused_never_used() {
        let mut file = Vec::new();
        sample().write_state(&mut file).expect("write");
        // Every single flipped byte is caught (magic, format, length,
        // payload, checksum).
        for at in (0..file.len())
            .step_by(97)
            .chain([0, 8, 12, file.len() - 1])
        {
            let mut bad = file.clone();
            bad[at] ^= 0x40;
            let e = Snapshot::read_state(&mut bad.as_slice()).expect_err("damaged");
            assert!(e.is_unusable_snapshot(), "byte {at}: {e}");
        }
        // Cut short anywhere.
        for len in [0, 10, 20, file.len() / 2, file.len() - 1] {
            let e = Snapshot::read_state(&mut &file[..len]).expect_err("short");
            assert!(matches!(e, Error::Corrupt(_)), "{len}: {e}");
        }
        // A huge claimed length is refused before anything is read.
        let mut huge = file.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Snapshot::read_state(&mut huge.as_slice())
            .expect_err("huge")
            .to_string()
            .contains("at most"));
        // A valid checksum over a payload that lies about its counts.
        let mut payload = sample().encode();
        payload.truncate(payload.len() - 40);
        assert!(Snapshot::decode(&payload).is_err());
    }

    #[test]
    fn a_snapshot_of_another_machine_is_refused_naming_why() {
        let here = sample().identity;
        type Change = Box<dyn Fn(&mut Identity)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|i| i.vmm[0] ^= 1), "another airlock-vmm build"),
            (Box::new(|i| i.kernel[0] ^= 1), "another kernel"),
            (Box::new(|i| i.cpuid[0] ^= 1), "other features"),
            (Box::new(|i| i.mem_bytes *= 2), "512 MiB of memory"),
            (Box::new(|i| i.cpus = 2), "2 vCPUs"),
            (Box::new(|i| i.disks.clear()), "disks"),
            (Box::new(|i| i.vsock_cid = Some(4)), "vsock"),
        ];
        for (change, want) in cases {
            let mut theirs = here.clone();
            change(&mut theirs);
            let e = theirs.check(&here).expect_err("mismatch");
            assert!(e.to_string().contains(want), "{e}");
            assert!(e.is_unusable_snapshot());
        }
        here.check(&here).expect("same");
    }

    #[test]
    fn file_ranges_map_to_guest_ranges_across_the_mmio_gap() {
        let ram = crate::memory::ram_ranges(5 << 30);
        let (low, high) = (ram[0].1, ram[1].0 .0);
        // One range inside the low region, one across the end of it.
        let out = file_to_guest(&[(PAGE, PAGE), (low - PAGE, 3 * PAGE)], &ram);
        assert_eq!(
            out,
            vec![(PAGE, PAGE), (low - PAGE, PAGE), (high, 2 * PAGE)]
        );
        // Past the end of RAM: nothing.
        assert!(file_to_guest(&[(5 << 30, PAGE)], &ram).is_empty());
    }

    #[test]
    fn memory_is_written_sparse_and_mapped_private() {
        let mem = crate::memory::create(64 << 20).expect("mem");
        mem.write_slice(b"first page", GuestAddress(0)).expect("w");
        mem.write_slice(b"far away", GuestAddress(40 << 20))
            .expect("w");
        let dir = std::env::temp_dir().join(format!("airlock-snap-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(MEMORY_FILE);
        let mut f = File::create(&path).expect("create");
        let tag = new_memory_tag().expect("tag");
        assert_ne!(tag, new_memory_tag().expect("tag"), "tags are random");
        let size = write_memory(&mem, &mut f, &tag).expect("write");
        assert_eq!(size, 64 << 20);
        drop(f);
        // Its data ranges: the two written pages, nothing of the holes.
        let data = data_ranges(&File::open(&path).expect("open"), size);
        let covered: u64 = data.iter().map(|r| r.1).sum();
        assert!(
            data.iter().any(|&(a, l)| a == 0 && l >= PAGE),
            "page 0 is data: {data:?}"
        );
        assert!(
            data.iter().any(|&(a, l)| a <= 40 << 20 && a + l > 40 << 20),
            "the far page is data: {data:?}"
        );
        assert!(covered < 4 << 20, "holes are not data: {data:?}");
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(
            meta.len(),
            (64 << 20) + PAGE,
            "the RAM, then the trailer page"
        );
        assert!(meta.blocks() * 512 < 1 << 20, "zero pages are holes");
        let mut snap = sample();
        snap.identity.mem_bytes = size;
        snap.memory_size = size;
        snap.memory_tag = tag;
        let a = map_memory(File::open(&path).expect("open"), &snap).expect("map");
        let b = map_memory(File::open(&path).expect("open"), &snap).expect("map");
        let mut buf = [0u8; 10];
        a.read_slice(&mut buf, GuestAddress(0)).expect("r");
        assert_eq!(&buf, b"first page");
        // Copy-on-write: a write to one is seen by neither the other nor
        // the file.
        a.write_slice(b"changed", GuestAddress(40 << 20))
            .expect("w");
        let mut far = [0u8; 8];
        b.read_slice(&mut far, GuestAddress(40 << 20)).expect("r");
        assert_eq!(&far, b"far away");
        let c = map_memory(File::open(&path).expect("open"), &snap).expect("map");
        c.read_slice(&mut far, GuestAddress(40 << 20)).expect("r");
        assert_eq!(&far, b"far away");
        // Another size, another snapshot's tag, a damaged trailer, a
        // truncated file: refused.
        snap.memory_size += PAGE;
        assert!(map_memory(File::open(&path).expect("open"), &snap).is_err());
        snap.memory_size -= PAGE;
        snap.memory_tag[0] ^= 1;
        let e = map_memory(File::open(&path).expect("open"), &snap).expect_err("other tag");
        assert!(
            e.is_unusable_snapshot() && e.to_string().contains("tag"),
            "{e}"
        );
        snap.memory_tag[0] ^= 1;
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        use std::os::unix::fs::FileExt;
        w.write_all_at(b"X", size + 10).expect("poke");
        let e = map_memory(File::open(&path).expect("open"), &snap).expect_err("changed");
        assert!(e.is_unusable_snapshot(), "{e}");
        w.write_all_at(&tag[2..3], size + 10).expect("restore");
        assert!(map_memory(File::open(&path).expect("open"), &snap).is_ok());
        w.set_len(size).expect("truncate");
        let e = map_memory(File::open(&path).expect("open"), &snap).expect_err("short");
        assert!(e.is_unusable_snapshot(), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_kernel_is_known_by_its_build_id() {
        // This test binary is an ELF with a GNU build id (rustc passes
        // --build-id on Linux); its identity is stable across reads.
        let exe = std::env::current_exe().expect("exe");
        let a = elf_identity(&exe).expect("id");
        assert_eq!(a, elf_identity(&exe).expect("id"));
        let f = File::open(&exe).expect("open");
        if let Some(id) = build_id(&f) {
            assert!(!id.is_empty() && id.len() <= 64);
        }
    }
}
