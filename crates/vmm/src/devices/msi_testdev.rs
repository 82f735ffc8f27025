//! virq's MSI test device: lets a guest send an arbitrary MSI.
//!
//! | port   | access     | meaning                                          |
//! |--------|------------|--------------------------------------------------|
//! | 0x2400 | dword r/w  | MSI address, low 32 bits                         |
//! | 0x2404 | dword r/w  | MSI address, high 32 bits                        |
//! | 0x2408 | dword r/w  | MSI data                                         |
//! | 0x240C | dword w    | any write sends the MSI (the value is ignored)   |
//! | 0x240C | dword r    | 0x7172_6976 (the bytes "virq"): device present   |
//!
//! QEMU has no such device and reads 0x240C as all ones, so a guest can tell
//! whether it runs under virq. The registers are byte-addressable: narrower
//! or unaligned accesses read or replace the bytes they cover, and a write
//! that touches any byte of 0x240C-0x240F sends the MSI after the other bytes
//! of that write have been stored.

use std::sync::Arc;

use super::{InterruptLines, PioAction, PioDevice};

/// First port.
pub const BASE: u16 = 0x2400;
/// Ports decoded.
pub const PORT_COUNT: u16 = 16;
/// What a dword read of the send register returns ("virq" in memory order).
pub const SIGNATURE: u32 = 0x7172_6976;

/// Offset of the send/signature register.
const SEND_OFFSET: usize = 12;

/// The MSI test device.
pub struct MsiTestdev {
    lines: Arc<dyn InterruptLines>,
    /// Address low, address high, data: 12 bytes, little endian.
    regs: [u8; SEND_OFFSET],
}

impl MsiTestdev {
    /// A device sending MSIs through `lines`.
    pub fn new(lines: Arc<dyn InterruptLines>) -> Self {
        Self {
            lines,
            regs: [0; SEND_OFFSET],
        }
    }

    fn dword(&self, index: usize) -> u32 {
        let mut b = [0u8; 4];
        if let Some(src) = self.regs.get(index * 4..index * 4 + 4) {
            b.copy_from_slice(src);
        }
        u32::from_le_bytes(b)
    }

    /// The programmed MSI address.
    pub fn address(&self) -> u64 {
        u64::from(self.dword(0)) | (u64::from(self.dword(1)) << 32)
    }

    /// The programmed MSI data.
    pub fn data(&self) -> u32 {
        self.dword(2)
    }

    /// Register offset of byte `i` of an access at `port`, if decoded.
    fn offset(port: u16, i: usize) -> Option<usize> {
        let off = usize::from(port.checked_sub(BASE)?) + i;
        (off < usize::from(PORT_COUNT)).then_some(off)
    }
}

impl PioDevice for MsiTestdev {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        let signature = SIGNATURE.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = match Self::offset(port, i) {
                Some(off) if off < SEND_OFFSET => self.regs.get(off).copied().unwrap_or(0xFF),
                Some(off) => signature.get(off - SEND_OFFSET).copied().unwrap_or(0xFF),
                None => 0xFF,
            };
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
        let mut send = false;
        for (i, value) in data.iter().enumerate() {
            match Self::offset(port, i) {
                Some(off) if off < SEND_OFFSET => {
                    if let Some(r) = self.regs.get_mut(off) {
                        *r = *value;
                    }
                }
                Some(_) => send = true,
                None => {}
            }
        }
        if send {
            self.lines.send_msi(self.address(), self.data());
        }
        PioAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{Event, RecordingLines};
    use super::*;

    fn dev() -> (MsiTestdev, Arc<RecordingLines>) {
        let lines = Arc::new(RecordingLines::default());
        (MsiTestdev::new(lines.clone()), lines)
    }

    fn outl(d: &mut MsiTestdev, port: u16, v: u32) {
        d.write(port, &v.to_le_bytes());
    }

    fn inl(d: &mut MsiTestdev, port: u16) -> u32 {
        let mut b = [0u8; 4];
        d.read(port, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn send_register_write_sends_programmed_msi() {
        let (mut d, lines) = dev();
        outl(&mut d, 0x2400, 0xFEE0_1000);
        outl(&mut d, 0x2404, 0x0000_0001);
        outl(&mut d, 0x2408, 0x0000_4041);
        assert_eq!(lines.take(), vec![], "programming alone sends nothing");
        outl(&mut d, 0x240C, 0xDEAD_BEEF);
        assert_eq!(lines.take(), vec![Event::Msi(0x1_FEE0_1000, 0x4041)]);
        // Sending again repeats the same message.
        d.write(0x240C, &[0]);
        assert_eq!(lines.take(), vec![Event::Msi(0x1_FEE0_1000, 0x4041)]);
    }

    #[test]
    fn signature_read_returns_virq() {
        let (mut d, _) = dev();
        assert_eq!(inl(&mut d, 0x240C), 0x7172_6976);
        let mut b = [0u8; 4];
        d.read(0x240C, &mut b);
        assert_eq!(&b, b"virq");
    }

    #[test]
    fn registers_read_back() {
        let (mut d, _) = dev();
        outl(&mut d, 0x2400, 0x1122_3344);
        outl(&mut d, 0x2408, 0x5566_7788);
        assert_eq!(inl(&mut d, 0x2400), 0x1122_3344);
        assert_eq!(inl(&mut d, 0x2404), 0);
        assert_eq!(inl(&mut d, 0x2408), 0x5566_7788);
    }

    #[test]
    fn byte_writes_replace_single_bytes() {
        let (mut d, _) = dev();
        outl(&mut d, 0x2408, 0x1122_3344);
        d.write(0x2409, &[0xAB]);
        assert_eq!(d.data(), 0x1122_AB44);
    }

    #[test]
    fn access_running_past_the_device_reads_ones_and_ignores_writes() {
        let (mut d, lines) = dev();
        let mut b = [0u8; 4];
        d.read(0x240E, &mut b);
        assert_eq!(b, [b'r', b'q', 0xFF, 0xFF]);
        // 0x2410 is outside: no state change, no panic.
        d.write(0x2410, &[1, 2, 3, 4]);
        assert_eq!(lines.take(), vec![]);
        assert_eq!(d.address(), 0);
    }
}
