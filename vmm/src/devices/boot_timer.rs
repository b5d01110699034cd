//! The boot timer: one MMIO page the init writes a magic byte to once it runs
//! (as Firecracker's boot timer). The VMM reports the time from its own start
//! to that write; benchmarks read the line.

use std::time::{Duration, Instant};

use airlock_protocol::machine::BOOT_TIMER_MAGIC;

use super::bus::BusDevice;

/// Records when the guest's init announced itself.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    reached: Option<Duration>,
}

impl BootTimer {
    /// A timer counting from `start` (the VMM's start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            reached: None,
        }
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
    fn report_line_is_machine_readable() {
        let l = BootTimer::report_line(Duration::from_micros(1_234_567));
        assert_eq!(
            l,
            "airlock-vmm: boot-timer: guest init reached after 1234.6 ms"
        );
    }
}
