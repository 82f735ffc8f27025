//! The IOAPIC: indirect register access, redirection table entries and the
//! version 0x20 EOI register.

use crate::arch::{mmio_read32, mmio_write32};

/// A redirection table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirection(pub u64);

impl Redirection {
    /// Fixed delivery, physical destination `dest`, edge, active high, unmasked.
    pub fn fixed(vector: u8, dest: u8) -> Self {
        Redirection(u64::from(vector) | (u64::from(dest) << 56))
    }
    /// Sets level (true) or edge (false) triggering.
    pub fn level(self, level: bool) -> Self {
        self.with_bit(15, level)
    }
    /// Sets active-low (true) or active-high (false) polarity.
    pub fn active_low(self, low: bool) -> Self {
        self.with_bit(13, low)
    }
    /// Sets the mask bit.
    pub fn masked(self, masked: bool) -> Self {
        self.with_bit(16, masked)
    }
    /// Sets logical (true) or physical (false) destination mode.
    pub fn logical(self, logical: bool) -> Self {
        self.with_bit(11, logical)
    }
    /// Lowest-priority delivery (mode 0b001) instead of fixed.
    pub fn lowest_priority(self) -> Self {
        Redirection((self.0 & !(0b111 << 8)) | (0b001 << 8))
    }
    /// Destination field (bits 63:56).
    pub fn destination(self) -> u8 {
        (self.0 >> 56) as u8
    }
    /// Whether the entry is level triggered.
    pub fn is_level(self) -> bool {
        self.0 & (1 << 15) != 0
    }
    /// Vector.
    pub fn vector(self) -> u8 {
        self.0 as u8
    }
    /// Remote IRR: a level interrupt was delivered and not yet EOI'd.
    pub fn remote_irr(self) -> bool {
        self.0 & (1 << 14) != 0
    }
    /// Delivery status (send pending).
    pub fn delivery_pending(self) -> bool {
        self.0 & (1 << 12) != 0
    }
    /// Whether the entry is masked.
    pub fn is_masked(self) -> bool {
        self.0 & (1 << 16) != 0
    }
    fn with_bit(self, bit: u32, on: bool) -> Self {
        if on {
            Redirection(self.0 | (1 << bit))
        } else {
            Redirection(self.0 & !(1 << bit))
        }
    }
}

/// One IOAPIC at an MMIO base.
#[derive(Clone, Copy, Debug)]
pub struct IoApic {
    /// MMIO base address.
    pub base: usize,
}

impl IoApic {
    /// Reads indirect register `index`.
    pub fn read(&self, index: u32) -> u32 {
        mmio_write32(self.base, index);
        mmio_read32(self.base + 0x10)
    }
    /// Writes indirect register `index`.
    pub fn write(&self, index: u32, value: u32) {
        mmio_write32(self.base, index);
        mmio_write32(self.base + 0x10, value);
    }
    /// Version (0x11 for the 82093AA-like, 0x20 with an EOI register).
    pub fn version(&self) -> u8 {
        self.read(1) as u8
    }
    /// Maximum redirection entry (version register bits 23:16).
    pub fn max_redirection_entry(&self) -> u32 {
        (self.read(1) >> 16) & 0xFF
    }
    /// Number of redirection entries.
    pub fn pins(&self) -> u32 {
        self.max_redirection_entry() + 1
    }
    /// Reads the entry for `pin`.
    pub fn redirection(&self, pin: u32) -> Redirection {
        let low = self.read(0x10 + 2 * pin);
        let high = self.read(0x11 + 2 * pin);
        Redirection((u64::from(high) << 32) | u64::from(low))
    }
    /// Writes the entry for `pin` (high half first, so the unmask comes last).
    pub fn set_redirection(&self, pin: u32, rte: Redirection) {
        self.write(0x11 + 2 * pin, (rte.0 >> 32) as u32);
        self.write(0x10 + 2 * pin, rte.0 as u32);
    }
    /// Writes only the low half of `pin`'s entry (vector, modes, mask).
    pub fn set_low(&self, pin: u32, rte: Redirection) {
        self.write(0x10 + 2 * pin, rte.0 as u32);
    }
    /// Writes only the high half of `pin`'s entry: retargets it to `dest`.
    pub fn set_destination(&self, pin: u32, dest: u8) {
        self.write(0x11 + 2 * pin, u32::from(dest) << 24);
    }
    /// Masks `pin`, keeping the rest of its entry.
    pub fn mask(&self, pin: u32) {
        let low = self.read(0x10 + 2 * pin);
        self.write(0x10 + 2 * pin, low | (1 << 16));
    }
    /// Masks every pin.
    pub fn mask_all(&self) {
        for pin in 0..self.pins() {
            self.set_redirection(pin, Redirection(0).masked(true));
        }
    }
    /// Directed EOI through the version 0x20 EOI register: clears remote IRR
    /// of the entries with `vector`.
    pub fn eoi(&self, vector: u8) {
        mmio_write32(self.base + 0x40, u32::from(vector));
    }
}
