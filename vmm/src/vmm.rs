//! The VM: builds the live objects from a [`VmConfig`] in the order written in
//! the crate docs, then runs the vCPU threads and the event loop until the
//! guest stops.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::arch::layout::{
    BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, I8042_DATA_PORT, KVM_TSS_ADDR, SERIAL_IRQ, SERIAL_PORT,
    VIRTIO_FIRST_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::arch::{boot, mptable, regs};
use crate::config::{self, Console, VmConfig};
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::{self, Bus};
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::vsock::{self as vsock_dev, Vsock};
use crate::devices::virtio::IrqLine;
use crate::devices::EventFdTrigger;
use crate::memory::{self, GuestMemoryMmap};
use crate::seccomp;
use crate::snapshot::{self, Identity, Snapshot, VcpuState};
use crate::vcpu::{self, Request, SnapshotHook, Stop, Vcpu};
use sha2::{Digest, Sha256};

/// The KVM API version this VMM speaks.
const KVM_API_VERSION: i32 = 12;
/// Capabilities we cannot run without.
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::UserMemory, "user memory"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
];
/// How long stopped vCPU threads get to leave `KVM_RUN`.
const VCPU_STOP_GRACE: Duration = Duration::from_secs(2);

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] config::Error),
    /// `/dev/kvm` is missing.
    #[error("/dev/kvm does not exist: this host has no KVM (enable virtualization and load kvm_intel or kvm_amd, or use airlock's tcg engine)")]
    NoKvm,
    /// `/dev/kvm` is not accessible.
    #[error("no permission on /dev/kvm: add your user to the kvm group (usermod -aG kvm $USER, then log in again) or run as root")]
    KvmPermission,
    /// Opening `/dev/kvm` failed otherwise.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The host's KVM speaks another API.
    #[error("host KVM API version {0}, this VMM needs {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// The host's KVM lacks a capability.
    #[error("host KVM lacks a required capability: {0}")]
    Capability(&'static str),
    /// A VM-level KVM ioctl failed.
    #[error("failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// Loading kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// The MP table.
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    /// The GDT.
    #[error(transparent)]
    Regs(#[from] regs::Error),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// Device placement.
    #[error(transparent)]
    Bus(#[from] bus::Error),
    /// The vsock backend.
    #[error(transparent)]
    Vsock(#[from] vsock_dev::muxer::Error),
    /// A disk image could not be opened.
    #[error("cannot open disk {path}")]
    Disk {
        /// The path given.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd, signal handler, console file or thread.
    #[error("failed to {0}")]
    Io(&'static str, #[source] io::Error),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    /// The event loop failed.
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    /// Making or loading a snapshot.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
}

impl Error {
    /// Whether the user can fix this by changing the input (exit code 2)
    /// rather than it being a failure of the VM (exit code 1).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::NoKvm
                | Error::KvmPermission
                | Error::Boot(_)
                | Error::Vsock(_)
        )
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Why the guest stopped.
    pub stop: Stop,
    /// VMM start to the init's boot-timer mark, if it came.
    pub init_reached: Option<Duration>,
    /// VMM start to the end of the run.
    pub total: Duration,
    /// vsock packets refused (resets) and malformed chains, if a vsock
    /// device was present.
    pub vsock_rejects: Option<(u64, u64)>,
    /// With `--snapshot-to`: the snapshot was written (the memory file's
    /// size), and the VM stopped there.
    pub snapshot: Option<u64>,
    /// With `--record-working-set`: what was recorded (the VM stopped at
    /// its guest's first vsock packet).
    pub working_set: Option<Recorded>,
}

/// A recorded working set.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Pages recorded.
    pub pages: usize,
    /// Of them, pages the guest wrote.
    pub written: usize,
    /// How the recording kept the kernel's fault-around from mapping pages
    /// the guest did not touch.
    pub how: String,
}

/// Where a snapshot goes: its two files, opened before the jail.
#[derive(Debug)]
pub struct SnapshotFiles {
    pub state: File,
    pub memory: File,
    /// The memory file's tag ([`snapshot::new_memory_tag`], made before
    /// the seccomp filters).
    pub tag: [u8; 32],
}

/// A VM waiting for its guest's snapshot mark.
struct SnapshotTarget {
    files: SnapshotFiles,
    flag: Arc<AtomicBool>,
    evt: EventFd,
    states: Receiver<(u8, Result<VcpuState, String>)>,
}

/// A VM ready to run. Field order is drop order: vCPUs and the VM fd go
/// before the guest memory they point into.
pub struct Vmm {
    vcpus: Vec<Vcpu>,
    vm: VmFd,
    _kvm: Kvm,
    mem: GuestMemoryMmap,
    serial: Arc<Mutex<SerialDevice>>,
    boot_timer: Arc<Mutex<BootTimer>>,
    vsock: Option<Arc<Mutex<Vsock>>>,
    disks: Vec<Arc<Mutex<Block>>>,
    /// In slot order (disks, then vsock).
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    reset_evt: EventFd,
    start: Instant,
    identity: Identity,
    snapshot: Option<SnapshotTarget>,
    prefault: Option<Prefault>,
    /// Why the snapshot's working set was not used.
    working_set_unused: Option<String>,
    record: Option<RecordTarget>,
    /// A recording wake: how fault-around is kept off, and the
    /// `userfaultfd` that keeps it off while it lives.
    record_how: String,
    _fault_around_off: Option<crate::working_set::FaultAroundOff>,
    /// The snapshot's memory tag (woken VMs; zero on a cold boot).
    memory_tag: [u8; 32],
}

/// Where `--record-working-set` writes: this process's pagemap and the
/// working-set file, opened before the jail.
#[derive(Debug)]
pub struct RecordTarget {
    pub pagemap: File,
    pub out: File,
}

/// How a restore maps the snapshot's memory before the guest runs.
#[derive(Debug)]
pub enum WakeMemory {
    /// Nothing ahead: the guest faults each page in at its first touch.
    OnDemand,
    /// Every data page of the memory file (`--prefault all`).
    All,
    /// The pages of the snapshot's recorded working set (this file, read and
    /// checked: [`crate::working_set`]); the default when the snapshot has one.
    WorkingSet(File),
    /// Record the working set (`--record-working-set`): nothing ahead, and
    /// the guest's read faults map only the pages it reads, not their
    /// neighbours (the kernel's fault-around): the mapping is registered
    /// with a `userfaultfd` ([`crate::working_set::fault_around_off`]), or
    /// where that cannot be, the memory file's clean pages are dropped from
    /// the page cache and the mapping advised random.
    Record,
}

/// How a restore mapped pages of the snapshot before the guest ran.
#[derive(Debug, Clone)]
pub struct Prefault {
    /// What was mapped: `"its working set"` or `"its memory"`.
    pub what: &'static str,
    /// Pages mapped ahead.
    pub pages: u64,
    /// Of them, pages copied ahead (the working set's written pages).
    pub copied: u64,
    /// How long it took.
    pub took: Duration,
    /// `KVM_PRE_FAULT_MEMORY` (into KVM's nested page tables), or
    /// `MADV_POPULATE_READ` (only the VMM's own page tables: where KVM
    /// cannot), or nothing (neither works here).
    pub how: &'static str,
}

/// Maps `ranges` of guest memory ahead of the guest: a woken guest reads
/// back much of what it had, and each first touch of a page would otherwise
/// be an exit to KVM and a fault on the memory file (in the nested test bed,
/// a trip through emulated L1 each). Written ranges are first copied in the
/// VMM's own mapping (`MADV_POPULATE_WRITE` breaks copy-on-write, as the
/// guest's write would), so KVM maps them writable; the others stay the
/// file's (read, copy-on-write not broken), so siblings still share them.
fn prefault(
    vcpu: &Vcpu,
    mem: &GuestMemoryMmap,
    what: &'static str,
    ranges: &[crate::working_set::Range],
) -> Prefault {
    let start = Instant::now();
    let host = |gpa: u64, len: u64| {
        let host =
            vm_memory::GuestMemoryBackend::get_host_address(mem, vm_memory::GuestAddress(gpa))
                .ok()?;
        Some((host, usize::try_from(len).ok()?))
    };
    let advise = |r: &crate::working_set::Range, advice| {
        host(r.gpa, r.len).is_some_and(|(host, len)| {
            // SAFETY: the range lies inside one mapped guest RAM region
            // (ranges never cross a region); MADV_POPULATE_* only fault
            // pages in (a write fault copies the file's page), they change
            // no content.
            unsafe { libc::madvise(host.cast(), len, advice) == 0 }
        })
    };
    let mut copied = 0;
    for r in ranges.iter().filter(|r| r.written) {
        if advise(r, libc::MADV_POPULATE_WRITE) {
            copied += r.len / 4096;
        }
    }
    let kvm = ranges.iter().try_for_each(|r| vcpu.pre_fault(r.gpa, r.len));
    let how = if kvm.is_ok() {
        "KVM_PRE_FAULT_MEMORY"
    } else {
        let mut ok = true;
        for r in ranges.iter().filter(|r| !r.written) {
            ok &= advise(r, libc::MADV_POPULATE_READ);
        }
        if ok {
            "MADV_POPULATE_READ"
        } else {
            "nothing"
        }
    };
    Prefault {
        what,
        pages: ranges.iter().map(|r| r.len / 4096).sum(),
        copied,
        took: start.elapsed(),
        how,
    }
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

fn open_kvm() -> Result<Kvm, Error> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => Error::NoKvm,
        libc::EACCES | libc::EPERM => Error::KvmPermission,
        _ => Error::OpenKvm(e),
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(Error::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(Error::Capability(name));
        }
    }
    Ok(kvm)
}

fn console_sink(console: &Console) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match console {
        Console::Stdout => Box::new(io::stdout()),
        Console::File(path) => {
            Box::new(File::create(path).map_err(|e| Error::Io("create the console file", e))?)
        }
        Console::Discard => Box::new(io::sink()),
    })
}

impl Vmm {
    /// Builds the VM: KVM → memory → kernel, initrd, boot structures →
    /// devices → vCPUs. `start` is when the VMM started (for the boot timer).
    pub fn new(config: &VmConfig, start: Instant) -> Result<Self, Error> {
        Self::build(config, start, None)
    }

    /// Builds the VM from a snapshot (`state` and `memory`, its two
    /// files) instead of booting: the guest goes on from where the
    /// snapshot was taken. `config` must describe the same machine (the
    /// snapshot's identity is checked against it before anything of the
    /// snapshot is used); the console, the vsock socket and the disks'
    /// paths are this VM's own. `wake` says what of its memory is mapped
    /// before the guest runs (see [`Vmm::prefault`]).
    pub fn restore(
        config: &VmConfig,
        start: Instant,
        state: &mut File,
        memory: File,
        wake: WakeMemory,
    ) -> Result<Self, Error> {
        let snap = Snapshot::read_state(state)?;
        Self::build(config, start, Some((snap, memory, wake)))
    }

    fn build(
        config: &VmConfig,
        start: Instant,
        restore: Option<(Snapshot, File, WakeMemory)>,
    ) -> Result<Self, Error> {
        config.validate()?;
        let kvm = open_kvm()?;
        let vm = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("create the VM", e))?;
        vm.set_tss_address(KVM_TSS_ADDR)
            .map_err(|e| Error::Kvm("set the TSS address", e))?;
        vm.create_irq_chip()
            .map_err(|e| Error::Kvm("create the in-kernel irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| Error::Kvm("create the in-kernel PIT", e))?;
        crate::timings::mark("VM, irqchip and PIT created");

        // The digests cost a read of the VMM and of the kernel's headers:
        // only for a restore here, and for a snapshot in `snapshot_to`.
        let (vmm_digest, kernel_digest) = if restore.is_some() {
            vmm_and_kernel(config)?
        } else {
            ([0; 32], [0; 32])
        };
        let mut identity = Identity {
            vmm: vmm_digest,
            kernel: kernel_digest,
            cpuid: [0; 32],
            mem_bytes: config.mem_bytes(),
            cpus: config.cpus,
            disks: config
                .disks
                .iter()
                .map(|d| {
                    std::fs::metadata(&d.path)
                        .map(|m| (d.read_only, m.len()))
                        .map_err(|source| Error::Disk {
                            path: d.path.clone(),
                            source,
                        })
                })
                .collect::<Result<_, _>>()?,
            vsock_cid: config.vsock.as_ref().map(|v| u64::from(v.cid)),
            cmdline: String::new(),
        };
        let mut ahead: Option<(&'static str, Vec<crate::working_set::Range>)> = None;
        let mut working_set_unused = None;
        let mut record_how = String::new();
        let mut fault_around_off = None;
        let (mem, restore) = match restore {
            None => {
                let mem = memory::create(config.mem_bytes())?;
                crate::timings::mark("guest memory mapped");
                (mem, None)
            }
            Some((snap, file, wake)) => {
                // Everything but the CPUID (known once the vCPUs exist).
                let mut theirs = snap.identity.clone();
                theirs.cpuid = identity.cpuid;
                theirs.check(&identity)?;
                crate::timings::mark("snapshot identity checked");
                let record = matches!(wake, WakeMemory::Record);
                match wake {
                    WakeMemory::OnDemand => {}
                    WakeMemory::All => {
                        let data = snapshot::data_ranges(&file, snap.identity.mem_bytes);
                        let ranges = data
                            .into_iter()
                            .map(|(gpa, len)| crate::working_set::Range {
                                gpa,
                                len,
                                written: false,
                            })
                            .collect();
                        ahead = Some(("its memory", ranges));
                    }
                    WakeMemory::WorkingSet(mut f) => {
                        let ram: Vec<(u64, u64)> = memory::ram_ranges(snap.identity.mem_bytes)
                            .into_iter()
                            .map(|(gpa, len)| (gpa.0, len))
                            .collect();
                        match crate::working_set::load(&mut f, &snap.memory_tag, &ram) {
                            Ok(ranges) => ahead = Some(("its working set", ranges)),
                            Err(why) => working_set_unused = Some(why),
                        }
                    }
                    WakeMemory::Record => {}
                }
                let cache = if record { file.try_clone().ok() } else { None };
                let mem = snapshot::map_memory(file, &snap)?;
                if record {
                    match crate::working_set::fault_around_off(&mem) {
                        Ok(off) => {
                            fault_around_off = Some(off);
                            record_how = "fault-around off: userfaultfd".into();
                        }
                        Err(e) => {
                            if let Some(cache) = &cache {
                                crate::working_set::drop_cache(cache);
                            }
                            crate::working_set::advise_random(&mem);
                            record_how = format!("no userfaultfd ({e}): the memory file's page cache dropped, its mapping advised random");
                        }
                    }
                }
                crate::timings::mark("snapshot memory mapped and checked");
                (mem, Some(snap))
            }
        };
        memory::register(&vm, &mem)?;
        let memory_tag = restore.as_ref().map_or([0; 32], |s| s.memory_tag);

        let (kernel_entry, initrd) = if restore.is_some() {
            (0, None)
        } else {
            let kernel = boot::load_kernel(&mem, &config.kernel)?;
            crate::timings::mark("kernel loaded");
            let initrd = match &config.initrd {
                Some(path) => {
                    let initrd = boot::load_initrd(&mem, path, &kernel)?;
                    crate::timings::mark("initrd loaded");
                    Some(initrd)
                }
                None => None,
            };
            (kernel.entry.0, initrd)
        };
        // virtio-mmio slots: the disks first (vda, vdb, ... in order), then vsock.
        let slots: Vec<(u64, u32)> = (0..config.disks.len() + usize::from(config.vsock.is_some()))
            .map(|i| {
                let i = u32::try_from(i).unwrap_or(u32::MAX);
                (
                    VIRTIO_MMIO_BASE + u64::from(i) * VIRTIO_MMIO_SIZE,
                    VIRTIO_FIRST_IRQ + i,
                )
            })
            .collect();
        let cmdline = boot::build_cmdline(&slots, &config.extra_cmdline)?;
        identity.cmdline = cmdline
            .as_cstring()
            .map_or_else(|_| String::new(), |c| c.to_string_lossy().into_owned());
        if restore.is_none() {
            boot::write_pvh_boot_info(&mem, &cmdline, initrd)?;
            mptable::write(&mem, config.cpus)?;
            regs::write_gdt(&mem)?;
            crate::timings::mark("boot structures written");
        }

        let eventfd = |what| EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io(what, e));
        let serial_irq = eventfd("create the serial irqfd")?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| Error::Kvm("register the serial irqfd", e))?;
        let serial = match &restore {
            None => SerialDevice::new(EventFdTrigger(serial_irq), console_sink(&config.console)?),
            Some(snap) => SerialDevice::from_regs(
                EventFdTrigger(serial_irq),
                console_sink(&config.console)?,
                &snap.devices.serial,
            )
            .ok_or_else(|| snapshot::Error::Corrupt("the serial port's state".into()))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let reset_evt = eventfd("create the reset eventfd")?;
        let i8042 = I8042::new(EventFdTrigger(
            reset_evt
                .try_clone()
                .map_err(|e| Error::Io("clone the reset eventfd", e))?,
        ));
        let mut timer = BootTimer::new(start);
        if let Some(snap) = &restore {
            timer.set_reached(snap.devices.boot_timer_reached);
        }
        let boot_timer = Arc::new(Mutex::new(timer));
        let mut pio = Bus::default();
        pio.insert(u64::from(SERIAL_PORT), 8, serial.clone())?;
        pio.insert(u64::from(I8042_DATA_PORT), 5, Arc::new(Mutex::new(i8042)))?;
        let mut mmio = Bus::default();
        mmio.insert(BOOT_TIMER_ADDR, BOOT_TIMER_SIZE, boot_timer.clone())?;
        let mut slot = slots.iter().copied();
        let mut disks = Vec::new();
        let mut transports = Vec::new();
        for (disk, (base, irq)) in config.disks.iter().zip(slot.by_ref()) {
            let (irq_line, evts, clones) = attach_virtio(&vm, base, irq, 1)?;
            let evt = evts.into_iter().next().ok_or_else(|| {
                Error::Io("create a disk queue", std::io::ErrorKind::Other.into())
            })?;
            let device = Block::new(
                &disk.path,
                disk.read_only,
                mem.clone(),
                irq_line.clone(),
                evt,
            )
            .map_err(|source| Error::Disk {
                path: disk.path.clone(),
                source,
            })?;
            let device = Arc::new(Mutex::new(device));
            let transport = MmioTransport::new(device.clone(), mem.clone(), irq_line, clones);
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
            transports.push(transport);
            disks.push(device);
        }
        let vsock = match (&config.vsock, slot.next()) {
            (Some(cfg), Some((base, irq))) => {
                let (irq_line, evts, clones) = attach_virtio(&vm, base, irq, 3)?;
                let device = Arc::new(Mutex::new(Vsock::new(
                    u64::from(cfg.cid),
                    cfg.uds.clone(),
                    mem.clone(),
                    irq_line.clone(),
                    evts,
                )?));
                let transport = MmioTransport::new(device.clone(), mem.clone(), irq_line, clones);
                let transport = Arc::new(Mutex::new(transport));
                mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
                transports.push(transport);
                Some(device)
            }
            _ => None,
        };
        let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));

        let vcpus = (0..config.cpus)
            .map(|id| match &restore {
                None => Vcpu::new(
                    &kvm,
                    &vm,
                    id,
                    config.cpus,
                    kernel_entry,
                    pio.clone(),
                    mmio.clone(),
                    mem.clone(),
                ),
                Some(_) => Vcpu::create(
                    &kvm,
                    &vm,
                    id,
                    config.cpus,
                    pio.clone(),
                    mmio.clone(),
                    mem.clone(),
                ),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut cpuid = Sha256::new();
        for vcpu in &vcpus {
            cpuid.update(vcpu.cpuid_bytes());
        }
        identity.cpuid = cpuid.finalize().into();

        if let Some(snap) = &restore {
            if snap.identity.cpuid != identity.cpuid {
                return Err(snapshot::Error::Mismatch(
                    "it was made on a CPU with other features (CPUID)".into(),
                )
                .into());
            }
            if snap.devices.transports.len() != transports.len() {
                return Err(
                    snapshot::Error::Mismatch("its devices differ from this VM's".into()).into(),
                );
            }
            restore_vm_state(&vm, &snap.vm)?;
            crate::timings::mark("VM state restored");
            for (vcpu, state) in vcpus.iter().zip(&snap.vcpus) {
                vcpu.restore_state(state)?;
            }
            for (transport, state) in transports.iter().zip(&snap.devices.transports) {
                transport
                    .lock()
                    .map_err(|_| snapshot::Error::Corrupt("a device lock".into()))?
                    .restore(state)
                    .map_err(snapshot::Error::Mismatch)?;
            }
            crate::timings::mark("vCPU and device state restored");
        }
        crate::timings::mark("devices and vCPUs set up");
        if crate::timings::stats_allowed() {
            if let Some(vcpu) = vcpus.first() {
                crate::timings::watch_vcpu_stats(vcpu.raw_fd());
            }
        }
        let prefault = match (vcpus.first(), ahead) {
            (Some(vcpu), Some((what, ranges))) if !ranges.is_empty() => {
                let p = prefault(vcpu, &mem, what, &ranges);
                crate::timings::mark("prefaulted");
                Some(p)
            }
            _ => None,
        };

        Ok(Self {
            vcpus,
            vm,
            _kvm: kvm,
            mem,
            serial,
            boot_timer,
            vsock,
            disks,
            transports,
            reset_evt,
            start,
            identity,
            snapshot: None,
            prefault,
            working_set_unused,
            record: None,
            record_how,
            _fault_around_off: fault_around_off,
            memory_tag,
        })
    }

    /// What the restore prefaulted of the snapshot's memory: none on a
    /// cold boot; by default the snapshot's working set if it has one;
    /// with `--prefault all` every data page (in the test bed that cost
    /// more than the guest faults it saved, docs/SNAPSHOTS.md).
    pub fn prefault(&self) -> Option<&Prefault> {
        self.prefault.as_ref()
    }

    /// Why the snapshot's working set was not used (damaged, another
    /// snapshot's): the guest faults its pages in on demand.
    pub fn working_set_unused(&self) -> Option<&str> {
        self.working_set_unused.as_deref()
    }

    /// Makes this (woken) run record the guest's working set: the VM stops
    /// at the guest's first vsock packet and the pages it touched until
    /// then are written to `target.out` ([`crate::working_set`]).
    pub fn record_working_set_to(&mut self, target: RecordTarget) {
        self.record = Some(target);
    }

    /// Writes a snapshot to `files` when the guest's init writes the
    /// snapshot mark, then stops the VM (see [`crate::snapshot`]).
    pub fn snapshot_to(&mut self, config: &VmConfig, files: SnapshotFiles) -> Result<(), Error> {
        (self.identity.vmm, self.identity.kernel) = vmm_and_kernel(config)?;
        let flag = Arc::new(AtomicBool::new(false));
        let evt =
            EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io("create the snapshot eventfd", e))?;
        let (tx, states) = mpsc::channel();
        for vcpu in &mut self.vcpus {
            vcpu.set_snapshot_hook(SnapshotHook {
                flag: flag.clone(),
                states: tx.clone(),
            });
        }
        self.boot_timer
            .lock()
            .map_err(|_| Error::Io("lock the boot timer", io::ErrorKind::Other.into()))?
            .on_snapshot_mark(
                flag.clone(),
                evt.try_clone()
                    .map_err(|e| Error::Io("clone the snapshot eventfd", e))?,
            );
        self.snapshot = Some(SnapshotTarget {
            files,
            flag,
            evt,
            states,
        });
        Ok(())
    }

    /// What this VM is, as a snapshot of it would record.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The guest's memory (for tests that inspect what the guest sees).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Runs the guest to its end: starts one thread per vCPU, runs the event
    /// loop on this thread, then stops every vCPU and flushes the console.
    pub fn run(self) -> Result<Outcome, Error> {
        self.run_hardened(Hardening::default())
    }

    /// [`Vmm::run`], with each thread's seccomp filter installed before it
    /// runs guest-driven code (the VMM thread's once every vCPU thread exists).
    pub fn run_hardened(mut self, hardening: Hardening) -> Result<Outcome, Error> {
        vcpu::install_kick_handler().map_err(|e| Error::Io("install the vCPU kick handler", e))?;
        let vcpu_filter = hardening.filters.as_ref().map(|f| Arc::new(f.vcpu.clone()));
        let exit_evt =
            EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io("create the exit eventfd", e))?;
        let (exit_tx, exit_rx) = mpsc::channel();
        let mut threads = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            let (req_tx, req_rx) = mpsc::channel();
            let (tx, evt) = (
                exit_tx.clone(),
                exit_evt
                    .try_clone()
                    .map_err(|e| Error::Io("clone the exit eventfd", e))?,
            );
            let filter = vcpu_filter.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id()))
                .spawn(move || {
                    if let Some(filter) = filter {
                        if let Err(e) = seccomp::apply(&filter) {
                            let _ = tx.send((
                                vcpu.id(),
                                Stop::Failed(format!("vCPU {}: {e}", vcpu.id())),
                            ));
                            let _ = evt.write(1);
                            return;
                        }
                    }
                    vcpu.run(&req_rx, &tx, &evt)
                })
                .map_err(|e| Error::Io("spawn a vCPU thread", e));
            match handle {
                Ok(h) => threads.push((h, req_tx)),
                Err(e) => {
                    stop_vcpus(threads);
                    return Err(e);
                }
            }
        }
        drop(exit_tx);

        let result = self
            .harden_this_thread(&hardening)
            .and_then(|()| self.event_loop(exit_evt, exit_rx, hardening.test_forbidden_syscall));
        let mut working_set = None;
        let snapshot = match (&result, self.snapshot.take(), self.record.take()) {
            (Ok(Stop::Snapshot), Some(target), _) => {
                let states = collect_states(&threads, &target, self.vcpus_count());
                stop_vcpus(threads);
                Some(self.write_snapshot(states, target))
            }
            (Ok(Stop::WorkingSet), _, Some(mut target)) => {
                stop_vcpus(threads);
                working_set = Some(self.write_working_set(&mut target));
                None
            }
            _ => {
                stop_vcpus(threads);
                None
            }
        };
        if let Ok(mut serial) = self.serial.lock() {
            let _ = serial.flush();
        }
        let stop = result?;
        let snapshot = snapshot.transpose()?;
        let working_set = working_set.transpose()?;
        let init_reached = self.boot_timer.lock().ok().and_then(|t| t.reached());
        let vsock_rejects = self
            .vsock
            .as_ref()
            .and_then(|v| v.lock().ok().map(|v| (v.refused(), v.malformed)));
        // The VM fd must outlive the vCPU threads that used it.
        drop(self.vm);
        Ok(Outcome {
            stop,
            init_reached,
            total: self.start.elapsed(),
            vsock_rejects,
            snapshot,
            working_set,
        })
    }

    /// Reads which guest pages this process's mapping holds and writes them
    /// as the working set, tagged with the snapshot's memory tag.
    fn write_working_set(&self, target: &mut RecordTarget) -> Result<Recorded, Error> {
        let pages = crate::working_set::record(&target.pagemap, &self.mem)
            .map_err(|e| Error::Io("read /proc/self/pagemap", e))?;
        let bytes = crate::working_set::encode(&self.memory_tag, &pages);
        target
            .out
            .write_all(&bytes)
            .and_then(|()| target.out.sync_data())
            .map_err(|e| Error::Io("write the working set", e))?;
        Ok(Recorded {
            pages: pages.len(),
            written: pages.iter().filter(|p| p.written).count(),
            how: self.record_how.clone(),
        })
    }

    fn vcpus_count(&self) -> usize {
        usize::from(self.identity.cpus)
    }

    /// Writes the snapshot: the VM's and devices' state (refused while a
    /// device is busy), the memory, then the state file (last: a state
    /// file means the memory file is whole).
    fn write_snapshot(
        &self,
        states: Result<Vec<VcpuState>, String>,
        mut target: SnapshotTarget,
    ) -> Result<u64, Error> {
        let vcpus = states.map_err(snapshot::Error::NotQuiescent)?;
        let vm = save_vm_state(&self.vm)?;
        let serial = self
            .serial
            .lock()
            .map_err(|_| snapshot::Error::NotQuiescent("the serial port's lock".into()))?
            .regs();
        let boot_timer_reached = self.boot_timer.lock().is_ok_and(|t| t.reached().is_some());
        let transports = self
            .transports
            .iter()
            .map(|t| {
                t.lock()
                    .map_err(|_| "a device's lock is poisoned".to_owned())
                    .and_then(|t| t.state())
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(snapshot::Error::NotQuiescent)?;
        let memory_size =
            snapshot::write_memory(&self.mem, &mut target.files.memory, &target.files.tag)?;
        let snap = Snapshot {
            identity: self.identity.clone(),
            vm,
            vcpus,
            devices: snapshot::DeviceStates {
                serial,
                boot_timer_reached,
                transports,
            },
            memory_size,
            memory_tag: target.files.tag,
        };
        snap.write_state(&mut target.files.state)?;
        target
            .files
            .state
            .sync_data()
            .map_err(|e| snapshot::Error::Io("write the state file", e))?;
        Ok(memory_size)
    }

    /// On the VMM thread, once the vCPU threads exist.
    fn harden_this_thread(&self, hardening: &Hardening) -> Result<(), Error> {
        if let Some(filters) = &hardening.filters {
            seccomp::apply(&filters.vmm)?;
        }
        Ok(())
    }

    fn event_loop(
        &self,
        exit_evt: EventFd,
        exit_rx: Receiver<(u8, Stop)>,
        forbidden_syscall_after: Option<Duration>,
    ) -> Result<Stop, Error> {
        let reset = self
            .reset_evt
            .try_clone()
            .map_err(|e| Error::Io("clone the reset eventfd", e))?;
        let snapshot_evt = match &self.snapshot {
            Some(t) => Some(
                t.evt
                    .try_clone()
                    .map_err(|e| Error::Io("clone the snapshot eventfd", e))?,
            ),
            None => None,
        };
        let watcher = Arc::new(Mutex::new(ExitWatcher {
            reset_evt: reset,
            exit_evt,
            snapshot_evt,
            exits: exit_rx,
            stop: None,
        }));
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().map_err(Error::EventLoop)?;
        manager.add_subscriber(watcher.clone());
        if let Some(vsock) = &self.vsock {
            manager.add_subscriber(vsock.clone());
        }
        for disk in &self.disks {
            manager.add_subscriber(disk.clone());
        }
        let mut forbidden_syscall_after = forbidden_syscall_after;
        loop {
            match forbidden_syscall_after {
                None => {
                    manager.run().map_err(Error::EventLoop)?;
                }
                Some(after) => {
                    manager.run_with_timeout(100).map_err(Error::EventLoop)?;
                    let reached = self.boot_timer.lock().ok().and_then(|t| t.reached());
                    if reached.is_some_and(|r| self.start.elapsed() >= r + after) {
                        forbidden_syscall_after = None;
                        test_forbidden_syscall();
                    }
                }
            }
            if let Some(stop) = watcher.lock().ok().and_then(|w| w.stop.clone()) {
                return Ok(stop);
            }
            if self.record.is_some()
                && self
                    .vsock
                    .as_ref()
                    .is_some_and(|v| v.lock().is_ok_and(|v| v.guest_spoke))
            {
                return Ok(Stop::WorkingSet);
            }
        }
    }
}

/// What [`Vmm::run_hardened`] applies.
#[derive(Debug, Default)]
pub struct Hardening {
    /// Per-thread seccomp filters; `None` runs unfiltered (`--no-seccomp`).
    pub filters: Option<seccomp::Filters>,
    /// Test hook: this long after the guest's init reached the boot-timer
    /// mark, the VMM thread makes a system call its filter forbids.
    pub test_forbidden_syscall: Option<Duration>,
}

/// What a compromised VMM would try first: an Internet socket. The VMM
/// thread's filter kills the process here.
fn test_forbidden_syscall() {
    eprintln!("airlock-vmm: test: making a forbidden system call (socket(AF_INET))");
    // SAFETY: socket(2) with constant arguments; a returned fd is closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd >= 0 {
            eprintln!("airlock-vmm: test: socket(AF_INET) was allowed");
            libc::close(fd);
        }
    }
}

/// A slot's interrupt line, its queue eventfds, and clones for the transport.
type VirtioWiring = (Arc<IrqLine>, Vec<EventFd>, Vec<EventFd>);

/// Wires a virtio-mmio slot at `base` on `irq` into KVM: an irqfd for the
/// interrupt and one ioeventfd per queue (so notifications never exit to
/// userspace). Returns the interrupt line, the queue eventfds for the device
/// and clones of them for the transport's fallback path.
fn attach_virtio(vm: &VmFd, base: u64, irq: u32, queues: u32) -> Result<VirtioWiring, Error> {
    let eventfd = |what| EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Io(what, e));
    let irq_evt = eventfd("create a virtio irqfd")?;
    vm.register_irqfd(&irq_evt, irq)
        .map_err(|e| Error::Kvm("register a virtio irqfd", e))?;
    let mut evts = Vec::new();
    for queue in 0..queues {
        let evt = eventfd("create a virtio queue eventfd")?;
        vm.register_ioevent(&evt, &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY), queue)
            .map_err(|e| Error::Kvm("register a virtio ioeventfd", e))?;
        evts.push(evt);
    }
    let clones = evts
        .iter()
        .map(EventFd::try_clone)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Io("clone a virtio queue eventfd", e))?;
    Ok((Arc::new(IrqLine::new(irq_evt)), evts, clones))
}

/// Sends every vCPU thread a stop request and kicks it out of `KVM_RUN`
/// until it has ended (or the grace period is over), then joins it.
fn stop_vcpus(threads: Vec<(JoinHandle<()>, Sender<Request>)>) {
    for (_, tx) in &threads {
        let _ = tx.send(Request::Stop);
    }
    let deadline = Instant::now() + VCPU_STOP_GRACE;
    // A kick can land just before the thread re-enters KVM_RUN; repeat it.
    while threads.iter().any(|(h, _)| !h.is_finished()) && Instant::now() < deadline {
        for (h, _) in threads.iter().filter(|(h, _)| !h.is_finished()) {
            let _ = h.kill(vcpu::kick_signal());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for (h, _) in threads {
        if h.is_finished() {
            let _ = h.join();
        }
        // A thread still inside KVM_RUN after the grace period is left to
        // the process exit; joining it would hang the VMM.
    }
}

/// The digests of this VMM's executable and of `config`'s kernel.
fn vmm_and_kernel(config: &VmConfig) -> Result<([u8; 32], [u8; 32]), snapshot::Error> {
    Ok((
        snapshot::elf_identity(std::path::Path::new("/proc/self/exe"))?,
        snapshot::elf_identity(&config.kernel)?,
    ))
}

/// Waits for every vCPU's state once the snapshot flag is up: each vCPU
/// saves it at its next exit from `KVM_RUN` (the one that wrote the mark
/// at once; the others are kicked out).
fn collect_states(
    threads: &[(JoinHandle<()>, Sender<Request>)],
    target: &SnapshotTarget,
    count: usize,
) -> Result<Vec<VcpuState>, String> {
    target.flag.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + VCPU_STOP_GRACE * 5;
    let mut states: Vec<Option<VcpuState>> = (0..count).map(|_| None).collect();
    while states.iter().any(Option::is_none) {
        if Instant::now() >= deadline {
            return Err("a vCPU did not pause for the snapshot".into());
        }
        for (h, _) in threads.iter().filter(|(h, _)| !h.is_finished()) {
            let _ = h.kill(vcpu::kick_signal());
        }
        match target.states.recv_timeout(Duration::from_millis(5)) {
            Ok((id, Ok(state))) => {
                if let Some(slot) = states.get_mut(usize::from(id)) {
                    *slot = Some(state);
                }
            }
            Ok((id, Err(e))) => return Err(format!("vCPU {id}: {e}")),
            Err(_) => {}
        }
    }
    Ok(states.into_iter().flatten().collect())
}

/// The VM-wide in-kernel state: PIT, clock, both PICs, IOAPIC.
fn save_vm_state(vm: &VmFd) -> Result<snapshot::VmState, snapshot::Error> {
    let kvm = |what| move |e| snapshot::Error::Kvm(what, e);
    let mut state = snapshot::VmState {
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        ..Default::default()
    };
    for (chip_id, chip) in (0u32..).zip(state.irqchips.iter_mut()) {
        chip.chip_id = chip_id;
        vm.get_irqchip(chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    }
    Ok(state)
}

fn restore_vm_state(vm: &VmFd, state: &snapshot::VmState) -> Result<(), snapshot::Error> {
    let kvm = |what| move |e| snapshot::Error::Kvm(what, e);
    vm.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    // The flags KVM reports (TSC stable, realtime) are not for setting.
    let mut clock = state.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// Watches the i8042 reset line, the vCPUs' exit reports and the
/// snapshot mark.
struct ExitWatcher {
    reset_evt: EventFd,
    exit_evt: EventFd,
    snapshot_evt: Option<EventFd>,
    exits: Receiver<(u8, Stop)>,
    stop: Option<Stop>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            self.stop.get_or_insert(Stop::Reset);
        } else if let Some(evt) = self
            .snapshot_evt
            .as_ref()
            .filter(|e| e.as_raw_fd() == events.fd())
        {
            let _ = evt.read();
            self.stop.get_or_insert(Stop::Snapshot);
        } else if events.fd() == self.exit_evt.as_raw_fd() {
            let _ = self.exit_evt.read();
            while let Ok((_, stop)) = self.exits.try_recv() {
                if stop != Stop::Requested {
                    self.stop.get_or_insert(stop);
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration only fails for a duplicate fd or a dead epoll fd; the
        // loop would then never see the guest stop, so say so loudly.
        let snapshot = self.snapshot_evt.as_ref().map(AsRawFd::as_raw_fd);
        for fd in [self.reset_evt.as_raw_fd(), self.exit_evt.as_raw_fd()]
            .into_iter()
            .chain(snapshot)
        {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                eprintln!("airlock-vmm: error: cannot watch exit events: {e:?}");
                self.stop = Some(Stop::Failed("cannot watch exit events".into()));
            }
        }
    }
}
