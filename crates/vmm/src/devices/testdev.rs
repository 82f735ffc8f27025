//! The interrupt parts of QEMU's pc-testdev.
//!
//! - Ports 0x2000 + n (n < 24): a byte written sets the level of ISA/GSI line
//!   n to `value != 0`. QEMU only accepts byte accesses there, so wider
//!   accesses are ignored (writes) or read as 0; byte reads return 0.
//! - Port 0xE4 (4 ports): the "flush page" port. QEMU re-protects the guest
//!   page named by the written address to flush TLBs; that has no meaning
//!   here, so the write is a no-op. Reads return 0.
//!
//! The scratch ports 0xE0/0xE8 and the MMIO window at 0xFF000000 are not
//! modelled.

use std::sync::Arc;

use super::{InterruptLines, PioAction, PioDevice};

/// First IRQ-line port.
pub const IRQ_LINE_BASE: u16 = 0x2000;
/// Number of IRQ-line ports (GSIs 0-23).
pub const IRQ_LINE_COUNT: u16 = 24;
/// The flush-page port.
pub const FLUSH_PORT: u16 = 0xE4;
/// Ports the flush-page register decodes.
pub const FLUSH_PORT_COUNT: u16 = 4;

/// pc-testdev's IRQ lines and flush port.
pub struct PcTestdev {
    lines: Arc<dyn InterruptLines>,
}

impl PcTestdev {
    /// A testdev driving `lines`.
    pub fn new(lines: Arc<dyn InterruptLines>) -> Self {
        Self { lines }
    }

    /// The GSI an IRQ-line port drives.
    fn irq_line(port: u16) -> Option<u32> {
        let n = port.checked_sub(IRQ_LINE_BASE)?;
        (n < IRQ_LINE_COUNT).then_some(u32::from(n))
    }
}

impl PioDevice for PcTestdev {
    fn read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
        if let (Some(gsi), [value]) = (Self::irq_line(port), data) {
            self.lines.set_gsi(gsi, *value != 0);
        }
        // Flush port writes and non-byte IRQ-line writes do nothing.
        PioAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{Event, RecordingLines};
    use super::*;

    fn dev() -> (PcTestdev, Arc<RecordingLines>) {
        let lines = Arc::new(RecordingLines::default());
        (PcTestdev::new(lines.clone()), lines)
    }

    #[test]
    fn byte_write_sets_gsi_level() {
        let (mut d, lines) = dev();
        d.write(0x2000 + 10, &[1]);
        d.write(0x2000 + 10, &[0]);
        d.write(0x2000 + 23, &[0x80]);
        d.write(0x2000, &[0]);
        assert_eq!(
            lines.take(),
            vec![
                Event::Gsi(10, true),
                Event::Gsi(10, false),
                Event::Gsi(23, true),
                Event::Gsi(0, false)
            ]
        );
    }

    #[test]
    fn wider_irq_line_write_is_ignored() {
        let (mut d, lines) = dev();
        assert_eq!(d.write(0x2001, &[1, 0]), PioAction::None);
        assert_eq!(d.write(0x2001, &[1, 0, 0, 0]), PioAction::None);
        assert_eq!(lines.take(), vec![]);
    }

    #[test]
    fn port_past_line_23_drives_nothing() {
        let (mut d, lines) = dev();
        d.write(0x2018, &[1]);
        d.write(0x1FFF, &[1]);
        assert_eq!(lines.take(), vec![]);
    }

    #[test]
    fn flush_port_write_is_noop_and_reads_zero() {
        let (mut d, lines) = dev();
        assert_eq!(
            d.write(FLUSH_PORT, &0x1000u32.to_le_bytes()),
            PioAction::None
        );
        assert_eq!(lines.take(), vec![]);
        let mut v = [0xFFu8; 4];
        d.read(FLUSH_PORT, &mut v);
        assert_eq!(v, [0; 4]);
    }

    #[test]
    fn irq_line_read_returns_zero() {
        let (mut d, _) = dev();
        let mut v = [0xFFu8];
        d.read(0x2004, &mut v);
        assert_eq!(v, [0]);
    }
}
