//! The boot timer: one MMIO page the init writes a magic byte to once it runs
//! (as Firecracker's boot timer). The VMM reports the time from its own start
//! to that write; benchmarks read the line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use airlock_protocol::machine::{BOOT_TIMER_MAGIC, SNAPSHOT_MAGIC, SNAPSHOT_OFFSET};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Records when the guest's init announced itself.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    reached: Option<Duration>,
    /// With `--snapshot-to`: the flag that pauses every vCPU, and the
    /// event that wakes the VMM thread to write the snapshot.
    snapshot: Option<(Arc<AtomicBool>, EventFd)>,
}

impl BootTimer {
    /// A timer counting from `start` (the VMM's start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            reached: None,
            snapshot: None,
        }
    }

    /// Takes a snapshot when the init writes the snapshot mark: `flag`
    /// pauses the vCPUs, `evt` wakes the VMM thread. Without this the mark
    /// is ignored (a guest cannot ask for a snapshot the host did not).
    pub fn on_snapshot_mark(&mut self, flag: Arc<AtomicBool>, evt: EventFd) {
        self.snapshot = Some((flag, evt));
    }

    /// A restored timer: the mark came before the snapshot.
    pub fn set_reached(&mut self, reached: bool) {
        self.reached = reached.then_some(Duration::ZERO);
    }

    /// Time from VMM start to the init's mark, once it was written.
    pub fn reached(&self) -> Option<Duration> {
        self.reached
    }

    /// The line the VMM prints when the mark arrives.
    pub fn report_line(elapsed: Duration) -> String {
        format!(
            "airlock-vmm: boot-timer: guest init reached after {:.1} ms",
            elapsed.as_secs_f64() * 1e3
        )
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == SNAPSHOT_OFFSET && data.first() == Some(&SNAPSHOT_MAGIC) {
            if let Some((flag, evt)) = &self.snapshot {
                if !flag.swap(true, Ordering::SeqCst) {
                    let _ = evt.write(1);
                }
            }
            return;
        }
        // Only the first mark counts: a guest cannot move the timer later.
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) && self.reached.is_none() {
            let elapsed = self.start.elapsed();
            self.reached = Some(elapsed);
            eprintln!("{}", Self::report_line(elapsed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_byte_at_offset_zero_marks_and_only_once() {
        let mut t = BootTimer::new(Instant::now());
        t.write(0, &[BOOT_TIMER_MAGIC.wrapping_add(1)]);
        t.write(8, &[BOOT_TIMER_MAGIC]);
        assert_eq!(t.reached(), None);
        t.write(0, &[BOOT_TIMER_MAGIC]);
        let first = t.reached().expect("marked");
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(t.reached(), Some(first));
    }

    #[test]
    fn the_snapshot_mark_counts_only_when_the_host_asked_for_one() {
        let mut t = BootTimer::new(Instant::now());
        t.write(SNAPSHOT_OFFSET, &[SNAPSHOT_MAGIC]);
        let flag = Arc::new(AtomicBool::new(false));
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("evt");
        t.on_snapshot_mark(flag.clone(), evt.try_clone().expect("clone"));
        t.write(SNAPSHOT_OFFSET, &[SNAPSHOT_MAGIC.wrapping_add(1)]);
        t.write(0, &[SNAPSHOT_MAGIC]);
        assert!(!flag.load(Ordering::SeqCst));
        t.write(SNAPSHOT_OFFSET, &[SNAPSHOT_MAGIC]);
        assert!(flag.load(Ordering::SeqCst));
        assert_eq!(evt.read().expect("woken"), 1);
        t.write(SNAPSHOT_OFFSET, &[SNAPSHOT_MAGIC]);
        assert!(evt.read().is_err(), "once only");
    }

    #[test]
    fn report_line_is_machine_readable() {
        let l = BootTimer::report_line(Duration::from_micros(1_234_567));
        assert_eq!(
            l,
            "airlock-vmm: boot-timer: guest init reached after 1234.6 ms"
        );
    }
}
