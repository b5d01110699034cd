//! The 16550A UART at 0x3f8 (vm-superio), its interrupt on an irqfd, its
//! output to the console sink.

use std::io::{self, LineWriter, Write};

use vm_superio::Serial;

use super::bus::BusDevice;
use super::EventFdTrigger;

/// Where the guest console goes.
pub type ConsoleSink = LineWriter<Box<dyn Write + Send>>;

/// The guest's first serial port.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialDevice")
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(irq, LineWriter::new(out)),
        }
    }

    /// Flushes what the guest wrote without a trailing newline.
    pub fn flush(&mut self) -> io::Result<()> {
        self.serial.writer_mut().flush()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [b]) => *b = self.serial.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            // A console that cannot be written (closed pipe, full disk) must
            // not stop the guest; the bytes are lost, which is all we can do.
            let _ = self.serial.write(off, *b);
        }
    }
}
