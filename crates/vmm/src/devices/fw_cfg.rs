//! QEMU's fw_cfg, traditional I/O-port interface only (no DMA, no files).
//!
//! A 16-bit write to 0x510 selects an item and rewinds its read offset; each
//! byte read from 0x511 returns the next byte of the item (0 past its end or
//! for an unknown item). Other accesses are ignored (writes) or read 0,
//! except that a wider read at 0x511 returns that many consecutive data bytes.
//!
//! Items: 0x0000 signature "QEMU", 0x0001 interface ID (1 = traditional),
//! 0x0003 RAM size (u64 LE), 0x0005 number of CPUs (u16 LE), 0x000F maximum
//! CPUs (u16 LE, equal to the number of CPUs: no hotplug).

use super::{PioAction, PioDevice};

/// The selector port.
pub const SELECTOR_PORT: u16 = 0x510;
/// The data port.
pub const DATA_PORT: u16 = 0x511;
/// Ports decoded (selector and data).
pub const PORT_COUNT: u16 = 2;

/// Item keys (QEMU's `FW_CFG_*`).
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x0000;
    /// Interface feature bits.
    pub const ID: u16 = 0x0001;
    /// RAM size in bytes.
    pub const RAM_SIZE: u16 = 0x0003;
    /// Number of CPUs present at boot.
    pub const NB_CPUS: u16 = 0x0005;
    /// Maximum number of CPUs.
    pub const MAX_CPUS: u16 = 0x000F;
}

/// Selector bit QEMU uses to mark an item as written; selecting ignores it.
const SELECT_WRITE_BIT: u16 = 0x4000;

/// The fw_cfg device.
#[derive(Debug, Clone)]
pub struct FwCfg {
    cpus: u16,
    ram_bytes: u64,
    selected: Vec<u8>,
    offset: usize,
}

impl FwCfg {
    /// fw_cfg reporting `cpus` CPUs and `ram_bytes` of RAM. CPU counts above
    /// 0xFFFF saturate (the item is 16 bits).
    pub fn new(cpus: u32, ram_bytes: u64) -> Self {
        let cpus = u16::try_from(cpus).unwrap_or(u16::MAX);
        let mut dev = Self {
            cpus,
            ram_bytes,
            selected: Vec::new(),
            offset: 0,
        };
        dev.select(key::SIGNATURE);
        dev
    }

    /// The contents of item `key`; empty for unknown items.
    fn item(&self, key: u16) -> Vec<u8> {
        match key {
            key::SIGNATURE => b"QEMU".to_vec(),
            key::ID => 1u32.to_le_bytes().to_vec(),
            key::RAM_SIZE => self.ram_bytes.to_le_bytes().to_vec(),
            key::NB_CPUS | key::MAX_CPUS => self.cpus.to_le_bytes().to_vec(),
            _ => Vec::new(),
        }
    }

    fn select(&mut self, selector: u16) {
        self.selected = self.item(selector & !SELECT_WRITE_BIT);
        self.offset = 0;
    }

    fn next_byte(&mut self) -> u8 {
        let b = self.selected.get(self.offset).copied().unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        b
    }
}

impl PioDevice for FwCfg {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        if port == DATA_PORT {
            for b in data.iter_mut() {
                *b = self.next_byte();
            }
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
        if let (SELECTOR_PORT, &[lo, hi]) = (port, data) {
            self.select(u16::from_le_bytes([lo, hi]));
        }
        PioAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(d: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        d.write(SELECTOR_PORT, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0xAA];
                d.read(DATA_PORT, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn signature_reads_qemu() {
        let mut d = FwCfg::new(2, 1 << 30);
        assert_eq!(read_item(&mut d, key::SIGNATURE, 4), b"QEMU");
    }

    #[test]
    fn id_reports_traditional_interface() {
        let mut d = FwCfg::new(2, 1 << 30);
        assert_eq!(read_item(&mut d, key::ID, 4), [1, 0, 0, 0]);
    }

    #[test]
    fn ram_size_is_u64_le() {
        let mut d = FwCfg::new(2, 0x1_2345_6000);
        assert_eq!(
            read_item(&mut d, key::RAM_SIZE, 8),
            0x1_2345_6000u64.to_le_bytes()
        );
    }

    #[test]
    fn cpu_counts_are_u16_le() {
        let mut d = FwCfg::new(255, 0);
        assert_eq!(read_item(&mut d, key::NB_CPUS, 2), [255, 0]);
        assert_eq!(read_item(&mut d, key::MAX_CPUS, 2), [255, 0]);
    }

    #[test]
    fn reading_past_item_end_and_unknown_items_return_zero() {
        let mut d = FwCfg::new(3, 0);
        assert_eq!(read_item(&mut d, key::NB_CPUS, 4), [3, 0, 0, 0]);
        assert_eq!(read_item(&mut d, 0x1234, 3), [0, 0, 0]);
    }

    #[test]
    fn select_rewinds_offset() {
        let mut d = FwCfg::new(3, 0);
        assert_eq!(read_item(&mut d, key::SIGNATURE, 2), b"QE");
        assert_eq!(read_item(&mut d, key::SIGNATURE, 4), b"QEMU");
    }

    #[test]
    fn write_bit_in_selector_is_ignored() {
        let mut d = FwCfg::new(3, 0);
        assert_eq!(read_item(&mut d, key::NB_CPUS | 0x4000, 2), [3, 0]);
    }

    #[test]
    fn byte_write_to_selector_and_data_writes_are_ignored() {
        let mut d = FwCfg::new(3, 0);
        read_item(&mut d, key::NB_CPUS, 0);
        d.write(SELECTOR_PORT, &[0]);
        d.write(DATA_PORT, &[9]);
        let mut b = [0u8; 2];
        d.read(DATA_PORT, &mut b);
        assert_eq!(b, [3, 0], "a wider data read returns consecutive bytes");
        let mut s = [0xAAu8; 2];
        d.read(SELECTOR_PORT, &mut s);
        assert_eq!(s, [0, 0]);
    }
}
