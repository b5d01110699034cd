//! The 16550A UART at 0x3f8 (vm-superio), its interrupt on an irqfd, its
//! output to the console sink.

use std::io::{self, LineWriter, Write};

use vm_superio::Serial;

use super::bus::BusDevice;
use super::EventFdTrigger;

/// Where the guest console goes.
pub type ConsoleSink = LineWriter<Capped<Box<dyn Write + Send>>>;

/// Most console bytes kept from one guest: a guest that floods its serial
/// port must not fill the host's disk.
pub const CONSOLE_LIMIT: u64 = 16 << 20;

/// A writer that passes on the first `limit` bytes, then one note, then
/// nothing.
#[derive(Debug)]
pub struct Capped<W> {
    inner: W,
    left: u64,
    noted: bool,
}

impl<W: Write> Capped<W> {
    /// Caps `inner` at `limit` bytes.
    pub fn new(inner: W, limit: u64) -> Self {
        Self {
            inner,
            left: limit,
            noted: false,
        }
    }
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if take > 0 {
            let n = self.inner.write(&buf[..take])?;
            self.left -= n as u64;
            return Ok(n);
        }
        if !self.noted {
            self.noted = true;
            self.inner
                .write_all(b"\n[airlock-vmm: console limit reached, further output dropped]\n")?;
        }
        // Report the bytes as written: the guest must not stall on a full console.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

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
            serial: Serial::new(irq, LineWriter::new(Capped::new(out, CONSOLE_LIMIT))),
        }
    }

    /// A UART whose registers are `regs` (a restored snapshot's); `None`
    /// if they cannot be (an input buffer over the FIFO's size).
    pub fn from_regs(
        irq: EventFdTrigger,
        out: Box<dyn Write + Send>,
        regs: &crate::snapshot::SerialRegs,
    ) -> Option<Self> {
        let [dll, dlh, ier, iir, lcr, lsr, mcr, msr, scr] = regs.regs;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlh,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: regs.in_buffer.clone(),
        };
        let out = LineWriter::new(Capped::new(out, CONSOLE_LIMIT));
        Serial::from_state(&state, irq, vm_superio::serial::NoEvents, out)
            .ok()
            .map(|serial| Self { serial })
    }

    /// The UART's registers, for a snapshot.
    pub fn regs(&self) -> crate::snapshot::SerialRegs {
        let s = self.serial.state();
        crate::snapshot::SerialRegs {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
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
            if off == 0 && crate::timings::on() {
                crate::timings::first(crate::timings::First::SerialByte);
                if *b == b'\n' {
                    crate::timings::first(crate::timings::First::SerialLine);
                }
            }
            // A console that cannot be written (closed pipe, full disk) must
            // not stop the guest; the bytes are lost, which is all we can do.
            let _ = self.serial.write(off, *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_is_capped_with_one_note() {
        let mut w = Capped::new(Vec::new(), 5);
        w.write_all(b"hello world").expect("write");
        w.write_all(b"more").expect("write");
        let out = String::from_utf8(w.inner).expect("utf8");
        assert!(
            out.starts_with("hello\n[airlock-vmm: console limit reached"),
            "{out}"
        );
        assert_eq!(out.matches("console limit").count(), 1);
        assert!(!out.contains("world") && !out.contains("more"));
    }

    #[test]
    fn guest_bytes_written_to_the_uart_reach_the_console() {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0
                    .lock()
                    .map_err(|_| io::ErrorKind::Other)?
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Shared::default();
        let irq =
            vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("evt");
        let mut dev = SerialDevice::new(EventFdTrigger(irq), Box::new(sink.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]); // THR
        }
        dev.write(0, b"xy"); // not a byte access: ignored
        dev.flush().expect("flush");
        assert_eq!(sink.0.lock().expect("lock").as_slice(), b"hi\n");
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
    }
}
