//! Message signalled interrupts: typed MSI address and data values, and the
//! driver of virq's MSI test device (ports 0x2400-0x240F), which sends any
//! address/data pair the guest programs. QEMU has no such device; there the
//! signature register reads all ones.

use crate::arch::{inl, outl};

/// First port of the MSI test device.
pub const TESTDEV_PORT: u16 = 0x2400;
/// What the send register reads on virq ("virq" in memory order).
pub const TESTDEV_SIGNATURE: u32 = 0x7172_6976;

/// An MSI address (xAPIC format, 0xFEEx_xxxx).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Address(pub u64);

impl Address {
    /// Physical destination `apic_id` (bits 19:12).
    pub fn physical(apic_id: u8) -> Self {
        Address(0xFEE0_0000 | u64::from(apic_id) << 12)
    }
    /// Logical destination: the 8-bit mask `mda` (bits 19:12), DM set (bit 2).
    pub fn logical(mda: u8) -> Self {
        Address(Self::physical(mda).0 | 1 << 2)
    }
    /// The same address with the redirection hint (bit 3) set.
    pub fn redirection_hint(self) -> Self {
        Address(self.0 | 1 << 3)
    }
    /// The same address in remappable format (bit 4), an IOMMU handle.
    pub fn remappable(self) -> Self {
        Address(self.0 | 1 << 4)
    }
}

/// MSI data: vector, delivery mode, level and trigger mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Data(pub u32);

/// Delivery mode field values (data bits 10:8).
pub mod mode {
    /// Fixed.
    pub const FIXED: u32 = 0;
    /// Lowest priority.
    pub const LOWEST_PRIORITY: u32 = 1;
    /// NMI (the vector is ignored).
    pub const NMI: u32 = 4;
}

impl Data {
    /// `vector` with delivery mode `mode` (one of [`mode`]), edge-triggered.
    pub fn new(vector: u8, mode: u32) -> Self {
        Data(u32::from(vector) | (mode & 7) << 8)
    }
    /// Fixed delivery of `vector`, edge-triggered.
    pub fn fixed(vector: u8) -> Self {
        Self::new(vector, mode::FIXED)
    }
    /// Lowest-priority delivery of `vector`, edge-triggered.
    pub fn lowest_priority(vector: u8) -> Self {
        Self::new(vector, mode::LOWEST_PRIORITY)
    }
    /// NMI delivery; `vector` goes into the (ignored) vector field.
    pub fn nmi(vector: u8) -> Self {
        Self::new(vector, mode::NMI)
    }
    /// The same data level-triggered (bit 15), asserting (bit 14) or not.
    pub fn level(self, assert: bool) -> Self {
        let d = self.0 | 1 << 15;
        Data(if assert { d | 1 << 14 } else { d & !(1 << 14) })
    }
}

/// Whether virq's MSI test device answers at [`TESTDEV_PORT`].
pub fn testdev_present() -> bool {
    inl(TESTDEV_PORT + 12) == TESTDEV_SIGNATURE
}

/// Programs the test device with `address`/`data` and sends that MSI.
pub fn send(address: Address, data: Data) {
    outl(TESTDEV_PORT, address.0 as u32);
    outl(TESTDEV_PORT + 4, (address.0 >> 32) as u32);
    outl(TESTDEV_PORT + 8, data.0);
    outl(TESTDEV_PORT + 12, 1);
}
