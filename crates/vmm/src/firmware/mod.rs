//! Firmware tables that tell a guest where its CPUs and the IOAPIC are: an
//! Intel MultiProcessor table and ACPI (RSDP, RSDT, XSDT, MADT).
//!
//! Everything lives in 0xE0000-0xFFFFF, which the loader's memory map reports
//! reserved: the ACPI tables from [`ACPI_START`], the MP floating pointer and
//! configuration table from [`MP_START`] (inside the range the MP spec says
//! an OS scans). Both describe the same machine:
//!
//! - CPU n has local APIC ID n; CPU 0 is the bootstrap processor;
//! - one IOAPIC at [`IOAPIC_ADDR`] with GSI base 0 and ID [`ioapic_id`];
//! - ISA IRQ n goes to IOAPIC pin n, except IRQ 0 (the PIT) which goes to
//!   pin 2, and IRQ 2 (the cascade) which is not connected (the PC
//!   convention, as in QEMU and KVM);
//! - LINT0 is ExtINT (the 8259 PIC), LINT1 is NMI, on every CPU.
//!
//! No FADT or DSDT is written: the guests only need the MADT.

pub mod acpi;
pub mod mptable;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Physical address of the IOAPIC's registers.
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// Physical address of the local APICs' registers.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// IOAPIC version of virq's own IOAPIC (split and userspace modes), for the
/// MP table; kernel mode reports KVM's 0x11.
pub const IOAPIC_VERSION: u8 = 0x20;
/// Local APIC version reported in the MP table (integrated APIC).
pub const LAPIC_VERSION: u8 = 0x14;
/// Number of IOAPIC pins.
pub const IOAPIC_PINS: u32 = 24;
/// Where the ACPI tables start (the RSDP is first, 16-byte aligned).
pub const ACPI_START: u64 = 0xE_0000;
/// Where the MP floating pointer starts (the configuration table follows).
pub const MP_START: u64 = 0xF_0000;
/// End of the firmware area.
pub const FIRMWARE_END: u64 = 0x10_0000;
/// Most CPUs the tables describe (the device models' limit). The MP table
/// only describes CPUs with APIC IDs below 255; the MADT lists the others as
/// x2APIC entries.
pub const MAX_CPUS: u32 = virq::MAX_VCPUS as u32;

/// Why the tables could not be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FirmwareError {
    /// A machine needs at least one CPU.
    #[error("at least one CPU is needed")]
    NoCpus,
    /// More CPUs than the tables (and device models) support.
    #[error("{cpus} CPUs requested, at most {max} supported")]
    TooManyCpus {
        /// Requested.
        cpus: u32,
        /// Supported.
        max: u32,
    },
    /// A table grew past its area (cannot happen within [`MAX_CPUS`]).
    #[error("{table} needs {len:#x} bytes at {addr:#x}, past {limit:#x}")]
    DoesNotFit {
        /// Which table.
        table: &'static str,
        /// Where it starts.
        addr: u64,
        /// Its size.
        len: usize,
        /// The end of its area.
        limit: u64,
    },
    /// Guest RAM does not cover the firmware area.
    #[error(
        "guest RAM must cover {:#x}-{:#x} for the firmware tables",
        ACPI_START,
        FIRMWARE_END
    )]
    NoFirmwareMemory,
    /// Writing guest memory failed.
    #[error("writing guest memory at {addr:#x} failed: {msg}")]
    Memory {
        /// Where.
        addr: u64,
        /// What went wrong.
        msg: String,
    },
}

/// The IOAPIC's ID in the tables: 0, what its ID register holds after reset
/// in every mode (KVM's, ours), as QEMU's tables say too. IOAPIC and local
/// APIC IDs are separate name spaces on every APIC bus since the P4, so 0 is
/// unambiguous, and a guest that checks the register against the tables
/// (Linux does) finds them agreeing without firmware reprogramming it. The
/// register is 4 bits wide, so "the first ID after the CPUs'" could not
/// match it beyond 15 CPUs anyway.
pub fn ioapic_id(_cpus: u32) -> u8 {
    0
}

/// The byte that makes `bytes` sum to zero (mod 256) once added.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// A little-endian table under construction.
#[derive(Debug, Default, Clone)]
pub(crate) struct TableBuf(pub Vec<u8>);

impl TableBuf {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Overwrite a u16 written earlier (a length field).
    pub fn set_u16(&mut self, at: usize, v: u16) {
        if let Some(dst) = self.0.get_mut(at..at + 2) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }
    /// Overwrite a u32 written earlier (a length field).
    pub fn set_u32(&mut self, at: usize, v: u32) {
        if let Some(dst) = self.0.get_mut(at..at + 4) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }
    /// Set the byte at `at` so the bytes in `range` sum to zero.
    pub fn fix_checksum(&mut self, at: usize, range: std::ops::Range<usize>) {
        if let Some(b) = self.0.get_mut(at) {
            *b = 0;
        }
        let sum = self.0.get(range).map(checksum).unwrap_or(0);
        if let Some(b) = self.0.get_mut(at) {
            *b = sum;
        }
    }
}

/// A table and where it goes.
pub(crate) struct Placed {
    pub name: &'static str,
    pub addr: u64,
    pub bytes: Vec<u8>,
    pub limit: u64,
}

/// Write the MP table and the ACPI tables for `cpus` CPUs.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    cpus: u32,
    ioapic_version: u8,
) -> Result<(), FirmwareError> {
    if cpus == 0 {
        return Err(FirmwareError::NoCpus);
    }
    if cpus > MAX_CPUS {
        return Err(FirmwareError::TooManyCpus {
            cpus,
            max: MAX_CPUS,
        });
    }
    if !mem.check_range(
        GuestAddress(ACPI_START),
        (FIRMWARE_END - ACPI_START) as usize,
    ) {
        return Err(FirmwareError::NoFirmwareMemory);
    }
    let mut tables = acpi::build(cpus, ACPI_START, MP_START);
    tables.extend(mptable::build(cpus, ioapic_version, MP_START, FIRMWARE_END));
    for t in &tables {
        if t.addr + t.bytes.len() as u64 > t.limit {
            return Err(FirmwareError::DoesNotFit {
                table: t.name,
                addr: t.addr,
                len: t.bytes.len(),
                limit: t.limit,
            });
        }
    }
    for t in &tables {
        mem.write_slice(&t.bytes, GuestAddress(t.addr))
            .map_err(|e| FirmwareError::Memory {
                addr: t.addr,
                msg: e.to_string(),
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ram() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    #[test]
    fn zero_cpus_is_an_error() {
        assert_eq!(
            write_tables(&ram(), 0, IOAPIC_VERSION),
            Err(FirmwareError::NoCpus)
        );
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        assert_eq!(
            write_tables(&ram(), MAX_CPUS + 1, IOAPIC_VERSION),
            Err(FirmwareError::TooManyCpus {
                cpus: MAX_CPUS + 1,
                max: MAX_CPUS
            })
        );
    }

    #[test]
    fn ram_without_firmware_area_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xA_0000)]).unwrap();
        assert_eq!(
            write_tables(&mem, 1, IOAPIC_VERSION),
            Err(FirmwareError::NoFirmwareMemory)
        );
    }

    #[test]
    fn ioapic_id_is_the_reset_value_of_the_register() {
        for cpus in [1, 4, 16, 254, 255] {
            assert_eq!(ioapic_id(cpus), 0);
        }
    }

    #[test]
    fn checksum_makes_sum_zero() {
        let data = [1u8, 2, 250, 77];
        let c = checksum(&data);
        let total = data.iter().fold(c, |s, b| s.wrapping_add(*b));
        assert_eq!(total, 0);
    }

    #[test]
    fn every_supported_cpu_count_fits() {
        for cpus in [1, 2, 16, 254, 255, 256] {
            write_tables(&ram(), cpus, IOAPIC_VERSION).unwrap();
        }
    }
}
