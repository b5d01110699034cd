//! The i8042 keyboard controller, reduced to what a guest without ACPI needs:
//! the CPU-reset command (0xfe on port 0x64), which is how it stops the VM.

use vm_superio::I8042Device;

use super::bus::BusDevice;
use super::EventFdTrigger;

/// The i8042 at 0x60..=0x64; its reset line is an `EventFd` the event loop
/// watches.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller that signals `reset` when the guest resets the CPU.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            inner: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [b]) => *b = self.inner.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            // The only failure is a full eventfd counter, which still wakes
            // the event loop: the reset is not lost.
            let _ = self.inner.write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_fires_the_reset_line_and_nothing_else_does() {
        let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().expect("clone")));
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xd1]);
        assert!(evt.read().is_err(), "no reset yet");
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0], "input buffer empty: kb_wait() does not spin");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().expect("reset"), 1);
    }
}
