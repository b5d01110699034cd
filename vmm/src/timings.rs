//! `--timings`: where the VMM's start goes, for benchmarks and for finding
//! what a restore spends its time on.
//!
//! Off by default; then every mark is one relaxed atomic load. On, each mark
//! makes one line on stderr:
//!
//! ```text
//! airlock-vmm: timings: <ms since main()> ms <what>
//! ```
//!
//! The lines of the start are held in memory and written when the guest
//! sends its first vsock packet (that line first: it is the moment a host
//! sees the guest ready) or ends its first console line, or at [`flush`]
//! (the end of `main`): each line written on the way would cost a write and
//! a wake-up of whoever reads stderr, on the path being measured (~15 ms of
//! a wake in the test bed). Later marks are written at once.
//!
//! The first line also gives the process's age when `main()` began (from
//! `/proc/self/stat`, in clock ticks: 10 ms steps on most kernels), the
//! part a clock started in `main()` cannot see (exec, loading, relocation).
//! Guest-driven marks ([`first`]) print once, however often they are hit, and
//! carry the vCPU exits counted so far.

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();
/// vCPU exits to this process since the start (counted only when on).
static EXITS: AtomicU64 = AtomicU64::new(0);
/// PIO and MMIO exits among them.
static PIO: AtomicU64 = AtomicU64::new(0);
static MMIO: AtomicU64 = AtomicU64::new(0);

/// vCPU 0's KVM statistics (`KVM_GET_STATS_FD`), when they may be read:
/// without the seccomp filters (the vCPU threads' filter has no `pread64`).
static STATS: OnceLock<Stats> = OnceLock::new();

/// The counters worth a line, in the order printed.
const COUNTERS: [&str; 9] = [
    "exits",
    "halt_exits",
    "halt_wait_ns",
    "pf_taken",
    "pf_fixed",
    "pf_guest",
    "pf_spurious",
    "irq_injections",
    "signal_exits",
];

struct Stats {
    file: File,
    /// (name, offset of its u64 in the stats file).
    fields: Vec<(&'static str, u64)>,
}

static STATS_ALLOWED: AtomicBool = AtomicBool::new(false);

/// Says that no thread will have a seccomp filter (`--no-seccomp`): then
/// the marks may read KVM's counters.
pub fn allow_stats() {
    STATS_ALLOWED.store(true, Ordering::Relaxed);
}

/// Whether [`allow_stats`] was called and the marks are on.
pub fn stats_allowed() -> bool {
    on() && STATS_ALLOWED.load(Ordering::Relaxed)
}

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;

/// Also print vCPU `vcpu_fd`'s KVM counters at the guest-driven marks.
/// Call only where every thread may `pread64` (no seccomp filters).
pub fn watch_vcpu_stats(vcpu_fd: RawFd) {
    if !on() {
        return;
    }
    // SAFETY: an ioctl without argument on a vCPU fd we hold; a negative
    // result is an error, a non-negative one a new fd that we own.
    let fd = unsafe { libc::ioctl(vcpu_fd, KVM_GET_STATS_FD) };
    if fd < 0 {
        mark("no KVM statistics (KVM_GET_STATS_FD failed)");
        return;
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    match parse_stats(&file) {
        Some(fields) => {
            let _ = STATS.set(Stats { file, fields });
        }
        None => mark("no KVM statistics (unreadable header)"),
    }
}

/// Finds [`COUNTERS`] among the descriptors of a KVM stats file.
fn parse_stats(file: &File) -> Option<Vec<(&'static str, u64)>> {
    let mut header = [0u8; 24];
    file.read_exact_at(&mut header, 0).ok()?;
    let word = |b: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
    };
    let name_size = u64::from(word(&header, 4)?);
    let count = u64::from(word(&header, 8)?).min(4096);
    let desc_offset = u64::from(word(&header, 16)?);
    let data_offset = u64::from(word(&header, 20)?);
    if name_size == 0 || name_size > 4096 {
        return None;
    }
    let stride = 16 + name_size;
    let mut descs = vec![0u8; usize::try_from(stride * count).ok()?];
    file.read_exact_at(&mut descs, desc_offset).ok()?;
    let mut fields = Vec::new();
    for d in descs.chunks_exact(usize::try_from(stride).ok()?) {
        let offset = u64::from(word(d, 8)?);
        let name = d.get(16..)?;
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        if let Some(c) = COUNTERS.iter().find(|c| c.as_bytes() == name) {
            fields.push((*c, data_offset + offset));
        }
    }
    fields.sort_by_key(|(n, _)| COUNTERS.iter().position(|c| c == n));
    Some(fields)
}

/// `; KVM: name=value ...`, or nothing without statistics.
fn stats_line() -> String {
    let Some(stats) = STATS.get() else {
        return String::new();
    };
    let mut line = String::from("; KVM:");
    for (name, at) in &stats.fields {
        let mut v = [0u8; 8];
        if stats.file.read_exact_at(&mut v, *at).is_ok() {
            line.push_str(&format!(" {name}={}", u64::from_ne_bytes(v)));
        }
    }
    line
}

/// Guest-driven events that are marked the first time only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// A vCPU entered `KVM_RUN`.
    Run,
    /// The guest put a packet on the vsock TX queue.
    VsockTx,
    /// The device put a packet on the guest's vsock RX queue.
    VsockRx,
    /// The guest wrote a byte to the serial port.
    SerialByte,
    /// The guest ended a line on the serial port.
    SerialLine,
}

const FIRSTS: usize = 5;
static SEEN: [AtomicBool; FIRSTS] = [const { AtomicBool::new(false) }; FIRSTS];

impl First {
    fn what(self) -> &'static str {
        match self {
            First::Run => "first KVM_RUN",
            First::VsockTx => "first vsock packet from the guest",
            First::VsockRx => "first vsock packet to the guest",
            First::SerialByte => "first serial byte",
            First::SerialLine => "first serial line ended",
        }
    }
}

/// The lines not written yet (`None` once written: later marks go at once).
static HELD: Mutex<Option<Vec<String>>> = Mutex::new(Some(Vec::new()));

/// Turns the marks on; `start` is when `main()` began.
pub fn enable(start: Instant) {
    let _ = START.set(start);
    ON.store(true, Ordering::Relaxed);
    let age = process_age_ms().map_or_else(|| "?".to_owned(), |ms| ms.to_string());
    mark(&format!("main() began; the process was then {age} ms old"));
}

/// Writes the held lines (once; later marks are written at once).
pub fn flush() {
    if !on() {
        return;
    }
    let held = HELD.lock().map(|mut h| h.take()).unwrap_or(None);
    if let Some(lines) = held {
        if !lines.is_empty() {
            eprint!("{}", lines.concat());
        }
    }
}

/// `what`'s line, `ms` as `{:8.1}` would print it (integer arithmetic: no
/// floating-point formatting on the measured path).
fn line(micros: u128, what: &str) -> String {
    let tenths = (micros + 50) / 100;
    format!(
        "airlock-vmm: timings: {:>8} ms {what}\n",
        format!("{}.{}", tenths / 10, tenths % 10)
    )
}

/// `what`'s line, stamped now.
fn line_now(what: &str) -> String {
    line(START.get().map_or(0, |s| s.elapsed().as_micros()), what)
}

/// Whether marks are on.
#[inline]
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Notes `what` with the time since `main()` began, if on: held until the
/// guest is ready (module docs), then written at once.
pub fn mark(what: &str) {
    if !on() {
        return;
    }
    let line = line_now(what);
    if let Ok(mut held) = HELD.lock() {
        if let Some(lines) = held.as_mut() {
            lines.push(line);
            return;
        }
    }
    eprint!("{line}");
}

/// Marks `event` the first time it happens, with the exits counted so far.
#[inline]
pub fn first(event: First) {
    if !on() || SEEN[event as usize].swap(true, Ordering::Relaxed) {
        return;
    }
    let what = format!(
        "{} (after {} vCPU exits: {} PIO, {} MMIO{})",
        event.what(),
        EXITS.load(Ordering::Relaxed),
        PIO.load(Ordering::Relaxed),
        MMIO.load(Ordering::Relaxed),
        stats_line()
    );
    if matches!(event, First::VsockTx | First::SerialLine) {
        // The guest is ready (or talking): this line now, then the held ones.
        eprint!("{}", line_now(&what));
        flush();
    } else {
        mark(&what);
    }
}

/// Counts one vCPU exit (`pio`/`mmio`: of that kind).
#[inline]
pub fn exit(pio: bool, mmio: bool) {
    if !on() {
        return;
    }
    EXITS.fetch_add(1, Ordering::Relaxed);
    if pio {
        PIO.fetch_add(1, Ordering::Relaxed);
    }
    if mmio {
        MMIO.fetch_add(1, Ordering::Relaxed);
    }
}

/// The process's age in ms, from its start time in `/proc/self/stat` (field
/// 22, clock ticks since boot) and `CLOCK_BOOTTIME`.
fn process_age_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let started: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } != 0 || hz == 0 {
        return None;
    }
    let now_ms =
        u64::try_from(now.tv_sec).ok()? * 1000 + u64::try_from(now.tv_nsec).ok()? / 1_000_000;
    Some(now_ms.saturating_sub(started * 1000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stats file as KVM lays it out: header, descriptors (16 bytes and
    /// a fixed-size name each), data.
    fn stats_file(counters: &[(&str, u64)], name_size: usize) -> File {
        let count = counters.len();
        let desc_offset = 24 + 8; // the id string in between
        let data_offset = desc_offset + count * (16 + name_size);
        let mut bytes = Vec::new();
        for w in [
            0u32,
            u32::try_from(name_size).expect("test set-up"),
            u32::try_from(count).expect("test set-up"),
            24,
            u32::try_from(desc_offset).expect("test set-up"),
            u32::try_from(data_offset).expect("test set-up"),
        ] {
            bytes.extend_from_slice(&w.to_ne_bytes());
        }
        bytes.extend_from_slice(b"kvm-1/0\0");
        for (i, (name, _)) in counters.iter().enumerate() {
            bytes.extend_from_slice(&0u32.to_ne_bytes()); // flags
            bytes.extend_from_slice(&0i16.to_ne_bytes()); // exponent
            bytes.extend_from_slice(&1u16.to_ne_bytes()); // size
            bytes.extend_from_slice(&u32::try_from(i * 8).expect("small").to_ne_bytes()); // offset
            bytes.extend_from_slice(&0u32.to_ne_bytes()); // bucket size
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            bytes.extend_from_slice(&n);
        }
        for (_, v) in counters {
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        // SAFETY: a fresh anonymous file; the name is a valid C string.
        let fd = unsafe { libc::memfd_create(c"stats".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: `fd` is new and owned by nothing else.
        let mut f = unsafe { File::from_raw_fd(fd) };
        std::io::Write::write_all(&mut f, &bytes).expect("test set-up");
        f
    }

    #[test]
    fn kvm_counters_are_found_by_name_in_a_stats_file() {
        let f = stats_file(
            &[
                ("halt_exits", 7),
                ("unrelated", 1),
                ("exits", 42),
                ("pf_taken", 9),
            ],
            48,
        );
        let fields = parse_stats(&f).expect("parsed");
        let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
        // Ours only, in the printed order.
        assert_eq!(names, ["exits", "halt_exits", "pf_taken"]);
        let stats = Stats { file: f, fields };
        let values: Vec<u64> = stats
            .fields
            .iter()
            .map(|(_, at)| {
                let mut v = [0u8; 8];
                stats.file.read_exact_at(&mut v, *at).expect("test set-up");
                u64::from_ne_bytes(v)
            })
            .collect();
        assert_eq!(values, [42, 7, 9]);
    }

    #[test]
    fn a_stats_header_with_an_absurd_name_size_is_refused() {
        let f = stats_file(&[("exits", 1)], 8192);
        assert!(parse_stats(&f).is_none());
    }

    #[test]
    fn a_line_has_the_ms_with_one_decimal_right_aligned() {
        assert_eq!(line(0, "x"), "airlock-vmm: timings:      0.0 ms x\n");
        assert_eq!(line(12_345, "y"), "airlock-vmm: timings:     12.3 ms y\n");
        assert_eq!(line(12_350, "y"), "airlock-vmm: timings:     12.4 ms y\n");
        assert_eq!(line(999_960, "z"), "airlock-vmm: timings:   1000.0 ms z\n");
        assert_eq!(
            line(123_456_789_000, "w"),
            "airlock-vmm: timings: 123456789.0 ms w\n"
        );
        for micros in [0u128, 49, 50, 1_234, 98_765, 5_000_000] {
            let f = micros as f64 / 1e3;
            assert_eq!(
                line(micros, "v"),
                format!("airlock-vmm: timings: {f:8.1} ms v\n"),
                "{micros}"
            );
        }
    }

    #[test]
    fn the_process_age_is_read_and_small() {
        let age = process_age_ms().expect("/proc/self/stat and CLOCK_BOOTTIME");
        // A test process is seconds old at most, not years.
        assert!(age < 3_600_000, "age {age} ms");
    }
}
