//! 16550 UART (COM1 at 0x3F8-0x3FF, IRQ 4) on top of vm-superio's `Serial`.
//!
//! The UART's interrupt is delivered as an edge on GSI 4 each time vm-superio
//! raises it (THR empty, received data), which is what the vm-superio model
//! offers. Everything the guest transmits goes to the host writer and to an
//! in-memory [`ConsoleLog`] the VMM can scan (for example for a stats line).
//! No host input is connected: the receive FIFO only fills in loopback mode.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use super::{InterruptLines, PioAction, PioDevice};

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3F8;
/// Ports a 16550 decodes.
pub const PORT_COUNT: u16 = 8;
/// IRQ (and GSI) of COM1.
pub const COM1_IRQ: u32 = 4;
/// The console copy keeps at most this many bytes; older output is dropped
/// in halves so a chatty guest cannot grow the VMM without bound.
pub const CONSOLE_LOG_CAP: usize = 8 << 20;

/// A shared copy of everything the guest wrote to the serial port.
#[derive(Debug, Clone, Default)]
pub struct ConsoleLog(Arc<Mutex<Vec<u8>>>);

impl ConsoleLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn buf(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let mut buf = self.buf();
        buf.extend_from_slice(bytes);
        if buf.len() > CONSOLE_LOG_CAP {
            let drop = buf.len() - CONSOLE_LOG_CAP / 2;
            buf.drain(..drop);
        }
    }

    /// The bytes kept so far.
    pub fn contents(&self) -> Vec<u8> {
        self.buf().clone()
    }

    /// The output as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf()).into_owned()
    }

    /// The last complete or partial line starting with `prefix`, without its
    /// line ending.
    pub fn last_line_starting_with(&self, prefix: &str) -> Option<String> {
        self.text()
            .lines()
            .rev()
            .find(|l| l.starts_with(prefix))
            .map(|l| l.trim_end_matches('\r').to_owned())
    }
}

/// Raises COM1's interrupt as an edge on its GSI.
pub struct IrqTrigger {
    lines: Arc<dyn InterruptLines>,
    gsi: u32,
}

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.lines.pulse_gsi(self.gsi);
        Ok(())
    }
}

/// Sends the guest's bytes to the host writer and the console log.
pub struct TeeWriter {
    out: Box<dyn Write + Send>,
    log: ConsoleLog,
}

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Log first: the copy stays complete even if the host writer fails.
        self.log.push(buf);
        self.out.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A 16550 UART on the port bus.
pub struct SerialPort {
    base: u16,
    uart: Serial<IrqTrigger, NoEvents, TeeWriter>,
    log: ConsoleLog,
}

impl SerialPort {
    /// A UART at `base` (IRQ 4) writing to `out`.
    pub fn new(base: u16, lines: Arc<dyn InterruptLines>, out: Box<dyn Write + Send>) -> Self {
        let log = ConsoleLog::new();
        let trigger = IrqTrigger {
            lines,
            gsi: COM1_IRQ,
        };
        let writer = TeeWriter {
            out,
            log: log.clone(),
        };
        Self {
            base,
            uart: Serial::new(trigger, writer),
            log,
        }
    }

    /// A handle on the guest's output.
    pub fn console(&self) -> ConsoleLog {
        self.log.clone()
    }

    /// The register offset of byte `i` of an access at `port`, if the UART
    /// decodes it.
    fn offset(&self, port: u16, i: usize) -> Option<u8> {
        let off = usize::from(port.wrapping_sub(self.base)) + i;
        (off < usize::from(PORT_COUNT)).then_some(off as u8)
    }
}

impl PioDevice for SerialPort {
    /// Wider accesses are split into byte accesses to consecutive registers,
    /// as an 8-bit ISA device sees them.
    fn read(&mut self, port: u16, data: &mut [u8]) {
        for i in 0..data.len() {
            let value = match self.offset(port, i) {
                Some(off) => self.uart.read(off),
                None => 0xFF,
            };
            if let Some(b) = data.get_mut(i) {
                *b = value;
            }
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
        for (i, value) in data.iter().enumerate() {
            if let Some(off) = self.offset(port, i) {
                if let Err(e) = self.uart.write(off, *value) {
                    // The host side failed (e.g. a closed pipe); the guest
                    // carries on like a UART with nothing attached.
                    tracing::warn!("serial output failed: {e:?}");
                }
            }
        }
        PioAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{Event, RecordingLines};
    use super::*;

    const THR: u16 = COM1_BASE;
    const IER: u16 = COM1_BASE + 1;
    const IIR: u16 = COM1_BASE + 2;
    const LCR: u16 = COM1_BASE + 3;
    const LSR: u16 = COM1_BASE + 5;
    const SCR: u16 = COM1_BASE + 7;

    /// A writer tests can read back.
    #[derive(Clone, Default)]
    struct SharedVec(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedVec {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (SerialPort, Arc<RecordingLines>, SharedVec) {
        let lines = Arc::new(RecordingLines::default());
        let out = SharedVec::default();
        (
            SerialPort::new(COM1_BASE, lines.clone(), Box::new(out.clone())),
            lines,
            out,
        )
    }

    fn inb(dev: &mut SerialPort, port: u16) -> u8 {
        let mut b = [0];
        dev.read(port, &mut b);
        b[0]
    }

    #[test]
    fn transmitted_bytes_reach_writer_and_console_log() {
        let (mut dev, _, out) = uart();
        for b in b"hello\n" {
            assert_eq!(dev.write(THR, &[*b]), PioAction::None);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hello\n");
        assert_eq!(dev.console().contents(), b"hello\n");
    }

    #[test]
    fn console_log_finds_last_line_with_prefix() {
        let (mut dev, _, _) = uart();
        for b in b"STATS a=1\r\nother\nSTATS a=2\r\ntail" {
            dev.write(THR, &[*b]);
        }
        let log = dev.console();
        assert_eq!(
            log.last_line_starting_with("STATS").as_deref(),
            Some("STATS a=2")
        );
        assert_eq!(log.last_line_starting_with("nope"), None);
        assert_eq!(log.text(), "STATS a=1\r\nother\nSTATS a=2\r\ntail");
    }

    #[test]
    fn console_log_drops_oldest_half_past_cap() {
        let log = ConsoleLog::new();
        log.push(&vec![b'a'; CONSOLE_LOG_CAP]);
        log.push(b"bc");
        let kept = log.contents();
        assert_eq!(kept.len(), CONSOLE_LOG_CAP / 2);
        assert_eq!(&kept[kept.len() - 2..], b"bc");
    }

    #[test]
    fn thr_empty_interrupt_pulses_irq4_when_enabled() {
        let (mut dev, lines, _) = uart();
        dev.write(THR, b"x");
        assert_eq!(lines.take(), vec![], "no interrupt while IER is clear");
        // Enabling THRE interrupts asserts it at once: the THR is empty.
        dev.write(IER, &[0x02]);
        assert_eq!(
            lines.take(),
            vec![Event::Gsi(4, true), Event::Gsi(4, false)]
        );
        // IIR reports THR empty (0x2), then the read acknowledges it.
        assert_eq!(inb(&mut dev, IIR) & 0x0F, 0x02);
        assert_eq!(inb(&mut dev, IIR) & 0x0F, 0x01);
        dev.write(THR, b"y");
        assert_eq!(
            lines.take(),
            vec![Event::Gsi(4, true), Event::Gsi(4, false)]
        );
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let (mut dev, _, _) = uart();
        assert_eq!(inb(&mut dev, LSR) & 0x60, 0x60);
    }

    #[test]
    fn scratch_and_lcr_read_back() {
        let (mut dev, _, _) = uart();
        dev.write(SCR, &[0x5A]);
        assert_eq!(inb(&mut dev, SCR), 0x5A);
        dev.write(LCR, &[0x03]);
        assert_eq!(inb(&mut dev, LCR), 0x03);
    }

    #[test]
    fn word_access_splits_into_consecutive_registers() {
        let (mut dev, _, _) = uart();
        // outw to LCR writes LCR then MCR.
        dev.write(LCR, &[0x03, 0x0B]);
        assert_eq!(inb(&mut dev, LCR), 0x03);
        assert_eq!(inb(&mut dev, COM1_BASE + 4), 0x0B);
        // A dword read at the last register only decodes one byte.
        let mut d = [0u8; 4];
        dev.write(SCR, &[0x11]);
        dev.read(SCR, &mut d);
        assert_eq!(d, [0x11, 0xFF, 0xFF, 0xFF]);
    }

    #[test]
    fn failing_host_writer_does_not_stop_the_guest() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("closed"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Arc::new(RecordingLines::default());
        let mut dev = SerialPort::new(COM1_BASE, lines, Box::new(Broken));
        assert_eq!(dev.write(THR, b"q"), PioAction::None);
        assert_eq!(dev.console().contents(), b"q");
    }
}
